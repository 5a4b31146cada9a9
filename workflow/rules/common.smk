# Helpers of the study grid: config validation, variant resolution, paths and input functions.
# Rules live in the other modules; this file holds only Python (Snakemake best practice).
import importlib.util
import itertools
import os
import re
import shlex

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

# The ablation presets' values live in hpcm.presets alone (Snakemake puts the repository root,
# the Snakefile's folder, on sys.path; the module needs nothing beyond the standard library).
from hpcm.config import presets

# Run-config keys a variant may set (they go into the run YAML of `python -m hpcm.train`).
VARIANT_RUN_KEYS = (
    "optimizer",
    "gamma",
    "gamma_final",
    "gamma_schedule",
    "gamma_warmup",
    "gamma_step_milestones",
    "gamma_step_factor",
    "w_lr",
    "update_mode",
    "decomposition",
    "gammas",
    "gammas_final",
    "gamma_strategy",
    "scale_weights",
    "steps",
    "lr",
    "lr_milestones",
    "lr_values",
    "patch_size",
    "batch_size",
    "clip_max_norm",
    "seed",
)
# `training` keys that define the experiment (run YAML) ...
TRAINING_RUN_KEYS = (
    "steps",
    "patch_size",
    "batch_size",
    "lr",
    "lr_milestones",
    "lr_values",
    "clip_max_norm",
    "update_mode",
    "seed",
    "bf16",
)
# ... and those that only say how to run it (passed with --set, so the YAML stays the experiment).
TRAINING_RUNTIME_KEYS = (
    "num_workers",
    "log_every",
    "val_every",
    "checkpoint_every",
    "skip_bad_images",
    "wandb_mode",
    "wandb_project",
    "wandb_entity",
    "quiet",
)
SAMPLES_DIR = "results/data/samples"
RUNS_DIR = "results/train"
TABLES_DIR = "results/tables"
TRAIN_BENCHMARKS_DIR = "results/benchmarks/train"


def config_error(key, message):
    return WorkflowError(f"config key '{key}': {message}")


def validate_config(cfg):
    """Schema validation (fills in defaults); the error names the offending key."""
    try:
        validate(cfg, schema="../schemas/config.schema.yaml")
    except WorkflowError as err:
        # The jsonschema error is the exception being handled when validate() raised.
        candidates = list(err.args) + [err.__cause__, err.__context__]
        cause = next((a for a in candidates if hasattr(a, "absolute_path")), None)
        if cause is None:
            raise
        key = ".".join(str(part) for part in cause.absolute_path) or "<top level>"
        raise config_error(key, cause.message) from None


def fmt_lmbda(value):
    """Canonical text of a lambda in paths and wildcards: 0.0018 -> '0.0018', 1.0 -> '1'."""
    return f"{float(value):.10f}".rstrip("0").rstrip(".")


def fmt_value(value):
    return fmt_lmbda(value) if isinstance(value, float) else str(value)


def expand_grids(cfg):
    """One variant per point of every grid: `<grid>-<key><value>-...`, base keys + the point."""
    expanded = {}
    for grid_name, grid in cfg["grids"].items():
        axes = list(grid["axes"].items())
        for point in itertools.product(*(values for _, values in axes)):
            keys = dict(zip((key for key, _ in axes), point))
            name = "-".join([grid_name] + [f"{k}{fmt_value(v)}" for k, v in keys.items()])
            variant = dict(grid["base"])
            variant.update(keys)
            if not variant.get("description"):
                variant["description"] = grid["description"] or f"grid {grid_name}"
            if name in cfg["variants"] or name in expanded:
                raise config_error(f"grids.{grid_name}", f"expands to {name!r}, which is already a variant")
            expanded[name] = variant
    return expanded


