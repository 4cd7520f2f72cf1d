"""Straightforward imperative implementations of VAT, SMART, R3F, AWP, FreeAT, ASCC and DNE: the oracle.

Written from the papers' equations (and, for AWP, the AWP class common in Kaggle NLP
solutions) the way a training script would: ``loss.backward()`` into ``.grad``,
``param.data`` mutated and restored, ``F.kl_div`` for the divergences. They share no
code with advfunc. The perturbation of the embedding output enters literally as
``inputs_embeds`` (BERT) or, for families that read ``input_ids`` themselves (GPT-2
pools at the last non-padding token), through a forward hook on the input embedding.
Random draws use the same generator calls as advfunc: one [B, L, H] draw per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def forward(model, batch, delta=None, via="inputs_embeds"):
    """model(**batch) with ``delta`` [B, L, H] added to the input-embedding output."""
    if delta is None:
        return model(**batch)
    embedding = model.get_input_embeddings()
    if via == "inputs_embeds":
        inputs = dict(batch)
        inputs["inputs_embeds"] = embedding(inputs.pop("input_ids")) + delta
        return model(**inputs)
    handle = embedding.register_forward_hook(lambda module, args, out: out + delta)
    try:
        return model(**batch)
    finally:
        handle.remove()


def mask_of(batch):
    return batch["attention_mask"].unsqueeze(-1).float()  # [B, L, 1]


def noise_shape(model, batch):
    return (*batch["input_ids"].shape, model.get_input_embeddings().weight.shape[1])


def kl(p_logits, q_logits):
    """KL(p ‖ q), batchmean."""
    return F.kl_div(F.log_softmax(q_logits, dim=-1), F.softmax(p_logits, dim=-1), reduction="batchmean")


def symmetric_kl(a, b):
    return kl(a, b) + kl(b, a)


def per_example_norm(x):
    return x.flatten(1).norm(dim=1).view(-1, 1, 1)


def grads_of(model):
    return {
        name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def reference_vat(model, batch, epsilon, xi, alpha, power_iters, generator, via="inputs_embeds"):
    """Miyato et al.'s text VAT; returns (grads, r_vadv, vat_kl)."""
    model.zero_grad()
    mask = mask_of(batch)
    out = forward(model, batch, via=via)
    if "labels" in batch:
        out.loss.backward()
    clean_logits = out.logits.detach()
    d = torch.randn(noise_shape(model, batch), generator=generator) * mask
    for _ in range(power_iters):
        d = (xi * d / per_example_norm(d)).requires_grad_()
        probe = forward(model, batch, d * mask, via=via).logits
        (d,) = torch.autograd.grad(kl(clean_logits, probe), [d])
    r_vadv = epsilon * d / per_example_norm(d)
    vat_kl = kl(clean_logits, forward(model, batch, r_vadv * mask, via=via).logits)
    (alpha * vat_kl).backward()
    return grads_of(model), r_vadv, vat_kl.detach()


def reference_smart(
    model,
    teacher,
    batch,
    epsilon,
    step_size,
    steps,
    noise_var,
    lambda_s,
    mu,
    norm,
    generator,
    task=True,
    via="inputs_embeds",
):
    """SMART (Jiang et al., Algorithm 1 with a symmetric-KL ascent); returns (grads, delta, smoothness)."""
    model.zero_grad()
    mask = mask_of(batch)
    out = forward(model, batch, via=via)
    logits = out.logits
    noise = torch.randn(noise_shape(model, batch), generator=generator) * noise_var * mask
    for _ in range(steps):
        noise.requires_grad_()
        adv_logits = forward(model, batch, noise * mask, via=via).logits
        (g,) = torch.autograd.grad(symmetric_kl(logits.detach(), adv_logits), [noise])
        size = g.abs().amax(dim=-1, keepdim=True) if norm == "linf" else g.norm(dim=-1, keepdim=True)
        direction = torch.where(size > 0, g / torch.where(size > 0, size, torch.ones_like(size)), torch.zeros_like(g))
        noise = noise.detach() + step_size * direction
        if norm == "linf":
            noise = noise.clamp(-epsilon, epsilon)
        else:
            token_norm = noise.norm(dim=-1, keepdim=True)
            noise = torch.where(token_norm > epsilon, noise * epsilon / token_norm, noise)
    adv_logits = forward(model, batch, noise * mask, via=via).logits
    smoothness = symmetric_kl(logits, adv_logits)
    total = lambda_s * smoothness
    if task:
        total = total + out.loss
    if mu > 0:
        with torch.no_grad():
            teacher_logits = teacher(**batch).logits
        total = total + mu * symmetric_kl(logits, teacher_logits)
    total.backward()
    return grads_of(model), noise.detach(), smoothness.detach()


