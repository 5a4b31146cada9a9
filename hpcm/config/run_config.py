"""Run configuration of ``python -m hpcm.train``: keys, defaults, types, validation, ``--set``
parsing.

A run config is a flat YAML mapping. Values are resolved in this order (later wins):

1. the defaults below (the official HPCM recipe where it defines one),
2. the preset of the chosen ``variant`` (``baseline``, ``phase1``, ``phase2``, ``phase3``; any other
   variant name is a free label for an ablation and adds no preset),
3. the config file,
4. ``--set key=value`` overrides (values are parsed as YAML, so lists are ``[a,b,c]``).

``scale_weights`` and ``gammas`` also take the name of an ablation preset (``hpcm.config.presets``:
``scale_weights: equal``, ``gammas: increasing``), resolved to its numbers here.

Everything is checked before any work starts; every error names the key and the value at fault.
The table ``KEYS`` is the single source of truth: ``--help``, the docs and the typed config
``RunConfig`` (a frozen dataclass with one field per key, read as ``cfg.lmbda``) are generated from
it. ``RunConfig.as_dict()`` is the plain mapping that run.yaml and checkpoints store.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from hpcm.config import presets
from hpcm.config.optimizers import GAMMA, OPTIMIZER_SPECS, UPDATE_MODES, hyperparameter_default
from hpcm.config.presets import HPCM_LR, HPCM_LR_MILESTONES, HPCM_LR_VALUES
from hpcm.config.tasks import PARAMETER_GROUPS

# Derived from the optimizer registry (hpcm.config.optimizers), never listed here.
OPTIMIZERS = tuple(OPTIMIZER_SPECS)
BALANCED_OPTIMIZERS = tuple(name for name, spec in OPTIMIZER_SPECS.items() if spec.task_weights)
DISTORTIONS = ("mse", "ms_ssim")
# pytorch_msssim's MS-SSIM (5 scales, 11-tap window) needs a smaller side > (11 - 1) * 2^4 = 160 px.
MS_SSIM_MIN_SIDE = 161
DEVICE_PATTERN = (
    r"^(auto|cpu|cuda|cuda:[0-9]+)$"  # config device names; hpcm.util.device makes devices
)


class ConfigError(ValueError):
    """A run-config problem, raised before any training work starts."""


@dataclass(frozen=True)
class Key:
    kind: str  # "str" | "float" | "int" | "bool" | "floats3" | "floats" | "groups" | "group_floats"
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    optional: bool = False  # None (YAML null) allowed
    check: Callable[[Any], bool] | None = None  # value constraint, applied when not None
    constraint: str = ""  # words for the error message of ``check``


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


KEYS: dict[str, Key] = {
    # what is trained
    "model": Key(
        "str",
        "HPCM_Base",
        "model preset for hpcm.models.build_model (HPCM_Base, HPCM_Large, HPCM_Small, HPCM_Tiny)",
    ),
    "init_checkpoint": Key(
        "str",
        None,
        "checkpoint to fine-tune from (official raw state dict or a project file); "
        "ignored when the run resumes from its own checkpoint",
        optional=True,
    ),
    "variant": Key(
        "str",
        "baseline",
        "run label (wandb group, run.yaml, evaluation CSV); baseline/phase1/phase2/phase3 "
        "also apply a preset of the keys below",
    ),
    "optimizer": Key("str", "adam", "parameter optimizer", choices=OPTIMIZERS),
    "lmbda": Key(
        "float",
        0.013,
        "rate-distortion trade-off: loss = lmbda*255^2*MSE + bpp (distortion mse) or "
        "lmbda*(1 - MS-SSIM) + bpp (distortion ms_ssim)",
        check=_positive,
        constraint="must be > 0",
    ),
    "distortion": Key(
        "str",
        "mse",
        "distortion term of the loss (every optimizer's distortion task): mse, or ms_ssim = "
        "pytorch_msssim's 5-scale MS-SSIM with data_range 1 (the HPCM maintainer's loss, official "
        f"lambdas 2.4-60.5; patches and validation images need a side >= {MS_SSIM_MIN_SIDE} px)",
        choices=DISTORTIONS,
    ),
    # Balanced R-D (Phase 1/2)
    "gamma": Key(
        "float",
        hyperparameter_default("gamma"),
        "FAMO L2 regularisation on the task logits (initial value when scheduled)",
        check=_non_negative,
        constraint="must be >= 0",
    ),
    "gamma_final": Key(
        "float",
        None,
        "final gamma of a gamma_schedule (step: its floor; adaptive: lower clip)",
        optional=True,
        check=_non_negative,
        constraint="must be >= 0",
    ),
    "gamma_schedule": Key(
        "str",
        "fixed",
        "single-gamma schedule over the run (hpcm.train.schedules)",
        choices=("fixed", "linear", "cosine", "step", "adaptive"),
    ),
    "gamma_warmup": Key(
        "float",
        0.0,
        "fraction of the run held at the initial gamma before a gamma_schedule starts "
        "(seed: 100 of 3000 epochs = 0.0333)",
        check=lambda v: 0 <= v < 1,
        constraint="must be a fraction in [0, 1)",
    ),
    "gamma_step_milestones": Key(
        "floats",
        [1000 / 3000, 2000 / 3000, 2500 / 3000],
        "gamma_schedule step: gamma drops at these fractions of the run (seed epochs "
        "1000/2000/2500 of 3000)",
        check=lambda v: all(0 < f < 1 for f in v) and v == sorted(v),
        constraint="must be increasing fractions in (0, 1)",
    ),
    "gamma_step_factor": Key(
        "float",
        0.5,
        "gamma_schedule step: factor at each milestone (floored at gamma_final)",
        check=lambda v: 0 < v <= 1,
        constraint="must be in (0, 1]",
    ),
    "w_lr": Key(
        "float",
        hyperparameter_default("w_lr"),
        "Adam learning rate of the task logits",
        check=_positive,
        constraint="must be > 0",
    ),
    "update_mode": Key(
        "str",
        hyperparameter_default("update_mode"),
        "task-weight update: same_batch (official second no-grad forward) or next_batch"
        " (reuse the next batch's losses, no extra forward)",
        choices=UPDATE_MODES,
    ),
    # Phase 3
    "decomposition": Key(
        "str",
        "measured",
        "5-task decomposition for hierarchical_balanced",
        choices=("fixed_ratio", "adaptive", "measured"),
    ),
    "gammas": Key(
        "floats3",
        list(hyperparameter_default("gammas")),
        "per-scale gammas [s1, s2, s3] (initial values), or a Study 2 preset: "
        + ", ".join(presets.STUDY2_GAMMAS),
        check=lambda v: min(v) >= 0,
        constraint="entries must be >= 0",
    ),
    "gammas_final": Key(
        "floats3",
        None,
        "final per-scale gammas for linear/cosine gamma_strategy",
        optional=True,
        check=lambda v: min(v) >= 0,
        constraint="entries must be >= 0",
    ),
    "gamma_strategy": Key(
        "str",
        "fixed",
        "ScaleGammaManager strategy",
        choices=("fixed", "linear", "cosine", "adaptive", "hierarchical"),
    ),
    "scale_weights": Key(
        "floats3",
        list(hyperparameter_default("scale_weights")),
        "scale modulation [s1, s2, s3], or a Study 1 preset: "
        + ", ".join(presets.STUDY1_SCALE_WEIGHTS),
        check=lambda v: min(v) > 0,
        constraint="entries must be > 0",
    ),
    # Phase 4: context-aware fine-tuning over the parameter groups of hpcm.models.param_groups
    "group_lr": Key(
        "group_floats",
        {g: 1.0 for g in PARAMETER_GROUPS},
        "Phase 4: learning-rate ratio per parameter group (" + ", ".join(PARAMETER_GROUPS) + "), "
        "multiplying the lr schedule; groups left out keep 1.0 (seed phase4: transforms 1.0, "
        "hyperprior 0.5, context 0.1)",
        check=lambda v: all(r > 0 for r in v.values()),
        constraint="ratios must be > 0 (freeze a group with 'freeze')",
    ),
    "freeze": Key(
        "groups",
        [],
        "Phase 4: parameter groups frozen for the whole run (no update, no optimizer "
        "state, no part in the clip norm or the task-gradient math)",
    ),
    "unfreeze_schedule": Key(
        "group_floats",
        {},
        "Phase 4: group -> fraction of the run; the group is frozen "
        "until that fraction, then trains (seed phase4: hyperprior 0.2, context 0.4 of 500 "
        "epochs)",
        check=lambda v: all(0 < f < 1 for f in v.values()),
        constraint="fractions must be in (0, 1)",
    ),
    "scale_early_stop_patience": Key(
        "int",
        0,
        "Phase 4: validations without a lower validation rate of a scale's "
        "y elements after which that scale's context parameters stop updating "
        "(0 = off)",
        check=_non_negative,
        constraint="must be >= 0",
    ),
    # data
    "train_data": Key(
        "str", "samples", "training image folder (recursive PNG/JPEG) or 'samples' (embedded set)"
    ),
    "val_data": Key("str", "samples", "validation image folder or 'samples' (embedded val split)"),
    "patch_size": Key(
        "int",
        256,
        "random square crop size for training",
        check=_positive,
        constraint="must be > 0",
    ),
    "batch_size": Key("int", 32, "training batch size", check=_positive, constraint="must be > 0"),
    "skip_bad_images": Key(
        "bool", False, "skip unreadable images with a warning instead of failing"
    ),
    "num_workers": Key(
        "int",
        4,
        "DataLoader worker processes (0 = load in the main process)",
        check=_non_negative,
        constraint="must be >= 0",
    ),
    # run length and schedule
    "steps": Key(
        "int",
        None,
        "run length in optimizer steps (set steps or epochs)",
        optional=True,
        check=_positive,
        constraint="must be > 0",
    ),
    "epochs": Key(
        "int",
        None,
        "run length in epochs over the training set (set steps or epochs)",
        optional=True,
        check=_positive,
        constraint="must be > 0",
    ),
    "lr": Key("float", HPCM_LR, "initial learning rate", check=_positive, constraint="must be > 0"),
    "lr_milestones": Key(
        "floats",
        list(HPCM_LR_MILESTONES),
        "lr drop points as fractions of the run",
        check=lambda v: all(0 < f < 1 for f in v) and v == sorted(v),
        constraint="must be increasing fractions in (0, 1)",
    ),
    "lr_values": Key(
        "floats",
        list(HPCM_LR_VALUES),
        "lr after each milestone",
        check=lambda v: all(f > 0 for f in v),
        constraint="entries must be > 0",
    ),
    "clip_max_norm": Key(
        "float",
        1.0,
        "gradient-norm clip (0 disables clipping; non-finite norms are always skipped)",
        check=_non_negative,
        constraint="must be >= 0",
    ),
    "seed": Key(
        "int",
        0,
        "seed of model init, data order, crops and quantisation noise",
        check=_non_negative,
        constraint="must be >= 0",
    ),
    "ema_decay": Key(
        "float",
        0.0,
        "exponential moving average of the weights after every step (hpcm.train.ema; "
        "0 = off); when on, validation, epoch_best and snapshots use the average (official "
        "Balanced R-D trainer: 0.999)",
        check=lambda v: 0 <= v < 1,
        constraint="must be 0 (off) or in (0, 1)",
    ),
    # hardware
    "device": Key("str", "auto", "auto (CUDA when present), cpu, cuda or cuda:N"),
    "bf16": Key("bool", False, "bf16 autocast for forward passes on CUDA"),
    "memory_format": Key(
        "str",
        "auto",
        "layout of the model's weights and of the batches: auto "
        "(channels_last on CUDA, contiguous on CPU), contiguous, or channels_last "
        "(oneDNN convolutions on CPU: several times the step rate of small models, "
        "other rounding; docs/speed.md)",
        choices=("auto", "contiguous", "channels_last"),
    ),
    "threads": Key(
        "int",
        None,
        "torch intra-op threads of this process (null = torch's default, "
        "one per core); 1 per job when several jobs share the cores (docs/speed.md)",
        optional=True,
        check=_positive,
        constraint="must be > 0",
    ),
    "compile": Key(
        "bool",
        False,
        "torch.compile the training forward pass and loss (checkpoints keep the "
        "eager module's state-dict names; validation and coding stay eager)",
    ),
    "dist_timeout_s": Key(
        "float",
        600.0,
        "torchrun runs: seconds a process waits in a collective for the others "
        "before it stops with an error (a crashed or hung rank)",
        check=_positive,
        constraint="must be > 0",
    ),
    # bookkeeping
    "log_every": Key(
        "int",
        100,
        "steps between metrics.csv/wandb rows (metrics are summed on the device in between)",
        check=_positive,
        constraint="must be > 0",
    ),
    "val_every": Key(
        "int",
        1000,
        "steps between validations (always once at the end)",
        check=_positive,
        constraint="must be > 0",
    ),
    "checkpoint_every": Key(
        "int",
        1000,
        "steps between checkpoints (always one at the end)",
        check=_positive,
        constraint="must be > 0",
    ),
    "snapshot_every": Key(
        "int",
        0,
        "steps between kept model snapshots epoch_<step>.pth.tar (+ balanced_state_<step>.pth "
        "for the balanced optimizers; the seed's names, whose N is an epoch); 0 = off",
        check=_non_negative,
        constraint="must be >= 0",
    ),
    "snapshot_keep": Key(
        "int",
        0,
        "newest snapshots kept (older ones are deleted after a new one is written); 0 = all",
        check=_non_negative,
        constraint="must be >= 0",
    ),
    "wandb_mode": Key("str", "offline", "wandb logging", choices=("offline", "online", "disabled")),
    "wandb_project": Key("str", "hpcm-balanced", "wandb project"),
    "wandb_entity": Key("str", None, "wandb entity (team or user)", optional=True),
    "quiet": Key("bool", False, "no progress bar, one log line per logged step (cluster logs)"),
}

# Presets are data, applied under the user's values; other variant names are free ablation labels.
VARIANT_PRESETS: dict[str, dict[str, Any]] = {
    "baseline": {"optimizer": "adam"},
    "phase1": {"optimizer": "balanced", "gamma": GAMMA, "gamma_schedule": "fixed"},
    "phase2": {
        "optimizer": "balanced",
        "gamma": GAMMA,
        "gamma_final": 0.001,
        "gamma_schedule": "cosine",
    },
    "phase3": {
        "optimizer": "hierarchical_balanced",
        "decomposition": "measured",
        "gamma_strategy": "hierarchical",
    },
}

# Keys that may differ when a run is resumed: they change neither the numbers nor the data order.
RESUME_SAFE_KEYS = frozenset(
    {
        "device",
        "compile",
        "dist_timeout_s",
        "num_workers",
        "log_every",
        "val_every",
        "checkpoint_every",
        "wandb_mode",
        "wandb_project",
        "wandb_entity",
        "quiet",
        "skip_bad_images",
        "init_checkpoint",
        "snapshot_every",
        "snapshot_keep",
    }
)

# The Python type of each Key.kind: the field types of RunConfig.
_FIELD_TYPES: dict[str, Any] = {
    "str": str,
    "float": float,
    "int": int,
    "bool": bool,
    "floats3": list[float],
    "floats": list[float],
    "groups": list[str],
    "group_floats": dict[str, float],
}


def _as_dict(self: Any) -> dict[str, Any]:
    """The plain ``{key: value}`` mapping in ``KEYS`` order: what run.yaml and checkpoints store."""
    return {key: getattr(self, key) for key in KEYS}


def _field(key: str, spec: Key) -> tuple[str, Any, Any]:
    kind = _FIELD_TYPES[spec.kind]
    default = (
        dataclasses.field(default_factory=lambda: _copy(spec.default))
        if isinstance(spec.default, (list, dict))
        else dataclasses.field(default=spec.default)
    )
    return key, kind | None if spec.optional else kind, default


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else dict(value)


# One field per KEYS entry, with its type and default. Only ``resolve`` / ``from_saved`` build it
# (they type-check and validate the values); list and dict values are kept as they are, so that
# ``as_dict()`` equals the mapping the trainer always wrote to run.yaml and checkpoints.
RunConfig = dataclasses.make_dataclass(
    "RunConfig",
    [_field(key, spec) for key, spec in KEYS.items()],
    frozen=True,
    namespace={
        "as_dict": _as_dict,
        "__doc__": "A resolved, validated run config: one field per ``KEYS`` entry (read "
        "``cfg.lmbda``); ``dataclasses.replace`` makes a changed copy.",
        "__module__": __name__,
    },
)


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false are booleans; on/off/yes/no stay the text typed.

    YAML 1.1 reads ``update_mode: on`` as True, so a choice-key error would show True instead of
    what the user wrote; bool keys still accept yes/no/on/off (``_coerce``).
    """


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _fail(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"run config: key {key!r} = {value!r}: {why}")


