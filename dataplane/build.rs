//! Compiles the XDP program (`bpf/egressd_xdp.c`) with clang into `$OUT_DIR/egressd_xdp.o`, which
//! `xsk::xdp` embeds with `include_bytes!`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/egressd_xdp.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("egressd_xdp.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-env-changed=CLANG");
    let status = Command::new(&clang)
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-Wall",
            "-Werror",
            "-I/usr/include/x86_64-linux-gnu",
            "-c",
            src,
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {clang} to build the XDP program (run scripts/setup): {e}"));
    assert!(status.success(), "{clang} failed to compile {src}");
}
