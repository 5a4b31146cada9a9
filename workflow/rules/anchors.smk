# Codec anchors of the evaluation datasets (datasets.<d>.anchors in the study config): one job per
# (dataset, anchor, quality, image), so that every VTM encode (30-450 s per Kodak image) is kept and
# reused when the DAG is re-run or resumed; then one per-image CSV + CompressAI-style JSON per
# (dataset, anchor). The image list comes from a checkpoint on the dataset's folder.
localrules:
    anchor_images,
    anchor,


check_anchor_codecs()  # anchor_functions.smk: a missing VTM build stops the workflow here


checkpoint anchor_images:
    input:
        unpack(eval_inputs),
    output:
        PATHS["anchor_images"],
    log:
        "logs/anchor_images/{dataset}.log",
    params:
        data=lookup_eval_dir,
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.evaluate.codec_anchor images --data {params.data:q} --output {output} "
        "> {log} 2>&1"


rule anchor_point:
    input:
        image=anchor_image,
        cfg=anchor_cfg,
    output:
        PATHS["anchor_point"],
    wildcard_constraints:
        anchor=alternatives({a for _, a, _ in STUDY.anchors()}),
        quality=r"\d+",
        image=r".+",
    log:
        "logs/anchor_point/{dataset}/{anchor}/q{quality}/{image}.log",
    params:
        codec=anchor_codec_args,
    threads: 1
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.evaluate.codec_anchor point {params.codec} --quality {wildcards.quality} "
        "--image {input.image:q} --name {wildcards.image:q} --dataset {wildcards.dataset} "
        "--anchor {wildcards.anchor} --output {output:q} > {log:q} 2>&1"


rule anchor:
    input:
        anchor_point_files,
    output:
        csv=PATHS["anchor_csv"],
        json=PATHS["anchor_json"],
    wildcard_constraints:
        anchor=alternatives({a for _, a, _ in STUDY.anchors()}),
    log:
        "logs/anchor/{dataset}/{anchor}.log",
    conda:
        "../../envs/hpcm.yaml"
    shell:
        "python -m hpcm.evaluate.codec_anchor collect --points {input:q} --output {output.csv} "
        "--json {output.json} > {log} 2>&1"
