#!/usr/bin/env bash
# Benchmarks the cache itself: a cached export over a SLOW backing against the same slow backing
# alone, and warm cached reads against a passthrough export of a fast file, in the same run, with
# fio's NBD engine (libnbd). Prints per job the median IOPS over the rounds and the ratio.
#
#   bash benches/cache_fio.sh                       # 3 rounds, 10 s per job
#   RUNTIME=20 ROUNDS=5 bash benches/cache_fio.sh
#
# The slow backing is nbdkit serving a sparse file with 5 ms added to every read and write, one
# request at a time (noparallel), on a Unix socket: ~180-200 IOPS whatever the queue depth, like
# a single disk. ubcache uses it as `--backing nbd+unix:///?socket=...` (NbdDev), with a cache
# file in the work directory (formatted over it at start; 2 GiB, sparse).
#
# Jobs (fio --size=$SPAN, random 4 KiB, QD32):
#   randwrite  writeback-cached export vs the slow backing alone     (target >= 100x)
#   randread   cached export, warm vs a passthrough export of a fast file held in the page cache
#              (target >= 0.8x). Warm-up: one pass of 64 KiB writes over the whole span in random
#              order (each block once): in writeback mode it lands in the cache in seconds, where a
#              read pass would cost one 5 ms backing read per miss, and random order keeps it under
#              the sequential cutoff (which would send a sequential pass around the cache).
#
# Environment:
#   RUNTIME   seconds per fio job (default 10)       ROUNDS  rounds, median taken (default 3)
#   SPAN      working set (default 256M)              WORKDIR kept work directory (default: temp)
#   DELAY     nbdkit delay per read/write (default 5ms)
#   DRIVER    example (default): the cache_serve example serves both ubcache exports;
#             cli: `ubcache format` + `ubcache serve --cache ... --backing nbd+unix://...` (needs a
#             ubcache binary whose serve accepts an NBD URI as --backing)
# No background writeback runs during the example driver's run (dirty data stays cached).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-3}
SPAN=${SPAN:-256M}
DELAY=${DELAY:-5ms}
DRIVER=${DRIVER:-example}

for tool in fio nbdkit nbdinfo jq; do
  command -v "$tool" >/dev/null || { echo "benches/cache_fio.sh: $tool is missing (bash scripts/install-deps.sh)" >&2; exit 1; }
done
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a positive integer" >&2; exit 1; }
[[ "$RUNTIME" =~ ^[1-9][0-9]*$ ]] || { echo "RUNTIME must be a positive integer (seconds)" >&2; exit 1; }

echo "building (release)..." >&2
cargo build --release --bin ubcache --example cache_serve >&2
target_dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
UBCACHE="$target_dir/release/ubcache"
SERVE_EXAMPLE="$target_dir/release/examples/cache_serve"

if [ -n "${WORKDIR:-}" ]; then
  mkdir -p "$WORKDIR"
  keep_workdir=1
else
  WORKDIR=$(mktemp -d -t ubcache-cache-bench.XXXXXX)
  keep_workdir=0
fi
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$keep_workdir" = 0 ]; then rm -rf "$WORKDIR"; else rm -f "$WORKDIR"/*.sock; fi
}
trap cleanup EXIT

span_bytes=$(numfmt --from=iec "$SPAN")
slow_img="$WORKDIR/slow.img"
fast_img="$WORKDIR/fast.img"
cache_img="$WORKDIR/cache.img"
rm -f "$slow_img" "$cache_img"
truncate -s $((span_bytes * 2 + (1 << 20))) "$slow_img"
if [ ! -f "$fast_img" ] || [ "$(stat -c %s "$fast_img")" != "$span_bytes" ]; then
  head -c "$span_bytes" /dev/urandom > "$fast_img"
fi
cat "$fast_img" > /dev/null # into the page cache

# wait_ready NAME PID URI: a client can read the export size (bounded wait).
wait_ready() {
  for _ in $(seq 1 200); do
    if nbdinfo --size "$3" >/dev/null 2>&1; then return 0; fi
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  echo "$1 did not start; its log:" >&2
  cat "$WORKDIR/$1.log" >&2
  exit 1
}

