"""The speed options of docs/speed.md (run keys ``memory_format`` and ``threads``): a run with them
matches the default path within a measured tolerance, is deterministic and resumes bit for bit.

The default path itself (contiguous, torch's threads) is the reference that the golden and
official-equivalence tests (tests/models/test_equivalence.py) and /work/bitref check unchanged.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from hpcm.config import run_config
from hpcm.train import loop as train
from tests.train.test_loop import final_state
from tests.train.tiny import cli_args, sigterm_at_step

# phase1 with the official second forward: every part of the step (both task losses, the FAMO
# weights, Cautious Adam) sees the layout's rounding.
SETTINGS = {
    "steps": 4,
    "checkpoint_every": 1,
    "batch_size": 2,
    "variant": "phase1",
    "update_mode": "same_batch",
}
FAST = {"memory_format": "channels_last", "threads": 1}

# channels_last vs contiguous after 6 steps of this phase1 run (batch 4, 64 px, lr 1e-4), measured
# on the 2-core AVX2 machine: metrics.csv loss / bpp / mse within 2.1e-7 relative per step (0 at
# steps 1, 3, 4), weights within 9.2e-5 absolute (Adam turns tiny gradient differences into up
# to a step of lr = 1e-4 on near-zero gradients), FAMO logits equal to 4 digits. The tolerances
# are about 10x those spreads.
LOSS_RTOL = 2e-6
WEIGHT_ATOL = 1e-3


def _metrics(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_fast_options_match_the_default_within_the_measured_tolerance(tmp_path):
    default, fast = tmp_path / "default", tmp_path / "fast"
    settings = {**SETTINGS, "steps": 6, "batch_size": 4, "checkpoint_every": 6}
    assert train.main(cli_args(default, **settings)) == train.EXIT_OK
    assert train.main(cli_args(fast, **settings, **FAST)) == train.EXIT_OK
    rows_a, rows_b = _metrics(default), _metrics(fast)
    steps = [str(s) for s in range(1, 7)]
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == steps
    for a, b in zip(rows_a, rows_b):
        for column in ("loss", "bpp", "mse", "y_bpp", "z_bpp"):
            expected = pytest.approx(float(a[column]), rel=LOSS_RTOL)
            assert float(b[column]) == expected, (a["step"], column)
    state_a, state_b = final_state(default), final_state(fast)
    assert state_b["config"]["memory_format"] == "channels_last"
    worst = max(
        float((state_a["model"][k].float() - state_b["model"][k].float()).abs().max())
        for k in state_a["model"]
        if state_a["model"][k].numel()
    )
    assert worst <= WEIGHT_ATOL, worst
    logits_a, logits_b = (s["optimizer"]["balancing"]["w"] for s in (state_a, state_b))
    assert torch.allclose(logits_a, logits_b, atol=1e-3)


def test_fast_options_are_not_a_no_op():
    """The option reaches the model: weights and batches in channels_last, threads set."""
    cfg = run_config.resolve(
        {
            "model": "HPCM_Tiny",
            "steps": 1,
            "patch_size": 64,
            "num_workers": 0,
            "device": "cpu",
            "wandb_mode": "disabled",
            **FAST,
        }
    )
    run = train.Run(cfg, Path("/nonexistent-speed-options"))
    run.open_data()
    torch.set_num_threads(2)
    run.build(None)
    assert torch.get_num_threads() == 1
    assert run.channels_last
    assert run.model.g_a.branch[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not run.model.g_a.branch[0].weight.is_contiguous()
    default = run_config.resolve({"model": "HPCM_Tiny", "steps": 1, "device": "cpu"})
    assert default.memory_format == "auto" and default.threads is None


def test_a_run_with_the_fast_options_is_deterministic_and_resumes_bit_for_bit(tmp_path):
    full, parted = tmp_path / "full", tmp_path / "parted"
    assert train.main(cli_args(full, **SETTINGS, **FAST)) == train.EXIT_OK
    with sigterm_at_step(2):
        assert train.main(cli_args(parted, **SETTINGS, **FAST)) == train.EXIT_INTERRUPTED
    assert final_state(parted)["step"] == 2
    assert train.main(cli_args(parted, **SETTINGS, **FAST)) == train.EXIT_OK
    a, b = final_state(full), final_state(parted)
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"weights differ after resume: {key}"
    assert torch.equal(a["optimizer"]["balancing"]["w"], b["optimizer"]["balancing"]["w"])
    assert [r["loss"] for r in _metrics(full)] == [r["loss"] for r in _metrics(parted)]


def test_changing_the_memory_format_on_resume_is_refused():
    saved = run_config.resolve({"steps": 4, "memory_format": "channels_last"}).as_dict()
    current = run_config.resolve({"steps": 4})
    assert "memory_format" in run_config.resume_mismatch(saved, current)
    older = {k: v for k, v in current.as_dict().items() if k not in ("memory_format", "threads")}
    assert run_config.resume_mismatch(older, current) is None  # a checkpoint older than the keys


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("memory_format", "nhwc", "must be one of"),
        ("threads", 0, "must be > 0"),
        ("threads", "two", "integer"),
    ],
)
def test_bad_values_name_the_key(key, value, words):
    with pytest.raises(run_config.ConfigError, match=f"'{key}'.*{words}"):
        run_config.resolve({"steps": 1, key: value})
