"""State of ``Balanced``: ``state_dict`` (torch layout + 'balancing') and the state files.

The layout is the one ``balanced_state_*.pth`` files and training checkpoints hold; keep it
stable (old files must load).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hpcm.optim.balanced_sync_free import SyncFreeFlags
from hpcm.util.io import atomic_torch_save


class BalancedStateFiles:
    """State dict and files of ``Balanced`` (a mixin placed before ``CautiousAdam``)."""

    def _balancing_state(self) -> dict:
        state = {
            "n_tasks": self.n_tasks,
            "task_names": list(self.task_names),
            "weighting": self.weighting,
            "update_mode": self.update_mode,
            "max_norm": self.max_norm,
            "w": self.w.detach().clone(),
            "w_optimizer_state": self.w_opt.state_dict(),
            "task_gammas": self.task_gammas.clone(),
            "min_losses": self.min_losses.clone(),
            "prev_loss": None if self.prev_loss is None else self.prev_loss.clone(),
            "qp_weights": self.qp_weights.clone(),
            "pending_update": self._pending_update if self._sf is None else bool(self._sf.pending),
            "last_step_skipped": self._last_step_skipped if self._sf is None else bool(self._sf.last_skipped),
            "skipped_steps": self.skipped_steps,
            "skipped_weight_updates": self.skipped_weight_updates,
        }
        if self._sf is not None and not bool(self._sf.prev_valid):
            state["prev_loss"] = None
        return state

    def state_dict(self) -> dict:
        """Model moments (torch layout) plus everything of the task weighting under 'balancing'."""
        state = super().state_dict()
        state["balancing"] = self._balancing_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("balancing", None)
        if extra is None:
            raise ValueError(
                "optimizer state has no 'balancing' entry: it was not saved by Balanced "
                "(a torch Adam state cannot resume Balanced; start a fresh optimizer instead)")
        for key, mine in (("n_tasks", self.n_tasks), ("weighting", self.weighting),
                          ("update_mode", self.update_mode)):
            if extra[key] != mine:
                raise ValueError(f"saved Balanced state has {key}={extra[key]!r}, this optimizer {mine!r}")
        super().load_state_dict(state_dict)
        self._load_balancing_state(extra)

    def _load_balancing_state(self, extra: dict) -> None:
        with torch.no_grad():
            self.w.copy_(extra["w"].to(self.device))
        self.w_opt.load_state_dict(extra["w_optimizer_state"])
        self.task_gammas = extra["task_gammas"].to(self.device).clone()
        self.min_losses = extra["min_losses"].to(self.device).clone()
        prev = extra["prev_loss"]
        self.prev_loss = None if prev is None else prev.to(self.device).clone()
        self.qp_weights = extra["qp_weights"].to(self.device).clone()
        self.max_norm = float(extra["max_norm"])
        self._pending_update = bool(extra["pending_update"])
        self._last_step_skipped = bool(extra["last_step_skipped"])
        self.skipped_steps = int(extra["skipped_steps"])
        self.skipped_weight_updates = int(extra["skipped_weight_updates"])
        if self._sf is not None:
            self._sf = SyncFreeFlags(self.device, self.n_tasks)
            self._sf.pending.fill_(self._pending_update)
            self._sf.last_skipped.fill_(self._last_step_skipped)
            self._sf.prev_valid.fill_(self.prev_loss is not None)
            if self.prev_loss is None:
                self.prev_loss = torch.zeros(self.n_tasks, device=self.device)

    def save_state(self, path: str | Path) -> None:
        """Atomically write ``state_dict()`` (the official ``balanced_state_*.pth`` role)."""
        atomic_torch_save(self.state_dict(), path)

    def load_state(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Balanced state file not found: {path}")
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as error:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"cannot read Balanced state {path}: {error}") from error
        self.load_state_dict(state)
