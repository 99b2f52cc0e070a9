#!/usr/bin/env bash
# Builds the lb-agent OCI image FROM scratch with podman (or buildah), no registry needed.
#
#   scripts/build-image.sh [--bin-dir DIR] [--image NAME]
#
# --bin-dir: where lb-agent, lbctl and lb-cni are [default: builds them with `cargo build --release`].
# --image:   the image name [default: ghcr.io/lb-project/lb-agent]; the tag is always the
#            binaries' own version (`lb-agent --version`), the one deploy/ names.
# Prints the image reference on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir="" image="ghcr.io/lb-project/lb-agent"
while (($#)); do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    *) echo "build-image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$bin_dir" ]; then
  cargo build --release --bin lb-agent --bin lbctl --bin lb-cni >&2
  bin_dir=target/release
fi
for tool in busybox strip; do
  command -v "$tool" >/dev/null || { echo "build-image.sh: $tool missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
if command -v podman >/dev/null; then builder=(podman build); elif command -v buildah >/dev/null; then builder=(buildah bud); else
  echo "build-image.sh: neither podman nor buildah found (apt-get install podman)" >&2; exit 1
fi

version=$("$bin_dir/lb-agent" --version | awk '{print $2}')
[ -n "$version" ] || { echo "build-image.sh: $bin_dir/lb-agent --version printed no version" >&2; exit 1; }

stage=$(mktemp -d /tmp/lb-image.XXXXXX)
trap 'rm -rf "$stage"' EXIT
root="$stage/rootfs"
mkdir -p "$root/usr/local/bin" "$root/bin" "$root/tmp" "$root/run" "$root/sys/fs/bpf" "$root/proc"
chmod 1777 "$root/tmp"
# The binaries without debug info or symbol tables (errors and panic messages stay; a
# backtrace shows addresses), and every shared library they load, at the same paths.
for bin in lb-agent lbctl lb-cni; do
  strip --strip-all -o "$root/usr/local/bin/$bin" "$bin_dir/$bin"
  for lib in $(ldd "$bin_dir/$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
done
# The init step's shell and tools: one static busybox.
cp /usr/bin/busybox "$root/bin/busybox"
for applet in sh mount umount sysctl grep tr cat ls rm echo sleep cp mv; do
  ln -s busybox "$root/bin/$applet"
done

cp deploy/image/Containerfile "$stage/Containerfile"
"${builder[@]}" -q --build-arg "VERSION=$version" -t "$image:$version" -f "$stage/Containerfile" "$stage" >&2
echo "$image:$version"
