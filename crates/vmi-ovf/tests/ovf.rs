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
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join("../shared/data"),
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
    p.cores_per_socket = Some(2);
    p.memory_mib = 2048;
    p.guest_os.cim_id = Some(94);
    p.guest_os.vmware_id = Some("ubuntu64Guest".into());
    p.firmware = Firmware {
        kind: FirmwareKind::Uefi,
        secure_boot: true,
        tpm: true,
    };
    p.hardware_version = Some("vmx-14".into());
    p.disks = vec![
        DiskProfile {
            capacity: 8 << 30,
            controller: Controller::Pvscsi,
            format: None,
            file: None,
        },
        DiskProfile {
            capacity: 1 << 30,
            controller: Controller::Sata,
            format: None,
            file: None,
        },
        DiskProfile {
            capacity: 1 << 30,
            controller: Controller::Nvme,
            format: None,
            file: None,
        },
    ];
    p.cdroms = vec![CdromProfile {
        controller: Controller::Ide,
        file: None,
    }];
    p.nics = vec![
        NicProfile {
            model: NicModel::Vmxnet3,
            network: "VM Network".into(),
            mac: MacPolicy::Generated,
        },
        NicProfile {
            model: NicModel::E1000e,
            network: "backend".into(),
            mac: MacPolicy::Static("00:50:56:01:02:03".into()),
        },
    ];
    p.product = Some(Product {
        name: Some("Web".into()),
        vendor: Some("Example".into()),
        ..Default::default()
    });
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
        .map(|i| {
            (
                format!("web01-disk{i}.vmdk"),
                4096 * (i + 1),
                VMDK_STREAM_URI.to_string(),
            )
        })
        .collect();
    let d = descriptor_for(&p, &files);
    for vmware in [true, false] {
        let text = envelope::write(
            &d,
            &WriteOptions {
                version: OvfVersion::V1,
                vmware,
            },
        )
        .unwrap();
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
    let text = envelope::write(
        &d,
        &WriteOptions {
            version: OvfVersion::V2,
            vmware: false,
        },
    )
    .unwrap();
    xmllint_validate(&schema, &text);
}

