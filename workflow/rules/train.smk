# Training: one run per (variant, lambda, seed) in results/train/<variant>/lmbda<L>/seed<k>/. The
# run YAML holds the experiment; `--set` adds how to run it (device first). Re-running an
# interrupted job resumes from the run's own checkpoint (checkpoint_last.pth.tar is deliberately
# not a declared output, so Snakemake never deletes it).


localrules:
    run_config,
    check_checkpoint,


# Each official checkpoint is checked once before any run starts from it: it must load into the
# configured model, and a lambda its labels or name state must be the one it is listed for
# (python -m hpcm.models.check says what it cannot detect).
rule check_checkpoint:
    input:
        official_checkpoint,
    output:
        PATHS["checkpoint_check"],
    log:
        "logs/check_checkpoint/lmbda{lmbda}.log",
    params:
        model=config["model"],
        distortion=config["distortion"],
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.models.check {input} --model {params.model} --lmbda {wildcards.lmbda} "
        "--distortion {params.distortion} --output {output} > {log} 2>&1"


rule run_config:
    input:
        unpack(sample_inputs),
        init=init_checkpoint,
        checked=checked_init,
    output:
        PATHS["run_config"],
    log:
        "logs/run_config/{variant}/lmbda{lmbda}/seed{seed}.log",
    params:
        run=run_config,
    run:
        write_yaml(output[0], params.run, log[0])


rule train:
    input:
        unpack(sample_inputs),
        config=PATHS["run_config"],
        init=init_checkpoint,
    output:
        # The selected weights (a hard link to epoch_best.pth.tar, tables updated), protected
        # against accidental deletion; `done` is written last by the trainer.
        weights=protected(PATHS["final_weights"]),
        done=PATHS["done"],
    log:
        "logs/train/{variant}/lmbda{lmbda}/seed{seed}.log",
    benchmark:
        PATHS["train_benchmark"]
    params:
        outdir=run_dir_of,
        settings=runtime_settings,
        gpu_lock=gpu_lock_of("train"),
        launcher=train_launcher,
    threads: threads_of("train")
    resources:
        gpu=gpus_of("train"),
        mem_mb=mem_mb_of("train"),
        runtime=runtime_of("train"),
    retries: retries_of("train")
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "{params.gpu_lock}"
        "{params.launcher} -m hpcm.train --config {input.config} --output-dir {params.outdir} {params.settings} "
        ">> {log} 2>&1 && "
        "ln -f {params.outdir}/epoch_best.pth.tar {output.weights}"
