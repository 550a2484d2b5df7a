#!/usr/bin/env bash
# Start the caitlab single-node SLURM cluster (munged, MariaDB, slurmdbd,
# slurmctld, slurmd) on localhost. Idempotent: exits 0 at once when the
# cluster is already up and healthy; starts only what is not running.
#
# State (configs, pid files, logs, spool, MariaDB datadir) lives under
# ${CAITLAB_SLURM_DIR:-/tmp/caitlab-slurm}. See README.md beside this file.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $(id -u) -eq 0 ]] || die "start.sh must run as root (daemons run as root/munge/mysql)"

WAIT_S="${CAITLAB_SLURM_WAIT_S:-60}"
t0=$(date +%s%N)

# Wait until "$2..." succeeds, at most $1 seconds; 0.2 s between tries.
wait_for() {
    local limit="$1"; shift
    local end=$(( $(date +%s) + limit ))
    until "$@"; do
        (( $(date +%s) < end )) || return 1
        sleep 0.2
    done
}

# Run a daemon detached from us: stdin /dev/null, output appended to LOG, and
# every other inherited fd closed (our state-dir lock on fd 9, a caller's
# capture pipe, ...), so that no daemon holds the lock or the caller's pipe.
# With --bg PIDFILE the command runs in the background and its pid goes to PIDFILE.
launch() {  # launch [--bg PIDFILE] LOG CMD...
    local bg=""
    if [[ "$1" == --bg ]]; then bg="$2"; shift 2; fi
    local logf="$1"; shift
    (
        trap - PIPE   # lib.sh ignores SIGPIPE; daemons (and their jobs) must not inherit that
        for fd in /proc/self/fd/*; do
            fd="${fd##*/}"
            [[ "$fd" =~ ^[0-9]+$ ]] && (( fd > 2 )) && eval "exec $fd>&-" 2>/dev/null
        done
        if [[ -n "$bg" ]]; then
            "${DAEMON_ENV[@]}" "$@" </dev/null >>"$logf" 2>&1 &
            echo $! >"$bg"
        else
            exec "${DAEMON_ENV[@]}" "$@" </dev/null >>"$logf" 2>&1
        fi
    )
}

fail() {  # fail DAEMON WHAT
    die "$2 -- see ${LOGFILE[$1]}"
}

render() {  # render TEMPLATE DEST MODE
    local tmp
    tmp="$(mktemp "$2.XXXXXX")"
    sed -e "s|@STATE@|$STATE|g" \
        -e "s|@CLUSTER@|$CLUSTER|g" \
        -e "s|@HOST@|$HOST|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        -e "s|@DBD_PORT@|$DBD_PORT|g" \
        -e "s|@DB_PORT@|$DB_PORT|g" \
        -e "s|@DB_USER@|$DB_USER|g" \
        -e "s|@DB_PASS@|$DB_PASS|g" \
        -e "s|@DB_NAME@|$DB_NAME|g" \
        -e "s|@MUNGE_SOCKET@|$MUNGE_SOCKET|g" \
        -e "s|@OVERSUBSCRIBE@|$OVERSUBSCRIBE|g" \
        -e "s|@NODE_LINE@|$NODE_LINE|g" \
        "$SLURM_SCRIPTS_DIR/$1" >"$tmp"
    chmod "$3" "$tmp"
    mv -f "$tmp" "$2"
}

# The NodeName line: topology from `slurmd -C` when it agrees with nproc,
# RealMemory minus a margin so slurmd never registers with "too little" memory.
node_line() {
    local probe cpus mem margin topo
    probe="$(slurmd -C 2>/dev/null | sed -n 1p)" || true
    cpus="$(nproc)"
    mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$probe")"
    if [[ -z "$mem" ]]; then
        mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
    fi
    margin=$(( mem / 10 )); (( margin > 1024 )) && margin=1024
    mem=$(( mem - margin )); (( mem < 1 )) && mem=1
    topo="CPUs=$cpus"
    if [[ "$probe" == *" CPUs=$cpus "* ]]; then
        topo="$(grep -o 'CPUs=[0-9]* Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$probe" || echo "CPUs=$cpus")"
    fi
    echo "$HOST NodeAddr=127.0.0.1 $topo RealMemory=$mem"
}

# ---------------------------------------------------------------------------
with_lock

