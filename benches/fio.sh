#!/usr/bin/env bash
# Benchmarks `ubcache serve` against `nbdkit file` (its default thread count and --threads=2) on
# the same backing file, with fio's NBD engine (libnbd), and prints per job the median IOPS,
# the server's CPU time per I/O, and the ratio ubcache/nbdkit.
#
#   bash benches/fio.sh                       # 3 rounds, 5 s per job
#   RUNTIME=20 ROUNDS=5 bash benches/fio.sh   # longer, steadier numbers
#
# Environment:
#   RUNTIME    seconds per fio job (default 5)
#   ROUNDS     interleaved rounds (default 3, at least 1); each round runs every job once
#              against every server, in a rotating server order, so drift (thermal, other load)
#              spreads evenly instead of favouring whoever ran first
#   SIZE       backing file size (default 1G); it is filled with random data once, then read
#              into the page cache so reads measure the servers, not the disk
#   TRANSPORT  unix (default) or tcp (127.0.0.1)
#   JOBS       space-separated subset of job names (default: all, see below)
#   WORKDIR    where the backing file and sockets live (default: a fresh temporary directory,
#              removed at exit; pass one to keep the filled backing file between runs). A kept
#              file whose pages were evicted and read back sits in large page-cache folios, and
#              ext4 then spends several times more CPU on every 4k write (it walks the folio's
#              buffer heads), for every server alike: write figures from a fresh file and from
#              a kept one do not compare.
#   UBCACHE_ARGS  extra flags for `ubcache serve` (like "--threads 2")
#   UBCACHE_BIN   an already built ubcache binary to use instead of building with --release
#
# CPU per I/O: utime+stime of the server process (all its threads) from /proc/PID/stat, read
# before and after each job, divided by the job's reads+writes (flushes are not counted as
# I/Os). The clock tick is 10 ms on most systems, so short runs give coarse CPU figures.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-1G}
TRANSPORT=${TRANSPORT:-unix}
UBCACHE_ARGS=${UBCACHE_ARGS:-}

# name|fio arguments
ALL_JOBS=(
  "randread-4k-qd1|--rw=randread --bs=4k --iodepth=1"
  "randread-4k-qd32|--rw=randread --bs=4k --iodepth=32"
  "randwrite-4k-qd32|--rw=randwrite --bs=4k --iodepth=32"
  "seqread-128k-qd8|--rw=read --bs=128k --iodepth=8"
  "seqwrite-128k-qd8|--rw=write --bs=128k --iodepth=8"
  "randrw70-4k-qd16|--rw=randrw --rwmixread=70 --bs=4k --iodepth=16"
  # fio's NBD engine turns fsync into NBD_CMD_FLUSH (it has no fdatasync): one flush per write.
  "randwrite-4k-qd4-flush|--rw=randwrite --bs=4k --iodepth=4 --fsync=1"
)
SERVERS=(ubcache nbdkit nbdkit-t2)

for tool in fio nbdkit nbdinfo jq; do
  command -v "$tool" >/dev/null || { echo "benches/fio.sh: $tool is missing (bash scripts/install-deps.sh)" >&2; exit 1; }
done
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a positive integer" >&2; exit 1; }
[[ "$RUNTIME" =~ ^[1-9][0-9]*$ ]] || { echo "RUNTIME must be a positive integer (seconds)" >&2; exit 1; }

jobs=()
if [ -n "${JOBS:-}" ]; then
  for want in $JOBS; do
    found=""
    for job in "${ALL_JOBS[@]}"; do [ "${job%%|*}" = "$want" ] && found=$job; done
    [ -n "$found" ] || { echo "unknown job $want; jobs: $(printf '%s ' "${ALL_JOBS[@]%%|*}")" >&2; exit 1; }
    jobs+=("$found")
  done
else
  jobs=("${ALL_JOBS[@]}")
fi

if [ -n "${UBCACHE_BIN:-}" ]; then
  UBCACHE=$UBCACHE_BIN
else
  echo "building ubcache (release)..." >&2
  cargo build --release --locked --bin ubcache >&2
  target_dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
  UBCACHE="$target_dir/release/ubcache"
fi

if [ -n "${WORKDIR:-}" ]; then
  mkdir -p "$WORKDIR"
  keep_workdir=1
else
  WORKDIR=$(mktemp -d -t ubcache-bench.XXXXXX)
  keep_workdir=0
fi
backing="$WORKDIR/backing.img"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$keep_workdir" = 0 ]; then rm -rf "$WORKDIR"; else rm -f "$WORKDIR"/*.sock; fi
}
trap cleanup EXIT

size_bytes=$(numfmt --from=iec "$SIZE")
if [ ! -f "$backing" ] || [ "$(stat -c %s "$backing")" != "$size_bytes" ]; then
  echo "filling $backing with $SIZE of random data..." >&2
  head -c "$size_bytes" /dev/urandom > "$backing.tmp"
  mv "$backing.tmp" "$backing"
fi
cat "$backing" > /dev/null # into the page cache

