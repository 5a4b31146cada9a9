# Evaluation: real bitstreams of every trained run on every evaluation dataset (one job per
# (dataset, variant, lambda)); per-image CSV + CompressAI-format JSON.


rule evaluate:
    input:
        unpack(eval_inputs),
        weights="results/train/{variant}/lmbda{lmbda}/final.pth.tar",
    output:
        csv="results/eval/{dataset}/{variant}/lmbda{lmbda}.csv",
        json="results/eval/{dataset}/{variant}/lmbda{lmbda}.json",
    log:
        "logs/evaluate/{dataset}/{variant}/lmbda{lmbda}.log",
    benchmark:
        "results/benchmarks/evaluate/{dataset}/{variant}/lmbda{lmbda}.tsv"
    params:
        data=lookup_eval_dir,
        model=config["model"],
        device=config["device"],
        gpu_lock=gpu_lock,
    threads: threads_of("evaluate")
    resources:
        gpu=gpus_per_job,
        mem_mb=mem_mb_of("evaluate"),
        runtime=runtime_of("evaluate"),
    retries: retries_of("evaluate")
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "{params.gpu_lock}"
        "python -m hpcm.evaluate --checkpoint {input.weights} --dataset {params.data:q} "
        "--output {output.csv} --json {output.json} --dataset-name {wildcards.dataset} "
        "--model {params.model} --variant {wildcards.variant} --lmbda {wildcards.lmbda} "
        "--device {params.device} > {log} 2>&1"
