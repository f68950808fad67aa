#!/usr/bin/env bash
# What one request and its answer over loopback TCP cost on this machine,
# with no disk: Redis PING (a single-threaded epoll server, about as lean as
# request/response gets) against walden's server at --level off (acked once
# in the WAL buffer, no wait for the disk) and --level local, in one run, at
# the same client counts. It bounds what any server can do here with one
# request in flight per connection: the throughput targets of issue 3 are
# judged against it (see docs/benchmarks.md).
#
#   bench/loopback-ceiling.sh [PARENT]
#
#   PARENT  where the throwaway directory goes (default .): walden's data
#           directory and the logs; removed at exit.
#   env:    CLIENTS ("1 16 64")  client counts
#           SECS (10)            seconds per walden run; Redis runs for about
#                                as long (its request count is sized from a
#                                short probe, redis-benchmark has no -T)
#           REPEAT (1)           rounds (Redis, walden off, walden local); medians shown
#           THREADS (2)          --threads / -j of both load generators (capped at C)
#           WALDEN               walden binary (default REPO/target/release/walden)
#
# Commands, per client count C and round (J = min(THREADS, C)):
#   redis-server --port P --save '' --appendonly no   (once, background)
#   redis-benchmark -p P -c C --threads J -n N -t ping_mbulk --csv
#   walden serve -D DIR -c listen_addr=127.0.0.1:0 -c metrics_addr=   (once, background)
#   walden bench -h 127.0.0.1 -p PORT -c C -j J -T SECS --size 100 --level off|local
# Nothing is pinned; all share the machine's cores.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CLIENTS=${CLIENTS:-"1 16 64"}
SECS=${SECS:-10}
REPEAT=${REPEAT:-1}
THREADS=${THREADS:-2}
PARENT=${1:-.}

die() { echo "loopback-ceiling: $*" >&2; exit 1; }
note() { echo "loopback-ceiling: $*" >&2; }

[[ $SECS =~ ^[1-9][0-9]*$ ]] || die "SECS must be a whole number >= 1, got '$SECS'"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a whole number >= 1, got '$REPEAT'"
[[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "THREADS must be a whole number >= 1, got '$THREADS'"
for c in $CLIENTS; do [[ $c =~ ^[1-9][0-9]*$ ]] || die "CLIENTS must be whole numbers >= 1, got '$c'"; done
[[ -d $PARENT ]] || die "$PARENT is not a directory"

WALDEN=${WALDEN:-$REPO/target/release/walden}
[[ -x $WALDEN ]] || die "no walden binary at $WALDEN: build it with cargo build --release (in $REPO), or set WALDEN"

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
    [[ $(id -u) -eq 0 ]] || die "redis-server and redis-benchmark are missing; install them with: sudo apt-get install -y redis-server redis-tools"
    note "installing Redis (apt-get install redis-server redis-tools)..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi

TMP=$(mktemp -d "$PARENT/walden-ceiling-XXXX")
TMP=$(cd "$TMP" && pwd)
REDIS_PID=""
WALDEN_PID=""
cleanup() {
    [[ -n $WALDEN_PID ]] && kill -TERM "$WALDEN_PID" 2>/dev/null && wait "$WALDEN_PID" 2>/dev/null || true
    [[ -n $REDIS_PID ]] && kill -TERM "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP" \
    >"$TMP/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$RPORT" ping >/dev/null 2>&1 || { tail "$TMP/redis.log" >&2; die "redis-server did not start"; }

"$WALDEN" serve -D "$TMP/walden" -c listen_addr=127.0.0.1:0 -c metrics_addr= >"$TMP/walden.log" 2>&1 &
WALDEN_PID=$!
for _ in $(seq 100); do [[ -s $TMP/walden/data/walden.addr ]] && break; sleep 0.1; done
[[ -s $TMP/walden/data/walden.addr ]] || { tail "$TMP/walden.log" >&2; die "walden serve did not start"; }
WPORT=$(sed -n 's/^listen_addr=.*:\([0-9]*\)$/\1/p' "$TMP/walden/data/walden.addr")

# redis-benchmark PING at C clients for about SECS: "rps avg_ms"
redis_run() {
    local c=$1 j=$2 n out
    # a 20000-request probe sizes the run
    out=$(redis-benchmark -p "$RPORT" -c "$c" --threads "$j" -n 20000 -t ping_mbulk --csv | tail -n 1)
    n=$(echo "$out" | awk -F'"' -v s="$SECS" '{printf "%d", $4 * s}')
    [[ $n -ge 20000 ]] || n=20000
    redis-benchmark -p "$RPORT" -c "$c" --threads "$j" -n "$n" -t ping_mbulk --csv | tail -n 1 \
        | awk -F'"' '{printf "%s %s\n", $4, $6}'
}
# walden bench at C clients and LEVEL: "rec/s avg_ms"
walden_run() {
    local c=$1 j=$2 level=$3
    "$WALDEN" bench -h 127.0.0.1 -p "$WPORT" -c "$c" -j "$j" -T "$SECS" --size 100 --level "$level" 2>&1 \
        | awk '/^rec\/s:/{r=$2} /^latency avg:/{l=$3} END{printf "%s %s\n", r, l}'
}
median() { sort -g | awk '{a[NR]=$1} END{if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }

echo "redis: $(redis-server --version | cut -d' ' -f3)   walden: $WALDEN"
echo "rounds: $REPEAT per client count (Redis PING, walden off, walden local), ${SECS}s each, medians shown; nothing pinned"
printf '\n%7s | %12s %9s | %12s %9s %8s | %12s %9s %8s\n' clients "Redis rq/s" "ms" "walden off" "ms" "/Redis" "w local" "ms" "/Redis"
for c in $CLIENTS; do
    j=$(( THREADS < c ? THREADS : c ))
    rr=(); rl=(); or=(); ol=(); lr=(); ll=()
    for r in $(seq "$REPEAT"); do
        read -r a b < <(redis_run "$c" "$j"); rr+=("$a"); rl+=("$b")
        read -r a b < <(walden_run "$c" "$j" off); or+=("$a"); ol+=("$b")
        read -r a b < <(walden_run "$c" "$j" local); lr+=("$a"); ll+=("$b")
        note "clients $c round $r/$REPEAT: Redis ${rr[-1]} rq/s ${rl[-1]} ms | walden off ${or[-1]} rec/s ${ol[-1]} ms | local ${lr[-1]} rec/s ${ll[-1]} ms"
    done
    R=$(printf '%s\n' "${rr[@]}" | median); RL=$(printf '%s\n' "${rl[@]}" | median)
    O=$(printf '%s\n' "${or[@]}" | median); OL=$(printf '%s\n' "${ol[@]}" | median)
    L=$(printf '%s\n' "${lr[@]}" | median); LL=$(printf '%s\n' "${ll[@]}" | median)
    printf '%7s | %12.0f %9.3f | %12.0f %9.3f %7.2fx | %12.0f %9.3f %7.2fx\n' "$c" "$R" "$RL" "$O" "$OL" \
        "$(awk -v a="$O" -v b="$R" 'BEGIN{print a/b}')" "$L" "$LL" "$(awk -v a="$L" -v b="$R" 'BEGIN{print a/b}')"
done
