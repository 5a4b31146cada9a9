"""Evaluate a checkpoint on an image folder with real bitstreams: ``python -m hpcm.evaluate``.

    python -m hpcm.evaluate --checkpoint CKPT --dataset DIR --output OUT.csv [--json OUT.json]
        [--model NAME] [--device auto|cpu|cuda] [--dataset-name NAME] [--variant V] [--lmbda L]
        [--limit N] [--no-update] [--save-reconstructions DIR]

For every image (PNG/JPEG, recursive, sorted): pad to ``model.pad_multiple``, run the forward
pass (estimated rate and the reference reconstruction), ``compress``, ``decompress``, crop, and
measure, following CompressAI's ``eval_model`` conventions:

- ``bpp``: bitstream bytes (all y and z strings, no header) x 8 / pixels of the ORIGINAL image;
- ``bpp_est``: -log2 of the forward likelihoods over the same pixels, and the estimated bits of
  each scale (``bits_s1``, ``bits_s2``, ``bits_s3`` via ``model.scale_bits``) and of z (``bits_z``);
- ``psnr`` (dB) and ``ms_ssim`` (linear; ``ms_ssim_db`` = -10 log10(1 - ms_ssim)) on the decoded
  image rounded and clamped to 8 bits, against the 8-bit original (MS-SSIM needs both sides
  > 160 px; smaller images get an empty MS-SSIM);
- ``enc_time`` / ``dec_time`` (seconds, CUDA synchronised), ``decode_ok``: the decoded image
  equals the forward reconstruction after 8-bit rounding (``decode_max_abs_diff`` is the largest
  float difference).

Outputs (written atomically): the per-image CSV (plus ``variant``, ``lmbda``, ``seed``, ``dataset``,
``model``, ``checkpoint`` on every row) and, with ``--json``, a CompressAI-format JSON
(``name``, ``description``, ``results`` with one-element lists ``bpp``, ``psnr-rgb``,
``ms-ssim-rgb``, ``encoding_time``, ``decoding_time``; dataset means as CompressAI: per-image
PSNR averaged in dB) that ``python -m compressai.utils.plot`` reads, plus a ``meta`` block.

Labels come from one place, the checkpoint: ``hpcm.train`` stores model, variant, lambda and seed
in ``epoch_best.pth.tar``'s metadata (``hpcm.models.with_run_metadata``); files beside the
checkpoint (``run.yaml``) are not read. ``--model``, ``--variant``, ``--lmbda`` and ``--seed``
supply what the checkpoint does not say (an official release) and must agree with what it does
say. A lambda and a variant are required from one of the two; the seed is left empty when
neither gives one. The model is otherwise inferred from the tensor shapes.
Errors (exit code 2, message on stderr, before any image is coded): a bad argument (``--limit``
below 1, an ``--output``/``--json`` that is a folder, a ``--save-reconstructions`` that is a file),
empty folder, unreadable image (every image is decoded once first; a zero-byte or truncated file
is named then), labels missing or in conflict, an unreadable checkpoint or one that does not fit
the model.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from hpcm.data.images import ImageError, list_images, load_rgb, to_tensor
from hpcm.evaluate.metrics import ms_ssim_8bit, ms_ssim_to_db, psnr_8bit, to_8bit
from hpcm.models import (
    CheckpointError,
    CheckpointUnreadableError,
    NonFiniteScalesError,
    crop_image,
    load_checkpoint_and_metadata,
    pad_image,
)
from hpcm.util.cli import run_command
from hpcm.util.device import pick_device
from hpcm.util.io import atomic_write_bytes, atomic_write_text

CSV_COLUMNS = (
    "image",
    "width",
    "height",
    "variant",
    "lmbda",
    "seed",
    "dataset",
    "model",
    "checkpoint",
    "bpp",
    "bpp_est",
    "bits_s1",
    "bits_s2",
    "bits_s3",
    "bits_z",
    "bytes_y",
    "bytes_z",
    "psnr",
    "ms_ssim",
    "ms_ssim_db",
    "enc_time",
    "dec_time",
    "decode_ok",
    "decode_max_abs_diff",
)


class EvaluationError(ValueError):
    """Bad evaluation input; the message names the file or value at fault."""


@dataclass
class ImageResult:
    image: str
    width: int
    height: int
    bpp: float
    bpp_est: float
    bits_s1: float
    bits_s2: float
    bits_s3: float
    bits_z: float
    bytes_y: int
    bytes_z: int
    psnr: float
    ms_ssim: float
    ms_ssim_db: float
    enc_time: float
    dec_time: float
    decode_ok: bool
    decode_max_abs_diff: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_image(
    model, x: torch.Tensor, name: str = "", save_to: Path | None = None
) -> ImageResult:
    """Measure one (1, 3, H, W) image in [0, 1] on ``model``'s device.

    ``save_to``: write the decoded image there as an 8-bit PNG (exactly what the metrics saw).
    """
    device = x.device
    height, width = x.shape[-2:]
    pixels = height * width
    x_pad, pad = pad_image(x, model.pad_multiple)

    out = model(x_pad)
    lik = out["likelihoods"]
    bits_y = model.scale_bits(lik["y"]).double().sum(0)  # (3,) s1, s2, s3
    bits_z = float(-torch.log2(lik["z"].double()).sum())
    x_forward = crop_image(out["x_hat"], pad).clamp(0, 1)

    _sync(device)
    start = time.perf_counter()
    enc = model.compress(x_pad)
    _sync(device)
    enc_time = time.perf_counter() - start
    start = time.perf_counter()
    dec = model.decompress(enc["strings"], enc["shape"])
    _sync(device)
    dec_time = time.perf_counter() - start

    x_hat = crop_image(dec["x_hat"], pad).clamp(0, 1)
    bytes_y = sum(len(s) for s in enc["strings"][0])
    bytes_z = sum(len(s) for s in enc["strings"][1])
    diff = (x_hat - x_forward).abs().max().item()
    value = ms_ssim_8bit(x, x_hat)
    if save_to is not None:
        _save_png(x_hat, save_to)
    return ImageResult(
        image=name,
        width=width,
        height=height,
        bpp=(bytes_y + bytes_z) * 8.0 / pixels,
        bpp_est=(float(bits_y.sum()) + bits_z) / pixels,
        bits_s1=float(bits_y[0]),
        bits_s2=float(bits_y[1]),
        bits_s3=float(bits_y[2]),
        bits_z=bits_z,
        bytes_y=bytes_y,
        bytes_z=bytes_z,
        psnr=psnr_8bit(x, x_hat),
        ms_ssim=value,
        ms_ssim_db=ms_ssim_to_db(value),
        enc_time=enc_time,
        dec_time=dec_time,
        decode_ok=bool(torch.equal(to_8bit(x_hat), to_8bit(x_forward))),
        decode_max_abs_diff=diff,
    )


def _save_png(x_hat: torch.Tensor, path: Path) -> None:
    array = to_8bit(x_hat[0]).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------
# Model and run metadata
# --------------------------------------------------------------------------------------------


def load_model(checkpoint: Path, name: str | None, device: torch.device, update: bool = True):
    """(model on ``device``, the run labels the checkpoint stores)."""
    try:
        model, labels = load_checkpoint_and_metadata(checkpoint, name=name, map_location="cpu")
    except CheckpointUnreadableError as err:
        raise EvaluationError(str(err)) from None
    except CheckpointError as err:
        hint = (
            (
                f"; the weights are another architecture than --model {name}: drop --model to "
                "infer it from the checkpoint"
            )
            if name
            else ""
        )
        raise EvaluationError(f"{err}{hint}") from None
    model = model.to(device).eval()
    if update:
        model.update(force=True)  # coder tables must match the weights being evaluated
    return model, labels


def resolve_labels(
    checkpoint: Path,
    stored: dict[str, Any],
    model_name: str | None,
    variant: str | None,
    lmbda: float | None,
    seed: int | None,
) -> dict[str, Any]:
    """The row labels: the checkpoint's own, completed (never contradicted) by the command line."""
    given = {"model": model_name, "variant": variant, "lmbda": lmbda, "seed": seed}
    labels = {}
    for key, value in given.items():
        saved = stored.get(key)
        if value is not None and saved is not None:
            same = (
                math.isclose(float(value), float(saved), rel_tol=1e-9, abs_tol=0.0)
                if key == "lmbda"
                else str(value) == str(saved)
            )
            if not same:
                raise EvaluationError(
                    f"--{key} {value} contradicts the checkpoint {checkpoint}, which says "
                    f"{key} = {saved!r}; drop --{key} or evaluate the right checkpoint"
                )
        labels[key] = saved if saved is not None else value
    for key in ("variant", "lmbda"):
        if labels[key] is None or labels[key] == "":
            raise EvaluationError(
                f"{checkpoint} does not say its {key} (no run metadata, e.g. an official "
                f"release); pass --{key}"
            )
    labels["lmbda"] = float(labels["lmbda"])
    if not math.isfinite(labels["lmbda"]) or labels["lmbda"] <= 0:
        raise EvaluationError(f"lambda must be a positive number, got {labels['lmbda']!r}")
    labels["seed"] = "" if labels["seed"] is None else int(labels["seed"])
    return labels