def resolve_variants(cfg):
    """Variants with `extends` chains applied; returns {name: {key: value}} without null keys."""
    raw = dict(cfg["variants"])
    raw.update(expand_grids(cfg))
    resolved = {}

    def resolve(name, chain):
        if name in resolved:
            return resolved[name]
        if name not in raw:
            raise config_error(f"variants.{chain[-1]}.extends", f"unknown variant {name!r}")
        if name in chain:
            raise config_error(f"variants.{name}.extends", f"cycle {' -> '.join(chain + [name])}")
        entry = {k: v for k, v in raw[name].items() if v is not None}
        for key in presets.NAMED_KEYS.keys() & entry.keys():  # `scale_weights: equal` -> its numbers
            try:
                entry[key] = presets.preset_value(key, entry[key])
            except ValueError as err:
                raise config_error(f"variants.{name}.{key}", str(err)) from None
        parent = entry.pop("extends", None)
        merged = dict(resolve(parent, chain + [name])) if parent else {}
        merged.pop("description", None)
        merged.update(entry)
        resolved[name] = merged
        return merged

    for name in raw:
        resolve(name, [])
    for name, variant in resolved.items():
        if "optimizer" not in variant:
            raise config_error(f"variants.{name}.optimizer", "no optimizer (set it or `extends` a variant that does)")
    return resolved


def check_references(cfg, variants, lambdas):
    """Every name the config refers to exists; fine-tuning sources exist for every lambda."""
    official = {fmt_lmbda(entry["lmbda"]) for entry in cfg["official_checkpoints"]}
    for name, variant in variants.items():
        source = variant.get("init_from")
        if source is None:
            continue
        if source == "official":
            missing = [l for l in lambdas if l not in official]
            if missing:
                raise config_error(
                    f"variants.{name}.init_from",
                    f"'official' needs official_checkpoints entries for lambda {', '.join(missing)}",
                )
        elif source not in variants:
            raise config_error(f"variants.{name}.init_from", f"unknown variant {source!r}")
        elif source == name:
            raise config_error(f"variants.{name}.init_from", "a variant cannot fine-tune from itself")
    analysis = cfg["analysis"]
    named = [("analysis.reference", analysis["reference"])]
    named += [(f"analysis.gains.{label}", v) for label, v in analysis["gains"].items()]
    for study, spec in analysis["studies"].items():
        named += [(f"analysis.studies.{study}.rows.{label}", v) for label, v in spec["rows"].items()]
    for key, name in named:
        if name not in variants:
            raise config_error(key, f"unknown variant {name!r} (known: {', '.join(variants)})")
    for name, spec in cfg["datasets"].items():
        if spec["kind"] == "folder" and not spec["source"]:
            raise config_error(f"datasets.{name}.source", "kind 'folder' needs a source directory")
        if spec["only"] and spec["kind"] != "kodak":
            raise config_error(f"datasets.{name}.only", "a subset is only supported for kind 'kodak'")


def alternatives(names):
    """A wildcard constraint that matches exactly the given names (nothing when there are none)."""
    if not names:
        return "(?!)"
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------
def run_dir(variant, lmbda):
    return f"{RUNS_DIR}/{variant}/lmbda{lmbda}"


def final_weights(variant, lmbda):
    return f"{run_dir(variant, lmbda)}/final.pth.tar"


def data_dir(source, split):
    """'samples' -> the exported split; anything else is a directory used as it is."""
    return f"{SAMPLES_DIR}/{split}" if source == "samples" else source


def eval_dir(dataset):
    spec = DATASETS[dataset]
    if spec["kind"] == "samples":
        return f"{SAMPLES_DIR}/test"
    if spec["kind"] == "folder":
        return spec["source"]
    return f"results/data/{dataset}"


def all_runs():
    return [(v, l) for v in VARIANTS for l in LAMBDAS]


# ---------------------------------------------------------------------------------------------
# Input functions and params
# ---------------------------------------------------------------------------------------------
def init_checkpoint(wildcards):
    """The file a fine-tuning variant starts from ([] when it trains from scratch)."""
    source = VARIANTS[wildcards.variant].get("init_from")
    if source is None:
        return []
    if source == "official":
        return [OFFICIAL_CHECKPOINTS[wildcards.lmbda]]
    return [final_weights(source, wildcards.lmbda)]


def sample_inputs(wildcards):
    """The exported sample splits when training/validation use them (a DAG dependency); a
    user directory is passed as a parameter instead, so a dry run never needs the data present."""
    inputs = {}
    if config["train_data"] == "samples":
        inputs["train_data"] = f"{SAMPLES_DIR}/train"
    if config["val_data"] == "samples":
        inputs["val_data"] = f"{SAMPLES_DIR}/val"
    return inputs


