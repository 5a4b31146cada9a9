"""Check that a weights file is the model a fine-tuning run means to start from.

    python -m hpcm.models.check FILE --model HPCM_Base --lmbda 0.013 [--distortion mse]
        [--output REPORT.json]

The workflow runs this once per ``official_checkpoints`` entry before any run starts from it
(rule ``check_checkpoint``). It refuses, with a message naming the file and what is wrong:

* a file that is not a torch checkpoint or holds no state dict;
* weights of another architecture: every parameter's name and shape must fit ``--model``
  (HPCM_Base and HPCM_Large differ in their block counts, the CPU presets in their widths);
* a lambda the file states that differs from ``--lmbda``: the run labels the project writes
  (``lmbda`` in the file's run metadata, in a warm start's payload, or in a training state's
  ``config``), and a lambda in the file's name or its folder's name: a ``lmbda``/``lambda``-prefixed
  number, or a number equal to one of the twelve released lambdas (MSE 0.0018 ... 0.0483, MS-SSIM
  2.4 ... 60.5), e.g. ``HPCM_Base/mse/0.0067.pth.tar`` or ``hpcm_base_lmbda0.0067.pt``;
* an MSE/MS-SSIM mix-up it can see: a distortion the file's labels state (``distortion`` in its
  run metadata, which ``hpcm.train`` writes, or in a training state's ``config``) that is not
  ``--distortion``, or ``--lmbda`` (or the lambda a file states) is one of the released lambdas of
  the other distortion.

What it cannot detect (said in the report too): the six lambdas of one architecture, and its MSE
and MS-SSIM models, have identical tensor shapes, so an official raw state dict (no labels) whose
name carries no lambda, or the wrong one that matches ``--lmbda``, passes; so do settings that
change no tensor shape (attention windows, heads) in files without a stored model config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from hpcm.config.presets import OFFICIAL_LAMBDAS
from hpcm.config.run_config import DISTORTIONS
from hpcm.models.checkpoint import (
    CheckpointError,
    CheckpointUnreadableError,
    _run_metadata,
    load_checkpoint_and_metadata,
)
from hpcm.models.presets import PRESETS
from hpcm.util.cli import run_command
from hpcm.util.io import atomic_write_text, sha256_file

UNDETECTABLE = (
    "not detectable: which of the six lambdas (or MSE vs MS-SSIM) an unlabelled file was trained "
    "at, when its name carries no lambda (all twelve models of one architecture have the same "
    "tensor shapes); shape-free settings (attention windows, heads) of files without a stored "
    "model config"
)
_PREFIXED = re.compile(r"(?:lmbda|lambda)[_=-]?(\d+(?:\.\d+)?(?:e-?\d+)?)", re.IGNORECASE)
_DECIMAL = re.compile(
    r"(?<!\d)(?<!\d\.)(\d+\.\d+)(?!\d|\.\d)"
)  # 0.0067 in "0.0067.pth.tar", not in "1.0.0067"


def same_lambda(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def released_distortion(lmbda: float) -> str | None:
    """'mse' / 'ms_ssim' when ``lmbda`` is a released lambda of that distortion, else None."""
    for distortion, values in OFFICIAL_LAMBDAS.items():
        if any(same_lambda(lmbda, v) for v in values):
            return distortion
    return None


def lambdas_in_path(path: str | os.PathLike) -> list[tuple[str, float]]:
    """(where, value) for every lambda the file name, then its folder's name, states."""
    found: list[tuple[str, float]] = []
    for where, name in (("file name", Path(path).name), ("folder name", Path(path).parent.name)):
        prefixed = [float(m) for m in _PREFIXED.findall(name)]
        released = [
            float(m) for m in _DECIMAL.findall(name) if released_distortion(float(m)) is not None
        ]
        for value in prefixed + released:
            if not any(same_lambda(value, v) for w, v in found if w == where):
                found.append((where, value))
    return found


def lambdas_in_labels(obj: Any) -> list[tuple[str, float]]:
    """(where, value) for the lambda the file's own labels state (project files only)."""
    found = []
    labels = _run_metadata(obj)
    if isinstance(labels.get("lmbda"), (int, float)):
        found.append(("run labels", float(labels["lmbda"])))
    if isinstance(obj, Mapping):
        if isinstance(obj.get("lmbda"), (int, float)) and not isinstance(obj.get("lmbda"), bool):
            found.append(("payload 'lmbda'", float(obj["lmbda"])))
        config = obj.get("config")
        if isinstance(config, Mapping) and isinstance(config.get("lmbda"), (int, float)):
            found.append(("training state config", float(config["lmbda"])))
    return found