fn corpus_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
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
    [
        "/neg/",
        "invalid",
        "negative",
        "corrupted",
        "_old/descriptor.ovf",
        "sles11_sp2_64.ovf",
    ]
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
    let mut accepted_list = Vec::new();
    let (mut strict_neg, mut strict_valid) = (0, Vec::new());
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let res = std::panic::catch_unwind(|| envelope::parse(&text));
        let Ok(res) = res else {
            panic!("parser panicked on {}", f.display());
        };
        let strict = vmi_ovf::strict::problems(&text).unwrap_or_default();
        match (res, meant_invalid(f)) {
            (Ok(_), true) if !strict.is_empty() => strict_neg += 1,
            (Ok(d), neg) => {
                if !neg && !strict.is_empty() {
                    strict_valid.push(format!("{}: {}", f.display(), strict.join("; ")));
                }
                if neg {
                    accepted_neg += 1;
                    accepted_list.push(f.display().to_string());
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
                let collection = d
                    .extra_sections
                    .iter()
                    .any(|s| s.name.local == "VirtualSystemCollection");
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
    for f in &accepted_list {
        eprintln!("  negative accepted: {f}");
    }
    // Strict mode (`vmi ovf verify`) refuses nine descriptors the corpus does not mark negative
    // and the lenient parser reads: one with no virtual system (DSP0243 §5.1 wants exactly one),
    // one whose NVDIMM names a missing controller as its Parent, one with an unknown section it
    // does not mark optional, and six copies of ovftool's 1.0 `bare_minimal` tests whose
    // VirtualSystem has no Info (DSP8023 requires it; xmllint refuses them too).
    let strictly_invalid = [
        "govmomi/empty.ovf",
        "missing_nvdimm_controller.ovf",
        "unsupported-ovfs/unsupportedSection.ovf",
        "/bare_minimal.ovf",
        "/bare_minimal_http.ovf",
    ];
    let strictly_invalid_count = strict_valid
        .iter()
        .filter(|f| strictly_invalid.iter().any(|k| f.contains(k)))
        .count();
    strict_valid.retain(|f| !strictly_invalid.iter().any(|k| f.contains(k)));
    for f in &strict_valid {
        eprintln!("  strict problem in a valid one: {f}");
    }
    eprintln!(
        "strict: {strict_neg} more negatives refused; {strictly_invalid_count} non-negative \
         descriptors refused as expected, {} others",
        strict_valid.len()
    );
    assert_eq!(strictly_invalid_count, 9);
    assert!(
        strict_valid.is_empty(),
        "strict checks refuse valid descriptors: {strict_valid:#?}"
    );
    // Negatives: refused by the parser, or by the strict checks; what is left needs the disks,
    // certificates or a server (see docs/ovf.md).
    assert!(rejected_neg >= 44, "{rejected_neg}");
    assert!(
        strict_neg >= 65,
        "strict refused only {strict_neg} negatives"
    );
    for f in &round_trip {
        eprintln!("  round trip: {f}");
    }
    assert!(
        round_trip.is_empty(),
        "{} descriptors did not round-trip",
        round_trip.len()
    );
    assert!(files.len() > 900, "corpus incomplete: {}", files.len());
    assert!(
        failures.is_empty(),
        "{} valid descriptors failed to parse",
        failures.len()
    );
}

// ---- packaging: OVA, manifest, signature ----

use vmi_ovf::package::{self, DiskInput, ExportOptions, Package};

/// A raw disk with a recognisable pattern.
fn raw_disk(dir: &Path, name: &str, size: usize, seed: u8) -> PathBuf {
    let p = dir.join(name);
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    std::fs::write(&p, data).unwrap();
    p
}

fn as_is(p: &Path) -> DiskInput {
    DiskInput::AsIs {
        path: p.to_path_buf(),
        capacity: std::fs::metadata(p).unwrap().len(),
        format_uri: "http://example.invalid/raw".into(),
    }
}

fn two_disk_profile() -> HardwareProfile {
    let mut p = sample_profile();
    p.disks.truncate(2);
    p
}

#[test]
fn ova_members_are_ordered_and_unpack_with_gnu_tar_and_sha256sum() {
    let dir = tempfile::tempdir().unwrap();
    let d1 = raw_disk(dir.path(), "a.img", 1 << 20, 1);
    let d2 = raw_disk(dir.path(), "b.img", 3 * 4096 + 100, 2);
    let ova = dir.path().join("web.ova");
    package::export(
        &[as_is(&d1), as_is(&d2)],
        &two_disk_profile(),
        &ova,
        &ExportOptions::default(),
    )
    .unwrap();
    let pkg = Package::open(&ova).unwrap();
    let vmi_ovf::package::Source::Ova(o) = &pkg.source else {
        panic!()
    };
    let names: Vec<_> = o.members.iter().map(|m| m.name.clone()).collect();
    assert_eq!(names, ["web.ovf", "web.mf", "a.img", "b.img"]);
    let report = pkg.verify().unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.digests_ok.len(), 3);
    // A VMware-dialect export names a guest OS and hardware family even when the profile does not.
    let mut bare = HardwareProfile::new("bare");
    bare.disks.push(DiskProfile {
        capacity: 0,
        controller: Controller::Lsilogic,
        format: None,
        file: None,
    });
    let bare_ova = dir.path().join("bare.ova");
    package::export(&[as_is(&d1)], &bare, &bare_ova, &ExportOptions::default()).unwrap();
    let bp = Package::open(&bare_ova).unwrap().descriptor.profile;
    assert_eq!(bp.guest_os.vmware_id.as_deref(), Some("otherGuest64"));
    assert_eq!(bp.hardware_version.as_deref(), Some("vmx-10"));
    if !have("tar") || !have("sha256sum") {
        eprintln!("skipped GNU tar / sha256sum cross-check: tools absent");
        return;
    }
    let x = dir.path().join("x");
    std::fs::create_dir(&x).unwrap();
    let out = Command::new("tar").arg("-tf").arg(&ova).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        names
    );
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&ova)
        .arg("-C")
        .arg(&x)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::read(x.join("a.img")).unwrap(),
        std::fs::read(&d1).unwrap()
    );
    // The manifest in sha256sum's own format: "hex  name".
    let mf = std::fs::read_to_string(x.join("web.mf")).unwrap();
    let mut check = String::new();
    for line in mf.lines() {
        let (l, hex) = line.split_once(")= ").unwrap();
        let name = l.strip_prefix("SHA256(").unwrap();
        check.push_str(&format!("{hex}  {name}\n"));
    }
    std::fs::write(x.join("sums"), check).unwrap();
    let st = Command::new("sha256sum")
        .arg("-c")
        .arg("sums")
        .current_dir(&x)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stdout)
    );
}

#[test]
fn unpacked_ova_is_a_directory_package_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let d1 = raw_disk(dir.path(), "a.img", 100_000, 2);
    let ova = dir.path().join("u.ova");
    let mut p = two_disk_profile();
    p.disks.truncate(1);
    package::export(&[as_is(&d1)], &p, &ova, &ExportOptions::default()).unwrap();
    let out = dir.path().join("unpacked");
    let ovf = package::unpack(&ova, &out).unwrap();
    assert_eq!(ovf, out.join("u.ovf"));
    let pkg = Package::open(&ovf).unwrap();
    let r = pkg.verify().unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.digests_ok.len(), 2);
    // Unpacking again does not overwrite.
    assert!(package::unpack(&ova, &out).is_err());
}

#[test]
fn directory_package_export_writes_beside_the_ovf_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let d1 = raw_disk(dir.path(), "a.img", 8192, 2);
    let out = dir.path().join("pkg").join("d.ovf");
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    let mut p = two_disk_profile();
    p.disks.truncate(1);
    package::export(&[as_is(&d1)], &p, &out, &ExportOptions::default()).unwrap();
    let pkg = Package::open(&out).unwrap();
    let r = pkg.verify().unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.digests_ok, ["d.ovf", "d-disk1.img"]);
    std::fs::remove_file(&out).unwrap();
    let e = package::export(&[as_is(&d1)], &p, &out, &ExportOptions::default()).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
}

#[test]
fn disks_are_read_in_place_from_the_ova() {
    let dir = tempfile::tempdir().unwrap();
    let d1 = raw_disk(dir.path(), "a.img", 256 * 1024, 9);
    let ova = dir.path().join("p.ova");
    let mut p = two_disk_profile();
    p.disks.truncate(1);
    package::export(&[as_is(&d1)], &p, &ova, &ExportOptions::default()).unwrap();
    let pkg = Package::open(&ova).unwrap();
    let img = package::open_disk(&pkg, 0, dir.path()).unwrap();
    assert_eq!(img.virtual_size(), 256 * 1024);
    let mut buf = vec![0u8; 256 * 1024];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, std::fs::read(&d1).unwrap());
}

