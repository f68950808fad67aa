#!/usr/bin/env bash
# Crash-recovery replay rate against fio's sequential read of the same WAL
# files, same directory, same run (see "How to read these" in docs/benchmarks.md).
#
#   bench/recovery.sh [DIR]     env: SECS (8), REPEAT (3), PAGES (20000), SIZE (200),
#                                    WALDEN (binary), COLD (1: drop the page cache first)
#
# 1. `walden bench --embedded --pages` writes pages at level off (the flusher
#    still writes everything) with checkpoints held off, for SECS seconds, and
#    is killed with SIGKILL: the WAL since the last redo point is SECS of
#    page records.
# 2. REPEAT times, alternating: fio reads the WAL segment files sequentially
#    (buffered 1 MiB reads, as walden's reader does), then walden recovers a
#    copy of the crashed directory (`walden serve` until ready: end-of-WAL
#    scan, redo, end-of-recovery checkpoint). With COLD=1 the page cache is
#    dropped before each (needs root).
# Prints walden's phases from its log and the ratios to fio.
set -euo pipefail
export LC_ALL=C

SECS=${SECS:-8}
REPEAT=${REPEAT:-3}
PAGES=${PAGES:-20000}
SIZE=${SIZE:-200}
COLD=${COLD:-1}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WALDEN=${WALDEN:-$REPO/target/release/walden}
die() { echo "recovery.sh: $*" >&2; exit 1; }
command -v fio >/dev/null || { [[ $(id -u) -eq 0 ]] && apt-get install -y -qq fio >/dev/null; } || die "install fio"
[[ -x $WALDEN ]] || (cd "$REPO" && cargo build --release)

if [[ $# -ge 1 ]]; then DIR=$1; mkdir -p "$DIR"; else DIR=$(mktemp -d -p . walden-recovery-XXXX); fi
DIR=$(cd "$DIR" && pwd)
LOGS=$(mktemp -d)
cleanup() { rm -rf "$DIR/crashed" "$DIR/run" "$LOGS"; }
trap cleanup EXIT

SETTINGS=(-c wal_segment_size=16MB -c checkpoint_timeout=1d -c max_wal_size=100GB
          -c shared_buffers=1GB -c listen_addr=127.0.0.1:0 -c metrics_addr= -c log_checkpoints=on)
BENCH_SETTINGS=()
for ((i = 0; i < ${#SETTINGS[@]}; i += 2)); do BENCH_SETTINGS+=(--set "${SETTINGS[i+1]}"); done

drop_caches() { if [[ $COLD == 1 ]]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi; }

echo "== writing $SECS s of page records into $DIR/crashed, then SIGKILL"
rm -rf "$DIR/crashed"
"$WALDEN" bench --embedded -D "$DIR/crashed" -j 2 -T $((SECS + 60)) --pages "$PAGES" --size "$SIZE" \
    --level off "${BENCH_SETTINGS[@]}" >"$LOGS/bench.out" 2>&1 &
BENCH=$!
sleep "$SECS"
kill -9 "$BENCH"; wait "$BENCH" 2>/dev/null || true
WAL_BYTES=$(du -sb "$DIR/crashed/wal" | cut -f1)
echo "WAL directory: $((WAL_BYTES / 1000000)) MB"

fio_read() {
    drop_caches
    fio --name=walread --rw=read --bs=1M --direct=0 --ioengine=psync --opendir="$DIR/run/wal" \
        --output-format=json --output="$LOGS/fio.json" >/dev/null 2>&1
    python3 -c "import json;j=json.load(open('$LOGS/fio.json'));r=j['jobs'][0]['read'];print(r['bw_bytes']/1e6, r['io_bytes'])"
}

walden_recover() {
    drop_caches
    rm -f "$DIR/run/data/walden.addr"
    local t0 t1
    t0=$(date +%s.%N)
    WALDEN_LOG=info "$WALDEN" serve -D "$DIR/run" "${SETTINGS[@]}" 2>"$LOGS/serve.log" &
    local pid=$!
    while [[ ! -s $DIR/run/data/walden.addr ]]; do
        kill -0 "$pid" 2>/dev/null || { cat "$LOGS/serve.log"; die "walden serve exited"; }
        sleep 0.01
    done
    t1=$(date +%s.%N)
    kill -TERM "$pid"; wait "$pid" || true
    echo "$t0 $t1"
}

printf "%-4s %12s %14s %12s %12s %12s %10s\n" run "fio MB/s" "walden MB/s" "scan s" "redo s" "total s" ratio
for ((r = 1; r <= REPEAT; r++)); do
    rm -rf "$DIR/run"; cp -a "$DIR/crashed" "$DIR/run"
    read -r FIO_MBS FIO_BYTES < <(fio_read)
    rm -rf "$DIR/run"; cp -a "$DIR/crashed" "$DIR/run"
    read -r T0 T1 < <(walden_recover)
    TOTAL=$(echo "$T1 - $T0" | bc -l)
    SCAN=$(grep -o 'checked in [0-9.]* s' "$LOGS/serve.log" | head -1 | awk '{print $3}')
    REDO_LINE=$(grep 'redo done at' "$LOGS/serve.log" | head -1)
    REDO_MB=$(echo "$REDO_LINE" | grep -o ', [0-9.]* MB in' | awk '{print $2}')
    REDO_S=$(echo "$REDO_LINE" | grep -o 'MB in [0-9.]* s' | awk '{print $3}')
    # WAL replayed per second of the whole recovery (scan, redo, checkpoint, start).
    W_MBS=$(echo "$REDO_MB / $TOTAL" | bc -l)
    printf "%-4s %12.1f %14.1f %12s %12s %12.3f %10.2f\n" "$r" "$FIO_MBS" "$W_MBS" "${SCAN:-?}" "${REDO_S:-?}" "$TOTAL" \
        "$(echo "$W_MBS / $FIO_MBS" | bc -l)"
    [[ $r == 1 ]] && { grep -E 'redo starts|redo done|end of WAL|checkpoint complete' "$LOGS/serve.log" | sed 's/^/    /'; }
done
echo "(redo alone: MB in the 'redo done' line / its seconds; ratio = walden MB/s over the whole recovery / fio MB/s)"
