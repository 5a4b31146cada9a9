"""HPCM model family: presets, shapes, parameter counts, state-dict layout, scale partition,
errors."""

from __future__ import annotations

import pytest
import torch

from hpcm.models import MODEL_NAMES, build_model, crop_image, pad_image
from hpcm.models.hpcm import _Quantizer
from tests.fixtures.hpcm_support import golden, init_like_golden, single_thread

# hpcm.md section 1.4, written out independently of the implementation: per channel group of M/8,
# the s1 point and the three s2-only points as (row mod 4, col mod 4).
S1_POINT = [(0, 0), (1, 1), (0, 3), (1, 2), (2, 0), (3, 1), (2, 3), (3, 2)]
S2_ONLY = [
    {(0, 2), (2, 0), (2, 2)},
    {(1, 3), (3, 1), (3, 3)},
    {(0, 1), (2, 1), (2, 3)},
    {(1, 0), (3, 0), (3, 2)},
    {(0, 0), (0, 2), (2, 2)},
    {(1, 1), (1, 3), (3, 3)},
    {(0, 1), (0, 3), (2, 1)},
    {(1, 0), (1, 2), (3, 0)},
]


def closed_form_scale_map(M: int, H: int, W: int) -> torch.Tensor:
    out = torch.full((M, H, W), 3, dtype=torch.long)
    for c in range(M):
        g = c // (M // 8)
        for r in range(H):
            for col in range(W):
                phase = (r % 4, col % 4)
                if phase == S1_POINT[g]:
                    out[c, r, col] = 1
                elif phase in S2_ONLY[g]:
                    out[c, r, col] = 2
    return out


one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return init_like_golden(build_model("HPCM_Tiny")).eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_official_parameter_counts():
    # built on the meta device: no memory, exact counts
    with torch.device("meta"):
        base, large = build_model("HPCM_Base"), build_model("HPCM_Large")
    assert round(n_params(base) / 1e6, 3) == 68.505
    assert round(n_params(large) / 1e6, 3) == 89.719


@pytest.mark.parametrize("arch,name", [("base", "HPCM_Base"), ("large", "HPCM_Large")])
def test_state_dict_layout_equals_official(arch, name):
    """Keys, order and shapes equal the official model at the pinned commit (stored in the
    fixture)."""
    g = golden()
    with torch.device("meta"):
        state = build_model(name).state_dict()
    assert list(state) == list(g[f"{arch}_keys"])
    shapes = [",".join(map(str, v.shape)) for v in state.values()]
    assert shapes == list(g[f"{arch}_shapes"])
    assert isinstance(build_model("HPCM_Tiny").adaptive_params_list, torch.nn.ParameterList)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_presets_share_structure(name):
    with torch.device("meta"):
        model = build_model(name)
    assert len(model.y_spatial_prior_adaptor_list_s1) == 1
    assert len(model.y_spatial_prior_adaptor_list_s2) == 3
    assert len(model.y_spatial_prior_adaptor_list_s3) == 6
    assert len(model.adaptive_params_list) == 10
    assert len(model.context_net) == 2
    assert model.M % 8 == 0
    assert model.pad_multiple in (64, 128, 256)


def test_forward_shapes_small_presets():
    for name, size in (("HPCM_Tiny", (64, 128)), ("HPCM_Small", (128, 128))):
        model = build_model(name).eval()
        with torch.no_grad():
            out = model(torch.rand(2, 3, *size))
        h, w = size
        assert out["x_hat"].shape == (2, 3, h, w)
        assert out["likelihoods"]["y"].shape == (2, model.M, h // 16, w // 16)
        assert out["likelihoods"]["z"].shape == (2, model.N, h // 64, w // 64)
        lik = out["likelihoods"]["y"]
        assert float(lik.min()) >= 1e-9 and float(lik.max()) <= 1.0


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="HPCM_Base.*HPCM_Large|HPCM_Large.*HPCM_Base") as err:
        build_model("HPCM_Huge")
    assert "HPCM_Tiny" in str(err.value) and "HPCM_Huge" in str(err.value)
    with pytest.raises(ValueError, match="bogus"):
        build_model("HPCM_Tiny", bogus=1)


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.rand(3, 64, 64), "4-D"),
        (torch.rand(1, 1, 64, 64), "3 channels"),
        (torch.rand(1, 4, 64, 64), "3 channels"),
        (torch.rand(0, 3, 64, 64), "empty"),
        (torch.rand(1, 3, 0, 64), "empty"),
        (torch.rand(1, 3, 64, 96), "multiples of 64"),
    ],
)
def test_bad_input_errors(tiny, x, match):
    with pytest.raises(ValueError, match=match):
        tiny(x)
    with pytest.raises(ValueError, match=match):
        tiny.compress(x)


