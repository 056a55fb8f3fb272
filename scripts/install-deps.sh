#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks drive: real NBD clients (libnbd-bin:
# nbdinfo, nbdsh, nbdcopy, nbdfuse), qemu-io/qemu-img, fio, nbdkit (the peer we benchmark against
# and a slow backing for benchmarks), and the ext4 tools for the file system test.
set -euo pipefail
pkgs=(libnbd-bin fio qemu-utils nbdkit e2fsprogs fuse3 util-linux)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
