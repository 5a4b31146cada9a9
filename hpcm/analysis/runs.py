"""Training-run discovery: every folder under a root that holds a ``run.yaml`` written by
hpcm.train.

The one definition that ``hpcm tables`` and ``hpcm plots`` use. Discovery depends on the files,
not on the folder depth, so ``results/train/<variant>/lmbda<L>/`` and
``results/train/<variant>/lmbda<L>/seed<k>/`` layouts are both found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcm.config.run_config import METRICS_CSV, RUN_YAML, read_run_yaml


class RunDiscoveryError(ValueError):
    """A runs folder without runs, or a run folder that lacks a file or key (the message says
    which)."""


@dataclass(frozen=True)
class RunFolder:
    path: Path
    config: dict[str, Any]  # the resolved run config of run.yaml (without its meta block)

    @property
    def variant(self) -> str:
        return str(self.config["variant"])

    @property
    def lmbda(self) -> float:
        return float(self.config["lmbda"])

    @property
    def metrics_csv(self) -> Path:
        return self.path / METRICS_CSV


def find_runs(root: str | Path) -> list[RunFolder]:
    """The run folders under ``root`` (any depth), sorted by path.

    Raises RunDiscoveryError when ``root`` is not a folder, holds no run, a run.yaml lacks
    ``variant`` or ``lmbda``, a run has no metrics.csv yet, or a metrics.csv has no run.yaml.
    """
    root = Path(root)
    if not root.is_dir():
        raise RunDiscoveryError(f"runs folder not found: {root}")
    runs = []
    for path in sorted(root.rglob(RUN_YAML)):
        config = read_run_yaml(path.parent)
        if "variant" not in config or "lmbda" not in config:
            raise RunDiscoveryError(
                f"{path}: lacks 'variant' or 'lmbda' (not written by hpcm.train?)"
            )
        if not (path.parent / METRICS_CSV).is_file():
            raise RunDiscoveryError(
                f"{path.parent}: run.yaml but no {METRICS_CSV} (an unfinished run? finish "
                "it by re-running its training command, or move the folder away)"
            )
        runs.append(RunFolder(path.parent, config))
    found = {run.path for run in runs}
    orphans = [p.parent for p in sorted(root.rglob(METRICS_CSV)) if p.parent not in found]
    if orphans:
        raise RunDiscoveryError(
            f"{orphans[0]}: {METRICS_CSV} but no {RUN_YAML} with variant and lmbda"
        )
    if not runs:
        raise RunDiscoveryError(
            f"no {METRICS_CSV} under {root} (a run folder holds {RUN_YAML} and "
            f"{METRICS_CSV}, at any depth)"
        )
    return runs
