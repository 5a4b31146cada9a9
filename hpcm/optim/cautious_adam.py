"""Cautious Adam: Adam whose update is masked where momentum and gradient disagree in sign.

This is the parameter update of the official Balanced R-D code (``Balanced.step`` in
``balanced-rd/train_balanced.py``), see ``research/balanced.md`` section 2.4. Per tensor, at step t:

    theta <- theta * (1 - lr * wd)                      (decoupled weight decay)
    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    denom = sqrt(v) / sqrt(1 - b2^t) + eps              (sqrt(max v) with amsgrad)
    phi = 1[m * g > 0]                                   (m is the *updated* moment)
    s = min(1 / max(mean(phi), 1e-3), 10)                (mean over the whole tensor)
    theta <- theta - lr / (1 - b1^t) * (m * phi * s) / denom

The mask is not written back into m. fp16/bf16 gradients are cast to fp32 first. The step
counter is a Python int per parameter, as in the official code, so ``state_dict`` round trips
exactly (with ``sync_free=True`` it is a float32 device tensor, see ``cautious_sync_free``). ``cautious=False`` turns the mask off, which leaves plain Adam with the same bias
correction (useful for the "FAMO weighting with plain Adam" ablation).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from hpcm.optim import cautious_native
from hpcm.optim.cautious_flat import MOMENT_KEYS, FlatMoments, build_flat_moments, flat_update
from hpcm.optim.cautious_sync_free import BiasTables, element_counts, grads_finite, sync_free_update

# Constants of the official code: the mask mean is clamped below, the rescale capped above.
MASK_MEAN_FLOOR = 1e-3
MASK_SCALE_CAP = 10.0


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
            raise ValueError(f"fused=True (the CPU C kernel) excludes foreach={foreach!r} and sync_free={sync_free!r}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, cautious=cautious, foreach=foreach, fused=fused,
        )
        super().__init__(params, defaults)
        if fused:
            devices = {p.device.type for g in self.param_groups for p in g["params"]}
            if devices != {"cpu"}:
                raise ValueError(f"fused=True is the CPU C kernel; parameters are on {sorted(devices)}")
            cautious_native.load()  # raises NativeKernelUnavailable with the reason, before any step
        # sync_free: skip decision, step counters and skip count stay on the device (see
        # ``cautious_sync_free``); the default keeps Python-int steps and host-side decisions.
        self.sync_free = bool(sync_free)
        self._step_bound: int | None = None  # an upper bound of every step counter (sync_free)
        self._bias_tables: dict[tuple, BiasTables] = {}
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

    @property
    def skipped_steps_device(self) -> torch.Tensor:
        """sync_free: steps skipped for non-finite gradients, as a device tensor (no sync)."""
        if self._skipped_device is None:
            first = next(p for g in self.param_groups for p in g["params"])
            self._skipped_device = torch.zeros((), device=first.device)
        return self._skipped_device

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._step_bound = None
        for state in self.state.values():  # each mode keeps its own step type
            if "step" in state:
                step = state["step"]
                if self.sync_free and not torch.is_tensor(step):
                    state["step"] = torch.tensor(float(step), device=state["exp_avg"].device)
                elif not self.sync_free and torch.is_tensor(step):
                    state["step"] = int(step.item())

    @torch.no_grad()
    def sync_free_step(self, ok: torch.Tensor | None = None, grads_are_finite: torch.Tensor | None = None) -> torch.Tensor:
        """One step decided on the device: applied where ``ok`` and every gradient is finite.

        ``grads_are_finite``: that second condition when the caller knows it already (from the
        clip's gradient norm); otherwise computed here. Returns the 0-dim bool ``ok`` actually
        used; the skip is counted in ``skipped_steps_device``. Nothing is read back to the host.
        """
        if grads_are_finite is None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            device = grads[0].device if grads else next(p for g in self.param_groups for p in g["params"]).device
            finite = grads_finite(grads, device)
        else:
            finite = grads_are_finite
        device = finite.device
        ok = finite if ok is None else (ok.to(device) & finite)
        self.skipped_steps_device.add_((~ok).float())
        if self._step_bound is None:  # once after construction or loading: one read
            self._step_bound = max((int(s["step"]) for s in self.state.values() if "step" in s), default=0)
        self._step_bound += 1
        for group in self.param_groups:
            self._sync_free_group(group, ok)
        return ok

    def _sync_free_group(self, group: dict, ok: torch.Tensor) -> None:
        params, grads, moments, steps = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("CautiousAdam does not support sparse gradients")
            if p.grad.dtype != p.dtype or p.dtype not in (torch.float32, torch.float64):
                raise RuntimeError(f"sync_free CautiousAdam needs fp32/fp64 params and grads, got "
                                   f"{p.dtype} / {p.grad.dtype}")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), device=p.device)
                for key in MOMENT_KEYS[:3 if group["amsgrad"] else 2]:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif not torch.is_tensor(state["step"]):
                state["step"] = torch.tensor(float(state["step"]), device=p.device)
            params.append(p)
            grads.append(p.grad)
            moments.append(state)
            steps.append(state["step"])
        if not params:
            return
        okf = ok.to(steps[0].device).float()
        torch._foreach_add_(steps, okf)
        beta1, beta2 = group["betas"]
        buckets: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            buckets.setdefault((p.device, p.dtype), []).append(i)
        for (device, _), index in buckets.items():
            tables = self._bias_tables.get((device, beta1, beta2))
            if tables is None:
                tables = self._bias_tables[(device, beta1, beta2)] = BiasTables(beta1, beta2, device)
            tables.ensure(self._step_bound)
            pick = lambda items: [items[i] for i in index]  # noqa: E731
            states = pick(moments)
            sync_free_update(
                pick(params), pick(grads), [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                torch.stack(pick(steps)), ok.to(device), tables, amsgrad=group["amsgrad"],
                cautious=group["cautious"], beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"],
                mask_mean_floor=MASK_MEAN_FLOOR, mask_scale_cap=MASK_SCALE_CAP)

    def _update_group(self, group: dict) -> None:
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
                for key in MOMENT_KEYS[:3 if amsgrad else 2]:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(grad)
            states.append(state)
        if not params:
            return
        options = dict(
            amsgrad=amsgrad, cautious=group["cautious"],
            beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"],
        )
        if group["foreach"] is False:
            _single_tensor_update(params, grads, *_moment_lists(states, amsgrad), **options)
            return
        # The list kernels need one device and one dtype across params, grads and moments.
        buckets: dict[tuple, list[int]] = {}
        for i, (p, g, state) in enumerate(zip(params, grads, states)):
            buckets.setdefault((p.device, p.dtype, g.dtype, state["exp_avg"].dtype), []).append(i)
        for key, index in buckets.items():
            device, p_dtype, g_dtype, m_dtype = key
            if len(buckets) == 1:
                bucket_params, bucket_grads, bucket_states = params, grads, states
            else:
                bucket_params, bucket_grads, bucket_states = ([items[i] for i in index]
                                                              for items in (params, grads, states))
            steps = [state["step"] for state in bucket_states]
            if not p_dtype == g_dtype == m_dtype:  # e.g. fp16 params with fp32 moments
                update = _single_tensor_update
            elif group["foreach"] is None and device.type == "cpu" and steps.count(steps[0]) == len(steps):
                self._flat_step(key, bucket_params, bucket_grads, bucket_states, steps[0], options,
                                group["fused"])
                continue
            else:
                update = _foreach_update
            update(bucket_params, bucket_grads, *_moment_lists(bucket_states, amsgrad), **options)

    def _flat_step(self, key: tuple, params: list, grads: list, states: list, step: int, options: dict,
                   fused: bool | None) -> None:
        """CPU default: the bucket's moments in one flat buffer (see ``cautious_flat``), updated by
        the C kernel (``cautious_native``) unless ``fused`` is False or the kernel cannot be built."""
        if not hasattr(self, "_flat_moments"):
            self._flat_moments: dict[tuple, FlatMoments] = {}
        keys = MOMENT_KEYS if options["amsgrad"] else MOMENT_KEYS[:2]
        flat = self._flat_moments.get(key)
        if flat is None or not flat.serves(params, states, keys):
            flat = self._flat_moments[key] = build_flat_moments(params, states, keys)
        update = flat_update
        if fused is not False:
            reason = cautious_native.ineligible_reason(key[1], [*params, *grads]) or cautious_native.unavailable_reason()
            if reason is None:
                update = cautious_native.native_update
            elif fused:
                raise cautious_native.NativeKernelUnavailable(f"fused=True: {reason}")
            elif params[0].dtype == torch.float32:  # float64 buckets have no kernel: not a fallback
                cautious_native.warn_fallback_once(reason)
        update(flat, params, grads, step, mask_mean_floor=MASK_MEAN_FLOOR, mask_scale_cap=MASK_SCALE_CAP, **options)


def _moment_lists(states: list[dict], amsgrad: bool) -> tuple[list, list, list, list]:
    """exp_avgs, exp_avg_sqs, max_exp_avg_sqs ([] without amsgrad) and steps, from the states."""
    return ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if amsgrad else [], [s["step"] for s in states])


def _single_tensor_update(
    params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, *,
    amsgrad: bool, cautious: bool, beta1: float, beta2: float, lr: float,
    weight_decay: float, eps: float,
) -> None:
    """The official per-tensor loop, written out plainly."""
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


def _foreach_update(
    params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, *,
    amsgrad: bool, cautious: bool, beta1: float, beta2: float, lr: float,
    weight_decay: float, eps: float, host_scales: bool | None = None,
) -> None:
    """Same maths on tensor lists: a few list kernels instead of ~10 launches per tensor.

    Bitwise equal to ``_single_tensor_update``: every element sees the same IEEE operations in
    the same order. Two rewrites are exact: the mask mean is count/numel (a sum of 0/1 values
    is exact below 2^24 elements per tensor, as torch's mean is sum/numel), and
    m * (phi * s) is computed as (m * s) * phi (phi is exactly 0 or 1, so both round once).

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
    torch._foreach_div_(denom, math.sqrt(1 - beta2**steps[0]) if same_step
                        else [math.sqrt(1 - beta2**s) for s in steps])
    torch._foreach_add_(denom, eps)
    if cautious:
        # phi = 1[m*g > 0] computed as clamp(sign(m*g), 0): exactly 0 or 1.
        mask = torch._foreach_mul(exp_avgs, grads)
        torch._foreach_sign_(mask)
        torch._foreach_clamp_min_(mask, 0.0)
        if host_scales:  # per-tensor sums are cheaper than the generic norm kernel on CPU
            counts = torch.stack([m.sum() for m in mask])
        else:  # the L1 norm of a 0/1 tensor is its count of ones (one fused kernel on CUDA)
            counts = torch.stack(torch._foreach_norm(mask, 1))
        numels = element_counts(tuple(m.numel() for m in mask), counts.dtype, counts.device)
        scales = (1 / (counts / numels).clamp_(min=MASK_MEAN_FLOOR)).clamp_(max=MASK_SCALE_CAP)
        direction = torch._foreach_mul(exp_avgs, scales.tolist() if host_scales else list(scales.unbind(0)))
        torch._foreach_mul_(direction, mask)
        del mask
    else:
        direction = torch._foreach_mul(exp_avgs, 1.0)
    torch._foreach_div_(direction, denom)
    if same_step:
        torch._foreach_add_(params, direction, alpha=-(lr / (1 - beta1**steps[0])))
    else:  # one call per distinct step: add with alpha rounds like the per-tensor path
        for step in sorted(set(steps)):
            index = [i for i, s in enumerate(steps) if s == step]
            torch._foreach_add_([params[i] for i in index], [direction[i] for i in index],
                                alpha=-(lr / (1 - beta1**step)))
