"""Completions of a causal LM: the adversary's sequence and the loss that pushes away from a completion.

Continuous adversarial training (CAT) and targeted latent adversarial training (LAT)
score two completions of one prompt: the desired one (the batch's ``labels``) and the
adversary's (``batch["adv_labels"]``, :data:`ADV_LABELS`). Both are ``[B, L]`` with −100
outside their completion, Hugging Face's convention: the logits at t score
``labels[t + 1]``. The adversary's sequence is the batch's ``input_ids`` with its
completion's tokens written in, so the prompt, and a perturbation placed on it, are
shared by both sequences.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from advfunc.core.arguments import require_on_device
from advfunc.core.divergence import label_positions

ADV_LABELS = "adv_labels"  # batch key: the adversary's completion, [B, L], −100 elsewhere


def adversary_kwargs(kwargs: Mapping[str, Any], adv_labels: Any) -> dict[str, Any]:
    """The model's keyword arguments for the adversary's sequence: same prompt, its completion.

    ``input_ids`` take the tokens of ``adv_labels`` where it is not −100, the attention
    mask covers them, and ``labels`` become ``adv_labels``. The adversary's completion
    must not overlap the prompt (the real tokens whose label is −100); with right padding
    it may run into the padding, with left padding it must end where the row ends.
    """
    ids = kwargs["input_ids"]
    labels = kwargs.get("labels")
    if not isinstance(adv_labels, torch.Tensor) or adv_labels.shape != ids.shape or adv_labels.is_floating_point():
        got = tuple(adv_labels.shape) if isinstance(adv_labels, torch.Tensor) else type(adv_labels).__name__
        raise ValueError(
            f"batch[{ADV_LABELS!r}] must be integer token ids [batch, seq] like input_ids {tuple(ids.shape)}, "
            f"−100 outside the adversary's completion; got {got}"
        )
    if not isinstance(labels, torch.Tensor) or labels.shape != ids.shape:
        raise ValueError("the adversary's completion needs the batch's labels [batch, seq], −100 at the prompt")
    mask = kwargs.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    marked = adv_labels != -100
    require_on_device(
        ~(marked & real & (labels == -100)).any(),
        lambda: ValueError(
            f"batch[{ADV_LABELS!r}] marks prompt positions (real tokens whose label is −100); the adversary's "
            "completion must follow the prompt, at or after the desired completion's first position"
        ),
    )
    require_on_device(
        marked[:, 1:].any(dim=1).all(),
        lambda: ValueError(f"batch[{ADV_LABELS!r}] has a row with no completion token after its first position"),
    )
    adversary = dict(kwargs)
    adversary["input_ids"] = torch.where(marked, adv_labels, ids)
    adversary["labels"] = adv_labels
    if mask is not None:
        adversary["attention_mask"] = (real | marked).to(mask.dtype)
    return adversary


def away_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """−log(1 − p) of the labelled tokens, averaged over the completion positions.

    .. math::
        L_{away} = \\operatorname{mean}_{t:\\, y_{t+1} \\ne −100}
            −\\log\\big(1 − p_θ(y_{t+1} \\mid x_{\\le t})\\big)
            = \\operatorname{mean}_t \\Big[\\log \\sum_v e^{z_{t,v}} − \\log \\sum_{v \\ne y_{t+1}} e^{z_{t,v}}\\Big]

    The second form is finite as p → 1 (HarmBench's unlikelihood loss, used by CAT and
    LAT). ``logits``: [B, L, V]; ``labels``: [B, L], −100 outside the completion. Returns
    a 0-dim float32 tensor (0 when nothing is labelled).
    """
    positions = label_positions(labels)  # [B, L]: the logits at t score labels[t + 1]
    following = torch.zeros_like(labels)
    following[:, :-1] = labels[:, 1:]
    following = torch.where(positions, following, torch.zeros_like(following))  # [B, L] valid ids
    z = logits.float()
    everything = torch.logsumexp(z, dim=-1)  # [B, L]
    others = torch.logsumexp(z.scatter(-1, following.unsqueeze(-1), float("-inf")), dim=-1)  # [B, L]
    weights = positions.to(z.dtype)
    return ((everything - others) * weights).sum() / weights.sum().clamp(min=1)
