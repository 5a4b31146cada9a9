"""A study config resolved: the grid of runs, their paths and their run YAMLs (no Snakemake needed).

The workflow (``workflow/rules/common.smk``) calls :func:`load` once at start and its input
functions call the returned :class:`Study`; tests call the same functions directly.

What a study config says (schema: ``workflow/schemas/config.schema.yaml``):

* ``lambdas`` x ``seeds`` x variants is the set of training runs. Variants are the named
  ``variants`` (``extends`` chains applied, preset names such as ``scale_weights: equal`` replaced
  by their numbers) plus one per point of every ``grids`` entry (``<grid>-<key><value>-...``).
* Every run has its own folder ``results/train/<variant>/lmbda<L>/seed<k>/`` and its evaluation
  ``results/eval/<dataset>/<variant>/lmbda<L>/seed<k>.{csv,json}`` (:data:`PATHS`, the one home of
  the layout); the run YAML's ``seed`` is the folder's seed. ``init_from`` starts a run from
  the same lambda's and seed's run of another variant (or the lambda's official checkpoint).

Checked here, each as a :class:`StudyConfigError` naming the config key: the schema (defaults
filled in), unknown or cyclic references, two lambdas or two variants that would share one
folder (issue 10 point 4), a ``patch_size`` that is not a multiple of the model's pad multiple
(every train job would fail; issue 10 point 6), and GPUs per job that cannot be launched
(``compute.train.gpus``; issue 11 point 4), and every variant's run YAML through hpcm.train's own
checks (e.g. an lr schedule that would raise a fine-tuning lr), and every dataset's kind and
options. The pad multiple (``pad_multiple_of(model_name)``) and the registered dataset kinds
(``dataset_kinds``) are passed in because the model and data stages come after this one.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jsonschema
import yaml
from referencing import Registry, Resource

from hpcm.config import presets, run_config
from hpcm.config.run_config import MS_SSIM_MIN_SIDE

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
    "ema_decay",
    # Phase 4 (hpcm.train.phase4)
    "group_lr",
    "freeze",
    "unfreeze_schedule",
    "scale_early_stop_patience",
)
# Runtime keys a variant may override (a per-scale early stop needs its own validation cadence).
VARIANT_RUNTIME_KEYS = ("val_every",)
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
    "bf16",
    "memory_format",
    "threads",
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
    "snapshot_every",
    "snapshot_keep",
)
# the variant of the control rows: each lambda's official checkpoint evaluated untrained (`control`)
CONTROL_VARIANT = "warm_start"

# compute.train.steps_per_s when a config sets none: the H200 adam step of HPCM_Base at 256x256,
# batch 16, fp32 (docs/results-log.md, GPU run 1: 98.56 ms/step). The official recipe's batch 32
# was not measured; its step is slower, so a price from this number is a lower bound there.
DEFAULT_STEPS_PER_S = 10.15
# the quality axis of the analysis when `analysis.metric` is null, by the study's distortion
DEFAULT_METRICS = {"mse": "psnr", "ms_ssim": "ms_ssim_db"}

SAMPLES_DIR = "results/data/samples"
RUNS_DIR = "results/train"
TABLES_DIR = "results/tables"
TRAIN_BENCHMARKS_DIR = "results/benchmarks/train"
# Every per-run path of the workflow, as Snakemake wildcard patterns (rules use these strings).
PATHS = {
    "checkpoint_check": "results/checks/official/lmbda{lmbda}.json",
    "run_config": "results/configs/{variant}/lmbda{lmbda}/seed{seed}.yaml",
    "run_dir": RUNS_DIR + "/{variant}/lmbda{lmbda}/seed{seed}",
    "final_weights": RUNS_DIR + "/{variant}/lmbda{lmbda}/seed{seed}/final.pth.tar",
    "done": RUNS_DIR + "/{variant}/lmbda{lmbda}/seed{seed}/done",
    "train_benchmark": TRAIN_BENCHMARKS_DIR + "/{variant}/lmbda{lmbda}/seed{seed}.tsv",
    "eval_csv": "results/eval/{dataset}/{variant}/lmbda{lmbda}/seed{seed}.csv",
    "eval_json": "results/eval/{dataset}/{variant}/lmbda{lmbda}/seed{seed}.json",
    "eval_benchmark": "results/benchmarks/evaluate/{dataset}/{variant}/lmbda{lmbda}/seed{seed}.tsv",
    # `convergence`: each training snapshot evaluated on the fixed image subset
    "snapshot_eval_csv": "results/eval_snapshots/{dataset}/{variant}/lmbda{lmbda}/seed{seed}/step{step}.csv",  # noqa: E501
    # codec anchors of a dataset (datasets.<d>.anchors): one point file per (image, quality)
    "anchor_images": "results/anchors/{dataset}/images.txt",
    "anchor_point": "results/anchors/{dataset}/{anchor}/q{quality}/{image}.json",
    "anchor_csv": "results/anchors/{dataset}/{anchor}.csv",
    "anchor_json": "results/anchors/{dataset}/{anchor}.json",
}
# The study's own dataset kinds, needing no preparation: the exported sample split and a local
# folder. Every other kind is registered in hpcm.data.datasets (a later stage), which the caller
# passes in as `dataset_kinds` (kind -> the options it takes), as it passes `pad_multiple_of`.
LOCAL_DATASET_KINDS = ("samples", "folder")


class StudyConfigError(ValueError):
    """A study config that cannot be run; the message starts with the config key at fault."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}")
        self.key = key