#[test]
fn verify_fails_after_one_disk_byte_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d1 = raw_disk(dir.path(), "a.img", 64 * 1024, 3);
    let ova = dir.path().join("p.ova");
    let mut p = two_disk_profile();
    p.disks.truncate(1);
    package::export(&[as_is(&d1)], &p, &ova, &ExportOptions::default()).unwrap();
    let off = {
        let pkg = Package::open(&ova).unwrap();
        let vmi_ovf::package::Source::Ova(o) = &pkg.source else {
            panic!()
        };
        o.member("a.img").unwrap().offset + 1000
    };
    let mut bytes = std::fs::read(&ova).unwrap();
    bytes[off as usize] ^= 0x40;
    std::fs::write(&ova, bytes).unwrap();
    let report = Package::open(&ova).unwrap().verify().unwrap();
    assert!(!report.ok());
    assert!(
        report.problems.iter().any(|p| p.contains("a.img")),
        "{:?}",
        report.problems
    );
}

/// A self-signed RSA certificate and key made by openssl, or `None` (skip) when it is absent.
fn openssl_cert(dir: &Path, cn: &str) -> Option<(String, String)> {
    if !have("openssl") && Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: openssl not installed");
        return None;
    }
    let key = dir.join(format!("{cn}.key"));
    let crt = dir.join(format!("{cn}.crt"));
    let st = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        ])
        .arg(format!("/CN={cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    Some((
        std::fs::read_to_string(key).unwrap(),
        std::fs::read_to_string(crt).unwrap(),
    ))
}

#[test]
fn signed_ova_verifies_and_fails_after_a_disk_byte_changes() {
    let dir = tempfile::tempdir().unwrap();
    let Some((key, cert)) = openssl_cert(dir.path(), "vmi-test") else {
        return;
    };
    let d1 = raw_disk(dir.path(), "a.img", 64 * 1024, 5);
    let ova = dir.path().join("s.ova");
    let mut p = two_disk_profile();
    p.disks.truncate(1);
    let opts = ExportOptions {
        sign: Some((key.clone(), cert.clone())),
        ..Default::default()
    };
    package::export(&[as_is(&d1)], &p, &ova, &opts).unwrap();
    let pkg = Package::open(&ova).unwrap();
    let vmi_ovf::package::Source::Ova(o) = &pkg.source else {
        panic!()
    };
    let names: Vec<_> = o.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["s.ovf", "s.mf", "s.cert", "a.img"]);
    let r = pkg.verify().unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    let sig = r.signature.unwrap();
    assert!(sig.subject.contains("vmi-test") && sig.self_signed);
    // openssl agrees with the signature vmi wrote.
    let x = dir.path().join("x");
    std::fs::create_dir(&x).unwrap();
    std::fs::write(x.join("s.mf"), pkg.manifest.as_ref().unwrap().1.clone()).unwrap();
    let cert_text = &pkg.cert.as_ref().unwrap().1;
    let hexsig = cert_text
        .lines()
        .next()
        .unwrap()
        .split("= ")
        .nth(1)
        .unwrap();
    std::fs::write(x.join("sig"), vmi_ovf::manifest::unhex(hexsig).unwrap()).unwrap();
    std::fs::write(x.join("c.pem"), &cert).unwrap();
    let pubkey = Command::new("openssl")
        .args(["x509", "-pubkey", "-noout", "-in"])
        .arg(x.join("c.pem"))
        .output()
        .unwrap();
    std::fs::write(x.join("pub.pem"), pubkey.stdout).unwrap();
    let v = Command::new("openssl")
        .args([
            "dgst",
            "-sha256",
            "-verify",
            "pub.pem",
            "-signature",
            "sig",
            "s.mf",
        ])
        .current_dir(&x)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&v.stdout)
    );
    // One changed disk byte: the manifest digest no longer matches.
    let off = o.member("a.img").unwrap().offset + 7;
    drop(pkg);
    let mut bytes = std::fs::read(&ova).unwrap();
    bytes[off as usize] ^= 1;
    std::fs::write(&ova, &bytes).unwrap();
    assert!(!Package::open(&ova).unwrap().verify().unwrap().ok());
    // A manifest re-written to match the changed disk: the signature no longer matches.
    let wrong_key = openssl_cert(dir.path(), "other").unwrap();
    let opts = ExportOptions {
        sign: Some((wrong_key.0, cert)),
        ..Default::default()
    };
    let e = package::export(&[as_is(&d1)], &p, &dir.path().join("t.ova"), &opts).unwrap_err();
    assert!(e.to_string().contains("does not belong"));
}

