#!/usr/bin/env bash
# walden server against PostgreSQL on the same filesystem, same run (issue 3;
# see "How to read these" in docs/benchmarks.md): 100-byte durable appends.
#
#   bench/compare-postgres.sh [PARENT]
#
#   PARENT  where the throwaway directory goes (default .): a fresh
#           PARENT/walden-pg-XXXX holds the PostgreSQL cluster (pg/), its
#           socket (sock/) and walden's data dir (walden/), so both sides
#           write to one filesystem; it is removed at exit.
#   env:    CLIENTS ("1 16 64")  client counts
#           SECS (20)            seconds per run
#           REPEAT (1)           pairs per client count (PG then walden, A B A B);
#                                medians are shown
#           THREADS (2)          -j for both load generators (capped at the client count)
#           WALDEN               walden binary (default REPO/target/release/walden)
#           PG_BINDIR            PostgreSQL bin dir (default: the newest
#                                /usr/lib/postgresql/*/bin, else initdb's dir on PATH)
#           PG_USER              as root: the OS user that runs initdb/postgres
#                                (default postgres, else a system user walden-bench
#                                created with useradd -r)
#           PG_CONN (unix)       how pgbench connects: unix (the socket, PostgreSQL's
#                                fastest path, so the harder bar) or tcp (127.0.0.1,
#                                the transport walden bench uses)
#           PG_ONLY (0)          1: run only the PostgreSQL half (no walden needed)
#           KEEP (0)             1: keep the throwaway directory and logs
#
# Per client count and pair:
#   A  pgbench -n -M prepared -j J -c C -T SECS -f emit.sql
#        emit.sql: SELECT pg_logical_emit_message(true, 'p', repeat('x', 100));
#      against a cluster with wal_level=logical, synchronous_commit=on, fsync=on,
#      shared_buffers=1GB, max_connections=200, listening on sock/ and
#      127.0.0.1:<free port>
#   B  walden serve -D walden -c listen_addr=127.0.0.1:0 -c metrics_addr=   (background,
#      address read from walden/data/walden.addr), then
#      walden bench -h HOST -p PORT -c C -j J -T SECS --size 100 --level local,
#      then SIGTERM to the server and wait for its exit.
# The PostgreSQL server stays up (idle) during B; walden's server is started
# and stopped around each B. Both servers and both load generators share all
# the machine's cores (nothing is pinned): say so when quoting figures.
#
# Root: initdb refuses to run as root, so as root the cluster is created and
# run as PG_USER through runuser; the throwaway directory is made 0755 and
# pg/ and sock/ are chowned to that user (its parent directories must be
# traversable by it: a 0700 home directory is not; the script checks and says).
# pgbench itself runs as the caller and logs in as the cluster's superuser
# "bench" (initdb -U bench -A trust: trust auth, reachable only on the socket
# in the throwaway directory and on 127.0.0.1).
set -euo pipefail
export LC_ALL=C   # "." decimals for printf/sort/awk

CLIENTS=${CLIENTS:-"1 16 64"}
SECS=${SECS:-20}
REPEAT=${REPEAT:-1}
THREADS=${THREADS:-2}
PG_CONN=${PG_CONN:-unix}
PG_ONLY=${PG_ONLY:-0}
KEEP=${KEEP:-0}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PARENT=${1:-.}

die() { echo "compare-postgres: $*" >&2; exit 1; }
note() { echo "compare-postgres: $*" >&2; }

