# Evaluation: real bitstreams of every trained run on every evaluation dataset (one job per
# (dataset, variant, lambda, seed)); per-image CSV + CompressAI-format JSON. The labels come from the
# checkpoint's own metadata; the wildcards are passed too, so that a mismatch fails the job.


rule evaluate:
    input:
        unpack(eval_inputs),
        weights=PATHS["final_weights"],
    output:
        csv=PATHS["eval_csv"],
        json=PATHS["eval_json"],
    log:
        "logs/evaluate/{dataset}/{variant}/lmbda{lmbda}/seed{seed}.log",
    benchmark:
        PATHS["eval_benchmark"]
    params:
        data=lookup_eval_dir,
        model=config["model"],
        device=config["device"],
        gpu_lock=gpu_lock_of("evaluate"),
    threads: threads_of("evaluate")
    resources:
        gpu=gpus_of("evaluate"),
        mem_mb=mem_mb_of("evaluate"),
        runtime=runtime_of("evaluate"),
    retries: retries_of("evaluate")
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "{params.gpu_lock}"
        "python -m hpcm.evaluate --checkpoint {input.weights} --dataset {params.data:q} "
        "--output {output.csv} --json {output.json} --dataset-name {wildcards.dataset} "
        "--model {params.model} --variant {wildcards.variant} --lmbda {wildcards.lmbda} --seed {wildcards.seed} "
        "--device {params.device} > {log} 2>&1"


# The control rows (`control: true`): each lambda's official checkpoint evaluated with no training,
# as the variant warm_start (seed 0), so that the tables show where fine-tuned variants started.
rule evaluate_control:
    input:
        unpack(eval_inputs),
        weights=official_checkpoint,
    output:
        csv=control_path("eval_csv"),
        json=control_path("eval_json"),
    log:
        f"logs/evaluate/{{dataset}}/{CONTROL_VARIANT}/lmbda{{lmbda}}/seed0.log",
    params:
        data=lookup_eval_dir,
        model=config["model"],
        device=config["device"],
        variant=CONTROL_VARIANT,
        gpu_lock=gpu_lock_of("evaluate"),
    threads: threads_of("evaluate")
    resources:
        gpu=gpus_of("evaluate"),
        mem_mb=mem_mb_of("evaluate"),
        runtime=runtime_of("evaluate"),
    retries: retries_of("evaluate")
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "{params.gpu_lock}"
        "python -m hpcm.evaluate --checkpoint {input.weights} --dataset {params.data:q} "
        "--output {output.csv} --json {output.json} --dataset-name {wildcards.dataset} "
        "--model {params.model} --variant {params.variant} --lmbda {wildcards.lmbda} --seed 0 "
        "--device {params.device} > {log} 2>&1"


# Convergence (`convergence`): every kept training snapshot epoch_<step>.pth.tar of a run, evaluated
# with real bitstreams on the first `convergence.images` images of `convergence.dataset` (one job
# and one process per run; the final step is the run's ordinary evaluation).
if STUDY.convergence_steps():

    rule evaluate_snapshots:
        input:
            unpack(eval_inputs),
            done=PATHS["done"],
        output:
            snapshot_outputs(),
        log:
            "logs/evaluate_snapshots/{dataset}/{variant}/lmbda{lmbda}/seed{seed}.log",
        wildcard_constraints:
            dataset=alternatives([config["convergence"]["dataset"]]),
        params:
            args=snapshot_args,
        threads: threads_of("evaluate")
        resources:
            mem_mb=mem_mb_of("evaluate"),
            runtime=runtime_of("evaluate"),
        retries: retries_of("evaluate")
        conda:
            "../../envs/hpcm.yaml"
        shell:
            "python -m hpcm.analysis.snapshots {params.args} > {log} 2>&1"