#[test]
fn chunked_and_gzip_file_references_are_read() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    // Chunked: disk.img.000000000, .000000001, … of 100000 bytes each.
    for (i, c) in data.chunks(100_000).enumerate() {
        std::fs::write(dir.path().join(format!("disk.img.{i:09}")), c).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&data).unwrap();
    std::fs::write(dir.path().join("disk2.img.gz"), gz.finish().unwrap()).unwrap();
    let ovf = format!(
        r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
<References><File ovf:href="disk.img" ovf:id="f1" ovf:size="{n}" ovf:chunkSize="100000"/><File ovf:href="disk2.img.gz" ovf:id="f2" ovf:compression="gzip"/></References>
<DiskSection><Info>d</Info><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="{n}"/><Disk ovf:diskId="d2" ovf:fileRef="f2" ovf:capacity="{n}"/></DiskSection>
<VirtualSystem ovf:id="vm"><Info>v</Info><VirtualHardwareSection><Info>h</Info>
<Item><rasd:ElementName>a</rasd:ElementName><rasd:HostResource>ovf:/disk/d1</rasd:HostResource><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType></Item>
<Item><rasd:ElementName>b</rasd:ElementName><rasd:HostResource>ovf:/disk/d2</rasd:HostResource><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType></Item>
</VirtualHardwareSection></VirtualSystem></Envelope>"#,
        n = data.len()
    );
    let path = dir.path().join("p.ovf");
    std::fs::write(&path, ovf).unwrap();
    let pkg = Package::open(&path).unwrap();
    assert!(pkg.verify().unwrap().ok());
    let scratch = tempfile::tempdir().unwrap();
    for i in 0..2 {
        let img = package::open_disk(&pkg, i, scratch.path()).unwrap();
        let mut buf = vec![0u8; data.len()];
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data, "disk {i}");
    }
}

#[test]
fn descriptor_references_outside_the_package_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ovf = r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
<References><File ovf:href="../../etc/passwd" ovf:id="f1"/></References>
<DiskSection><Info>d</Info><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="1"/></DiskSection>
<VirtualSystem ovf:id="vm"><Info>v</Info><VirtualHardwareSection><Info>h</Info>
<Item><rasd:ElementName>a</rasd:ElementName><rasd:HostResource>ovf:/disk/d1</rasd:HostResource><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType></Item>
</VirtualHardwareSection></VirtualSystem></Envelope>"#;
    let path = dir.path().join("p.ovf");
    std::fs::write(&path, ovf).unwrap();
    let pkg = Package::open(&path).unwrap();
    assert!(!pkg.verify().unwrap().ok());
    assert!(package::open_disk(&pkg, 0, dir.path()).is_err());
}

#[test]
fn export_converts_disks_to_stream_optimized_vmdk_when_the_engine_can() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_disk(dir.path(), "src.img", 4 << 20, 7);
    let ova = dir.path().join("e.ova");
    let mut p = two_disk_profile();
    p.disks.truncate(1);
    match package::export(
        &[DiskInput::Convert(src.clone())],
        &p,
        &ova,
        &ExportOptions::default(),
    ) {
        Err(e)
            if format!("{e:?}").contains("Unsupported") || format!("{e:?}").contains("not yet") =>
        {
            eprintln!("skipped: disk conversion to VMDK streamOptimized not available: {e:?}");
            return;
        }
        Err(e) => panic!("{e:?}"),
        Ok(_) => {}
    }
    let pkg = Package::open(&ova).unwrap();
    assert!(pkg.verify().unwrap().ok());
    let vmi_ovf::package::Source::Ova(o) = &pkg.source else {
        panic!()
    };
    let m = o.member("e-disk1.vmdk").unwrap();
    let x = dir.path().join("x.vmdk");
    let mut f = std::fs::File::create(&x).unwrap();
    std::io::copy(&mut o.reader(m), &mut f).unwrap();
    vmi_testkit::qemu::assert_qemu_check_clean(&x, "vmdk");
    vmi_testkit::qemu::assert_qemu_identical(&src, "raw", &x, "vmdk");
    let info = vmi_testkit::qemu::qemu_info(&x, "vmdk");
    assert_eq!(
        info["format-specific"]["data"]["create-type"], "streamOptimized",
        "{info}"
    );
    // The packaged disk, read in place, is what ESXi accepts.
    let img = package::open_disk(&pkg, 0, dir.path()).unwrap();
    let facts = vmi_ovf::compat::ImageFacts::from_image(&img);
    assert_eq!(facts.subformat.as_deref(), Some("streamOptimized"));
    assert_eq!(facts.version, Some(3));
    let esxi = vmi_ovf::compat::check(Some(&facts), None, &"vmware-esxi".parse().unwrap());
    assert!(esxi.is_empty(), "{esxi:?}");
    drop(img);
    // Import back to qcow2: disk converted, profile written.
    let out = dir.path().join("imported");
    let prof = package::import(&pkg, &out, vmi_disk::Format::Qcow2).unwrap();
    assert_eq!(prof.disks[0].format.as_deref(), Some("qcow2"));
    vmi_testkit::qemu::assert_qemu_identical(
        &src,
        "raw",
        &out.join(prof.disks[0].file.as_ref().unwrap()),
        "qcow2",
    );
    assert!(out.join("profile.toml").exists());
}

// ---- command glue and target conversion ----

use vmi_ovf::cli::{self, ConfigArgs, ConfigKind, InfoArgs, OvfArgs, OvfCommand, VerifyArgs};

#[test]
fn ovf_info_and_verify_commands_report_on_an_exported_package() {
    let dir = tempfile::tempdir().unwrap();
    let d1 = raw_disk(dir.path(), "a.img", 64 * 1024, 1);
    let ova = dir.path().join("c.ova");
    let mut p = two_disk_profile();
    p.disks.truncate(1);
    package::export(&[as_is(&d1)], &p, &ova, &ExportOptions::default()).unwrap();
    let mut out = Vec::new();
    let args = OvfArgs {
        command: OvfCommand::Info(InfoArgs {
            package: ova.clone(),
            json: true,
        }),
    };
    assert_eq!(cli::run_ovf(&args, &mut out).unwrap(), 0);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["profile"]["cpus"], 2);
    assert_eq!(v["members"][0]["name"], "c.ovf");
    let mut out = Vec::new();
    let schema = shared("ovf-schema/1.1.1/dsp8023_1.1.1.xsd").filter(|_| have("xmllint"));
    let args = OvfArgs {
        command: OvfCommand::Verify(VerifyArgs {
            package: ova.clone(),
            schema,
            json: false,
        }),
    };
    let code = cli::run_ovf(&args, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("verified"));
}

