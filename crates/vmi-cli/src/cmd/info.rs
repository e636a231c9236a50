//! `vmi info`: qemu-img info — facts about an image, in qemu-img's human layout or its JSON keys
//! (plus a `probe` object saying how the format was detected, when it was).

use crate::common::{self, parse_format, size_to_str, OutputFormat};
use crate::outln;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use vmi_disk::{BackingMode, Format, Image, SnapshotInfo};

/// Show an image's format, sizes, backing file and format-specific information.
///
/// The backing file is not opened unless --backing-chain is given; --backing-chain follows the
/// chain and implies --allow-backing for the image's own folder (use --allow-backing=DIR to
/// widen it).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<Format>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
    /// Show every image of the backing chain (a JSON array with --output=json).
    #[arg(long)]
    backing_chain: bool,
    /// Read without taking image locks (qemu-img's force-share): allows reading an image
    /// another process (a running QEMU) has open for writing, whose contents may be changing.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// Run `vmi info`.
pub fn run(gate: &common::GateArgs, a: Args) -> anyhow::Result<u8> {
    let mode = if a.backing_chain {
        BackingMode::Open
    } else {
        BackingMode::Skip
    };
    let img = common::open_ro(
        &a.file,
        a.format,
        gate.gate(a.backing_chain),
        mode,
        a.force_share,
    )?;
    let mut chain = vec![&img];
    if a.backing_chain {
        let mut cur = &img;
        while let Some(b) = cur.backing_image() {
            chain.push(b);
            cur = b;
        }
    }
    match a.output {
        OutputFormat::Json => {
            let objs: Vec<Value> = chain.iter().map(|i| info_json(i)).collect();
            if a.backing_chain {
                common::print_json(&objs)?;
            } else {
                common::print_json(&objs[0])?;
            }
        }
        OutputFormat::Human => {
            for (i, img) in chain.iter().enumerate() {
                if i > 0 {
                    outln!()?;
                }
                print_human(img)?;
            }
        }
    }
    Ok(0)
}

/// The backing file as recorded, resolved the way qemu-img shows it (relative to the image's
/// folder), without opening it.
fn full_backing_name(img: &Image, name: &str) -> PathBuf {
    if let Some(b) = img.backing_image() {
        return b.path().to_path_buf();
    }
    let p = Path::new(name);
    match img.path().parent() {
        Some(d) if !p.is_absolute() && !d.as_os_str().is_empty() => d.join(p),
        _ => p.to_path_buf(),
    }
}

/// Bytes on disk of the image and of its companion files (VMDK extents).
fn actual_size(img: &Image) -> Option<u64> {
    let main = common::allocated_bytes(img.path())?;
    let extra: u64 = vmi_disk::formats::companion_files(img.format(), img.path())
        .iter()
        .filter_map(|p| common::allocated_bytes(p))
        .sum();
    Some(main + extra)
}

