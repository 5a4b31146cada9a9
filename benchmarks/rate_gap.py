"""Bitstream size vs estimated rate (-log2 p of the eval forward) on Kodak crops.

    python benchmarks/rate_gap.py                                  # HPCM_Base and HPCM_Tiny
    python benchmarks/rate_gap.py --presets HPCM_Tiny --images 1 2 3 --levels 60 480
    python benchmarks/rate_gap.py --kodak /path/to/kodak --crop 256

Weights: the golden-fixture deterministic initialisation (tests/fixtures/make_hpcm_golden.py)
with the output biases of h_s and of both spatial priors calibrated per image: predicted means 0
and predicted scales equal to the maximum-likelihood GGM scale of that image's latents
(tests/fixtures/hpcm_support.py: calibrate_to_latents). Random weights would otherwise predict
means and scales unrelated to the latents and most symbols would be escape-coded, which is not
what a trained model does. The "esc" column says how many y / z symbols still fell outside their
coder tables (the 2 % claim is about in-table latents).

For each scale table (the official 60 levels from 0.12 to 64, and finer ones) the y stream is
compared with the estimate; the z table is per channel and does not depend on it. Gap = (actual -
estimate) / estimate. The estimate does not depend on the table; a coarse table rounds each
predicted sigma up to the next level, which costs (or, when the predicted sigma is too small for
the data, saves) a little.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tests.fixtures holds the golden initialisation
    sys.path.insert(0, str(REPO))

from hpcm.models import build_model  # noqa: E402
from hpcm.models.diagnostics import escaped_symbols  # noqa: E402
from hpcm.models.entropy import get_scale_table  # noqa: E402
from tests.fixtures.hpcm_support import (  # noqa: E402
    KODAK,
    calibrate_to_latents,
    centre_crop,
    init_like_golden,
    kodak_image,
)


def bits(likelihoods: torch.Tensor) -> float:
    return float(-torch.log2(likelihoods.double()).sum())


def gap(actual: float, estimate: float) -> float:
    return 100.0 * (actual - estimate) / estimate


def measure(model, x: torch.Tensor, levels: list[int]) -> list[dict]:
    """One row per scale table: estimated and actual bits of y and z, escaped symbol counts."""
    with torch.no_grad():
        likelihoods = model(x)["likelihoods"]
    y_est, z_est = bits(likelihoods["y"]), bits(likelihoods["z"])
    rows = []
    for n in levels:
        model.update(scale_table=get_scale_table(0.12, 64, n), force=True)
        escapes = escaped_symbols(model, x)
        enc = model.compress(x)
        rows.append(
            {
                "levels": n,
                "y_est": y_est,
                "y_act": len(enc["strings"][0][0]) * 8,
                "z_est": z_est,
                "z_act": len(enc["strings"][1][0]) * 8,
                "y_esc": escapes.y_escaped,
                "z_esc": escapes.z_escaped,
            }
        )
    return rows


HEADER = (
    f"{'model':<10} {'image':<8} {'table':>5} {'y est bits':>11} {'y bits':>9} {'y gap %':>8} "
    f"{'z est bits':>10} {'z bits':>8} {'z gap %':>8} {'esc y/z':>9}"
)


def line(model: str, image: str, r: dict) -> str:
    return (
        f"{model:<10} {image:<8} {r['levels']:>5} {r['y_est']:>11.0f} {r['y_act']:>9d} "
        f"{gap(r['y_act'], r['y_est']):>+8.2f} {r['z_est']:>10.0f} {r['z_act']:>8d} "
        f"{gap(r['z_act'], r['z_est']):>+8.2f} {str(r['y_esc']) + '/' + str(r['z_esc']):>9}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kodak", type=Path, default=KODAK, help=f"folder with kodimNN.png (default {KODAK})"
    )
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4, 7, 10, 13, 16, 19, 22])
    parser.add_argument("--presets", nargs="+", default=["HPCM_Base", "HPCM_Tiny"])
    parser.add_argument("--levels", type=int, nargs="+", default=[60, 120, 480])
    parser.add_argument(
        "--crop", type=int, default=256, help="centre crop side (multiple of the pad multiple)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    images = {
        f"kodim{i:02d}": centre_crop(kodak_image(i, args.kodak), args.crop, args.crop)
        for i in args.images
    }

    print(
        f"centre {args.crop}x{args.crop} crops of {len(images)} Kodak images from {args.kodak}; "
        f"torch {torch.__version__}, {args.threads} thread(s)"
    )
    totals: dict[tuple[str, int], dict] = {}
    lines = []
    for preset in args.presets:
        model = init_like_golden(build_model(preset)).eval()
        if args.crop % model.pad_multiple:
            raise SystemExit(
                f"--crop {args.crop} is not a multiple of {preset}'s pad multiple "
                f"{model.pad_multiple}"
            )
        for name, x in tqdm(images.items(), desc=preset, leave=False):
            scale = calibrate_to_latents(model, x)
            for r in measure(model, x, args.levels):
                lines.append(line(preset, name, r) + f"   sigma={scale:.3f}")
                total = totals.setdefault(
                    (preset, r["levels"]),
                    {k: 0 for k in r if k != "levels"} | {"levels": r["levels"]},
                )
                for k in total:
                    if k != "levels":
                        total[k] += r[k]
    print(HEADER)
    print("\n".join(lines))
    print("overall (sums over the images):")
    print(HEADER)
    for (preset, _), total in totals.items():
        print(line(preset, "all", total))
    any_escape = any(t["y_esc"] + t["z_esc"] for t in totals.values())
    print(
        f"latents escaped the tables: {'YES' if any_escape else 'no'}; "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