# ---------------------------------------------------------------------------------------------
# Schema validation (defaults filled in, as snakemake.utils.validate does)
# ---------------------------------------------------------------------------------------------
def _with_defaults(validator_class):
    """jsonschema's documented recipe: a validator that fills in each property's default."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        for name, subschema in properties.items():
            if "default" in subschema and isinstance(instance, dict):
                instance.setdefault(name, subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def validate(cfg: dict[str, Any], schema_path: str | Path) -> None:
    """Check ``cfg`` against the schema and fill in its defaults (in place)."""
    for section, where in (
        ("training", "training"),
        *((f"variants.{n}", n) for n in cfg.get("variants") or {}),
    ):
        node = cfg.get("training") if section == "training" else cfg["variants"][where]
        if isinstance(node, dict) and "seed" in node:
            raise StudyConfigError(
                f"{section}.seed",
                "a study's training seeds are the top-level list `seeds` "
                "(e.g. seeds: [0, 1, 2]); every run is repeated per seed",
            )
    schema = yaml.safe_load(Path(schema_path).read_text())
    registry = Registry().with_resource(
        Path(schema_path).resolve().as_uri(), Resource.from_contents(schema)
    )
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema, registry=registry)
    error = jsonschema.exceptions.best_match(validator.iter_errors(cfg))
    if error is not None:
        key = ".".join(str(part) for part in error.absolute_path) or "<top level>"
        raise StudyConfigError(key, error.message)


# ---------------------------------------------------------------------------------------------
# Names and variants
# ---------------------------------------------------------------------------------------------
def fmt_lmbda(value: float) -> str:
    """Canonical text of a lambda in paths and wildcards: 0.0018 -> '0.0018', 1.0 -> '1'."""
    return f"{float(value):.10f}".rstrip("0").rstrip(".")


def fmt_value(value: Any) -> str:
    return fmt_lmbda(value) if isinstance(value, float) else str(value)


def lambda_texts(lambdas: list[float]) -> dict[str, float]:
    """{path text: lambda}; two lambdas with one text would train in one folder: an error."""
    texts: dict[str, float] = {}
    for index, value in enumerate(lambdas):
        text = fmt_lmbda(value)
        if text in texts:
            first = lambdas.index(texts[text])
            raise StudyConfigError(
                f"lambdas.{index}",
                f"lambdas[{first}] = {texts[text]!r} and lambdas[{index}] = "
                f"{value!r} both map to the run folder lmbda{text}; remove one or make them "
                "differ within 10 decimals",
            )
        texts[text] = float(value)
    return texts


def expand_grids(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """One variant per point of every grid: `<grid>-<key><value>-...`, base keys + the point."""
    expanded: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    for grid_name, grid in cfg["grids"].items():
        axes = list(grid["axes"].items())
        for point in itertools.product(*(values for _, values in axes)):
            keys = dict(zip((key for key, _ in axes), point))
            name = "-".join([grid_name] + [f"{k}{fmt_value(v)}" for k, v in keys.items()])
            here = f"grids.{grid_name} point {keys}"
            if name in cfg["variants"]:
                raise StudyConfigError(
                    f"grids.{grid_name}",
                    f"{here} expands to {name!r}, the name of "
                    f"variants.{name}: both would train in one folder; rename one",
                )
            if name in expanded:
                raise StudyConfigError(
                    f"grids.{grid_name}",
                    f"{origin[name]} and {here} both expand to {name!r} "
                    "(values equal within 10 decimals): both would train in one folder",
                )
            variant = dict(grid["base"])
            variant.update(keys)
            if not variant.get("description"):
                variant["description"] = grid["description"] or f"grid {grid_name}"
            expanded[name], origin[name] = variant, here
    return expanded


def resolve_variants(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Variants with `extends` chains applied; returns {name: {key: value}} without null keys."""
    raw = dict(cfg["variants"])
    raw.update(expand_grids(cfg))
    resolved: dict[str, dict[str, Any]] = {}

    def resolve(name: str, chain: list[str]) -> dict[str, Any]:
        if name in resolved:
            return resolved[name]
        if name not in raw:
            raise StudyConfigError(f"variants.{chain[-1]}.extends", f"unknown variant {name!r}")
        if name in chain:
            raise StudyConfigError(
                f"variants.{name}.extends", f"cycle {' -> '.join(chain + [name])}"
            )
        entry = {k: v for k, v in raw[name].items() if v is not None}
        for key in (
            presets.NAMED_KEYS.keys() & entry.keys()
        ):  # `scale_weights: equal` -> its numbers
            try:
                entry[key] = presets.preset_value(key, entry[key])
            except ValueError as err:
                raise StudyConfigError(f"variants.{name}.{key}", str(err)) from None
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
            raise StudyConfigError(
                f"variants.{name}.optimizer",
                "no optimizer (set it or `extends` a variant that does)",
            )
    return resolved