def run_config(wildcards, input):
    """The run YAML of one (variant, lambda): training defaults, then the variant's keys."""
    variant = VARIANTS[wildcards.variant]
    run = {key: config["training"][key] for key in TRAINING_RUN_KEYS}
    run.update({key: variant[key] for key in VARIANT_RUN_KEYS if key in variant})
    run.update(
        model=config["model"],
        variant=wildcards.variant,
        lmbda=LAMBDAS[wildcards.lmbda],
        train_data=data_dir(config["train_data"], "train"),
        val_data=data_dir(config["val_data"], "val"),
        init_checkpoint=input.init[0] if input.init else None,
    )
    return run


def runtime_settings(wildcards):
    """`--set` arguments that say how, not what, to train (device first: it is always explicit)."""
    settings = {"device": config["device"]}
    settings.update({key: config["training"][key] for key in TRAINING_RUNTIME_KEYS})
    settings["wandb_project"] = f"{settings['wandb_project']}-{config['study']}"
    return " ".join(f"--set {key}={yaml_scalar(value)}" for key, value in settings.items())


def yaml_scalar(value):
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return shlex.quote(text)


def parent_of_train(wildcards, output):
    return os.path.dirname(output.train)


def run_dir_of(wildcards, output):
    return os.path.dirname(output.done)


def gpus_per_job(wildcards):
    return 0 if config["device"] == "cpu" else 1


def gpu_lock(wildcards):
    """Shell prefix that pins a local GPU job to one free device (no-op under SLURM or <= 1 GPU).

    Snakemake counts `--resources gpu=N` but does not say which device a job gets, so concurrent
    jobs would all land on cuda:0; each job takes the first free lock file instead and the lock is
    held (fd 9) until the job's shell exits.
    """
    n = config["local_gpus"]
    if n <= 1 or config["device"] == "cpu":
        return ""
    return (
        'if [ -z "${SLURM_JOB_ID:-}" ]; then mkdir -p .snakemake/gpu-locks; gpu_found=0; '
        f"for gpu in $(seq 0 {n - 1}); do exec 9>.snakemake/gpu-locks/gpu$gpu; "
        "if flock -n 9; then export CUDA_VISIBLE_DEVICES=$gpu; gpu_found=1; break; fi; exec 9>&-; done; "
        f'[ $gpu_found = 1 ] || {{ echo "all {n} local GPUs are locked" >&2; exit 1; }}; fi; '
    )


def warn_if_gpus_unlimited():
    """Locally, nothing but `--resources gpu=N` stops Snakemake from starting more GPU jobs than
    there are GPUs; say so before the run rather than after an out-of-memory error."""
    if config["device"] != "cpu" and workflow.local_exec and "gpu" not in workflow.global_resources:
        logger.warning(
            f"device is {config['device']!r} but no GPU limit was given: "
            "pass --resources gpu=N (N = GPUs on this machine) to avoid oversubscribing them"
        )


def threads_of(rule_name):
    return config["compute"][rule_name]["threads"]


def mem_mb_of(rule_name):
    def mem_mb(wildcards, attempt):
        return int(config["compute"][rule_name]["mem_mb"] * (1 + 0.5 * (attempt - 1)))

    return mem_mb


def runtime_of(rule_name):
    """Minutes, multiplied by the attempt number and capped at the partition limit."""

    def runtime(wildcards, attempt):
        spec = config["compute"][rule_name]
        return min(spec["runtime"] * attempt, spec["max_runtime"])

    return runtime


def retries_of(rule_name):
    return config["compute"][rule_name]["retries"]


def eval_inputs(wildcards):
    """The evaluation images as an input when the DAG makes them (samples, kodak, clic)."""
    if DATASETS[wildcards.dataset]["kind"] == "folder":
        return {}
    return {"data": eval_dir(wildcards.dataset)}


def prepare_args(wildcards):
    """Arguments of `python -m hpcm.datasets prepare` for one configured dataset."""
    spec = DATASETS[wildcards.dataset]
    args = [spec["kind"]]
    if spec["source"]:
        args += ["--source", spec["source"]]
    if spec["only"]:
        args += ["--only", ",".join(spec["only"])]
    return " ".join(shlex.quote(a) for a in args)


def lookup_eval_dir(wildcards):
    return eval_dir(wildcards.dataset)


def all_eval_csvs():
    return [
        f"results/eval/{dataset}/{variant}/lmbda{lmbda}.csv"
        for dataset in DATASETS
        for variant, lmbda in all_runs()
    ]


def all_done_markers():
    return [f"{run_dir(variant, lmbda)}/done" for variant, lmbda in all_runs()]


