//! One entry point for the `ovf` fuzz target and the in-tree mutation test: every parser of this
//! crate on the same arbitrary bytes. A descriptor that parses is written back and must parse
//! again (OVF 1.x writer, DSP8023 order); the strict checks run on it too. Errors are expected;
//! panics are the bugs this looks for.

use crate::envelope::{self, WriteOptions};
use crate::native::{libvirt, vbox, vmx};
use crate::package::Package;
use std::sync::atomic::{AtomicU64, Ordering};

/// Run every parser on `data`.
pub fn exercise(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(d) = envelope::parse(&text) {
        let _ = crate::strict::problems(&text);
        if let Ok(out) = envelope::write(&d, &WriteOptions::default()) {
            if let Err(e) = envelope::parse(&out) {
                panic!("a descriptor vmi wrote does not parse: {e}\n{out}");
            }
        }
    }
    let _ = crate::manifest::Manifest::parse(&text);
    let _ = vmx::parse(&text);
    let _ = libvirt::parse(&text);
    if let Ok(p) = vbox::parse(&text) {
        let _ = vbox::generate(&p);
    }
    exercise_ova(data);
}

/// The OVA reader works on files: the bytes go through a private temporary file.
fn exercise_ova(data: &[u8]) {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("vmi-ovf-fuzz-{}-{n}.ova", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        if let Ok(pkg) = Package::open(&path) {
            let _ = pkg.verify();
        }
    }
    let _ = std::fs::remove_file(&path);
}

#[cfg(test)]
mod tests {
    //! Regression tests for what fuzzing found, each named after its finding.

    use super::*;

    /// Parse, write and parse again (the round trip `exercise` asserts), returning whether the
    /// input parsed at all.
    fn round_trips(doc: &str) -> bool {
        exercise(doc.as_bytes());
        envelope::parse(doc).is_ok()
    }

    #[test]
    fn fuzz_ovf_an_attribute_named_colon_is_refused_instead_of_written_unparseable() {
        let doc = r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><knud:EbbeSection :=""></knud:EbbeSection></Envelope>"#;
        assert!(!round_trips(doc));
    }

    #[test]
    fn fuzz_ovf_an_ovf_0_9_section_whose_xsi_type_is_no_xml_name_keeps_its_element_name() {
        let doc = r#"<Envelope xmlns="http://www.vmware.com/schema/ovf/1/envelope" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><Content><Section xsi:type=" T"></Section></Content></Envelope>"#;
        round_trips(doc);
    }
}
