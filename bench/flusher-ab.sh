#!/usr/bin/env bash
# The pipelined io_uring flusher against the plain pwrite+fdatasync flusher,
# alternating A B A B on one directory (see "How to read these" in docs/benchmarks.md), at
# several client counts; prints the medians and the ratio.
#
#   bench/flusher-ab.sh [DIR]     env: SECS (5), REPEAT (3), CLIENTS ("1 64"),
#                                 SIZE (100), LEVEL (local), WALDEN (binary), EXTRA (bench args)
set -euo pipefail
export LC_ALL=C
SECS=${SECS:-5}; REPEAT=${REPEAT:-3}; CLIENTS=${CLIENTS:-"1 64"}
SIZE=${SIZE:-100}; LEVEL=${LEVEL:-local}; EXTRA=${EXTRA:-}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WALDEN=${WALDEN:-$REPO/target/release/walden}
[[ -x $WALDEN ]] || (cd "$REPO" && cargo build --release)
if [[ $# -ge 1 ]]; then DIR=$1; mkdir -p "$DIR"; else DIR=$(mktemp -d -p . walden-ab-XXXX); trap 'rm -rf "$DIR"' EXIT; fi

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
field() { awk -F': ' -v k="$1" '$1==k {sub(/ ms$/,"",$2); print $2}'; }

echo "walden flusher A/B: $(nproc) cores, $(uname -r), $(stat -f -c %T "$DIR"), ${SECS}s x ${REPEAT}, ${SIZE} B, level $LEVEL $EXTRA"
printf '%-8s %-8s %12s %10s %10s %12s\n' clients flusher rec/s p50_ms p99_ms flush_ms
for c in $CLIENTS; do
    declare -A rate=() p50=() p99=() fl=()
    for ((i = 0; i < REPEAT; i++)); do
        for f in uring pwrite; do
            rm -rf "$DIR/w"
            out=$(WALDEN_LOG=warn "$WALDEN" bench --embedded -D "$DIR/w" -j "$c" -T "$SECS" --size "$SIZE" --level "$LEVEL" --flusher "$f" $EXTRA)
            rate[$f]+="$(field 'rec/s' <<<"$out") "
            p50[$f]+="$(field 'latency p50' <<<"$out") "
            p99[$f]+="$(field 'latency p99' <<<"$out") "
            fl[$f]+="$(field 'flush time avg' <<<"$out") "
        done
    done
    for f in uring pwrite; do
        printf '%-8s %-8s %12s %10s %10s %12s\n' "$c" "$f" \
            "$(tr ' ' '\n' <<<"${rate[$f]}" | grep . | median)" "$(tr ' ' '\n' <<<"${p50[$f]}" | grep . | median)" \
            "$(tr ' ' '\n' <<<"${p99[$f]}" | grep . | median)" "$(tr ' ' '\n' <<<"${fl[$f]}" | grep . | median)"
    done
    u=$(tr ' ' '\n' <<<"${rate[uring]}" | grep . | median); p=$(tr ' ' '\n' <<<"${rate[pwrite]}" | grep . | median)
    echo "  clients $c: uring / pwrite throughput = $(awk -v u="$u" -v p="$p" 'BEGIN {printf "%.2f", u/p}')"
    unset rate p50 p99 fl
done
rm -rf "$DIR/w"