def check_references(
    cfg: Mapping[str, Any], variants: Mapping[str, Any], lambdas: Mapping[str, float]
) -> None:
    """Every name the config refers to exists; fine-tuning sources exist for every lambda."""
    official = {fmt_lmbda(entry["lmbda"]) for entry in cfg["official_checkpoints"]}
    for name, variant in variants.items():
        source = variant.get("init_from")
        if source is None:
            continue
        if source == "official":
            missing = [text for text in lambdas if text not in official]
            if missing:
                raise StudyConfigError(
                    f"variants.{name}.init_from",
                    "'official' needs official_checkpoints entries for lambda "
                    f"{', '.join(missing)}",
                )
        elif source not in variants:
            raise StudyConfigError(f"variants.{name}.init_from", f"unknown variant {source!r}")
        elif source == name:
            raise StudyConfigError(
                f"variants.{name}.init_from", "a variant cannot fine-tune from itself"
            )
    analysis = cfg["analysis"]
    named = [("analysis.reference", analysis["reference"])]
    named += [(f"analysis.gains.{label}", v) for label, v in analysis["gains"].items()]
    for study, spec in analysis["studies"].items():
        named += [
            (f"analysis.studies.{study}.rows.{label}", v) for label, v in spec["rows"].items()
        ]
    for key, name in named:
        if name not in variants:
            raise StudyConfigError(key, f"unknown variant {name!r} (known: {', '.join(variants)})")


def check_datasets(cfg: Mapping[str, Any], dataset_kinds: Mapping[str, Sequence[str]]) -> None:
    """Every dataset's kind is local or registered, and takes the options it is given."""
    for name, spec in cfg["datasets"].items():
        kind = spec["kind"]
        if kind not in LOCAL_DATASET_KINDS and kind not in dataset_kinds:
            known = ", ".join([*LOCAL_DATASET_KINDS, *dataset_kinds])
            raise StudyConfigError(
                f"datasets.{name}.kind", f"unknown kind {kind!r} (known: {known})"
            )
        if kind == "folder" and not spec["source"]:
            raise StudyConfigError(
                f"datasets.{name}.source", "kind 'folder' needs a source directory"
            )
        if spec["only"] and "only" not in dataset_kinds.get(kind, ()):
            takers = [k for k, options in dataset_kinds.items() if "only" in options]
            raise StudyConfigError(
                f"datasets.{name}.only",
                f"a subset is only supported for kind(s) "
                f"{', '.join(map(repr, takers))}, not {kind!r}",
            )


