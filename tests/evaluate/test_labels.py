"""Evaluation labels come from the checkpoint; arguments and checkpoints are checked before any
image is coded (issue 10, points 5, 6, 7). Small random images: no dataset needed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcm.evaluate import bitstreams
from hpcm.evaluate.bitstreams import main
from hpcm.models import build_model, load_checkpoint_and_metadata, with_run_metadata
from hpcm.train import checkpoints as checkpointing


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("labels")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(
            images / f"im{k}.png"
        )
    torch.manual_seed(0)
    model = build_model("HPCM_Tiny")
    # What hpcm.train writes: a baseline run's best model, which knows what it is ...
    baseline = root / "baseline" / checkpointing.BEST_MODEL
    baseline.parent.mkdir()
    checkpointing.save_best_model(
        model,
        baseline.parent,
        {"model": "HPCM_Tiny", "variant": "baseline", "lmbda": 0.0067, "seed": 2},
    )
    # ... beside a run.yaml of another run (the reported mislabelling).
    (baseline.parent / "run.yaml").write_text(
        "model: HPCM_Tiny\nvariant: phase1\nlmbda: 0.013\nseed: 0\n"
    )
    official = root / "official.pth.tar"  # an official release: a raw state dict, no labels
    torch.save(model.state_dict(), official)
    return {"root": root, "images": images, "baseline": baseline, "official": official}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def args(checkpoint: Path, images: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        str(images),
        "--output",
        str(output),
        *extra,
    ]


@pytest.fixture
def no_coding(monkeypatch):
    """Fail the test if any image is coded: the errors under test must come before evaluation."""

    def refuse(*a, **k):
        raise AssertionError("an image was evaluated before the error")

    monkeypatch.setattr(bitstreams, "evaluate_image", refuse)


def test_best_model_carries_its_labels_and_still_loads_as_an_official_state_dict(files):
    model, labels = load_checkpoint_and_metadata(files["baseline"])
    assert labels == {"model": "HPCM_Tiny", "variant": "baseline", "lmbda": 0.0067, "seed": 2}
    assert model.name == "HPCM_Tiny"  # from the metadata: no shape inference, no warning
    plain = build_model("HPCM_Tiny")  # what the official test.py does
    plain.load_state_dict(torch.load(files["baseline"], map_location="cpu"))
    _, none = load_checkpoint_and_metadata(files["official"], "HPCM_Tiny")
    assert none == {}


def test_labels_come_from_the_checkpoint_not_the_run_yaml_beside_it(files, tmp_path):
    out = tmp_path / "e.csv"
    assert main(args(files["baseline"], files["images"], out, "--limit", "1")) == 0
    rows = read_rows(out)
    assert [(r["variant"], float(r["lmbda"]), r["seed"]) for r in rows] == [
        ("baseline", 0.0067, "2")
    ]
    # agreeing command-line labels are accepted (the workflow passes them)
    assert (
        main(
            args(
                files["baseline"],
                files["images"],
                out,
                "--limit",
                "1",
                "--variant",
                "baseline",
                "--lmbda",
                "0.0067",
                "--seed",
                "2",
            )
        )
        == 0
    )


@pytest.mark.parametrize(
    "flag, value, stored",
    [("--lmbda", "0.013", "0.0067"), ("--variant", "phase1", "'baseline'"), ("--seed", "0", "2")],
)
def test_command_line_contradicting_the_checkpoint_fails_before_evaluating(
    files, tmp_path, capsys, no_coding, flag, value, stored
):
    out = tmp_path / "e.csv"
    assert main(args(files["baseline"], files["images"], out, flag, value)) == 2
    err = capsys.readouterr().err
    assert f"{flag} {value} contradicts the checkpoint {files['baseline']}" in err and stored in err
    assert not out.exists()


def test_no_lambda_anywhere_fails_before_evaluating(files, tmp_path, capsys, no_coding):
    out = tmp_path / "e.csv"
    assert main(args(files["official"], files["images"], out, "--variant", "x")) == 2
    err = capsys.readouterr().err
    assert f"{files['official']} does not say its lmbda" in err and "pass --lmbda" in err
    assert not out.exists()
    assert main(args(files["official"], files["images"], out, "--lmbda", "0.0067")) == 2
    assert "does not say its variant" in capsys.readouterr().err


def test_official_checkpoint_with_labels_from_the_command_line(files, tmp_path):
    out = tmp_path / "e.csv"
    assert (
        main(
            args(
                files["official"],
                files["images"],
                out,
                "--variant",
                "official",
                "--lmbda",
                "0.0483",
                "--model",
                "HPCM_Tiny",
                "--limit",
                "1",
            )
        )
        == 0
    )
    row = read_rows(out)[0]
    assert (row["variant"], float(row["lmbda"]), row["seed"]) == ("official", 0.0483, "")


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_limit_below_one_is_refused(files, tmp_path, capsys, no_coding, limit):
    assert main(args(files["baseline"], files["images"], tmp_path / "e.csv", "--limit", limit)) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err


def test_limit_keeps_the_first_n_images(files):
    assert [p.name for p in bitstreams.list_dataset(files["images"], 1)] == ["im0.png"]


@pytest.mark.parametrize("flag", ["--output", "--json"])
def test_output_that_is_a_folder_is_refused_before_evaluating(
    files, tmp_path, capsys, no_coding, flag
):
    folder = tmp_path / "folder"
    folder.mkdir()
    extra = ["--json", str(folder)] if flag == "--json" else []
    output = folder if flag == "--output" else tmp_path / "e.csv"
    assert main(args(files["baseline"], files["images"], output, *extra)) == 2
    assert f"{flag} {folder} is a folder" in capsys.readouterr().err


def test_unreadable_checkpoints_say_so(files, tmp_path, capsys, no_coding):
    empty = tmp_path / "empty.pth.tar"
    empty.write_bytes(b"")
    assert main(args(empty, files["images"], tmp_path / "e.csv", "--model", "HPCM_Tiny")) == 2
    err = capsys.readouterr().err.strip()
    assert (
        f"{empty} is empty (0 bytes)" in err
        and "does not fit" not in err
        and not err.endswith("()")
    )
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(files["baseline"].read_bytes()[:5000])
    assert main(args(truncated, files["images"], tmp_path / "e.csv", "--model", "HPCM_Tiny")) == 2
    err = capsys.readouterr().err
    assert (
        f"{truncated} is unreadable or truncated (5000 bytes)" in err and "does not fit" not in err
    )


def test_architecture_mismatch_suggests_dropping_model(files, tmp_path, capsys, no_coding):
    assert (
        main(args(files["baseline"], files["images"], tmp_path / "e.csv", "--model", "HPCM_Small"))
        == 2
    )
    assert "drop --model" in capsys.readouterr().err


def test_with_run_metadata_rejects_unknown_labels():
    with pytest.raises(ValueError, match="unknown run label"):
        with_run_metadata(build_model("HPCM_Tiny").state_dict(), lamda=0.1)
