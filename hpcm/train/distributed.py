"""Data-parallel training over processes (``torchrun``): the one place that talks to
torch.distributed.

    torchrun --nproc-per-node N -m hpcm.train --config RUN.yaml --output-dir DIR

``Processes.start(cfg)`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); without it (``python -m hpcm.train``) it returns the single-process object, whose
methods change nothing, so one-process runs are bit-identical to the code without DDP. Backend:
NCCL on CUDA (device ``cuda:LOCAL_RANK``), gloo on CPU.

What makes N processes x B/N samples train like one process x B (``batch_size`` is the global
batch):

* data: rank r takes rows r*B/N .. (r+1)*B/N - 1 of each step's global batch (same images, same
  per-sample crops, ``hpcm.data.images.StepBatchSampler``); the quantisation noise of the whole
  batch is drawn on every rank from the same generator state and each keeps its rows
  (``hpcm.models.hpcm.add_uniform_noise``);
* losses: ``mean_over_ranks`` replaces every scalar the objective returns (the loss, the task
  losses, the logged metrics; also the second forward of ``same_batch``) by its mean over the ranks
  (all_gather, summed in rank order: the same bits on every rank). Its gradient passes to the
  rank's own loss unchanged, so after ``average_gradients`` the parameter gradient is that of the
  global objective, also for the FAMO surrogate, whose coefficients depend on the global losses;
* gradients: ``average_gradients`` all-reduces (one flat buffer) and divides by N, before the
  clip: every rank then holds the same gradients, clip norm, skip decision, task weights and
  optimizer state. For QP it averages each task's gradients before the QP solve. An explicit
  all-reduce rather than torch's DistributedDataParallel wrapper: the Balanced backward runs
  ``autograd.grad`` per task (QP) and a no-grad second forward, which DDP's reducer does not model.

Not exact: the float sums of a mean over ranks group the batch differently from one process, so N
processes match one process to float rounding, not bitwise; runs with the same N on CPU are
bit-reproducible (and resumable bit-identically). In float64, 2 ranks match 1 process to ~5e-16
after 10 steps for every optimizer. In float32, adam matches to ~1e-7; Cautious Adam's mask (a step
function of m * g) flips where that product is within rounding of zero, and such an element then
differs by up to ~lr (tests/train/test_distributed.py measures and attributes each one). The mean
keeps the losses' dtype (float32 at least), so a float64 run stays float64.

Lifecycle: rank 0 alone writes the run folder (``is_writer``); a stop signal on any rank is agreed
by all (``agree_to_stop``); a rank that crashes or hangs ends the others at their next collective
(the peer's closed connection, or ``dist_timeout_s``) with an error naming the cause.
"""

from __future__ import annotations

import datetime
import functools
import os
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from hpcm.config.run_config import ConfigError, RunConfig

# On CUDA the stop flag's all-reduce is read on the host (a sync), so it is agreed every
# STOP_CHECK_EVERY_CUDA steps (a second or two of HPCM_Base: far inside SLURM's grace period);
# on CPU (gloo) every step, where a host read costs nothing.
STOP_CHECK_EVERY_CUDA = 16


class CollectiveFailed(RuntimeError):
    """A collective failed: another rank crashed, or did not answer within dist_timeout_s."""