#[test]
fn config_command_writes_vbox_settings_that_read_back_as_a_profile() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = two_disk_profile();
    for d in &mut p.disks {
        d.controller = Controller::Sata;
        d.format = Some("vmdk".into());
    }
    for n in &mut p.nics {
        n.model = NicModel::E1000;
    }
    let prof = dir.path().join("p.toml");
    p.save(&prof).unwrap();
    let run = |kind| {
        let mut out = Vec::new();
        let args = OvfArgs {
            command: OvfCommand::Config(ConfigArgs {
                source: prof.clone(),
                kind,
            }),
        };
        assert_eq!(cli::run_ovf(&args, &mut out).unwrap(), 0);
        String::from_utf8(out).unwrap()
    };
    let vbox = run(ConfigKind::Vbox);
    let script = run(ConfigKind::VboxScript);
    assert!(script.contains("VBoxManage createvm"), "{script}");
    let f = dir.path().join("web01.vbox");
    std::fs::write(&f, &vbox).unwrap();
    let back = cli::load_profile(&f).unwrap();
    assert_eq!(back.disks.len(), 2);
    assert_eq!(back.nics.len(), p.nics.len());
    assert_eq!((back.cpus, back.memory_mib), (p.cpus, p.memory_mib));
    // A profile VirtualBox cannot run is refused, naming the model.
    p.nics[0].model = NicModel::Vmxnet3;
    p.save(&prof).unwrap();
    let args = OvfArgs {
        command: OvfCommand::Config(ConfigArgs {
            source: prof.clone(),
            kind: ConfigKind::Vbox,
        }),
    };
    let e = cli::run_ovf(&args, &mut Vec::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("vmxnet3"), "{e}");
}