def reference_ema_(teacher, model, beta):
    """θ̃ ← β θ̃ + (1 − β) θ, in place on the teacher module."""
    with torch.no_grad():
        for t, p in zip(teacher.parameters(), model.parameters(), strict=True):
            t.data = beta * t.data + (1 - beta) * p.data


def reference_r3f(model, batch, sigma, lambda_, noise, generator, task=True, via="inputs_embeds"):
    """fairseq's R3F: one noised forward, symmetric KL, no ascent; returns (grads, z, sym_kl)."""
    model.zero_grad()
    mask = mask_of(batch)
    out = forward(model, batch, via=via)
    shape = noise_shape(model, batch)
    if noise == "uniform":
        z = torch.empty(shape).uniform_(-sigma, sigma, generator=generator) * mask
    else:
        z = torch.randn(shape, generator=generator) * sigma * mask
    noised = forward(model, batch, z, via=via).logits
    sym = symmetric_kl(out.logits, noised)
    total = lambda_ * sym + (out.loss if task else 0.0)
    total.backward()
    return grads_of(model), z, sym.detach()


class ReferenceAWP:
    """The Kaggle AWP class: ``param.data`` moved by adv_lr·g/‖g‖·‖w‖ and clamped to its box."""

    def __init__(self, model, names, adv_lr, adv_eps, adv_steps):
        self.model = model
        self.names = set(names)
        self.adv_lr = adv_lr
        self.adv_eps = adv_eps
        self.adv_steps = adv_steps
        self.backup = {}
        self.box = {}

    def _selected(self):
        return [(n, p) for n, p in self.model.named_parameters() if n in self.names]

    def _save(self):
        for name, param in self._selected():
            self.backup[name] = param.data.clone()
            half = self.adv_eps * param.data.abs()
            self.box[name] = (self.backup[name] - half, self.backup[name] + half)

    def _attack_step(self, grads):
        for name, param in self._selected():
            norm1 = torch.norm(grads[name])
            norm2 = torch.norm(param.data)
            if norm1 != 0 and not torch.isnan(norm1):
                param.data.add_(self.adv_lr * grads[name] / norm1 * norm2)
                param.data = torch.min(torch.max(param.data, self.box[name][0]), self.box[name][1])

    def _restore(self):
        for name, param in self._selected():
            param.data = self.backup[name]
        self.backup = {}

    def grads(self, batch):
        """clean grads + grads at the perturbed weights; returns (grads, {name: w' − w})."""
        self.model.zero_grad()
        self.model(**batch).loss.backward()
        clean = grads_of(self.model)
        self._save()
        attack_grads = clean
        for _ in range(self.adv_steps):
            self._attack_step(attack_grads)
            self.model.zero_grad()
            self.model(**batch).loss.backward()
            attack_grads = grads_of(self.model)
        moved = {name: param.data - self.backup[name] for name, param in self._selected()}
        self._restore()
        total = {name: clean[name] + attack_grads[name] for name in clean}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                param.grad = total[name]
        return total, moved


