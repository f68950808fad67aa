#!/usr/bin/env bash
# Compare walden against fio on the same directory, same run (see
# "How to read these" in docs/benchmarks.md): bandwidth ceiling and single-writer commit latency.
#
#   bench/compare-fio.sh [DIR]      env: SECS (10), REPEAT (3), WALDEN (binary), PREFILL (1)
#
# DIR defaults to a fresh ./walden-fio-XXXX (removed at exit). Walden writes to
# DIR/walden, so both sides share one filesystem.
set -euo pipefail
export LC_ALL=C   # "." decimals for printf/sort/awk

SECS=${SECS:-10}
REPEAT=${REPEAT:-3}
# walden's "MB/s" is 10^6 bytes/s of payload (checked: it equals rec/s * size / 1e6);
# fio's figure is MiB/s, so walden's is converted. Override if walden changes unit.
WALDEN_MB_BYTES=${WALDEN_MB_BYTES:-1000000}
# PREFILL=1 (the default) writes the sync-test file out before timing, so fio
# overwrites written blocks as pg_test_fsync does and as walden does with its
# zero-filled segments: the like-for-like (and harder) reference. PREFILL=0
# times a fresh file, where on ext4 each fdatasync also commits the journal
# (~160 us vs ~70 us p50 measured here).
PREFILL=${PREFILL:-1}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "compare-fio: $*" >&2; exit 1; }

# --- 1. fio -------------------------------------------------------------------
if ! command -v fio >/dev/null; then
    if [[ $(id -u) -eq 0 ]]; then
        apt-get update -qq && apt-get install -y -qq fio
    else
        die "fio is missing; install it with: sudo apt-get update && sudo apt-get install -y fio"
    fi
fi
command -v python3 >/dev/null || die "python3 is needed to parse fio's json"

# --- 2. walden ----------------------------------------------------------------
if [[ -n ${WALDEN:-} ]]; then
    [[ -x $WALDEN ]] || die "WALDEN=$WALDEN is not an executable file"
else
    WALDEN=$REPO/target/release/walden
    if [[ ! -x $WALDEN ]]; then
        echo "building walden (cargo build --release in $REPO)..." >&2
        (cd "$REPO" && cargo build --release)
    fi
    [[ -x $WALDEN ]] || die "no binary at $WALDEN after cargo build"
fi

