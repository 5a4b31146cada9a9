"""benchmarks/gpu_check.py on CPU (--quick): the JSON the lead reads after a GPU run, the
exactness sections' verdicts, and the wrapping (a failing section, a spent budget, a missing
official copy are reported and the rest still runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SECTIONS = ["environment", "cross_device", "sync_free", "train_fp32", "train_bf16", "train_compile",
            "official", "coding"]


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out-dir", str(tmp_path),
                             *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600, check=False)
    path = tmp_path / "gpu_check.json"
    assert path.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads(path.read_text())


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_check(tmp_path_factory.mktemp("quick"))


def test_quick_run_writes_every_section_in_order(quick):
    result, doc = quick
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert doc["format"] == "hpcm-gpu-check/1"
    assert list(doc["sections"]) == SECTIONS
    assert doc["failed"] == []
    status = {name: sec["status"] for name, sec in doc["sections"].items()}
    assert status == {"environment": "ok", "cross_device": "ok", "sync_free": "ok", "train_fp32": "ok",
                      "train_bf16": "skipped", "train_compile": "skipped", "official": "skipped", "coding": "ok"}
    for name, sec in doc["sections"].items():
        assert sec["seconds"] >= 0
        if sec["status"] == "skipped":
            assert sec["reason"], name  # every skip says why
    env = doc["sections"]["environment"]["results"]
    assert env["torch"] and env["device"] == "cpu" and env["model"] == "HPCM_Tiny"
    assert "sections failed: none" in result.stdout


def test_cross_device_degenerates_to_cpu_and_is_bit_exact(quick):
    result, doc = quick
    cross = doc["sections"]["cross_device"]["results"]
    assert cross["degenerate_cpu_to_cpu"] is True and cross["encoder"] == "cpu"
    assert cross["bit_exact"] is True and cross["max_abs_diff"] == 0.0
    assert cross["strings_equal_cpu_encoded"] is True
    assert cross["same_device_decode_equals_forward_8bit"] is True
    assert cross["bytes"] > 0
    assert "CPU -> CPU" in result.stdout


def test_sync_free_path_equals_the_host_path(quick):
    _, doc = quick
    sync = doc["sections"]["sync_free"]["results"]
    assert sync["steps"] == 20 and sync["all_equal"] is True
    assert set(sync["optimizers"]) == {"cautious_adam", "balanced next_batch", "balanced same_batch", "hier measured"}
    for name, r in sync["optimizers"].items():
        assert r["max_abs_diff_params"] == 0.0 and r["max_abs_diff_task_weights"] == 0.0, name
        assert r["skipped_steps"] == 0, name


def test_training_rows_and_coding_times(quick):
    result, doc = quick
    rows = doc["sections"]["train_fp32"]["results"]["rows"]
    assert [r["optimizer"] for r in rows] == ["adam", "balanced next_batch", "balanced same_batch", "hier measured"]
    for r in rows:
        assert r["batch_size"] == 2 and r["dtype"] == "fp32" and r["compile"] is False
        assert r["ms_median"] > 0 and r["ms_iqr"] >= 0 and len(r["repeats_ms"]) == 3
        assert r["peak_mib"] is None  # CUDA only
    coding = doc["sections"]["coding"]["results"]
    assert coding["ours"]["compress_ms"]["median"] > 0 and coding["ours"]["decompress_ms"]["median"] > 0
    assert "x adam" in result.stdout  # the summary table


def test_a_failing_section_is_reported_and_the_rest_still_runs(tmp_path):
    result, doc = run_check(tmp_path, "--sections", "environment", "cross_device", "train_fp32",
                            "--image", str(tmp_path / "missing.png"))
    assert result.returncode == 1
    assert doc["failed"] == ["cross_device"]
    assert "missing.png" in doc["sections"]["cross_device"]["error"]
    assert doc["sections"]["train_fp32"]["status"] == "ok"
    assert "FAILED" in result.stdout


def test_spent_budget_and_missing_official_copy_are_reported_skips(tmp_path):
    result, doc = run_check(tmp_path, "--budget-s", "0", "--sections", "environment", "sync_free")
    assert result.returncode == 0
    assert doc["sections"]["environment"]["status"] == "ok"
    assert doc["sections"]["sync_free"] == {"status": "skipped", "reason": "budget", "seconds": 0.0}
    result, doc = run_check(tmp_path, "--sections", "official", "--model", "HPCM_Base", "--patch-size", "256",
                            "--batch-sizes", "1", "--official", str(tmp_path / "no-copy"))
    assert result.returncode == 0
    reason = doc["sections"]["official"]["reason"]
    assert "official model did not load" in reason and "no-copy" in reason
