#!/usr/bin/env bash
# Synchronous replication, walden against PostgreSQL, in one run on one
# filesystem (issue 14; see "How to read these" in docs/benchmarks.md):
# 100-byte durable appends on a primary with two standbys on this host and
# synchronous_standby_names = 'ANY 1 (s1, s2)', at each commit level.
#
#   bench/compare-replication.sh [PARENT]
#
#   PARENT  where the throwaway directory goes (default .): a fresh
#           PARENT/walden-repl-XXXX holds the three PostgreSQL clusters
#           (pg/, pg-s1/, pg-s2/), their sockets (sock*/), walden's three
#           data directories (walden/, walden-s1/, walden-s2/) and the logs,
#           so everything writes to one filesystem; it is removed at exit.
#   env:    CLIENTS ("1 64")     client counts
#           SECS (10)            seconds per run
#           REPEAT (1)           rounds; each round runs every client count and
#                                level (and the probes) once, so the levels
#                                alternate; medians over the rounds are shown
#           LEVELS ("local remote_write on remote_apply")
#                                walden levels (walden bench --level)
#           PG_LEVELS            PostgreSQL synchronous_commit values (default:
#                                LEVELS without remote_apply, i.e. local
#                                remote_write on, as the issue asks)
#           THREADS (2)          -j for both load generators (capped at the client count)
#           WALDEN               walden binary (default REPO/target/release/walden);
#                                it needs streaming replication and a standby
#                                page store (`walden status --help` lists --replication)
#           PG_BINDIR            PostgreSQL bin dir (default: the newest
#                                /usr/lib/postgresql/*/bin, else initdb's dir on PATH)
#           PG_USER              as root: the OS user that runs initdb/postgres/
#                                pg_basebackup (default postgres, else a system
#                                user walden-bench created with useradd -r)
#           PG_CONN (unix)       how pgbench connects: unix or tcp (127.0.0.1);
#                                the standbys always stream over 127.0.0.1 TCP,
#                                as walden's do
#           PG_LOG (1)           1: pgbench --log, for PostgreSQL's p50/p99
#                                (0: averages only)
#           FSYNC_SECS (0.2)     walden test-fsync -s for the standby fsync time
#                                (0: skip it, and the RTT probe with it)
#           SETTLE_SECS (60)     how long to wait, before each run, for both
#                                standbys to replay everything (a run at
#                                `local` leaves them behind)
#           KEEP (0)             1: keep the throwaway directory and logs
#
# What runs:
#   PostgreSQL: initdb -U bench -A trust; primary with wal_level=logical,
#     max_wal_senders=10, synchronous_standby_names='ANY 1 (s1, s2)',
#     synchronous_commit=on, fsync=on, shared_buffers=1GB, max_connections=200;
#     two standbys made with pg_basebackup -R -X stream, each with its own
#     port and socket directory and primary_conninfo='host=127.0.0.1 port=P
#     user=bench application_name=sN'; the script waits until
#     pg_stat_replication shows s1 and s2 streaming with sync_state quorum.
#   walden: walden serve -D walden -c listen_addr=127.0.0.1:0 -c metrics_addr=
#       -c "synchronous_standby_names=ANY 1 (s1, s2)"
#     and two standbys on empty directories:
#     walden serve -D walden-sN -c listen_addr=127.0.0.1:0 -c metrics_addr=
#       -c "primary_conninfo=host=127.0.0.1 port=P application_name=sN"
#     then waits until `walden status --replication --json` shows both streaming.
#   All six servers stay up for the whole run (the other side's idle).
#   Probes, at the start of each round (with FSYNC_SECS > 0):
#     RTT    walden bench -h H -p P -c 1 -j 1 -T 3 --size 100 --level off: p50 of
#            a request and its ack over loopback TCP, no disk in the path
#     fsync  walden test-fsync -s FSYNC_SECS --json -f walden-s1/tf.out: p50 of
#            one 8kB write made durable with the standby's wal_sync_method
#   Then per round, client count C and level L (J = min(THREADS, C)), both
#   sides back to back, each after the standbys have caught up:
#     A  PGOPTIONS='-c synchronous_commit=L' pgbench -n -M prepared -j J -c C
#          -T SECS -f emit.sql [--log]
#          emit.sql: SELECT pg_logical_emit_message(true, 'p', repeat('x', 100));
#     B  walden bench -h H -p P -c C -j J -T SECS --size 100 --level L
# Nothing is pinned: servers, standbys and load generators share all cores.
#
# Root: as in compare-postgres.sh, initdb refuses root, so the clusters are
# created and run as PG_USER through runuser; pgbench runs as the caller and
# logs in as "bench" (trust auth, socket in the throwaway dir and 127.0.0.1).
set -euo pipefail
export LC_ALL=C

