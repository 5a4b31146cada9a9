"""The shipped warm starts (pretrained/): hashes match, they load into HPCM_Tiny, and they
reproduce the validation loss recorded at export (CPU, the samples' val split)."""

from __future__ import annotations

import pytest

from hpcm import models
from hpcm.train import warm_starts
from tests.paths import REPO

PRETRAINED = REPO / "pretrained"
# The recorded loss was measured on one CPU; other kernels (ATEN_CPU_CAPABILITY=avx2 / default)
# could change the float sums: measured spread 0 (avx2 and default, this machine); tolerance 1e-4.
REL_TOL = 1e-4


def test_every_listed_file_exists_and_the_sums_file_agrees():
    manifest = warm_starts.read_manifest(PRETRAINED)
    listed = {e["file"]: e["sha256"] for e in manifest["warm_starts"]}
    sums = dict(
        reversed(line.split("  "))
        for line in (PRETRAINED / warm_starts.SUMS).read_text().splitlines()
    )
    assert sums == listed
    assert sum((PRETRAINED / f).stat().st_size for f in listed) <= 15 * 2**20


@pytest.mark.parametrize(
    "entry", warm_starts.read_manifest(PRETRAINED)["warm_starts"], ids=lambda e: e["file"]
)
def test_warm_start_loads_and_reproduces_the_recorded_validation_loss(entry):
    warm_starts.verify(PRETRAINED, check_loss=False)  # every hash matches (raises otherwise)
    model = models.load_checkpoint(PRETRAINED / entry["file"], name=entry["model"])
    metrics = warm_starts.validation_metrics(model, "samples", entry["lmbda"])
    assert metrics["val_loss"] == pytest.approx(entry["val_loss"], rel=REL_TOL)
    assert metrics["val_psnr"] == pytest.approx(entry["val_psnr"], rel=REL_TOL)
    # and the fp16 rounding moved the loss of the fp32 training run by well under 1 %
    assert entry["val_loss"] == pytest.approx(entry["train_val_loss_fp32"], rel=1e-2)


def test_a_changed_file_is_named(tmp_path):
    import shutil

    for name in (warm_starts.MANIFEST, warm_starts.SUMS):
        shutil.copy(PRETRAINED / name, tmp_path / name)
    entry = warm_starts.read_manifest(PRETRAINED)["warm_starts"][0]
    (tmp_path / entry["file"]).write_bytes((PRETRAINED / entry["file"]).read_bytes()[:-1] + b"x")
    with pytest.raises(warm_starts.WarmStartError, match=entry["file"]):
        warm_starts.verify(tmp_path, check_loss=False)


def test_export_refuses_several_seeds_of_one_lambda(tmp_path):
    """A warm start is one model per lambda: two seeds of one lambda must not silently pick one."""
    for seed in (0, 1):
        run_dir = tmp_path / "lmbda0.0932" / f"seed{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "final.pth.tar").write_bytes(b"")
    with pytest.raises(warm_starts.WarmStartError, match="several seeds for lmbda0.0932"):
        warm_starts.export(tmp_path, tmp_path / "out")
