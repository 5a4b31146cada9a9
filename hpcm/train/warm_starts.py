"""The demo's shipped warm starts: export trained runs as small fp16 files, and verify them.

``export`` reads the selected weights of each run of a pretraining study
(``results/train/<variant>/lmbda<L>/seed<k>/final.pth.tar``, one seed per lambda, see
workflow/configs/pretrain.yaml), stores the model's trained parameters in float16 with the
preset name and config (buffers as they are), as ``<output>/hpcm_tiny_lmbda<L>.pt``, and records in
``<output>/warm_starts.json`` each file's SHA-256 and size, the run's steps and best validation
loss (float32, as trained), and the validation metrics of the shipped float16 weights loaded
into the float32 model on CPU (what ``verify`` and the tests reproduce). ``SHA256SUMS`` lists the
hashes in ``sha256sum -c`` format.

``verify`` checks every listed file's hash and recomputes its validation loss on the val split.

CLI::

    python -m hpcm.train.warm_starts export --runs results/train/pretrain --output pretrained
    python -m hpcm.train.warm_starts verify --dir pretrained
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from hpcm import models
from hpcm.config.run_config import RUN_YAML, from_saved, read_run_yaml
from hpcm.data import images as data
from hpcm.train import losses
from hpcm.util.cli import run_command
from hpcm.util.io import atomic_torch_save, atomic_write_text, sha256_file

MANIFEST = "warm_starts.json"
SUMS = "SHA256SUMS"


class WarmStartError(ValueError):
    """A warm-start file or manifest that does not match what was recorded; names the file."""


def file_name(model: str, lmbda: str) -> str:
    return f"{model.lower()}_lmbda{lmbda}.pt"


def half_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with the trained parameters in float16 (halves the size). Buffers stay as
    they are: they are small, and some cannot be rounded (the likelihood lower bound 1e-9 is 0 in
    float16, which would make the estimated rate infinite)."""
    parameters = {name for name, _ in model.named_parameters()}
    return {k: v.half() if k in parameters else v for k, v in model.state_dict().items()}


@torch.no_grad()
def validation_metrics(model: torch.nn.Module, val_data: str, lmbda: float) -> dict[str, float]:
    """Mean loss, bpp and PSNR over the validation images, as ``hpcm.train.loop.Run.validate``
    computes them on CPU (full images padded to the model multiple, estimated rate)."""
    model.eval()
    images = data.open_image_set(val_data, "val", "val_data")
    totals = {"loss": 0.0, "bpp": 0.0, "psnr": 0.0}
    count = 0
    for _, x in data.validation_images(images):
        padded, pad = models.pad_image(x, model.pad_multiple)
        out = model(padded)
        out = {
            "x_hat": models.crop_image(out["x_hat"], pad).float(),
            "likelihoods": out["likelihoods"],
        }
        rd = losses.rate_distortion(out, x, lmbda)
        totals["loss"] += float(rd["loss"])
        totals["bpp"] += float(rd["bpp_loss"])
        totals["psnr"] += float(rd["psnr"])
        count += 1
    return {f"val_{k}": v / count for k, v in totals.items()}


def _best_val_loss(run_dir: Path) -> tuple[float, int]:
    import pandas as pd  # why: slow to import (~0.5 s); only verify needs it

    metrics = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["val_loss"])
    if metrics.empty:
        raise WarmStartError(f"{run_dir}/metrics.csv: no validation rows")
    best = metrics.loc[metrics["val_loss"].idxmin()]
    return float(best["val_loss"]), int(best["step"])


