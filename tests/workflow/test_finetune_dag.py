"""The fine-tuning studies (finetune.yaml, finetune_msssim.yaml): they parse with local checkpoint
files given, list every job, print their price in GPU-hours, and the checkpoint rule refuses a file
listed under the wrong lambda. The price is recomputed here from the config file alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.paths import REPO
from tests.workflow.test_dag import DEMO, expected_counts, job_counts, snakemake

CONFIGS = REPO / "workflow" / "configs"


def with_fake_checkpoints(name: str, tmp_path: Path) -> tuple[dict, Path]:
    """The study config with official_checkpoints pointing at empty local files (a dry run never
    reads them)."""
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    for entry in cfg["official_checkpoints"]:
        fake = tmp_path / "checkpoints" / f"{entry['lmbda']}.pth.tar"
        fake.parent.mkdir(parents=True, exist_ok=True)
        fake.touch()
        entry["path"] = str(fake)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return cfg, path


def optimizer_of(cfg: dict, name: str) -> str:
    variant = cfg["variants"][name]
    return variant.get("optimizer") or optimizer_of(cfg, variant["extends"])


def expected_gpu_hours(cfg: dict) -> float:
    rates = cfg["compute"]["train"]["steps_per_s"]
    runs = len(cfg["lambdas"]) * len(cfg["seeds"])
    hours = 0.0
    variants = {name: optimizer_of(cfg, name) for name in cfg["variants"]}
    for grid in cfg["grids"].values():
        n_points = 1
        for values in grid["axes"].values():
            n_points *= len(values)
        variants.update(
            {f"{id(grid)}-{i}": optimizer_of(cfg, grid["base"]["extends"]) for i in range(n_points)}
        )
    for name, optimizer in variants.items():
        steps = cfg["variants"].get(name, {}).get("steps", cfg["training"]["steps"])
        hours += runs * steps / rates.get(optimizer, rates["default"]) / 3600
    return hours


@pytest.mark.parametrize(
    "name, distortion, metric, lambdas",
    [
        ("finetune.yaml", "mse", "psnr", [0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483]),
        ("finetune_msssim.yaml", "ms_ssim", "ms_ssim_db", [2.4, 4.58, 8.73, 16.64, 31.73, 60.5]),
    ],
)
def test_finetune_studies_parse_and_print_their_price(tmp_path, name, distortion, metric, lambdas):
    cfg, path = with_fake_checkpoints(name, tmp_path)
    assert (
        cfg["model"] == "HPCM_Base"
        and cfg["distortion"] == distortion
        and cfg["lambdas"] == lambdas
    )
    assert {d["kind"] for d in cfg["datasets"].values()} == {"kodak", "clic2020-professional"}
    assert all(
        v.get("init_from") == "official" for v in cfg["variants"].values() if "extends" not in v
    )
    assert cfg["training"]["steps"] == 50 * 649  # Solution 2: 50 epochs of Flickr2W at batch 32
    result = snakemake("-n", "--quiet", "rules", "--configfile", str(path), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    counts = job_counts(output)
    assert counts == expected_counts(cfg)
    assert (
        counts["check_checkpoint"] == 6
        and counts["train"] == 28 * 6
        and counts["evaluate"] == 28 * 6 * 2
    )
    # the price: one line per variant and the total, in GPU-hours from compute.train.steps_per_s
    assert f"training cost of study '{cfg['study']}' (GPU-hours" in output
    assert re.search(
        r"^  baseline\s+adam\s+6\s+32450\s+10\.15\s+5\.3\s+\[compute\.train\.steps_per_s\.adam\]",
        output,
        re.M,
    ), output[:3000]
    total = re.search(r"total: 168 runs, (\d+) steps, ([\d.]+) GPU-hours", output)
    assert total and int(total.group(1)) == 168 * 32450
    assert float(total.group(2)) == pytest.approx(expected_gpu_hours(cfg), abs=0.05)
    # the run YAMLs train on the study's distortion; the analysis uses its metric
    target = f"results/configs/phase1/lmbda{lambdas[2]}/seed0.yaml"
    shown = snakemake(target, "-n", "-p", "--configfile", str(path), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"results/checks/official/lmbda{lambdas[2]}.json" in shown.stdout + shown.stderr
    plots = snakemake("results/plots/rd", "-n", "-p", "--configfile", str(path), cwd=tmp_path)
    assert f"--metric {metric}" in plots.stdout + plots.stderr


def test_paper_config_prints_its_price(tmp_path):
    result = snakemake(
        "-n", "--quiet", "rules", "--configfile", str(CONFIGS / "paper.yaml"), cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    cfg = yaml.safe_load((CONFIGS / "paper.yaml").read_text())
    total = re.search(r"total: 174 runs, \d+ steps, ([\d.]+) GPU-hours", output)
    assert total and float(total.group(1)) == pytest.approx(expected_gpu_hours(cfg), abs=0.05)


def test_the_checkpoint_rule_refuses_a_file_listed_under_another_lambda(tmp_path):
    """The demo's shipped warm starts, swapped: each file names (and stores) the other lambda."""
    cfg = yaml.safe_load(DEMO.read_text())
    first, second = (entry["path"] for entry in cfg["official_checkpoints"])
    cfg["official_checkpoints"][0]["path"], cfg["official_checkpoints"][1]["path"] = second, first
    path = tmp_path / "swapped.yaml"
    path.write_text(yaml.safe_dump(cfg))
    target = "results/checks/official/lmbda0.0004.json"
    result = snakemake(target, "--cores", "1", "--configfile", str(path), cwd=tmp_path)
    assert result.returncode != 0
    log = (tmp_path / "logs" / "check_checkpoint" / "lmbda0.0004.log").read_text()
    assert "states lambda 0.0932" in log and "listed for lambda 0.0004" in log, log
    cfg["official_checkpoints"][0]["path"], cfg["official_checkpoints"][1]["path"] = first, second
    path.write_text(yaml.safe_dump(cfg))
    result = snakemake(target, "--cores", "1", "--configfile", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / target).is_file()


def test_missing_released_checkpoints_are_listed_in_one_message(tmp_path):
    """Without the weights, one message lists every missing file, says what they are and where
    the README says to get them (not Snakemake's MissingInputException for one file; issue 26
    point 4)."""
    cfg, path = with_fake_checkpoints("finetune.yaml", tmp_path)
    missing = [entry["path"] for entry in cfg["official_checkpoints"][1:]]
    for name in missing:
        Path(name).unlink()
    result = snakemake("-n", "--configfile", str(path))
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "MissingInputException" not in output
    assert f"{len(missing)} of 6 checkpoint file(s) missing" in output
    assert all(name in output for name in missing)
    assert cfg["official_checkpoints"][0]["path"] not in output  # the one present is not listed
    assert "official HPCM weights" in output
    assert "README.md, section 'The paper study'" in output
    readme = (REPO / "README.md").read_text()
    assert "## The paper study" in readme and "**Fine-tuning from the released weights**" in readme
