//! Compiles the libext2fs shim (src/ext4/shim.c) and links libext2fs and libcom_err
//! (Debian: libext2fs-dev, comerr-dev).
fn main() {
    println!("cargo:rerun-if-changed=src/ext4/shim.c");
    cc::Build::new()
        .file("src/ext4/shim.c")
        .warnings(true)
        .compile("vmi_ext2_shim");
    println!("cargo:rustc-link-lib=ext2fs");
    println!("cargo:rustc-link-lib=com_err");
}
