"""hpcm.analysis.complexity and benchmarks/complexity.py: the MAC counter against closed-form
counts, and the script on HPCM_Tiny."""

from __future__ import annotations

from torch import nn

from hpcm.models import build_model
from tests.paths import REPO, load_script

complexity = load_script(REPO / "benchmarks" / "complexity.py")


def conv_macs(conv: nn.Conv2d | nn.ConvTranspose2d, x_shape, y_shape) -> int:
    """Closed form: one MAC per kernel tap and input channel of the group, per output element
    (a transposed conv: per input element and output channel of the group)."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    if isinstance(conv, nn.ConvTranspose2d):
        return x_shape[1] * x_shape[2] * x_shape[3] * (conv.out_channels // conv.groups) * k
    return y_shape[1] * y_shape[2] * y_shape[3] * (conv.in_channels // conv.groups) * k


class _Strided(nn.Module):
    def __init__(self):
        super().__init__()
        self.g_a = nn.Conv2d(3, 8, kernel_size=5, stride=2, padding=2)  # named like a part

    def forward(self, x):
        return self.g_a(x)


def test_counter_equals_the_closed_form_of_one_conv():
    model = _Strided()
    macs = complexity.count_macs(model, 32, 48)
    # 8 output channels x 16 x 24 positions x 3 input channels x 25 taps
    assert (
        macs["total"]
        == 8 * 16 * 24 * 3 * 25
        == conv_macs(model.g_a, (1, 3, 32, 48), (1, 8, 16, 24))
    )
    assert macs["g_a"] == macs["total"] and macs["context"] == 0


def test_tiny_analysis_transform_equals_the_sum_of_its_convs():
    """g_a of HPCM_Tiny holds only convolutions: the counter's part equals the closed form summed by
    hooks."""
    model = build_model("HPCM_Tiny").eval()
    closed = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: closed.append(conv_macs(m, i[0].shape, o.shape)))
        for m in model.g_a.modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
    ]
    macs = complexity.count_macs(model, 64, 64)
    for hook in hooks:
        hook.remove()
    assert len(closed) > 3
    assert macs["g_a"] == sum(closed)
    assert (
        macs["encoder"] == macs["total"] - macs["g_s"]
        and macs["decoder"] == macs["total"] - macs["g_a"] - macs["h_a"]
    )
    assert macs["context"] > 0


def test_script_prints_every_part_for_tiny(capsys):
    assert complexity.main(["--presets", "HPCM_Tiny", "--detail"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("HPCM_Tiny"))
    encoder, decoder, total = (float(v) for v in line.split()[2:5])
    assert 0 < decoder < total and 0 < encoder < total
    assert "918.57" not in line  # the official figure is HPCM-Base's only
    assert "issue #12" in out
