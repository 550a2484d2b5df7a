#!/usr/bin/env bash
# Install the Debian packages for a single-node SLURM cluster with accounting
# (slurmctld, slurmd, slurmdbd, slurm clients, munge, MariaDB).
#
# Idempotent: does nothing when every needed binary is already present.
# Non-interactive, and never lets apt/dpkg start the services (start.sh runs
# the daemons itself, there is no systemd here).
#
# Usage: scripts/slurm/install.sh [--force]
set -euo pipefail

PACKAGES=(slurm-wlm slurmdbd slurm-client munge mariadb-server mariadb-client)
# Binaries start.sh relies on.
BINARIES=(slurmctld slurmd slurmstepd slurmdbd sbatch srun squeue sacct sacctmgr
          scontrol sinfo scancel munged mungekey munge unmunge mariadbd
          mariadb-install-db mariadb mariadb-admin)

log() { echo "[caitlab-slurm install] $*"; }
die() { echo "[caitlab-slurm install] ERROR: $*" >&2; exit 1; }

missing_binaries() {
    local b missing=()
    for b in "${BINARIES[@]}"; do
        if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1; then
            missing+=("$b")
        fi
    done
    echo "${missing[*]:-}"
}

force=0
[[ "${1:-}" == "--force" ]] && force=1

still_missing="$(missing_binaries)"
if [[ -z "$still_missing" && $force -eq 0 ]]; then
    log "all binaries present, nothing to install"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root to apt-get install (missing: $still_missing)"
command -v apt-get >/dev/null || die "apt-get not found; install ${PACKAGES[*]} by hand (missing: $still_missing)"

log "missing: ${still_missing:-<forced>}; installing ${PACKAGES[*]}"
start_ts=$(date +%s)

# Forbid service starts by maintainer scripts (no systemd; we run daemons ourselves).
POLICY=/usr/sbin/policy-rc.d
POLICY_BACKUP=""
if [[ -e $POLICY ]]; then
    POLICY_BACKUP="$(mktemp /tmp/policy-rc.d.XXXXXX)"
    cp -p "$POLICY" "$POLICY_BACKUP"
fi
restore_policy() {
    if [[ -n "$POLICY_BACKUP" ]]; then
        cp -p "$POLICY_BACKUP" "$POLICY" && rm -f "$POLICY_BACKUP"
    else
        rm -f "$POLICY"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\nexit 101\n' >"$POLICY"
chmod 755 "$POLICY"

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
          --no-install-recommends)
# Only refresh the package lists when they are missing or the install fails.
if ! apt-get install "${APT_OPTS[@]}" "${PACKAGES[@]}"; then
    log "apt-get install failed, running apt-get update and retrying"
    apt-get update -q
    apt-get install "${APT_OPTS[@]}" "${PACKAGES[@]}"
fi

still_missing="$(missing_binaries)"
[[ -z "$still_missing" ]] || die "still missing after install: $still_missing"
log "installed in $(( $(date +%s) - start_ts )) s"
