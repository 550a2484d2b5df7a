#!/usr/bin/env bash
# Stop the caitlab single-node SLURM cluster started by start.sh.
# Only the processes named in the state dir's pid files are signalled (after
# checking that each pid still runs the expected program). Idempotent.
#
# Usage: scripts/slurm/stop.sh [--keep-jobs] [--purge]
#   --keep-jobs  do not scancel queued/running jobs first (they resume on the
#                next start; running steps keep running meanwhile)
#   --purge      also delete the state dir (configs, logs, accounting DB, job
#                state) and the /etc/slurm/slurm.conf link pointing at it
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

keep_jobs=0 purge=0
for arg in "$@"; do
    case "$arg" in
        --keep-jobs) keep_jobs=1 ;;
        --purge) purge=1 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) die "unknown argument: $arg" ;;
    esac
done

if [[ ! -d "$STATE" ]]; then
    log "nothing to stop (no state dir $STATE)"
    exit 0
fi
with_lock

# Cancel jobs so that no slurmstepd / user process outlives the cluster.
if [[ $keep_jobs -eq 0 ]] && daemon_alive slurmctld \
   && ctld_ok; then
    jobs="$(timeout 10 squeue -h -o '%A' 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
        log "cancelling $(wc -w <<<"$jobs") job(s)"
        # shellcheck disable=SC2086
        timeout 20 scancel $jobs 2>/dev/null || true
        for _ in $(seq 1 100); do   # up to ~20 s (KillWait=5)
            [[ -z "$(timeout 10 squeue -h -t running,completing -o '%A' 2>/dev/null)" ]] && break
            sleep 0.2
        done
    fi
fi

stop_daemon() {
    local name="$1" pid i
    if ! pid="$(daemon_pid "$name")"; then
        rm -f "${PIDFILE[$name]}"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 150); do          # up to 30 s
        daemon_alive "$name" || break
        sleep 0.2
    done
    if daemon_alive "$name"; then
        log "$name (pid $pid) ignored SIGTERM for 30 s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "${PIDFILE[$name]}"
}

for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    stop_daemon "${DAEMONS[$i]}"
done
log "stopped (state kept in $STATE)"

if [[ $purge -eq 1 ]]; then
    [[ -e "$MARKER" ]] || die "$STATE has no $MARKER; refusing to delete it"
    if etc_link_is_ours && [[ "$(readlink "$ETC_CONF")" == "$SLURM_CONF_FILE" ]]; then
        rm -f "$ETC_CONF"
    fi
    rm -rf "$STATE"
    log "purged $STATE"
fi
