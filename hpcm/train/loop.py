"""Train one (variant, lambda) run of HPCM: ``python -m hpcm.train --config RUN.yaml --output-dir
DIR``.

    python -m hpcm.train --config RUN.yaml --output-dir DIR [--set key=value ...]

This module only wires the pieces together: models (``hpcm.models``), optimizers (``hpcm.optim``),
losses (``hpcm.train.losses``), schedules (``hpcm.train.schedules``), data (``hpcm.data.images``),
checkpoints and resuming (``hpcm.train.checkpoints``), the folder lock (``hpcm.train.lock``),
signals (``hpcm.train.interrupt``) and logs (``hpcm.train.logs``). ``Run.train_step`` is one
optimizer step, from batch to optimizer, on one screen. The run-config keys, their defaults and the
variant presets are listed by ``--help`` and documented in ``hpcm.config.run_config``
(``RunConfig``).

Recipe (every variant, so that comparisons are fair): lr 1e-4 dropped to 3e-5 / 1e-5 / 1e-6 at the
fractions 2750/3000, 2850/3000, 2950/3000 of the run (official HPCM), gradient-norm clip 1.0,
batches whose gradient norm is not finite are skipped (and counted, with no task-weight update);
a run that skips ``DIVERGED_SHARE`` (90 %) of the batches of every log window for
``DIVERGED_AFTER_STEPS`` (50) steps or more has diverged: it stops with an error, writes the
``diverged`` marker, and refuses to resume.

Writes in DIR: ``metrics.csv`` (window means per logged step, plus ``loss_std``/``loss_steps``
of the window's per-step losses), ``checkpoint_last.pth.tar`` (+ ``checkpoint_prev.pth.tar``, the
fallback), ``epoch_best.pth.tar`` (official-layout state dict with coder tables built, best
validation loss), ``balanced_state_best.pth`` (balanced optimizers), ``run.yaml`` (resolved config,
package version, git commit), wandb files (``wandb/``), and ``done``, written last. With
``ema_decay`` > 0 the moving average of the weights (``hpcm.train.ema``) is validated and exported
instead of the raw weights; ``snapshot_every`` > 0 adds ``epoch_<step>.pth.tar`` snapshots
(+ ``balanced_state_<step>.pth``), the newest ``snapshot_keep`` of them kept
(``hpcm.train.checkpoints``). Phase 4 context-aware fine-tuning (``group_lr``, ``freeze``,
``unfreeze_schedule``,
``scale_early_stop_patience``) is ``hpcm.train.phase4``: per-group lr ratios, freezing before each
step, and per-scale early stopping on the validation's per-scale y rates (``val_s{1,2,3}_bpp``).

Never lose work: a checkpoint every ``checkpoint_every`` steps and at the end; re-running the same
command resumes from the newest valid checkpoint (a finished run, with ``done``, is a no-op when its
config is the same, an error when an experiment key changed). One writer per folder: the trainer
holds ``DIR/.lock`` (``hpcm.train.lock``, an flock that dies with its process) while it runs.
SIGTERM / SIGINT (e.g. SLURM pre-emption) finish the current step, save and exit with
``EXIT_INTERRUPTED`` (``hpcm.train.interrupt``). The data order is a pure function of (seed, step),
and every RNG state is checkpointed, so on CPU a resumed run ends with the same weights as an
uninterrupted one.

Exit codes: 0 finished (or already finished), 2 bad command line / config / data (nothing was
done; also every checkpoint unreadable, an image unreadable mid-run after saving the state, or
a run folder marked ``diverged``),
75 interrupted by SIGTERM/SIGINT after saving a checkpoint (EX_TEMPFAIL: re-run to
resume), 1 anything else (a crash; the last checkpoint is intact), or a run that diverged (its
checkpoints may hold the diverged weights; it leaves ``diverged``, and running it again exits 2).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import hpcm
from hpcm import models, optim
from hpcm.config import run_config
from hpcm.config.optimizers import optimizer_spec
from hpcm.config.run_config import RunConfig
from hpcm.config.tasks import SCALES, SEED_TASK_NAMES
from hpcm.data import images as data
from hpcm.train import checkpoints as checkpointing
from hpcm.train import distributed, losses, phase4, schedules, validation
from hpcm.train import lock as run_lock
from hpcm.train.ema import build_ema
from hpcm.train.interrupt import StopFlag
from hpcm.train.logs import MetricsCSV, WandbLogger, log_line, print_err, write_run_yaml
from hpcm.util.device import DeviceUnavailableError, pick_device
from hpcm.util.io import atomic_write_text

__doc__ = (__doc__ or "") + "\n" + run_config.help_text()  # every key, also in help(hpcm.train)

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 75  # sysexits EX_TEMPFAIL: state saved, run the same command again to resume

# A run that skipped at least DIVERGED_SHARE of its batches (non-finite loss or gradient) in every
# log window of its last DIVERGED_AFTER_STEPS steps or more has diverged: its weights or
# activations overflowed and the odd batch that still passes cannot bring it back. It stops,
# leaves the DIVERGED_MARKER, and refuses to resume, rather than train on (or be retried by the
# workflow) and export a model that cannot code an image.
DIVERGED_AFTER_STEPS = 50
DIVERGED_SHARE = 0.9
DIVERGED_MARKER = "diverged"


class Diverged(RuntimeError):
    """The run skipped most batches for ``DIVERGED_AFTER_STEPS`` steps or more."""


DONE_MARKER = "done"
METRICS_CSV = run_config.METRICS_CSV
# What a step's forward pass and loss return: (metrics with "loss", Balanced task vector or None)
Objective = tuple[dict[str, torch.Tensor], torch.Tensor | None]
# Running sums kept on the device between log rows (no per-step host sync): column -> loss-dict key.
# The loss comes first (its square is summed too, for loss_std); the scale tasks only in Phase 3.
TRAIN_SUMS = {
    "loss": "loss",
    "distortion": "distortion",
    "bpp": "bpp_loss",
    "y_bpp": "y_bpp",
    "z_bpp": "z_bpp",
    "mse": "mse",
    "psnr": "psnr",
    **{task: task for task in SEED_TASK_NAMES},
}


# ----------------------------------------------------------------------------- the pieces of a run


def scale_losses(metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """The three scales' losses of a Phase 3 step: [s1_d + s1_b, s2_d + s2_b, s3_b]."""
    m = metrics
    return torch.stack([m["s1_d"] + m["s1_b"], m["s2_d"] + m["s2_b"], m["s3_b"]]).detach().float()