# Starts a server in the background; sets $uri and appends its pid to pids (and server_pid).
start_server() {
  local name=$1 port sock
  sock="$WORKDIR/$name.sock"
  rm -f "$sock"
  if [ "$TRANSPORT" = tcp ]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
      || shuf -i 20000-60000 -n 1)
  fi
  case "$name" in
    ubcache)
      local listen=(--socket "$sock")
      [ "$TRANSPORT" = tcp ] && listen=(--listen "127.0.0.1:$port")
      # shellcheck disable=SC2086 # UBCACHE_ARGS is a list of flags
      RUST_LOG=warn "$UBCACHE" serve --backing "$backing" "${listen[@]}" $UBCACHE_ARGS \
        > "$WORKDIR/$name.out" 2> "$WORKDIR/$name.log" &
      ;;
    nbdkit | nbdkit-t2)
      local threads=() listen=(-U "$sock")
      [ "$name" = nbdkit-t2 ] && threads=(--threads=2)
      [ "$TRANSPORT" = tcp ] && listen=(-i 127.0.0.1 -p "$port")
      nbdkit -f "${threads[@]}" "${listen[@]}" file "$backing" > "$WORKDIR/$name.out" 2> "$WORKDIR/$name.log" &
      ;;
  esac
  server_pid=$!
  pids+=("$server_pid")
  if [ "$TRANSPORT" = tcp ]; then uri="nbd://127.0.0.1:$port"; else uri="nbd+unix:///?socket=$sock"; fi
  # Ready when a client can read the export size (bounded wait).
  for _ in $(seq 1 100); do
    if nbdinfo --size "$uri" >/dev/null 2>&1; then return 0; fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "$name did not start; its log:" >&2
  cat "$WORKDIR/$name.log" >&2
  exit 1
}

# utime+stime of a process, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

declare -A uri_of pid_of
for s in "${SERVERS[@]}"; do
  start_server "$s"
  uri_of[$s]=$uri
  pid_of[$s]=$server_pid
done
ticks_per_sec=$(getconf CLK_TCK)

declare -A results # "$job|$server" -> "iops cpu_us_per_io" lines
echo "runtime ${RUNTIME}s per job, $ROUNDS rounds, transport $TRANSPORT, backing $SIZE in page cache" >&2
for round in $(seq 1 "$ROUNDS"); do
  for job in "${jobs[@]}"; do
    name=${job%%|*}
    args=${job#*|}
    # Rotate the server order each round.
    order=()
    for i in "${!SERVERS[@]}"; do order+=("${SERVERS[$(((i + round) % ${#SERVERS[@]}))]}"); done
    for s in "${order[@]}"; do
      json="$WORKDIR/fio.json"
      before=$(cpu_ticks "${pid_of[$s]}")
      # shellcheck disable=SC2086 # $args is a list of fio flags
      fio --name="$name" --ioengine=nbd --uri="${uri_of[$s]}" $args --size="$SIZE" \
        --time_based --runtime="$RUNTIME" --randrepeat=0 --norandommap \
        --output-format=json --output="$json" > /dev/null
      after=$(cpu_ticks "${pid_of[$s]}")
      read -r iops ios < <(jq -r '.jobs[0] | "\(.read.iops + .write.iops) \(.read.total_ios + .write.total_ios)"' "$json")
      cpu_us=$(awk -v t="$((after - before))" -v hz="$ticks_per_sec" -v n="$ios" \
        'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "nan" }')
      results["$name|$s"]+="$iops $cpu_us"$'\n'
      printf 'round %d %-24s %-10s %10.0f IOPS %8s us CPU/IO\n' "$round" "$name" "$s" "$iops" "$cpu_us" >&2
    done
  done
done

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo
printf '%-24s %11s %11s %11s %9s %9s   %s\n' "job (median of $ROUNDS)" "ubcache" "nbdkit" "nbdkit-t2" "ub/nbdk" "ub/nbdk2" \
  "CPU us/IO: ubcache nbdkit nbdkit-t2"
for job in "${jobs[@]}"; do
  name=${job%%|*}
  declare -A iops_med cpu_med
  for s in "${SERVERS[@]}"; do
    iops_med[$s]=$(printf '%s' "${results[$name|$s]}" | awk '{ print $1 }' | median)
    cpu_med[$s]=$(printf '%s' "${results[$name|$s]}" | awk '{ print $2 }' | median)
  done
  ratio1=$(awk -v a="${iops_med[ubcache]}" -v b="${iops_med[nbdkit]}" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
  ratio2=$(awk -v a="${iops_med[ubcache]}" -v b="${iops_med[nbdkit-t2]}" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
  printf '%-24s %11.0f %11.0f %11.0f %9s %9s   %7.1f %6.1f %9.1f\n' "$name" \
    "${iops_med[ubcache]}" "${iops_med[nbdkit]}" "${iops_med[nbdkit-t2]}" "$ratio1" "$ratio2" \
    "${cpu_med[ubcache]}" "${cpu_med[nbdkit]}" "${cpu_med[nbdkit-t2]}"
done
