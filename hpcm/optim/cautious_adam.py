r"""Cautious Adam: Adam whose update is masked where momentum and gradient disagree in sign.

This is the parameter update of the official Balanced R-D code (``Balanced.step`` in
``balanced-rd/train_balanced.py``), see ``research/balanced.md`` section 2.4. The algorithm, per
tensor theta with gradient g at step t (lr, betas b1 b2, eps, weight decay wd)::

    theta <- theta * (1 - lr * wd)                      (decoupled weight decay)
    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    denom = sqrt(v) / sqrt(1 - b2^t) + eps              (sqrt(max v) with amsgrad)
    phi = 1[m * g > 0]                                   (m is the *updated* moment)
    s = min(1 / max(mean(phi), 1e-3), 10)                (mean over the whole tensor)
    theta <- theta - lr / (1 - b1^t) * (m * phi * s) / denom

The mask is not written back into m. fp16/bf16 gradients are cast to fp32 first. The step
counter is a Python int per parameter, as in the official code, so ``state_dict`` round trips
exactly (with ``sync_free=True`` it is a float32 device tensor). ``cautious=False`` turns the
mask off, which leaves plain Adam with the same bias correction (useful for the "FAMO weighting
with plain Adam" ablation).

As in torch's ``torch/optim/adam.py``, the class only collects the tensors of each param group;
the update is one of four functions with one signature ``(params, grads, exp_avgs, exp_avg_sqs,
max_exp_avg_sqs, state_steps, *, amsgrad, cautious, beta1, beta2, lr, weight_decay, eps)``,
chosen per bucket of tensors by ``CautiousAdam._update_group`` (the dispatch; the training loop
sees none of it), in this file from the definition down:

* ``single_tensor_update`` (``foreach=False``): the official per-tensor loop, the definition
  every other path is tested against bit for bit (tests/optim/test_speed_paths.py,
  test_cautious_native.py, test_sync_free.py);
* ``foreach_update``: the same maths in list kernels (CUDA default; CPU buckets at mixed steps);
* ``fused_update``: the C kernel of ``cautious_native`` (CPU default, ``fused=None/True``), used
  once it reproduces ``single_tensor_update`` on a probe (``native_library``);
* ``sync_free_update`` (``sync_free=True``, CUDA in ``hpcm.train``): the list kernels gated on
  the device by a 0-dim ``ok`` flag, with device step counters: no host synchronisation per step.
  It adds the keywords ``ok``, ``uniform_steps`` and ``max_step``.

``optimizer.step()`` on HPCM_Tiny (1.68 M parameters, 172 tensors), CPU, one thread, median of 7
rounds of min-of-10 (``python benchmarks/cautious_paths.py``):

    reference (foreach=False)    22.4 ms   1.00
    foreach (list kernels)       12.0 ms   0.54  (0.53..0.57)   CUDA; CPU buckets at mixed steps
    C kernel (cautious_native)    3.1 ms   0.14  (0.13..0.16)   CPU default (fused=None/True)
    sync_free                    29.1 ms   1.29  (1.21..1.48)   CUDA (hpcm.train): no host sync
    torch fused Adam              2.2 ms   0.10                 (yardstick: one pass)

sync_free is kept for CUDA, where its point is the absent per-step host synchronisation (not
measurable on this CPU; ``benchmarks/cautious_paths.py --device cuda`` times it there). On CPU its
0-dim device factors go through ATen's per-tensor fallbacks; on CUDA they are list kernels
(``benchmarks/sync_free_ops.py`` counts the ops).
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from hpcm.optim import cautious_native
from hpcm.optim.registry import register_optimizer

# Constants of the official code: the mask mean is clamped below, the rescale capped above.
MASK_MEAN_FLOOR = 1e-3
MASK_SCALE_CAP = 10.0
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class CautiousAdam(Optimizer):
    """Adam with the Cautious sign-agreement mask (official Balanced R-D variant)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        cautious: bool = True,
        foreach: bool | None = None,
        sync_free: bool = False,
        fused: bool | None = None,
    ):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate lr={lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon eps={eps}")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: betas={betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay={weight_decay}")
        if fused and (foreach is not None or sync_free):
            raise ValueError(
                f"fused=True (the CPU C kernel) excludes foreach={foreach!r} and "
                f"sync_free={sync_free!r}"
            )
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            cautious=cautious,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)
        if fused:
            devices = {p.device.type for g in self.param_groups for p in g["params"]}
            if devices != {"cpu"}:
                raise ValueError(
                    f"fused=True is the CPU C kernel; parameters are on {sorted(devices)}"
                )
            native_library()  # raises NativeKernelUnavailable with the reason, before any step
        # sync_free: skip decision, step counters and skip count stay on the device (see
        # ``sync_free_update``); the default keeps Python-int steps and host-side decisions.
        self.sync_free = bool(sync_free)
        self._step_bound: int | None = None  # an upper bound of every step counter (sync_free)
        # sync_free: per group, the parameters stepped last time, and whether their counters are
        # known (on the host) to be equal; None until the first step after construction or loading
        self._sf_members: dict[int, tuple[int, ...]] = {}
        self._sf_uniform: dict[int, bool] = {}
        self._skipped_device: torch.Tensor | None = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("cautious", True)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.sync_free:
            self.sync_free_step()
            return loss
        for group in self.param_groups:
            self._update_group(group)
        return loss

    def _update_group(self, group: dict) -> None:
        """Collect the group's tensors, advance their steps, and run one update path per bucket."""
        amsgrad = group["amsgrad"]
        params, grads, states = [], [], []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("CautiousAdam does not support sparse gradients")
            if grad.dtype in (torch.float16, torch.bfloat16):
                grad = grad.float()
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                for key in MOMENT_KEYS[: 3 if amsgrad else 2]:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(grad)
            states.append(state)
        if not params:
            return
        options = dict(
            amsgrad=amsgrad,
            cautious=group["cautious"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
        )
        if group["foreach"] is False:
            single_tensor_update(params, grads, *_moment_lists(states, amsgrad), **options)
            return
        # The list kernels need one device and one dtype across params, grads and moments.
        buckets: dict[tuple, list[int]] = {}
        for i, (p, g, state) in enumerate(zip(params, grads, states)):
            buckets.setdefault((p.device, p.dtype, g.dtype, state["exp_avg"].dtype), []).append(i)
        for (device, p_dtype, g_dtype, m_dtype), index in buckets.items():
            if len(buckets) == 1:
                bucket_params, bucket_grads, bucket_states = params, grads, states
            else:
                bucket_params, bucket_grads, bucket_states = (
                    [items[i] for i in index] for items in (params, grads, states)
                )
            moments = _moment_lists(bucket_states, amsgrad)
            steps = moments[-1]
            if not p_dtype == g_dtype == m_dtype:  # e.g. fp16 params with fp32 moments
                update = single_tensor_update
            elif (
                group["foreach"] is None
                and device.type == "cpu"
                and steps.count(steps[0]) == len(steps)
                and _kernel_serves(
                    group["fused"],
                    g_dtype,
                    [*bucket_params, *bucket_grads, *moments[0], *moments[1], *moments[2]],
                )
            ):
                update = fused_update
            else:
                update = foreach_update
            update(bucket_params, bucket_grads, *moments, **options)

    # ------------------------------------------------------------------ sync_free
    @property
    def skipped_steps_device(self) -> torch.Tensor:
        """sync_free: steps skipped for non-finite gradients, as a device tensor (no sync)."""
        if self._skipped_device is None:
            first = next(p for g in self.param_groups for p in g["params"])
            self._skipped_device = torch.zeros((), device=first.device)
        return self._skipped_device

    @torch.no_grad()
    def sync_free_step(
        self, ok: torch.Tensor | None = None, grads_are_finite: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One step decided on the device: applied where ``ok`` and every gradient is finite.

        ``grads_are_finite``: that second condition when the caller knows it already (from the
        clip's gradient norm); otherwise computed here. Returns the 0-dim bool ``ok`` actually
        used; the skip is counted in ``skipped_steps_device``. Nothing is read back to the host.
        """
        if grads_are_finite is None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            device = (
                grads[0].device
                if grads
                else next(p for g in self.param_groups for p in g["params"]).device
            )
            finite = grads_finite(grads, device)
        else:
            finite = grads_are_finite
        device = finite.device
        ok = finite if ok is None else (ok.to(device) & finite)
        self.skipped_steps_device.add_((~ok).float())
        if self._step_bound is None:  # once after construction or loading: one read
            self._step_bound = max(
                (int(s["step"]) for s in self.state.values() if "step" in s), default=0
            )
        self._step_bound += 1
        for number, group in enumerate(self.param_groups):
            self._sync_free_group(number, group, ok)
        return ok

    def _sync_free_group(self, number: int, group: dict, ok: torch.Tensor) -> None:
        params, grads, moments, steps, fresh = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("CautiousAdam does not support sparse gradients")
            if p.grad.dtype != p.dtype or p.dtype not in (torch.float32, torch.float64):
                raise RuntimeError(
                    f"sync_free CautiousAdam needs fp32/fp64 params and grads, got "
                    f"{p.dtype} / {p.grad.dtype}"
                )
            state = self.state[p]
            fresh.append(len(state) == 0)
            if len(state) == 0:
                state["step"] = torch.zeros((), device=p.device)
                for key in MOMENT_KEYS[: 3 if group["amsgrad"] else 2]:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif not torch.is_tensor(state["step"]):
                state["step"] = torch.tensor(float(state["step"]), device=p.device)
            params.append(p)
            grads.append(p.grad)
            moments.append(state)
            steps.append(state["step"])
        if not params:
            return
        uniform = self._steps_uniform(number, params, steps, fresh)
        okf = ok.to(steps[0].device).float()
        # a list of the same 0-dim flag: the Tensor-scalar overload reads it back on CPU (item)
        torch._foreach_add_(steps, [okf] * len(steps))
        buckets: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            buckets.setdefault((p.device, p.dtype), []).append(i)
        for (device, _), index in buckets.items():
            states = [moments[i] for i in index]
            sync_free_update(
                [params[i] for i in index],
                [grads[i] for i in index],
                *_moment_lists(states, group["amsgrad"]),
                ok=ok.to(device),
                uniform_steps=uniform,
                max_step=self._step_bound,
                amsgrad=group["amsgrad"],
                cautious=group["cautious"],
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
            )

    def _steps_uniform(
        self, number: int, params: list, steps: list[torch.Tensor], fresh: list[bool]
    ) -> bool:
        """Whether every counter of this step's parameters is equal, known on the host.

        Read from the device once (after construction or loading); then kept true while the same
        parameters are stepped together every time (each counter then grows by the same ``ok``).
        """
        members = tuple(id(p) for p in params)
        known = self._sf_uniform.get(number)
        if known is None:
            values = {int(s) for s, new in zip(steps, fresh) if not new}  # one read, once
            uniform = all(fresh) or (not any(fresh) and len(values) == 1)
        else:
            uniform = known and members == self._sf_members[number] and not any(fresh)
        self._sf_members[number], self._sf_uniform[number] = members, uniform
        return uniform

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._step_bound = None
        self._sf_members, self._sf_uniform = {}, {}
        for state in self.state.values():  # each mode keeps its own step type
            if "step" in state:
                step = state["step"]
                if self.sync_free and not torch.is_tensor(step):
                    state["step"] = torch.tensor(float(step), device=state["exp_avg"].device)
                elif not self.sync_free and torch.is_tensor(step):
                    state["step"] = int(step.item())


def _moment_lists(states: list[dict], amsgrad: bool) -> tuple[list, list, list, list]:
    """exp_avgs, exp_avg_sqs, max_exp_avg_sqs ([] without amsgrad) and steps, from the states."""
    return (
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
        [s["step"] for s in states],
    )


@register_optimizer("cautious_adam")
def build_cautious_adam(
    params: Iterable, lr: float, *, max_norm: float, min_losses: float, sync_free: bool
) -> CautiousAdam:
    del max_norm, min_losses  # clipped by backward_and_step; no task losses
    return CautiousAdam(params, lr=lr, sync_free=sync_free)


# ====================================================================== the update paths
def single_tensor_update(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_sqs,
    steps,
    *,
    amsgrad: bool,
    cautious: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
) -> None:
    """The definition: the official per-tensor loop, written out plainly."""
    for i, param in enumerate(params):
        grad, exp_avg, exp_avg_sq, step = grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i]
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        second = exp_avg_sq
        if amsgrad:
            torch.maximum(max_sqs[i], exp_avg_sq, out=max_sqs[i])
            second = max_sqs[i]
        denom = (second.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        step_size = lr / (1 - beta1**step)
        if cautious:
            mask = (exp_avg * grad > 0).to(grad.dtype)
            scale = (1 / mask.mean().clamp_(min=MASK_MEAN_FLOOR)).clamp_(max=MASK_SCALE_CAP)
            direction = exp_avg * (mask * scale)
        else:
            direction = exp_avg
        param.add_(direction / denom, alpha=-step_size)


def foreach_update(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_sqs,
    steps,
    *,
    amsgrad: bool,
    cautious: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    host_scales: bool | None = None,
) -> None:
    """Same maths on tensor lists: a few list kernels instead of ~10 launches per tensor.

    Bitwise equal to ``single_tensor_update`` on CPU: every element sees the same IEEE operations
    in the same order. (On an accelerator the final ``p += s * d`` is ``apply_step``'s two
    roundings, shared with the sync-free path; the per-tensor ``add(alpha=)`` may be fused
    there.) Two rewrites are exact: the mask mean is count/numel (a sum of 0/1 values is exact
    below 2^24 elements per tensor, as torch's mean is sum/numel), and m * (phi * s) is computed
    as (m * s) * phi (phi is exactly 0 or 1, so both round once).

    ``host_scales`` (default: on CPU only) reads the per-tensor rescales as Python floats, which
    is free on CPU and lets each rescale be a scalar argument; on an accelerator they stay on the
    device (no host synchronisation) and multiply as 0-dim tensors.
    """
    if host_scales is None:
        host_scales = params[0].device.type == "cpu"
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    if amsgrad:
        torch._foreach_maximum_(max_sqs, exp_avg_sqs)
    denom = torch._foreach_sqrt(max_sqs if amsgrad else exp_avg_sqs)
    # One scalar when every tensor is at the same step (the usual case): a scalar list costs a
    # wrapped-tensor copy per tensor on CPU.
    same_step = len(set(steps)) == 1
    torch._foreach_div_(
        denom,
        math.sqrt(1 - beta2 ** steps[0]) if same_step else [math.sqrt(1 - beta2**s) for s in steps],
    )
    torch._foreach_add_(denom, eps)
    direction = scale_direction(exp_avgs, grads, cautious=cautious, host_scales=host_scales)
    torch._foreach_div_(direction, denom)
    if same_step:
        apply_step(params, direction, -(lr / (1 - beta1 ** steps[0])))
    else:  # one call per distinct step
        for step in sorted(set(steps)):
            index = [i for i, s in enumerate(steps) if s == step]
            apply_step(
                [params[i] for i in index], [direction[i] for i in index], -(lr / (1 - beta1**step))
            )


@lru_cache(maxsize=64)
def element_counts(
    numels: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Per-tensor sizes on the device, built once: a fresh ``torch.tensor(..., device=cuda)``
    every step would be a blocking host-to-device copy (a synchronisation)."""
    return torch.tensor(numels, dtype=dtype, device=device)


def scale_direction(exp_avgs, grads, *, cautious: bool, host_scales: bool) -> list[torch.Tensor]:
    """m * phi * s per tensor (a new list): the Cautious mask and its rescale, or m itself.

    phi = 1[m*g > 0] is computed as clamp(sign(m*g), 0): exactly 0 or 1. ``host_scales`` reads
    the per-tensor rescales as Python floats (free on CPU); otherwise they stay on the device.
    """
    if not cautious:
        return torch._foreach_mul(exp_avgs, 1.0)
    mask = torch._foreach_mul(exp_avgs, grads)
    torch._foreach_sign_(mask)
    torch._foreach_clamp_min_(mask, 0.0)
    if host_scales:  # per-tensor sums are cheaper than the generic norm kernel on CPU
        counts = torch.stack([m.sum() for m in mask])
    else:  # the L1 norm of a 0/1 tensor is its count of ones (one fused kernel on CUDA)
        counts = torch.stack(torch._foreach_norm(mask, 1))
    numels = element_counts(tuple(m.numel() for m in mask), counts.dtype, counts.device)
    scales = (1 / (counts / numels).clamp_(min=MASK_MEAN_FLOOR)).clamp_(max=MASK_SCALE_CAP)
    direction = torch._foreach_mul(
        exp_avgs, scales.tolist() if host_scales else list(scales.unbind(0))
    )
    torch._foreach_mul_(direction, mask)
    return direction


def apply_step(
    params: list[torch.Tensor],
    direction: list[torch.Tensor],
    step_size: float | torch.Tensor | list[torch.Tensor],
) -> None:
    """params += step_size * direction, rounded the same way whatever form ``step_size`` takes.

    The host paths pass a Python float, the sync-free path a float32 device tensor (0-dim, or one
    per tensor). On CPU, ``add(alpha=s)`` and ``addcmul(d, s)`` round alike (one fused multiply-add
    where ATen's CPU capability has it, two roundings where it has not), as the per-tensor
    definition does. On an accelerator the compiler decides whether ``p + s * d`` inside one
    kernel is fused, and the two kernels need not agree; there both forms are two list kernels,
    ``d *= s`` then ``p += d`` (two roundings, the same on every path of that device).
    """
    if params[0].device.type == "cpu":
        if isinstance(step_size, float):
            torch._foreach_add_(params, direction, alpha=step_size)
        else:
            factors = step_size if isinstance(step_size, list) else [step_size] * len(params)
            torch._foreach_addcmul_(params, direction, factors)
        return
    if isinstance(step_size, float):
        step_size = torch.full((), step_size, dtype=direction[0].dtype, device=direction[0].device)
    torch._foreach_mul_(direction, step_size)
    torch._foreach_add_(params, direction)


# ---------------------------------------------------------------------- the C kernel (CPU)
def fused_update(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_sqs,
    steps,
    *,
    amsgrad: bool,
    cautious: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
) -> None:
    """The C kernel of ``cautious_native`` (contiguous float32 CPU tensors): both passes of every
    tensor in one call per distinct step, bitwise ``single_tensor_update`` (``native_library``)."""
    library = native_library()
    options = dict(
        amsgrad=amsgrad,
        cautious=cautious,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        mask_mean_floor=MASK_MEAN_FLOOR,
        mask_scale_cap=MASK_SCALE_CAP,
    )
    if steps.count(steps[0]) == len(steps):
        cautious_native.native_update(
            library, params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps[0], **options
        )
        return
    for step in sorted(set(steps)):
        index = [i for i, s in enumerate(steps) if s == step]
        pick = lambda items, index=index: [items[i] for i in index] if items else items  # noqa: E731
        cautious_native.native_update(
            library,
            pick(params),
            pick(grads),
            pick(exp_avgs),
            pick(exp_avg_sqs),
            pick(max_sqs),
            step,
            **options,
        )


@lru_cache(maxsize=1)
def native_library():
    """The kernel library once it reproduces ``single_tensor_update`` bit for bit on a probe;
    raises ``cautious_native.NativeKernelUnavailable`` with the reason otherwise.

    The kernel mirrors ATen's vectorised kernels (fused multiply-adds in ``add(alpha=)`` and
    ``addcmul``), which a CPU or build without them (ATen's DEFAULT capability) does not use.
    """
    library = cautious_native.load()
    shapes = [(1,), (7,), (33, 3), (1000,), (4099,)]
    options = dict(
        amsgrad=True, cautious=True, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.01, eps=1e-8
    )
    results = []
    for use_kernel in (False, True):
        params = [
            torch.randn(shape, generator=torch.Generator().manual_seed(i))
            for i, shape in enumerate(shapes)
        ]
        moments = [[torch.zeros_like(p) for p in params] for _ in MOMENT_KEYS]
        generator = torch.Generator().manual_seed(1)
        for step in range(1, 4):
            grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in params]
            for grad in grads:
                grad[::5] = 0.0
            if use_kernel:
                cautious_native.native_update(
                    library,
                    params,
                    grads,
                    *moments,
                    step,
                    mask_mean_floor=MASK_MEAN_FLOOR,
                    mask_scale_cap=MASK_SCALE_CAP,
                    **options,
                )
            else:
                single_tensor_update(params, grads, *moments, [step] * len(params), **options)
        tensors = (*params, *(m for ms in moments for m in ms))
        results.append(torch.cat([t.reshape(-1) for t in tensors]))
    if not torch.equal(*results):
        raise cautious_native.NativeKernelUnavailable(
            "the kernel does not reproduce torch's CPU arithmetic here (ATen CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}); the torch path keeps results exact"
        )
    return library


@lru_cache(maxsize=1)
def native_unavailable_reason() -> str | None:
    """None when the kernel serves; else why not (computed once per process)."""
    try:
        native_library()
    except cautious_native.NativeKernelUnavailable as error:
        return str(error)
    return None


_warned = False


def warn_fallback_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"hpcm: CautiousAdam uses the slower torch CPU path: {reason}",
            RuntimeWarning,
            stacklevel=4,
        )


def _kernel_serves(fused: bool | None, dtype: torch.dtype, tensors: list[torch.Tensor]) -> bool:
    """Whether a CPU bucket (one dtype, every step equal) takes the kernel; ``fused=True`` raises
    where it cannot, ``fused=None`` on float32 warns once and takes the list kernels."""
    reason = (
        "fused=False"
        if fused is False
        else (cautious_native.ineligible_reason(dtype, tensors) or native_unavailable_reason())
    )
    if reason is None:
        return True
    if fused:
        raise cautious_native.NativeKernelUnavailable(f"fused=True: {reason}")
    if fused is None and dtype == torch.float32:  # float64 has no kernel: not a fallback
        warn_fallback_once(reason)
    return False


# ---------------------------------------------------------------------- sync_free (no host sync)
def sync_free_update(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_sqs,
    steps,
    *,
    amsgrad: bool,
    cautious: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    ok: torch.Tensor,
    uniform_steps: bool,
    max_step: int,
) -> None:
    """``foreach_update`` applied only where the 0-dim device bool ``ok``: no host synchronisation.

    The host paths decide "skip this batch?" on the host (one ``.item()``) and keep the step
    counter as a Python int; on CUDA that sync stalls the launch queue every step. Here:

    * the update runs in place, with the host path's list kernels, and is gated through its
      inputs, not by saving and restoring the state: the gradients enter as ``where(ok, g, 0)``
      (one ``cat`` and one ``where`` over all of them, so a NaN cannot leak), the moment decays
      and the step size are ``where(ok, value, neutral)`` 0-dim tensors (1 for the decays, 0 for
      the step size and the weight decay). A skipped step therefore computes m*1 + 0, v*1 + 0,
      p*1 + 0*d: every value is unchanged (up to the sign of a zero). An applied step performs
      exactly the host path's operations on the same values;
    * ``steps`` are float32 0-dim device tensors (exact up to 2^24 steps), already advanced by
      ``ok``; ``max_step`` is an upper bound of them, known on the host;
    * the bias corrections are looked up, by that counter, in float64 tables computed on the host
      with Python's ``math`` (exactly the doubles of the host path), then rounded to float32 as
      the list kernels round a Python scalar. The table is extended (one host-to-device copy)
      when ``max_step`` outgrows it, which happens once per doubling;
    * ``uniform_steps``: the host knows every counter is equal, so one 0-dim factor serves the
      whole list and each list kernel takes its multi-tensor fast path on CUDA; otherwise (a
      resumed state at mixed steps, parameters without gradients at some steps) the factors are
      per tensor.

    The final ``p += step_size * direction`` is ``apply_step``, as in ``foreach_update``, so both
    round identically on every device.
    """
    device = params[0].device
    tables = _bias_tables(device, beta1, beta2)
    tables.ensure(max_step)
    constants = _gate_constants(device)

    def gate(value: float, neutral: float) -> torch.Tensor:
        return torch.where(ok, constants(value), constants(neutral))

    index = (steps[0].view(1) if uniform_steps else torch.stack(steps)).long()
    # the host path's double scalars, rounded to float32 the same way
    bc2 = tables.bc2_sqrt[index].float()
    step_size = torch.where(ok, (-(lr / tables.bc1[index])).float(), constants(0.0))
    if uniform_steps:
        bc2, step_size = bc2.view(()), step_size.view(())
    else:
        bc2, step_size = list(bc2.unbind(0)), list(step_size.unbind(0))
    grads = gated_gradients(grads, ok)
    if weight_decay != 0:
        torch._foreach_mul_(params, gate(1 - lr * weight_decay, 1.0))
    torch._foreach_mul_(exp_avgs, gate(beta1, 1.0))
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, gate(beta2, 1.0))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    if amsgrad:  # unchanged when skipped: max_sqs >= exp_avg_sqs already
        torch._foreach_maximum_(max_sqs, exp_avg_sqs)
    denom = torch._foreach_sqrt(max_sqs if amsgrad else exp_avg_sqs)
    torch._foreach_div_(denom, bc2)
    torch._foreach_add_(denom, eps)
    direction = scale_direction(exp_avgs, grads, cautious=cautious, host_scales=False)
    torch._foreach_div_(direction, denom)
    apply_step(params, direction, step_size)


TABLE_START = 1024


class BiasTables:
    """(1 - b1^k) and sqrt(1 - b2^k) for k = 0..size-1, in float64 on one device."""

    def __init__(self, beta1: float, beta2: float, device: torch.device):
        self.beta1, self.beta2, self.device = beta1, beta2, device
        self.size = 0
        self.bc1 = self.bc2_sqrt = None

    def ensure(self, max_step: int) -> None:
        if max_step < self.size:
            return
        size = max(TABLE_START, self.size)
        while size <= max_step:
            size *= 2
        steps = range(size)
        # step 0 never reaches an applied update (the counter is >= 1 when ok); 1.0 keeps it finite
        self.bc1 = torch.tensor(
            [1 - self.beta1**k if k else 1.0 for k in steps],
            dtype=torch.float64,
            device=self.device,
        )
        self.bc2_sqrt = torch.tensor(
            [math.sqrt(1 - self.beta2**k) if k else 1.0 for k in steps],
            dtype=torch.float64,
            device=self.device,
        )
        self.size = size


@lru_cache(maxsize=None)
def _bias_tables(device: torch.device, beta1: float, beta2: float) -> BiasTables:
    """One table per (device, betas), shared: its values depend on nothing else."""
    return BiasTables(beta1, beta2, device)


class GateConstants:
    """0-dim float32 constants on one device (built once: a fresh tensor per step is a copy)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._values: dict[float, torch.Tensor] = {}

    def __call__(self, value: float) -> torch.Tensor:
        tensor = self._values.get(value)
        if tensor is None:
            tensor = torch.full((), value, dtype=torch.float32, device=self.device)
            self._values[value] = tensor
        return tensor


@lru_cache(maxsize=None)
def _gate_constants(device: torch.device) -> GateConstants:
    return GateConstants(device)


def grads_finite(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-dim bool on ``device``: every element of every gradient is finite (no sync)."""
    if not grads:
        return torch.ones((), dtype=torch.bool, device=device)
    norms = torch._foreach_norm(grads, 2.0)  # a norm is finite exactly when every element is
    return torch.isfinite(torch.stack([n.float().to(device) for n in norms])).all()


def gated_gradients(grads: list[torch.Tensor], ok: torch.Tensor) -> list[torch.Tensor]:
    """``where(ok, g, 0)`` for every gradient, with each result strided as its gradient.

    One ``cat`` of the gradients in memory order and one ``where``; each result is a view of the
    flat buffer, permuted back to its gradient's layout (channels_last stays channels_last, so
    the list kernels keep their fast path).
    """
    orders = [memory_order(g) for g in grads]
    flat = torch.cat([g.permute(order).reshape(-1) for g, order in zip(grads, orders)])
    flat = torch.where(ok, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
    out = []
    for chunk, g, order in zip(flat.split([g.numel() for g in grads]), grads, orders):
        permuted_shape = [g.shape[d] for d in order]
        out.append(chunk.view(permuted_shape).permute(inverse(order)))
    return out


def memory_order(t: torch.Tensor) -> list[int]:
    """The dims of a dense tensor from outermost to innermost in memory (a contiguous order)."""
    if t.is_contiguous():
        return list(range(t.dim()))
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d]))
    if not t.permute(order).is_contiguous():
        raise RuntimeError(
            f"sync_free CautiousAdam needs dense gradients, got strides "
            f"{t.stride()} for shape {tuple(t.shape)}"
        )
    return order


def inverse(order: list[int]) -> list[int]:
    result = [0] * len(order)
    for position, dim in enumerate(order):
        result[dim] = position
    return result
