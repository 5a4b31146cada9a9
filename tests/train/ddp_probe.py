"""What the data-parallel equivalence tests look at inside a training run (test-only hooks).

``record_cautious_products()``: after every Cautious Adam step (``CautiousAdam._update_group``,
whatever update path ran), keep the product m * g of every stepped element (m: the updated first
moment, g: the clipped gradient it was computed from) and the step's change of the parameter. The
product's sign is the Cautious mask phi = 1[m * g > 0] of research/balanced.md section 2.4,
computed here by the same one rounded multiply as every update path (the mask is not stored by
the optimizer). Also kept: the stepped parameters after the last step, flattened in the same
order, and the sizes of their tensors.

``train_in_float64()``: default dtype float64 (parameters, noise, task logits) and the model's
input cast to it by a forward pre-hook; the data pipeline's float32 images are exact in float64.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from hpcm.optim.cautious_adam import CautiousAdam
from hpcm.train import loop


@contextlib.contextmanager
def record_cautious_products(path: Path | None):
    """Within: every Cautious Adam step of the process appends its products; at the end they are
    saved to ``path`` (None: not recorded) as {"steps": [{"product", "delta"} per step], "final":
    params, "numels": [...]}, each a flat tensor over the stepped parameters (a group's order)."""
    steps: list[dict] = []  # one entry per step of a one-group optimizer (all of this study's)
    kept: dict = {}
    real = CautiousAdam._update_group

    def update_and_record(self, group: dict, *args, **kwargs) -> None:
        assert len(self.param_groups) == 1, "the record keeps one group's elements per step"
        stepped = [p for p in group["params"] if p.grad is not None]
        before = torch.cat([p.detach().flatten() for p in stepped])
        real(self, group, *args, **kwargs)
        after = torch.cat([p.detach().flatten() for p in stepped])
        steps.append(
            {
                "product": torch.cat(
                    [(self.state[p]["exp_avg"] * p.grad).flatten() for p in stepped]
                ),
                "delta": after - before,
            }
        )
        kept["final"] = after
        kept["numels"] = [p.numel() for p in stepped]

    if path is None:
        yield
        return
    CautiousAdam._update_group = update_and_record
    try:
        yield
    finally:
        CautiousAdam._update_group = real
    torch.save({"steps": steps, **kept}, path)


@contextlib.contextmanager
def train_in_float64():
    previous, real_build = torch.get_default_dtype(), loop.models.build_model

    def build_in_float64(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: tuple(x.double() for x in inputs))
        return model

    torch.set_default_dtype(torch.float64)
    loop.models.build_model = build_in_float64
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
        loop.models.build_model = real_build