def check_patch_sizes(
    cfg: Mapping[str, Any], variants: Mapping[str, Any], pad_multiple: int
) -> None:
    """Every run's crop fits the model (the trainer would refuse it after the DAG started)."""
    model = cfg["model"]
    default = cfg["training"]["patch_size"]
    if default % pad_multiple:
        raise StudyConfigError(
            "training.patch_size",
            f"{default} is not a multiple of {pad_multiple}, the pad multiple of {model}; use e.g. "
            f"{max(pad_multiple, default // pad_multiple * pad_multiple)}",
        )
    for name, variant in variants.items():
        size = variant.get("patch_size", default)
        if size % pad_multiple:
            raise StudyConfigError(
                f"variants.{name}.patch_size",
                f"{size} is not a multiple of {pad_multiple}, the pad multiple of {model}",
            )


def check_ms_ssim_patches(cfg: Mapping[str, Any], variants: Mapping[str, Any]) -> None:
    """MS-SSIM's 5 scales need crops >= MS_SSIM_MIN_SIDE (every train job would fail)."""
    if cfg["distortion"] != "ms_ssim":
        return
    for key, size in [("training.patch_size", cfg["training"]["patch_size"])] + [
        (f"variants.{name}.patch_size", v["patch_size"])
        for name, v in variants.items()
        if "patch_size" in v
    ]:
        if size < MS_SSIM_MIN_SIDE:
            raise StudyConfigError(
                key,
                f"{size} is too small for distortion ms_ssim (pytorch_msssim's 5 scales "
                f"need >= {MS_SSIM_MIN_SIDE} px); use e.g. 192 or 256",
            )


def check_convergence(cfg: Mapping[str, Any], variants: Mapping[str, Any]) -> None:
    """`convergence` needs snapshots of every run at the same steps (all kept, every variant with
    the study's step count) and a configured dataset."""
    spec = cfg["convergence"]
    if not spec:
        return
    if spec["dataset"] not in cfg["datasets"]:
        raise StudyConfigError(
            "convergence.dataset",
            f"{spec['dataset']!r} is not a configured "
            f"dataset (known: {', '.join(cfg['datasets'])})",
        )
    training = cfg["training"]
    every, steps = training["snapshot_every"], training["steps"]
    if not every or every >= steps:
        raise StudyConfigError(
            "training.snapshot_every",
            f"{every}: convergence needs snapshots "
            f"before the last step ({steps}); set it to e.g. "
            f"{max(1, steps // 4)}",
        )
    if training["snapshot_keep"]:
        keep = training["snapshot_keep"]
        raise StudyConfigError(
            "training.snapshot_keep",
            f"{keep}: convergence evaluates every snapshot; set 0 (keep all)",
        )
    for name, variant in variants.items():
        if variant.get("steps", steps) != steps:
            raise StudyConfigError(
                f"variants.{name}.steps",
                "convergence compares variants at the "
                "same steps; remove the variant's own step count",
            )


def check_settings(cfg: Mapping[str, Any]) -> None:
    """`training.settings` says how to run (passed with --set); what to train stays in the run
    YAML."""
    experiment = (
        set(TRAINING_RUN_KEYS)
        | set(VARIANT_RUN_KEYS)
        | set(TRAINING_RUNTIME_KEYS)
        | {
            "seed",
            "model",
            "lmbda",
            "variant",
            "distortion",
            "train_data",
            "val_data",
            "init_checkpoint",
        }
    )
    for key in cfg["training"]["settings"]:
        if key in experiment:
            raise StudyConfigError(
                f"training.settings.{key}",
                "a key the study sets itself (in "
                "`training`, a variant or the study's grid); set it there, "
                "not in settings",
            )


def check_control(
    cfg: Mapping[str, Any], lambdas: Mapping[str, float], variants: Mapping[str, Any]
) -> None:
    """`control` evaluates each lambda's official checkpoint: every lambda needs one."""
    if not cfg["control"]:
        return
    if CONTROL_VARIANT in variants:
        raise StudyConfigError(
            f"variants.{CONTROL_VARIANT}",
            "the name is taken by the control rows (control: true); rename the variant",
        )
    official = {fmt_lmbda(entry["lmbda"]) for entry in cfg["official_checkpoints"]}
    missing = [text for text in lambdas if text not in official]
    if missing:
        raise StudyConfigError(
            "control",
            "evaluates each lambda's starting checkpoint untrained, so it needs an "
            f"official_checkpoints entry for lambda {', '.join(missing)}; add them or set "
            "control: false",
        )


