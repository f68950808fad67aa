#!/usr/bin/env bash
# PostgreSQL's pg_test_fsync against `walden test-fsync`: the same directory,
# the same -s, back to back (pg then walden, REPEAT times: A B A B ...), and
# the sections they share side by side with the ratio (see
# "How to read these" in docs/benchmarks.md: ratios taken in one run hold, absolute
# numbers move).
#
#   bench/compare-pg-test-fsync.sh [-s SECS] [DIR]
#
#   -s SECS   seconds per test, a whole number as pg_test_fsync takes (default 5)
#   DIR       where both test files go (default: a fresh ./compare-pg-test-fsync-XXXX,
#             removed at exit); put it on the device you want to measure
#   env:  REPEAT (1)          runs of each tool; medians are shown
#         WALDEN              walden binary (default target/release/walden, built if missing)
#         PG_TEST_FSYNC       pg_test_fsync binary (default: on PATH or under
#                             /usr/lib/postgresql/*/bin; as root, Debian's `postgresql`
#                             package is installed if it is missing)
#         WALDEN_ARGS         extra walden arguments (default --pg-offsets: write the offsets
#                             pg_test_fsync writes; set it empty to let walden cycle through
#                             its file as a WAL segment is written)
set -euo pipefail
export LC_ALL=C

SECS=5
while getopts ":s:h" opt; do
    case $opt in
        s) SECS=$OPTARG ;;
        h) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "usage: $0 [-s SECS] [DIR]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
REPEAT=${REPEAT:-1}
WALDEN_ARGS=${WALDEN_ARGS---pg-offsets}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "compare-pg-test-fsync: $*" >&2; exit 1; }

[[ $SECS =~ ^[1-9][0-9]*$ ]] || die "-s must be a whole number of seconds >= 1 (pg_test_fsync takes no fractions), got '$SECS'"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a whole number >= 1, got '$REPEAT'"
command -v python3 >/dev/null || die "python3 is needed to lay the two reports side by side"