def _coerce(key: str, value: Any) -> Any:
    """Return ``value`` converted to the key's type, or raise a ConfigError naming key and value."""
    spec = KEYS[key]
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
        if spec.optional:
            return None
        raise _fail(key, value, "a value is required")

    def as_float(v: Any) -> float:
        # YAML 1.1 reads "1e-4" (no dot) as a string, so strings that spell a number are accepted.
        if isinstance(v, bool):
            raise _fail(key, value, "expected a number, got a boolean")
        if isinstance(v, (int, float)):
            out = float(v)
        elif isinstance(v, str):
            try:
                out = float(v)
            except ValueError:
                raise _fail(key, value, "expected a number") from None
        else:
            raise _fail(key, value, f"expected a number, got {type(v).__name__}")
        if not math.isfinite(out):
            raise _fail(key, value, "must be finite")
        return out

    kind = spec.kind
    if kind == "str":
        if not isinstance(value, str):
            raise _fail(key, value, f"expected a string, got {type(value).__name__}")
        out: Any = value
    elif kind == "float":
        out = as_float(value)
    elif kind == "int":
        if isinstance(value, bool):
            raise _fail(key, value, "expected an integer, got a boolean")
        if isinstance(value, str):
            try:
                value_num: Any = int(value)
            except ValueError:
                raise _fail(key, value, "expected an integer") from None
        else:
            value_num = value
        if isinstance(value_num, float) and value_num.is_integer():
            value_num = int(value_num)
        if not isinstance(value_num, int):
            raise _fail(key, value, f"expected an integer, got {type(value).__name__}")
        out = value_num
    elif kind == "bool":
        if isinstance(value, str) and value.lower() in (
            "true",
            "false",
            "yes",
            "no",
            "on",
            "off",
            "1",
            "0",
        ):
            out = value.lower() in ("true", "yes", "on", "1")
        elif isinstance(value, bool):
            out = value
        else:
            raise _fail(key, value, "expected true or false")
    elif kind in ("floats3", "floats"):
        try:
            value = presets.preset_value(
                key, value
            )  # a preset name (scale_weights, gammas) -> its list
        except ValueError as exc:
            raise _fail(key, value, str(exc)) from None
        if not isinstance(value, (list, tuple)):
            raise _fail(key, value, "expected a list such as [0.1, 0.2, 0.3]")
        out = [as_float(v) for v in value]
        if kind == "floats3" and len(out) != 3:
            raise _fail(key, value, f"expected 3 values [s1, s2, s3], got {len(out)}")
    elif kind == "groups":
        if not isinstance(value, (list, tuple)) or any(not isinstance(v, str) for v in value):
            raise _fail(
                key,
                value,
                f"expected a list of parameter groups from {', '.join(PARAMETER_GROUPS)}",
            )
        _check_group_names(key, value, value)
        if len(set(value)) != len(value):
            raise _fail(key, value, "a group is listed twice")
        out = [g for g in PARAMETER_GROUPS if g in value]  # one order, so resumes compare equal
    elif kind == "group_floats":
        if not isinstance(value, dict):
            raise _fail(key, value, "expected a mapping such as {context: 0.1, hyperprior: 0.5}")
        _check_group_names(key, value, list(value))
        given = {g: as_float(value[g]) for g in PARAMETER_GROUPS if g in value}
        # groups left out take the key's default (group_lr: 1.0 each; unfreeze_schedule: absent)
        out = {
            g: given.get(g, spec.default.get(g))
            for g in PARAMETER_GROUPS
            if g in given or g in spec.default
        }
    else:  # pragma: no cover - table error
        raise AssertionError(kind)

    if spec.choices is not None and out not in spec.choices:
        raise _fail(key, value, f"must be one of {', '.join(spec.choices)}")
    if spec.check is not None and not spec.check(out):
        raise _fail(key, value, spec.constraint)
    return out