# --- working directory ----------------------------------------------------------
if [[ $# -ge 1 ]]; then
    DIR=$1; CREATED=0
    mkdir -p "$DIR"
else
    DIR=$(mktemp -d -p . walden-fio-XXXX); CREATED=1
fi
DIR=$(cd "$DIR" && pwd)
FIOFILE=$DIR/fio.dat
WDIR=$DIR/walden
LOGS=$(mktemp -d)   # fio json / walden output, kept off DIR so they cost no disk I/O there
cleanup() {
    rm -rf "$LOGS"
    if [[ $CREATED -eq 1 ]]; then rm -rf "$DIR"; else rm -rf "$WDIR" "$FIOFILE"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the four commands ------------------------------------------------------------
FIO_SEQ=(fio --name=seqwrite --filename="$FIOFILE" --rw=write --bs=1M --direct=1
         --ioengine=psync --size=1G --runtime="$SECS" --time_based --output-format=json)
FIO_SYNC=(fio --name=syncwrite --filename="$FIOFILE" --rw=write --bs=8k --ioengine=sync
          --fdatasync=1 --size=256M --runtime="$SECS" --time_based --output-format=json)
FIO_FILL=(fio --name=prefill --filename="$FIOFILE" --rw=write --bs=1M --size=256M --end_fsync=1)
W_SEQ=("$WALDEN" bench --embedded -D "$WDIR" -j 1 -T "$SECS" --size 65536 --level off)
W_SYNC=("$WALDEN" bench --embedded -D "$WDIR" -j 1 -T "$SECS" --size 100 --level local)

# run_fio NAME CMD... : runs fio on a fresh file (same starting state every repeat)
run_fio() {
    local out=$LOGS/$1.json; shift
    rm -f "$FIOFILE"
    if [[ $PREFILL == 1 && $out == */sync* ]]; then
        "${FIO_FILL[@]}" >/dev/null 2>&1 || die "fio prefill failed: ${FIO_FILL[*]}"
    fi
    "$@" >"$out" 2>"$out.err" || { cat "$out.err" >&2; die "fio failed: $*"; }
    echo "$out"
}
# fio_get JSON PYEXPR : evaluates PYEXPR with j = jobs[0]
fio_get() {
    python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(eval(sys.argv[2]))' "$1" "$2" \
        || die "could not read '$2' from $1"
}
# run_walden NAME CMD... : runs walden bench on a fresh DIR/walden
run_walden() {
    local out=$LOGS/$1.txt; shift
    rm -rf "$WDIR"
    "$@" >"$out" 2>&1 || { tail -20 "$out" >&2; die "walden failed: $*"; }
    rm -rf "$WDIR"
    echo "$out"
}
# walden_get FILE KEY : the value of "KEY: value [unit]", latencies converted to ms
walden_get() {
    local v
    v=$(awk -v k="$2" 'index($0, k ": ") == 1 { v = substr($0, length(k) + 3) } END { print v }' "$1")
    v=$(awk -v s="$v" 'BEGIN {
        n = split(s, a, " "); x = a[1]; u = (n > 1) ? a[2] : ""
        if (x !~ /^[0-9.eE+-]+$/) exit 1
        if (u == "us" || u == "µs") x /= 1000; else if (u == "s") x *= 1000; else if (u == "ns") x /= 1e6
        print x }') || v=
    [[ -n $v ]] || { grep -v '^progress:' "$1" | tail -20 >&2; die "no '$2' figure in walden output (last lines above)"; }
    echo "$v"
}
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# The disk is shared: a concurrent build or bulk writer inflates fdatasync
# latency by 10-30x (fsync waits for the ext4 journal commit). Warn, don't stop.
io_some=$(awk '/^some/ { sub("avg10=", "", $2); print $2 }' /proc/pressure/io 2>/dev/null || echo 0)
if awk -v p="${io_some:-0}" 'BEGIN { exit !(p > 2) }'; then
    echo "WARNING: I/O pressure avg10=${io_some}% -- something else is writing; latency figures will be inflated" >&2
fi

declare -a A1 B1 A2_IOPS A2_P50 B2_IOPS B2_P50
# Latency pairs first, bulk pairs after: docs/benchmarks.md shows sync latency
# inflates for a while after bulk writes. Within each phase, sides alternate A B A B.
for r in $(seq "$REPEAT"); do
    f=$(run_fio "sync$r" "${FIO_SYNC[@]}")
    # fio (sync engine, fdatasync=1) times the write() as write.clat and the
    # fdatasync() separately as sync.lat; a commit is both, so commit p50 is
    # taken as write clat p50 + sync lat p50 (close to, not exactly, the p50 of
    # the sum; the write part is ~5 us here, the fdatasync ~160 us).
    A2_IOPS+=("$(fio_get "$f" 'j["write"]["iops"]')")
    A2_P50+=("$(fio_get "$f" '(j["write"]["clat_ns"]["percentile"]["50.000000"] + j["sync"]["lat_ns"]["percentile"]["50.000000"]) / 1e6')")
    w=$(run_walden "wsync$r" "${W_SYNC[@]}")
    B2_IOPS+=("$(walden_get "$w" 'rec/s')")
    B2_P50+=("$(walden_get "$w" 'latency p50')")
    printf 'pair %d/%d commit p50: fio %.3f ms (%.0f/s)  walden %.3f ms (%.0f/s)\n' \
        "$r" "$REPEAT" "${A2_P50[-1]}" "${A2_IOPS[-1]}" "${B2_P50[-1]}" "${B2_IOPS[-1]}" >&2
done
for r in $(seq "$REPEAT"); do
    f=$(run_fio "seq$r" "${FIO_SEQ[@]}")
    A1+=("$(fio_get "$f" 'j["write"]["bw_bytes"] / 1048576')")
    w=$(run_walden "wseq$r" "${W_SEQ[@]}")
    B1+=("$(awk -v x="$(walden_get "$w" 'MB/s')" -v b="$WALDEN_MB_BYTES" 'BEGIN { print x * b / 1048576 }')")
    printf 'pair %d/%d seq write: fio %.1f MiB/s  walden %.1f MiB/s\n' "$r" "$REPEAT" "${A1[-1]}" "${B1[-1]}" >&2
done
rm -f "$FIOFILE"

# --- report ---------------------------------------------------------------------
q() { printf '%q ' "$@"; echo; }
echo
echo "host: nproc=$(nproc) kernel=$(uname -r) fs=$(findmnt -no FSTYPE -T "$DIR" 2>/dev/null || stat -f -c %T "$DIR") ($(findmnt -no SOURCE -T "$DIR" 2>/dev/null || echo '?'))"
echo "dir: $DIR   $(fio --version)   walden: $WALDEN"
echo "runs: $REPEAT pairs per figure, ${SECS}s each, medians shown; fio and walden each had all $(nproc) cores, one at a time"
echo "commands:"
if [[ $PREFILL == 1 ]]; then echo "  (before each A2, untimed: $(q "${FIO_FILL[@]}"))"; fi
echo "  A2  $(q "${FIO_SYNC[@]}")"
echo "  B2  $(q "${W_SYNC[@]}")"
echo "  A1  $(q "${FIO_SEQ[@]}")"
echo "  B1  $(q "${W_SEQ[@]}")"
echo
# row LABEL FIO WALDEN FMT CMP TARGET : CMP is ">=" or "<=" or "-" (no target)
row() {
    awk -v l="$1" -v a="$2" -v b="$3" -v f="$4" -v c="$5" -v t="$6" 'BEGIN {
        r = (a > 0) ? b / a : 0
        ok = (c == ">=") ? (r >= t ? "ok" : "MISS") : (c == "<=") ? (r <= t ? "ok" : "MISS") : ""
        tg = (c == "-") ? "-" : sprintf("%s %.2f", c, t)
        printf "%-30s %-12" f " %-12" f " %-7.2f %-9s %s\n", l, a, b, r, tg, ok }'
}
printf '%-30s %-12s %-12s %-7s %-9s %s\n' figure fio walden ratio target ""
row "seq write 1 MiB (MiB/s)" "$(median "${A1[@]}")" "$(median "${B1[@]}")" .1f ">=" 0.90
row "commit p50, 1 thread (ms)" "$(median "${A2_P50[@]}")" "$(median "${B2_P50[@]}")" .3f "<=" 1.10
row "commits/s, 1 thread" "$(median "${A2_IOPS[@]}")" "$(median "${B2_IOPS[@]}")" .0f - 0
