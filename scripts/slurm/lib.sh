# Shared settings and helpers for scripts/slurm/{start,stop,status}.sh.
# Sourced, not executed.
# shellcheck shell=bash disable=SC2034

SLURM_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# ---- settings (all overridable through the environment) -------------------
STATE="${CAITLAB_SLURM_DIR:-/tmp/caitlab-slurm}"
STATE="${STATE%/}"
CLUSTER="${CAITLAB_SLURM_CLUSTER:-caitlab}"
CTLD_PORT="${CAITLAB_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${CAITLAB_SLURM_SLURMD_PORT:-6818}"
DBD_PORT="${CAITLAB_SLURM_DBD_PORT:-6819}"
DB_PORT="${CAITLAB_SLURM_DB_PORT:-13306}"   # MariaDB, 127.0.0.1 only
DB_USER=slurm
DB_NAME=slurm_acct_db
# NO: a CPU runs one job at a time. FORCE:4 would let 4 jobs share each CPU.
OVERSUBSCRIBE="${CAITLAB_SLURM_OVERSUBSCRIBE:-NO}"
# 1: point /etc/slurm/slurm.conf at $STATE/slurm.conf so clients need no SLURM_CONF.
ETC_LINK="${CAITLAB_SLURM_ETC_LINK:-1}"
ETC_CONF=/etc/slurm/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
MARKER="$STATE/.caitlab-slurm"
SLURM_CONF_FILE="$STATE/slurm.conf"
MUNGE_DIR="$STATE/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
MYCNF="$STATE/my.cnf"

# Daemons in start order: name, pid file, expected /proc/PID/comm, log file.
DAEMONS=(munged mysqld slurmdbd slurmctld slurmd)
declare -A PIDFILE=(
    [munged]="$MUNGE_DIR/munged.pid"
    [mysqld]="$STATE/mysql/mysqld.pid"
    [slurmdbd]="$STATE/run/slurmdbd.pid"
    [slurmctld]="$STATE/run/slurmctld.pid"
    [slurmd]="$STATE/run/slurmd.pid"
)
declare -A COMM=(
    [munged]="munged"
    [mysqld]="mariadbd|mysqld"
    [slurmdbd]="slurmdbd"
    [slurmctld]="slurmctld"
    [slurmd]="slurmd"
)
declare -A LOGFILE=(
    [munged]="$MUNGE_DIR/munged.log"
    [mysqld]="$STATE/mysql/mysqld.log"
    [slurmdbd]="$STATE/log/slurmdbd.log"
    [slurmctld]="$STATE/log/slurmctld.log"
    [slurmd]="$STATE/log/slurmd.log"
)

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
# Our own clients always talk to our cluster, whatever the caller exported.
export SLURM_CONF="$SLURM_CONF_FILE"
# Clean environment for the daemons (nothing of the caller leaks into them).
DAEMON_ENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
            HOME=/root LANG=C.UTF-8 SLURM_CONF="$SLURM_CONF_FILE")

# A reader that goes away (`start.sh | head -1`) must not kill us half-way.
trap '' PIPE
log() { echo "[caitlab-slurm] $*" 2>/dev/null || true; }
die() { echo "[caitlab-slurm] ERROR: $*" >&2 2>/dev/null; exit 1; }

node_name() { hostname -s 2>/dev/null || hostname; }

# PID of daemon $1 if its pid file names a live process of the right kind.
daemon_pid() {
    local name="$1" pf="${PIDFILE[$1]}" pid comm
    [[ -r "$pf" ]] || return 1
    # (cat, not a redirection: the daemon may delete its pid file meanwhile)
    # shellcheck disable=SC2002
    pid="$(cat "$pf" 2>/dev/null | tr -dc '0-9')" || true
    [[ -n "$pid" && -d "/proc/$pid" ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$comm" =~ ^(${COMM[$name]})$ ]] || return 1
    # a zombie (dead, not yet reaped) is not alive
    [[ "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -c1)" != Z ]] || return 1
    echo "$pid"
}

daemon_alive() { daemon_pid "$1" >/dev/null; }

# Node state as sinfo reports it (idle, mixed, allocated, down*, drained, ...).
node_state() { timeout 10 sinfo -h -N -n "$(node_name)" -o '%T' 2>/dev/null | sed -n 1p; }

# (No `| grep -q` / `| head`: with SIGPIPE ignored the writer would fail under pipefail.)
ctld_ok() { [[ "$(timeout 10 scontrol ping 2>/dev/null)" == *UP* ]]; }

sacct_works() { timeout 15 sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1; }

# Healthy: every daemon alive, controller answers, node usable, accounting answers.
cluster_healthy() {
    local d st
    for d in "${DAEMONS[@]}"; do daemon_alive "$d" || return 1; done
    [[ -r "$SLURM_CONF_FILE" ]] || return 1
    ctld_ok || return 1
    st="$(node_state)"
    [[ "$st" =~ ^(idle|mixed|allocated|completing)$ ]] || return 1
    sacct_works
}

# Run "$@" under an exclusive lock on the state dir (parallel start/stop calls).
with_lock() {
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "could not lock $STATE/.lock within 300 s"
}

# Does /etc/slurm/slurm.conf belong to us (a link to a caitlab state dir)?
etc_link_is_ours() {
    [[ -L "$ETC_CONF" ]] || return 1
    local target
    target="$(readlink "$ETC_CONF")"
    [[ "$target" == */slurm.conf ]] || return 1
    [[ ! -e "$target" || -e "$(dirname "$target")/.caitlab-slurm" ]]
}
