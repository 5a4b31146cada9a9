# Codec anchors of the evaluation datasets (datasets.<d>.anchors in the study config): one job per
# (dataset, anchor, quality, image), so that every VTM encode (30-450 s per Kodak image) is kept and
# reused when the DAG is re-run or resumed; then one per-image CSV + CompressAI-style JSON per
# (dataset, anchor). The image list comes from a checkpoint on the dataset's folder.
from hpcm.evaluate.codecs import CodecError, check_codec


localrules:
    anchor_images,
    anchor,


def check_anchor_codecs():
    """A missing VTM build or cfg stops the workflow before anything runs, naming the key."""
    for dataset, name, spec in STUDY.anchors():
        try:
            check_codec(spec["codec"], spec, f"datasets.{dataset}.anchors.{name}")
        except CodecError as err:
            raise WorkflowError(str(err)) from None


def anchor_spec(wildcards):
    return STUDY.datasets[wildcards.dataset]["anchors"][wildcards.anchor]


def anchor_point_files(wildcards):
    """Every (quality, image) point of one anchor, once the dataset's image list exists."""
    listing = checkpoints.anchor_images.get(dataset=wildcards.dataset).output[0]
    with open(listing) as handle:
        images = [line.rstrip("\n") for line in handle if line.strip()]
    return [study_config.path("anchor_point", dataset=wildcards.dataset, anchor=wildcards.anchor,
                              quality=q, image=image)
            for q in anchor_spec(wildcards)["qualities"] for image in images]


def anchor_image(wildcards):
    return os.path.join(STUDY.eval_dir(wildcards.dataset), wildcards.image)


def anchor_codec_args(wildcards):
    spec = anchor_spec(wildcards)
    args = ["--codec", spec["codec"]]
    for key in ("build_dir", "cfg"):
        if spec.get(key):
            args += [f"--{key.replace('_', '-')}", spec[key]]
    return " ".join(shlex.quote(str(a)) for a in args)


def anchor_cfg(wildcards):
    """The VTM cfg as an input: a changed cfg re-runs the encodes (the binaries do not)."""
    cfg = anchor_spec(wildcards).get("cfg")
    return [cfg] if cfg else []


check_anchor_codecs()


checkpoint anchor_images:
    input:
        unpack(eval_inputs),
    output:
        PATHS["anchor_images"],
    log:
        "logs/anchor_images/{dataset}.log",
    params:
        data=lookup_eval_dir,
    run:
        from hpcm.data.images import list_images

        root = params.data
        names = [os.path.relpath(p, root) for p in list_images(root)]
        if not names:
            raise WorkflowError(f"no images in {root} (dataset {wildcards.dataset})")
        with open(output[0], "w") as handle:
            handle.write("".join(f"{n}\n" for n in names))
        with open(log[0], "w") as handle:
            handle.write(f"{len(names)} images under {root}\n")


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