[[ $SECS =~ ^[1-9][0-9]*$ ]] || die "SECS must be a whole number >= 1, got '$SECS'"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a whole number >= 1, got '$REPEAT'"
[[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "THREADS must be a whole number >= 1, got '$THREADS'"
for c in $CLIENTS; do [[ $c =~ ^[1-9][0-9]*$ ]] || die "CLIENTS must be whole numbers >= 1, got '$c'"; done
[[ -n ${CLIENTS// /} ]] || die "CLIENTS is empty"
[[ $PG_CONN == unix || $PG_CONN == tcp ]] || die "PG_CONN must be unix or tcp, got '$PG_CONN'"
[[ -d $PARENT ]] || die "$PARENT is not a directory"
IS_ROOT=0; [[ $(id -u) -eq 0 ]] && IS_ROOT=1

# --- 1. walden (checked first: no point running PostgreSQL for a half table) --
if [[ $PG_ONLY != 1 ]]; then
    WALDEN=${WALDEN:-$REPO/target/release/walden}
    [[ -x $WALDEN ]] || die "no walden binary at $WALDEN: build it with cargo build --release (in $REPO), or set WALDEN"
    # The server bench (walden bench -h/-p against `walden serve`) is what has --pipeline.
    "$WALDEN" bench --help 2>&1 | grep -q -- '--pipeline' \
        || die "$WALDEN has no server bench (\`walden bench --help\` lists no --pipeline): rebuild it with cargo build --release, or run PG_ONLY=1"
fi

# --- 2. PostgreSQL ------------------------------------------------------------
find_pg_bindir() {
    if [[ -n ${PG_BINDIR:-} ]]; then echo "$PG_BINDIR"; return; fi
    local d
    d=$(ls -1d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $d && -x $d/initdb ]]; then echo "$d"; return; fi
    if command -v initdb >/dev/null; then dirname "$(readlink -f "$(command -v initdb)")"; fi
    return 0
}
PGBIN=$(find_pg_bindir)
if [[ -z $PGBIN || ! -x $PGBIN/initdb || ! -x $PGBIN/pg_ctl || ! -x $PGBIN/pgbench ]]; then
    [[ $IS_ROOT -eq 1 ]] || die "PostgreSQL (initdb, pg_ctl, pgbench) is missing; install it with: sudo apt-get update && sudo apt-get install -y postgresql"
    note "installing PostgreSQL (apt-get install postgresql)..."
    # Note: Debian's package also creates (and tries to start) its own "main"
    # cluster on port 5432; this script neither uses nor stops it.
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    PGBIN=$(find_pg_bindir)
fi
for b in initdb pg_ctl pgbench psql postgres; do
    [[ -x $PGBIN/$b ]] || die "no $b in $PGBIN (set PG_BINDIR)"
done
PG_VERSION=$("$PGBIN/postgres" --version)

# as root: who runs the cluster
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

# --- 3. the throwaway directory, cleanup ----------------------------------------
TOP=$(mktemp -d -p "$PARENT" walden-pg-XXXX)
TOP=$(cd "$TOP" && pwd)
PGDATA=$TOP/pg
SOCK=$TOP/sock
WDIR=$TOP/walden
LOGS=$TOP/logs       # small: a few KB of pgbench/walden output
PG_STARTED=0
WPID=
EXTRA_RM=            # the socket directory, if it had to go to /tmp
cleanup() {
    local rc=$?
    set +e
    if [[ -n $WPID ]] && kill -0 "$WPID" 2>/dev/null; then
        kill -TERM "$WPID" 2>/dev/null
        for _ in $(seq 300); do kill -0 "$WPID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$WPID" 2>/dev/null && { note "walden did not stop in 30 s: SIGKILL"; kill -KILL "$WPID"; }
        wait "$WPID" 2>/dev/null
    fi
    if [[ $PG_STARTED -eq 1 && -f $PGDATA/postmaster.pid ]]; then
        "${AS[@]}" "$PGBIN/pg_ctl" stop -D "$PGDATA" -m fast -w -t 60 >/dev/null 2>&1 \
            || { note "pg_ctl stop failed; sending SIGQUIT to the postmaster";
                 kill -QUIT "$(head -1 "$PGDATA/postmaster.pid")" 2>/dev/null; sleep 1; }
    fi
    if [[ $KEEP == 1 ]]; then
        note "kept $TOP (KEEP=1)"
    else
        rm -rf "$TOP"
    fi
    [[ -n $EXTRA_RM ]] && rm -rf "$EXTRA_RM"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$LOGS" "$PGDATA" "$SOCK"
if [[ $IS_ROOT -eq 1 ]]; then
    chmod 0755 "$TOP"
    chown "$PG_USER": "$PGDATA" "$SOCK"
    "${AS[@]}" test -w "$PGDATA" \
        || die "$PG_USER cannot write $PGDATA: a parent of $TOP is not traversable by $PG_USER; give another PARENT (same filesystem) or PG_USER"
fi
chmod 0700 "$PGDATA"
# a unix socket path is limited to 107 bytes
if (( ${#SOCK} + 18 > 107 )); then
    note "the socket path under $TOP is too long for a unix socket; using a short directory in /tmp for the socket only"
    SOCK=$(mktemp -d /tmp/wpg-XXXX); EXTRA_RM=$SOCK; chmod 0755 "$SOCK"
    if [[ $IS_ROOT -eq 1 ]]; then chown "$PG_USER": "$SOCK"; fi
fi

# --- 4. the cluster ---------------------------------------------------------------
port_free() { ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q . && [[ ! -e $SOCK/.s.PGSQL.$1 ]]; }
"${AS[@]}" "$PGBIN/initdb" -D "$PGDATA" -U bench -A trust -E UTF8 --no-locale >"$LOGS/initdb.log" 2>&1 \
    || { tail -20 "$LOGS/initdb.log" >&2; die "initdb failed"; }
cat >>"$PGDATA/postgresql.conf" <<EOF

# compare-postgres.sh
wal_level = logical
synchronous_commit = on
fsync = on
shared_buffers = 1GB
max_connections = 200
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCK'
EOF
PGPORT=
for _ in $(seq 10); do
    p=$((5433 + RANDOM % 2000))
    port_free "$p" || continue
    sed -i '/^port = /d' "$PGDATA/postgresql.conf"
    echo "port = $p" >>"$PGDATA/postgresql.conf"
    rm -f "$PGDATA/server.log"
    PG_STARTED=1    # from here on the EXIT trap stops it if postmaster.pid exists
    if "${AS[@]}" "$PGBIN/pg_ctl" start -D "$PGDATA" -w -t 120 -l "$PGDATA/server.log" >/dev/null 2>&1; then
        PGPORT=$p; break
    fi
    # a port taken between the check and the bind: try another; anything else: stop
    grep -q 'could not bind\|could not create any TCP/IP sockets\|Address already in use' "$PGDATA/server.log" 2>/dev/null \
        || { tail -20 "$PGDATA/server.log" >&2; die "PostgreSQL did not start (log above)"; }
done
[[ -n $PGPORT ]] || die "no free port found for PostgreSQL in 5433-7432 after 10 tries"
if [[ $PG_CONN == unix ]]; then PGHOSTARG=$SOCK; else PGHOSTARG=127.0.0.1; fi
PSQL=("$PGBIN/psql" -X -At -h "$SOCK" -p "$PGPORT" -U bench -d postgres)
"${PSQL[@]}" -c 'SELECT 1' >/dev/null || die "cannot connect to PostgreSQL on $SOCK:$PGPORT"
PG_SETTINGS=$("${PSQL[@]}" -F= -c "SELECT name, current_setting(name) FROM pg_settings
    WHERE name IN ('wal_level','synchronous_commit','fsync','shared_buffers','max_connections','wal_sync_method','full_page_writes')
    ORDER BY name" | tr '\n' ' ')
PG_SERVER_VERSION=$("${PSQL[@]}" -c 'SHOW server_version')
printf '%s\n' "SELECT pg_logical_emit_message(true, 'p', repeat('x', 100));" >"$LOGS/emit.sql"

# --- 5. runs -------------------------------------------------------------------------
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
jobs_for() { echo $(( $1 < THREADS ? $1 : THREADS )); }
q() { printf '%q ' "$@"; }
# These run in the main shell (no $(...) around them), so that die() and the
# EXIT trap see the walden server's pid; results come back in R_* variables.
set_pg_cmd() { PG_CMD=("$PGBIN/pgbench" -n -M prepared -j "$2" -c "$1" -T "$SECS" -f "$LOGS/emit.sql"
                       -h "$PGHOSTARG" -p "$PGPORT" -U bench postgres); }
set_w_cmd() { W_CMD=("$WALDEN" bench -h "$1" -p "$2" -c "$3" -j "$4" -T "$SECS" --size 100 --level local); }
W_SERVE=("${WALDEN:-walden}" serve -D "$WDIR" -c listen_addr=127.0.0.1:0 -c metrics_addr=)

# run_pg C R : sets R_TPS R_LAT (ms)
run_pg() {
    local out=$LOGS/pg-c$1-r$2.txt
    set_pg_cmd "$1" "$(jobs_for "$1")"
    "${PG_CMD[@]}" >"$out" 2>&1 || { tail -20 "$out" >&2; die "pgbench failed: $(q "${PG_CMD[@]}")"; }
    R_TPS=$(awk '/^tps = / { print $3; exit }' "$out")
    R_LAT=$(awk '/^latency average = / { print $4; exit }' "$out")
    [[ -n $R_TPS && -n $R_LAT ]] || { cat "$out" >&2; die "no tps/latency in pgbench output (above)"; }
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

# run_walden C R : starts the server, runs the bench, stops the server; sets R_RPS R_WLAT R_WP99 (ms)
run_walden() {
    local out=$LOGS/walden-c$1-r$2.txt slog=$LOGS/serve-c$1-r$2.txt addr= host port rc
    rm -f "$WDIR/data/walden.addr"
    "${W_SERVE[@]}" >"$slog" 2>&1 &
    WPID=$!
    for _ in $(seq 600); do
        if [[ -s $WDIR/data/walden.addr ]]; then
            addr=$(sed -n 's/^listen_addr=//p' "$WDIR/data/walden.addr" | head -1)
            [[ -n $addr ]] && break
        fi
        kill -0 "$WPID" 2>/dev/null || { tail -20 "$slog" >&2; die "walden serve exited during startup (log above)"; }
        sleep 0.1
    done
    [[ -n $addr ]] || { tail -20 "$slog" >&2; die "walden serve wrote no listen_addr to $WDIR/data/walden.addr in 60 s"; }
    host=${addr%:*}; port=${addr##*:}; host=${host#[}; host=${host%]}
    set_w_cmd "$host" "$port" "$1" "$(jobs_for "$1")"
    "${W_CMD[@]}" >"$out" 2>&1 || { grep -v '^progress:' "$out" | tail -20 >&2; die "walden bench failed: $(q "${W_CMD[@]}")"; }
    kill -TERM "$WPID"
    rc=0; wait "$WPID" || rc=$?
    WPID=
    [[ $rc -eq 0 ]] || note "warning: walden serve exited with status $rc after SIGTERM (log: $slog)"
    R_RPS=$(walden_get "$out" 'rec/s')
    R_WLAT=$(walden_get "$out" 'latency avg')
    R_WP99=$(walden_get "$out" 'latency p99')
}

# The disk is shared: a concurrent build or bulk writer inflates fsync latency. Warn.
io_some=$(awk '/^some/ { sub("avg10=", "", $2); print $2 }' /proc/pressure/io 2>/dev/null || echo 0)
if awk -v p="${io_some:-0}" 'BEGIN { exit !(p > 2) }'; then
    note "WARNING: I/O pressure avg10=${io_some}% -- something else is writing; figures will be inflated"
fi

declare -A PG_TPS PG_LAT W_RPS W_LAT W_P99
for c in $CLIENTS; do
    for r in $(seq "$REPEAT"); do
        run_pg "$c" "$r"; t=$R_TPS; l=$R_LAT
        PG_TPS[$c]+=" $t"; PG_LAT[$c]+=" $l"
        if [[ $PG_ONLY == 1 ]]; then
            printf 'clients %d pair %d/%d: PostgreSQL %.0f tps %.3f ms\n' "$c" "$r" "$REPEAT" "$t" "$l" >&2
            continue
        fi
        run_walden "$c" "$r"; w=$R_RPS; wl=$R_WLAT; wp=$R_WP99
        W_RPS[$c]+=" $w"; W_LAT[$c]+=" $wl"; W_P99[$c]+=" $wp"
        printf 'clients %d pair %d/%d: PostgreSQL %.0f tps %.3f ms | walden %.0f rec/s %.3f ms (p99 %.3f)\n' \
            "$c" "$r" "$REPEAT" "$t" "$l" "$w" "$wl" "$wp" >&2
    done
done

# --- 6. report ------------------------------------------------------------------------
FS=$(findmnt -no FSTYPE -T "$TOP" 2>/dev/null || stat -f -c %T "$TOP")
DEV=$(findmnt -no SOURCE -T "$TOP" 2>/dev/null || echo '?')
echo
echo "host: nproc=$(nproc) kernel=$(uname -r) fs=$FS ($DEV) dir=$TOP"
echo "PostgreSQL: $PG_VERSION (server $PG_SERVER_VERSION, $PGBIN), run as $PG_USER; pgbench over $PG_CONN"
echo "  settings: $PG_SETTINGS"
[[ $PG_ONLY == 1 ]] || echo "walden: $WALDEN"
echo "runs: $REPEAT pair(s) per client count (PostgreSQL then walden), ${SECS}s each, medians shown;"
echo "      servers and load generators share all $(nproc) cores (nothing pinned); -j = min($THREADS, clients)"
echo "commands (C = clients, J = min($THREADS, C)):"
set_pg_cmd C J
echo "  A  $(q "${PG_CMD[@]}")"
echo "     emit.sql: $(cat "$LOGS/emit.sql")"
if [[ $PG_ONLY != 1 ]]; then
    echo "  B  $(q "${W_SERVE[@]}")  (background; SIGTERM after the bench)"
    set_w_cmd 127.0.0.1 PORT C J
    echo "     $(q "${W_CMD[@]}")  (PORT from walden.addr)"
fi
echo "targets (issue 3): walden >= 10x PostgreSQL throughput at 64 clients; 1-client latency below PostgreSQL's"
echo
printf '%7s | %14s | %10s | %12s | %10s | %9s | %-26s | %s\n' \
    clients "PostgreSQL tps" "PG lat ms" "walden rec/s" "walden ms" "w p99 ms" "throughput walden/PG" "latency walden/PG"
for c in $CLIENTS; do
    # shellcheck disable=SC2086
    pt=$(median ${PG_TPS[$c]}); pl=$(median ${PG_LAT[$c]})
    if [[ $PG_ONLY == 1 ]]; then
        printf '%7d | %14.0f | %10.3f | %12s | %10s | %9s | %-26s | %s\n' "$c" "$pt" "$pl" - - - - -
        continue
    fi
    # shellcheck disable=SC2086
    wr=$(median ${W_RPS[$c]}); wl=$(median ${W_LAT[$c]}); wp=$(median ${W_P99[$c]})
    thr=$(awk -v a="$pt" -v b="$wr" 'BEGIN {
        r = (a > 0) ? b / a : 0; s = sprintf("%.2fx", r)
        printf "%s", s }')
    if [[ $c -eq 64 ]]; then
        thr="$thr $(awk -v a="$pt" -v b="$wr" 'BEGIN { print (a > 0 && b / a >= 10) ? "(>=10x: met)" : "(>=10x: MISSED)" }')"
    fi
    latr=-
    if [[ $c -eq 1 ]]; then
        latr=$(awk -v a="$pl" -v b="$wl" 'BEGIN { r = (a > 0) ? b / a : 0
            printf "%.2fx %s", r, (r < 1) ? "(<1x: met)" : "(<1x: MISSED)" }')
    fi
    printf '%7d | %14.0f | %10.3f | %12.0f | %10.3f | %9.3f | %-26s | %s\n' "$c" "$pt" "$pl" "$wr" "$wl" "$wp" "$thr" "$latr"
done
