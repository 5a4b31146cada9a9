"""A codec anchor of one dataset: per-(image, quality) point files -> per-image CSV + JSON.

``python -m hpcm.evaluate.codec_anchor point`` measures one (image, quality) with
:func:`hpcm.evaluate.codecs.measure` and writes a point file (JSON, atomically): the workflow runs
one job per point, so a VTM encode (30-450 s per Kodak image) is kept and never redone when the
DAG is re-run or resumed. ``collect`` gathers the point files of one (dataset, anchor) into

- the per-image CSV (``IMAGE_COLUMNS``: image, quality, bytes, bpp, RGB PSNR, MS-SSIM, VTM's
  Y / U / V PSNR, their (6 Y + U + V) / 8 and VTM's own YUV-PSNR, encode / decode seconds,
  version, colour conversion (``round`` / ``truncate`` for VTM, ``pillow``), cfg SHA-256,
  both command lines);
- a CompressAI-style JSON (``name``, ``description``, ``results`` with ``bpp``, ``psnr-rgb``,
  ``ms-ssim-rgb``, ``encoding_time``, ``decoding_time`` averaged over images per quality, as
  ``compressai.utils.bench`` averages) with ``meta.provenance``.

Only complete points count: a point file that is missing, unreadable or not finite is left out
and the JSON says how many of the expected (image, quality) pairs it holds; a quality whose
images are not all there is left out of the averaged curve (``meta.incomplete_qualities``).

CLI::

    python -m hpcm.evaluate.codec_anchor point --codec vtm --quality 37 --image DIR/kodim01.png
        --name kodim01.png --dataset kodak --anchor vtm-22.0 --build-dir VTM/bin
        --cfg VTM/cfg/encoder_intra_vtm.cfg --output POINT.json
    python -m hpcm.evaluate.codec_anchor collect --points P1.json P2.json ...
        --output ANCHOR.csv --json ANCHOR.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from hpcm.data.images import list_images
from hpcm.evaluate.codecs import (
    CODECS,
    COLOURS,
    POINT_FORMAT,
    VTM_COLOUR_DEFAULT,
    VTM_COLOURS,
    measure,
    yuv_psnr,
)
from hpcm.evaluate.metrics import ms_ssim_to_db
from hpcm.util.cli import run_command
from hpcm.util.io import atomic_write_text

IMAGE_COLUMNS = (
    "dataset",
    "anchor",
    "codec",
    "image",
    "quality",
    "width",
    "height",
    "bytes",
    "bpp",
    "psnr",
    "ms_ssim",
    "ms_ssim_db",
    "psnr_y",
    "psnr_u",
    "psnr_v",
    "psnr_yuv",
    "psnr_yuv_vtm",
    "enc_time",
    "dec_time",
    "version",
    "colour",
    "cfg_sha256",
    "image_sha256",
    "encode_cmd",
    "decode_cmd",
)
REQUIRED_NUMBERS = ("bytes", "bpp", "psnr", "enc_time", "dec_time")


def write_point(record: dict[str, Any], output: str | Path) -> Path:
    atomic_write_text(output, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return Path(output)


def read_point(path: str | Path) -> tuple[dict[str, Any] | None, str]:
    """(record, "") for a complete point file, else (None, why it is not complete)."""
    path = Path(path)
    if not path.is_file():
        return None, f"{path}: missing"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"{path}: unreadable ({err})"
    if not isinstance(record, dict) or record.get("format") != POINT_FORMAT:
        return None, f"{path}: not a {POINT_FORMAT} point file"
    for key in ("image", "dataset", "anchor", *REQUIRED_NUMBERS):
        if key not in record:
            return None, f"{path}: no {key!r}"
    if not all(math.isfinite(float(record[k])) for k in REQUIRED_NUMBERS):
        return None, f"{path}: non-finite values"
    return record, ""


def image_row(record: dict[str, Any]) -> dict[str, Any]:
    """A point record as one row of the per-image CSV."""
    row = {column: record.get(column, math.nan) for column in IMAGE_COLUMNS}
    row["ms_ssim_db"] = ms_ssim_to_db(float(record.get("ms_ssim", math.nan)))
    row["psnr_yuv"] = yuv_psnr(record)
    for text in ("version", "colour", "cfg_sha256", "encode_cmd", "decode_cmd"):
        row[text] = record.get(text, "")
    return row


def image_frame(records: Iterable[dict[str, Any]]):
    """Per-image rows sorted by (quality, image); one (image, quality) twice is an error."""
    import pandas as pd  # why: slow to import (~0.5 s); the commands that need it load it

    frame = pd.DataFrame([image_row(r) for r in records], columns=list(IMAGE_COLUMNS))
    dup = frame.duplicated(subset=["dataset", "anchor", "image", "quality"])
    if dup.any():
        r = frame[dup].iloc[0]
        raise ValueError(
            f"point ({r['dataset']}, {r['anchor']}, {r['image']}, quality "
            f"{r['quality']}) given twice"
        )
    return frame.sort_values(["quality", "image"], kind="stable").reset_index(drop=True)


def curve_document(
    frame,
    provenance: dict[str, Any],
    expected_pairs: int | None = None,
    skipped: Sequence[str] = (),
    expected_images: int | None = None,
) -> dict[str, Any]:
    """CompressAI-style JSON of a per-image frame: means over images per quality (a quality
    missing any of the anchor's images, ``expected_images`` or else every image in the frame,
    is left out of ``results`` and named in ``meta.incomplete_qualities``)."""
    images = sorted(frame["image"].unique())
    n_images = expected_images or len(images)
    qualities, incomplete = [], {}
    results: dict[str, list[float]] = {
        k: [] for k in ("bpp", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time")
    }
    for quality, group in frame.groupby("quality", sort=True):
        if len(group) != n_images:
            incomplete[int(quality)] = int(len(group))
            continue
        qualities.append(int(quality))
        results["bpp"].append(float(group["bpp"].mean()))
        results["psnr-rgb"].append(float(group["psnr"].mean()))
        results["ms-ssim-rgb"].append(float(group["ms_ssim"].mean()))
        results["encoding_time"].append(float(group["enc_time"].mean()))
        results["decoding_time"].append(float(group["dec_time"].mean()))
    order = sorted(range(len(qualities)), key=lambda i: results["bpp"][i])
    not_measured = [k for k, v in results.items() if any(math.isnan(x) for x in v)]
    complete = {
        "pairs": int(len(frame)),
        "expected_pairs": expected_pairs,
        "images": len(images),
        "expected_images": n_images,
        "skipped": list(skipped),
    }
    dataset, anchor = frame["dataset"].iloc[0], frame["anchor"].iloc[0]
    return {
        "name": anchor,
        "description": f"{provenance.get('version', anchor)} on {dataset}"
        + (f", colour {colour}" if (colour := frame["colour"].iloc[0]) in VTM_COLOURS else "")
        + ", measured by this project (per-image means; hpcm.evaluate.codec_anchor)",
        "results": {k: [v[i] for i in order] for k, v in results.items() if k not in not_measured},
        "meta": {
            "dataset": dataset,
            "quality": [qualities[i] for i in order],
            "n_images": n_images,
            "incomplete_qualities": incomplete,
            "not_measured": not_measured,
            "complete": complete,
            "provenance": provenance,
        },
    }


def provenance_of(frame, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the rows say about how they were made (codec, versions, cfg hashes), plus ``extra``."""

    def unique(column):
        values = sorted({str(v) for v in frame[column] if str(v) not in ("", "nan")})
        return None if not values else values[0] if len(values) == 1 else values

    codec = unique("codec")
    provenance = {
        "measured_by": "this project (hpcm.evaluate.codec_anchor, through "
        "compressai.utils.bench's codec classes)",
        "codec": codec,
        "version": unique("version"),
        "cfg_sha256": unique("cfg_sha256"),
        "commands": "every encode / decode command line is in the per-image CSV "
        "(columns encode_cmd, decode_cmd)",
    }
    colour = unique("colour")
    if isinstance(colour, list):
        # e.g. truncated points left in a folder that a rounded run then completes
        raise ValueError(
            f"anchor {frame['dataset'].iloc[0]}/{frame['anchor'].iloc[0]} mixes colour "
            f"conversions {colour} (CSV column 'colour'): one anchor is one conversion; move "
            "the points of the other into a folder of their own, under another anchor name"
        )
    provenance["colour"] = COLOURS.get(colour, colour) if colour else None
    provenance.update(extra or {})
    return provenance


