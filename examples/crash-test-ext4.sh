#!/usr/bin/env bash
# Crash-test ext4 with a ubcache recording: docs/crash-testing.md walks through it.
#
#   crash-test-ext4.sh [correct|buggy]   record a workload on ext4, then check every flush point
#   crash-test-ext4.sh fsck IMAGE        the --check command: e2fsck a replayed state
#   crash-test-ext4.sh verify IMAGE      the --check command: every file the workload declared
#                                        durable (by the last mark) is there with its content
#
# Needs root (losetup, mount), nbdfuse, fusermount3, e2fsprogs; UBCACHE names the binary
# (default: ubcache on PATH). `correct` (the default) must report every flush point clean;
# `buggy` skips one fsync and must report the first point where that file is missing, exiting 1.
set -euo pipefail

UBCACHE=${UBCACHE:-ubcache}
SIZE_MB=${SIZE_MB:-64}
FILES=${FILES:-12}

# Content the workload writes into file N (and the verifier expects).
content() { printf 'file %s, written by the crash-test workload\n' "$1"; printf 'x%.0s' $(seq 1 $(( $1 * 300 ))); }

# Gives a private, journal-replayed copy of a replayed state: a crashed ext4 needs its journal
# replayed before it can be judged, and replaying writes, which --check forbids on its image.
recovered_copy() {
    local copy="$1.recovered.$$"
    cp --sparse=always "$1" "$copy"
    # Exit 1 means "journal replayed, file system changed": expected after a crash.
    e2fsck -E journal_only -y "$copy" >/dev/null 2>&1 || [ $? -le 1 ]
    echo "$copy"
}

case "${1:-correct}" in
fsck)
    # Before the first mark the points are mkfs's own writes, not yet a file system.
    [ -n "${UBCACHE_MARK:-}" ] || exit 0
    copy=$(recovered_copy "$2")
    trap 'rm -f "$copy"' EXIT
    e2fsck -fn "$copy"
    exit $?
    ;;
verify)
    copy=$(recovered_copy "$2")
    trap 'rm -f "$copy"' EXIT
    # The last mark says how many files the workload had made durable: "durable-N".
    n=${UBCACHE_MARK#durable-}
    [[ "$n" =~ ^[0-9]+$ ]] || exit 0
    for i in $(seq 1 "$n"); do
        if ! debugfs -R "cat /work/f$i" "$copy" 2>/dev/null | cmp -s - <(content "$i"); then
            echo "work/f$i is missing or wrong although it was made durable before ${UBCACHE_MARK}"
            exit 1
        fi
    done
    exit 0
    ;;
correct | buggy) mode=$1 ;;
*)
    echo "usage: $0 [correct|buggy] | fsck IMAGE | verify IMAGE" >&2
    exit 2
    ;;
esac

self=$(readlink -f "$0")
work=$(mktemp -d)
mnt=$work/mnt fuse=$work/fuse
mkdir -p "$mnt" "$fuse"
server="" nbdfuse="" loopdev=""
cleanup() {
    mountpoint -q "$mnt" && umount -l "$mnt"
    [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null
    mountpoint -q "$fuse" && fusermount3 -u "$fuse"
    [ -n "$nbdfuse" ] && wait "$nbdfuse" 2>/dev/null
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# 1. Serve a fresh backing file with recording on.
truncate -s "${SIZE_MB}M" "$work/backing.img"
"$UBCACHE" serve --backing "$work/backing.img" --socket "$work/nbd.sock" \
    --record "$work/ext4.log" --ctl-socket "$work/ctl.sock" 2>"$work/serve.err" &
server=$!
for _ in $(seq 100); do [ -S "$work/nbd.sock" ] && break; sleep 0.1; done
mark() { "$UBCACHE" mark "$1" --ctl-socket "$work/ctl.sock" >/dev/null; }

# 2. The export as a block device: nbdfuse makes it a file, losetup a device.
nbdfuse "$fuse/nbd" "nbd+unix:///?socket=$work/nbd.sock" &
nbdfuse=$!
for _ in $(seq 100); do [ -e "$fuse/nbd" ] && break; sleep 0.1; done
loopdev=$(losetup -f --show "$fuse/nbd")

# 3. mkfs, a mark, then the workload: creates, fsyncs, renames, overwrites.
mkfs.ext4 -q -F "$loopdev"
mount -t ext4 "$loopdev" "$mnt"
mkdir "$mnt/work"
sync "$mnt/work"
mark after-mkfs
for i in $(seq 1 "$FILES"); do
    content "$i" >"$mnt/work/tmp$i"
    # The planted bug: the buggy workload forgets one fsync but still declares the file durable.
    if [ "$mode" = correct ] || [ "$i" -ne 3 ]; then sync "$mnt/work/tmp$i"; fi
    mv "$mnt/work/tmp$i" "$mnt/work/f$i"
    sync "$mnt/work"
    mark "durable-$i"
    # Churn that must not disturb durable files: overwrite and rename scratch files.
    printf 'scratch %s\n' "$i" >"$mnt/work/scratch"
    sync "$mnt/work/scratch"
    mv "$mnt/work/scratch" "$mnt/work/scratch.old"
done
umount "$mnt"
losetup -d "$loopdev" && loopdev=""
fusermount3 -u "$fuse"
wait "$nbdfuse" && nbdfuse=""
kill "$server" && wait "$server" || true
server=""

# 4. List, then check every flush point: fsck, and the content verifier.
"$UBCACHE" replay "$work/ext4.log" --list | tail -n 2
status=0
"$UBCACHE" replay "$work/ext4.log" --check "$self fsck {image}" --each flush || status=1
"$UBCACHE" replay "$work/ext4.log" --check "$self verify {image}" --each flush || status=1
exit $status
