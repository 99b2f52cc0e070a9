//! Builds the kernel programs (lb-ebpf) for bpfel-unknown-none with the nightly toolchain that
//! lb-ebpf/rust-toolchain.toml pins, and hands the object's path to the crate as LB_BPF_OBJECT.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap();
    let ebpf_dir = root.join("lb-ebpf");
    for watched in ["lb-ebpf/src", "lb-ebpf/Cargo.toml", "lb-ebpf/bpf-link.sh", "lb-ebpf/rust-toolchain.toml", "lb-common/src"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let toolchain = pinned_channel(&ebpf_dir.join("rust-toolchain.toml"));
    let target_dir = root.join("target").join("bpf");

    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", &toolchain, "cargo", "build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf_dir)
        // The kernel object wants one LTO'd module (what bpf-link.sh expects) and no unwinding.
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1");
    // Nothing of the outer (host, stable) build may leak into the inner one.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        let leaks = key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_NET_OFFLINE";
        if leaks || key.starts_with("RUSTC") || key == "RUSTFLAGS" || key == "RUSTUP_TOOLCHAIN" || key == "RUSTDOC" || key == "CARGO" {
            cargo.env_remove(key.as_ref());
        }
    }
    let status = cargo.status().unwrap_or_else(|e| panic!("could not run rustup to build lb-ebpf: {e}"));
    if !status.success() {
        panic!(
            "building lb-ebpf failed ({status}). It needs the toolchain {toolchain} with rust-src and \
             llvm-tools: run `rustup toolchain install` inside lb-ebpf/ (see README)."
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/lb-ebpf");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("lb.bpf.o");
    fs::copy(&object, &out).unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
    println!("cargo:rustc-env=LB_BPF_OBJECT={}", out.display());
}

/// The `channel = "..."` line of a rust-toolchain.toml.
fn pinned_channel(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .find_map(|l| l.trim().strip_prefix("channel").map(|v| v.trim_start_matches([' ', '=']).trim().trim_matches('"').to_string()))
        .unwrap_or_else(|| panic!("{} names no channel", path.display()))
}
