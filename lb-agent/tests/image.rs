//! The OCI image: scripts/build-image.sh builds it FROM scratch with Debian's podman, and the
//! image runs: the agent's version, lbctl's help, lb-cni's VERSION, and the init steps' tools
//! come out of it.
use std::{path::Path, process::Command};

/// This machine's podman needs runc (crun refuses hybrid cgroups) and limits no higher than the
/// session's hard ones; a node's container runtime needs neither.
const RUN: &[&str] = &["--runtime", "runc", "run", "--rm", "--network=none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"];

fn run(image: &str, args: &[&str]) -> String {
    let out = Command::new("podman").args(RUN).arg(image).args(args).output().expect("podman (scripts/setup.sh installs it)");
    assert!(out.status.success(), "podman run {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn image_builds_from_scratch_and_runs_the_agent() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_lb-agent")).parent().unwrap();
    let name = format!("localhost/lb-agent-test-{}", std::process::id());
    let out = Command::new("bash").arg(root.join("scripts/build-image.sh")).arg("--bin-dir").arg(bin_dir).args(["--image", &name]).output().unwrap();
    assert!(out.status.success(), "build-image.sh: {}", String::from_utf8_lossy(&out.stderr));
    let reference = String::from_utf8(out.stdout).unwrap().lines().last().unwrap().to_string();
    // The tag is the crate's version: the one deploy/ names.
    assert_eq!(reference, format!("{name}:{}", env!("CARGO_PKG_VERSION")));

    let result = std::panic::catch_unwind(|| {
        assert_eq!(run(&reference, &["lb-agent", "--version"]).trim(), format!("lb-agent {}", env!("CARGO_PKG_VERSION")));
        assert!(run(&reference, &["lbctl", "--help"]).contains("Usage: lbctl"));
        // The CNI overlay's init step copies lb-cni out of the image.
        let version = run(&reference, &["sh", "-c", "echo '{\"cniVersion\":\"1.1.0\"}' | CNI_COMMAND=VERSION lb-cni; for t in cp mv; do command -v $t; done"]);
        assert!(version.starts_with(r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#) && version.lines().count() == 3, "{version}");
        // The DaemonSet's init step runs a shell with mount and sysctl.
        let tools = run(&reference, &["sh", "-c", "for t in mount sysctl grep tr; do command -v $t; done; sysctl -n net.ipv4.ip_forward"]);
        assert_eq!(tools.lines().count(), 5, "{tools}");
        // FROM scratch: the image holds the three binaries, their libraries and busybox, nothing more.
        let size: u64 = String::from_utf8(Command::new("podman").args(["image", "inspect", "--format", "{{.Size}}", &reference]).output().unwrap().stdout).unwrap().trim().parse().unwrap();
        assert!(size < 100 << 20, "image is {size} bytes");
    });
    let _ = Command::new("podman").args(["rmi", "--force", &reference]).output();
    result.unwrap();
}
