#!/usr/bin/env bash
# Builds Katran's XDP balancer (katran/lib/bpf/balancer.bpf.c) from a Katran checkout, for
# `lb-bench --suites cost --katran-object OUT`. Katran is not vendored here: give the path of a
# checkout of https://github.com/facebookincubator/katran. Needs clang (Debian: clang-14 or later).
#   bench/katran/build.sh /path/to/katran /tmp/katran-balancer.o
set -euo pipefail
src=${1:?usage: build.sh KATRAN_CHECKOUT OUT.o}
out=${2:?usage: build.sh KATRAN_CHECKOUT OUT.o}
clang=$(command -v clang || command -v clang-19 || command -v clang-16 || command -v clang-14 || true)
if [ -z "$clang" ]; then
    echo "build.sh: no clang; on Debian: apt-get install clang" >&2
    exit 1
fi
[ -f "$src/katran/lib/bpf/balancer.bpf.c" ] || { echo "build.sh: $src is not a Katran checkout" >&2; exit 1; }
# Katran's own flags (its build_bpf_modules_opensource.sh): its headers, the kernel's uapi
# ones, -O2 for the BPF target. __x86_64__ picks the 64-bit libc headers that string.h pulls in.
"$clang" -O2 -g -target bpf -D__x86_64__ -D__KERNEL__ -D__BPF_TRACING__ \
    -I"$src" -I/usr/include/x86_64-linux-gnu \
    -Wno-unused-value -Wno-pointer-sign -Wno-compare-distinct-pointer-types \
    -Wno-gnu-variable-sized-type-not-at-end -Wno-address-of-packed-member \
    -Wno-tautological-compare -Wno-unknown-warning-option \
    -c "$src/katran/lib/bpf/balancer.bpf.c" -o "$out"
echo "built $out from $src ($(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
