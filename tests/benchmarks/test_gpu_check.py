"""benchmarks/gpu_check.py on CPU (--quick): the JSON the lead reads after a GPU run, the
exactness sections' verdicts, and the wrapping (a failing section, a spent budget, a missing
official copy are reported and the rest still runs).

The full --quick run is a child process, as a user runs it; the wrapping tests call its ``main``
in this process (a child would spend ~4 s importing torch each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.paths import REPO, load_script

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SECTIONS = [
    "environment",
    "cross_device",
    "sync_free",
    "train_fp32",
    "train_bf16",
    "train_compile",
    "official",
    "coding",
    "profile",
]


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--quick",
            "--out-dir",
            str(tmp_path),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    path = tmp_path / "gpu_check.json"
    assert path.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads(path.read_text())


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_check(tmp_path_factory.mktemp("quick"))


@pytest.fixture(scope="module")
def gpu_check():
    return load_script(SCRIPT, "gpu_check_module")


def run_in_process(module, tmp_path: Path, capsys, *args: str) -> tuple[int, str, dict]:
    """(exit code, stdout, JSON) of ``main`` with the --quick CPU options; the thread count it sets
    is restored."""
    threads = torch.get_num_threads()
    try:
        code = module.main(["--device", "cpu", "--quick", "--out-dir", str(tmp_path), *args])
    finally:
        torch.set_num_threads(threads)
    return code, capsys.readouterr().out, json.loads((tmp_path / "gpu_check.json").read_text())


def test_quick_run_writes_every_section_in_order(quick):
    result, doc = quick
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert doc["format"] == "hpcm-gpu-check/1"
    assert list(doc["sections"]) == SECTIONS
    assert doc["failed"] == []
    status = {name: sec["status"] for name, sec in doc["sections"].items()}
    assert status == {
        "environment": "ok",
        "cross_device": "ok",
        "sync_free": "ok",
        "train_fp32": "ok",
        "train_bf16": "skipped",
        "train_compile": "skipped",
        "official": "skipped",
        "coding": "ok",
        "profile": "ok",
    }
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
    assert sync["all_equal"] is True and sync["all_bit_equal"] is True
    assert set(sync["one_step"]) == {
        "cautious_adam",
        "balanced next_batch",
        "balanced same_batch",
        "hier measured",
    }
    for name, r in sync["one_step"].items():  # CPU: both paths compute the same floats
        assert r["bit_equal"] and r["equal_up_to_rounding"], name
        assert set(r["tensors"]) >= {"param", "grad", "exp_avg", "exp_avg_sq"}, name
        for key, t in r["tensors"].items():
            assert (
                t["elements"] > 0 and t["max_abs_diff"] == 0.0 and t["fraction_differing"] == 0.0
            ), (name, key)
    assert "task_w" in sync["one_step"]["balanced next_batch"]["tensors"]
    assert sync["steps"] == 20
    assert set(sync["optimizers"]) == {
        "cautious_adam",
        "balanced next_batch",
        "balanced same_batch",
    }
    for name, r in sync["optimizers"].items():
        assert r["max_abs_diff_params"] == 0.0 and r["max_abs_diff_task_weights"] == 0.0, name
        assert r["skipped_steps"] == 1, name  # the NaN batch


def test_compare_tensors_counts_ulps_like_numpy(gpu_check):
    """The one-step verdict's arithmetic, against numpy's nextafter (an independent ulp)."""
    module = gpu_check
    host = np.array([1.0, -3.0, 0.5, 8.0], dtype=np.float32)
    other = host.copy()
    other[1] = np.nextafter(
        np.nextafter(host[1], np.float32(0)), np.float32(0)
    )  # 2 steps towards 0
    for _ in range(3):  # 3 steps up: 3 ulp of 8 (spacing 2^-20 = eps * 8); index 1 is 4/3 ulp of 3
        other[3] = np.nextafter(other[3], np.float32(9))
    r = module._compare_tensors(
        {"a": torch.zeros(2), "b": torch.from_numpy(other)},
        {"a": torch.zeros(2), "b": torch.from_numpy(host)},
    )
    eps = np.finfo(np.float32).eps
    expect_ulp = max(
        abs(float(other[i]) - float(host[i])) / (eps * abs(float(host[i]))) for i in (1, 3)
    )
    assert r["max_ulp"] == pytest.approx(expect_ulp, rel=1e-6) and r["max_ulp"] == pytest.approx(
        3.0
    )
    assert r["max_abs_diff"] == pytest.approx(abs(float(other[3]) - float(host[3])))
    assert r["fraction_differing"] == pytest.approx(2 / 6)
    assert r["first_difference"]["tensor"] == "b" and r["first_difference"]["index"] == 1
    assert r["worst_ulp"]["index"] == 3 and r["missing"] == []
    same = module._compare_tensors({"x": torch.ones(3)}, {"x": torch.ones(3), "y": torch.ones(1)})
    assert same["max_ulp"] == 0.0 and same["first_difference"] is None and same["missing"] == ["y"]


def test_profile_section_on_cpu_reports_cpu_tables(quick):
    result, doc = quick
    prof = doc["sections"]["profile"]["results"]
    assert set(prof["runs"]) == {"adam", "balanced next_batch"}
    for name, r in prof["runs"].items():
        assert r["steps"] == doc["setup"]["profile_steps"] == 2, name
        assert r["wall_ms_per_step"] > 0 and r["cuda_kernel_ms_per_step"] is None, name
        assert "top_self_cuda" not in r and 0 < len(r["top_self_cpu"]) <= 15, name
        times = [row["self_cpu_ms_per_step"] for row in r["top_self_cpu"]]
        assert times == sorted(times, reverse=True), name
    assert prof["wall_ratio"] == pytest.approx(
        prof["runs"]["balanced next_batch"]["wall_ms_per_step"]
        / prof["runs"]["adam"]["wall_ms_per_step"]
    )
    assert "balanced - adam: wall" in result.stdout


def test_sections_take_comma_lists_and_environment_runs_first(gpu_check, tmp_path, capsys):
    code, out, doc = run_in_process(
        gpu_check,
        tmp_path,
        capsys,
        "--sections",
        "train_fp32,cross_device",
        "--batch-sizes",
        "1",
        "--repeats",
        "1",
    )
    assert code == 0, out[-3000:]
    assert list(doc["sections"]) == ["environment", "train_fp32", "cross_device"]
    assert [len(r["repeats_ms"]) for r in doc["sections"]["train_fp32"]["results"]["rows"]] == [
        1
    ] * 4
    with pytest.raises(SystemExit) as bad:
        gpu_check.parse_args(["--sections", "coding,nosuch"])
    assert bad.value.code == 2 and "unknown nosuch" in capsys.readouterr().err


def test_training_rows_and_coding_times(quick):
    result, doc = quick
    rows = doc["sections"]["train_fp32"]["results"]["rows"]
    assert [r["optimizer"] for r in rows] == [
        "adam",
        "balanced next_batch",
        "balanced same_batch",
        "hier measured",
    ]
    for r in rows:
        assert r["batch_size"] == 2 and r["dtype"] == "fp32" and r["compile"] is False
        assert r["ms_median"] > 0 and r["ms_iqr"] >= 0 and len(r["repeats_ms"]) == 3
        assert r["peak_mib"] is None  # CUDA only
    coding = doc["sections"]["coding"]["results"]
    assert (
        coding["ours"]["compress_ms"]["median"] > 0
        and coding["ours"]["decompress_ms"]["median"] > 0
    )
    assert "x adam" in result.stdout  # the summary table


def test_a_failing_section_is_reported_and_the_rest_still_runs(gpu_check, tmp_path, capsys):
    code, out, doc = run_in_process(
        gpu_check,
        tmp_path,
        capsys,
        "--sections",
        "environment",
        "cross_device",
        "train_fp32",
        "--image",
        str(tmp_path / "missing.png"),
        "--batch-sizes",
        "1",
        "--repeats",
        "1",
    )
    assert code == 1
    assert doc["failed"] == ["cross_device"]
    assert "missing.png" in doc["sections"]["cross_device"]["error"]
    assert doc["sections"]["train_fp32"]["status"] == "ok"
    assert "FAILED" in out


def test_spent_budget_and_missing_official_copy_are_reported_skips(gpu_check, tmp_path, capsys):
    code, _, doc = run_in_process(
        gpu_check, tmp_path, capsys, "--budget-s", "0", "--sections", "environment", "sync_free"
    )
    assert code == 0
    assert doc["sections"]["environment"]["status"] == "ok"
    assert doc["sections"]["sync_free"] == {"status": "skipped", "reason": "budget", "seconds": 0.0}
    code, _, doc = run_in_process(
        gpu_check,
        tmp_path,
        capsys,
        "--sections",
        "official",
        "--model",
        "HPCM_Base",
        "--patch-size",
        "256",
        "--batch-sizes",
        "1",
        "--official",
        str(tmp_path / "no-copy"),
    )
    assert code == 0
    reason = doc["sections"]["official"]["reason"]
    assert "official model did not load" in reason and "no-copy" in reason
