#!/bin/sh
# Stand-in for bpf-linker (which needs LLVM 21+ development libraries that Debian lacks).
# rustc, targeting bpfel-unknown-none with fat LTO, hands the linker LLVM bitcode; we turn it
# into a BPF object with the llc of the same toolchain, so the LLVM versions always match.
# Flags bpf-linker would use (--export-symbols, -L, --cpu, -O*, --debug, --btf) are accepted
# and ignored: LTO already kept only the exported programs and maps.
set -eu
out=""
inputs=""
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out="$2"; shift 2 ;;
    --export-symbols|-L|--cpu|--cpu-features|--emit|--log-file|--log-level) shift 2 ;;
    -*) shift ;;
    *) inputs="$inputs $1"; shift ;;
  esac
done
[ -n "$out" ] || { echo "bpf-link.sh: no -o given" >&2; exit 2; }
[ -n "$inputs" ] || { echo "bpf-link.sh: no input" >&2; exit 2; }
bin="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin"
set -- $inputs
if [ $# -gt 1 ]; then
  "$bin/llvm-link" "$@" -o "$out.linked.bc"
  set -- "$out.linked.bc"
fi
"$bin/llc" -march=bpfel -mcpu=v3 -filetype=obj -O3 "$1" -o "$out"
rm -f "$out.linked.bc"
