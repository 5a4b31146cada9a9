# Snakemake glue: the study config is validated and resolved by hpcm.config.study (grid, variants,
# paths, run YAMLs, every check); this file only adapts it to wildcards, input functions and
# resources. Rules live in the other modules.
import os
import re
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

# Snakemake puts the repository root, the Snakefile's folder, on sys.path.
from hpcm.config import study as study_config
from hpcm.config.study import CONTROL_VARIANT, PATHS, SAMPLES_DIR, TABLES_DIR, TRAIN_BENCHMARKS_DIR
from hpcm.analysis.tables import analysis_section, table_captions
from hpcm.data.datasets import dataset_options
from hpcm.models.presets import preset_config


def pad_multiple_of(model_name):
    return preset_config(model_name).pad_multiple  # a dataclass property: no model is built


def load_study(cfg):
    schema = os.path.join(workflow.current_basedir, "..", "schemas", "config.schema.yaml")
    try:
        # relative checkpoint paths start at the repository root (the Snakefile's folder)
        return study_config.load(cfg, schema, pad_multiple_of, root=workflow.basedir,
                                 dataset_kinds=dataset_options())
    except study_config.StudyConfigError as err:
        raise WorkflowError(str(err)) from None


def alternatives(names):
    """A wildcard constraint that matches exactly the given names (nothing when there are none)."""
    if not names:
        return "(?!)"
    return "|".join(re.escape(str(n)) for n in sorted(names, key=lambda n: len(str(n)), reverse=True))


# ---------------------------------------------------------------------------------------------
# Input functions and params
# ---------------------------------------------------------------------------------------------
def init_checkpoint(wildcards):
    """The file a fine-tuning run starts from ([] when it trains from scratch)."""
    return STUDY.init_checkpoint(wildcards.variant, wildcards.lmbda, wildcards.seed)


def checked_init(wildcards):
    """The check report of the official checkpoint a run starts from (rule check_checkpoint)."""
    return STUDY.checked_init(wildcards.variant, wildcards.lmbda)


def official_checkpoint(wildcards):
    return STUDY.official_checkpoints[wildcards.lmbda]


def control_path(name):
    """A control row's path (variant CONTROL_VARIANT, seed 0; {dataset} and {lmbda} stay wildcards)."""
    return PATHS[name].replace("{variant}", CONTROL_VARIANT).replace("{seed}", "0")


def rd_variants():
    """Every variant with R-D points, in config order: the trained ones, then the control rows."""
    return list(STUDY.variants) + ([CONTROL_VARIANT] if STUDY.control_csvs() else [])


def snapshot_outputs():
    """The snapshot evaluations of one run ({dataset}, {variant}, {lmbda}, {seed} stay wildcards)."""
    return expand(PATHS["snapshot_eval_csv"], step=STUDY.convergence_steps(), allow_missing=True)


def snapshot_args(wildcards, input, output):
    """Arguments of `python -m hpcm.analysis.snapshots` for one run's snapshots."""
    args = ["--run-dir", os.path.dirname(input.done), "--steps", *map(str, STUDY.convergence_steps()),
            "--outputs", *output, "--dataset", STUDY.eval_dir(wildcards.dataset),
            "--dataset-name", wildcards.dataset, "--limit", str(config["convergence"]["images"]),
            "--model", config["model"], "--variant", wildcards.variant, "--lmbda", wildcards.lmbda,
            "--seed", str(wildcards.seed), "--device", config["device"]]
    return " ".join(shlex.quote(a) for a in args)


def print_training_cost():
    """The study's price, before anything runs (the main process only: not again in every job)."""
    if not (workflow.remote_exec or workflow.subprocess_exec):
        print(STUDY.cost_report(), file=sys.stderr)


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
    return STUDY.run_config(wildcards.variant, wildcards.lmbda, wildcards.seed, list(input.init))


def runtime_settings(wildcards):
    """`--set` arguments that say how, not what, to train."""
    return " ".join(f"--set {key}={yaml_scalar(value)}" for key, value in STUDY.runtime_settings(wildcards.variant).items())


def yaml_scalar(value):
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return shlex.quote(text)


def parent_of_train(wildcards, output):
    return os.path.dirname(output.train)


def run_dir_of(wildcards, output):
    return os.path.dirname(output.done)


def gpus_of(rule_name):
    """The `gpu` resource of a rule's jobs (sbatch --gpus; counted against --resources gpu=N)."""

    def gpus(wildcards):
        return STUDY.gpus(rule_name)

    return gpus


def gpu_lock_of(rule_name):
    """Shell prefix that pins a local GPU job to as many free devices as it needs (no-op under
    SLURM, on the CPU or with local_gpus <= 1).

    Snakemake counts `--resources gpu=N` but does not say which devices a job gets, so concurrent
    jobs would all land on cuda:0; each job takes free lock files instead, all or nothing, and
    holds them until its shell exits (workflow/scripts/gpu-lock.sh).
    """
    script = os.path.join(workflow.basedir, "workflow", "scripts", "gpu-lock.sh")

    def gpu_lock(wildcards):
        n = config["local_gpus"]
        if n <= 1 or config["device"] == "cpu":
            return ""
        return f". {shlex.quote(script)} {n} {STUDY.gpus(rule_name)}; "

    return gpu_lock


