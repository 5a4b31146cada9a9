"""The C kernel of CautiousAdam (``hpcm.optim.cautious_native``): bitwise equal to the torch path
on real model shapes, built once into its cache, and clear about why it cannot be used."""

from __future__ import annotations

import warnings

import pytest
import torch

from hpcm.models import build_model
from hpcm.optim import Balanced, CautiousAdam, cautious_adam, cautious_native
from tests.optim.kernel import needs_kernel


def clear_kernel_caches() -> None:
    """Forget the cached library and verdict (the next use builds, loads and checks again)."""
    for cached in (
        cautious_native.load,
        cautious_adam.native_library,
        cautious_adam.native_unavailable_reason,
    ):
        cached.cache_clear()


def model_params(seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [p.detach().clone().requires_grad_(True) for p in build_model("HPCM_Tiny").parameters()]


def random_grads(params, step: int) -> None:
    generator = torch.Generator().manual_seed(1000 + step)
    for p in params:
        # a wide spread of magnitudes, with exact zeros (outside the mask) and tiny values
        grad = torch.randn(p.shape, generator=generator) * 10.0 ** torch.randint(
            -8, 1, p.shape, generator=generator
        )
        grad[grad.abs() < 1e-7] = 0.0
        p.grad = grad


@needs_kernel
@pytest.mark.parametrize("amsgrad", [False, True])
def test_native_equals_torch_paths_on_hpcm_tiny(amsgrad):
    """172 tensors of every shape the model has (1.68 M elements), 6 steps, weight decay on."""
    results = []
    for options in (dict(foreach=False), dict(fused=False), dict(fused=True)):
        params = model_params()
        opt = CautiousAdam(params, lr=1e-3, weight_decay=0.01, amsgrad=amsgrad, **options)
        for step in range(6):
            random_grads(params, step)
            opt.step()
        results.append((params, opt))
    (reference, ref_opt) = results[0]
    for params, opt in results[1:]:
        for p, q in zip(reference, params):
            assert torch.equal(p, q)
            for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
                assert torch.equal(ref_opt.state[p][key], opt.state[q][key])


@needs_kernel
def test_kernel_sqrt_is_torch_sqrt():
    """The kernel's square root (MKL's vsSqrt from torch's own library, or sqrtf) is
    torch.sqrt's."""
    library = cautious_native.load()
    values = torch.rand(100_003) * 1e-5
    out = torch.empty_like(values)
    library.cautious_sqrt(library.sqrt_function, values.numel(), values.data_ptr(), out.data_ptr())
    assert torch.equal(out, torch.sqrt(values))


@needs_kernel
def test_default_cpu_path_is_the_kernel(monkeypatch):
    calls = []
    original = cautious_native.native_update
    monkeypatch.setattr(
        cautious_native, "native_update", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    params = model_params()
    opt = Balanced(params, lr=1e-3)
    random_grads(params, 0)
    opt.step()
    assert calls == [1]


@needs_kernel
def test_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCM_CACHE_DIR", str(tmp_path))
    compiler = cautious_native._compiler()
    target = cautious_native.library_path(compiler)
    assert target.parent == tmp_path / "native" and not target.exists()
    cautious_native.build(compiler, target)
    assert target.is_file() and list(target.parent.iterdir()) == [
        target
    ]  # no temporary left behind
    assert (
        cautious_native.library_path(compiler) == target
    )  # same source, compiler and CPU: same file


@needs_kernel
def test_compile_error_names_the_compiler_output(tmp_path, monkeypatch):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(cautious_native, "SOURCE", broken)
    with pytest.raises(cautious_native.NativeKernelUnavailable, match=r"broken\.c.*failed"):
        cautious_native.build(cautious_native._compiler(), tmp_path / "out.so")
    assert not (tmp_path / "out.so").exists()


@pytest.fixture
def no_compiler(monkeypatch):
    """A process where the kernel cannot be built (cached load results cleared before and after)."""
    monkeypatch.setenv("CC", "no-such-compiler-hpcm")
    monkeypatch.setenv("HPCM_CACHE_DIR", "/nonexistent-hpcm-cache")
    monkeypatch.setattr(cautious_adam, "_warned", False)
    clear_kernel_caches()
    yield
    clear_kernel_caches()


def test_fused_true_without_compiler_raises_with_the_reason(no_compiler):
    with pytest.raises(cautious_native.NativeKernelUnavailable, match="no-such-compiler-hpcm"):
        CautiousAdam(model_params(), lr=1e-3, fused=True)


def test_default_without_compiler_warns_once_and_matches(no_compiler):
    params, reference = model_params(), model_params()
    opt, ref_opt = CautiousAdam(params, lr=1e-3), CautiousAdam(reference, lr=1e-3, foreach=False)
    with pytest.warns(
        RuntimeWarning, match="slower torch CPU path: no C compiler.*no-such-compiler-hpcm"
    ):
        random_grads(params, 0)
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second step does not warn again
        random_grads(params, 1)
        opt.step()
    for step in range(2):
        random_grads(reference, step)
        ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, reference))


def test_switched_off_by_environment(monkeypatch, no_compiler):
    monkeypatch.setenv("HPCM_NATIVE", "0")
    assert cautious_adam.native_unavailable_reason() == "turned off by HPCM_NATIVE=0"


def test_fused_true_rejects_conflicting_options():
    with pytest.raises(ValueError, match="foreach"):
        CautiousAdam(model_params(), lr=1e-3, fused=True, foreach=True)


def test_non_contiguous_gradient_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(cautious_adam, "_warned", False)
    weight = torch.randn(4, 6, requires_grad=True)
    reference = weight.detach().clone().requires_grad_(True)
    opt, ref_opt = (
        CautiousAdam([weight], lr=1e-2),
        CautiousAdam([reference], lr=1e-2, foreach=False),
    )
    grad = torch.randn(6, 4)
    weight.grad, reference.grad = (
        grad.t(),
        grad.t().contiguous(),
    )  # same values, one transposed view
    with pytest.warns(RuntimeWarning, match=r"shape \(4, 6\) is not contiguous"):
        opt.step()
    ref_opt.step()
    assert torch.equal(weight, reference)


@needs_kernel
def test_unwritable_cache_warns_and_falls_back(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    monkeypatch.setenv(
        "HPCM_CACHE_DIR", str(blocker)
    )  # cache_dir() = a-file/native: cannot be made
    monkeypatch.setattr(cautious_adam, "_warned", False)
    clear_kernel_caches()
    try:
        params = model_params()
        opt = CautiousAdam(params, lr=1e-3)
        random_grads(params, 0)
        with pytest.warns(RuntimeWarning, match="cannot build the kernel into"):
            opt.step()
    finally:
        clear_kernel_caches()


@needs_kernel
def test_scalars_that_overflow_float32_are_refused_as_torch_does():
    params = model_params()
    random_grads(params, 0)
    with pytest.raises(ValueError, match=r"overflows float32"):
        CautiousAdam(params, lr=1e39, fused=True).step()
    with pytest.raises(RuntimeError, match="overflow"):  # the torch path refuses it too
        CautiousAdam(params, lr=1e39, fused=False).step()
