# Sourced by a local GPU job's shell (workflow/rules/common.smk gpu_lock):
#
#   . workflow/scripts/gpu-lock.sh LOCAL_GPUS NEEDED
#
# takes NEEDED of the LOCAL_GPUS devices, each by a lock file .snakemake/gpu-locks/gpu<i> held on
# an open file descriptor until the job's shell exits, and exports CUDA_VISIBLE_DEVICES=a,b,...
# Snakemake's `--resources gpu=N` bounds how many GPUs the running jobs ask for, but not which ones
# they get. All or nothing: the devices are taken under one claim lock, so two jobs never each hold
# a part of what the other needs (no deadlock); a job that cannot get all of them releases what it
# took and fails at once, naming the shortfall. Under SLURM (SLURM_JOB_ID set) nothing is done:
# SLURM assigns the devices.
if [ -z "${SLURM_JOB_ID:-}" ]; then
    gpu_lock_total="$1"
    gpu_lock_needed="$2"
    gpu_lock_dir=.snakemake/gpu-locks
    mkdir -p "$gpu_lock_dir"
    exec {gpu_lock_claim}>"$gpu_lock_dir/claim"
    flock "$gpu_lock_claim"  # blocking: claims are short and nothing waits while holding a device
    gpu_lock_devices=()
    gpu_lock_fds=()
    for gpu_lock_i in $(seq 0 $((gpu_lock_total - 1))); do
        [ "${#gpu_lock_devices[@]}" -lt "$gpu_lock_needed" ] || break
        exec {gpu_lock_fd}>"$gpu_lock_dir/gpu$gpu_lock_i"
        if flock -n "$gpu_lock_fd"; then
            gpu_lock_devices+=("$gpu_lock_i")
            gpu_lock_fds+=("$gpu_lock_fd")
        else
            exec {gpu_lock_fd}>&-
        fi
    done
    if [ "${#gpu_lock_devices[@]}" -lt "$gpu_lock_needed" ]; then
        for gpu_lock_fd in "${gpu_lock_fds[@]}"; do exec {gpu_lock_fd}>&-; done
        exec {gpu_lock_claim}>&-
        echo "only ${#gpu_lock_devices[@]} of the $gpu_lock_total local GPUs are free, this job needs" \
             "$gpu_lock_needed: pass --resources gpu=N with N = local_gpus so that Snakemake never starts more" \
             "GPU jobs than the devices can hold" >&2
        exit 1
    fi
    exec {gpu_lock_claim}>&-
    CUDA_VISIBLE_DEVICES="$(IFS=,; echo "${gpu_lock_devices[*]}")"
    export CUDA_VISIBLE_DEVICES
fi
