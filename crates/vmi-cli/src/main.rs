//! The `vmi` command.
fn main() {}