#[test]
fn verify_reports_strict_problems_the_importer_tolerates() {
    // A directory package whose descriptor repeats an InstanceID: it reads, but does not verify.
    let dir = tempfile::tempdir().unwrap();
    let mut p = sample_profile();
    p.disks.clear();
    p.cdroms.clear();
    let d = descriptor_for(&p, &[]);
    let text = envelope::write(&d, &WriteOptions::default()).unwrap();
    let first = text.find("<rasd:InstanceID>").unwrap() + "<rasd:InstanceID>".len();
    let id: String = text[first..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let next = (id.parse::<u32>().unwrap() + 1).to_string();
    let bad = text.replacen(
        &format!("<rasd:InstanceID>{next}</rasd:InstanceID>"),
        &format!("<rasd:InstanceID>{id}</rasd:InstanceID>"),
        1,
    );
    assert_ne!(bad, text);
    let ovf = dir.path().join("dup.ovf");
    std::fs::write(&ovf, &bad).unwrap();
    assert!(Package::open(&ovf).is_ok(), "the lenient reader takes it");
    let mut out = Vec::new();
    let args = OvfArgs {
        command: OvfCommand::Verify(VerifyArgs {
            package: ovf,
            schema: None,
            json: false,
        }),
    };
    let code = cli::run_ovf(&args, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("PROBLEM  descriptor: VirtualHardwareSection: duplicate InstanceID"),
        "{text}"
    );
}

#[test]
fn convert_for_azure_gives_a_fixed_vhd_of_whole_mib_when_the_engine_can() {
    let dir = tempfile::tempdir().unwrap();
    // 5 MiB + 1000 bytes: not a whole MiB.
    let src = raw_disk(dir.path(), "odd.img", (5 << 20) + 1000, 4);
    let out = dir.path().join("azure.vhd");
    match vmi_ovf::targets::convert_for_target(&src, &"azure".parse().unwrap(), &out, None) {
        Err(e)
            if format!("{e:?}").contains("Unsupported") || format!("{e:?}").contains("not yet") =>
        {
            eprintln!("skipped: conversion to fixed VHD not available: {e:?}");
            return;
        }
        Err(e) => panic!("{e:?}"),
        Ok(_) => {}
    }
    let info = vmi_testkit::qemu::qemu_info(&out, "vpc");
    assert_eq!(info["format"], "vpc");
    assert_eq!(info["virtual-size"], 6u64 << 20, "{info}");
    let img = vmi_disk::Image::open(&out, &vmi_disk::OpenOptions::new()).unwrap();
    let facts = vmi_ovf::compat::ImageFacts::from_image(&img);
    assert_eq!(facts.subformat.as_deref(), Some("fixed"));
    assert!(
        vmi_ovf::compat::check(Some(&facts), None, &"azure".parse().unwrap()).is_empty(),
        "{facts:?}"
    );
}

#[test]
fn virtualbox_dialect_descriptor_maps_controllers_and_nics() {
    let Some(f) = shared(
        "ovf-corpus/govmomi/external/OVFToolTemplates/OVF/xmltestfiles/LaxMode/Pos/vbox5_all_storage_controllers/vbox5.ovf",
    ) else {
        eprintln!("skipped: ../shared/data/ovf-corpus absent");
        return;
    };
    let d = envelope::parse(&std::fs::read_to_string(f).unwrap()).unwrap();
    let p = &d.profile;
    assert_eq!(p.memory_mib, 384);
    assert_eq!(p.nics[0].model, NicModel::Pcnet32);
    assert_eq!(p.disks.len(), 2);
    assert!(p
        .disks
        .iter()
        .all(|k| matches!(k.controller, Controller::Ide | Controller::Sata)));
    // Sound card, USB and the floppy/other items are kept.
    assert!(d.extra_items.len() >= 2, "{:?}", d.extra_items.len());
}

// ---- native configs ----

use vmi_ovf::native::{libvirt, vmx};

#[test]
fn libvirt_domain_xml_validates_and_round_trips() {
    let mut p = sample_profile();
    p.guest_os = GuestOs::default();
    p.hardware_version = None;
    p.product = None;
    p.eula = None;
    p.disks = vec![
        DiskProfile {
            capacity: 0,
            controller: Controller::VirtioBlk,
            format: Some("qcow2".into()),
            file: Some("/var/lib/a.qcow2".into()),
        },
        DiskProfile {
            capacity: 0,
            controller: Controller::VirtioScsi,
            format: Some("raw".into()),
            file: Some("/var/lib/b.img".into()),
        },
        DiskProfile {
            capacity: 0,
            controller: Controller::Sata,
            format: Some("qcow2".into()),
            file: Some("/var/lib/c.qcow2".into()),
        },
    ];
    p.cdroms = vec![CdromProfile {
        controller: Controller::Sata,
        file: Some("/var/lib/x.iso".into()),
    }];
    p.nics[0].model = NicModel::VirtioNet;
    let text = libvirt::generate(&p).unwrap();
    assert_eq!(libvirt::parse(&text).unwrap(), p, "{text}");
    if Command::new("virt-xml-validate")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("skipped: virt-xml-validate not installed (libvirt-clients)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("dom.xml");
    std::fs::write(&f, &text).unwrap();
    let out = Command::new("virt-xml-validate")
        .arg(&f)
        .arg("domain")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn vmx_generated_from_an_ovf_profile_parses_back() {
    let mut p = sample_profile();
    p.guest_os.cim_id = None;
    p.guest_os.description = None;
    p.product = None;
    p.eula = None;
    for d in &mut p.disks {
        d.capacity = 0;
        d.file = Some("x.vmdk".into());
        d.format = Some("vmdk".into());
    }
    let text = vmx::generate(&p).unwrap();
    let back = vmx::parse(&text).unwrap();
    assert_eq!(back, p, "{text}");
}

fn engine_missing(e: &vmi_ovf::OvfError) -> bool {
    let s = format!("{e:?}");
    s.contains("Unsupported") || s.contains("not yet")
}

#[test]
fn convert_for_gcp_gives_disk_raw_in_a_gzipped_tar_when_the_engine_can() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_disk(dir.path(), "g.img", 2 << 20, 6);
    let out = dir.path().join("image.tar.gz");
    match vmi_ovf::targets::convert_for_target(&src, &"gcp".parse().unwrap(), &out, None) {
        Err(e) if engine_missing(&e) => {
            eprintln!("skipped: conversion engine not available: {e:?}");
            return;
        }
        Err(e) => panic!("{e:?}"),
        Ok(_) => {}
    }
    if !have("tar") {
        eprintln!("skipped: GNU tar absent");
        return;
    }
    let x = dir.path().join("x");
    std::fs::create_dir(&x).unwrap();
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(&out)
        .arg("-C")
        .arg(&x)
        .status()
        .unwrap();
    assert!(st.success());
    let names: Vec<_> = std::fs::read_dir(&x)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["disk.raw"]);
    assert_eq!(
        std::fs::read(x.join("disk.raw")).unwrap(),
        std::fs::read(&src).unwrap()
    );
}

#[test]
fn ovf_import_command_converts_disks_and_writes_the_profile_when_the_engine_can() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_disk(dir.path(), "i.img", 1 << 20, 8);
    let ova = dir.path().join("i.ova");
    let mut p = two_disk_profile();
    p.disks.truncate(1);
    package::export(&[as_is(&src)], &p, &ova, &ExportOptions::default()).unwrap();
    let out_dir = dir.path().join("out");
    let args = OvfArgs {
        command: OvfCommand::Import(cli::ImportArgs {
            package: ova,
            format: Some("qcow2".into()),
            vbox: false,
            dir: out_dir.clone(),
        }),
    };
    let mut out = Vec::new();
    match cli::run_ovf(&args, &mut out) {
        Err(e) if engine_missing(&e) => {
            eprintln!("skipped: conversion engine not available: {e:?}");
            return;
        }
        Err(e) => panic!("{e:?}"),
        Ok(code) => assert_eq!(code, 0),
    }
    let prof = HardwareProfile::load(&out_dir.join("profile.toml")).unwrap();
    assert_eq!(prof.cpus, p.cpus);
    let disk = out_dir.join(prof.disks[0].file.as_ref().unwrap());
    vmi_testkit::qemu::assert_qemu_check_clean(&disk, "qcow2");
    vmi_testkit::qemu::assert_qemu_identical(&src, "raw", &disk, "qcow2");
}

