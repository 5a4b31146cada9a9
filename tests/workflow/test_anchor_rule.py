"""The codec-anchor rules end to end through Snakemake with a real codec (JPEG through Pillow, as
compressai.utils.bench runs it) on two small photos: one job per (image, quality), a per-image CSV
equal to an independent Pillow + numpy computation, nothing redone on a re-run, only the lost
point redone after one is deleted; the VTM anchor's ``colour`` option reaching the jobs (with a
lossless stand-in for VTM's binaries); and the error a missing VTM build gives before anything
runs.

Snakemake runs as a subprocess in a temporary directory, with this checkout first on PYTHONPATH
(the jobs' ``python -m hpcm...`` must import this code, not another installed copy)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from hpcm.data.images import sample_images
from tests.evaluate.test_codecs import lossless_vtm, reference_jpeg
from tests.paths import REPO

QUALITIES = [20, 60]
TARGET = "results/anchors/photos/jpeg.csv"


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["WANDB_MODE"] = "disabled"
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        *args,
    ]
    return subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )


def write_config(workdir: Path, anchors: dict) -> Path:
    photos = workdir / "photos"
    photos.mkdir(exist_ok=True)
    for name, array in list(sample_images("test"))[:2]:
        Image.fromarray(array[:176, :200]).save(photos / f"{name}.png")
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["datasets"] = {"photos": {"kind": "folder", "source": str(photos), "anchors": anchors}}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


COLOUR_TARGETS = [f"results/anchors/photos/{colour}.csv" for colour in ("round", "truncate")]


@pytest.fixture(scope="module")
def jpeg_run(tmp_path_factory) -> Path:
    """One Snakemake run: the JPEG anchor, and two stand-in VTM anchors that differ only in
    ``colour`` (one run, because each Snakemake start costs about 20 s)."""
    workdir = tmp_path_factory.mktemp("anchor")
    vtm = lossless_vtm(workdir)
    anchors = {"jpeg": {"codec": "jpeg", "qualities": QUALITIES}}
    anchors.update({colour: {**vtm, "colour": colour} for colour in ("round", "truncate")})
    write_config(workdir, anchors)
    targets = [TARGET, *COLOUR_TARGETS]
    result = snakemake(workdir, "--cores", "2", *targets, "--configfile", "config.yaml")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return workdir


def test_one_job_per_point_and_the_per_image_csv(jpeg_run):
    points = sorted((jpeg_run / "results/anchors/photos/jpeg").rglob("*.json"))
    assert len(points) == 2 * len(QUALITIES)
    rows = pd.read_csv(jpeg_run / TARGET)
    assert len(rows) == 4 and set(rows["quality"]) == set(QUALITIES)
    for row in rows.itertuples():
        size, psnr = reference_jpeg(jpeg_run / "photos" / row.image, int(row.quality))
        assert row.bytes == size and row.psnr == pytest.approx(psnr, abs=1e-4)
        assert row.version.startswith("Pillow") and "quality=" in row.encode_cmd
    doc = json.loads((jpeg_run / "results/anchors/photos/jpeg.json").read_text())
    assert doc["name"] == "jpeg" and doc["meta"]["quality"] == QUALITIES
    assert doc["results"]["bpp"][0] == pytest.approx(rows[rows["quality"] == 20]["bpp"].mean())
    assert doc["meta"]["complete"] == {
        "pairs": 4,
        "expected_pairs": 4,
        "images": 2,
        "expected_images": 2,
        "skipped": [],
    }


def test_rerun_keeps_points_and_redoes_only_a_lost_one(jpeg_run):
    again = snakemake(jpeg_run, "-n", TARGET, "--configfile", "config.yaml")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    # an interrupted run: the anchor was never collected and one point was lost
    for name in ("jpeg.csv", "jpeg.json", "jpeg/q60/astronaut.png.json"):
        (jpeg_run / "results/anchors/photos" / name).unlink()
    plan = snakemake(jpeg_run, "-n", TARGET, "--configfile", "config.yaml")
    out = plan.stdout + plan.stderr
    assert plan.returncode == 0, out[-3000:]
    assert re.search(r"^anchor_point\s+1\s*$", out, re.MULTILINE), out[-3000:]
    assert re.search(r"^anchor\s+1\s*$", out, re.MULTILINE)
    assert "output: results/anchors/photos/jpeg/q60/astronaut.png.json" in out


def test_missing_vtm_build_stops_the_workflow_naming_the_key(tmp_path):
    write_config(
        tmp_path,
        {
            "vtm-22.0": {
                "codec": "vtm",
                "qualities": [37],
                "build_dir": str(tmp_path / "no-vtm"),
                "cfg": str(tmp_path / "encoder_intra_vtm.cfg"),
            }
        },
    )
    result = snakemake(tmp_path, "-n", "--configfile", "config.yaml", timeout=300)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "config key 'datasets.photos.anchors.vtm-22.0.build_dir'" in out
    assert "EncoderAppStatic does not exist" in out


def test_vtm_colour_option_reaches_the_jobs(jpeg_run):
    """The CSV of each stand-in VTM anchor records its conversion, and the rounded one is the
    better round trip (52.9 against 43.7 dB on these crops)."""
    rounded, truncated = (pd.read_csv(jpeg_run / t) for t in COLOUR_TARGETS)
    assert set(rounded["colour"]) == {"round"} and set(truncated["colour"]) == {"truncate"}
    assert (rounded["psnr"] > truncated["psnr"] + 5).all()
    doc = json.loads((jpeg_run / "results/anchors/photos/truncate.json").read_text())
    assert "truncated to 8 bits" in doc["meta"]["provenance"]["colour"]
