"""KL divergences between the categorical distributions two sets of logits define.

VAT's virtual adversarial loss, SMART's smoothness and proximal terms and R3F's
regulariser all compare ``softmax(logits)`` of two forwards. The class axis is the last
one; every leading position ([B] for sequence classification, [B, L] for token
classification) counts equally in the mean, the ``batchmean`` of ``F.kl_div``. Logits
must be finite. Everything is computed in float32, whatever the model's dtype.
"""

from __future__ import annotations

import torch

# Positions whose logits differ by at most this much (max over classes of |q − p| in
# logits) take log(q/p) from the logit difference, where it is exact to rounding.
_NEAR = 1.0


def kl_logits(p_logits: torch.Tensor, q_logits: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p ‖ q) with p = softmax(p_logits), q = softmax(q_logits), averaged over positions.

    .. math::
        \\mathrm{KL}(p ‖ q) = \\operatorname{mean}_{\\text{positions}} \\sum_c
            p_c\\,\\big(e^{r_c} − 1 − r_c\\big),\\qquad r_c = \\log q_c − \\log p_c

    which is Σ_c p_c log(p_c/q_c) + q_c − p_c, KL's value and gradient (the added q − p
    sums to 0), with every summand >= 0 (e^r >= 1 + r): the result is >= 0, and exactly
    0 at equal logits. Near p = q, where VAT's power iteration and SMART's ascent probe
    the KL, its gradient ∂/∂(q_logits) = q − p is smaller than the probabilities'
    rounding: q − p taken from two rounded softmaxes is 0 or noise, and the perturbation
    would find no direction. So where the logits differ by at most 1, r comes from their
    difference d = q_logits − p_logits, exact to rounding (r = d − log1p(Σ p·expm1(d))),
    and q − p = p·expm1(r) is the gradient the summand hands back; elsewhere the
    log-softmax form is exact enough. A summand that rounds below 0 has its value raised
    to 0 and keeps its gradient.

    ``p_logits``, ``q_logits``: [..., C] of equal shape. ``positions``: [...] bool, the
    positions that count (a causal LM's completion tokens, :func:`label_positions`); all
    of them when None. Returns a 0-dim float32 tensor (0 when no position counts);
    gradients flow to both arguments (detach one to hold it fixed).
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(
            f"KL needs logits of equal shape, got {tuple(p_logits.shape)} and {tuple(q_logits.shape)}; "
            "both forwards must see the same batch"
        )
    p_logits, q_logits = p_logits.float(), q_logits.float()
    log_p = torch.log_softmax(p_logits, dim=-1)  # [..., C]
    log_q = torch.log_softmax(q_logits, dim=-1)  # [..., C]
    p, q = log_p.exp(), log_q.exp()
    far = p * (log_p - log_q) + (q - p)  # [..., C]
    difference = q_logits - p_logits  # [..., C]
    near = difference.abs().amax(dim=-1, keepdim=True) <= _NEAR  # [..., 1]
    bounded = difference.clamp(-_NEAR, _NEAR)  # keeps the unused branch finite, so where() has finite grads
    log_ratio = bounded - torch.log1p((p * torch.expm1(bounded)).sum(dim=-1, keepdim=True))  # [..., C]
    summands = torch.where(near, p * _expm1_minus_identity(log_ratio), far)  # [..., C], each >= 0 exactly
    rounding = (summands.clamp_min(0) - summands).detach()  # > 0 only where round-off went below 0
    per_position = (summands + rounding).sum(dim=-1)  # [...]
    if positions is None:
        return per_position.mean()
    if positions.shape != per_position.shape:
        raise ValueError(
            f"positions has shape {tuple(positions.shape)}, the logits have positions {tuple(per_position.shape)}"
        )
    weights = positions.to(per_position.dtype)  # [...]
    return (per_position * weights).sum() / weights.sum().clamp(min=1)


def _expm1_minus_identity(r: torch.Tensor) -> torch.Tensor:
    """e^r − 1 − r, with the derivative e^r − 1 computed as ``expm1(r)``.

    Differentiating the expression would subtract 1 from e^r, losing every digit of a
    small r; the value is detached and the derivative attached through ``r`` instead.
    """
    slope = torch.expm1(r)
    return (slope - r).detach() + slope.detach() * (r - r.detach())


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p ‖ q) + KL(q ‖ p), the symmetric KL of SMART and R3F; >= 0, 0 at equal logits."""
    return kl_logits(p_logits, q_logits, positions) + kl_logits(q_logits, p_logits, positions)


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the positions whose logits a causal LM's loss scores.

    The logits at position t predict token t + 1, so t counts when ``labels[:, t + 1]``
    is not −100: prompt, padding and the last position never count, as in the model's
    own shifted cross-entropy.
    """
    if labels.dim() != 2:
        raise ValueError(f"a causal LM's labels are [batch, seq], got shape {tuple(labels.shape)}")
    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != -100
    return counted