def export(runs: str | Path, output: str | Path, val_data: str = "samples") -> dict[str, Any]:
    """Write one fp16 file per run under ``runs`` (``lmbda<L>/seed<k>/`` folders with run.yaml and
    final.pth.tar; one seed per lambda, since a warm start is one model per lambda)."""
    runs, output = Path(runs), Path(output)
    run_dirs = sorted(p.parent for p in runs.glob("lmbda*/seed*/final.pth.tar"))
    if not run_dirs:
        raise WarmStartError(
            f"no lmbda<L>/seed<k>/final.pth.tar under {runs}; run the pretraining study first"
        )
    lambda_dirs = [run_dir.parent.name for run_dir in run_dirs]
    repeated = sorted({name for name in lambda_dirs if lambda_dirs.count(name) > 1})
    if repeated:
        raise WarmStartError(
            f"{runs}: several seeds for {', '.join(repeated)}; a warm start is one model per "
            "lambda: train one seed (seeds: [0] in the pretraining config) or move the others away"
        )
    entries = []
    for run_dir in run_dirs:
        saved = read_run_yaml(run_dir)
        if not saved:  # the defaults would name another model: say what is missing instead
            raise WarmStartError(
                f"{run_dir / RUN_YAML}: missing or empty; export needs the run config "
                "that hpcm.train wrote beside final.pth.tar"
            )
        cfg = from_saved(saved, str(run_dir / RUN_YAML))
        model = models.load_checkpoint(run_dir / "final.pth.tar", name=cfg.model)
        lmbda = run_dir.parent.name.removeprefix("lmbda")
        path = output / file_name(cfg.model, lmbda)
        payload = {
            "model_name": model.name,
            "model_config": dataclasses.asdict(model.config),
            "state_dict": half_state(model),
            "lmbda": float(cfg.lmbda),
        }
        atomic_torch_save(payload, path)
        shipped = models.load_checkpoint(path, name=cfg.model)
        best_loss, best_step = _best_val_loss(run_dir)
        entries.append(
            {
                "file": path.name,
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "model": cfg.model,
                "lmbda": float(cfg.lmbda),
                "steps": int(cfg.steps),
                "selected_step": best_step,
                "batch_size": int(cfg.batch_size),
                "patch_size": int(cfg.patch_size),
                "lr": float(cfg.lr),
                "seed": int(cfg.seed),
                "train_val_loss_fp32": best_loss,
                **validation_metrics(shipped, val_data, float(cfg.lmbda)),
            }
        )
    manifest = {"format": "hpcm-warm-starts/1", "val_data": val_data, "warm_starts": entries}
    atomic_write_text(output / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    atomic_write_text(output / SUMS, "".join(f"{e['sha256']}  {e['file']}\n" for e in entries))
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise WarmStartError(f"{path} not found: export the warm starts first")
    return json.loads(path.read_text())


def verify(directory: str | Path, check_loss: bool = True) -> list[dict[str, Any]]:
    """Hash and (optionally) validation loss of every listed file; raises on a hash mismatch."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    results = []
    for entry in manifest["warm_starts"]:
        path = directory / entry["file"]
        digest = sha256_file(path) if path.is_file() else "missing"
        if digest != entry["sha256"]:
            raise WarmStartError(
                f"{path}: SHA-256 {digest} differs from the recorded {entry['sha256']} "
                "(re-export with `python -m hpcm.train.warm_starts export`)"
            )
        result = {"file": entry["file"], "recorded_val_loss": entry["val_loss"]}
        if check_loss:
            model = models.load_checkpoint(path, name=entry["model"])
            result.update(validation_metrics(model, manifest["val_data"], entry["lmbda"]))
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpcm.train.warm_starts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="fp16 warm starts from a pretraining study's runs")
    e.add_argument(
        "--runs", required=True, help="folder of the run folders (results/train/pretrain)"
    )
    e.add_argument("--output", required=True, help="where the .pt files and the manifest go")
    e.add_argument(
        "--val-data", default="samples", help="validation images (default: the samples' val split)"
    )
    v = sub.add_parser("verify", help="check hashes and recompute the validation loss")
    v.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    if args.command == "export":
        return run_command(
            lambda: print(json.dumps(export(args.runs, args.output, args.val_data), indent=2))
        )
    return run_command(lambda: print(json.dumps(verify(args.dir), indent=2)))


if __name__ == "__main__":
    sys.exit(main())
