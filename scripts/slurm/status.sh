#!/usr/bin/env bash
# Show the state of the caitlab single-node SLURM cluster.
# Exit 0 when it is up and healthy (all daemons alive, node usable, sacct
# answering), 1 otherwise. `status.sh -q` prints nothing.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ "${1:-}" == "-q" ]]; then
    cluster_healthy
    exit $?
fi

echo "state dir: $STATE"
echo "config:    $SLURM_CONF_FILE$( [[ -L $ETC_CONF && "$(readlink "$ETC_CONF")" == "$SLURM_CONF_FILE" ]] && echo " (linked from $ETC_CONF)")"
for d in "${DAEMONS[@]}"; do
    if pid="$(daemon_pid "$d")"; then
        printf '  %-10s running (pid %s)\n' "$d" "$pid"
    else
        printf '  %-10s stopped   (log %s)\n' "$d" "${LOGFILE[$d]}"
    fi
done
if daemon_alive slurmctld; then
    timeout 10 sinfo 2>&1 | sed 's/^/  /'
    timeout 10 squeue 2>&1 | sed 's/^/  /'
fi
if cluster_healthy; then
    echo "healthy"
    exit 0
fi
echo "NOT healthy"
exit 1
