"""benchmarks/train_throughput.py: it times the trainer's own step, and its arithmetic (paired
ratios, GFLOP/s, share of the GEMM limit) against hand-computed values."""

from __future__ import annotations

import json

import pytest
import torch

from hpcm.train import loop as train
from tests.paths import REPO, load_script

throughput = load_script(REPO / "benchmarks" / "train_throughput.py")


def test_summary_is_the_median_of_paired_ratios_and_the_share_of_the_gemm_rate():
    result = {
        "seconds": {"default": [1.0, 2.0, 4.0], "fast": [0.5, 1.0, 1.0]},
        "pixels": {"default": 100, "fast": 200},
        "flops": {"default": 10e9, "fast": 20e9},
        "gemm_flop_s": [40e9, 50e9, 60e9],
    }
    rows = {row["setting"]: row for row in throughput.summarise(result)}
    # pixels/s ratios per repeat: 200/0.5 / (100/1) = 4, 200/1 / (100/2) = 4, 200/1 / (100/4) = 8
    assert rows["fast"]["speedup"] == 4.0 and rows["default"]["speedup"] == 1.0
    assert rows["fast"]["ms_per_step"] == 1000.0 and rows["fast"]["pixels_per_s"] == 200.0
    assert rows["fast"]["gflop_s"] == pytest.approx(20.0)  # 20 GFLOP in the median 1 s
    assert rows["fast"]["of_limit"] == pytest.approx(20 / 50)  # over the median GEMM rate
    assert rows["fast"]["limit_ms"] == pytest.approx(400.0)


def test_small_presets_get_their_smallest_crop(capsys):
    fitted = throughput.for_model("HPCM_Small", {"default": {"batch_size": 8, "patch_size": 64}})
    assert fitted["default"]["patch_size"] == 128 and "128 px crops" in capsys.readouterr().out
    assert throughput.for_model("HPCM_Tiny", {"d": {"patch_size": 64}})["d"]["patch_size"] == 64


def test_script_times_the_trainers_own_step(tmp_path, monkeypatch, capsys):
    calls = []
    real_step = train.Run.train_step

    def counted(self, step, x):
        calls.append((self.cfg.memory_format, tuple(x.shape), x.is_contiguous()))
        return real_step(self, step, x)

    monkeypatch.setattr(train.Run, "train_step", counted)
    monkeypatch.setitem(
        throughput.SETTINGS,
        "default",
        {"batch_size": 1, "patch_size": 64, "memory_format": "contiguous"},
    )
    monkeypatch.setattr(throughput, "DEFAULT", throughput.SETTINGS["default"])
    monkeypatch.setitem(
        throughput.SETTINGS,
        "pilot",
        {"batch_size": 1, "patch_size": 64, "memory_format": "channels_last"},
    )
    threads = torch.get_num_threads()
    out = tmp_path / "t.json"
    try:
        record = throughput.main(
            [
                "--presets",
                "HPCM_Tiny",
                "--settings",
                "pilot",
                "--threads",
                "1",
                "--repeats",
                "2",
                "--json",
                str(out),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    # flop count + warm-up + 2 repeats, per setting; channels_last batches for the channels_last run
    assert sorted(calls) == sorted(
        [("contiguous", (1, 3, 64, 64), True)] * 4 + [("channels_last", (1, 3, 64, 64), False)] * 4
    )
    saved = json.loads(out.read_text())
    assert saved["format"] == throughput.JSON_FORMAT
    rows = {row["setting"]: row for row in saved["presets"]["HPCM_Tiny"]["rows"]}
    assert rows["default"]["speedup"] == 1.0 and set(rows) == {"default", "pilot"}
    assert all(row["gflop_per_step"] > 0 and 0 < row["of_limit"] < 2 for row in rows.values())
    assert record["presets"]["HPCM_Tiny"]["rows"] == saved["presets"]["HPCM_Tiny"]["rows"]
    assert "x default (IQR)" in capsys.readouterr().out