def check_arguments(
    checkpoint: Path,
    output: Path,
    json_path: Path | None,
    limit: int | None,
    reconstructions: Path | None = None,
) -> None:
    """Every argument that can be checked without work, checked before any."""
    if limit is not None and limit < 1:
        raise EvaluationError(
            f"--limit must be at least 1 (or absent for every image), got {limit}"
        )
    if not checkpoint.is_file():
        raise EvaluationError(f"checkpoint not found: {checkpoint}")
    for flag, path in (("--output", output), ("--json", json_path)):
        if path is None:
            continue
        if path.is_dir():
            raise EvaluationError(
                f"{flag} {path} is a folder; give the file to write, e.g. {path / 'eval.csv'}"
            )
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise EvaluationError(
                f"{flag} {path}: {parent} is a file, so the folder cannot be created"
            )
    if reconstructions is not None:
        candidates = (reconstructions, *reconstructions.parents)
        blocking = next((p for p in candidates if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            where = "is" if blocking == reconstructions else f"lies in {blocking}, which is"
            raise EvaluationError(
                f"--save-reconstructions {reconstructions} {where} a file; "
                "the option needs a folder (created if missing) for one PNG "
                "per image"
            )


# --------------------------------------------------------------------------------------------
# Dataset and outputs
# --------------------------------------------------------------------------------------------


def list_dataset(folder: Path, limit: int | None = None) -> list[Path]:
    if not folder.exists():
        raise EvaluationError(f"dataset folder not found: {folder}")
    images = list_images(folder)
    if not images:
        raise EvaluationError(f"no PNG/JPEG images found under {folder}")
    return images if limit is None else images[:limit]


def check_images(images: Sequence[Path]) -> None:
    """Decode every image once before any is coded; one error naming every unreadable file."""
    problems = []
    for path in tqdm(images, desc="check images", unit="img", leave=False):
        try:
            load_rgb(path)
        except ImageError as err:
            problems.append(str(err))
    if problems:
        raise EvaluationError(
            f"{len(problems)} of {len(images)} image(s) unreadable, nothing was "
            "coded; fix or remove them:\n  " + "\n  ".join(problems)
        )


def load_image(path: Path, device: torch.device) -> torch.Tensor:
    try:
        array = load_rgb(path)
    except ImageError as err:
        raise EvaluationError(str(err)) from None
    return to_tensor(array).unsqueeze(0).to(device)


def dataset_means(results: Sequence[ImageResult]) -> dict[str, float]:
    """CompressAI's aggregation: arithmetic means over images (PSNR averaged in dB)."""

    def mean(key: str) -> float:
        values = [getattr(r, key) for r in results]
        finite = [v for v in values if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else math.nan

    return {key: mean(key) for key in ("bpp", "bpp_est", "psnr", "ms_ssim", "enc_time", "dec_time")}


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON null): ``json`` would otherwise write bare NaN, which is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def compressai_json(results: Sequence[ImageResult], name: str, meta: dict[str, Any]) -> dict:
    """CompressAI's results document. A metric with no measured value (e.g. MS-SSIM of images
    under 161 px) is left out of ``results`` and named in ``meta.not_measured``: CompressAI's
    plot cannot read a null there, and a made-up number would be worse."""
    means = dataset_means(results)
    measured = {
        "psnr-rgb": means["psnr"],
        "ms-ssim-rgb": means["ms_ssim"],
        "bpp": means["bpp"],
        "encoding_time": means["enc_time"],
        "decoding_time": means["dec_time"],
    }
    return {
        "name": name,
        "description": "Inference (ans)",
        "results": {k: [v] for k, v in measured.items() if not math.isnan(v)},
        "meta": _json_safe(
            {
                **meta,
                "bpp_est": means["bpp_est"],
                "n_images": len(results),
                "decode_ok": all(r.decode_ok for r in results),
                "not_measured": [k for k, v in measured.items() if math.isnan(v)],
            }
        ),
    }


def write_csv(path: Path, results: Sequence[ImageResult], meta: dict[str, Any]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        row = {
            **asdict(result),
            **{k: meta[k] for k in ("variant", "lmbda", "seed", "dataset", "model", "checkpoint")},
        }
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def evaluate(
    checkpoint: str | Path,
    dataset: str | Path,
    output: str | Path,
    json_path: str | Path | None = None,
    model_name: str | None = None,
    device: str = "auto",
    dataset_name: str | None = None,
    variant: str | None = None,
    lmbda: float | None = None,
    limit: int | None = None,
    update: bool = True,
    reconstructions: str | Path | None = None,
    seed: int | None = None,
) -> list[ImageResult]:
    checkpoint, dataset, output = Path(checkpoint), Path(dataset), Path(output)
    check_arguments(
        checkpoint,
        output,
        Path(json_path) if json_path else None,
        limit,
        Path(reconstructions) if reconstructions else None,
    )
    images = list_dataset(dataset, limit)  # fail on an empty folder before loading the model
    check_images(images)  # an unreadable image fails before any image is coded
    torch_device = pick_device(device, "--device")
    model, stored = load_model(checkpoint, model_name, torch_device, update)
    labels = resolve_labels(checkpoint, stored, model_name, variant, lmbda, seed)
    meta = {
        "variant": str(labels["variant"]),
        "lmbda": labels["lmbda"],
        "seed": labels["seed"],
        "dataset": dataset_name or dataset.name,
        "model": getattr(model, "name", model_name or ""),
        "checkpoint": str(checkpoint),
        "device": str(torch_device),  # JSON meta only: encoder and decoder both ran here
    }
    results = []
    for path in tqdm(images, desc=f"evaluate {meta['dataset']}", unit="img"):
        x = load_image(path, torch_device)
        name = str(path.relative_to(dataset)) if path != dataset else path.name
        save_to = (
            Path(reconstructions) / Path(name).with_suffix(".png") if reconstructions else None
        )
        try:
            results.append(evaluate_image(model, x, name, save_to))
        except NonFiniteScalesError as err:
            raise EvaluationError(
                f"{checkpoint} on {path}: {err}: the model's activations overflow on this image, "
                "as a diverged training run leaves them (its metrics.csv shows NaN losses or "
                "skipped steps); train it again, e.g. with a lower lr. No CSV or JSON was written"
            ) from None
    write_csv(output, results, meta)
    if json_path:
        seed_part = f"-seed{meta['seed']}" if meta["seed"] != "" else ""
        label = f"{meta['model']}-{meta['variant']}-lmbda{meta['lmbda']:g}{seed_part}"
        doc = compressai_json(results, label, {**meta, "dataset_dir": str(dataset)})
        atomic_write_text(json_path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpcm.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="model weights (.pth.tar)")
    parser.add_argument("--dataset", required=True, help="image folder (searched recursively)")
    parser.add_argument("--output", required=True, help="per-image CSV to write")
    parser.add_argument("--json", help="CompressAI-format JSON to write")
    parser.add_argument(
        "--model", help="architecture (default: the checkpoint's metadata, else inferred)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when present), cpu, cuda or cuda:N: the networks of the encoder "
        "and of the decoder run there (both on the same device: bit-exact)",
    )
    parser.add_argument("--dataset-name", help="name in the outputs (default: folder name)")
    parser.add_argument(
        "--variant",
        help="variant label (required unless the checkpoint stores it; must agree with it)",
    )
    parser.add_argument(
        "--lmbda",
        type=float,
        help="lambda label (required unless the checkpoint stores it; must agree with it)",
    )
    parser.add_argument(
        "--seed", type=int, help="training seed label (default: the checkpoint's; must agree)"
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument(
        "--no-update",
        action="store_true",
        help="use the coder tables stored in the checkpoint as they are",
    )
    parser.add_argument(
        "--save-reconstructions",
        metavar="DIR",
        help="also write every decoded image as an 8-bit PNG under DIR",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    results = evaluate(
        args.checkpoint,
        args.dataset,
        args.output,
        args.json,
        args.model,
        args.device,
        args.dataset_name,
        args.variant,
        args.lmbda,
        args.limit,
        not args.no_update,
        args.save_reconstructions,
        args.seed,
    )
    means = dataset_means(results)
    print(
        f"{len(results)} image(s): bpp {means['bpp']:.4f} (estimated {means['bpp_est']:.4f}), "
        f"PSNR {means['psnr']:.3f} dB, MS-SSIM {means['ms_ssim']:.4f}, decode "
        f"{'ok' if all(r.decode_ok for r in results) else 'MISMATCH'}"
    )


if __name__ == "__main__":
    sys.exit(main())