#[test]
fn ovf_import_with_vbox_writes_vdi_disks_and_a_settings_file_naming_their_uuids() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_disk(dir.path(), "v.img", 1 << 20, 9);
    let ova = dir.path().join("v.ova");
    let mut p = two_disk_profile();
    p.disks.truncate(1);
    p.disks[0].controller = Controller::Sata;
    p.nics.clear();
    package::export(&[as_is(&src)], &p, &ova, &ExportOptions::default()).unwrap();
    let out_dir = dir.path().join("out");
    let args = OvfArgs {
        command: OvfCommand::Import(cli::ImportArgs {
            package: ova,
            format: None,
            vbox: true,
            dir: out_dir.clone(),
        }),
    };
    let mut out = Vec::new();
    match cli::run_ovf(&args, &mut out) {
        Err(e) if engine_missing(&e) => {
            eprintln!("skipped: conversion engine not available: {e:?}");
            return;
        }
        Err(e) => panic!("{e:?}"),
        Ok(code) => assert_eq!(code, 0),
    }
    let vbox = out_dir.join(format!("{}.vbox", p.name));
    let text = std::fs::read_to_string(&vbox).unwrap();
    let back = vmi_ovf::native::vbox::parse(&text).unwrap();
    let disk = out_dir.join(back.disks[0].file.as_ref().unwrap());
    assert_eq!(back.disks[0].format.as_deref(), Some("vdi"));
    vmi_testkit::qemu::assert_qemu_check_clean(&disk, "vdi");
    vmi_testkit::qemu::assert_qemu_identical(&src, "raw", &disk, "vdi");
    // The registry repeats the UUID inside the VDI, as VirtualBox requires.
    let uuid = vmi_ovf::native::vbox::medium_uuid(&disk).unwrap().unwrap();
    assert!(text.contains(&format!("uuid=\"{uuid}\"")), "{uuid}\n{text}");
    // The profile file can be read by `vmi ovf profile`.
    assert_eq!(cli::load_profile(&vbox).unwrap(), back);
}

/// `.vbox` files validate against VirtualBox's settings schema (`VirtualBox-settings.xsd` from
/// the VirtualBox sources, not shipped with Debian) when `$VMI_VBOX_XSD` names it. The TPM
/// element VirtualBox 7.0 writes is not in that schema, so the profile has none.
#[test]
fn vbox_settings_validate_against_the_virtualbox_schema_when_given() {
    let Some(xsd) = std::env::var_os("VMI_VBOX_XSD").map(PathBuf::from) else {
        eprintln!("skipped: set VMI_VBOX_XSD to VirtualBox-settings.xsd");
        return;
    };
    if !have("xmllint") {
        eprintln!("skipped: xmllint absent");
        return;
    }
    let mut p = sample_profile();
    for (i, d) in p.disks.iter_mut().enumerate() {
        d.controller = [Controller::Sata, Controller::Nvme, Controller::VirtioScsi][i % 3];
        d.format = Some("vdi".into());
    }
    for n in &mut p.nics {
        n.model = NicModel::VirtioNet;
    }
    p.nics.push(NicProfile {
        model: NicModel::Pcnet32,
        network: String::new(),
        mac: MacPolicy::Static("08:00:27:00:00:01".into()),
    });
    p.firmware.tpm = false;
    p.cdroms = vec![
        CdromProfile {
            controller: Controller::Ide,
            file: Some("tools.iso".into()),
        },
        CdromProfile {
            controller: Controller::Ide,
            file: None,
        },
    ];
    xmllint_validate(&xsd, &vmi_ovf::native::vbox::generate(&p).unwrap());
    p.disks.truncate(1);
    p.disks[0].controller = Controller::Lsilogic;
    p.firmware = Firmware::default();
    xmllint_validate(&xsd, &vmi_ovf::native::vbox::generate(&p).unwrap());
}

// ---- hostile input ----

/// Deterministic xorshift, so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(r: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    for _ in 0..1 + r.below(4) {
        match r.below(4) {
            0 if !b.is_empty() => {
                let i = r.below(b.len());
                b[i] = r.next() as u8;
            }
            1 => b.truncate(r.below(b.len() + 1)),
            2 if !b.is_empty() => {
                let i = r.below(b.len());
                let j = (i + r.below(64)).min(b.len());
                let chunk = b[i..j].to_vec();
                let at = r.below(b.len());
                b.splice(at..at, chunk);
            }
            _ if !b.is_empty() => {
                let i = r.below(b.len());
                let j = (i + r.below(32)).min(b.len());
                b.drain(i..j);
            }
            _ => {}
        }
    }
    b
}