# --- 1. pg_test_fsync -------------------------------------------------------------
find_pg() {
    if [[ -n ${PG_TEST_FSYNC:-} ]]; then echo "$PG_TEST_FSYNC"; return; fi
    if command -v pg_test_fsync >/dev/null; then command -v pg_test_fsync; return; fi
    local found
    found=$(ls -1 /usr/lib/postgresql/*/bin/pg_test_fsync 2>/dev/null | sort -V | tail -n 1 || true)
    [[ -n $found ]] && echo "$found"
    return 0
}
PG=$(find_pg)
if [[ -z $PG ]]; then
    if [[ $(id -u) -eq 0 ]]; then
        echo "installing PostgreSQL for pg_test_fsync (apt-get install postgresql)..." >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        PG=$(find_pg)
    else
        die "pg_test_fsync is missing; install it with: sudo apt-get update && sudo apt-get install -y postgresql"
    fi
fi
[[ -n $PG && -x $PG ]] || die "no pg_test_fsync binary found (looked on PATH and in /usr/lib/postgresql/*/bin)"

# --- 2. walden --------------------------------------------------------------------
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

# --- working directory --------------------------------------------------------------
if [[ $# -ge 1 ]]; then
    DIR=$1; CREATED=0
    [[ -d $DIR ]] || die "directory '$DIR' does not exist"
else
    DIR=$(mktemp -d -p . compare-pg-test-fsync-XXXX); CREATED=1
fi
DIR=$(cd "$DIR" && pwd)
PGFILE=$DIR/pg_test_fsync.out
WFILE=$DIR/walden_test_fsync.out
[[ -e $PGFILE || -e $WFILE ]] && die "$PGFILE or $WFILE already exists (left by an interrupted run?): remove it first"
LOGS=$(mktemp -d)
cleanup() {
    rm -rf "$LOGS"
    rm -f "$PGFILE" "$WFILE"
    if [[ $CREATED -eq 1 ]]; then rmdir "$DIR" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "pg_test_fsync: $("$PG" --version) ($PG)"
echo "walden:        $WALDEN test-fsync $WALDEN_ARGS"
FSTYPE=$(findmnt -no FSTYPE -T "$DIR" 2>/dev/null || stat -f -c %T "$DIR")
echo "machine:       $(nproc) cores, kernel $(uname -r), $DIR on $FSTYPE"
echo "runs:          $REPEAT of each, alternating, -s $SECS (about $((REPEAT * SECS * 52)) s in all)"
echo

for ((r = 1; r <= REPEAT; r++)); do
    echo "run $r/$REPEAT: pg_test_fsync..." >&2
    "$PG" -s "$SECS" -f "$PGFILE" >"$LOGS/pg.$r.txt" || die "pg_test_fsync failed (output in $LOGS/pg.$r.txt)"
    echo "run $r/$REPEAT: walden test-fsync..." >&2
    # shellcheck disable=SC2086 # WALDEN_ARGS is a list of words
    "$WALDEN" test-fsync -s "$SECS" -f "$WFILE" $WALDEN_ARGS >"$LOGS/walden.$r.txt" \
        || die "walden test-fsync failed (output in $LOGS/walden.$r.txt)"
done

python3 - "$LOGS" "$REPEAT" <<'PY'
import re, statistics, sys

logs, repeat = sys.argv[1], int(sys.argv[2])

def parse(path):
    """{(section title, label): (ops/sec or None, p50 us or None)}, in file order."""
    out, section = {}, None
    for line in open(path):
        line = line.rstrip("\n")
        if line and not line[0].isspace() and line.endswith(":"):
            section = line
        elif line.startswith("        ") and section:
            label, rest = line[8:38].rstrip(), line[38:]
            m = re.search(r"([\d.]+) ops/sec", rest)
            p50 = re.search(r"p50 ([\d.]+) us", rest)
            out[(section, label)] = (float(m.group(1)) if m else None,
                                     float(p50.group(1)) if p50 else None)
    return out

pg = [parse(f"{logs}/pg.{r}.txt") for r in range(1, repeat + 1)]
wd = [parse(f"{logs}/walden.{r}.txt") for r in range(1, repeat + 1)]

def median(runs, key, i):
    vals = [run[key][i] for run in runs if key in run and run[key][i] is not None]
    return statistics.median(vals) if vals else None

def fmt(v, f, width):
    return f"{'n/a':>{width}}" if v is None else f.format(v)

def fmt_us(v):
    return "n/a" if v is None else (f"{v:.1f} us" if v < 10 else f"{v:.0f} us")

print(f"{'':38}{'pg_test_fsync':>16}{'walden':>16}{'walden/pg':>11}{'walden p50':>12}")
print(f"{'':38}{'ops/sec':>16}{'ops/sec':>16}")
section = None
ratios = []
for key in pg[0]:
    if key[0] != section:
        section = key[0]
        print(section)
    p, w, p50 = median(pg, key, 0), median(wd, key, 0), median(wd, key, 1)
    ratio = w / p if p and w else None
    if ratio is not None:
        ratios.append((key, ratio))
    print(f"        {key[1]:<30}{fmt(p, '{:16.3f}', 16)}{fmt(w, '{:16.3f}', 16)}"
          f"{fmt(ratio, '{:11.2f}', 11)}{fmt_us(p50):>12}")
missing = [k for k in pg[0] if not any(k in run for run in wd)]
if missing:
    print("\nlines of pg_test_fsync that walden did not print:", ", ".join(f"{s} {l}" for s, l in missing))
sync = [r for (s, l), r in ratios if not s.startswith("Non-sync")]
if sync:
    print(f"\nsynced lines: walden/pg ratio median {statistics.median(sync):.2f}, "
          f"range {min(sync):.2f}..{max(sync):.2f} ({len(sync)} lines)")
print("\nwalden's own sections and recommendation (last run):")
text = open(f"{logs}/walden.{repeat}.txt").read()
start = text.find("\nCompare sync methods with plain writes")
print(text[start + 1:] if start >= 0 else "(none found)", end="")
PY
