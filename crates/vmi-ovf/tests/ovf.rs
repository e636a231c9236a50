//! Integration tests: the govmomi descriptor corpus, DSP8023 schema validation with xmllint,
//! OVA archives checked with GNU tar and sha256sum, signatures made with openssl.

use std::path::{Path, PathBuf};
use std::process::Command;
use vmi_ovf::envelope::{self, descriptor_for, OvfVersion, WriteOptions, VMDK_STREAM_URI};
use vmi_ovf::profile::*;

/// The shared data directory: `../shared/data` relative to the repository root (the repository is
/// checked out next to `shared/`), or `$VMI_SHARED_DATA` when set.
fn shared(rel: &str) -> Option<PathBuf> {
    let base = match std::env::var_os("VMI_SHARED_DATA") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join("../shared/data"),
    };
    let p = base.join(rel);
    p.exists().then_some(p)
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

fn sample_profile() -> HardwareProfile {
    let mut p = HardwareProfile::new("web01");
    p.cpus = 2;
    p.memory_mib = 2048;
    p.guest_os.cim_id = Some(94);
    p.guest_os.vmware_id = Some("ubuntu64Guest".into());
    p.firmware = Firmware { kind: FirmwareKind::Uefi, secure_boot: true, tpm: true };
    p.hardware_version = Some("vmx-14".into());
    p.disks = vec![
        DiskProfile { capacity: 8 << 30, controller: Controller::Pvscsi, format: None, file: None },
        DiskProfile { capacity: 1 << 30, controller: Controller::Sata, format: None, file: None },
        DiskProfile { capacity: 1 << 30, controller: Controller::Nvme, format: None, file: None },
    ];
    p.cdroms = vec![CdromProfile { controller: Controller::Ide, file: None }];
    p.nics = vec![
        NicProfile { model: NicModel::Vmxnet3, network: "VM Network".into(), mac: MacPolicy::Generated },
        NicProfile {
            model: NicModel::E1000e,
            network: "backend".into(),
            mac: MacPolicy::Static("00:50:56:01:02:03".into()),
        },
    ];
    p.product = Some(Product { name: Some("Web".into()), vendor: Some("Example".into()), ..Default::default() });
    p.annotation = Some("annotated".into());
    p.eula = Some("licence text".into());
    p
}

fn xmllint_validate(schema: &Path, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.ovf");
    std::fs::write(&f, text).unwrap();
    let out = Command::new("xmllint")
        .arg("--noout")
        .arg("--schema")
        .arg(schema)
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xmllint rejected the descriptor:\n{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn written_ovf1_validates_against_dsp8023_1_1_1() {
    let Some(schema) = shared("ovf-schema/1.1.1/dsp8023_1.1.1.xsd") else {
        eprintln!("skipped: ../shared/data/ovf-schema absent");
        return;
    };
    if !have("xmllint") {
        eprintln!("skipped: xmllint not installed (apt-get install libxml2-utils)");
        return;
    }
    let p = sample_profile();
    let files: Vec<_> = (0..3)
        .map(|i| (format!("web01-disk{i}.vmdk"), 4096 * (i + 1), VMDK_STREAM_URI.to_string()))
        .collect();
    let d = descriptor_for(&p, &files);
    for vmware in [true, false] {
        let text = envelope::write(&d, &WriteOptions { version: OvfVersion::V1, vmware }).unwrap();
        xmllint_validate(&schema, &text);
    }
}

#[test]
fn written_ovf2_validates_against_dsp8023_2_0_1() {
    let Some(schema) = shared("ovf-schema/2.0.1/dsp8023_2.0.1.xsd") else {
        eprintln!("skipped: ../shared/data/ovf-schema absent");
        return;
    };
    if !have("xmllint") {
        eprintln!("skipped: xmllint not installed");
        return;
    }
    let d = descriptor_for(&sample_profile(), &[]);
    let text =
        envelope::write(&d, &WriteOptions { version: OvfVersion::V2, vmware: false }).unwrap();
    xmllint_validate(&schema, &text);
}

fn corpus_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            corpus_files(&p, out);
        } else if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("ovf")) {
            out.push(p);
        }
    }
}

/// Corpus descriptors that are negative tests by their location or name, plus the few that are not
/// OVF at all: `DeleteHDTestdata/*_old/descriptor.ovf` are saved HTML pages and
/// `SLES11_SP2_64.ovf` has an Envelope in no namespace.
fn meant_invalid(p: &Path) -> bool {
    let s = p.to_string_lossy().to_ascii_lowercase();
    ["/neg/", "invalid", "negative", "corrupted", "_old/descriptor.ovf", "sles11_sp2_64.ovf"]
        .iter()
        .any(|m| s.contains(m))
}

#[test]
fn govmomi_corpus_parses_and_round_trips() {
    let Some(dir) = shared("ovf-corpus/govmomi") else {
        eprintln!("skipped: ../shared/data/ovf-corpus/govmomi absent");
        return;
    };
    let mut files = Vec::new();
    corpus_files(&dir, &mut files);
    files.sort();
    let (mut ok, mut rejected_neg, mut accepted_neg) = (0, 0, 0);
    let mut failures = Vec::new();
    let mut round_trip = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let res = std::panic::catch_unwind(|| envelope::parse(&text));
        let Ok(res) = res else {
            panic!("parser panicked on {}", f.display());
        };
        match (res, meant_invalid(f)) {
            (Ok(d), neg) => {
                if neg {
                    accepted_neg += 1;
                } else {
                    ok += 1;
                }
                // parse → write → parse keeps the profile and the kept sections.
                let out = envelope::write(&d, &WriteOptions::default()).unwrap();
                let again = match envelope::parse(&out) {
                    Ok(a) => a,
                    Err(e) => {
                        round_trip.push(format!("{}: re-parse failed: {e}", f.display()));
                        continue;
                    }
                };
                let collection =
                    d.extra_sections.iter().any(|s| s.name.local == "VirtualSystemCollection");
                if !collection && again.profile != d.profile {
                    round_trip.push(format!(
                        "{}: profile changed\n  {:?}\n  {:?}",
                        f.display(),
                        d.profile,
                        again.profile
                    ));
                }
                if again.extra_sections.len() != d.extra_sections.len()
                    || again.extra_system_sections.len() != d.extra_system_sections.len()
                    || again.extra_items.len() != d.extra_items.len()
                {
                    round_trip.push(format!(
                        "{}: kept sections changed: {} {} {} -> {} {} {}",
                        f.display(),
                        d.extra_sections.len(),
                        d.extra_system_sections.len(),
                        d.extra_items.len(),
                        again.extra_sections.len(),
                        again.extra_system_sections.len(),
                        again.extra_items.len()
                    ));
                }
            }
            (Err(_), true) => rejected_neg += 1,
            (Err(e), false) => failures.push(format!("{}: {e}", f.display())),
        }
    }
    eprintln!(
        "govmomi corpus: {} descriptors; {ok} valid parsed; {rejected_neg} negative rejected, \
         {accepted_neg} negative accepted; {} valid-looking rejected",
        files.len(),
        failures.len()
    );
    for f in &failures {
        eprintln!("  rejected: {f}");
    }
    for f in &round_trip {
        eprintln!("  round trip: {f}");
    }
    assert!(round_trip.is_empty(), "{} descriptors did not round-trip", round_trip.len());
    assert!(files.len() > 900, "corpus incomplete: {}", files.len());
    assert!(failures.is_empty(), "{} valid descriptors failed to parse", failures.len());
}