def distortions_in_labels(obj: Any) -> list[tuple[str, str]]:
    """(where, value) for the distortion the file's own labels state (project files only)."""
    found = []
    labels = _run_metadata(obj)
    if isinstance(labels.get("distortion"), str):
        found.append(("run labels", labels["distortion"]))
    if isinstance(obj, Mapping):
        config = obj.get("config")
        if isinstance(config, Mapping) and isinstance(config.get("distortion"), str):
            found.append(("training state config", config["distortion"]))
    return found


def check_checkpoint(
    path: str | os.PathLike, model: str, lmbda: float, distortion: str = "mse"
) -> dict[str, Any]:
    """The report of a file that passes every check; a CheckpointError naming the file otherwise."""
    path = os.fspath(path)
    if model not in PRESETS:
        raise ValueError(f"--model {model!r}: unknown; valid: {', '.join(PRESETS)}")
    if distortion not in DISTORTIONS:
        raise ValueError(f"--distortion {distortion!r}: valid: {', '.join(DISTORTIONS)}")
    if not (lmbda > 0 and math.isfinite(lmbda)):
        raise ValueError(f"--lmbda {lmbda!r}: must be a positive number")
    other = released_distortion(lmbda)
    if other is not None and other != distortion:
        raise CheckpointError(
            f"{path}: lambda {lmbda:g} is a released {other.upper()} lambda but the study's "
            f"distortion is {distortion}; set `distortion: {other}` or use the "
            f"{distortion} lambdas {', '.join(f'{v:g}' for v in OFFICIAL_LAMBDAS[distortion])}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint not found: {path} (official_checkpoints names local files: download "
            "the released weights there first)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # what load_checkpoint_and_metadata would say, before the shape check
        raise CheckpointUnreadableError(
            f"{path}: not a torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    stated = lambdas_in_labels(obj) + lambdas_in_path(path)
    for where, value in distortions_in_labels(obj):
        if value != distortion:
            raise CheckpointError(
                f"{path}: its {where} say distortion {value}, but the study's "
                f"distortion is {distortion}; list a {distortion} model here or "
                f"set `distortion: {value}`"
            )
    del obj
    for where, value in stated:
        if not same_lambda(value, lmbda):
            kind = released_distortion(value)
            what = f" (a released {kind.upper()} lambda)" if kind else ""
            raise CheckpointError(
                f"{path}: its {where} states lambda {value:g}{what}, but it is listed for lambda "
                f"{lmbda:g}; list it under its own lambda or fix the file"
            )
    loaded, _ = load_checkpoint_and_metadata(path, name=model)  # CheckpointError on any misfit
    return {
        "file": path,
        "sha256": sha256_file(path),
        "bytes": os.path.getsize(path),
        "model": model,
        "lmbda": lmbda,
        "distortion": distortion,
        "parameters": sum(p.numel() for p in loaded.parameters()),
        "lambda_stated_by": [where for where, _ in stated]
        or ["nothing (unlabelled file, no lambda in its name)"],
        "cannot_detect": UNDETECTABLE,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpcm.models.check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "file", help="weights file (official raw state dict or a project checkpoint)"
    )
    parser.add_argument(
        "--model", required=True, help=f"configured architecture ({', '.join(PRESETS)})"
    )
    parser.add_argument(
        "--lmbda", required=True, type=float, help="the lambda this file is listed for"
    )
    parser.add_argument(
        "--distortion", default="mse", choices=DISTORTIONS, help="the study's distortion"
    )
    parser.add_argument(
        "--output", help="write the JSON report here (atomically); printed otherwise"
    )
    args = parser.parse_args(argv)

    def action() -> list[Path]:
        report = (
            json.dumps(
                check_checkpoint(args.file, args.model, args.lmbda, args.distortion), indent=2
            )
            + "\n"
        )
        if args.output:
            atomic_write_text(args.output, report)
            return [Path(args.output)]
        print(report, end="")
        return []

    return run_command(action)


if __name__ == "__main__":
    sys.exit(main())
