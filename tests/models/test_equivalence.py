"""Equivalence with the official lyq133/LIC-HPCM implementation (golden tensors, no network needed).

tests/fixtures/hpcm_golden.npz holds the official eval-mode outputs for fixed inputs and for the
deterministic weights of make_hpcm_golden.deterministic_init (see README_hpcm_golden.md); here the
same weights are put into our model and the outputs compared.
"""

from __future__ import annotations

import pytest
import torch

from hpcm.models import build_model
from tests.fixtures.hpcm_support import golden, image_tensor, init_like_golden, single_thread

TOL = 1e-4


one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def base():
    return init_like_golden(build_model("HPCM_Base")).eval()


@pytest.fixture(scope="module")
def base_256(base):
    with torch.no_grad():
        return base(image_tensor(golden()["image_256x256"]))


# the golden cases: (fixture arch, preset, height, width); benchmarks/equivalence.py prints their diffs
GOLDEN_CASES = (("base", "HPCM_Base", 256, 256), ("base", "HPCM_Base", 256, 512), ("large", "HPCM_Large", 256, 256))


def golden_diffs(out, arch: str, h: int, w: int) -> dict[str, float]:
    """Max |ours - official| of x_hat, y and z likelihoods of image 0 of ``out``."""
    g = golden()
    diffs = {}
    for name, ours in (("x_hat", out["x_hat"]), ("lik_y", out["likelihoods"]["y"]), ("lik_z", out["likelihoods"]["z"])):
        ref = torch.from_numpy(g[f"{arch}_{h}x{w}_{name}"])
        if ours[0].shape != ref.shape:
            raise ValueError(f"{arch}_{h}x{w}_{name}: shape {tuple(ours[0].shape)} != golden {tuple(ref.shape)}")
        diffs[name] = float((ours[0] - ref).abs().max())
    return diffs


def compare(out, arch: str, h: int, w: int) -> dict[str, float]:
    diffs = golden_diffs(out, arch, h, w)
    assert all(d < TOL for d in diffs.values()), diffs
    return diffs


def test_fixture_is_nontrivial():
    """The golden outputs exercise rounding, many scales and the likelihood floor region."""
    g = golden()
    lik = torch.from_numpy(g["base_256x256_lik_y"])
    assert float(lik.std()) > 0.01 and float((lik < 0.01).float().mean()) > 0.05
    x_hat = torch.from_numpy(g["base_256x256_x_hat"])
    assert float(x_hat.std()) > 0.05
    assert str(g["commit"]) == "c271cfe2412071e7cacf4186825f1bbff4434664"


def test_base_256x256_equals_official(base_256):
    compare(base_256, "base", 256, 256)


def test_base_256x512_equals_official(base):
    with torch.no_grad():
        out = base(image_tensor(golden()["image_256x512"]))
    compare(out, "base", 256, 512)


def test_large_256x256_equals_official():
    large = init_like_golden(build_model("HPCM_Large")).eval()
    with torch.no_grad():
        out = large(image_tensor(golden()["image_256x256"]))
    compare(out, "large", 256, 256)


def test_base_bitstream_equals_official_and_decodes(base, base_256):
    """Same CDF tables, same symbol order, same rANS coder: the official bytes, decoded exactly."""
    g = golden()
    base.update()
    enc = base.compress(image_tensor(g["image_256x256"]))
    assert enc["strings"][1][0] == g["base_256x256_z_string"].tobytes()
    assert enc["strings"][0][0] == g["base_256x256_y_string"].tobytes()
    dec = base.decompress(enc["strings"], enc["shape"])
    assert torch.equal(dec["x_hat"], base_256["x_hat"].clamp(0, 1))
