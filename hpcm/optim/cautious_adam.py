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
exactly (with ``sync_free=True`` it is a float32 device tensor, see ``cautious_sync_free``).
``cautious=False`` turns the mask off, which leaves plain Adam with the same bias
correction (useful for the "FAMO weighting with plain Adam" ablation).

Update paths, all behind ``step`` (``_update_group`` picks one per bucket of tensors; the training
loop sees none of them), each bitwise equal to the definition ``cautious_math.single_tensor_update``
(``foreach=False``) and tested so (tests/optim/test_speed_paths.py, test_cautious_native.py,
test_sync_free.py). ``optimizer.step()`` on HPCM_Tiny (1.68 M parameters, 172 tensors), CPU, one
thread, median of 7 rounds of min-of-10 (``python benchmarks/cautious_paths.py``, this container):

    reference (foreach=False)    22.4 ms   1.00
    foreach (list kernels)       12.0 ms   0.54  (0.53..0.57)   CUDA default; CPU buckets at mixed steps
    C kernel (cautious_native)    3.1 ms   0.14  (0.13..0.16)   CPU default (fused=None/True)
    sync_free                    29.1 ms   1.29  (1.21..1.48)   CUDA only (hpcm.train): no host sync
    torch fused Adam              2.2 ms   0.10                 (yardstick: one pass)

A torch path on flat buffers (9.0 ms, 0.42) was removed: it ran only where the kernel cannot
(no compiler, ``HPCM_NATIVE=0``, ATen's DEFAULT capability), and foreach serves there at 12.0 ms.
sync_free is kept for CUDA, where its point is the absent per-step host synchronisation (not
measurable on this CPU; ``benchmarks/cautious_paths.py --device cuda`` times it there). On CPU its
0-dim device factors go through ATen's per-tensor fallbacks; on CUDA they are list kernels
(``benchmarks/sync_free_ops.py`` counts the ops).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from hpcm.optim import cautious_native
from hpcm.optim.cautious_flat import MOMENT_KEYS, FlatMoments, build_flat_moments
from hpcm.optim.cautious_math import MASK_MEAN_FLOOR, MASK_SCALE_CAP
from hpcm.optim.cautious_math import foreach_update as _foreach_update
from hpcm.optim.cautious_math import single_tensor_update as _single_tensor_update
from hpcm.optim.cautious_sync_free import BiasTables, GateConstants, grads_finite, sync_free_update


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
        self._gate_constants: dict[torch.device, GateConstants] = {}
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
        for number, group in enumerate(self.param_groups):
            self._update_group(group, number)
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
        self._sf_members, self._sf_uniform = {}, {}
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
                raise RuntimeError(f"sync_free CautiousAdam needs fp32/fp64 params and grads, got "
                                   f"{p.dtype} / {p.grad.dtype}")
            state = self.state[p]
            fresh.append(len(state) == 0)
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
        uniform = self._steps_uniform(number, params, steps, fresh)
        okf = ok.to(steps[0].device).float()
        # a list of the same 0-dim flag: the Tensor-scalar overload reads it back on CPU (item)
        torch._foreach_add_(steps, [okf] * len(steps))
        beta1, beta2 = group["betas"]
        buckets: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            buckets.setdefault((p.device, p.dtype), []).append(i)
        for (device, _), index in buckets.items():
            tables = self._bias_tables.get((device, beta1, beta2))
            if tables is None:
                tables = self._bias_tables[(device, beta1, beta2)] = BiasTables(beta1, beta2, device)
            tables.ensure(self._step_bound)
            constants = self._gate_constants.get(device)
            if constants is None:
                constants = self._gate_constants[device] = GateConstants(device)
            pick = lambda items, index=index: [items[i] for i in index]  # noqa: E731
            states = pick(moments)
            bucket_steps = pick(steps)
            sync_free_update(
                pick(params), pick(grads), [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                bucket_steps[0].view(1) if uniform else torch.stack(bucket_steps), ok.to(device), tables,
                constants, uniform=uniform, amsgrad=group["amsgrad"], cautious=group["cautious"],
                beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"])

    def _steps_uniform(self, number: int, params: list, steps: list[torch.Tensor], fresh: list[bool]) -> bool:
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

    def _update_group(self, group: dict, number: int = 0) -> None:
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
                # one flat buffer per (group, bucket): groups would otherwise rebuild each other's
                self._flat_step((number, *key), bucket_params, bucket_grads, bucket_states, steps[0], options,
                                group["fused"])
                continue
            else:
                update = _foreach_update
            update(bucket_params, bucket_grads, *_moment_lists(bucket_states, amsgrad), **options)

    def _flat_step(self, key: tuple, params: list, grads: list, states: list, step: int, options: dict,
                   fused: bool | None) -> None:
        """CPU default: the C kernel (``cautious_native``) on the bucket's moments in one flat buffer
        (``cautious_flat``); the list kernels when ``fused`` is False or the kernel cannot be used."""
        reason = "fused=False" if fused is False else (
            cautious_native.ineligible_reason(key[2], [*params, *grads]) or cautious_native.unavailable_reason())
        if reason is not None:
            if fused:
                raise cautious_native.NativeKernelUnavailable(f"fused=True: {reason}")
            if fused is None and params[0].dtype == torch.float32:  # float64 has no kernel: not a fallback
                cautious_native.warn_fallback_once(reason)
            _foreach_update(params, grads, *_moment_lists(states, options["amsgrad"]), **options)
            return
        if not hasattr(self, "_flat_moments"):
            self._flat_moments: dict[tuple, FlatMoments] = {}
        keys = MOMENT_KEYS if options["amsgrad"] else MOMENT_KEYS[:2]
        flat = self._flat_moments.get(key)
        if flat is None or not flat.serves(params, states, keys):
            flat = self._flat_moments[key] = build_flat_moments(params, states, keys)
        cautious_native.native_update(flat, params, grads, step, mask_mean_floor=MASK_MEAN_FLOOR,
                                      mask_scale_cap=MASK_SCALE_CAP, **options)


def _moment_lists(states: list[dict], amsgrad: bool) -> tuple[list, list, list, list]:
    """exp_avgs, exp_avg_sqs, max_exp_avg_sqs ([] without amsgrad) and steps, from the states."""
    return ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if amsgrad else [], [s["step"] for s in states])
