"""Max |ours - official| on the golden cases of tests/models/test_equivalence.py.

    python benchmarks/equivalence.py              # 1 torch thread, as the tests
    python benchmarks/equivalence.py --threads 2

Same weights (make_hpcm_golden.deterministic_init), same inputs, eval mode, float32, CPU; the
official outputs are the stored golden tensors of tests/fixtures/hpcm_golden.npz. The differences
depend on the thread count and the CPU's float summation order, so the script prints both.
Also prints the parameter counts of HPCM_Base / HPCM_Large cited in docs/models.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `tests` package

from hpcm.models import build_model  # noqa: E402
from tests.fixtures.hpcm_support import golden, image_tensor, init_like_golden  # noqa: E402
from tests.models.test_equivalence import GOLDEN_CASES, TOL, golden_diffs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (tests use 1)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__} threads={torch.get_num_threads()} float32 cpu (test tolerance "
        f"{TOL:g})"
    )
    print(f"{'model':<12}{'input':>9}{'x_hat':>12}{'y lik':>12}{'z lik':>12}")
    models: dict[str, torch.nn.Module] = {}
    for arch, preset, h, w in GOLDEN_CASES:
        if preset not in models:
            models[preset] = init_like_golden(build_model(preset)).eval()
        with torch.no_grad():
            out = models[preset](image_tensor(golden()[f"image_{h}x{w}"]))
        d = golden_diffs(out, arch, h, w)
        print(
            f"{preset:<12}{f'{h}x{w}':>9}{d['x_hat']:>12.2g}{d['lik_y']:>12.2g}{d['lik_z']:>12.2g}"
        )
    for preset, model in models.items():
        print(f"{preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters")


if __name__ == "__main__":
    main()
