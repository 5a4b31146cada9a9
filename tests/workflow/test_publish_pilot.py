"""workflow/scripts/publish-pilot.sh: it copies the pilot's tables and plots with the commit and
wall time that `make pilot` recorded, hashes each file, replaces the destination as a whole and
refuses, naming what is missing, when the run or its record is incomplete."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import REPO

SCRIPT = REPO / "workflow" / "scripts" / "publish-pilot.sh"
REQUIRED = [
    *(
        f"results/tables/{name}.{ext}"
        for name in ("bd_seeds_vs_baseline", "convergence", "bd_vs_baseline", "summary")
        for ext in ("csv", "md")
    ),
    "results/plots/convergence.png",
    "results/rd/points.csv",
    "results/rd/images.csv",
]
FIGURES = ["results/plots/rd/rd_kodak_psnr.png", "results/plots/forest/forest_kodak_psnr.png"]


def publish(workdir: Path, dest: str = "out/pilot") -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for key in ("PILOT_COMMIT", "PILOT_WALL_S"):
        env.pop(key, None)
    return subprocess.run(
        ["bash", str(SCRIPT), dest], cwd=workdir, env=env, capture_output=True, text=True
    )


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    for i, name in enumerate(REQUIRED + FIGURES):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"content {i}\n")
    (tmp_path / "results" / "pilot_run.txt").write_text(
        "commit=abc123 (with local changes)\nwall_s=125\n"
    )
    return tmp_path


def test_publishes_every_file_with_its_hash_and_the_recorded_run(finished_run):
    stale = finished_run / "out" / "pilot" / "from_an_earlier_run.png"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    result = publish(finished_run)
    assert result.returncode == 0, result.stderr
    out = finished_run / "out" / "pilot"
    names = sorted(Path(name).name for name in REQUIRED + FIGURES)
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["PROVENANCE.md"])
    provenance = (out / "PROVENANCE.md").read_text()
    assert "| commit | abc123 (with local changes) |" in provenance
    assert "| wall time | 2 min 5 s |" in provenance
    for name in REQUIRED + FIGURES:
        digest = hashlib.sha256((finished_run / name).read_bytes()).hexdigest()
        assert f"{digest}  {Path(name).name}\n" in provenance
    assert not list((finished_run / "out").glob(".publish.*"))  # no temporary folder left


def test_refuses_without_the_runs_record(finished_run):
    (finished_run / "results" / "pilot_run.txt").unlink()
    result = publish(finished_run)
    assert result.returncode == 1 and "results/pilot_run.txt is missing" in result.stderr
    assert not (finished_run / "out" / "pilot").exists()


def test_refuses_a_run_without_its_tables(finished_run):
    (finished_run / "results" / "tables" / "convergence.md").unlink()
    result = publish(finished_run)
    assert result.returncode == 1
    assert "results/tables/convergence.md is missing" in result.stderr
    assert not (finished_run / "out" / "pilot").exists()
