"""The Snakemake DAG: job counts of the paper study, schema errors, lint.

Snakemake runs as a subprocess (its Python API does not read profiles and moves between minors),
always in a temporary working directory: the checkout's own ``results/`` is never read or written
(after a ``make demo`` a dry run there would find nothing to do). Expected job counts are computed
here from the config file itself, independently of the DAG. The end-to-end run of a small demo
config lives in ``test_e2e.py``; the study resolution itself is unit-tested in
``tests/config/test_study.py``.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from hpcm.config import study as study_config
from hpcm.data.datasets import dataset_options
from hpcm.models.presets import preset_config
from tests.paths import REPO

ROOT = REPO
SNAKEFILE = ROOT / "Snakefile"
PAPER = ROOT / "workflow" / "configs" / "paper.yaml"
DEMO = ROOT / "config.yaml"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def snakemake(
    *args: str, cwd: Path | None = None, timeout: int = 240
) -> subprocess.CompletedProcess:
    """`snakemake ARGS` with this interpreter's environment first on PATH and wandb off, run in
    ``cwd`` (default: a fresh temporary directory, never the checkout)."""
    if cwd is None:
        with tempfile.TemporaryDirectory(prefix="hpcm-dag-") as workdir:
            return snakemake(*args, cwd=Path(workdir), timeout=timeout)
    assert Path(cwd).resolve() != ROOT.resolve(), "workflow tests must not run in the checkout"
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["WANDB_MODE"] = "disabled"
    # the jobs import the hpcm of the checkout under test (not another one installed in the venv)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), *args]
    if cwd is None:
        with tempfile.TemporaryDirectory(prefix="hpcm-snakemake-") as empty:
            return subprocess.run(
                cmd, cwd=empty, env=env, capture_output=True, text=True, timeout=timeout
            )
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: {rule: count}."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^job\s+count\s*$", line))
    for line in lines[start + 2 :]:
        match = re.match(r"^(\w+)\s+(\d+)\s*$", line)
        if not match or match.group(1) == "total":
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def expected_counts(cfg: dict) -> dict[str, int]:
    """Job counts a config must produce, derived from the config alone."""
    n_grid = sum(
        math.prod(len(v) for v in g["axes"].values()) for g in cfg.get("grids", {}).values()
    )
    n_runs = (len(cfg["variants"]) + n_grid) * len(cfg["lambdas"]) * len(cfg.get("seeds", [0]))
    datasets = cfg["datasets"]
    uses_samples = "samples" in (cfg["train_data"], cfg["val_data"]) or any(
        d["kind"] == "samples" for d in datasets.values()
    )
    prepared = [n for n, d in datasets.items() if d["kind"] in dataset_options()]
    official = any(v.get("init_from") == "official" for v in cfg["variants"].values())
    counts = {
        "check_checkpoint": len(cfg["lambdas"]) if official else 0,  # one check per official file
        "export_samples": int(uses_samples),
        "prepare_dataset": len(prepared),
        "run_config": n_runs,
        "train": n_runs,
        "evaluate": n_runs * len(datasets),
        # the control rows: each lambda's official checkpoint evaluated untrained
        "evaluate_control": len(cfg["lambdas"]) * len(datasets) if cfg.get("control") else 0,
        # one job per run evaluates its snapshots; one convergence table
        "evaluate_snapshots": n_runs if cfg.get("convergence") else 0,
        "convergence": int(bool(cfg.get("convergence"))),
        # one job each: R-D points, the analysis section, all tables, the five figure sets, the
        # report's first page, all
        "rd_points": 1,
        "analysis_config": 1,
        "tables": 1,
        "phase2_grid": len(cfg.get("grids", {})),
        "summary": 1,
        "plot_rd": 1,
        "plot_forest": 1,
        "plot_delta": 1,
        "report_answer": 1,
        "plot_runs": 1,
        "plot_gammas": 1,
        "all": 1,
    }
    return {rule: n for rule, n in counts.items() if n}


def dry_run(configfile: Path, *extra: str) -> dict[str, int]:
    result = snakemake("-n", "--quiet", "rules", "--configfile", str(configfile), *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return job_counts(result.stdout + result.stderr)


@functools.cache
def _paper_counts() -> tuple[tuple[str, int], ...]:
    return tuple(dry_run(PAPER).items())


def paper_counts() -> dict[str, int]:
    """The paper study's dry-run job counts, one Snakemake run shared by the tests that need
    them."""
    return dict(_paper_counts())


def test_paper_dry_run_lists_every_job():
    cfg = yaml.safe_load(PAPER.read_text())
    assert cfg["model"] == "HPCM_Base"
    assert cfg["lambdas"] == [0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483]
    assert {d["kind"] for d in cfg["datasets"].values()} == {
        "kodak",
        "clic2020-professional",
        "tecnick",
    }
    counts = paper_counts()
    assert counts == expected_counts(cfg)
    # 17 named variants (5 of them Phase 4, its control included) + the seed's 4 x 3 phase-2 grid,
    # 6 lambdas, 3 datasets
    assert counts["train"] == 29 * 6 and counts["evaluate"] == 29 * 6 * 3


def test_adding_a_lambda_and_a_variant_adds_exactly_their_jobs(tmp_path):
    cfg = yaml.safe_load(PAPER.read_text())
    before = paper_counts()
    cfg["lambdas"].append(0.1)
    cfg["variants"]["phase1_lr2"] = {"extends": "phase1", "lr": 2.0e-4}
    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(yaml.safe_dump(cfg))
    after = dry_run(bigger)
    n_variants, n_lambdas, n_datasets = 30, 7, 3
    assert after["train"] - before["train"] == n_variants * n_lambdas - 29 * 6
    assert after["evaluate"] - before["evaluate"] == (n_variants * n_lambdas - 29 * 6) * n_datasets
    unchanged = {r: n for r, n in after.items() if r not in ("train", "run_config", "evaluate")}
    assert unchanged == {
        r: n for r, n in before.items() if r not in ("train", "run_config", "evaluate")
    }


def test_seeds_repeat_every_run_and_evaluation(tmp_path):
    """`seeds: [0, 1, 2]` trains and evaluates every (variant, lambda) three times, one folder
    each."""
    cfg = yaml.safe_load(PAPER.read_text())
    assert cfg["seeds"] == [0]  # the paper keeps one seed
    before = paper_counts()
    cfg["seeds"] = [0, 1, 2]
    seeded = tmp_path / "seeds.yaml"
    seeded.write_text(yaml.safe_dump(cfg))
    after = dry_run(seeded)
    assert after == expected_counts(cfg)
    for rule in ("run_config", "train", "evaluate"):
        assert after[rule] == 3 * before[rule]
    result = snakemake(
        "results/eval/kodak/phase2_qp/lmbda0.0067/seed2.csv",
        "-n",
        "-p",
        "--configfile",
        str(seeded),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    # the fine-tuning run starts from the baseline run of the same lambda and seed
    assert "results/train/baseline/lmbda0.0067/seed2/final.pth.tar" in output
    assert (
        "--lmbda 0.0067 --seed 2" in output
        and "--output-dir results/train/phase2_qp/lmbda0.0067/seed2" in output
    )


def test_demo_config_covers_every_phase_and_ablation():
    cfg = yaml.safe_load(DEMO.read_text())
    assert cfg["model"] == "HPCM_Tiny" and cfg["device"] == "cpu" and len(cfg["lambdas"]) >= 2
    variants = cfg["variants"]
    assert {"baseline", "phase1", "phase2", "phase3"} <= set(variants)
    assert any(v.get("init_from") for v in variants.values()), "a Phase 2 fine-tuning variant"
    assert set(cfg["grids"]["phase2grid"]["axes"]) == {"gamma", "w_lr"}
    rows = {s: set(spec["rows"]) for s, spec in cfg["analysis"]["studies"].items()}
    assert rows == {
        "study1": {"equal", "s1_emphasis", "s2_emphasis", "s3_emphasis"},
        "study2": {"uniform", "increasing", "decreasing"},
        "phase4": {
            "none (phase1)",
            "context_lr",
            "freeze_entropy",
            "progressive",
            "scale_early_stop",
        },
    }
    assert set(cfg["analysis"]["studies"]["phase4"]["rows"].values()) <= set(variants)
    assert dry_run(DEMO) == expected_counts(cfg)


def test_paper_config_is_complete_on_its_own():
    """The study config repeats every top-level section of the demo, so nothing is inherited."""
    demo, paper = yaml.safe_load(DEMO.read_text()), yaml.safe_load(PAPER.read_text())
    assert set(demo) == set(paper)
    assert set(demo["training"]) == set(paper["training"])


def write_config(tmp_path: Path, **changes) -> Path:
    cfg = yaml.safe_load(DEMO.read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "changes, key, words",
    [
        ({"training__stpes": 10}, "training", "stpes"),
        ({"training__steps": "many"}, "training.steps", "not of type 'integer'"),
        ({"lambdas": [0.013, -1.0]}, "lambdas.1", "-1.0"),
        ({"variants__phase1__optimizer": "sgd"}, "variants.phase1.optimizer", "sgd"),
        ({"analysis__reference": "nope"}, "analysis.reference", "unknown variant 'nope'"),
        ({"variants__phase2_qp__init_from": "ghost"}, "variants.phase2_qp.init_from", "ghost"),
        (
            {
                "variants__phase2_qp__init_from": "official",
                "official_checkpoints": [],
                "variants__baseline__init_from": None,
                "variants__phase1__init_from": None,
                "variants__phase3__init_from": None,
            },
            "variants.phase2_qp.init_from",
            "official_checkpoints",
        ),
        (
            {"variants__study1_s1__scale_weights": "s4_emphasis"},
            "variants.study1_s1.scale_weights",
            "s3_emphasis",
        ),
        # issue 10 point 4: two lambdas, one folder
        (
            {"lambdas": [0.0018, 0.0067, 0.00670000001]},
            "lambdas.2",
            "lambdas[1] = 0.0067 and lambdas[2] = 0.00670000001",
        ),
        # issue 10 point 6: every train job would fail on a crop the model cannot take
        (
            {"training__patch_size": 50},
            "training.patch_size",
            "not a multiple of 64, the pad multiple of HPCM_Tiny",
        ),
        ({"training__seed": 1}, "training.seed", "seeds"),
        # a fine-tuning lr with the study's absolute drops would rise at the first drop
        (
            {
                "variants__phase2_qp__lr_milestones": [0.9, 0.95, 0.98],
                "variants__phase2_qp__lr_values": [3e-5, 1e-5, 1e-6],
            },
            "variants.phase2_qp",
            "'lr_values' = [3e-05, 1e-05, 1e-06] raise the learning rate above 'lr' = 1e-05",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path, changes, key, words):
    """The checks the workflow runs on load (schema, then resolution), called as common.smk calls
    them; one case goes through Snakemake itself (test_snakemake_stops_on_a_config_error)."""
    path = write_config(tmp_path, **changes)
    with pytest.raises(study_config.StudyConfigError) as error:
        study_config.load(
            yaml.safe_load(path.read_text()),
            SCHEMA,
            lambda name: preset_config(name).pad_multiple,
            root=ROOT,
            dataset_kinds=dataset_options(),
        )
    assert f"config key '{key}'" in str(error.value), str(error.value)
    assert words in str(error.value), str(error.value)


def test_snakemake_stops_on_a_config_error(tmp_path):
    result = snakemake(
        "-n",
        "--configfile",
        str(write_config(tmp_path, variants__phase1__optimizer="sgd")),
        cwd=tmp_path,
    )
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "config key 'variants.phase1.optimizer'" in message and "sgd" in message, message


def test_a_variant_naming_presets_gets_their_numbers_in_its_run_config(tmp_path):
    """`scale_weights: equal` / `gammas: increasing` become the Study 1 / Study 2 lists (issue
    3)."""
    images = tmp_path / "images"
    images.mkdir()
    config = write_config(
        tmp_path,
        train_data=str(images),
        val_data=str(images),
        lambdas=[0.013],
        control=False,  # no warm start of this lambda to evaluate
        variants={
            "named": {
                "optimizer": "hierarchical_balanced",
                "scale_weights": "equal",
                "gammas": "increasing",
            },
            "child": {"extends": "named", "gammas": [0.001, 0.002, 0.003]},
        },
        grids={},
        analysis__reference="named",
        analysis__gains={},
        analysis__studies={},
    )
    targets = [f"results/configs/{name}/lmbda0.013/seed0.yaml" for name in ("named", "child")]
    result = snakemake(*targets, "--cores", "1", "--configfile", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    named, child = (yaml.safe_load((tmp_path / target).read_text()) for target in targets)
    assert named["scale_weights"] == [0.33, 0.33, 0.34] and named["gammas"] == [0.004, 0.006, 0.008]
    assert child["scale_weights"] == [0.33, 0.33, 0.34] and child["gammas"] == [0.001, 0.002, 0.003]
    assert named["seed"] == child["seed"] == 0


def test_lint_is_clean():
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_every_rule_has_a_log_and_shell_rules_an_env():
    rules_text = "\n".join(
        p.read_text() for p in sorted((ROOT / "workflow" / "rules").glob("*.smk"))
    )
    blocks = re.split(r"^rule (\w+):\n", rules_text, flags=re.M)[1:]
    for name, body in zip(blocks[::2], blocks[1::2]):
        assert "    log:" in body, f"rule {name} has no log"
        if "    shell:" in body:
            env = re.search(r'    conda:\n\s+"\.\./\.\./(envs/[\w.-]+\.yaml)"', body)
            assert env and (ROOT / env.group(1)).is_file(), f"rule {name} names no env from envs/"


def train_job(output: str) -> tuple[str, dict[str, object]]:
    """(shell command, resources) of the first train job of a `-n -p` dry run."""
    block = output[output.index("rule train:") :]
    resources = {}
    for item in re.search(r"^\s+resources: (.*)$", block, flags=re.M).group(1).split(", "):
        key, value = item.split("=", 1)
        resources[key] = int(value) if value.isdigit() else value
    command = re.search(r"^Shell command: (.*)$", block, flags=re.M).group(1)
    return command, resources


def gpu_config(tmp_path: Path, gpus: int, local_gpus: int) -> Path:
    return write_config(tmp_path, device="cuda", local_gpus=local_gpus, compute__train__gpus=gpus)


@pytest.mark.parametrize("gpus", [1, 4])
def test_gpus_per_training_job_set_the_launcher_and_the_gpu_resource(tmp_path, gpus):
    """Issue 11 point 4: gpus 1 keeps the plain command; gpus N launches torchrun with N processes
    on one node and asks for N GPUs (locally counted against --resources gpu=M)."""
    result = snakemake(
        "-n", "-p", "--configfile", str(gpu_config(tmp_path, gpus, 8)), "--resources", "gpu=8"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    command, resources = train_job(result.stdout + result.stderr)
    assert resources["gpu"] == gpus
    prefix, sep, rest = command.partition(" -m hpcm.train --config ")
    assert sep, command
    lock = f". {shlex.quote(str(ROOT / 'workflow' / 'scripts' / 'gpu-lock.sh'))} 8 {gpus}; "
    launcher = "python" if gpus == 1 else f"torchrun --standalone --nproc-per-node {gpus}"
    assert prefix == lock + launcher


def test_one_gpu_per_job_keeps_todays_command():
    """Without GPUs (the demo) the training command is exactly the plain python one."""
    result = snakemake("-n", "-p")
    assert result.returncode == 0, result.stderr[-3000:]
    command, resources = train_job(result.stdout + result.stderr)
    assert (
        command.startswith("python -m hpcm.train --config results/configs/")
        and resources.get("gpu", 0) == 0
    )


class Resources(dict):
    """Snakemake's job resources as the SLURM plugin reads them (.get and attributes)."""

    def __getattr__(self, name):
        return self[name]


