"""The convergence table (hpcm.analysis.convergence) from evaluation CSVs of synthetic runs: one row
per (step, images, variant), each equal to the seed-and-image interval of the rows it was built
from; bad inputs are errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hpcm.analysis import bootstrap, convergence
from hpcm.analysis.tables import TableError
from tests.analysis.test_seed_interval import synthetic_study

LAMBDAS = [0.001, 0.002, 0.004, 0.008]


def write_eval(
    path: Path, curve: bootstrap.Curve, variant: str, seed: int, images: list[str]
) -> Path:
    rows = [
        {
            "variant": variant,
            "lmbda": lmbda,
            "seed": seed,
            "dataset": "kodak",
            "image": name,
            "bpp": curve.bpp[li, i],
            "psnr": curve.dist[li, i],
            "ms_ssim": 0.95,
        }
        for li, lmbda in enumerate(LAMBDAS)
        for i, name in enumerate(images)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def study(tmp_path):
    """Snapshots at steps 5 and 10 on 3 images, final (step 20) on 6 images, 2 seeds, 2 variants."""
    rng = np.random.default_rng(4)
    names = [f"kodim{i:02d}.png" for i in range(1, 7)]
    snapshots, finals, curves = [], [], {}
    for step in (5, 10):
        ref, test = synthetic_study(rng, seeds=2, images=3)
        for variant, seeds in (("baseline", ref), ("phase1", test)):
            for seed, c in enumerate(seeds):
                path = tmp_path / "snap" / variant / f"seed{seed}" / f"step{step}.csv"
                snapshots.append(write_eval(path, c, variant, seed, names[:3]))
    ref, test = synthetic_study(rng, seeds=2, images=6)
    for variant, seeds in (("baseline", ref), ("phase1", test)):
        curves[variant] = seeds
        for seed, c in enumerate(seeds):
            path = tmp_path / "final" / variant / f"seed{seed}.csv"
            finals.append(write_eval(path, c, variant, seed, names))
    return snapshots, finals, curves


def test_rows_per_step_and_the_final_points(study):
    snapshots, finals, curves = study
    frame = convergence.convergence_frame(snapshots, finals, 20, "baseline", resamples=200, seed=1)
    assert list(zip(frame["step"], frame["images"])) == [
        (5, "first 3 images"),
        (10, "first 3 images"),
        (20, "first 3 images"),
        (20, "all 6 images"),
    ]
    assert set(frame["variant"]) == {"phase1"} and set(frame["interval"]) == {"seeds and images"}
    # the last row: every image of the final evaluations, as the seed table would give it
    direct = bootstrap.seed_image_interval(
        curves["baseline"], curves["phase1"], bootstrap.resample_indices(6, 200, 1)
    )
    last = frame.iloc[-1]
    assert (last["BD-rate (%)"], last["CI low (%)"], last["CI high (%)"]) == (
        direct.bd_rate,
        direct.low,
        direct.high,
    )
    # step 20 on the subset: the final evaluations' first 3 images
    sub = [bootstrap.Curve(c.bpp[:, :3], c.dist[:, :3]) for c in curves["baseline"]]
    sub_test = [bootstrap.Curve(c.bpp[:, :3], c.dist[:, :3]) for c in curves["phase1"]]
    expected = bootstrap.seed_image_interval(sub, sub_test, bootstrap.resample_indices(3, 200, 1))
    assert frame.iloc[2]["BD-rate (%)"] == expected.bd_rate
    assert last["excludes 0"] == ("yes" if direct.excludes_zero else "no")


def test_build_writes_table_and_plot(study, tmp_path):
    snapshots, finals, _ = study
    written = convergence.build(
        snapshots,
        finals,
        20,
        "baseline",
        tmp_path / "tables",
        tmp_path / "plots" / "c.png",
        resamples=50,
    )
    names = sorted(p.name for p in written)
    assert names == ["c.pdf", "c.png", "convergence.csv", "convergence.md", "convergence.tex"]
    assert "same step" in (tmp_path / "tables" / "convergence.md").read_text()


def test_a_file_not_named_by_its_step_is_an_error(study, tmp_path):
    snapshots, finals, _ = study
    bad = tmp_path / "snapshot.csv"
    bad.write_text(Path(snapshots[0]).read_text())
    with pytest.raises(TableError, match="snapshot.csv: a snapshot evaluation is named step<N>"):
        convergence.convergence_frame([bad], finals, 20, "baseline", resamples=10)


def test_a_snapshot_after_the_final_step_is_an_error(study):
    snapshots, finals, _ = study
    with pytest.raises(TableError, match="snapshot step 10 is not before the final step 10"):
        convergence.convergence_frame(snapshots, finals, 10, "baseline", resamples=10)