def check_steps_per_s(cfg: Mapping[str, Any], variants: Mapping[str, Any]) -> None:
    """A per-optimizer steps_per_s covers every variant's optimizer (or has a default)."""
    value = cfg["compute"]["train"].get("steps_per_s")
    if not isinstance(value, Mapping) or "default" in value:
        return
    for name, variant in variants.items():
        if variant["optimizer"] not in value:
            raise StudyConfigError(
                "compute.train.steps_per_s",
                f"no entry for optimizer {variant['optimizer']!r} "
                f"(variant {name}); add it or a `default`",
            )


def check_compute(cfg: Mapping[str, Any]) -> None:
    """GPUs per job: several only for training, on `device: cuda` (torchrun gives each process its
    own device by LOCAL_RANK), and never more than the workstation's `local_gpus` can lock."""
    if cfg["compute"]["evaluate"]["gpus"] != 1:
        raise StudyConfigError(
            "compute.evaluate.gpus",
            f"{cfg['compute']['evaluate']['gpus']}: evaluation runs on "
            "one device; remove the key (only compute.train.gpus may be > 1)",
        )
    gpus = cfg["compute"]["train"]["gpus"]
    if gpus > 1 and cfg["device"] != "cuda":
        raise StudyConfigError(
            "compute.train.gpus",
            f"{gpus} GPUs per training job need `device: cuda` (got "
            f"{cfg['device']!r}): torchrun starts one process per GPU and each takes its own "
            "device; set device: cuda or compute.train.gpus: 1",
        )
    local = cfg["local_gpus"]
    if local >= 1 and gpus > local:
        raise StudyConfigError(
            "compute.train.gpus",
            f"{gpus} GPUs per training job but local_gpus is {local}: no "
            "job could lock that many devices; lower compute.train.gpus or raise local_gpus",
        )


# ---------------------------------------------------------------------------------------------
# The resolved study
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    variant: str
    lmbda: str  # path text (fmt_lmbda)
    seed: int

    @property
    def wildcards(self) -> dict[str, Any]:
        return {"variant": self.variant, "lmbda": self.lmbda, "seed": self.seed}


def path(name: str, **wildcards: Any) -> str:
    """One of :data:`PATHS` with its wildcards filled in."""
    return PATHS[name].format(**wildcards)


