"""NEFTune's perturbation: uniform noise on the embedding output, scaled per sequence (Jain et al., 2023)."""

from __future__ import annotations

import torch
from torch import nn

from advfunc.attacks.attack import Attack, Rule
from advfunc.core.arguments import require_positive
from advfunc.core.model import LossFn
from advfunc.core.params import Params
from advfunc.core.step import Call
from advfunc.core.targets import Delta, EmbeddingOutput, Layout, input_embedding


def sequence_lengths(attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] the number of real tokens in the sequence each token belongs to (0 at padding).

    Without ``position_ids`` a row is one sequence. With them, rows may pack several
    sequences: a sequence starts wherever the position id is 0 (or at the row's first
    real token), so each packed sequence has its own length.
    """
    real = attention_mask.bool()  # [B, L]
    if position_ids is None:
        return real.sum(1, keepdim=True).expand_as(real) * real
    first = real & (real.long().cumsum(1) == 1)
    starts = real & ((position_ids == 0) | first)  # [B, L]
    segment = starts.long().cumsum(1)  # [B, L] 1-based sequence index within the row
    counts = torch.zeros(real.shape[0], real.shape[1] + 1, dtype=torch.long, device=real.device)
    counts.scatter_add_(1, segment * real, real.long())  # padding lands in bucket 0
    return counts.gather(1, segment) * real


def neftune_rule(target: EmbeddingOutput, alpha: float) -> Rule:
    """z = U(−1, 1) · α/√(n · d) per token, n its sequence's real-token count, d the embedding width."""

    def init(call: Call, generator: torch.Generator | None) -> Delta:
        lengths = sequence_lengths(_attention_mask(call), call.kwargs.get("position_ids"))  # [B, L]
        scale = alpha / torch.sqrt(lengths.clamp(min=1).to(torch.float32) * target.hidden)  # [B, L]
        scale = scale * (lengths > 0)
        noise = torch.empty(call.layout.shape, dtype=target.dtype, device=call.device)
        noise.uniform_(-1, 1, generator=generator)  # [B, L, H]
        # The layout's mask also holds a position restriction (the batch's perturb_mask).
        assert call.layout.mask is not None
        return {"embeds": noise * scale.unsqueeze(-1).to(target.dtype) * call.layout.mask}

    def ascend(delta: Delta, grads: Delta, params: Params, layout: Layout) -> tuple[Delta, torch.Tensor]:
        raise AssertionError("NEFTune takes no ascent step")

    return Rule(init, ascend, 0, reads_grads=False)


def _attention_mask(call: Call) -> torch.Tensor:
    mask = call.kwargs.get("attention_mask")
    ids = call.kwargs["input_ids"]
    return torch.ones_like(ids) if mask is None else mask


def neftune(
    model: nn.Module,
    alpha: float = 5.0,
    generator: torch.Generator | None = None,
    *,
    loss_fn: LossFn | None = None,
    autocast: torch.dtype | None = None,
) -> Attack:
    """NEFTune's noise on the embedding output: ``z = attack(params, batch)`` [B, L, H].

    .. math::
        z_{b,i} = \\frac{α}{\\sqrt{n_{b,i} · d}} · u_{b,i},\\quad u_{b,i} \\sim U(−1, 1)^d

    n_{b,i} is the number of real (non-padding) tokens of the sequence token i of row b
    belongs to: the row's, or, when the batch packs sequences (``position_ids``
    restarting at 0), that packed sequence's own (:func:`sequence_lengths`). Taking n as
    the padded or packed row length would shrink the noise of short and packed
    sequences. Zero at padding; drawn from ``generator``. No ascent, so ``grads`` is
    accepted for the protocol and never read. Cost: no pass. Paper: Jain et al.,
    "NEFTune: Noisy Embeddings Improve Instruction Finetuning", 2023 (ICLR 2024).
    """
    alpha = require_positive("alpha", alpha)
    chosen = EmbeddingOutput(input_embedding(model))
    config = {"alpha": alpha, "target": "embeds"}
    rule = neftune_rule(chosen, alpha)
    return Attack("neftune", model, chosen, rule, config, loss_fn=loss_fn, autocast=autocast, generator=generator)
