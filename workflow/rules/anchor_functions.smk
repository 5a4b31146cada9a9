# Input functions and the startup check of the codec-anchor rules (anchors.smk); Snakemake's lint
# wants functions apart from rules. Included from the Snakefile before anchors.smk.
from hpcm.evaluate.codecs import CodecError, check_codec


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
    for key in ("build_dir", "cfg", "colour"):
        if spec.get(key):
            args += [f"--{key.replace('_', '-')}", spec[key]]
    return " ".join(shlex.quote(str(a)) for a in args)


def anchor_cfg(wildcards):
    """The VTM cfg as an input: a changed cfg re-runs the encodes (the binaries do not)."""
    cfg = anchor_spec(wildcards).get("cfg")
    return [cfg] if cfg else []