def table_names():
    """The tables `python -m hpcm.tables` writes for this config (see its docstring)."""
    analysis = config["analysis"]
    names = [f"bd_vs_{analysis['reference']}"]
    names += [f"bd_vs_anchor-{anchor}" for anchor in analysis["anchors"]]
    names += ["expected_gains"] if analysis["gains"] else []
    names += list(analysis["studies"])
    return names + ["overhead"]


def table_outputs():
    """Every table as CSV (in the report), Markdown and LaTeX."""
    outputs = []
    for name in table_names():
        caption = "../report/table_bd.rst" if name.startswith("bd_vs_") else f"../report/table_{table_kind(name)}.rst"
        outputs.append(report(f"{TABLES_DIR}/{name}.csv", caption=caption, category="Tables"))
        outputs += [f"{TABLES_DIR}/{name}.md", f"{TABLES_DIR}/{name}.tex"]
    return outputs


def table_kind(name):
    return name if name in ("expected_gains", "overhead") else "study"


def runs_root(wildcards, input):
    """results/train, from the run markers results/train/<variant>/lmbda<l>/done."""
    return os.path.dirname(os.path.dirname(os.path.dirname(input.runs[0])))


def tables_dir(wildcards, output):
    return os.path.dirname(output[0])


def parent_of_png(wildcards, output):
    return os.path.dirname(output.png)


def write_yaml(path, content, log_path):
    """Write a small YAML file from a `run:` rule. Not atomic on purpose: Snakemake marks an
    interrupted job's outputs incomplete and regenerates them (--rerun-incomplete)."""
    import yaml

    with open(path, "w") as handle:
        yaml.safe_dump(content, handle, sort_keys=False)
    with open(log_path, "w") as handle:
        handle.write(f"wrote {path}\n")


def final_outputs():
    targets = all_eval_csvs()
    targets += [f"{TABLES_DIR}/{name}.{ext}" for name in table_names() for ext in ("csv", "md", "tex")]
    targets += ["results/plots/rd", "results/plots/runs", "results/plots/gamma_schedules.png"]
    targets += analysis_outputs()  # analysis.smk: the Phase 2 grid tables and heatmaps, the summary table
    return targets


# Phase 2 grid tables and the summary table (analysis.smk). Bootstrap intervals need the per-image
# evaluation CSVs and hpcm.analysis.bootstrap; until that module is present the tables are written
# without intervals and say so in their notes.
INTERVALS = importlib.util.find_spec("hpcm.analysis.bootstrap") is not None


def grid_includes(grid):
    """The variant a grid's base extends (e.g. phase1) is a point of the same search."""
    base = config["grids"][grid]["base"].get("extends")
    return [base] if base in VARIANTS else []


def grid_done_markers(wildcards):
    names = [v for v in VARIANTS if v.startswith(f"{wildcards.grid}-")] + grid_includes(wildcards.grid)
    return [f"{run_dir(v, l)}/done" for v in names for l in LAMBDAS]


def analysis_outputs():
    outputs = [f"{TABLES_DIR}/{grid}.{ext}" for grid in config["grids"] for ext in ("csv", "md", "tex")]
    outputs += [f"results/plots/{grid}.png" for grid in config["grids"]]
    return outputs + [f"{TABLES_DIR}/summary.{ext}" for ext in ("csv", "md", "tex")]


def eval_csv_option(wildcards, input):
    """`--eval-csv FILES` when the rule has the per-image CSVs as input (bootstrap intervals)."""
    return f"--eval-csv {' '.join(input.evals)}" if input.evals else ""


# ---------------------------------------------------------------------------------------------
# The study grid, resolved once at start (schema defaults filled in, references checked)
# ---------------------------------------------------------------------------------------------
validate_config(config)
LAMBDAS = {fmt_lmbda(l): float(l) for l in config["lambdas"]}
VARIANTS = resolve_variants(config)
check_references(config, VARIANTS, LAMBDAS)
DATASETS = config["datasets"]
PREPARED_DATASETS = [n for n, spec in DATASETS.items() if spec["kind"] in ("kodak", "clic2020-professional", "tecnick")]
OFFICIAL_CHECKPOINTS = {fmt_lmbda(e["lmbda"]): e["path"] for e in config["official_checkpoints"]}


wildcard_constraints:
    variant=alternatives(VARIANTS),
    lmbda=alternatives(LAMBDAS),
    dataset=alternatives(DATASETS),