class Run:
    """Everything one training run wires together: ``open_data``, then ``build`` (fresh or from a
    state)."""

    def __init__(
        self,
        cfg: RunConfig,
        out: Path,
        processes: distributed.Processes = distributed.SINGLE_PROCESS,
    ):
        self.cfg, self.out, self.processes = cfg, out, processes
        self.device = processes.device(pick_device(cfg.device, "run config: key 'device'"))
        self.cuda = self.device.type == "cuda"
        self.sync_free = (
            self.cuda
        )  # skip decisions on the device; benchmarks/gpu_check.py also builds the host path
        if cfg.bf16 and not self.cuda:
            warnings.warn(
                "bf16 autocast is only used on CUDA; this CPU run trains in float32", stacklevel=2
            )
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if cfg.bf16 and self.cuda
            else nullcontext()
        )
        # what the loop does for this optimizer comes from its registry traits, not its name
        self.optimizer_spec = optimizer_spec(cfg.optimizer)
        self.balanced = self.optimizer_spec.task_weights
        self.hierarchical = self.optimizer_spec.scale_tasks
        # The TRAIN_SUMS columns of this run (the scale tasks exist in Phase 3 only), and one
        # buffer that every step's values are stacked into (no per-step allocation).
        self.sum_columns = [c for c in TRAIN_SUMS if self.hierarchical or c not in SEED_TASK_NAMES]
        self._sum_keys = [TRAIN_SUMS[c] for c in self.sum_columns]
        self._step_values = torch.zeros(len(self.sum_columns), device=self.device)

    # -- data (scanned before the model is built: bad data fails before any work)
    def open_data(self) -> None:
        cfg = self.cfg
        self.train_set = data.open_image_set(
            cfg.train_data, "train", "train_data", cfg.skip_bad_images, min_size=cfg.patch_size
        )
        self.val_set = data.open_image_set(cfg.val_data, "val", "val_data", cfg.skip_bad_images)
        self.val_set = validation.check_validation_images(self.val_set, cfg)  # decoded, sized
        self.steps_per_epoch = math.ceil(len(self.train_set) / cfg.batch_size)
        self.total_steps = cfg.steps or cfg.epochs * self.steps_per_epoch

    # -- model, objective, optimizer, schedules
    def build(self, state: dict[str, Any] | None) -> None:
        cfg = self.cfg
        checkpointing.seed_everything(cfg.seed)
        if state is None and cfg.init_checkpoint:
            # Phase 2 fine-tuning: official raw state dicts and project files alike; fresh
            # optimizer.
            self.model = checkpointing.load_initial_model(cfg.init_checkpoint, cfg.model)
        else:
            self.model = models.build_model(cfg.model)
        if cfg.patch_size % self.model.pad_multiple:
            raise run_config.ConfigError(
                f"run config: key 'patch_size' = {cfg.patch_size!r}: must be a multiple of "
                f"{self.model.pad_multiple} for model {cfg.model!r}"
            )
        self.model.to(self.device)
        if cfg.threads:  # one per job when jobs share the cores (docs/speed.md)
            torch.set_num_threads(cfg.threads)
        # channels_last: CUDA by default; on CPU the run key (oneDNN convolutions, docs/speed.md)
        self.channels_last = cfg.memory_format == "channels_last" or (
            cfg.memory_format == "auto" and self.cuda
        )
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self.model.train()
        self.ema = build_ema(self.model, cfg.ema_decay)  # before restore(), which loads its state
        self.model.noise_shard = (self.processes.rank, self.processes.world_size)
        # compile: forward and loss of a training step go through torch.compile; self.model stays
        # the eager module (state-dict names without ``_orig_mod.``, checkpoints, validation, coder
        # tables)
        self._forward_and_loss = self.forward_and_loss
        if cfg.compile:
            # inductor's own RNG would draw other quantisation noise than eager (same seed, other
            # numbers); torch's generator keeps compiled training on eager's noise and resumable
            from torch._inductor import (
                config as inductor_config,  # here: only compiled runs load inductor
            )

            inductor_config.fallback_random = True
            self._forward_and_loss = torch.compile(self.forward_and_loss)

        self.decomposition = (
            losses.build_decomposition(cfg.decomposition, cfg.lmbda, cfg.distortion).to(self.device)
            if self.hierarchical
            else None
        )
        params = list(self.model.parameters())
        extra = []
        if self.decomposition is not None and hasattr(self.decomposition, "ratio_parameters"):
            extra = list(
                self.decomposition.ratio_parameters()
            )  # the seed's learnable ratios train with the model
        params += extra
        # Phase 4 (hpcm.train.phase4): one optimizer param group per parameter group, with its lr
        # ratio
        self.phase4 = (
            phase4.Phase4(self.model, cfg, self.total_steps, extra)
            if phase4.is_active(cfg)
            else None
        )
        # CUDA: the skip decisions stay on the device (no host sync per step)
        self.optimizer = optim.build_optimizer(
            cfg.optimizer,
            params if self.phase4 is None else self.phase4.optimizer_groups(),
            cfg.lr,
            gamma=cfg.gamma,
            w_lr=cfg.w_lr,
            max_norm=cfg.clip_max_norm,
            update_mode=cfg.update_mode,
            gammas=cfg.gammas,
            scale_weights=cfg.scale_weights,
            sync_free=self.sync_free,
        )
        self.params = params
        self.gamma_schedule = (
            schedules.GammaSchedule(
                cfg.gamma_schedule,
                cfg.gamma,
                cfg.gamma_final,
                self.total_steps,
                warmup=cfg.gamma_warmup,
                milestones=cfg.gamma_step_milestones,
                factor=cfg.gamma_step_factor,
            )
            if self.optimizer_spec.gamma_schedule == "single"
            else None
        )
        self.gamma_manager = (
            schedules.ScaleGammaManager(
                cfg.gammas,
                cfg.gamma_strategy,
                total_epochs=self.total_steps,
                final_gammas=cfg.gammas_final,
            )
            if self.optimizer_spec.gamma_schedule == "per_scale"
            else None
        )

        # bookkeeping restored from a checkpoint
        self.step = 0
        self.best_val_loss = math.inf
        self.pending_row: dict[str, Any] | None = None  # hpcm.train.validation: a failed one's row
        self.skipped = torch.zeros((), device=self.device)  # skipped steps of adam / cautious_adam
        self.epoch_scale_losses = torch.zeros(
            3, device=self.device
        )  # adaptive gamma strategy input
        if state is not None:
            self.restore(state)
        if self.gamma_manager is not None and self.gamma_manager.strategy == "fixed":
            # Constant gammas: set once here (after a restore too) instead of every step.
            self.optimizer.set_scale_gammas(*self.gamma_manager.step(0).values())

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.decomposition is not None:
            self.decomposition.load_state_dict(state["decomposition"])
        if self.gamma_manager is not None:
            self.gamma_manager.load_state_dict(state["gamma_manager"])
        if self.gamma_schedule is not None and state.get("gamma_schedule") is not None:
            self.gamma_schedule.load_state_dict(
                state["gamma_schedule"]
            )  # adaptive's validation losses
        if self.phase4 is not None:
            self.phase4.load_state_dict(state["phase4"])
        self.step = int(state["step"])
        self.best_val_loss = float(state["best_val_loss"])
        self.pending_row = validation.pending_row(state)
        self.skipped.fill_(float(state["skipped_steps"]))
        self.epoch_scale_losses.copy_(state["epoch_scale_losses"].to(self.device))
        checkpointing.set_rng_state(state["rng"])

    def training_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch(self.step),
            "total_steps": self.total_steps,
            "config": self.cfg.as_dict(),
            "hpcm_version": hpcm.__version__,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "decomposition": None
            if self.decomposition is None
            else self.decomposition.state_dict(),
            "gamma_manager": None
            if self.gamma_manager is None
            else self.gamma_manager.state_dict(),
            "gamma_schedule": None
            if self.gamma_schedule is None
            else self.gamma_schedule.state_dict(),
            "phase4": None if self.phase4 is None else self.phase4.state_dict(),
            "lr": self.lr_at(
                self.step + 1
            ),  # the schedule is a pure function of step; kept for readers
            "best_val_loss": self.best_val_loss,
            "skipped_steps": self.skipped_steps(),
            "epoch_scale_losses": self.epoch_scale_losses.detach().cpu(),
            "data_sampler": {"seed": self.cfg.seed, "next_step": self.step + 1},
            "rng": checkpointing.rng_state(),
            validation.PENDING_KEY: self.pending_row,
        }

    # -- schedules (pure functions of the step)
    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        return schedules.lr_at(step - 1, self.total_steps, cfg.lr, cfg.lr_milestones, cfg.lr_values)

    def epoch(self, step: int) -> int:
        return data.epoch_of(step, self.cfg.batch_size, len(self.train_set))

    def adapt_gammas_at_epoch_end(self, step: int) -> None:
        """The adaptive strategy moves once per epoch on the epoch's mean scale losses (as the
        seed)."""
        if self.gamma_manager is None or self.gamma_manager.strategy != "adaptive":
            return
        if step % self.steps_per_epoch and step != self.total_steps:
            return
        means = (self.epoch_scale_losses / self.steps_per_epoch).tolist()
        self.epoch_scale_losses.zero_()
        gammas = self.gamma_manager.step(step, dict(zip(SCALES, means)))
        self.optimizer.set_scale_gammas(*gammas.values())

    def skipped_steps(self) -> int:
        """Batches skipped for a non-finite gradient norm (or non-finite losses), so far."""
        if self.balanced:
            return int(self.optimizer.skipped_steps)
        return int(self.skipped.item())

    def stack_metrics(self, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """This step's values of ``sum_columns`` (float32), in a buffer reused by the next step."""
        try:
            return torch.stack(
                [metrics[key].detach() for key in self._sum_keys], out=self._step_values
            )
        except KeyError as error:
            raise KeyError(
                f"the loss of optimizer {self.cfg.optimizer!r} (decomposition "
                f"{self.cfg.decomposition!r}) returned no {error.args[0]!r}, needed for "
                "metrics.csv column(s) "
                f"{[c for c, k in zip(self.sum_columns, self._sum_keys) if k == error.args[0]]}; "
                f"it returned {sorted(metrics)}"
            ) from None

    # -- one optimisation step, from batch to optimizer
    def forward_and_loss(self, x: torch.Tensor) -> Objective:
        """Forward pass and loss: (metrics with "loss", the Balanced optimizers' task vector or
        None). The part of a step that torch.compile compiles when ``compile`` is on."""
        cfg = self.cfg
        with self.autocast:
            out = self.model(x)
        if cfg.bf16 and self.cuda:  # losses and bit counts in float32, whatever autocast produced
            out = {
                "x_hat": out["x_hat"].float(),
                "likelihoods": {k: v.float() for k, v in out["likelihoods"].items()},
            }
        if self.decomposition is not None:  # Phase 3: the 5 scale tasks
            y = out["likelihoods"]["y"]
            bits = self.model.scale_bits(y) if cfg.decomposition == "measured" else None
            tasks, metrics = self.decomposition(out, x, scale_bits=bits)
            return metrics, tasks
        metrics = losses.rate_distortion(out, x, cfg.lmbda, cfg.distortion)
        tasks = torch.stack([metrics["distortion"], metrics["bpp_loss"]]) if self.balanced else None
        return metrics, tasks

    def batch_on_device(self, x: torch.Tensor) -> torch.Tensor:
        """The batch on the run's device, in the model's memory format."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train_step(self, step: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Optimizer step ``step`` (1-based) on the batch ``x``; returns the loss dict (metrics)."""
        optimizer, processes = self.optimizer, self.processes
        # schedules (pure functions of the step): lr x Phase 4 ratios, Phase 4 freezing, gamma(s)
        schedules.set_lr(optimizer, self.lr_at(step))
        if self.phase4 is not None:
            self.phase4.apply(step)
        if self.gamma_schedule is not None:
            self.gamma_schedule.apply(optimizer, step - 1)
        manager = self.gamma_manager
        if manager is not None and manager.strategy not in ("adaptive", "fixed"):
            optimizer.set_scale_gammas(*manager.step(step - 1).values())
        x = self.batch_on_device(x)
        # the R-D objective of this batch, averaged over the processes (one pass with autograd)
        objective = lambda: processes.mean_over_ranks(*self._forward_and_loss(x))  # noqa: E731
        optimizer.zero_grad(set_to_none=True)
        if self.phase4 is not None and not self.phase4.any_trainable:
            with torch.no_grad():  # Phase 4 stopped every group: the weights stay as they are
                metrics = objective()[0]
        else:
            metrics, tasks = objective()
            # backward, gradient mean over ranks, clip, step (skipped if not finite); reevaluate:
            skipped = optim.backward_and_step(  # the second no-grad forward of same_batch
                optimizer,
                self.params,
                metrics["loss"],
                tasks,
                max_norm=self.cfg.clip_max_norm,
                reevaluate=lambda: objective()[1],
                average_gradients=processes.average_gradients if processes.enabled else None,
            )
            if skipped is not None:  # adam / cautious_adam; the Balanced optimizers count their own
                self.skipped += skipped
            if self.hierarchical:  # the adaptive gamma strategy's input (adapt_gammas_at_epoch_end)
                self.epoch_scale_losses += scale_losses(metrics)
        # every step, skipped and frozen ones too: no host sync, and the average still converges
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return metrics

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validated and exported (epoch_best, snapshots): the moving average when
        ema_decay > 0."""
        return self.model if self.ema is None else self.ema.module

    # -- validation on full images (padded to the model multiple), estimated rate
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        model = self.eval_model
        model.eval()
        columns = {
            "val_loss": "loss",
            "val_distortion": "distortion",
            "val_bpp": "bpp_loss",
            "val_psnr": "psnr",
            "val_mse": "mse",
            "val_y_bpp": "y_bpp",
            "val_z_bpp": "z_bpp",
        }
        sums = torch.zeros(len(columns) + len(SCALES), device=self.device)
        count = 0
        for _, x in data.validation_images(self.val_set, self.cfg.skip_bad_images):
            x = x.to(self.device)
            padded, pad = models.pad_image(x, model.pad_multiple)
            if self.channels_last:
                padded = padded.contiguous(memory_format=torch.channels_last)
            with self.autocast:
                out = model(padded)
            out = {
                "x_hat": models.crop_image(out["x_hat"], pad).float(),
                "likelihoods": out["likelihoods"],
            }
            rd = losses.rate_distortion(
                out, x, self.cfg.lmbda, self.cfg.distortion
            )  # bpp over the original pixels
            # the y rate of each scale's elements (HPCM.scale_bits), over the same pixels as y_bpp
            scale_bpp = model.scale_bits(out["likelihoods"]["y"].float()).sum(0) / (
                x.shape[0] * x.shape[2] * x.shape[3]
            )
            sums += torch.cat(
                [torch.stack([rd[key] for key in columns.values()]).float(), scale_bpp.float()]
            )
            count += 1
        model.train()
        if count == 0:
            raise data.ImageError(
                f"no readable validation image in val_data = {self.cfg.val_data!r}"
            )
        return dict(zip([*columns, *(f"val_{s}_bpp" for s in SCALES)], (sums / count).tolist()))

    # -- reporting
    def weight_columns(self) -> dict[str, Any]:
        row: dict[str, Any] = {}
        if not self.balanced:
            return row
        weights = self.optimizer.get_task_weights()
        if self.hierarchical:
            row.update({f"task_weight_{t}": v for t, v in weights.items()})
            row.update({f"gamma_{s}": v for s, v in self.optimizer.scale_gammas.items()})
            row.update(
                {
                    f"scale_contribution_{s}": v
                    for s, v in self.optimizer.get_scale_contributions().items()
                }
            )
        else:
            row.update(
                {
                    "task_weight_distortion": weights["distortion"],
                    "task_weight_bpp": weights["bpp"],
                    "gamma": self.optimizer.gamma,
                }
            )
        return row

    def phase4_columns(self) -> dict[str, Any]:
        return {} if self.phase4 is None else self.phase4.columns()


# ----------------------------------------------------------------------------- the training loop


def save_checkpoint(run: Run) -> None:
    if run.processes.is_writer:  # every rank holds the same state
        checkpointing.save_training_state(run.out, run.training_state())


def save_snapshot(run: Run, step: int) -> None:
    """epoch_<step>.pth.tar of the model that validation uses (+ the Balanced state)."""
    balanced_state = run.optimizer.save_state if run.balanced else None
    checkpointing.save_snapshot(
        run.eval_model,
        run.out,
        step,
        checkpointing.run_labels(run.cfg),
        keep=run.cfg.snapshot_keep,
        save_balanced_state=balanced_state,
    )


def save_best(run: Run) -> None:
    if run.processes.is_writer:  # balanced optimizers: also the seed's balanced_state_best.pth
        balanced_state = run.optimizer.save_state if run.balanced else None
        checkpointing.save_best_model(
            run.eval_model,
            run.out,
            checkpointing.run_labels(run.cfg),
            save_balanced_state=balanced_state,
        )


class LogWindow:
    """Sums of the run's TRAIN_SUMS metrics, then of loss**2 (for loss_std), since the last logged
    row.

    Kept on the device: the only host sync is the ``.tolist()`` of a logged step. float64 so that
    the variance (mean of squares minus squared mean) does not cancel away over long windows; the
    float32 step values are added (and the loss squared) in float64 by type promotion, in place.
    """

    def __init__(self, run: Run):
        self.run = run
        self.sums = torch.zeros(len(run.sum_columns) + 1, dtype=torch.float64, device=run.device)
        self.steps, self.start = 0, time.perf_counter()
        # skipped steps at the last row; the last logged step whose window skipped less than
        # DIVERGED_SHARE of its batches, and the skipped steps then
        self.skipped = run.skipped_steps()
        self.healthy_step, self.skipped_when_healthy = run.step, self.skipped

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        stacked = self.run.stack_metrics(metrics)
        self.sums[:-1] += stacked
        self.sums[-1:].addcmul_(stacked[:1], stacked[:1])  # TRAIN_SUMS starts with the loss
        self.steps += 1

    def row(self, step: int, lr: float) -> dict[str, Any]:
        """The metrics.csv row of this window (means, loss spread, skips, step time); starts a new
        window."""
        run, now = self.run, time.perf_counter()
        *window_means, mean_square = (self.sums / self.steps).tolist()
        means = dict(zip(run.sum_columns, window_means))
        # std (ddof=0) of the per-step losses of this window, and its size, so that
        # hpcm.analysis.tables pools the per-step spread exactly (the row's loss is only a mean).
        loss_std = math.sqrt(max(mean_square - means["loss"] ** 2, 0.0))
        row = {
            "step": step,
            "epoch": run.epoch(step),
            "lr": lr,
            **means,
            "loss_std": loss_std,
            "loss_steps": self.steps,
            "skipped_steps": run.skipped_steps(),
            "step_time": (now - self.start) / self.steps,
            **run.weight_columns(),
            **run.phase4_columns(),
        }
        skipped_now, self.skipped = row["skipped_steps"] - self.skipped, row["skipped_steps"]
        if skipped_now < DIVERGED_SHARE * self.steps:
            self.healthy_step, self.skipped_when_healthy = step, self.skipped
        self.sums.zero_()
        self.steps, self.start = 0, now
        return row

    def diverged(self, step: int) -> bool:
        """At a logged ``step``: did every window of the last DIVERGED_AFTER_STEPS steps or more
        skip DIVERGED_SHARE of its batches?"""
        return step - self.healthy_step >= DIVERGED_AFTER_STEPS

    def restart_clock(self) -> None:
        """Validation time is not step time."""
        self.start = time.perf_counter()


def validate_and_keep_best(run: Run) -> dict[str, float]:
    # every rank validates; rank 0's numbers decide for all (the same model, but kernels may differ)
    val = run.processes.from_rank0(run.validate())
    if run.gamma_schedule is not None:
        run.gamma_schedule.observe(val["val_loss"])  # the adaptive gamma schedule's input
    if run.phase4 is not None:
        stopping = run.phase4.observe_validation(run.step, val)
        if stopping and run.processes.is_writer:
            print_err(
                f"step {run.step}: scale(s) {', '.join(stopping)} stopped improving their "
                f"validation rate for {run.cfg.scale_early_stop_patience} validations; their "
                "context parameters stop"
            )
    if val["val_loss"] < run.best_val_loss:
        run.best_val_loss = val["val_loss"]
        save_best(run)
    return val


def finish_pending_validation(
    run: Run, metrics_csv: MetricsCSV | None, wandb_logger: WandbLogger | None
) -> None:
    """Validate the step whose validation failed before the resume, log its whole row, save
    (hpcm.train.validation); the snapshot that the step would then have written, too."""
    step = run.step
    if run.processes.is_writer:
        print_err(f"step {step}: validating again (its validation failed before the resume)")
    row = {**run.pending_row, **validate_and_keep_best(run)}
    run.pending_row = None
    if run.processes.is_writer:
        if run.cfg.snapshot_every and step % run.cfg.snapshot_every == 0:
            save_snapshot(run, step)
        metrics_csv.write(row)
        wandb_logger.log(row, step)
        if run.cfg.quiet:
            print_err(log_line(row, run.total_steps))
    save_checkpoint(run)


def train(run: Run, stop: StopFlag) -> int:
    cfg, out, processes = run.cfg, run.out, run.processes
    start_step = run.step
    writer = processes.is_writer  # rank 0 alone writes the run folder and the log
    metrics_csv = MetricsCSV(out / METRICS_CSV, resume_step=start_step) if writer else None
    wandb_logger = (
        WandbLogger(cfg, out, {**cfg.as_dict(), "total_steps": run.total_steps}) if writer else None
    )
    loader = data.train_loader(
        run.train_set,
        cfg.patch_size,
        cfg.batch_size,
        cfg.seed,
        run.total_steps,
        start_step=start_step,
        num_workers=cfg.num_workers,
        skip_bad_images=cfg.skip_bad_images,
        pin_memory=run.cuda,
        rank=processes.rank,
        world_size=processes.world_size,
    )
    bar = tqdm(
        total=run.total_steps,
        initial=start_step,
        disable=cfg.quiet or not writer,
        desc=f"{cfg.variant} lmbda={cfg.lmbda}",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    window = LogWindow(run)
    exit_code = EXIT_CRASH
    try:
        if run.pending_row is not None:  # the validation a stopped run still owes comes first
            finish_pending_validation(run, metrics_csv, wandb_logger)
            window.restart_clock()
        for x in loader:
            step = run.step + 1
            window.add(run.train_step(step, x))
            run.step = step
            lr = run.lr_at(step)
            run.adapt_gammas_at_epoch_end(step)
            bar.update(1)

            last, stopping = (
                step == run.total_steps,
                processes.agree_to_stop(stop.signum is not None, step),
            )
            row = window.row(step, lr) if step % cfg.log_every == 0 or last or stopping else None
            if row is not None and window.diverged(step):
                healthy = window.healthy_step
                skipped = window.skipped - window.skipped_when_healthy
                message = (
                    f"{out}: {skipped} of the {step - healthy} batches after "
                    f"step {healthy} were skipped (loss or gradient not finite): the run diverged "
                    f"at lr {lr:g}, clip_max_norm {cfg.clip_max_norm}, and stopped at step {step}. "
                    f"Checkpoints from step {healthy} on may hold the diverged weights. Lower "
                    "`lr` (or the lambda), delete the run folder and start the run again"
                )
                if writer:
                    metrics_csv.write(row)
                    atomic_write_text(out / DIVERGED_MARKER, message + "\n")
                raise Diverged(message)
            validating = step % cfg.val_every == 0 or last
            if validating:  # the row so far is kept in the checkpoint if validation fails
                run.pending_row = row or {
                    "step": step,
                    "epoch": run.epoch(step),
                    "lr": lr,
                    **run.phase4_columns(),
                }
                row = {**run.pending_row, **validate_and_keep_best(run)}
                run.pending_row = None
                window.restart_clock()
            if cfg.snapshot_every and step % cfg.snapshot_every == 0 and writer:
                save_snapshot(run, step)
                window.restart_clock()
            if row is not None and writer:
                metrics_csv.write(row)
                wandb_logger.log(row, step)
                if "loss" in row:  # validation-only rows carry no training loss
                    bar.set_postfix(
                        loss=f"{row['loss']:.4f}",
                        bpp=f"{row['bpp']:.4f}",
                        psnr=f"{row['psnr']:.2f}",
                        refresh=False,
                    )
                if cfg.quiet:
                    print_err(log_line(row, run.total_steps))
            if (
                validating or not processes.enabled
            ):  # again: a signal may have come during validation
                stopping = processes.agree_to_stop(stop.signum is not None, step, force=True)
            if step % cfg.checkpoint_every == 0 or last or stopping:
                save_checkpoint(run)
            if stopping and not last:
                # no rank exits (torchrun then stops the others) before rank 0 has saved
                processes.barrier()
                cause = (
                    f"received {signal.Signals(stop.signum).name}"
                    if stop.signum
                    else "another rank was signalled"
                )
                print_err(
                    f"{cause}: checkpoint saved at step {step}; "
                    f"re-run the same command to resume (exit code {EXIT_INTERRUPTED})"
                )
                exit_code = EXIT_INTERRUPTED
                return exit_code
        if run.step < run.total_steps:  # the loader ended early: should not happen
            raise RuntimeError(f"data loader stopped at step {run.step} of {run.total_steps}")
        if writer and not (out / checkpointing.BEST_MODEL).exists():  # e.g. val loss never finite
            save_best(run)
        if writer:
            atomic_write_text(
                out / DONE_MARKER,
                f"finished {run.total_steps} steps; best val loss {run.best_val_loss!r}\n",
            )
        processes.barrier()  # the run is finished for every rank once rank 0 wrote done
        exit_code = EXIT_OK
        return exit_code
    except data.ImageError:
        # Raised while fetching the next batch: every finished step is consistent, keep them.
        if run.step > start_step:
            save_checkpoint(run)
        raise
    finally:
        bar.close()
        if writer:
            metrics_csv.close()
            wandb_logger.finish(
                exit_code=0 if exit_code in (EXIT_OK, EXIT_INTERRUPTED) else exit_code
            )


def run_training(cfg: RunConfig, out: Path) -> int:
    """Resume or start the run in ``out``, holding its lock (one writer per folder); the exit
    code."""
    if out.exists() and not out.is_dir():
        print_err(
            f"error: --output-dir {out} is a file, not a directory; pass a directory (created if "
            "missing)"
        )
        return EXIT_CONFIG
    try:
        processes = distributed.Processes.start(
            cfg, pick_device(cfg.device, "run config: key 'device'")
        )
    except (run_config.ConfigError, DeviceUnavailableError) as exc:
        print_err(f"error: {exc}")
        return EXIT_CONFIG
    try:
        out.mkdir(parents=True, exist_ok=True)
        with run_lock.hold_run_folder_for_all_ranks(out, processes):  # rank 0 holds it for all
            return _run_locked(cfg, out, processes)
    except run_lock.RunFolderUnavailable as exc:
        print_err(f"error: {exc}")
        return EXIT_CONFIG
    except distributed.CollectiveFailed as exc:
        print_err(
            f"error: {exc}\nthe last saved checkpoint is intact; re-run the same command to resume"
        )
        return EXIT_CRASH
    finally:
        processes.close()


def _run_locked(
    cfg: RunConfig, out: Path, processes: distributed.Processes = distributed.SINGLE_PROCESS
) -> int:
    if (out / DIVERGED_MARKER).exists():  # resuming would diverge again, or go on from bad weights
        print_err(f"error: refusing to resume: {(out / DIVERGED_MARKER).read_text().strip()}")
        return EXIT_CONFIG
    if (out / DONE_MARKER).exists():
        # Compare first: a changed experiment key must fail as it does for an unfinished run, not
        # report "nothing to do" for a model this folder does not hold.
        try:
            problem = run_config.resume_mismatch(checkpointing.finished_run_config(out), cfg)
        except checkpointing.CheckpointCorruptError as exc:
            problem = str(exc)
        if problem:
            print_err(f"error: {out} is finished with another config: {problem}")
            return EXIT_CONFIG
        print_err(f"{out} is finished ({DONE_MARKER} exists, same config); nothing to do")
        return EXIT_OK
    with StopFlag() as stop:
        try:
            run = Run(cfg, out, processes)
            run.open_data()
            state = checkpointing.state_to_resume(out, cfg, run.total_steps, len(run.train_set))
            run.build(state)
        except (
            run_config.ConfigError,
            DeviceUnavailableError,
            data.DataConfigError,
            data.ImageError,
            models.CheckpointError,
            checkpointing.CheckpointCorruptError,
        ) as exc:
            print_err(f"error: {exc}")
            return EXIT_CONFIG
        resumed = 0 if state is None else run.step
        if state is not None:
            print_err(f"resuming {out} from step {run.step} ({state['_path']})")
        if processes.is_writer:
            write_run_yaml(
                out,
                cfg,
                device=str(run.device),
                total_steps=run.total_steps,
                steps_per_epoch=run.steps_per_epoch,
                train_images=len(run.train_set),
                val_images=len(run.val_set),
                resumed_from_step=resumed,
                world_size=processes.world_size,
            )
        try:
            return train(run, stop)
        except Diverged as exc:
            print_err(f"error: {exc}")
            return EXIT_CRASH
        except data.ImageError as exc:  # an image that became unreadable mid-run
            if (out / checkpointing.CHECKPOINT_LAST).exists():
                advice = (
                    f"training state saved at step {run.step}; fix or remove the image (or set "
                    "skip_bad_images) and re-run the same command to resume"
                )
            else:  # failed before the first checkpoint: there is nothing to resume from
                advice = (
                    "nothing was saved (no step finished); fix or remove the image (or set "
                    "skip_bad_images) and run the command again"
                )
            print_err(f"error: {exc}\n{advice}")
            return EXIT_CONFIG


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hpcm.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one (variant, lambda) HPCM run; re-run the same command to resume.",
        epilog=run_config.help_text()
        + f"\n\nexit codes: {EXIT_OK} finished (or already finished), {EXIT_CONFIG} bad command "
        "line/config/data (nothing done; or no readable checkpoint, an image unreadable "
        f"mid-run after saving the state, or a run folder marked {DIVERGED_MARKER!r}), "
        f"{EXIT_INTERRUPTED} stopped by SIGTERM/SIGINT after saving a checkpoint (re-run to "
        f"resume), {EXIT_CRASH} crash, or the run diverged (it writes {DIVERGED_MARKER!r}).",
    )
    parser.add_argument(
        "--config", help="run config YAML (flat key: value mapping); omitted = defaults only"
    )
    parser.add_argument(
        "--output-dir",
        required=True,
        help="run directory (created; resumed when it has a checkpoint)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run-config key (repeatable; the value is YAML, lists as [a,b])",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = run_config.load(args.config, args.overrides)
    except run_config.ConfigError as exc:
        print_err(f"error: {exc}")
        return EXIT_CONFIG
    return run_training(cfg, Path(args.output_dir))


if __name__ == "__main__":
    sys.exit(main())
