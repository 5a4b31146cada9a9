"""The optimizer registry: ``@register_optimizer(name)`` attaches a builder to a name of
``hpcm.config.optimizers.OPTIMIZER_SPECS``, and ``build_optimizer`` builds from a run-config name.

A builder takes ``(params, lr, *, max_norm, min_losses, sync_free, **hyperparameters)``, where the
hyperparameters are exactly the run-config keys of its spec (``OptimizerSpec.hyperparameters``),
and returns a ``torch.optim.Optimizer``. The optimizer modules register on import
(``hpcm/optim/__init__.py`` imports every one); tests/optim/test_registry.py checks that every spec
has a builder and that each built optimizer has its spec's traits.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from hpcm.config.optimizers import HYPERPARAMETERS, OPTIMIZER_SPECS, optimizer_spec

Builder = Callable[..., torch.optim.Optimizer]
BUILDERS: dict[str, Builder] = {}


def register_optimizer(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder`` builds the optimizer ``name`` (which needs an ``OptimizerSpec``)."""
    if name not in OPTIMIZER_SPECS:
        raise ValueError(
            f"register_optimizer({name!r}): no OptimizerSpec of that name in "
            "hpcm/config/optimizers.py (add one: the run config, schema and loop "
            "read it)"
        )

    def decorator(builder: Builder) -> Builder:
        if name in BUILDERS:
            raise ValueError(
                f"register_optimizer({name!r}): already registered by "
                f"{BUILDERS[name].__module__}.{BUILDERS[name].__qualname__}"
            )
        BUILDERS[name] = builder
        return builder

    return decorator


def build_optimizer(
    name: str,
    params: Iterable,
    lr: float,
    *,
    max_norm: float = 1.0,
    min_losses: float = -1.0,
    sync_free: bool = False,
    **hyperparameters,
) -> torch.optim.Optimizer:
    """One optimizer from its run-config name; an unknown name raises ValueError listing the others.

    ``hyperparameters``: run-config keys (``gamma``, ``w_lr``, ``update_mode``, ``gammas``,
    ``scale_weights``); each optimizer takes those of its spec, the defaults of the spec for those
    not given, and ignores the others (the loop passes them all). ``sync_free`` (CautiousAdam and
    the FAMO optimizers; QP decides on the host) keeps the skip decisions on the device.
    """
    spec = optimizer_spec(name)
    unknown = sorted(set(hyperparameters) - set(HYPERPARAMETERS))
    if unknown:
        raise TypeError(
            f"build_optimizer({name!r}): unknown hyperparameters {unknown}; "
            f"the registered optimizers read {list(HYPERPARAMETERS)}"
        )
    builder = BUILDERS.get(name)
    if builder is None:
        raise ValueError(
            f"optimizer {name!r} has a spec but no builder: decorate one with "
            f"@register_optimizer({name!r}) and import its module in "
            "hpcm/optim/__init__.py"
        )
    options = {
        key: hyperparameters.get(key, default) for key, default in spec.hyperparameters.items()
    }
    return builder(
        params, lr, max_norm=max_norm, min_losses=min_losses, sync_free=sync_free, **options
    )


@register_optimizer("adam")
def build_adam(
    params: Iterable, lr: float, *, max_norm: float, min_losses: float, sync_free: bool
) -> torch.optim.Adam:
    """torch's Adam, the baseline (no file of ours). Fused (CPU and CUDA): it honours
    ``found_inf``, so training skips a non-finite batch on the device without a host sync
    (``backward_and_step`` sets it before the step, and clips with ``max_norm`` itself)."""
    del max_norm, min_losses, sync_free
    return torch.optim.Adam(params, lr=lr, fused=True)
