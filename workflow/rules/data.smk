# Images: the embedded sample photos (train / val / test splits) and the checksum-verified
# evaluation sets (Kodak, CLIC 2020 professional validation), prepared once and shared by all runs.
# Both run on the submitting host under SLURM: they are light, and downloads need the network.


localrules:
    export_samples,
    prepare_dataset,


rule export_samples:
    output:
        train=directory(f"{SAMPLES_DIR}/train"),
        val=directory(f"{SAMPLES_DIR}/val"),
        test=directory(f"{SAMPLES_DIR}/test"),
    log:
        "logs/export_samples/samples.log",
    params:
        outdir=parent_of_train,
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.data export-samples --output {params.outdir} > {log} 2>&1"


rule prepare_dataset:
    output:
        directory("results/data/{dataset}"),
    wildcard_constraints:
        dataset=alternatives(STUDY.prepared_datasets),
    log:
        "logs/prepare_dataset/{dataset}.log",
    params:
        args=prepare_args,
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.data prepare {params.args} --output {output} > {log} 2>&1"
