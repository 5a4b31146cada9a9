"""Run-folder discovery (hpcm.analysis.runs): by run.yaml at any depth, with clear errors."""

from __future__ import annotations

import pytest

from hpcm.analysis.runs import RunDiscoveryError, find_runs


def _run(folder, variant="phase1", lmbda=0.013, metrics=True):
    folder.mkdir(parents=True)
    (folder / "run.yaml").write_text(
        f"variant: {variant}\nlmbda: {lmbda}\nmeta: {{git_commit: abc}}\n"
    )
    if metrics:
        (folder / "metrics.csv").write_text("step,loss\n1,2.0\n")
    return folder


def test_runs_are_found_at_any_depth(tmp_path):
    flat = _run(tmp_path / "baseline" / "lmbda0.013", "baseline")
    seeded = [
        _run(tmp_path / "phase1" / "lmbda0.0035" / f"seed{k}", "phase1", 0.0035) for k in (0, 1)
    ]
    runs = find_runs(tmp_path)
    assert [r.path for r in runs] == [flat, *seeded]
    assert [(r.variant, r.lmbda) for r in runs] == [
        ("baseline", 0.013),
        ("phase1", 0.0035),
        ("phase1", 0.0035),
    ]
    assert runs[0].metrics_csv == flat / "metrics.csv" and "meta" not in runs[0].config


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "no metrics.csv under"),
        ("no_metrics", "run.yaml but no metrics.csv"),
        ("orphan_metrics", "metrics.csv but no run.yaml"),
        ("no_lambda", "lacks 'variant' or 'lmbda'"),
        ("missing_root", "runs folder not found"),
    ],
)
def test_bad_run_folders_are_named(tmp_path, case, message):
    root = tmp_path / "train"
    root.mkdir()
    if case == "no_metrics":
        _run(root / "a", metrics=False)
    elif case == "orphan_metrics":
        _run(root / "a")
        (root / "b").mkdir()
        (root / "b" / "metrics.csv").write_text("step\n")
    elif case == "no_lambda":
        (root / "a").mkdir()
        (root / "a" / "run.yaml").write_text("variant: x\n")
    elif case == "missing_root":
        root = tmp_path / "nowhere"
    with pytest.raises(RunDiscoveryError, match=message):
        find_runs(root)