def reference_free_at(model, batch, delta, epsilon, alpha, norm, via="inputs_embeds"):
    """One replay of Shafahi et al.'s free training; returns (grads, next delta)."""
    model.zero_grad()
    mask = mask_of(batch)
    if delta is None:
        delta = torch.zeros(noise_shape(model, batch))
    delta = delta.clone().requires_grad_()
    forward(model, batch, delta * mask, via=via).loss.backward()
    g = delta.grad.detach()
    if norm == "linf":
        following = (delta.detach() + alpha * g.sign()) * mask
        following = following.clamp(-epsilon, epsilon)
    else:
        following = (delta.detach() + alpha * g / per_example_norm(g)) * mask
        size = per_example_norm(following)
        following = torch.where(size > epsilon, following * epsilon / size, following)
    return grads_of(model), following


def neighbourhoods(table_ids, table_mask, ids, second_hop_width=None):
    """Per token of ``ids`` [B, L], a list of (neighbour id, hop) pairs, built with Python sets and loops.

    One hop: the token, then its synonyms in table order. Two hops (DNE): then the
    synonyms' synonyms in table order, each id once at its nearest hop, cut at the width.
    """
    synonyms = [
        [int(t) for t, m in zip(row, keep, strict=True) if m] for row, keep in zip(table_ids, table_mask, strict=True)
    ]
    result = []
    for row in ids.tolist():
        out_row = []
        for token in row:
            pairs = [(token, 0)] + [(s, 1) for s in synonyms[token]]
            if second_hop_width is not None:
                seen = {t for t, _ in pairs}
                for s in synonyms[token]:
                    for s2 in synonyms[s]:
                        if s2 not in seen:
                            seen.add(s2)
                            pairs.append((s2, 2))
                pairs = pairs[:second_hop_width]
            out_row.append(pairs)
        result.append(out_row)
    return result


