"""One rank of the data-parallel tests, started by torchrun from tests/train/test_distributed.py.

    torchrun --nproc-per-node 2 tests/train/ddp_worker.py MODE OUT [JSON]

MODE ``runs``: JSON {"runs": {name: overrides}, "float64": bool, "record": bool}: trains each run in
OUT/<name> through ``hpcm.train.loop.main`` (one process group for all; in float64 with
``ddp_probe.train_in_float64``), then writes what this rank holds (parameters, task logits) to
OUT/<name>/rank<r>.pt, since only rank 0 writes the run folder; with "record", rank 0 also keeps
the Cautious Adam products of every step (``ddp_probe.record_cautious_products``) in
OUT/<name>/products.pt.
MODE ``interrupt``: 4 steps straight in OUT/full; in OUT/parted SIGTERM reaches rank 1 alone
during step 2, then the same command resumes; per-rank states as above.
MODE ``hang``: rank 1 stops answering in step 2; ``main`` (which starts the group itself, with
dist_timeout_s from JSON) must end rank 0 with an error. Exit code: rank 0's exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hpcm.train import loop
from tests.train.ddp_probe import record_cautious_products, train_in_float64
from tests.train.tiny import cli_args

torch.set_num_threads(1)
RANK = int(os.environ["RANK"])


def keep_runs() -> dict:
    """Make ``loop.train`` remember its Run, so that this rank's state can be dumped afterwards."""
    kept: dict = {}
    real_train = loop.train

    def train(run, stop):
        kept["run"] = run
        return real_train(run, stop)

    loop.train = train
    return kept


def dump(run, path: Path) -> None:
    """The parameters and the task weights' state: FAMO's logits w, or QP's last weights."""
    weighting = getattr(run.optimizer, "weighting", None)
    w = {
        None: None,
        "famo": getattr(run.optimizer, "w", None),
        "qp": getattr(run.optimizer, "qp_weights", None),
    }[weighting]
    torch.save(
        {
            "model": {k: v.detach().clone() for k, v in run.model.state_dict().items()},
            "w": None if w is None else w.detach().clone(),
            "step": run.step,
        },
        path,
    )


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    spec = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    kept = keep_runs()
    if mode == "runs":
        dist.init_process_group("gloo")
        for name, overrides in spec["runs"].items():
            products = out / name / "products.pt" if RANK == 0 and spec["record"] else None
            with (
                train_in_float64() if spec["float64"] else contextlib.nullcontext(),
                record_cautious_products(products),
            ):
                code = loop.main(cli_args(out / name, **overrides))
            assert code == loop.EXIT_OK, (name, code)
            dump(kept["run"], out / name / f"rank{RANK}.pt")
        dist.destroy_process_group()
        return 0
    if mode == "interrupt":
        dist.init_process_group("gloo")
        assert loop.main(cli_args(out / "full", **spec)) == loop.EXIT_OK
        dump(kept["run"], out / "full" / f"rank{RANK}.pt")
        real_step = loop.Run.train_step

        def sigterm_rank1_in_step_2(self, step, x):
            if RANK == 1 and self.step + 1 == 2:
                signal.raise_signal(signal.SIGTERM)
            return real_step(self, step, x)

        loop.Run.train_step = sigterm_rank1_in_step_2
        code = loop.main(cli_args(out / "parted", **spec))
        assert code == loop.EXIT_INTERRUPTED, code
        dump(kept["run"], out / "parted" / f"interrupted_rank{RANK}.pt")
        if RANK == 0:  # for resuming on another world size
            shutil.copytree(
                out / "parted", out / "parted_w1", ignore=shutil.ignore_patterns("*.pt", ".lock")
            )
        dist.barrier()
        loop.Run.train_step = real_step
        assert loop.main(cli_args(out / "parted", **spec)) == loop.EXIT_OK
        dump(kept["run"], out / "parted" / f"rank{RANK}.pt")
        dist.destroy_process_group()
        return 0
    if mode == "hang":
        real_step = loop.Run.train_step

        def hang_rank1_in_step_2(self, step, x):
            if RANK == 1 and self.step + 1 == 2:
                signal.signal(
                    signal.SIGTERM, lambda *_: os._exit(4)
                )  # torchrun ends it once rank 0 failed
                time.sleep(spec["sleep_s"])
                os._exit(3)  # the stuck rank gives up too, without another collective
            return real_step(self, step, x)

        loop.Run.train_step = hang_rank1_in_step_2
        return loop.main(cli_args(out, **spec["overrides"]))
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())
