"""benchmarks/model_speed.py: the train-step FLOP count against a closed form, and the script's
arithmetic lines on HPCM_Tiny (the official comparison needs a local lyq133/LIC-HPCM copy)."""

from __future__ import annotations

import json
import re

import torch
from torch import nn

from tests.paths import REPO, load_script

model_speed = load_script(REPO / "benchmarks" / "model_speed.py")


class _OneConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, kernel_size=1)

    def forward(self, x):
        return {"x_hat": self.conv(x)[:, :3], "likelihoods": {}}


def test_train_step_flops_are_the_forward_and_weight_gradient_products():
    """x needs no gradient, so the backward is the weight gradient alone: 2 x (2 * C_out * C_in * H
    * W)."""
    model, x = _OneConv(), torch.rand(2, 3, 4, 6)
    forward = 2 * 5 * 3 * (2 * 4 * 6)
    assert model_speed.train_step_flops(model, x) == 2 * forward
    assert all(p.grad is None for p in model.parameters())  # it leaves no gradients behind


class _ConvStack(nn.Module):
    """Almost all arithmetic in one 128 -> 128 1x1 convolution over 128x128 positions."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 128, 3, padding=1), nn.Conv2d(128, 128, 1), nn.Conv2d(128, 3, 1)
        )

    def forward(self, x):
        return {"x_hat": self.convs(x), "likelihoods": {}}


def test_compute_share_sees_the_convolution_kernels():
    """If torch renamed the kernels COMPUTE_OPS lists, the share (and the ceiling) would collapse
    towards 0: a step made of convolutions must show most of its time in them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        share = model_speed.compute_share(_ConvStack(), torch.rand(1, 3, 128, 128))
    finally:
        torch.set_num_threads(threads)
    assert 0.5 < share < 1


def test_script_prints_the_train_steps_arithmetic(capsys, tmp_path):
    threads = torch.get_num_threads()
    try:
        model_speed.main(
            [
                "--presets",
                "HPCM_Tiny",
                "--size",
                "64",
                "64",
                "--batch",
                "1",
                "--repeats",
                "1",
                "--threads",
                "1",
                "--skip-coding",
                "--device",
                "cpu",
                "--json",
                str(tmp_path / "speed.json"),
            ]
        )
    finally:
        torch.set_num_threads(threads)  # main() sets it for the whole process
    out = capsys.readouterr().out
    gflop, rate, share = (
        float(v)
        for v in re.search(
            r"train step ours: ([0-9.]+) GFLOP at ([0-9.]+) GFLOP/s, ([0-9.]+)% of profiled steps "
            r"in convolution",
            out,
        ).groups()
    )
    assert gflop > 0 and rate > 0 and 0 < share < 100
    assert "ceiling" not in out  # only with --official
    record = json.loads((tmp_path / "speed.json").read_text())["presets"]["HPCM_Tiny"]
    assert set(record["times_ms"]["ours"]) == {"forward", "train step"}
    assert all(len(v) == 1 and v[0] > 0 for v in record["times_ms"]["ours"].values())
    assert abs(record["arithmetic"]["flops"]["ours"] / 1e9 - gflop) < 0.05
    assert abs(record["arithmetic"]["compute_share"]["ours"] * 100 - share) < 0.05
