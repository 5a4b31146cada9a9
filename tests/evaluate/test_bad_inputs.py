"""python -m hpcm.evaluate refuses bad inputs before any image is coded (issue 26): a zero-byte
or truncated image among good ones, and a --save-reconstructions path that is a file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcm.evaluate import bitstreams


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from hpcm.models import build_model, with_run_metadata

    torch.manual_seed(0)
    model = build_model("HPCM_Tiny")
    path = tmp_path_factory.mktemp("ckpt") / "epoch_best.pth.tar"
    torch.save(
        with_run_metadata(
            model.state_dict(), model="HPCM_Tiny", variant="baseline", lmbda=0.0067, seed=0
        ),
        path,
    )
    return path


def photos(folder: Path, count: int = 2) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(count):
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"a{k}.png")
    return folder


@pytest.fixture
def coded(monkeypatch) -> list[str]:
    """The names of the images that reached the coder."""
    names: list[str] = []
    real = bitstreams.evaluate_image

    def recording(model, x, name, save_to=None):
        names.append(name)
        return real(model, x, name, save_to)

    monkeypatch.setattr(bitstreams, "evaluate_image", recording)
    return names


@pytest.mark.parametrize(
    "broken", [b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 20], ids=["zero_byte", "truncated"]
)
def test_an_unreadable_image_is_refused_before_any_image_is_coded(
    tmp_path, capsys, checkpoint, coded, broken
):
    data = photos(tmp_path / "photos")
    (data / "z_last.png").write_bytes(broken)  # sorted after the good ones: its turn comes last
    code = bitstreams.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--dataset",
            str(data),
            "--output",
            str(tmp_path / "out.csv"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(data / "z_last.png") in err and "Traceback" not in err
    assert coded == [] and not (tmp_path / "out.csv").exists()


def test_save_reconstructions_that_is_a_file_names_the_option(tmp_path, capsys, checkpoint, coded):
    data = photos(tmp_path / "photos", count=1)
    taken = tmp_path / "recon"
    taken.write_text("a file")
    for target in (taken, taken / "sub"):
        code = bitstreams.main(
            [
                "--checkpoint",
                str(checkpoint),
                "--dataset",
                str(data),
                "--output",
                str(tmp_path / "out.csv"),
                "--save-reconstructions",
                str(target),
            ]
        )
        err = capsys.readouterr().err
        assert code == 2 and f"--save-reconstructions {target}" in err and "needs a folder" in err
        assert "Errno" not in err
    assert coded == [] and taken.read_text() == "a file"
    # a folder (created when missing) works
    assert (
        bitstreams.main(
            [
                "--checkpoint",
                str(checkpoint),
                "--dataset",
                str(data),
                "--output",
                str(tmp_path / "out.csv"),
                "--save-reconstructions",
                str(tmp_path / "new" / "recon"),
            ]
        )
        == 0
    )
    assert (tmp_path / "new" / "recon" / "a0.png").is_file()


def test_a_model_whose_activations_overflow_names_the_checkpoint_and_image(tmp_path, capsys):
    """A diverged run can leave finite weights whose activations overflow on real images (seen
    at lr 2e-3, lambda 0.0932): the error names both files and says what to do, and writes
    nothing."""
    from hpcm.models import build_model, with_run_metadata

    torch.manual_seed(0)
    model = build_model("HPCM_Tiny")
    with torch.no_grad():  # the last hyper-synthesis layer: the scales overflow to inf
        model.h_s.branch[3].branch[3].weight.mul_(1e38)
    checkpoint = tmp_path / "diverged.pth.tar"
    torch.save(
        with_run_metadata(model.state_dict(), model="HPCM_Tiny", variant="baseline", lmbda=0.1),
        checkpoint,
    )
    data = photos(tmp_path / "photos", count=1)
    out = tmp_path / "out.csv"
    code = bitstreams.main(
        ["--checkpoint", str(checkpoint), "--dataset", str(data), "--output", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(checkpoint) in err and str(data / "a0.png") in err
    assert "diverged" in err and "lower lr" in err
    assert not out.exists()
