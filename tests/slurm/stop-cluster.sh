#!/usr/bin/env bash
# Stop the cluster of tests/slurm/start-cluster.sh (same $HPCM_SLURM_DIR): its daemons by their pid
# files, nothing else. Its files stay for inspection; the next start begins from a clean state.
set -uo pipefail

DIR="${HPCM_SLURM_DIR:-${TMPDIR:-/tmp}/hpcm-slurm}"

stop() {  # pid file: TERM, wait up to 10 s, then KILL
    local pidfile="$1" pid
    [ -f "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
}

stop "$DIR/slurmd.pid"
stop "$DIR/slurmctld.pid"
stop "$DIR/munged.pid"
# the link start-cluster.sh made, only if it is still this cluster's
[ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$DIR/slurm.conf" ] && rm -f /etc/slurm/slurm.conf
# job state of this cluster (a restart must not bring back the jobs of the last run)
rm -rf "$DIR/state" "$DIR/spool"