slow_sock="$WORKDIR/slow.sock"
nbdkit -f -U "$slow_sock" --filter=noparallel --filter=delay file "$slow_img" \
  delay-read="$DELAY" delay-write="$DELAY" > "$WORKDIR/slow.out" 2> "$WORKDIR/slow.log" &
pids+=($!)
slow_uri="nbd+unix:///?socket=$slow_sock"
wait_ready slow $! "$slow_uri"

cached_sock="$WORKDIR/cached.sock"
cached_uri="nbd+unix:///?socket=$cached_sock"
if [ "$DRIVER" = cli ]; then
  "$UBCACHE" format --cache "$cache_img" --backing "$slow_uri" --size 2G >&2
  RUST_LOG=warn "$UBCACHE" serve --cache "$cache_img" --backing "$slow_uri" --mode writeback \
    --socket "$cached_sock" > "$WORKDIR/cached.out" 2> "$WORKDIR/cached.log" &
else
  RUST_LOG=warn "$SERVE_EXAMPLE" --backing "$slow_uri" --cache "$cache_img" --cache-size 2G \
    --mode writeback --socket "$cached_sock" \
    > "$WORKDIR/cached.out" 2> "$WORKDIR/cached.log" &
fi
pids+=($!)
wait_ready cached $! "$cached_uri"

pass_sock="$WORKDIR/passthrough.sock"
pass_uri="nbd+unix:///?socket=$pass_sock"
if [ "$DRIVER" = cli ]; then
  RUST_LOG=warn "$UBCACHE" serve --backing "$fast_img" --socket "$pass_sock" \
    > "$WORKDIR/passthrough.out" 2> "$WORKDIR/passthrough.log" &
else
  RUST_LOG=warn "$SERVE_EXAMPLE" --backing "$fast_img" --socket "$pass_sock" \
    > "$WORKDIR/passthrough.out" 2> "$WORKDIR/passthrough.log" &
fi
pids+=($!)
wait_ready passthrough $! "$pass_uri"

# run_fio URI RW -> IOPS of the job's direction
run_fio() {
  local uri=$1 rw=$2 dir
  dir=${rw#rand}
  fio --name=job --ioengine=nbd --uri="$uri" --rw="$rw" --bs=4k --iodepth=32 --size="$SPAN" \
    --time_based --runtime="$RUNTIME" --ramp_time=1 --randrepeat=0 --output-format=json 2>/dev/null \
    | sed -n '/^{/,$p' | jq -r ".jobs[0].$dir.iops" # fio's NBD engine prints a line before the JSON
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "warm-up: writing the span of the cached export once (64 KiB, random order)..." >&2
fio --name=warm --ioengine=nbd --uri="$cached_uri" --rw=randwrite --bs=64k --iodepth=8 --size="$SPAN" \
  --output-format=json > /dev/null 2>&1

declare -a w_slow w_cached r_pass r_cached
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS (${RUNTIME}s per job)" >&2
  w_slow+=("$(run_fio "$slow_uri" randwrite)")
  w_cached+=("$(run_fio "$cached_uri" randwrite)")
  r_pass+=("$(run_fio "$pass_uri" randread)")
  r_cached+=("$(run_fio "$cached_uri" randread)")
  echo "  randwrite slow ${w_slow[-1]}, cached ${w_cached[-1]}; randread passthrough ${r_pass[-1]}, cached ${r_cached[-1]}" >&2
done

ws=$(median "${w_slow[@]}"); wc=$(median "${w_cached[@]}")
rp=$(median "${r_pass[@]}"); rc=$(median "${r_cached[@]}")
echo
echo "median IOPS over $ROUNDS rounds, ${RUNTIME}s each, 4 KiB random, QD32, span $SPAN, backing delay $DELAY, driver $DRIVER"
printf '%-34s %12s %12s %9s %8s\n' job baseline ubcache ratio target
awk -v ws="$ws" -v wc="$wc" -v rp="$rp" -v rc="$rc" 'BEGIN {
  printf "%-34s %12.0f %12.0f %8.1fx %8s\n", "randwrite (slow alone | writeback)", ws, wc, wc / ws, ">=100x"
  printf "%-34s %12.0f %12.0f %8.2fx %8s\n", "randread (passthrough fast | warm)", rp, rc, rc / rp, ">=0.8x"
}'