@pytest.mark.parametrize("M,H,W", [(320, 8, 12), (64, 4, 8), (160, 12, 4)])
def test_scale_map_matches_closed_form(M, H, W):
    model_M = {320: "HPCM_Base", 160: "HPCM_Small", 64: "HPCM_Tiny"}[M]
    with torch.device("meta"):
        model = build_model(model_M)
    scale = model.scale_map(H, W)
    assert scale.dtype == torch.long and scale.shape == (M, H, W)
    assert torch.equal(scale, closed_form_scale_map(M, H, W))
    # 1 : 3 : 12 in every channel
    counts = torch.stack([(scale == s).sum((1, 2)) for s in (1, 2, 3)], 1)
    assert torch.equal(counts, torch.tensor([1, 3, 12]).expand(M, 3) * (H * W // 16))


def test_step_map_matches_official():
    with torch.device("meta"):
        model = build_model("HPCM_Base")
    official = torch.from_numpy(golden()["base_step_map_16x16"]).long()
    step = model.step_map(16, 16)
    assert torch.equal(step, official)
    scale = model.scale_map(16, 16)
    assert torch.equal(
        scale, torch.bucketize(step, torch.tensor([2, 5])) + 1
    )  # steps 1-2, 3-5, 6-11


def test_step_map_shares_any_size():
    """Per channel: steps 1-2 code 1/32 of y each, 3-5 1/16, 6-11 1/8 (hpcm.md table)."""
    with torch.device("meta"):
        model = build_model("HPCM_Tiny")
    step = model.step_map(8, 12)
    for s in range(1, 12):
        share = float((step == s).sum((1, 2)).float().mean()) / (8 * 12)
        expected = 1 / 32 if s <= 2 else (1 / 16 if s <= 5 else 1 / 8)
        assert share == pytest.approx(expected)
        assert bool(((step == s).sum((1, 2)) == (step == s).sum((1, 2))[0]).all())


def test_step_map_is_the_coding_order(tiny):
    """Changing the latents coded at step k must not change the entropy parameters of steps <= k."""
    torch.manual_seed(1)
    H, W = 8, 8
    params = tiny.h_s(torch.round(torch.randn(1, tiny.N, H // 4, W // 4) * 3))
    y = torch.randn(1, tiny.M, H, W) * 4
    step = tiny.step_map(H, W).unsqueeze(0)
    for k in (2, 5, 8):
        y2 = torch.where(step == k, y + 7.0, y)
        scales = []
        for latent in (y, y2):
            part = tiny._partitions.get(H, W, params.device, params.dtype)
            q = _Quantizer(part, latent, training=False)
            with torch.no_grad():
                tiny._progressive(params, q)
            scales.append(q.full(q.scales))
        same = (scales[0] == scales[1])[0]
        assert bool(same[step[0] <= k].all()), f"step {k} leaks into earlier or equal steps"
        assert not bool(same[step[0] > k].all()), f"step {k} does not feed later steps"


class _KeepSteps(_Quantizer):
    """Also keeps every step's residual and masked scales, for a sum computed another way."""

    def __init__(self, *args):
        super().__init__(*args)
        self.steps: tuple[list, list, list] = ([], [], [])

    def __call__(self, scale, scales, means, mask):
        self.steps[scale].append((self.residual(scale, means, mask)[0], scales * mask))
        return super().__call__(scale, scales, means, mask)


def test_quantizer_sums_equal_stacked_sums_bit_for_bit(tiny):
    """The per-grid running sums equal torch.stack(steps).sum(0), signed zeros included (negative
    y makes -0 terms; s1 positions of the s2 grid are covered by no s2 step), and so does full()."""
    torch.manual_seed(3)
    H, W = 8, 12
    params = tiny.h_s(torch.round(torch.randn(1, tiny.N, H // 4, W // 4) * 3))
    y = torch.randn(1, tiny.M, H, W) * 4
    part = tiny._partitions.get(H, W, params.device, params.dtype)
    q = _KeepSteps(part, y, False)
    with torch.no_grad():
        tiny._progressive(params, q)
    for k, sums in enumerate((q.res, q.scales)):
        stacked = [torch.stack([step[k] for step in steps]).sum(0) for steps in q.steps]
        for ours, theirs in zip(sums, stacked):
            assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
        expected = part.s1_to_y(stacked[0]) + part.s2_to_y(stacked[1]) + stacked[2]
        assert torch.equal(q.full(sums).view(torch.int32), expected.view(torch.int32))
    assert bool(
        (torch.stack([s[0] for s in q.steps[1]]).view(torch.int32) == -(2**31)).any()
    )  # -0 terms


def test_scale_bits_partition_exact(tiny):
    torch.manual_seed(2)
    with torch.no_grad():
        lik = tiny(torch.rand(2, 3, 128, 128))["likelihoods"]["y"].double()
    bits = tiny.scale_bits(lik)
    assert bits.shape == (2, 3)
    total = (-torch.log2(lik)).sum((1, 2, 3))
    torch.testing.assert_close(bits.sum(1), total, rtol=1e-13, atol=0)
    # each scale equals an independent masked sum with the closed-form map
    ref = closed_form_scale_map(tiny.M, 8, 8)
    for s in (1, 2, 3):
        expected = (-torch.log2(lik) * (ref == s)).sum((1, 2, 3))
        torch.testing.assert_close(bits[:, s - 1], expected, rtol=1e-13, atol=0)
    # differentiable
    lik_req = lik.clone().requires_grad_(True)
    tiny.scale_bits(lik_req)[:, 0].sum().backward()
    assert lik_req.grad is not None and float(lik_req.grad.abs().sum()) > 0
    # the cached one-hot is keyed by dtype and size: float32 and another grid get their own
    bits32 = tiny.scale_bits(lik.float())
    assert bits32.dtype == torch.float32
    torch.testing.assert_close(bits32, bits.float(), rtol=1e-5, atol=0)
    lik_small = lik[..., :4, :4]
    ref_small = closed_form_scale_map(tiny.M, 4, 4)
    for s in (1, 2, 3):
        expected = (-torch.log2(lik_small) * (ref_small == s)).sum((1, 2, 3))
        torch.testing.assert_close(
            tiny.scale_bits(lik_small)[:, s - 1], expected, rtol=1e-13, atol=0
        )


def test_train_mode_quantisation(tiny):
    """STE for reconstruction and context (no noise in x_hat), uniform noise for the rate."""
    x = torch.rand(1, 3, 64, 64)
    tiny.train()
    try:
        torch.manual_seed(3)
        a = tiny(x)
        torch.manual_seed(4)
        b = tiny(x)
        assert torch.equal(a["x_hat"], b["x_hat"])  # rounding is deterministic
        assert not torch.equal(a["likelihoods"]["y"], b["likelihoods"]["y"])  # noise differs
        assert not torch.equal(a["likelihoods"]["z"], b["likelihoods"]["z"])
        # distortion: the STE makes y_hat = y + constant, so only g_a / g_s receive its gradient
        tiny.zero_grad(set_to_none=False)
        a["x_hat"].square().mean().backward()
        assert float(tiny.g_a.branch[0].weight.grad.abs().sum()) > 0
        assert float(tiny.h_a.branch[1].weight.grad.abs().sum()) == 0
        assert float(tiny.y_spatial_prior_s3.branch_2[-1].weight.grad.abs().sum()) == 0
        # rate: reaches the hyperprior and the context model
        tiny.zero_grad(set_to_none=False)
        rate = -torch.log2(b["likelihoods"]["y"]).sum() - torch.log2(b["likelihoods"]["z"]).sum()
        rate.backward()
        for p in (
            tiny.means_hyper,
            tiny.h_a.branch[1].weight,
            tiny.y_spatial_prior_s3.branch_2[-1].weight,
            tiny.attn_s3.conv_q.weight,
            tiny.adaptive_params_list[9],
        ):
            assert float(p.grad.abs().sum()) > 0
    finally:
        tiny.eval()
        tiny.zero_grad()
    with torch.no_grad():
        c, d = tiny(x), tiny(x)
    assert torch.equal(c["likelihoods"]["y"], d["likelihoods"]["y"])
    assert torch.equal(c["x_hat"], a["x_hat"])  # same hard rounding in eval mode


def test_masks_are_cached(tiny):
    part = tiny._partitions.get(4, 8, torch.device("cpu"), torch.float32)
    assert tiny._partitions.get(4, 8, torch.device("cpu"), torch.float32) is part


def test_per_size_caches_are_bounded():
    """Evaluation meets a new image size per image: masks and label maps must not pile up."""
    model = build_model("HPCM_Tiny")
    bound = model._partitions.max_entries
    sizes = [(4, 4 + 4 * i) for i in range(bound + 5)]
    first = model.scale_map(*sizes[0])
    for h, w in sizes:
        assert model.scale_map(h, w).shape == (model.M, h, w)
        model._partitions.get(h, w, torch.device("cpu"), torch.float32)
    assert len(model._label_cache) == bound and len(model._partitions) == bound
    last = sizes[-1]
    assert model.step_map(*last).data_ptr() == model.step_map(*last).data_ptr()  # still cached
    again = model.scale_map(*sizes[0])  # evicted, rebuilt identically
    assert again is not first and torch.equal(again, first)
    assert len(model._label_cache) == bound


@pytest.mark.parametrize("size", [(200, 300), (64, 64), (65, 1), (512, 768)])
def test_pad_and_crop(size):
    x = torch.rand(1, 3, *size)
    padded, pad = pad_image(x, 64)
    assert padded.shape[-2] % 64 == 0 and padded.shape[-1] % 64 == 0
    assert padded.shape[-2] - size[0] < 64 and padded.shape[-1] - size[1] < 64
    assert torch.equal(crop_image(padded, pad), x)
    left, right, top, bottom = pad
    assert abs(left - right) <= 1 and abs(top - bottom) <= 1  # centred as the official test.py
    with pytest.raises(ValueError, match="4-D"):
        pad_image(torch.rand(3, 8, 8), 64)