def _check_group_names(key: str, value: Any, names: list[Any]) -> None:
    unknown = [n for n in names if n not in PARAMETER_GROUPS]
    if unknown:
        raise _fail(
            key,
            value,
            f"unknown parameter group {unknown[0]!r}; the groups are {', '.join(PARAMETER_GROUPS)}",
        )


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` items; values are YAML (``[a,b]`` lists, ``null``, numbers)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            out[key] = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
    return out


RUN_YAML = "run.yaml"  # written by hpcm.train beside its checkpoints
METRICS_CSV = "metrics.csv"  # hpcm.train's log rows, beside run.yaml


def load_file(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    try:
        data = _yaml_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"run config {str(path)!r}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"run config {str(path)!r}: invalid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"run config {str(path)!r}: expected a mapping of key: value, got {type(data).__name__}"
        )
    # A run.yaml written by hpcm.train is a valid config: its ``meta`` block (versions, commit) is
    # not.
    if isinstance(data.get("meta"), dict):
        data = {k: v for k, v in data.items() if k != "meta"}
    return data


def read_run_yaml(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config a training run wrote to ``run_dir/run.yaml`` ({} when there is none)."""
    path = Path(run_dir) / RUN_YAML
    return load_file(path) if path.is_file() else {}


def resolve(user: Mapping[str, Any]) -> RunConfig:
    """Defaults < variant preset < user values; typed and validated. Raises ConfigError."""
    unknown = sorted(set(user) - set(KEYS))
    if unknown:
        raise ConfigError(
            f"run config: unknown key {unknown[0]!r} = {user[unknown[0]]!r}"
            f" (valid keys: {', '.join(KEYS)})"
        )
    variant = _coerce("variant", user.get("variant", KEYS["variant"].default))
    merged = {k: spec.default for k, spec in KEYS.items()}
    merged.update(VARIANT_PRESETS.get(variant, {}))
    merged.update(user)
    cfg = RunConfig(**{k: _coerce(k, merged[k]) for k in KEYS})
    _check_across_keys(cfg)
    return cfg


def _check_across_keys(cfg: RunConfig) -> None:
    """The rules that tie keys together, and the paths that must exist."""
    if (cfg.steps is None) == (cfg.epochs is None):
        raise ConfigError(
            f"run config: set exactly one of 'steps' = {cfg.steps!r} and 'epochs' = "
            f"{cfg.epochs!r} (the run length)"
        )
    if len(cfg.lr_milestones) != len(cfg.lr_values):
        raise ConfigError(
            f"run config: 'lr_milestones' = {cfg.lr_milestones!r} and 'lr_values' = "
            f"{cfg.lr_values!r} must have the same length"
        )
    schedule = [cfg.lr, *cfg.lr_values]
    raised = [after for before, after in zip(schedule, schedule[1:]) if after > before]
    if (
        raised
    ):  # e.g. a fine-tuning lr with the study's absolute drops would go *up* at the first one
        ratios = [round(v / HPCM_LR, 12) for v in HPCM_LR_VALUES]
        raise ConfigError(
            f"run config: 'lr_values' = {cfg.lr_values!r} raise the learning rate above 'lr' = "
            f"{cfg.lr!r} or a previous value (to {raised[0]!r}); a schedule only lowers it. Give "
            f"this run its own lr_values (the official drops are {ratios} x lr) or 'lr_milestones: "
            "[]' and 'lr_values: []' for a constant lr"
        )
    if cfg.distortion == "ms_ssim" and cfg.patch_size < MS_SSIM_MIN_SIDE:
        raise ConfigError(
            f"run config: 'distortion' = 'ms_ssim' needs 'patch_size' >= {MS_SSIM_MIN_SIDE} "
            f"(pytorch_msssim's 5 scales with an 11-tap window), got {cfg.patch_size!r}; use e.g. "
            "192 or 256"
        )
    if cfg.gamma_schedule != "fixed" and cfg.gamma_final is None:
        raise ConfigError(
            f"run config: 'gamma_schedule' = {cfg.gamma_schedule!r} needs 'gamma_final' "
            f"(got {cfg.gamma_final!r})"
        )
    if cfg.gamma_strategy in ("linear", "cosine") and cfg.gammas_final is None:
        raise ConfigError(
            f"run config: 'gamma_strategy' = {cfg.gamma_strategy!r} needs 'gammas_final' "
            f"(got {cfg.gammas_final!r})"
        )
    if cfg.scale_early_stop_patience > 0 and (
        "context" in cfg.freeze or "context" in cfg.unfreeze_schedule
    ):
        raise ConfigError(
            f"run config: 'scale_early_stop_patience' = {cfg.scale_early_stop_patience!r} stops "
            "the context model's scales, but 'freeze' / 'unfreeze_schedule' keep the context "
            "frozen (for some of) the run, so a scale could stop before it trained; use one or "
            "the other"
        )
    both = [g for g in cfg.freeze if g in cfg.unfreeze_schedule]
    if both:
        raise ConfigError(
            f"run config: group {both[0]!r} is in 'freeze' = {cfg.freeze!r} and in "
            f"'unfreeze_schedule' = {cfg.unfreeze_schedule!r}; frozen for the whole run or "
            "unfrozen at a fraction, not both"
        )
    if set(cfg.freeze) | set(cfg.unfreeze_schedule) == set(PARAMETER_GROUPS):
        raise ConfigError(
            f"run config: 'freeze' = {cfg.freeze!r} and 'unfreeze_schedule' = "
            f"{cfg.unfreeze_schedule!r} leave no parameter group training at the start"
        )
    device = cfg.device
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise _fail("device", device, "must be auto, cpu, cuda or cuda:N")
    for key in ("train_data", "val_data", "init_checkpoint"):
        value = getattr(cfg, key)
        if value is None or (key != "init_checkpoint" and value == "samples"):
            continue
        if not Path(value).exists():
            raise _fail(key, value, "path does not exist")


def load(config_path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config file, apply ``--set`` overrides, return the validated, resolved config."""
    user = load_file(config_path)
    user.update(parse_set(overrides or []))
    return resolve(user)


def from_saved(saved: Mapping[str, Any], where: str) -> RunConfig:
    """The typed config of a mapping the trainer wrote (run.yaml, a checkpoint's ``config``).

    Keys newer than the file take their defaults (what the older code did); values are type-checked
    as in ``resolve``, but data paths need not exist any more. ``where`` names the file in errors.
    """
    unknown = sorted(set(saved) - set(KEYS) - {"meta"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown run-config key {unknown[0]!r}; it was not written "
            "by this version of hpcm.train"
        )
    try:
        return RunConfig(**{k: _coerce(k, saved.get(k, spec.default)) for k, spec in KEYS.items()})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def resume_mismatch(saved: Mapping[str, Any], current: RunConfig | Mapping[str, Any]) -> str | None:
    """Name the first key whose change would make a resumed run differ from an uninterrupted one.

    ``saved`` is the plain mapping of a checkpoint or run.yaml (possibly older, with fewer keys)."""
    if isinstance(current, RunConfig):
        current = current.as_dict()
    if current.get("scale_early_stop_patience") and saved.get("val_every") != current.get(
        "val_every"
    ):
        # validations decide when a scale stops (Phase 4): their cadence is part of the experiment
        # here
        return (
            f"run config key 'val_every' changed from {saved.get('val_every')!r} (checkpoint) to "
            f"{current.get('val_every')!r} in a run with scale_early_stop_patience; use a new "
            "output directory or restore the value"
        )
    for key in KEYS:
        if key in RESUME_SAFE_KEYS:
            continue
        if key not in saved and current.get(key) == KEYS[key].default:
            continue  # a key newer than the checkpoint: its default is what the older code did
        if saved.get(key) != current.get(key):
            return (
                f"run config key {key!r} changed from {saved.get(key)!r} (checkpoint) to "
                f"{current.get(key)!r}; use a new output directory or restore the value"
            )
    return None


def help_text() -> str:
    """Every key with type, default and meaning, for ``--help``."""
    lines = [
        "run-config keys (YAML file and --set key=value; later wins: defaults < variant preset < "
        "file < --set):"
    ]
    for key, spec in KEYS.items():
        kind = {
            "floats3": "[f,f,f]",
            "floats": "[f,...]",
            "groups": "[group,...]",
            "group_floats": "{group: f}",
        }.get(spec.kind, spec.kind)
        choices = f" {{{'|'.join(spec.choices)}}}" if spec.choices else ""
        lines.append(f"  {key} ({kind}{choices}, default {spec.default!r}): {spec.help}")
    lines.append(
        "variant presets: "
        + "; ".join(
            f"{name}: {', '.join(f'{k}={v}' for k, v in preset.items())}"
            for name, preset in VARIANT_PRESETS.items()
        )
    )
    return "\n".join(lines)