if cluster_healthy; then
    log "already running and healthy (state dir $STATE)"
    exit 0
fi

# 1. binaries
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null \
   || ! command -v munged >/dev/null || ! command -v mariadbd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v sacct >/dev/null; then
    log "slurm/munge/mariadb binaries missing, running install.sh"
    "$SLURM_SCRIPTS_DIR/install.sh" || die "install.sh failed"
fi

# 2. state dir layout (must not be group/world writable: munged checks that)
if [[ ! -e "$MARKER" && -n "$(find "$STATE" -mindepth 1 -maxdepth 1 ! -name .lock -print -quit)" ]]; then
    die "$STATE exists and is not a caitlab-slurm state dir (no $MARKER); set CAITLAB_SLURM_DIR"
fi
mkdir -p "$STATE"/{run,log,slurmctld,slurmd,mysql} "$MUNGE_DIR"
touch "$MARKER"
chmod 755 "$STATE" "$STATE/run" "$STATE/log"
chmod 700 "$STATE/slurmctld" "$STATE/slurmd"
chown munge:munge "$MUNGE_DIR"; chmod 755 "$MUNGE_DIR"
chown mysql:mysql "$STATE/mysql"; chmod 750 "$STATE/mysql"

# 3. configs
HOST="$(node_name)"
NODE_LINE="$(node_line)"
if [[ ! -s "$STATE/db.pass" ]]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$STATE/db.pass")
fi
DB_PASS="$(cat "$STATE/db.pass")"
render slurm.conf.in "$SLURM_CONF_FILE" 644
render slurmdbd.conf.in "$STATE/slurmdbd.conf" 600
render my.cnf.in "$MYCNF" 644
: >"$STATE/plugstack.conf"
cat >"$STATE/env.sh" <<EOF
# source this file to talk to the caitlab test cluster without /etc/slurm/slurm.conf
export SLURM_CONF=$SLURM_CONF_FILE
EOF

# Let clients find the config without SLURM_CONF.
CONF_HINT="clients find it via $ETC_CONF -> $SLURM_CONF_FILE (no env var needed)"
if [[ "$ETC_LINK" == 1 ]]; then
    if [[ ! -e "$ETC_CONF" && ! -L "$ETC_CONF" ]] || etc_link_is_ours; then
        mkdir -p "$(dirname "$ETC_CONF")"
        ln -sfn "$SLURM_CONF_FILE" "$ETC_CONF"
    else
        CONF_HINT="$ETC_CONF belongs to another cluster: export SLURM_CONF=$SLURM_CONF_FILE"
    fi
else
    CONF_HINT="export SLURM_CONF=$SLURM_CONF_FILE (CAITLAB_SLURM_ETC_LINK=0)"
fi

# 4. munged (as the munge user, socket under the state dir)
if ! daemon_alive munged; then
    if [[ ! -s "$MUNGE_KEY" ]]; then
        log "creating munge key $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        mungekey --create --keyfile="$MUNGE_KEY" 2>/dev/null \
            || dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge "$(dirname "$MUNGE_KEY")" "$MUNGE_KEY"
    chmod 700 "$(dirname "$MUNGE_KEY")"; chmod 600 "$MUNGE_KEY"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "${PIDFILE[munged]}"
    touch "${LOGFILE[munged]}"; chown munge:munge "${LOGFILE[munged]}"; chmod 640 "${LOGFILE[munged]}"
    log "starting munged"
    launch "${LOGFILE[munged]}" runuser -u munge -- munged --force \
        --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
        --pid-file="${PIDFILE[munged]}" --log-file="${LOGFILE[munged]}" \
        --seed-file="$MUNGE_DIR/munged.seed" || fail munged "munged failed to start"
fi
munge_ok() { munge -n --socket="$MUNGE_SOCKET" 2>/dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1; }
wait_for 20 munge_ok || fail munged "munged is not answering on $MUNGE_SOCKET"