@dataclass
class Study:
    config: dict[str, Any]
    lambdas: dict[str, float]  # path text -> value
    seeds: list[int]
    variants: dict[str, dict[str, Any]]
    dataset_kinds: Mapping[str, Sequence[str]]  # registered kind -> its options (check_datasets)
    root: str = ""  # the repository root: relative official_checkpoints paths start there

    @property
    def datasets(self) -> dict[str, dict[str, Any]]:
        return self.config["datasets"]

    @property
    def prepared_datasets(self) -> list[str]:
        return [name for name, spec in self.datasets.items() if spec["kind"] in self.dataset_kinds]

    @property
    def official_checkpoints(self) -> dict[str, str]:
        """lambda text -> checkpoint path; a relative path is relative to ``root`` (the repository
        root, where the Snakefile is), so the shipped demo warm starts are found from any
        working directory."""
        return {
            fmt_lmbda(e["lmbda"]): str(Path(self.root) / e["path"]) if self.root else e["path"]
            for e in self.config["official_checkpoints"]
        }

    def runs(self) -> list[Run]:
        """Every training run, variant-major (config order), then lambda, then seed."""
        return [
            Run(v, lmbda, s) for v in self.variants for lmbda in self.lambdas for s in self.seeds
        ]

    # -- paths
    def data_dir(self, source: str, split: str) -> str:
        """'samples' -> the exported split; anything else is a directory used as it is."""
        return f"{SAMPLES_DIR}/{split}" if source == "samples" else source

    def eval_dir(self, dataset: str) -> str:
        spec = self.datasets[dataset]
        if spec["kind"] == "samples":
            return f"{SAMPLES_DIR}/test"
        if spec["kind"] == "folder":
            return spec["source"]
        return f"results/data/{dataset}"

    def missing_official_checkpoints(self) -> list[str]:
        """The official_checkpoints files that a variant with ``init_from: official`` starts from
        and that do not exist (in lambda order)."""
        if not any(spec.get("init_from") == "official" for spec in self.variants.values()):
            return []
        files = self.official_checkpoints
        return [files[lmbda] for lmbda in self.lambdas if not Path(files[lmbda]).is_file()]

    def test_data_in_training(self) -> list[str]:
        """One sentence per (train_data / val_data, evaluated dataset) pair whose folders are the
        same or one inside the other: test photos that would train or select a model."""

        def where(folder: str) -> str:
            return os.path.realpath(Path(self.root) / folder if self.root else folder)

        found = []
        for key, split in (("train_data", "train"), ("val_data", "val")):
            used = where(self.data_dir(self.config[key], split))
            for name in self.datasets:
                tested = where(self.eval_dir(name))
                if used == tested or os.path.commonpath([used, tested]) in (used, tested):
                    found.append(
                        f"{key} ({self.data_dir(self.config[key], split)}) holds the "
                        f"images of the evaluated dataset datasets.{name} "
                        f"({self.eval_dir(name)})"
                    )
        return found

    def init_checkpoint(self, variant: str, lmbda: str, seed: int | str) -> list[str]:
        """The file a fine-tuning run starts from: the same lambda's and seed's run of the source
        variant, or the lambda's official checkpoint; [] for a run from scratch."""
        source = self.variants[variant].get("init_from")
        if source is None:
            return []
        if source == "official":
            return [self.official_checkpoints[lmbda]]
        return [path("final_weights", variant=source, lmbda=lmbda, seed=seed)]

    def eval_csvs(self) -> list[str]:
        """Every evaluation CSV: the trained runs, then the control rows (``control``)."""
        runs = [
            path("eval_csv", dataset=d, **run.wildcards)
            for d in self.datasets
            for run in self.runs()
        ]
        return runs + self.control_csvs()

    def control_csvs(self) -> list[str]:
        """Each lambda's official checkpoint evaluated untrained, as variant ``CONTROL_VARIANT``
        (seed 0); [] unless ``control`` is on."""
        if not self.config["control"]:
            return []
        return [
            path("eval_csv", dataset=d, variant=CONTROL_VARIANT, lmbda=lmbda, seed=0)
            for d in self.datasets
            for lmbda in self.lambdas
        ]

    # -- convergence
    def convergence_steps(self) -> list[int]:
        """The snapshot steps before the end of the run (the end is the final evaluation)."""
        if not self.config["convergence"]:
            return []
        every, steps = self.config["training"]["snapshot_every"], self.config["training"]["steps"]
        return list(range(every, steps, every))

    def snapshot_csvs(self, variant: str, lmbda: str, seed: int | str) -> list[str]:
        dataset = self.config["convergence"]["dataset"]
        return [
            path(
                "snapshot_eval_csv",
                dataset=dataset,
                variant=variant,
                lmbda=lmbda,
                seed=seed,
                step=step,
            )
            for step in self.convergence_steps()
        ]

    def all_snapshot_csvs(self) -> list[str]:
        return [
            csv
            for run in self.runs()
            for csv in self.snapshot_csvs(run.variant, run.lmbda, run.seed)
        ]

    def final_csvs(self, dataset: str) -> list[str]:
        """The trained runs' evaluations on one dataset (the convergence table's last step)."""
        return [path("eval_csv", dataset=dataset, **run.wildcards) for run in self.runs()]

    def anchors(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(dataset, anchor name, spec) of every codec anchor the datasets list."""
        return [
            (d, name, spec)
            for d, ds in self.datasets.items()
            for name, spec in (ds.get("anchors") or {}).items()
        ]

    def anchor_csvs(self) -> list[str]:
        return [path("anchor_csv", dataset=d, anchor=a) for d, a, _ in self.anchors()]

    def done_markers(self) -> list[str]:
        return [path("done", **run.wildcards) for run in self.runs()]

    # -- run YAML
    def run_config(
        self, variant: str, lmbda: str, seed: int | str, init: list[str]
    ) -> dict[str, Any]:
        """The run YAML of one run: training defaults, then the variant's keys, then its labels."""
        training = self.config["training"]
        run = {key: training[key] for key in TRAINING_RUN_KEYS}
        spec = self.variants[variant]
        run.update({key: spec[key] for key in VARIANT_RUN_KEYS if key in spec})
        run.update(
            model=self.config["model"],
            variant=variant,
            lmbda=self.lambdas[lmbda],
            seed=int(seed),
            train_data=self.data_dir(self.config["train_data"], "train"),
            val_data=self.data_dir(self.config["val_data"], "val"),
            init_checkpoint=init[0] if init else None,
            distortion=self.config["distortion"],
        )
        return run

    def runtime_settings(self, variant: str | None = None) -> dict[str, Any]:
        """Run-config keys that say how, not what, to train (device first: it is always explicit);
        a variant's own VARIANT_RUNTIME_KEYS (e.g. val_every) replace the study's."""
        settings = {"device": self.config["device"]}
        settings.update({key: self.config["training"][key] for key in TRAINING_RUNTIME_KEYS})
        settings.update(self.config["training"]["settings"])
        if variant is not None:
            spec = self.variants[variant]
            settings.update({key: spec[key] for key in VARIANT_RUNTIME_KEYS if key in spec})
        settings["wandb_project"] = f"{settings['wandb_project']}-{self.config['study']}"
        return settings

    def checked_init(self, variant: str, lmbda: str) -> list[str]:
        """The check report of the official checkpoint a run starts from ([] for other runs)."""
        if self.variants[variant].get("init_from") != "official":
            return []
        return [path("checkpoint_check", lmbda=lmbda)]

    # -- price
    def steps_per_s(self, optimizer: str) -> tuple[float, str]:
        """(steps/s, the key it came from) for a run of ``optimizer``."""
        value = self.config["compute"]["train"].get("steps_per_s")
        if value is None:
            return DEFAULT_STEPS_PER_S, (
                "default: H200 adam, batch 16 (docs/results-log.md); set compute.train.steps_per_s"
            )
        if not isinstance(value, Mapping):
            return float(value), "compute.train.steps_per_s"
        key = optimizer if optimizer in value else "default"
        return float(value[key]), f"compute.train.steps_per_s.{key}"

    def training_cost(self) -> list[dict[str, Any]]:
        """One row per variant: runs, steps per run, steps/s (and where it came from), hours.
        steps_per_s is one job's rate with all its GPUs, so a job's GPU-hours are its wall hours
        times compute.train.gpus."""
        devices_per_job = max(1, self.gpus("train"))
        rows = []
        for name, spec in self.variants.items():
            steps = int(spec.get("steps", self.config["training"]["steps"]))
            rate, source = self.steps_per_s(spec["optimizer"])
            runs = len(self.lambdas) * len(self.seeds)
            rows.append(
                {
                    "variant": name,
                    "optimizer": spec["optimizer"],
                    "runs": runs,
                    "steps": steps,
                    "steps_per_s": rate,
                    "source": source,
                    "hours": runs * steps / rate / 3600 * devices_per_job,
                }
            )
        return rows

    def cost_report(self) -> str:
        """The price of the study's training, printed by the workflow before it runs."""
        unit = "CPU-hours" if self.config["device"] == "cpu" else "GPU-hours"
        rows = self.training_cost()
        width = max(len(r["variant"]) for r in rows)
        lines = [
            f"training cost of study {self.config['study']!r} ({unit} = runs x steps / steps_per_s "
            "x GPUs per job; measure steps/s from a short run's metrics.csv step_time and set "
            "compute.train.steps_per_s):",
            f"  {'variant':<{width}}  {'optimizer':<21} {'runs':>4} {'steps/run':>10} "
            f"{'steps/s':>8} {unit:>10}",
        ]
        for r in rows:
            lines.append(
                f"  {r['variant']:<{width}}  {r['optimizer']:<21} {r['runs']:>4} {r['steps']:>10} "
                f"{r['steps_per_s']:>8.4g} {r['hours']:>10.1f}  [{r['source']}]"
            )
        if (
            self.config["device"] == "cpu"
            and self.config["compute"]["train"].get("steps_per_s") is None
        ):
            lines.append(
                "  (device cpu without compute.train.steps_per_s: the default is a GPU rate, the "
                "hours below are not this machine's)"
            )
        total = sum(r["hours"] for r in rows)
        lines.append(
            f"  total: {sum(r['runs'] for r in rows)} runs, "
            f"{sum(r['runs'] * r['steps'] for r in rows)} steps, {total:.1f} {unit} "
            f"({total / 24:.1f} device-days)"
        )
        return "\n".join(lines)

    # -- compute
    def gpus(self, rule: str) -> int:
        """GPUs one job of `rule` ('train' or 'evaluate') asks for: 0 on the CPU."""
        return 0 if self.config["device"] == "cpu" else self.config["compute"][rule]["gpus"]

    def train_launcher(self) -> str:
        """What runs `-m hpcm.train`: plain python for one device, else torchrun with one process
        per GPU on this node (--standalone: a local rendezvous, no address to configure)."""
        gpus = self.gpus("train")
        return "python" if gpus <= 1 else f"torchrun --standalone --nproc-per-node {gpus}"

    # -- analysis
    @property
    def metric(self) -> str:
        """The analysis' quality axis: analysis.metric, else the distortion's default."""
        return self.config["analysis"]["metric"] or DEFAULT_METRICS[self.config["distortion"]]

    def anchor_names(self) -> list[str]:
        """analysis.anchors, then the measured anchors of the datasets (each one BD table)."""
        return list(
            dict.fromkeys([*self.config["analysis"]["anchors"], *(a for _, a, _ in self.anchors())])
        )


def resolve(
    cfg: dict[str, Any],
    pad_multiple_of: Callable[[str], int],
    root: str | Path = "",
    *,
    dataset_kinds: Mapping[str, Sequence[str]],
) -> Study:
    """The study of a schema-validated config (see :func:`validate`); every check of this module.
    ``dataset_kinds``: the registered dataset kinds and their options
    (``hpcm.data.datasets.dataset_options()``)."""
    lambdas = lambda_texts(cfg["lambdas"])
    variants = resolve_variants(cfg)
    check_references(cfg, variants, lambdas)
    check_datasets(cfg, dataset_kinds)
    check_patch_sizes(cfg, variants, pad_multiple_of(cfg["model"]))
    check_ms_ssim_patches(cfg, variants)
    check_steps_per_s(cfg, variants)
    check_convergence(cfg, variants)
    check_settings(cfg)
    check_control(cfg, lambdas, variants)
    check_compute(cfg)
    study = Study(
        config=cfg,
        lambdas=lambdas,
        seeds=[int(s) for s in cfg["seeds"]],
        variants=variants,
        dataset_kinds=dict(dataset_kinds),
        root=str(root),
    )
    check_run_configs(study)
    check_held_out(study)
    return study


# Where the README says how to get the released weights (finetune*.yaml use them).
WEIGHTS_HELP = (
    "README.md, section 'The paper study', paragraph 'Fine-tuning from the released "
    "weights' (details: docs/workflow.md, 'The fine-tuning studies (from the released "
    "weights)')"
)


def missing_checkpoints_message(study: Study) -> str | None:
    """One message that lists every missing official checkpoint, or None when all are there.

    Not part of :func:`resolve`: a study resolves (and its price prints) without the weights; the
    workflow calls this before it builds the DAG, so that no job waits for a file nobody makes."""
    missing = study.missing_official_checkpoints()
    if not missing:
        return None
    return (
        f"config key 'official_checkpoints': {len(missing)} of {len(study.lambdas)} "
        "checkpoint file(s) missing:\n  "
        + "\n  ".join(missing)
        + "\nthese are the official HPCM weights (released by the HPCM authors) that the "
        f"variants with init_from: official start from; {WEIGHTS_HELP} says where to download "
        "them and where to put them (or edit the paths in official_checkpoints)"
    )


def check_held_out(study: Study) -> None:
    """The test photos neither train nor select a model, unless the config says it means it."""
    found = study.test_data_in_training()
    if found and not study.config["allow_test_data_in_training"]:
        key = found[0].split(" ", 1)[0]
        raise StudyConfigError(
            key,
            "; ".join(found) + ": the test photos would train or select "
            "the model being tested; point it at other images, or set "
            "allow_test_data_in_training: true to do so on purpose (every table "
            "then says so)",
        )


def check_run_configs(study: Study) -> None:
    """Every variant's run YAML passes hpcm.train's own checks (cross-key rules such as an lr
    schedule that would raise a fine-tuning lr) now, in the dry run, not when its job starts."""
    for name, lmbda in itertools.product(
        study.variants, study.lambdas
    ):  # the seed changes no check
        try:
            run = {
                **study.run_config(name, lmbda, study.seeds[0], []),
                **study.runtime_settings(name),
            }
            for key in ("train_data", "val_data"):  # folders that a rule prepares later
                run.pop(key)
            run_config.resolve(run)
        except run_config.ConfigError as err:
            raise StudyConfigError(f"variants.{name}", str(err)) from None


def load(
    cfg: dict[str, Any],
    schema_path: str | Path,
    pad_multiple_of: Callable[[str], int],
    root: str | Path = "",
    *,
    dataset_kinds: Mapping[str, Sequence[str]],
) -> Study:
    """Validate ``cfg`` (defaults filled in, in place) and resolve it (``root``: see
    :attr:`Study.official_checkpoints`; ``dataset_kinds``: see :func:`resolve`)."""
    validate(cfg, schema_path)
    return resolve(cfg, pad_multiple_of, root, dataset_kinds=dataset_kinds)