#[test]
fn parsers_survive_mutated_input_without_panicking() {
    let d = descriptor_for(
        &sample_profile(),
        &[("a.vmdk".into(), 10, VMDK_STREAM_URI.into())],
    );
    let ovf = envelope::write(&d, &WriteOptions::default()).unwrap();
    let mut p = sample_profile();
    p.nics[0].model = NicModel::E1000;
    p.disks.truncate(1);
    let vmx_text = vmx::generate(&p).unwrap();
    p.disks[0].controller = Controller::VirtioBlk;
    let dom = libvirt::generate(&p).unwrap();
    let mf = "SHA256(a.ovf)= 0000000000000000000000000000000000000000000000000000000000000000\n";
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..400 {
        for (base, which) in [
            (ovf.as_bytes(), 0),
            (vmx_text.as_bytes(), 1),
            (dom.as_bytes(), 2),
            (mf.as_bytes(), 3),
        ] {
            let m = mutate(&mut r, base);
            let s = String::from_utf8_lossy(&m);
            let _ = match which {
                0 => envelope::parse(&s).map(|_| ()),
                1 => vmx::parse(&s).map(|_| ()),
                2 => libvirt::parse(&s).map(|_| ()),
                _ => vmi_ovf::manifest::Manifest::parse(&s).map(|_| ()),
            };
        }
    }
    // The fuzz target's code on mutations of corpus descriptors and of what vmi writes.
    let mut seeds: Vec<Vec<u8>> = vec![
        ovf.clone().into_bytes(),
        vmi_ovf::native::vbox::generate(&{
            let mut v = sample_profile();
            v.disks.truncate(1);
            v.disks[0].controller = Controller::Sata;
            for n in &mut v.nics {
                n.model = NicModel::E1000;
            }
            v
        })
        .unwrap()
        .into_bytes(),
    ];
    if let Some(dir) = shared("ovf-corpus/govmomi") {
        let mut files = Vec::new();
        corpus_files(&dir, &mut files);
        files.sort();
        // A spread of small corpus files keeps the run short.
        files.retain(|f| std::fs::metadata(f).is_ok_and(|m| m.len() < 16 * 1024));
        for f in files.iter().step_by((files.len() / 12).max(1)) {
            seeds.push(std::fs::read(f).unwrap());
        }
    }
    for _ in 0..2500 {
        let base = &seeds[r.below(seeds.len())];
        vmi_ovf::fuzzing::exercise(&mutate(&mut r, base));
    }
    // Archives: mutated OVAs open or fail cleanly.
    let dir = tempfile::tempdir().unwrap();
    let d1 = raw_disk(dir.path(), "a.img", 4096, 1);
    let ova = dir.path().join("m.ova");
    let mut p = two_disk_profile();
    p.disks.truncate(1);
    package::export(&[as_is(&d1)], &p, &ova, &ExportOptions::default()).unwrap();
    let bytes = std::fs::read(&ova).unwrap();
    let target = dir.path().join("mut.ova");
    for _ in 0..150 {
        std::fs::write(&target, mutate(&mut r, &bytes)).unwrap();
        if let Ok(pkg) = Package::open(&target) {
            let _ = pkg.verify();
            let _ = package::open_disk(&pkg, 0, dir.path());
        }
    }
}

#[test]
fn convert_target_command_output_passes_the_targets_rules_when_the_engine_can() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_disk(dir.path(), "c.img", (3 << 20) + 512, 3);
    for (t, name) in [
        ("azure", "c.vhd"),
        ("vmware-esxi-6.7", "c.ova"),
        ("kvm", "c.qcow2"),
    ] {
        let out_path = dir.path().join(name);
        let mut out = Vec::new();
        match cli::run_convert_target(&src, t, &out_path, None, &mut out) {
            Err(e) if engine_missing(&e) => {
                eprintln!("skipped: conversion engine not available: {e:?}");
                return;
            }
            Err(e) => panic!("{t}: {e:?}"),
            Ok(code) => assert_eq!(code, 0, "{t}: {}", String::from_utf8_lossy(&out)),
        }
    }
}

#[test]
fn archives_written_by_gnu_tar_in_gnu_and_pax_formats_are_read() {
    if !have("tar") {
        eprintln!("skipped: GNU tar absent");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let long = format!("{}.vmdk", "n".repeat(150));
    std::fs::write(src.join("a.ovf"), b"<x/>").unwrap();
    std::fs::write(src.join(&long), vec![3u8; 5000]).unwrap();
    for fmt in ["gnu", "pax", "ustar"] {
        let ova = dir.path().join(format!("{fmt}.ova"));
        let mut cmd = Command::new("tar");
        cmd.arg(format!("--format={fmt}"))
            .arg("-cf")
            .arg(&ova)
            .arg("-C")
            .arg(&src)
            .arg("a.ovf");
        if fmt != "ustar" {
            cmd.arg(&long);
        }
        assert!(cmd.status().unwrap().success());
        let o = vmi_ovf::ova::Ova::open(&ova).unwrap();
        assert_eq!(o.members[0].name, "a.ovf", "{fmt}");
        assert_eq!(o.read_small("a.ovf", 100).unwrap(), b"<x/>");
        if fmt != "ustar" {
            assert_eq!(o.members.len(), 2, "{fmt}: {:?}", o.members);
            assert_eq!(
                o.read_small(&long, 10_000).unwrap(),
                vec![3u8; 5000],
                "{fmt}"
            );
        }
    }
}

/// qemu-img writes a random Unique Id into every VHD footer; the `.vbox` registry must repeat
/// it (VirtualBox compares), so it is read from the file, fixed and dynamic alike, and differs
/// between two disks.
#[test]
fn vhd_unique_ids_from_qemu_img_are_read_for_the_vbox_registry() {
    if !have("qemu-img") {
        eprintln!("skipped: qemu-img absent");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for sub in ["fixed", "dynamic", "dynamic"] {
        let f = dir.path().join(format!("d{}.vhd", seen.len()));
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "vpc", "-o"])
            .arg(format!("subformat={sub}"))
            .arg(&f)
            .arg("8M")
            .status()
            .unwrap();
        assert!(st.success());
        let uuid = vmi_ovf::native::vbox::medium_uuid(&f)
            .unwrap()
            .unwrap_or_else(|| panic!("{sub}: no Unique Id read"));
        assert!(vmi_ovf::native::vbox::is_uuid(&uuid), "{uuid}");
        assert!(!seen.contains(&uuid), "{uuid} twice");
        seen.push(uuid);
    }
}
