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
