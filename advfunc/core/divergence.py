"""KL divergences between the categorical distributions two sets of logits define.

VAT's virtual adversarial loss, SMART's smoothness and proximal terms and R3F's
regulariser all compare ``softmax(logits)`` of two forwards. The class axis is the last
one; every leading position ([B] for sequence classification, [B, L] for token
classification) counts equally in the mean, the ``batchmean`` of ``F.kl_div``. Logits
must be finite. Everything is computed in float32, whatever the model's dtype.
"""

from __future__ import annotations

import torch


def kl_logits(p_logits: torch.Tensor, q_logits: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p ‖ q) with p = softmax(p_logits), q = softmax(q_logits), averaged over positions.

    .. math::
        \\mathrm{KL}(p ‖ q) = \\operatorname{mean}_{\\text{positions}} \\sum_c
            \\big[p_c (\\log p_c − \\log q_c) + q_c − p_c\\big]

    The added q_c − p_c sums to 0 (both are distributions), so the value and gradient
    are KL's; what it buys is that every summand is >= 0 (log x <= x − 1), so the result
    is >= 0 despite round-off, and exactly 0 when the logits are equal. Summands that
    round-off makes negative are clamped at 0: they lie where p_c = q_c to float32
    precision, so their gradient is at round-off level too.

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
    log_p = torch.log_softmax(p_logits.float(), dim=-1)  # [..., C]
    log_q = torch.log_softmax(q_logits.float(), dim=-1)  # [..., C]
    p = log_p.exp()
    q = log_q.exp()
    summands = p * (log_p - log_q) + (q - p)  # [..., C], each >= 0 in exact arithmetic
    per_position = summands.clamp_min(0).sum(dim=-1)  # [...]
    if positions is None:
        return per_position.mean()
    if positions.shape != per_position.shape:
        raise ValueError(
            f"positions has shape {tuple(positions.shape)}, the logits have positions {tuple(per_position.shape)}"
        )
    weights = positions.to(per_position.dtype)  # [...]
    return (per_position * weights).sum() / weights.sum().clamp(min=1)


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