# 5. MariaDB (datadir under the state dir, 127.0.0.1:$DB_PORT only)
mysql_ok() { mariadb-admin --defaults-file="$MYCNF" -uroot ping >/dev/null 2>&1; }
if ! daemon_alive mysqld; then
    touch "${LOGFILE[mysqld]}"; chown mysql:mysql "${LOGFILE[mysqld]}"
    if [[ ! -d "$STATE/mysql/data/mysql" ]]; then
        log "initialising MariaDB datadir $STATE/mysql/data"
        rm -rf "$STATE/mysql/data"
        mariadb-install-db --defaults-file="$MYCNF" --user=mysql \
            --auth-root-authentication-method=socket --skip-test-db \
            >>"${LOGFILE[mysqld]}" 2>&1 || fail mysqld "mariadb-install-db failed"
    fi
    log "starting MariaDB on 127.0.0.1:$DB_PORT"
    # mariadbd does not daemonize: detach it from this shell.
    launch --bg "$STATE/mysql/launcher.pid" "${LOGFILE[mysqld]}" setsid mariadbd --defaults-file="$MYCNF"
    mysqld_launcher="$(cat "$STATE/mysql/launcher.pid")"
    for ((i = 0; i < WAIT_S * 5; i++)); do
        mysql_ok && break
        kill -0 "$mysqld_launcher" 2>/dev/null || fail mysqld "MariaDB exited during startup"
        sleep 0.2
    done
    mysql_ok || fail mysqld "MariaDB did not come up within $WAIT_S s"
    wait_for 10 daemon_alive mysqld || fail mysqld "MariaDB wrote no pid file ${PIDFILE[mysqld]}"
fi
mariadb --defaults-file="$MYCNF" -uroot >>"${LOGFILE[mysqld]}" 2>&1 <<SQL || fail mysqld "could not create the slurm DB user"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
FLUSH PRIVILEGES;
SQL

# 6. slurmdbd, then register the cluster
dbd_ok() { timeout 10 sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1; }
if ! daemon_alive slurmdbd; then
    log "starting slurmdbd"
    launch "${LOGFILE[slurmdbd]}" slurmdbd \
        || fail slurmdbd "slurmdbd failed to start"
    wait_for "$WAIT_S" daemon_alive slurmdbd || fail slurmdbd "slurmdbd exited"
fi
wait_for "$WAIT_S" dbd_ok || fail slurmdbd "slurmdbd is not answering (sacctmgr show cluster)"
if ! grep -qx "$CLUSTER" <<<"$(timeout 10 sacctmgr -n -P show cluster format=cluster 2>/dev/null)"; then
    log "registering cluster $CLUSTER in the accounting DB"
    timeout 20 sacctmgr -i add cluster "$CLUSTER" >>"${LOGFILE[slurmdbd]}" 2>&1 \
        || fail slurmdbd "sacctmgr add cluster $CLUSTER failed"
fi

# 7. slurmctld
if ! daemon_alive slurmctld; then
    log "starting slurmctld"
    launch "${LOGFILE[slurmctld]}" slurmctld -f "$SLURM_CONF_FILE" \
        || fail slurmctld "slurmctld failed to start"
    wait_for "$WAIT_S" daemon_alive slurmctld || fail slurmctld "slurmctld exited"
fi
wait_for "$WAIT_S" ctld_ok || fail slurmctld "slurmctld is not answering (scontrol ping)"

# 8. slurmd
if ! daemon_alive slurmd; then
    log "starting slurmd (node $HOST)"
    launch "${LOGFILE[slurmd]}" slurmd -f "$SLURM_CONF_FILE" \
        || fail slurmd "slurmd failed to start"
    wait_for "$WAIT_S" daemon_alive slurmd || fail slurmd "slurmd exited"
fi
node_ready() { [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing)$ ]]; }
if ! wait_for 10 node_ready; then
    # A node left down/drained by an earlier run: give it back to service.
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    wait_for "$WAIT_S" node_ready \
        || fail slurmd "node $HOST is '$(node_state)', not idle (also check ${LOGFILE[slurmctld]})"
fi

# 9. accounting round trip
wait_for "$WAIT_S" sacct_works || fail slurmdbd "sacct does not work"

ms=$(( ($(date +%s%N) - t0) / 1000000 ))
log "cluster '$CLUSTER' up in $((ms / 1000)).$(( (ms % 1000) / 100 )) s: node $HOST $(node_state), partition debug"
log "config $SLURM_CONF_FILE; $CONF_HINT"
log "logs in $STATE/log, stop with $SLURM_SCRIPTS_DIR/stop.sh"