def train_launcher(wildcards):
    return STUDY.train_launcher()


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
    if STUDY.datasets[wildcards.dataset]["kind"] == "folder":
        return {}
    return {"data": STUDY.eval_dir(wildcards.dataset)}


def prepare_args(wildcards):
    """Arguments of `python -m hpcm.data prepare` for one configured dataset."""
    spec = STUDY.datasets[wildcards.dataset]
    args = [spec["kind"]]
    if spec["source"]:
        args += ["--source", spec["source"]]
    if spec["only"]:
        args += ["--only", ",".join(spec["only"])]
    return " ".join(shlex.quote(a) for a in args)


def lookup_eval_dir(wildcards):
    return STUDY.eval_dir(wildcards.dataset)


def table_analysis():
    """The analysis section the tables command reads (the analysis_config rule writes it), the
    config's, with the study's seeds, the resolved quality axis, the datasets' measured codec
    anchors (anchors.smk) and, when allow_test_data_in_training allows it, the sentences that say
    the test photos were not held out (every table repeats them: hpcm.analysis.tables.NOT_HELD_OUT).
    Which tables are written (table_captions) is decided from this same mapping."""
    analysis = {**analysis_section(config), "metric": STUDY.metric,
                "measured_anchors": [a for _, a, _ in STUDY.anchors()]}
    if STUDY.test_data_in_training():
        analysis["not_held_out"] = STUDY.test_data_in_training()
    return analysis


def table_outputs():
    """Every registered table (hpcm.analysis.tables.TABLES) as CSV (in the report, with its
    kind's caption), Markdown and LaTeX."""
    outputs = []
    for name, caption in table_captions(table_analysis()).items():
        csv = f"{TABLES_DIR}/{name}.csv"
        outputs.append(report(csv, caption=f"../report/{caption}", category="Tables"))
        outputs += [f"{TABLES_DIR}/{name}.md", f"{TABLES_DIR}/{name}.tex"]
    return outputs


def runs_root(wildcards, input):
    """results/train, from the run markers results/train/<variant>/lmbda<L>/seed<k>/done (a
    function of the inputs, so that the path also holds without a shared filesystem)."""
    path = input.runs[0]
    for _ in range(4):
        path = os.path.dirname(path)
    return path


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
    targets = STUDY.eval_csvs() + STUDY.anchor_csvs()  # anchors.smk: measured codec anchors
    targets += [f"{TABLES_DIR}/{name}.{ext}" for name in table_captions(table_analysis())
                for ext in ("csv", "md", "tex")]
    targets += ["results/plots/rd", "results/plots/runs", "results/plots/gamma_schedules.png"]
    # report.smk: the BD forest plots, the quality difference to the reference, the first page
    targets += ["results/plots/forest", "results/plots/delta", "results/report/answer.rst"]
    targets += analysis_outputs()  # analysis.smk: the Phase 2 grid tables and heatmaps, the summary table
    return targets


def grid_includes(grid):
    """The variant a grid's base extends (e.g. phase1) is a point of the same search."""
    base = config["grids"][grid]["base"].get("extends")
    return [base] if base in VARIANTS else []


def grid_done_markers(wildcards):
    names = [v for v in VARIANTS if v.startswith(f"{wildcards.grid}-")] + grid_includes(wildcards.grid)
    return [study_config.path("done", variant=v, lmbda=l, seed=s)
            for v in names for l in STUDY.lambdas for s in STUDY.seeds]


def analysis_outputs():
    outputs = [f"{TABLES_DIR}/{grid}.{ext}" for grid in config["grids"] for ext in ("csv", "md", "tex")]
    outputs += [f"results/plots/{grid}.png" for grid in config["grids"]]
    outputs += [f"{TABLES_DIR}/summary.{ext}" for ext in ("csv", "md", "tex")]
    return outputs + convergence_outputs()


def convergence_outputs():
    """The convergence table and plot (rule convergence) when `convergence` is configured."""
    if not STUDY.convergence_steps():
        return []
    return [f"{TABLES_DIR}/convergence.{ext}" for ext in ("csv", "md", "tex")] + [
        f"results/plots/convergence.{ext}" for ext in ("png", "pdf")]


def eval_csv_option(wildcards, input):
    """`--eval-csv FILES` when the rule has the per-image CSVs as input (bootstrap intervals)."""
    return f"--eval-csv {' '.join(input.evals)}" if input.evals else ""


# ---------------------------------------------------------------------------------------------
# The study, resolved once at start (schema defaults filled in, references and paths checked)
# ---------------------------------------------------------------------------------------------
STUDY = load_study(config)
VARIANTS = STUDY.variants
print_training_cost()
# every missing released checkpoint in one message (not Snakemake's MissingInputException per file)
if study_config.missing_checkpoints_message(STUDY):
    raise WorkflowError(study_config.missing_checkpoints_message(STUDY))


wildcard_constraints:
    variant=alternatives(STUDY.variants),
    lmbda=alternatives(STUDY.lambdas),
    seed=alternatives(STUDY.seeds),
    dataset=alternatives(STUDY.datasets),
