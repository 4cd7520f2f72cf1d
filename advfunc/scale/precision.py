"""Dynamic loss scaling for fp16 as a pure function: state in, state out.

fp16 activations underflow below ~6e-8, so fp16 training multiplies the loss by a
large scale s before differentiating and divides the gradients by s afterwards. An
advfunc step takes the scale as ``loss_scale=s`` and returns ∇(s·L); its norms and
projections run in float32 and its perturbation direction does not depend on s, so
a too-large s shows up as a non-finite gradient (``out.skipped``: the perturbation
was dropped, never NaN) and here as ``finite=False``::

    state = advfunc.precision.init_loss_scale()        # s = 2**16
    step = advfunc.pgd(model, autocast=torch.float16)
    for batch in loader:
        grads, out = step(advfunc.params_of(model), batch, loss_scale=state.scale)
        grads = advfunc.distributed.all_reduce_grads(grads)   # under DDP; still scaled
        grads, finite, state = advfunc.precision.unscale_and_check(grads, state)
        if finite:                                            # one host sync, as GradScaler
            advfunc.set_grads(model, grads)
            optimizer.step()

The update is torch's ``GradScaler`` rule: on overflow the scale is multiplied by
``backoff_factor`` (½) and the update skipped; after ``growth_interval`` finite steps
in a row it is multiplied by ``growth_factor`` (2). bf16 has fp32's exponent range and
needs no scaling: pass ``autocast=torch.bfloat16`` and no ``loss_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from advfunc.core.params import Params
from advfunc.core.step import all_finite

# torch.amp.GradScaler's defaults.
INIT_SCALE = 2.0**16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000
# The scale never backs off below this. Unfloored, 166 overflows in a row reach 0 in float32,
# and 1/0 makes every later unscaled gradient inf or NaN. 2**-24 is fp16's smallest subnormal:
# a loss scaled below it is 0 in fp16 anyway, and its reciprocal is an exact, finite 2**24.
MIN_SCALE = 2.0**-24


class LossScale(NamedTuple):
    """The state of a dynamic loss scaler.

    scale: [] float32, the current loss scale s (pass it as a step's ``loss_scale``).
    growth_tracker: [] int32, finite steps in a row since the scale last changed.
    """

    scale: torch.Tensor
    growth_tracker: torch.Tensor


def init_loss_scale(init_scale: float = INIT_SCALE, device: torch.device | str | None = None) -> LossScale:
    """The initial ``LossScale``: s = ``init_scale`` (2¹⁶ as GradScaler), tracker 0, on ``device``.

    Keep the state on the grads' device: updating it then needs no host sync.
    """
    if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)):
        raise TypeError(f"init_scale must be a number, got {init_scale!r}")
    if not math.isfinite(init_scale) or init_scale <= 0:
        raise ValueError(f"init_scale must be a finite number > 0 (GradScaler uses 2**16), got {init_scale!r}")
    return LossScale(
        torch.tensor(float(init_scale), dtype=torch.float32, device=device),
        torch.zeros((), dtype=torch.int32, device=device),
    )


def update_scale(
    state: LossScale,
    finite: torch.Tensor,
    *,
    growth_factor: float = GROWTH_FACTOR,
    backoff_factor: float = BACKOFF_FACTOR,
    growth_interval: int = GROWTH_INTERVAL,
) -> LossScale:
    """The next ``LossScale`` after a step whose scaled grads were ``finite`` ([] bool).

    .. math::
        s' = \\begin{cases} s · b & \\text{overflow} \\\\ s · g & \\text{the } N\\text{-th finite step in a row}
        \\\\ s & \\text{otherwise}\\end{cases}

    with b = ``backoff_factor``, g = ``growth_factor``, N = ``growth_interval``. A grown
    scale that would be infinite keeps the old one; a backed-off scale never falls below
    ``MIN_SCALE``. Pure: ``state`` is not modified.
    """
    _check_config(growth_factor, backoff_factor, growth_interval)
    scale, tracker = state
    finite = finite.to(device=scale.device, dtype=torch.bool)
    streak = torch.where(finite, tracker + 1, torch.zeros_like(tracker))
    grow = finite & (streak >= growth_interval)
    grown = scale * growth_factor
    grown = torch.where(torch.isfinite(grown), grown, scale)
    backed_off = torch.clamp(scale * backoff_factor, min=MIN_SCALE)
    new_scale = torch.where(finite, torch.where(grow, grown, scale), backed_off)
    new_tracker = torch.where(grow, torch.zeros_like(streak), streak)
    return LossScale(new_scale, new_tracker)


def unscale_and_check(
    grads: Mapping[str, torch.Tensor],
    state: LossScale,
    *,
    growth_factor: float = GROWTH_FACTOR,
    backoff_factor: float = BACKOFF_FACTOR,
    growth_interval: int = GROWTH_INTERVAL,
) -> tuple[Params, torch.Tensor, LossScale]:
    """(grads / s, finite, next state) for grads a step returned with ``loss_scale=state.scale``.

    ``finite`` is a [] bool tensor; when it is false, skip the optimizer update. The
    returned grads are then all zero rather than inf/NaN, so even an update applied by
    mistake leaves the weights finite. The division is done in float32 and cast back to
    each grad's dtype (fp16 grads of an fp16 model can underflow there: keep fp32
    master weights and let ``autocast`` run fp16). Under DDP call it after
    :func:`advfunc.distributed.all_reduce_grads`: an overflow on one rank is then
    seen by all, and every rank's scale stays equal. Pure; no host sync.

    Cost: one read and one write of the grads.
    """
    if not isinstance(state, LossScale):
        raise TypeError(f"state must be a LossScale (advfunc.precision.init_loss_scale()), got {type(state).__name__}")
    _check_config(growth_factor, backoff_factor, growth_interval)
    inverse = state.scale.float().reciprocal()  # exact for the powers of two the default rule produces
    # Checked after unscaling: a scale of 0 or a denormal one turns finite scaled grads into inf/NaN.
    values = {name: g.float() * inverse.to(g.device) for name, g in grads.items()}
    finite = all_finite(grads) & all_finite(values)
    unscaled: Params = {
        name: torch.where(finite.to(value.device), value, torch.zeros_like(value)).to(grads[name].dtype)
        for name, value in values.items()
    }
    new_state = update_scale(
        state, finite, growth_factor=growth_factor, backoff_factor=backoff_factor, growth_interval=growth_interval
    )
    return unscaled, finite, new_state


def _check_config(growth_factor: float, backoff_factor: float, growth_interval: int) -> None:
    if isinstance(growth_factor, bool) or not isinstance(growth_factor, (int, float)) or not growth_factor > 1:
        raise ValueError(f"growth_factor must be a number > 1 (GradScaler uses 2.0), got {growth_factor!r}")
    if isinstance(backoff_factor, bool) or not isinstance(backoff_factor, (int, float)) or not 0 < backoff_factor < 1:
        raise ValueError(f"backoff_factor must be a number in (0, 1) (GradScaler uses 0.5), got {backoff_factor!r}")
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
        raise ValueError(f"growth_interval must be an int >= 1 (GradScaler uses 2000), got {growth_interval!r}")