CLIENTS=${CLIENTS:-"1 64"}
SECS=${SECS:-10}
REPEAT=${REPEAT:-1}
LEVELS=${LEVELS:-"local remote_write on remote_apply"}
if [[ -z ${PG_LEVELS+x} ]]; then
    PG_LEVELS=
    for l in $LEVELS; do [[ $l == remote_apply ]] || PG_LEVELS+="$l "; done
    PG_LEVELS=${PG_LEVELS% }
fi
THREADS=${THREADS:-2}
PG_CONN=${PG_CONN:-unix}
PG_LOG=${PG_LOG:-1}
FSYNC_SECS=${FSYNC_SECS:-0.2}
SETTLE_SECS=${SETTLE_SECS:-60}
KEEP=${KEEP:-0}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PARENT=${1:-.}

die() { echo "compare-replication: $*" >&2; exit 1; }
note() { echo "compare-replication: $*" >&2; }

[[ $SECS =~ ^[1-9][0-9]*$ ]] || die "SECS must be a whole number >= 1, got '$SECS'"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a whole number >= 1, got '$REPEAT'"
[[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "THREADS must be a whole number >= 1, got '$THREADS'"
[[ $SETTLE_SECS =~ ^[1-9][0-9]*$ ]] || die "SETTLE_SECS must be a whole number >= 1, got '$SETTLE_SECS'"
[[ $FSYNC_SECS =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "FSYNC_SECS must be a number, got '$FSYNC_SECS'"
for c in $CLIENTS; do [[ $c =~ ^[1-9][0-9]*$ ]] || die "CLIENTS must be whole numbers >= 1, got '$c'"; done
[[ -n ${CLIENTS// /} ]] || die "CLIENTS is empty"
[[ -n ${LEVELS// /} ]] || die "LEVELS is empty"
for l in $LEVELS; do
    [[ $l =~ ^(off|local|remote_write|on|remote_apply)$ ]] || die "LEVELS: unknown level '$l'"
done
for l in $PG_LEVELS; do
    [[ $l =~ ^(off|local|remote_write|on|remote_apply)$ ]] || die "PG_LEVELS: unknown level '$l'"
done
[[ $PG_CONN == unix || $PG_CONN == tcp ]] || die "PG_CONN must be unix or tcp, got '$PG_CONN'"
[[ -d $PARENT ]] || die "$PARENT is not a directory"
command -v python3 >/dev/null || die "python3 is needed to read walden's JSON status"
IS_ROOT=0; [[ $(id -u) -eq 0 ]] && IS_ROOT=1

# --- 1. walden ------------------------------------------------------------------
WALDEN=${WALDEN:-$REPO/target/release/walden}
[[ -x $WALDEN ]] || die "no walden binary at $WALDEN: build it with cargo build --release (in $REPO), or set WALDEN"
"$WALDEN" status --help 2>&1 | grep -q -- '--replication' \
    || die "$WALDEN has no replication (\`walden status --help\` lists no --replication): set WALDEN to a build with issue 14"

# --- 2. PostgreSQL --------------------------------------------------------------
find_pg_bindir() {
    if [[ -n ${PG_BINDIR:-} ]]; then echo "$PG_BINDIR"; return; fi
    local d
    d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $d && -x $d/initdb ]]; then echo "$d"; return; fi
    if command -v initdb >/dev/null; then dirname "$(readlink -f "$(command -v initdb)")"; fi
    return 0
}
PGBIN=$(find_pg_bindir)
[[ -n $PGBIN ]] || die "PostgreSQL is missing: install it (apt-get install postgresql) or set PG_BINDIR"
for b in initdb pg_ctl pgbench psql postgres pg_basebackup; do
    [[ -x $PGBIN/$b ]] || die "no $b in $PGBIN (set PG_BINDIR)"
done
PG_VERSION=$("$PGBIN/postgres" --version)

AS=()
if [[ $IS_ROOT -eq 1 ]]; then
    command -v runuser >/dev/null || die "runuser (util-linux) is needed to run initdb as a non-root user"
    if [[ -n ${PG_USER:-} ]]; then
        id -u "$PG_USER" >/dev/null 2>&1 || die "PG_USER=$PG_USER does not exist"
    elif id -u postgres >/dev/null 2>&1; then
        PG_USER=postgres
    else
        PG_USER=walden-bench
        if ! id -u "$PG_USER" >/dev/null 2>&1; then
            note "creating system user $PG_USER (useradd -r) to run initdb/postgres"
            useradd -r -M -d /nonexistent -s /usr/sbin/nologin "$PG_USER"
        fi
    fi
    [[ $(id -u "$PG_USER") -ne 0 ]] || die "PG_USER must not be root"
    AS=(runuser -u "$PG_USER" --)
else
    PG_USER=$(id -un)
fi

# --- 3. the throwaway directory, cleanup -----------------------------------------
TOP=$(mktemp -d -p "$PARENT" walden-repl-XXXX)
TOP=$(cd "$TOP" && pwd)
LOGS=$TOP/logs
PGNODES=(pg pg-s1 pg-s2)            # primary first
declare -A PGDIR SOCKDIR PGPORTS PG_UP
declare -A WPIDS WPORT
EXTRA_RM=()
stop_walden() {   # stop_walden NODE
    local pid=${WPIDS[$1]:-}
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && { note "walden $1 did not stop in 30 s: SIGKILL"; kill -KILL "$pid"; }
    fi
    wait "$pid" 2>/dev/null
    WPIDS[$1]=
}
stop_pg() {       # stop_pg NODE
    local d=${PGDIR[$1]:-}
    [[ ${PG_UP[$1]:-0} -eq 1 && -f $d/postmaster.pid ]] || return 0
    "${AS[@]}" "$PGBIN/pg_ctl" stop -D "$d" -m fast -w -t 60 >/dev/null 2>&1 \
        || { note "pg_ctl stop $1 failed; sending SIGQUIT to its postmaster"
             kill -QUIT "$(head -1 "$d/postmaster.pid")" 2>/dev/null; sleep 1; }
    PG_UP[$1]=0
}
cleanup() {
    local rc=$?
    set +e
    # standbys first: then neither primary waits for a standby to confirm its shutdown
    stop_walden walden-s1; stop_walden walden-s2; stop_walden walden
    stop_pg pg-s1; stop_pg pg-s2; stop_pg pg
    if [[ $KEEP == 1 ]]; then
        note "kept $TOP (KEEP=1)"
    else
        rm -rf "$TOP"
    fi
    for d in "${EXTRA_RM[@]}"; do rm -rf "$d"; done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$LOGS"
if [[ $IS_ROOT -eq 1 ]]; then chmod 0755 "$TOP"; fi
for n in "${PGNODES[@]}"; do
    PGDIR[$n]=$TOP/$n
    s=$TOP/sock${n#pg}
    # a unix socket path is limited to 107 bytes
    if (( ${#s} + 18 > 107 )); then
        s=$(mktemp -d /tmp/wrepl-XXXX); EXTRA_RM+=("$s"); chmod 0755 "$s"
    fi
    SOCKDIR[$n]=$s
    mkdir -p "$s"
    if [[ $IS_ROOT -eq 1 ]]; then chown "$PG_USER": "$s"; fi
done
mkdir -p "${PGDIR[pg]}"
if [[ $IS_ROOT -eq 1 ]]; then
    chown "$PG_USER": "${PGDIR[pg]}"
    "${AS[@]}" test -w "${PGDIR[pg]}" \
        || die "$PG_USER cannot write ${PGDIR[pg]}: a parent of $TOP is not traversable by $PG_USER; give another PARENT (same filesystem) or PG_USER"
    # pg_basebackup (run as PG_USER) creates the standby directories in $TOP
    chown "$PG_USER": "$TOP"
fi
chmod 0700 "${PGDIR[pg]}"

# --- 4. PostgreSQL: primary and two standbys ----------------------------------------
port_free() { ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
pick_port() {
    local p
    for _ in $(seq 50); do
        p=$((5433 + RANDOM % 2000))
        port_free "$p" || continue
        for q in "${PGPORTS[@]}"; do [[ $q == "$p" ]] && continue 2; done
        echo "$p"; return 0
    done
    return 1
}
start_pg() {      # start_pg NODE : picks a port, starts it, sets PGPORTS[NODE]
    local n=$1 d=${PGDIR[$1]} p
    for _ in $(seq 10); do
        p=$(pick_port) || die "no free port for PostgreSQL in 5433-7432"
        sed -i '/^port = /d' "$d/postgresql.conf"
        echo "port = $p" >>"$d/postgresql.conf"
        rm -f "$d/server.log"
        PG_UP[$n]=1   # from here on the EXIT trap stops it if postmaster.pid exists
        if "${AS[@]}" "$PGBIN/pg_ctl" start -D "$d" -w -t 120 -l "$d/server.log" >/dev/null 2>&1; then
            PGPORTS[$n]=$p; return 0
        fi
        grep -q 'could not bind\|could not create any TCP/IP sockets\|Address already in use' "$d/server.log" 2>/dev/null \
            || { tail -20 "$d/server.log" >&2; die "PostgreSQL $n did not start (log above)"; }
    done
    die "no free port found for PostgreSQL $n after 10 tries"
}
"${AS[@]}" "$PGBIN/initdb" -D "${PGDIR[pg]}" -U bench -A trust -E UTF8 --no-locale >"$LOGS/initdb.log" 2>&1 \
    || { tail -20 "$LOGS/initdb.log" >&2; die "initdb failed"; }
cat >>"${PGDIR[pg]}/postgresql.conf" <<EOF

# compare-replication.sh
wal_level = logical
max_wal_senders = 10
synchronous_standby_names = 'ANY 1 (s1, s2)'
synchronous_commit = on
fsync = on
shared_buffers = 1GB
max_connections = 200
listen_addresses = '127.0.0.1'
unix_socket_directories = '${SOCKDIR[pg]}'
EOF
start_pg pg
PGPORT=${PGPORTS[pg]}
PSQL=("$PGBIN/psql" -X -At -h "${SOCKDIR[pg]}" -p "$PGPORT" -U bench -d postgres)
"${PSQL[@]}" -c 'SELECT 1' >/dev/null || die "cannot connect to PostgreSQL on ${SOCKDIR[pg]}:$PGPORT"

for i in 1 2; do
    n=pg-s$i
    "${AS[@]}" "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PGPORT" -U bench -D "${PGDIR[$n]}" \
        -R -X stream -c fast >"$LOGS/basebackup-s$i.log" 2>&1 \
        || { tail -20 "$LOGS/basebackup-s$i.log" >&2; die "pg_basebackup for s$i failed"; }
    chmod 0700 "${PGDIR[$n]}"
    cat >>"${PGDIR[$n]}/postgresql.conf" <<EOF

# compare-replication.sh: standby s$i
unix_socket_directories = '${SOCKDIR[$n]}'
EOF
    # pg_basebackup -R wrote a primary_conninfo without application_name; the last one wins
    echo "primary_conninfo = 'host=127.0.0.1 port=$PGPORT user=bench application_name=s$i'" \
        >>"${PGDIR[$n]}/postgresql.auto.conf"
    [[ -f ${PGDIR[$n]}/standby.signal ]] || die "pg_basebackup -R wrote no standby.signal in ${PGDIR[$n]}"
    start_pg "$n"
done
pg_streaming() {
    "${PSQL[@]}" -c "SELECT count(*) FROM pg_stat_replication
        WHERE application_name IN ('s1','s2') AND state = 'streaming' AND sync_state = 'quorum'"
}
for _ in $(seq 600); do [[ $(pg_streaming) == 2 ]] && break; sleep 0.1; done
[[ $(pg_streaming) == 2 ]] || { "${PSQL[@]}" -c 'TABLE pg_stat_replication' >&2; die "the PostgreSQL standbys are not both streaming after 60 s"; }
PG_SETTINGS=$("${PSQL[@]}" -F= -c "SELECT name, current_setting(name) FROM pg_settings
    WHERE name IN ('wal_level','synchronous_commit','synchronous_standby_names','fsync','shared_buffers','max_connections','wal_sync_method','full_page_writes')
    ORDER BY name" | tr '\n' ' ')
PG_SERVER_VERSION=$("${PSQL[@]}" -c 'SHOW server_version')
printf '%s\n' "SELECT pg_logical_emit_message(true, 'p', repeat('x', 100));" >"$LOGS/emit.sql"
if [[ $PG_CONN == unix ]]; then PGHOSTARG=${SOCKDIR[pg]}; else PGHOSTARG=127.0.0.1; fi
for l in $PG_LEVELS; do
    got=$(PGOPTIONS="-c synchronous_commit=$l" "${PSQL[@]}" -c 'SHOW synchronous_commit')
    [[ $got == "$l" ]] || die "PGOPTIONS='-c synchronous_commit=$l' gave synchronous_commit=$got"
done

# --- 5. walden: primary and two standbys ---------------------------------------------
start_walden() {  # start_walden NODE SETTING... : starts it, waits for walden.addr, sets WPORT[NODE]
    local n=$1 d=$TOP/$1 addr="" pid
    shift
    "$WALDEN" serve -D "$d" -c listen_addr=127.0.0.1:0 -c metrics_addr= "$@" >"$LOGS/$n.log" 2>&1 &
    pid=$!
    WPIDS[$n]=$pid
    for _ in $(seq 600); do
        if [[ -s $d/data/walden.addr ]]; then
            addr=$(sed -n 's/^listen_addr=//p' "$d/data/walden.addr" | head -1)
            [[ -n $addr ]] && break
        fi
        kill -0 "$pid" 2>/dev/null || { tail -20 "$LOGS/$n.log" >&2; die "walden $n exited during startup (log above)"; }
        sleep 0.1
    done
    [[ -n $addr ]] || { tail -20 "$LOGS/$n.log" >&2; die "walden $n wrote no listen_addr to $d/data/walden.addr in 60 s"; }
    WPORT[$n]=${addr##*:}
}
start_walden walden -c "synchronous_standby_names=ANY 1 (s1, s2)"
WP=${WPORT[walden]}
for i in 1 2; do
    start_walden "walden-s$i" -c "primary_conninfo=host=127.0.0.1 port=$WP application_name=s$i"
done
# w_repl MODE : reads `walden status --replication --json` of the primary;
# MODE streaming: prints how many of s1, s2 stream; caught-up: prints 1 if both
# stream and have flushed and replayed all that was sent, with no lag
w_repl() {
    "$WALDEN" status -h 127.0.0.1 -p "$WP" --replication --json 2>/dev/null | python3 -c '
import json, sys
mode = sys.argv[1]
try:
    d = json.load(sys.stdin)
except Exception:
    print(0); sys.exit(0)
def lsn(s):
    hi, lo = s.split("/"); return (int(hi, 16) << 32) | int(lo, 16)
st = [s for s in d.get("standbys", []) if s.get("application_name") in ("s1", "s2") and s.get("state") == "streaming"]
if mode == "streaming":
    print(len(st))
else:
    ok = len(st) == 2 and all(s.get("lag_bytes") == 0 and lsn(s["replay_lsn"]) >= lsn(s["sent_lsn"])
                              and lsn(s["flush_lsn"]) >= lsn(s["sent_lsn"]) for s in st)
    print(1 if ok else 0)
' "$1"
}
for _ in $(seq 600); do [[ $(w_repl streaming) == 2 ]] && break; sleep 0.1; done
[[ $(w_repl streaming) == 2 ]] || { "$WALDEN" status -h 127.0.0.1 -p "$WP" --replication >&2 || true
    die "the walden standbys are not both streaming after 60 s (logs in $LOGS; KEEP=1 keeps them)"; }
W_SYNC_METHOD=$("$WALDEN" status -h 127.0.0.1 -p "${WPORT[walden-s1]}" | awk '$1 == "wal_sync_method" { print $3 }')
W_SYNC_METHOD=${W_SYNC_METHOD:-open_datasync}

# --- 6. settle: both sides' standbys caught up before each run -----------------------
pg_caught_up() {
    "${PSQL[@]}" -c "SELECT count(*) = 2 FROM pg_stat_replication, (SELECT pg_current_wal_lsn() AS cur) c
        WHERE application_name IN ('s1','s2') AND state = 'streaming' AND replay_lsn >= c.cur"
}
settle() {
    local t0=$SECONDS
    until [[ $(pg_caught_up) == t ]]; do
        (( SECONDS - t0 < SETTLE_SECS )) || { note "warning: PostgreSQL standbys not caught up after ${SETTLE_SECS}s"; break; }
        sleep 0.2
    done
    until [[ $(w_repl caught-up) == 1 ]]; do
        (( SECONDS - t0 < SETTLE_SECS )) || { note "warning: walden standbys not caught up after ${SETTLE_SECS}s"
            "$WALDEN" status -h 127.0.0.1 -p "$WP" --replication >&2 || true; break; }
        sleep 0.2
    done
}

# --- 7. runs ------------------------------------------------------------------------------
jobs_for() { echo $(( $1 < THREADS ? $1 : THREADS )); }
q() { printf '%q ' "$@"; }
set_pg_cmd() { PG_CMD=("$PGBIN/pgbench" -n -M prepared -j "$2" -c "$1" -T "$SECS" -f "$LOGS/emit.sql"
                       -h "$PGHOSTARG" -p "$PGPORT" -U bench postgres)
               [[ $PG_LOG != 1 ]] || PG_CMD+=(--log "--log-prefix=$3"); }
set_w_cmd() { W_CMD=("$WALDEN" bench -h 127.0.0.1 -p "$1" -c "$2" -j "$3" -T "${5:-$SECS}" --size 100 --level "$4"); }

# run_pg C LEVEL ROUND : sets R_TPS R_LAT R_P50 R_P99 (ms; p50/p99 "-" without PG_LOG)
run_pg() {
    local out=$LOGS/pg-c$1-$2-r$3.txt pfx=$LOGS/pglog-c$1-$2-r$3
    set_pg_cmd "$1" "$(jobs_for "$1")" "$pfx"
    PGOPTIONS="-c synchronous_commit=$2" "${PG_CMD[@]}" >"$out" 2>&1 \
        || { tail -20 "$out" >&2; die "pgbench failed: PGOPTIONS='-c synchronous_commit=$2' $(q "${PG_CMD[@]}")"; }
    R_TPS=$(awk '/^tps = / { print $3; exit }' "$out")
    R_LAT=$(awk '/^latency average = / { print $4; exit }' "$out")
    [[ -n $R_TPS && -n $R_LAT ]] || { cat "$out" >&2; die "no tps/latency in pgbench output (above)"; }
    R_P50=-; R_P99=-
    if [[ $PG_LOG == 1 ]]; then
        # pgbench --log: one line per transaction, the third field its latency in µs
        read -r R_P50 R_P99 < <(cat "$pfx".* | awk '{ print $3 }' | sort -n | awk '
            { a[NR] = $1 } END { if (NR == 0) { print "- -"; exit }
              i50 = int(NR * 0.50); if (i50 < 1) i50 = 1; i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
              printf "%.3f %.3f\n", a[i50] / 1000, a[i99] / 1000 }')
        rm -f "$pfx".*
    fi
}

# walden_get FILE KEY : the value of "KEY: value [unit]", latencies converted to ms
walden_get() {
    local v
    v=$(awk -v k="$2" '{ sub(/^[ \t]+/, "") } index($0, k ": ") == 1 { v = substr($0, length(k) + 3) } END { print v }' "$1")
    v=$(awk -v s="$v" 'BEGIN {
        n = split(s, a, " "); x = a[1]; u = (n > 1) ? a[2] : ""
        if (x !~ /^[0-9.eE+-]+$/) exit 1
        if (u == "us" || u == "µs") x /= 1000; else if (u == "s") x *= 1000; else if (u == "ns") x /= 1e6
        print x }') || v=
    [[ -n $v ]] || { grep -v '^progress:' "$1" | tail -20 >&2; die "no '$2' figure in walden output (last lines above)"; }
    echo "$v"
}

# run_walden C LEVEL [TAG [SECS]] : sets R_RPS R_WP50 R_WP99 (ms)
run_walden() {
    local out=$LOGS/walden-c$1-$2${3:+-$3}.txt secs=${4:-$SECS}
    set_w_cmd "$WP" "$1" "$(jobs_for "$1")" "$2" "$secs"
    "${W_CMD[@]}" >"$out" 2>&1 || { grep -v '^progress:' "$out" | tail -20 >&2; die "walden bench failed: $(q "${W_CMD[@]}")"; }
    R_RPS=$(walden_get "$out" 'rec/s')
    R_WP50=$(walden_get "$out" 'latency p50')
    R_WP99=$(walden_get "$out" 'latency p99')
}

io_some=$(awk '/^some/ { sub("avg10=", "", $2); print $2 }' /proc/pressure/io 2>/dev/null || echo 0)
if awk -v p="${io_some:-0}" 'BEGIN { exit !(p > 2) }'; then
    note "WARNING: I/O pressure avg10=${io_some}% at the start -- something else is writing; figures will be inflated"
fi

# probe R : loopback round trip and one standby fsync; appends to RTTS, FSYNCS
RTTS=; FSYNCS=
probe() {
    local f
    [[ $FSYNC_SECS != 0 && $FSYNC_SECS != 0.0 ]] || return 0
    settle
    run_walden 1 off "rtt-r$1" 3; RTTS+=" $R_WP50"
    "$WALDEN" test-fsync -s "$FSYNC_SECS" --json -f "$TOP/walden-s1/tf.out" >"$LOGS/test-fsync-r$1.json" 2>"$LOGS/test-fsync-r$1.err" \
        || { tail "$LOGS/test-fsync-r$1.err" >&2; die "walden test-fsync failed"; }
    f=$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
for s in d["sections"]:
    if s["key"] == "one_write":
        for l in s["lines"]:
            if l["method"] == sys.argv[2] and l.get("result"):
                print("%.3f" % (l["result"]["p50_us"] / 1000)); sys.exit(0)
print("-")' "$LOGS/test-fsync-r$1.json" "$W_SYNC_METHOD")
    [[ $f != - ]] || die "no one_write $W_SYNC_METHOD line in walden test-fsync's output ($LOGS/test-fsync-r$1.json)"
    FSYNCS+=" $f"
    note "round $1 probes: loopback round trip p50 $R_WP50 ms, one 8kB $W_SYNC_METHOD write p50 $f ms"
}

median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
declare -A LW_RPS LW_P50 LW_P99 LP_TPS LP_LAT LP_P50 LP_P99
for r in $(seq "$REPEAT"); do
    probe "$r"
    for c in $CLIENTS; do
        for l in $LEVELS; do
            line="round $r/$REPEAT clients $c level $l:"
            if [[ " $PG_LEVELS " == *" $l "* ]]; then
                settle
                run_pg "$c" "$l" "$r"
                LP_TPS[$c,$l]+=" $R_TPS"; LP_LAT[$c,$l]+=" $R_LAT"; LP_P50[$c,$l]+=" $R_P50"; LP_P99[$c,$l]+=" $R_P99"
                line+=$(printf ' PostgreSQL %.0f tps avg %.3f ms p50 %s ms |' "$R_TPS" "$R_LAT" "$R_P50")
            fi
            settle
            run_walden "$c" "$l" "r$r"
            LW_RPS[$c,$l]+=" $R_RPS"; LW_P50[$c,$l]+=" $R_WP50"; LW_P99[$c,$l]+=" $R_WP99"
            line+=$(printf ' walden %.0f rec/s p50 %.3f ms p99 %.3f ms' "$R_RPS" "$R_WP50" "$R_WP99")
            echo "$line" >&2
        done
    done
done
# medians over the rounds
declare -A W_RPS W_P50 W_P99 P_TPS P_LAT P_P50 P_P99
for k in "${!LW_RPS[@]}"; do
    # shellcheck disable=SC2086
    { W_RPS[$k]=$(median ${LW_RPS[$k]}); W_P50[$k]=$(median ${LW_P50[$k]}); W_P99[$k]=$(median ${LW_P99[$k]}); }
done
for k in "${!LP_TPS[@]}"; do
    # shellcheck disable=SC2086
    { P_TPS[$k]=$(median ${LP_TPS[$k]}); P_LAT[$k]=$(median ${LP_LAT[$k]}); }
    if [[ $PG_LOG == 1 ]]; then
        # shellcheck disable=SC2086
        { P_P50[$k]=$(printf '%.3f' "$(median ${LP_P50[$k]})"); P_P99[$k]=$(printf '%.3f' "$(median ${LP_P99[$k]})"); }
    fi
done
RTT=-; FSYNC=-
if [[ -n $RTTS ]]; then
    # shellcheck disable=SC2086
    { RTT=$(printf '%.3f' "$(median $RTTS)"); FSYNC=$(printf '%.3f' "$(median $FSYNCS)"); }
fi
W_COUNTERS=$("$WALDEN" status -h 127.0.0.1 -p "$WP" --replication --json | python3 -c '
import json, sys
d = json.load(sys.stdin)
print("commits degraded to local %s, answered INDETERMINATE %s" % (d.get("commits_degraded"), d.get("commits_indeterminate")))')

# --- 8. report -----------------------------------------------------------------------------
FS=$(findmnt -no FSTYPE -T "$TOP" 2>/dev/null || stat -f -c %T "$TOP")
DEV=$(findmnt -no SOURCE -T "$TOP" 2>/dev/null || echo '?')
echo
echo "host: nproc=$(nproc) kernel=$(uname -r) fs=$FS ($DEV) dir=$TOP"
echo "PostgreSQL: $PG_VERSION (server $PG_SERVER_VERSION, $PGBIN), run as $PG_USER; pgbench over $PG_CONN; standbys s1, s2 (pg_basebackup -R, TCP)"
echo "  primary settings: $PG_SETTINGS"
echo "walden: $WALDEN; primary with synchronous_standby_names='ANY 1 (s1, s2)', standbys s1, s2 (TCP); $W_COUNTERS"
echo "runs: $REPEAT round(s), each: the probes, then per client count and level PostgreSQL then walden,"
echo "      ${SECS}s each, standbys caught up before each run; medians over the rounds shown"
echo "      all six servers and the load generators share all $(nproc) cores (nothing pinned); -j = min($THREADS, clients)"
echo "commands (C = clients, J = min($THREADS, C), L = level):"
set_pg_cmd C J "$LOGS/pglog"
echo "  A  PGOPTIONS='-c synchronous_commit=L' $(q "${PG_CMD[@]}")"
echo "     emit.sql: $(cat "$LOGS/emit.sql")"
set_w_cmd PORT C J L
echo "  B  $(q "${W_CMD[@]}")"
echo "probes, medians of the rounds: loopback round trip (walden bench -c 1 --level off, p50) $RTT ms (rounds:${RTTS:- -});"
echo "        one 8kB $W_SYNC_METHOD write made durable (walden test-fsync -s $FSYNC_SECS, p50) $FSYNC ms (rounds:${FSYNCS:- -})"
echo
printf '%-12s | %7s | %12s | %9s | %9s | %11s | %9s | %9s | %9s | %-12s | %s\n' \
    level clients "walden rec/s" "w p50 ms" "w p99 ms" "PG tps" "PG avg ms" "PG p50 ms" "PG p99 ms" "walden/PG" "walden/own local"
for l in $LEVELS; do
    for c in $CLIENTS; do
        wr=${W_RPS[$c,$l]}
        pt=${P_TPS[$c,$l]:-}
        if [[ -n $pt ]]; then
            ptf=$(printf '%.0f' "$pt"); plf=$(printf '%.3f' "${P_LAT[$c,$l]}")
            pr=$(awk -v a="$pt" -v b="$wr" 'BEGIN { printf "%.2fx", (a > 0) ? b / a : 0 }')
        else
            ptf=-; plf=-; pr=-
        fi
        lr=-
        if [[ -n ${W_RPS[$c,local]:-} ]]; then
            lr=$(awk -v a="${W_RPS[$c,local]}" -v b="$wr" 'BEGIN { printf "%.2fx", (a > 0) ? b / a : 0 }')
        fi
        printf '%-12s | %7d | %12.0f | %9.3f | %9.3f | %11s | %9s | %9s | %9s | %-12s | %s\n' \
            "$l" "$c" "$wr" "${W_P50[$c,$l]}" "${W_P99[$c,$l]}" "$ptf" "$plf" "${P_P50[$c,$l]:--}" "${P_P99[$c,$l]:--}" "$pr" "$lr"
    done
done
echo
echo "targets (issue 14):"
if [[ -n ${W_RPS[64,on]:-} && -n ${W_RPS[64,local]:-} ]]; then
    awk -v a="${W_RPS[64,local]}" -v b="${W_RPS[64,on]}" 'BEGIN { r = b / a
        printf "  walden on >= 0.8x walden local at 64 clients: %.0f / %.0f = %.2fx (%s)\n", b, a, r, (r >= 0.8) ? "met" : "MISSED" }'
else
    echo "  walden on >= 0.8x walden local at 64 clients: not measured (needs 64 in CLIENTS and on, local in LEVELS)"
fi
if [[ -n ${W_P50[1,on]:-} && -n ${W_P50[1,local]:-} && $RTT != - && $FSYNC != - ]]; then
    awk -v on="${W_P50[1,on]}" -v lo="${W_P50[1,local]}" -v rtt="$RTT" -v fs="$FSYNC" 'BEGIN { b = lo + rtt + fs
        printf "  walden on p50 at 1 client <= local p50 + RTT + standby fsync: %.3f ms vs %.3f + %.3f + %.3f = %.3f ms (%s)\n", on, lo, rtt, fs, b, (on <= b) ? "met" : "MISSED" }'
else
    echo "  walden on p50 at 1 client <= local p50 + RTT + standby fsync: not measured (needs 1 in CLIENTS, on and local in LEVELS, FSYNC_SECS > 0)"
fi
if [[ -n ${W_RPS[64,on]:-} && -n ${P_TPS[64,on]:-} ]]; then
    awk -v a="${P_TPS[64,on]}" -v b="${W_RPS[64,on]}" 'BEGIN { r = b / a
        printf "  walden on >= 3x PostgreSQL on at 64 clients: %.0f / %.0f = %.2fx (%s)\n", b, a, r, (r >= 3) ? "met" : "MISSED" }'
else
    echo "  walden on >= 3x PostgreSQL on at 64 clients: not measured (needs 64 in CLIENTS and on in LEVELS and PG_LEVELS)"
fi
