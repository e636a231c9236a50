//! Compiles the libext2fs shim (src/ext4/shim.c) and links libext2fs and libcom_err.
//!
//! The shim needs e2fsprogs' headers (Debian: libext2fs-dev). When they are missing, a stand-in
//! (src/ext4/shim_unavailable.c) is compiled instead so that the rest of vmi builds on a machine
//! without them; opening an ext2/3/4 filesystem then fails with a message saying what to install.
//! The libraries are linked by their runtime names (`libext2fs.so.2`, `libcom_err.so.2`, present
//! wherever e2fsprogs is installed), so the development symlinks are not needed either.
fn main() {
    println!("cargo:rerun-if-changed=src/ext4/shim.c");
    println!("cargo:rerun-if-changed=src/ext4/shim_unavailable.c");
    // The directory, not a header: installing libext2fs-dev gives the headers their package
    // times (older than this build), but the directory the time it was made.
    println!("cargo:rerun-if-changed=/usr/include/ext2fs");
    let full = cc::Build::new()
        .file("src/ext4/shim.c")
        .warnings(true)
        .cargo_warnings(false)
        .try_compile("vmi_ext2_shim");
    if full.is_err() {
        println!(
            "cargo:warning=e2fsprogs headers not found (apt-get install libext2fs-dev): \
             vmi is built without ext2/3/4 support in the guest layer"
        );
        cc::Build::new()
            .file("src/ext4/shim_unavailable.c")
            .warnings(true)
            .compile("vmi_ext2_shim");
    }
    println!("cargo:rustc-link-lib=dylib:+verbatim=libext2fs.so.2");
    println!("cargo:rustc-link-lib=dylib:+verbatim=libcom_err.so.2");
}