fn file_length(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// Whether the format-specific data describes an encrypted image (a LUKS volume, or qcow2 with
/// an `encrypt` block), for qemu-img's `encrypted` line.
fn is_encrypted(fs: &Value) -> bool {
    fs["type"] == "luks" || !fs["data"]["encrypt"].is_null()
}

/// qemu-img's JSON object for one image.
fn info_json(img: &Image) -> Value {
    let info = img.driver().info();
    let filename = img.path().display().to_string();
    let mut o = Map::new();
    o.insert("filename".into(), json!(filename));
    o.insert("format".into(), json!(img.format()));
    o.insert("virtual-size".into(), json!(img.virtual_size()));
    if let Some(a) = actual_size(img) {
        o.insert("actual-size".into(), json!(a));
    }
    o.insert("dirty-flag".into(), json!(info.dirty));
    if let Some(c) = info.cluster_size {
        o.insert("cluster-size".into(), json!(c));
    }
    if let Some(b) = img.driver().backing() {
        o.insert("backing-filename".into(), json!(b.name));
        o.insert(
            "full-backing-filename".into(),
            json!(full_backing_name(img, &b.name).display().to_string()),
        );
        if let Some(f) = b.format {
            o.insert("backing-filename-format".into(), json!(f));
        }
    }
    if is_encrypted(&info.format_specific) {
        o.insert("encrypted".into(), json!(true));
    }
    if !info.format_specific.is_null() {
        o.insert("format-specific".into(), info.format_specific.clone());
    }
    if !info.snapshots.is_empty() {
        o.insert("snapshots".into(), json!(info.snapshots));
    }
    if let Ok(Some(p)) = vmi_convert::read_provenance(img.path()) {
        o.insert("vmi-provenance".into(), json!(p));
    }
    if let Some(len) = file_length(img.path()) {
        let mut file = Map::new();
        file.insert("filename".into(), json!(filename));
        file.insert("format".into(), json!("file"));
        file.insert("virtual-size".into(), json!(len));
        if let Some(a) = common::allocated_bytes(img.path()) {
            file.insert("actual-size".into(), json!(a));
        }
        file.insert("dirty-flag".into(), json!(false));
        file.insert("children".into(), json!([]));
        file.insert(
            "format-specific".into(),
            json!({"type": "file", "data": {}}),
        );
        o.insert(
            "children".into(),
            json!([{"name": "file", "info": Value::Object(file)}]),
        );
    }
    if let Some(p) = img.probe_result() {
        o.insert(
            "probe".into(),
            json!({
                "format": p.format,
                "confidence": p.confidence,
                "matches": p.matches.iter()
                    .map(|(f, c)| json!({"format": f, "confidence": c}))
                    .collect::<Vec<_>>(),
            }),
        );
    }
    Value::Object(o)
}

fn print_human(img: &Image) -> anyhow::Result<()> {
    let info = img.driver().info();
    outln!("image: {}", img.path().display())?;
    outln!("file format: {}", img.format())?;
    if let Some(p) = img.probe_result() {
        let how = match p.confidence {
            vmi_disk::Confidence::Fallback => {
                "no other format matched; give -f raw to say so explicitly".to_string()
            }
            c => format!("{c:?}").to_lowercase(),
        };
        outln!("format probed: {} ({how})", p.format)?;
    }
    let vs = img.virtual_size();
    outln!("virtual size: {} ({vs} bytes)", size_to_str(vs))?;
    match actual_size(img) {
        Some(a) => outln!("disk size: {}", size_to_str(a))?,
        None => outln!("disk size: unavailable")?,
    }
    if let Some(c) = info.cluster_size {
        outln!("cluster_size: {c}")?;
    }
    if let Some(b) = img.driver().backing() {
        let full = full_backing_name(img, &b.name).display().to_string();
        if full == b.name {
            outln!("backing file: {}", b.name)?;
        } else {
            outln!("backing file: {} (actual path: {full})", b.name)?;
        }
        if let Some(f) = b.format {
            outln!("backing file format: {f}")?;
        }
    }
    if is_encrypted(&info.format_specific) {
        outln!("encrypted: yes")?;
    }
    if info.dirty {
        outln!("dirty flag: true")?;
    }
    if !info.snapshots.is_empty() {
        outln!("Snapshot list:")?;
        print_snapshot_rows(&info.snapshots)?;
    }
    if let Ok(Some(p)) = vmi_convert::read_provenance(img.path()) {
        outln!(
            "clone of: {} ({}, {} clone)",
            p.source,
            p.source_format,
            p.kind
        )?;
        outln!("clone source digest: {}", p.source_digest)?;
    }
    if let Some(data) = info.format_specific.get("data") {
        if data.as_object().is_some_and(|m| !m.is_empty()) {
            outln!("Format specific information:")?;
            let mut text = String::new();
            dump_value(&mut text, data, 1);
            common::out(format_args!("{text}"))?;
        }
    }
    Ok(())
}

/// The snapshot table's heading and rows, as `qemu-img info` and `qemu-img snapshot -l` print
/// them.
pub(crate) fn print_snapshot_rows(snaps: &[SnapshotInfo]) -> anyhow::Result<()> {
    outln!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID",
        "TAG",
        "VM_SIZE",
        "DATE",
        "VM_CLOCK",
        "ICOUNT"
    )?;
    for s in snaps {
        outln!("{}", snapshot_row(s))?;
    }
    Ok(())
}

/// One row of the snapshot table, with qemu-img's columns (dates in UTC).
fn snapshot_row(s: &SnapshotInfo) -> String {
    let clock_ms = s.vm_clock_sec * 1000 + u64::from(s.vm_clock_nsec / 1_000_000);
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        clock_ms / 3_600_000,
        clock_ms / 60_000 % 60,
        clock_ms / 1000 % 60,
        clock_ms % 1000
    );
    let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        s.id,
        s.name,
        size_to_str(s.vm_state_size),
        utc_date(s.date_sec),
        clock,
        icount
    )
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for seconds since the epoch (civil-from-days).
fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// qemu-img's rendering of format-specific data: `key: value` with dashes as spaces, nested
/// objects and lists indented by four spaces.
fn dump_value(out: &mut String, v: &Value, depth: usize) {
    let pad = "    ".repeat(depth);
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = k.replace('-', " ");
                if v.is_object() || v.is_array() {
                    out.push_str(&format!("{pad}{key}:\n"));
                    dump_value(out, v, depth + 1);
                } else {
                    out.push_str(&format!("{pad}{key}: {}\n", scalar(v)));
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                if v.is_object() || v.is_array() {
                    out.push_str(&format!("{pad}[{i}]:\n"));
                    dump_value(out, v, depth + 1);
                } else {
                    out.push_str(&format!("{pad}[{i}]: {}\n", scalar(v)));
                }
            }
        }
        v => out.push_str(&format!("{pad}{}\n", scalar(v))),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_print_in_utc() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13:20");
    }

    #[test]
    fn format_specific_data_prints_with_spaces_for_dashes() {
        let mut s = String::new();
        dump_value(
            &mut s,
            &json!({"compat": "1.1", "lazy-refcounts": false, "extents": [{"a": 1}]}),
            1,
        );
        assert!(s.contains("    compat: 1.1\n"), "{s}");
        assert!(s.contains("    lazy refcounts: false\n"), "{s}");
        assert!(
            s.contains("    extents:\n        [0]:\n            a: 1\n"),
            "{s}"
        );
    }
}
