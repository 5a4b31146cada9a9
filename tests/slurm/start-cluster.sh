#!/usr/bin/env bash
# A one-node SLURM cluster for the tests (Debian packages slurm-wlm and munge), every file under
# one directory: $HPCM_SLURM_DIR, default ${TMPDIR:-/tmp}/hpcm-slurm. Root only (slurmd runs jobs
# as their users). Idempotent: a running cluster of this directory is left as it is.
#
#   tests/slurm/start-cluster.sh         # prints the SLURM_CONF line to export
#   tests/slurm/stop-cluster.sh          # stops the daemons this script started
#
# One file outside the directory: /etc/slurm/slurm.conf, a link to $DIR/slurm.conf (removed by
# stop-cluster.sh). The SLURM executor plugin's job step (snakemake-executor-plugin-slurm-jobstep
# 0.6.1) runs `srun` with every SLURM_* variable but a few removed, SLURM_CONF included, so the
# nested srun reads only the compiled-in default path (Slurm 22.05 has no other fallback). A real
# slurm.conf there is never replaced: the script refuses. munged runs with its own key and socket,
# slurmctld and slurmd on ports 6917 and 6918, so a system munged or cluster is not disturbed.
# Exit codes: 0 up, 3 refused (a real slurm.conf is in the way), 1 anything else.
set -euo pipefail

DIR="${HPCM_SLURM_DIR:-${TMPDIR:-/tmp}/hpcm-slurm}"
CONF="$DIR/slurm.conf"
NODE="$(hostname -s)"

die() { echo "start-cluster.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (slurmd runs the jobs as their users)"
for tool in munged slurmctld slurmd sbatch squeue scontrol; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || die "$tool not found: apt-get install slurm-wlm munge"
done
export PATH="$PATH:/usr/sbin"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$DIR/munged.pid" && alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" \
    && SLURM_CONF="$CONF" scontrol ping >/dev/null 2>&1; then
    echo "export SLURM_CONF=$CONF"
    exit 0
fi
# Something is half up (or a stale directory): stop it and start from a clean state.
"$(dirname "$0")/stop-cluster.sh" >/dev/null 2>&1 || true

ETC_CONF=/etc/slurm/slurm.conf
if [ -e "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" != "$CONF" ]; then
    echo "start-cluster.sh: $ETC_CONF exists and is not this test cluster's: not replacing a real cluster's config" >&2
    exit 3
fi

mkdir -p "$DIR"/{munge,state,spool,log}
chmod 711 "$DIR/munge"  # the socket must be reachable by every user, the key stays root's
# munge: its own key and socket (the system's munged, if any, is not touched)
if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 400 "$DIR/munge/munge.key"
munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"

# CPUs and memory are declared, not detected (config_overrides): jobs of this test study are small
# and mostly wait, so the node accepts more of them at once than it has cores.
cat > "$CONF" <<CONF
ClusterName=hpcmtest
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No accounting database: sacct has nothing to ask, job states come from slurmctld (squeue), which
# keeps a finished job for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=8 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

mkdir -p /etc/slurm
ln -sfn "$CONF" "$ETC_CONF"
export SLURM_CONF="$CONF"
slurmctld -i
slurmd -N "$NODE"
for _ in $(seq 60); do
    if scontrol ping >/dev/null 2>&1 && sinfo -h -N -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        echo "export SLURM_CONF=$CONF"
        exit 0
    fi
    sleep 0.5
done
echo "start-cluster.sh: the cluster did not come up within 30 s; daemon logs in $DIR/log:" >&2
tail -n 20 "$DIR"/log/*.log >&2 || true
exit 1