@pytest.mark.parametrize("gpus", [1, 4])
def test_slurm_submission_asks_for_the_jobs_gpus_as_one_task(tmp_path, gpus):
    """Through profiles/slurm, the pinned executor plugin turns a training job into `sbatch
    --gpus=N` with one task that holds the job's threads (torchrun starts the processes)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    cfg = gpu_config(tmp_path, gpus, 0)
    result = snakemake(
        "-n", "-p", "--configfile", str(cfg), "--profile", str(ROOT / "profiles" / "slurm")
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    command, resources = train_job(result.stdout + result.stderr)
    assert command.startswith(
        "python -m" if gpus == 1 else f"torchrun --standalone --nproc-per-node {gpus} -m"
    )
    assert "gpu-lock.sh" not in command  # local_gpus 0: SLURM assigns the devices
    job = SimpleNamespace(
        resources=Resources(resources),
        threads=yaml.safe_load(cfg.read_text())["compute"]["train"]["threads"],
    )
    params = {
        "run_uuid": "uuid",
        "slurm_logfile": "log",
        "comment_str": "rule_train",
        "account": "",
        "partition": "",
        "workdir": str(tmp_path),
    }
    sbatch = get_submit_command(job, params) + set_gres_string(job)
    assert f"--gpus={gpus}" in sbatch and "--ntasks-per-gpu" not in sbatch, sbatch
    assert f"--cpus-per-task={job.threads}" in sbatch and "--signal=TERM@300" in sbatch, sbatch


def lock_prefix(local_gpus: int, needed: int) -> str:
    return (
        f". {shlex.quote(str(ROOT / 'workflow' / 'scripts' / 'gpu-lock.sh'))} {local_gpus} "
        f"{needed}; "
    )


def run_locking_jobs(
    tmp_path: Path, prefixes: list[str], hold: float = 3
) -> list[tuple[int, str, str]]:
    """Start one shell per prefix at once (each holds its devices for `hold` s): (rc, devices,
    stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    jobs = [
        subprocess.Popen(
            ["bash", "-c", f"set -euo pipefail; {prefix} echo $CUDA_VISIBLE_DEVICES; sleep {hold}"],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for prefix in prefixes
    ]
    return [
        (job.returncode, out.strip(), err)
        for job, (out, err) in ((j, j.communicate(timeout=60)) for j in jobs)
    ]


def test_local_gpu_jobs_each_lock_their_own_device(tmp_path):
    """With local_gpus: 2, the training command's prefix gives concurrent jobs distinct devices
    and refuses a third one."""
    result = snakemake(
        "-n", "-p", "--config", "device=cuda", "local_gpus=2", "--resources", "gpu=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    command, _ = train_job(result.stdout + result.stderr)
    prefix = command[: command.index("python -m hpcm.train")]
    assert prefix == lock_prefix(2, 1) and "--set device=cuda" in command
    outcomes = run_locking_jobs(tmp_path, [prefix] * 3)
    devices = sorted(devs for rc, devs, _ in outcomes if rc == 0)
    refused = [err for rc, _, err in outcomes if rc != 0]
    assert devices == ["0", "1"]
    assert (
        len(refused) == 1 and "only 0 of the 2 local GPUs are free, this job needs 1" in refused[0]
    )


def test_multi_gpu_jobs_lock_all_their_devices_or_none(tmp_path):
    """8 fake devices: two 4-GPU jobs started together get disjoint sets of 4 (never a part each,
    no deadlock); a third job, and a 4-GPU job beside a 6-GPU one, are refused at once and hold
    nothing."""
    outcomes = run_locking_jobs(tmp_path, [lock_prefix(8, 4)] * 3)
    granted = [devs.split(",") for rc, devs, _ in outcomes if rc == 0]
    refused = [err for rc, _, err in outcomes if rc != 0]
    assert len(granted) == 2 and all(len(g) == 4 for g in granted)
    assert sorted(granted[0] + granted[1], key=int) == [str(i) for i in range(8)]
    assert (
        len(refused) == 1 and "only 0 of the 8 local GPUs are free, this job needs 4" in refused[0]
    )
    # a refused job holds nothing: with 6 of 8 taken, a 4-GPU job fails and a 2-GPU job still fits
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    holder = subprocess.Popen(
        [
            "bash",
            "-c",
            f"set -euo pipefail; {lock_prefix(8, 6)} echo $CUDA_VISIBLE_DEVICES; sleep 6",
        ],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout.readline().strip() == "0,1,2,3,4,5"
    big = run_locking_jobs(tmp_path, [lock_prefix(8, 4)], hold=0)
    assert big[0][0] != 0 and "only 2 of the 8 local GPUs are free, this job needs 4" in big[0][2]
    small = run_locking_jobs(tmp_path, [lock_prefix(8, 2)], hold=0)
    assert small[0][:2] == (0, "6,7")
    holder.communicate(timeout=30)
