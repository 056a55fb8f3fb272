#!/usr/bin/env bash
# What recording costs: fio against the same passthrough export served without and with
# `--record`, in interleaved rounds, and the median IOPS of each with the ratio.
#
#   bash benches/record.sh                          # 3 rounds, 5 s per job, Unix socket
#   TRANSPORT=tcp ROUNDS=5 bash benches/record.sh
#
# Environment:
#   RUNTIME    seconds per fio job (default 5)
#   ROUNDS     interleaved rounds (default 3); each round runs every job against both servers,
#              in an order that alternates, so drift spreads evenly
#   SIZE       backing file size (default 256M), filled with random data, in the page cache
#   TRANSPORT  unix (default) or tcp (127.0.0.1)
#   WORKDIR    where files live (default: a fresh temporary directory, removed at exit)
#   UBCACHE_BIN  an already built ubcache binary instead of building with --release
#
# Each fio run gets a freshly started server (and, recording, a new log next to the backing
# file, deleted afterwards), so a log never grows across runs.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-256M}
TRANSPORT=${TRANSPORT:-unix}

# name|fio arguments
JOBS_LIST=(
  "randwrite-4k-qd32|--rw=randwrite --bs=4k --iodepth=32"
  "seqwrite-128k-qd8|--rw=write --bs=128k --iodepth=8"
  # fio's NBD engine turns fsync into NBD_CMD_FLUSH: one flush per write.
  "randwrite-4k-qd1-fsync|--rw=randwrite --bs=4k --iodepth=1 --fsync=1"
)
SERVERS=(plain record)

for tool in fio nbdinfo jq; do
  command -v "$tool" >/dev/null || { echo "benches/record.sh: $tool is missing" >&2; exit 1; }
done

if [ -n "${UBCACHE_BIN:-}" ]; then
  UBCACHE=$UBCACHE_BIN
else
  cargo build --release --quiet
  UBCACHE=target/release/ubcache
fi
if [ -z "${WORKDIR:-}" ]; then
  WORKDIR=$(mktemp -d)
  trap 'kill "${server_pid:-}" 2>/dev/null || true; rm -rf "$WORKDIR"' EXIT
fi
backing="$WORKDIR/backing.img"
[ -f "$backing" ] || head -c "$SIZE" /dev/urandom > "$backing" 2>/dev/null \
  || { truncate -s "$SIZE" "$backing"; }
cat "$backing" > /dev/null

start_server() {
  local kind=$1 sock="$WORKDIR/s.sock" port record=()
  rm -f "$sock" "$WORKDIR/rec.log"
  [ "$kind" = record ] && record=(--record "$WORKDIR/rec.log")
  if [ "$TRANSPORT" = tcp ]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    RUST_LOG=warn "$UBCACHE" serve --backing "$backing" --listen "127.0.0.1:$port" "${record[@]}" \
      --ctl-socket "$WORKDIR/ctl.sock" > /dev/null 2> "$WORKDIR/server.log" &
    uri="nbd://127.0.0.1:$port"
  else
    RUST_LOG=warn "$UBCACHE" serve --backing "$backing" --socket "$sock" "${record[@]}" \
      --ctl-socket "$WORKDIR/ctl.sock" > /dev/null 2> "$WORKDIR/server.log" &
    uri="nbd+unix:///?socket=$sock"
  fi
  server_pid=$!
  for _ in $(seq 1 100); do
    nbdinfo --size "$uri" > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  cat "$WORKDIR/server.log" >&2
  exit 1
}

stop_server() {
  kill -TERM "$server_pid"
  wait "$server_pid" || true
  rm -f "$WORKDIR/rec.log"
}

declare -A results
echo "runtime ${RUNTIME}s per job, $ROUNDS rounds, transport $TRANSPORT, backing $SIZE" >&2
for round in $(seq 1 "$ROUNDS"); do
  for job in "${JOBS_LIST[@]}"; do
    name=${job%%|*}
    args=${job#*|}
    order=("${SERVERS[@]}")
    [ $((round % 2)) = 0 ] && order=("${SERVERS[1]}" "${SERVERS[0]}")
    for s in "${order[@]}"; do
      start_server "$s"
      # shellcheck disable=SC2086 # $args is a list of fio flags
      fio --name="$name" --ioengine=nbd --uri="$uri" $args --size="$SIZE" --time_based \
        --runtime="$RUNTIME" --randrepeat=0 --norandommap --output-format=json \
        --output="$WORKDIR/fio.json" > /dev/null
      log_bytes=$(stat -c %s "$WORKDIR/rec.log" 2>/dev/null || echo 0)
      stop_server
      iops=$(jq -r '.jobs[0].write.iops' "$WORKDIR/fio.json")
      results["$name|$s"]+="$iops"$'\n'
      printf 'round %d %-24s %-7s %10.0f IOPS  log %s bytes\n' "$round" "$name" "$s" "$iops" "$log_bytes" >&2
    done
  done
done

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
printf '%-24s %10s %10s %8s\n' "job (median of $ROUNDS)" plain record "rec/plain"
for job in "${JOBS_LIST[@]}"; do
  name=${job%%|*}
  p=$(printf '%s' "${results[$name|plain]}" | median)
  r=$(printf '%s' "${results[$name|record]}" | median)
  printf '%-24s %10.0f %10.0f %8s\n' "$name" "$p" "$r" "$(awk -v a="$r" -v b="$p" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
done
