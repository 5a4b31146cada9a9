# Images: the embedded sample photos (train / val / test splits) and the checksum-verified
# evaluation sets (Kodak, CLIC 2020 professional validation).


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
        dataset=alternatives(PREPARED_DATASETS),
    log:
        "logs/prepare_dataset/{dataset}.log",
    params:
        kind=lookup(dpath="datasets/{dataset}/kind", within=config),
        source=lookup(dpath="datasets/{dataset}/source", within=config),
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.datasets prepare {params.kind} --source {params.source:q} --output {output} > {log} 2>&1"