def collect(
    points: Sequence[str | Path],
    csv: str | Path,
    json_path: str | Path,
    expected_pairs: int | None = None,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    records, skipped = [], []
    for path in points:
        record, why = read_point(path)
        (records.append(record) if record else skipped.append(why))
    if not records:
        raise ValueError(
            f"no complete point files among {len(points)} given"
            + (f" (first: {skipped[0]})" if skipped else "")
        )
    frame = image_frame(records)
    doc = curve_document(frame, provenance_of(frame, extra), expected_pairs or len(points), skipped)
    atomic_write_text(csv, frame.to_csv(index=False))
    atomic_write_text(json_path, json.dumps(doc, indent=2) + "\n")
    return [Path(csv), Path(json_path)]


def list_dataset_images(data: str | Path, output: str | Path) -> list[Path]:
    """The image names of a dataset folder (paths relative to it, one a line), the rule's
    checkpoint: the workflow makes one point job per name."""
    names = [str(p.relative_to(data)) for p in list_images(data)]
    if not names:
        raise ValueError(f"no PNG/JPEG images in {data}")
    atomic_write_text(output, "".join(f"{n}\n" for n in names))
    return [Path(output)]


def _point(args: argparse.Namespace) -> list[Path]:
    key = f"datasets.{args.dataset}.anchors.{args.anchor}"
    options = {"build_dir": args.build_dir, "cfg": args.cfg, "colour": args.colour}
    record = measure(args.codec, options, args.image, args.quality, key)
    record.update(
        dataset=args.dataset, anchor=args.anchor, image=args.name or Path(args.image).name
    )
    return [write_point(record, args.output)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpcm.evaluate.codec_anchor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("point", help="measure one (image, quality)")
    p.add_argument("--codec", required=True, choices=list(CODECS))
    p.add_argument("--quality", required=True, type=int, help="quality (JPEG/WebP) or QP (VTM)")
    p.add_argument("--image", required=True)
    p.add_argument("--name", help="image name in the tables (default: the file name)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--anchor", required=True)
    p.add_argument("--build-dir", help="vtm: folder of EncoderAppStatic / DecoderAppStatic")
    p.add_argument("--cfg", help="vtm: encoder cfg (e.g. cfg/encoder_intra_vtm.cfg)")
    p.add_argument(
        "--colour",
        choices=list(VTM_COLOURS),
        help=f"vtm: round or truncate the 8-bit colour conversions (CompressAI truncates; "
        f"default {VTM_COLOUR_DEFAULT})",
    )
    p.add_argument("--output", required=True)
    p.set_defaults(func=_point)
    c = sub.add_parser("collect", help="point files -> per-image CSV + CompressAI-style JSON")
    c.add_argument("--points", nargs="+", required=True)
    c.add_argument("--output", required=True, help="per-image CSV")
    c.add_argument("--json", required=True, help="CompressAI-style JSON")
    c.set_defaults(func=lambda a: collect(a.points, a.output, a.json))
    i = sub.add_parser("images", help="the image names of a dataset folder, one a line")
    i.add_argument("--data", required=True, help="the dataset folder")
    i.add_argument("--output", required=True)
    i.set_defaults(func=lambda a: list_dataset_images(Path(a.data), a.output))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
