#!/usr/bin/env bash
# Builds map-cost.bpf.c, the kernel hash-map work of a new flow alone, for
# `lb-bench --suites map-cost --map-object OUT`. Needs clang (scripts/setup.sh installs it).
#   bench/maps/build.sh /tmp/map-cost.o
set -euo pipefail
out=${1:?usage: build.sh OUT.o}
clang=$(command -v clang || command -v clang-19 || command -v clang-16 || command -v clang-14 || true)
[ -n "$clang" ] || { echo "build.sh: no clang; on Debian: apt-get install clang" >&2; exit 1; }
"$clang" -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -Wall -Werror -c "$(dirname "$0")/map-cost.bpf.c" -o "$out"