class Processes:
    """The processes of one run: rank, world size, and the collectives training needs."""

    def __init__(
        self, rank: int = 0, world_size: int = 1, local_rank: int = 0, owns_group: bool = False
    ):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.enabled = world_size > 1
        self.is_writer = (
            rank == 0
        )  # rank 0 alone writes checkpoints, metrics.csv, wandb, run.yaml, done
        self._owns_group = owns_group
        self.stop_check_every = 1

    @classmethod
    def start(cls, cfg: RunConfig, device: torch.device) -> "Processes":
        """The single process, or (under torchrun) this rank of a new process group."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1 and not dist.is_initialized():
            return cls()
        if cfg.batch_size % world_size:
            raise ConfigError(
                f"run config: key 'batch_size' = {cfg.batch_size!r}: the global batch must "
                f"split evenly over the {world_size} processes (WORLD_SIZE); use a multiple of "
                f"{world_size} or another --nproc-per-node"
            )
        if device.type == "cuda" and ":" in str(cfg.device):
            raise ConfigError(
                f"run config: key 'device' = {cfg.device!r}: under torchrun each process "
                "uses cuda:LOCAL_RANK; set device to auto or cuda"
            )
        owns = not dist.is_initialized()
        if owns:  # a caller (a test) may have set the group up already; then it also ends it
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo",
                timeout=datetime.timedelta(seconds=cfg.dist_timeout_s),
            )
        processes = cls(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns
        )
        if device.type == "cuda":
            processes.stop_check_every = STOP_CHECK_EVERY_CUDA
        return processes

    def device(self, picked: torch.device) -> torch.device:
        """cuda:LOCAL_RANK for a CUDA run of several processes; the picked device otherwise."""
        if self.enabled and picked.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return picked

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives (each one a no-op on one process)
    def mean_over_ranks(
        self, metrics: dict[str, torch.Tensor], tasks: torch.Tensor | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The objective's scalars (and task vector) as means over the ranks, in one all_gather;
        gradients flow to this rank's own values (see the module docstring)."""
        if not self.enabled:
            return metrics, tasks
        keys = [
            k
            for k, v in metrics.items()
            if torch.is_tensor(v) and v.ndim == 0 and v.is_floating_point()
        ]
        parts = [metrics[k] for k in keys] + ([] if tasks is None else list(tasks.unbind()))
        dtype = functools.reduce(
            torch.promote_types, [p.dtype for p in parts], torch.float32
        )  # float64 stays
        means = _MeanOverRanks.apply(
            torch.stack([p.to(dtype) for p in parts]), self.world_size
        ).unbind()
        out = {**metrics, **dict(zip(keys, means))}
        if (
            "psnr" in out and "mse" in out
        ):  # the PSNR of the mean MSE (as losses.rate_distortion), not a mean PSNR
            out["psnr"] = 10 * torch.log10(1.0 / out["mse"].detach().clamp_min(1e-20))
        global_tasks = None if tasks is None else torch.stack(means[len(keys) :])
        return out, global_tasks

    @torch.no_grad()
    def average_gradients(self, grads: list[torch.Tensor | None]) -> None:
        """Replace each gradient by its mean over the ranks (in place; None entries stay None)."""
        present = [g for g in grads if g is not None]
        if not present:
            return
        flat = _flatten_dense_tensors(present)
        self._collective(dist.all_reduce, flat)
        flat.div_(self.world_size)
        for grad, mean in zip(present, _unflatten_dense_tensors(flat, present)):
            grad.copy_(mean)

    def agree_to_stop(self, requested: bool, step: int, force: bool = False) -> bool:
        """Whether any rank was asked to stop (SIGTERM/SIGINT): every rank gets the same answer.

        Several processes agree only every ``stop_check_every`` steps (or when ``force``); a request
        seen in between is answered at the next check."""
        if not self.enabled:
            return requested
        if step % self.stop_check_every and not force:
            return False
        flag = torch.tensor([float(requested)], device=self._collective_device())
        self._collective(dist.all_reduce, flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        self._collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            self._collective(dist.barrier)

    def _collective_device(self) -> torch.device:
        return (
            torch.device("cuda", self.local_rank)
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )

    def _collective(self, operation, *args, **kwargs) -> None:
        try:
            operation(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise CollectiveFailed(
                f"rank {self.rank} of {self.world_size}: {operation.__name__} failed: another rank "
                f"crashed or did not answer within dist_timeout_s; see that rank's log. ({exc})"
            ) from exc


class _MeanOverRanks(torch.autograd.Function):
    """Forward: the mean over the ranks of a vector, summed in rank order (the same bits on every
    rank). Backward: the gradient passes to this rank's own vector unchanged; the gradient average
    over the ranks then supplies the 1/N (see ``Processes.average_gradients``)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, world_size: int) -> torch.Tensor:
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        try:
            dist.all_gather(gathered, local.contiguous())
        except (RuntimeError, dist.DistBackendError) as exc:
            raise CollectiveFailed(
                f"rank {dist.get_rank()} of {world_size}: all_gather of the losses failed: another "
                "rank crashed or did not answer within dist_timeout_s; see that rank's log. "
                f"({exc})"
            ) from exc
        total = gathered[0].clone()
        for part in gathered[1:]:
            total += part
        return total / world_size

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


SINGLE_PROCESS = Processes()