def combination_delta(model, pairs, weights, through_embedding=False):
    """δ [B, L, H] = Σ_j w_j e(n_j) − e(x) per token, 0 at padding and at tokens without synonyms; with
    ``through_embedding`` differentiable in the embedding matrix, so that e(x) + δ is the papers' forward
    Σ_j w_j e(n_j) for the parameter gradient."""
    embedding = model.get_input_embeddings().weight
    embedding = embedding if through_embedding else embedding.detach()
    rows = []
    for row_pairs, row_weights in zip(pairs, weights, strict=True):
        rows.append(
            torch.stack(
                [
                    sum(w * embedding[n] for (n, _), w in zip(token_pairs, token_weights, strict=False))
                    - embedding[token_pairs[0][0]]
                    for token_pairs, token_weights in zip(row_pairs, row_weights, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def reference_ascc(model, batch, pairs, steps, lr, sparsity, beta):
    """ASCC as its reference implementation writes it: logits z as a leaf, ``torch.optim.Adam``, ``loss.backward()``.

    Minimises −(Σ_batch KL(p_clean ‖ p_adv)) + sparsity · mean_{b,l} H(softmax z), z₀ = 0,
    invalid neighbours at −∞; then the training loss CE + β · KL (batch mean), both
    forwards differentiated. Returns (δ, the model's .grad after backward).
    """
    batch_size, length = batch["input_ids"].shape
    width = max(len(p) for row in pairs for p in row)
    live_mask = torch.zeros(batch_size, length, width, dtype=torch.bool)
    for b, row in enumerate(pairs):
        for t, token_pairs in enumerate(row):
            live_mask[b, t, : len(token_pairs)] = True
    keep = (batch["attention_mask"].bool() & live_mask[..., 1:].any(-1)).unsqueeze(-1).float()  # [B, L, 1]
    embedding = model.get_input_embeddings().weight.detach()
    neighbour_ids = torch.zeros(batch_size, length, width, dtype=torch.long)
    for b, row in enumerate(pairs):
        for t, token_pairs in enumerate(row):
            neighbour_ids[b, t, : len(token_pairs)] = torch.tensor([n for n, _ in token_pairs])
    neighbours = embedding[neighbour_ids]  # [B, L, N, H]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        clean = model(**inputs).logits
    z = torch.zeros(batch_size, length, width, requires_grad=True)
    optimizer = torch.optim.Adam([z], lr=lr)

    def delta_of(logits):
        w = torch.softmax(logits.masked_fill(~live_mask, float("-inf")), -1)
        return ((w.unsqueeze(-1) * neighbours).sum(2) - neighbours[:, :, 0]) * keep, w

    for _ in range(steps):
        optimizer.zero_grad()
        delta, w = delta_of(z)
        adversarial = forward(model, inputs, delta, via="hook").logits
        divergence = F.kl_div(F.log_softmax(adversarial, -1), F.softmax(clean, -1), reduction="sum")
        safe = torch.where(
            live_mask, w, torch.ones_like(w)
        )  # 1 · log 1 = 0 where no neighbour is, with a finite gradient
        entropy = -(safe * safe.log()).sum(-1).mean()
        (-divergence + sparsity * entropy).backward()
        optimizer.step()
    delta = delta_of(z.detach())[0]
    model.zero_grad()
    clean_out = model(**batch)
    # The training forward is Σ_j w_j e(n_j) with the embedding matrix live: its rows get the gradient by w.
    live = model.get_input_embeddings().weight[neighbour_ids]
    w = torch.softmax(z.detach().masked_fill(~live_mask, float("-inf")), -1)
    trained = ((w.unsqueeze(-1) * live).sum(2) - live[:, :, 0]) * keep
    adversarial = forward(model, inputs, trained, via="hook").logits
    (clean_out.loss + beta * kl(clean_out.logits, adversarial)).backward()
    return delta, grads_of(model)


def simplex_projection_by_bisection(values, count):
    """The Euclidean projection of ``values[:count]`` onto the simplex, τ found by 200 bisections in float64."""
    v = values[:count].double()
    low, high = float(v.min()) - 1, float(v.max())
    for _ in range(200):
        tau = (low + high) / 2
        if float((v - tau).clamp_min(0).sum()) > 1:
            low = tau
        else:
            high = tau
    out = torch.zeros_like(values, dtype=torch.float64)
    out[:count] = (v - (low + high) / 2).clamp_min(0)
    return out.float()


def reference_dne(model, batch, pairs, start, steps, step_size):
    """DNE's ascent from the weights ``start`` (a list per token): w ← Π_Δ(w + η g/‖g‖), g = ∂L/∂w by autograd.

    Returns (δ_K, the model's .grad of CE(clean) + Σ_{t<K} CE(δ_t)).
    """
    weights = [[torch.tensor(w, dtype=torch.float32) for w in row] for row in start]
    model.zero_grad()
    model(**batch).loss.backward()
    for _ in range(steps):
        leaves = [[w.clone().requires_grad_(True) for w in row] for row in weights]
        delta = combination_delta(model, pairs, leaves, through_embedding=True)
        forward(model, batch, delta * mask_of(batch), via="hook").loss.backward()
        moved = []
        for row_pairs, row in zip(pairs, leaves, strict=True):
            moved_row = []
            for token_pairs, w in zip(row_pairs, row, strict=True):
                g = w.grad
                norm = float(g.norm())
                step = w.detach() + (step_size * g / norm if norm > 0 else 0 * g)
                moved_row.append(simplex_projection_by_bisection(step, len(token_pairs)))
            moved.append(moved_row)
        weights = moved
    delta = combination_delta(model, pairs, weights)
    return delta * mask_of(batch), grads_of(model)


def distance_to_hull(point: torch.Tensor, vertices: torch.Tensor, iterations: int = 3000) -> float:
    """min over the simplex of ‖Σ w v − point‖, by projected gradient descent in float64 (sort-based projection)."""
    v, p = vertices.double(), point.double()
    w = torch.full((len(v),), 1.0 / len(v), dtype=torch.float64)
    step = 1.0 / float(torch.linalg.matrix_norm(v @ v.T, ord=2))
    for _ in range(iterations):
        y = w - step * (v @ (w @ v - p))
        u = y.sort(descending=True).values
        css = u.cumsum(0) - 1
        k = int((u > css / torch.arange(1, len(u) + 1)).sum())
        w, previous = (y - css[k - 1] / k).clamp_min(0), w
        if float((w - previous).abs().max()) < 1e-15:  # a fixed point of the projected step: the minimum
            break
    return float((w @ v - p).norm())
