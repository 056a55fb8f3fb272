#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks drive: real NBD clients (libnbd-bin:
# nbdinfo, nbdcopy, nbdfuse), qemu-io/qemu-img, fio, nbdkit (the peer we benchmark against
# and a slow backing for benchmarks), the ext4 tools for the file system test, and jq (the
# benchmark script reads fio's JSON with it).
set -euo pipefail
pkgs=(libnbd-bin fio qemu-utils nbdkit e2fsprogs fuse3 util-linux jq)
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
