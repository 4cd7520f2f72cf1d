"""CAT and targeted LAT written the way the papers' loops are: leaves, hooks, ``.backward()``, ``.grad``.

One straightforward imperative training step for both: the adversary's δ is a leaf
added at the prompt positions of the input embeddings (CAT) or of a layer's output
(LAT) by a forward hook written here; K descent steps on the loss of the adversary's
completion, each projected per token; then the defender's toward, away and clean
losses, backpropagated into ``.grad``. Shares no code with advfunc.
"""

from __future__ import annotations

import torch
from torch import nn


def _forward(model: nn.Module, offsets: dict[nn.Module, torch.Tensor], **kwargs):
    """model(**kwargs) with each offset added to its module's output (the first element of a tuple)."""

    def adder(offset):
        def hook(mod, args, output):
            if isinstance(output, tuple):
                return (output[0] + offset, *output[1:])
            return output + offset

        return hook

    handles = [module.register_forward_hook(adder(offset)) for module, offset in offsets.items()]
    try:
        return model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()


def unlikelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean over labelled next tokens of −log(1 − p), written with log1p."""
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    counted = shifted_labels != -100
    probs = torch.softmax(shifted_logits.double(), -1)
    p = probs.gather(-1, shifted_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (-torch.log1p(-p))[counted].mean().float()


def reference_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    where: list[str],  # "embeds" (the input embedding) or module names
    epsilon: float,
    alpha: float,
    steps: int,
    rule: str,  # "sign" (CAT) or "l2" (LAT)
    norm: str = "l2",
    toward: float = 1.0,
    away: float = 1.0,
    clean: float = 1.0,
    reference_model: nn.Module | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the ``.grad`` of every trainable parameter after one step, the final δ of each place)."""
    ids, mask, labels, adv = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["adv_labels"]
    adv_ids = torch.where(adv != -100, adv, ids)
    adv_mask = torch.where(adv != -100, torch.ones_like(mask), mask)
    prompt = ((mask == 1) & (labels == -100)).unsqueeze(-1).float()  # [B, L, 1]
    modules = {n: model.get_input_embeddings() if n == "embeds" else model.get_submodule(n) for n in where}
    hidden = model.config.hidden_size

    deltas = {n: torch.zeros(*ids.shape, hidden, device=ids.device, requires_grad=True) for n in where}
    for _ in range(steps):
        offsets = {modules[n]: deltas[n] * prompt for n in where}
        loss = _forward(model, offsets, input_ids=adv_ids, attention_mask=adv_mask, labels=adv).loss
        found = torch.autograd.grad(loss, [deltas[n] for n in where])
        moved_all = {}
        with torch.no_grad():
            for n, g in zip(where, found, strict=True):
                if rule == "sign":
                    moved = deltas[n] - alpha * g.sign()
                else:
                    norms = g.norm(dim=-1, keepdim=True)
                    moved = deltas[n] - alpha * torch.where(norms > 0, g / torch.where(norms > 0, norms, 1), 0)
                if norm == "l2":
                    sizes = moved.norm(dim=-1, keepdim=True)
                    moved = torch.where(sizes > epsilon, moved * epsilon / sizes, moved)
                else:
                    moved = moved.clamp(-epsilon, epsilon)
                moved_all[n] = moved.requires_grad_(True)
        deltas = moved_all
    final = {n: (d.detach() * prompt) for n, d in deltas.items()}

    model.zero_grad(set_to_none=True)
    offsets = {modules[n]: final[n] for n in where}
    total = toward * _forward(model, offsets, input_ids=ids, attention_mask=mask, labels=labels).loss
    if away > 0:
        logits = _forward(model, offsets, input_ids=adv_ids, attention_mask=adv_mask).logits
        total = total + away * unlikelihood(logits, adv)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    if reference_model is None:
        total = total + clean * out.loss
    else:
        with torch.no_grad():
            ref = reference_model(input_ids=ids, attention_mask=mask).logits
        counted = torch.zeros_like(labels, dtype=torch.bool)
        counted[:, :-1] = labels[:, 1:] != -100
        log_p = torch.log_softmax(out.logits[counted], -1)
        log_r = torch.log_softmax(ref[counted], -1)
        kl = (log_p.exp() * (log_p - log_r)).sum(-1).mean()
        total = total + clean * kl
    total.backward()
    grads = {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    model.zero_grad(set_to_none=True)
    return grads, final
