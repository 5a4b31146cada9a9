"""python -m hpcm.models.check: fabricated state dicts of the right and wrong architecture, lambdas
stated by names and labels, MSE / MS-SSIM mix-ups, and what passes because it cannot be told."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hpcm.models import CheckpointError, build_model, with_run_metadata
from hpcm.models.check import check_checkpoint, lambdas_in_path, main
from tests.paths import REPO


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(0)
    return build_model("HPCM_Tiny").state_dict()


def save_raw(state, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state), path)
    return path


def test_a_raw_state_dict_of_the_configured_architecture_passes(tiny_state, tmp_path):
    path = save_raw(tiny_state, tmp_path / "HPCM_Tiny" / "mse" / "0.0067.pth.tar")
    report = check_checkpoint(path, "HPCM_Tiny", 0.0067, "mse")
    assert report["model"] == "HPCM_Tiny" and report["lmbda"] == 0.0067
    assert report["parameters"] == sum(p.numel() for p in build_model("HPCM_Tiny").parameters())
    assert (
        report["lambda_stated_by"] == ["file name"] and "not detectable" in report["cannot_detect"]
    )


def test_another_architecture_is_refused_naming_the_first_misfit(tmp_path):
    torch.manual_seed(0)
    path = save_raw(build_model("HPCM_Small").state_dict(), tmp_path / "w.pth.tar")
    with pytest.raises(CheckpointError, match=r"does not fit HPCM_Tiny: key '.*' has shape"):
        check_checkpoint(path, "HPCM_Tiny", 0.013)


def test_a_state_dict_with_a_foreign_key_is_refused(tiny_state, tmp_path):
    state = dict(tiny_state)
    state["context.extra.weight"] = torch.zeros(3)
    path = save_raw(state, tmp_path / "w.pth.tar")
    with pytest.raises(
        CheckpointError, match="'context.extra.weight' in the checkpoint does not exist"
    ):
        check_checkpoint(path, "HPCM_Tiny", 0.013)


@pytest.mark.parametrize(
    "relative, stated",
    [
        ("HPCM_Tiny/0.013.pth.tar", "file name states lambda 0.013"),
        ("mse_0.0035/checkpoint.pth.tar", "folder name states lambda 0.0035"),
        ("hpcm_tiny_lmbda0.0004.pt", "file name states lambda 0.0004"),
        ("run_lambda=0.02/weights.pt", "folder name states lambda 0.02"),
        ("ms_ssim/8.73.pth.tar", r"file name states lambda 8.73 \(a released MS_SSIM lambda\)"),
    ],
)
def test_a_lambda_in_the_name_that_differs_is_refused(tiny_state, tmp_path, relative, stated):
    path = save_raw(tiny_state, tmp_path / relative)
    with pytest.raises(CheckpointError, match=f"{stated}.*, but it is listed for lambda 0.0067"):
        check_checkpoint(path, "HPCM_Tiny", 0.0067)


def test_numbers_that_are_no_lambda_are_ignored():
    assert lambdas_in_path("v1.5/HPCM_Base_epoch3000_0.025.pth.tar") == [("file name", 0.025)]
    assert lambdas_in_path("checkpoints/best.pth.tar") == []


def test_labels_written_by_the_project_are_compared(tiny_state, tmp_path):
    labelled = with_run_metadata(
        tiny_state.copy(), model="HPCM_Tiny", lmbda=0.025
    )  # an OrderedDict
    path = tmp_path / "best.pth.tar"
    torch.save(labelled, path)
    with pytest.raises(CheckpointError, match="run labels states lambda 0.025"):
        check_checkpoint(path, "HPCM_Tiny", 0.013)
    assert check_checkpoint(path, "HPCM_Tiny", 0.025)["lambda_stated_by"] == ["run labels"]
    warm = tmp_path / "warm.pt"  # a shipped warm start's payload
    torch.save({"model_name": "HPCM_Tiny", "state_dict": dict(tiny_state), "lmbda": 0.0932}, warm)
    with pytest.raises(CheckpointError, match="payload 'lmbda' states lambda 0.0932"):
        check_checkpoint(warm, "HPCM_Tiny", 0.0004)


def test_a_distortion_mix_up_is_refused(tiny_state, tmp_path):
    path = save_raw(tiny_state, tmp_path / "w.pth.tar")
    with pytest.raises(
        CheckpointError,
        match="lambda 8.73 is a released MS_SSIM lambda but the study's distortion is mse",
    ):
        check_checkpoint(path, "HPCM_Tiny", 8.73, "mse")
    with pytest.raises(
        CheckpointError, match="lambda 0.013 is a released MSE lambda .* distortion is ms_ssim"
    ):
        check_checkpoint(path, "HPCM_Tiny", 0.013, "ms_ssim")
    # what it cannot tell: an unlabelled, unnamed file passes for any lambda of the right distortion
    assert check_checkpoint(path, "HPCM_Tiny", 16.64, "ms_ssim")["lambda_stated_by"][0].startswith(
        "nothing"
    )


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        check_checkpoint(bad, "HPCM_Tiny", 0.013)
    with pytest.raises(FileNotFoundError, match="download the released weights there first"):
        check_checkpoint(tmp_path / "absent.pth.tar", "HPCM_Tiny", 0.013)


def test_command_line_writes_the_report_or_exits_2(tiny_state, tmp_path, capsys):
    path = save_raw(tiny_state, tmp_path / "0.013.pth.tar")
    report = tmp_path / "checks" / "lmbda0.013.json"
    assert (
        main([str(path), "--model", "HPCM_Tiny", "--lmbda", "0.013", "--output", str(report)]) == 0
    )
    assert json.loads(report.read_text())["sha256"]
    assert main([str(path), "--model", "HPCM_Tiny", "--lmbda", "0.025"]) == 2
    assert "listed for lambda 0.025" in capsys.readouterr().err
    done = subprocess.run(
        [sys.executable, "-m", "hpcm.models.check", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "cannot detect" in done.stdout


def test_the_distortion_label_the_trainer_writes_catches_a_mix_up(tmp_path):
    """epoch_best's labels (hpcm.train.checkpoints.run_labels) carry the distortion, so a mix-up is
    caught by the label even at a lambda that is no released one (issue 26)."""
    from hpcm.config import run_config
    from hpcm.models import load_checkpoint_and_metadata
    from hpcm.train import checkpoints as checkpointing

    torch.manual_seed(0)
    model = build_model("HPCM_Tiny")
    cfg = run_config.resolve(
        {
            "model": "HPCM_Tiny",
            "variant": "baseline",
            "lmbda": 0.5,
            "seed": 0,
            "distortion": "ms_ssim",
            "steps": 1,
        }
    )
    path = checkpointing.save_best_model(model, tmp_path, checkpointing.run_labels(cfg))
    assert load_checkpoint_and_metadata(path)[1]["distortion"] == "ms_ssim"
    assert check_checkpoint(path, "HPCM_Tiny", 0.5, "ms_ssim")["lmbda"] == 0.5
    expected = r"run labels say distortion ms_ssim.*study's distortion is mse"
    with pytest.raises(CheckpointError, match=expected):
        check_checkpoint(path, "HPCM_Tiny", 0.5, "mse")
