"""The classic imperative FGM, PGD and FreeLB classes, kept as an oracle for the parity tests.

FGM and PGD are the blog post's classes as written (they mutate ``param.data`` and back
up gradients). FreeLB follows the official FreeLB loop: the 1/K loss scaling the
snippet omits, and the embedding recomputed every step. Its perturbation enters either
literally as ``inputs_embeds`` (BERT) or, for families that derive positions or pooling
from ``input_ids``, through a forward hook on the input embedding.
"""

from __future__ import annotations

import torch


class FGM:
    def __init__(self, model, emb_name, epsilon=1.0):
        self.model = model
        self.epsilon = epsilon
        self.emb_name = emb_name
        self.backup = {}

    def attack(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                self.backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0:
                    r_at = self.epsilon * param.grad / norm
                    param.data.add_(r_at)

    def restore(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                assert name in self.backup
                param.data = self.backup[name]
        self.backup = {}


class PGD:
    def __init__(self, model, emb_name, epsilon=1.0, alpha=0.3):
        self.model = model
        self.emb_name = emb_name
        self.epsilon = epsilon
        self.alpha = alpha
        self.emb_backup = {}
        self.grad_backup = {}

    def attack(self, is_first_attack=False):
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                if is_first_attack:
                    self.emb_backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0:
                    r_at = self.alpha * param.grad / norm
                    param.data.add_(r_at)
                    param.data = self.project(name, param.data, self.epsilon)

    def restore(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                assert name in self.emb_backup
                param.data = self.emb_backup[name]
        self.emb_backup = {}

    def project(self, param_name, param_data, epsilon):
        r = param_data - self.emb_backup[param_name]
        if torch.norm(r) > epsilon:
            r = epsilon * r / torch.norm(r)
        return self.emb_backup[param_name] + r

    def backup_grad(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                self.grad_backup[name] = param.grad.clone()

    def restore_grad(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                param.grad = self.grad_backup[name]


def classic_fgm_grads(model, batch, emb_name, epsilon):
    """The classic FGM training loop up to ``optimizer.step()``; returns the ``.grad`` it leaves."""
    fgm = FGM(model, epsilon=epsilon, emb_name=emb_name)
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    fgm.attack()
    loss_adv = model(**batch).loss
    loss_adv.backward()
    fgm.restore()
    return _grads(model)


def classic_pgd_grads(model, batch, emb_name, epsilon, alpha, K):
    """The classic PGD training loop up to ``optimizer.step()``."""
    pgd = PGD(model, emb_name=emb_name, epsilon=epsilon, alpha=alpha)
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    pgd.backup_grad()
    for t in range(K):
        pgd.attack(is_first_attack=(t == 0))
        if t != K - 1:
            model.zero_grad()
        else:
            pgd.restore_grad()
        loss_adv = model(**batch).loss
        loss_adv.backward()
    pgd.restore()
    return _grads(model)


def classic_freelb_grads(model, batch, adv_K, adv_lr, adv_init_mag, adv_max_norm, adv_norm_type, generator, via="hook"):
    """Official FreeLB's loop up to ``optimizer.step()``; returns (grads, final delta)."""
    model.zero_grad()
    embedding = model.get_input_embeddings()
    input_ids = batch["input_ids"]
    embeds_init = embedding(input_ids)
    input_mask = batch["attention_mask"].to(embeds_init)
    input_lengths = torch.sum(input_mask, 1)
    if adv_init_mag > 0:
        if adv_norm_type == "l2":
            delta = torch.zeros_like(embeds_init).uniform_(-1, 1, generator=generator) * input_mask.unsqueeze(2)
            dims = input_lengths * embeds_init.size(-1)
            mag = adv_init_mag / torch.sqrt(dims)
            delta = (delta * mag.view(-1, 1, 1)).detach()
        else:
            delta = torch.zeros_like(embeds_init).uniform_(-adv_init_mag, adv_init_mag, generator=generator)
            delta = (delta * input_mask.unsqueeze(2)).detach()
    else:
        delta = torch.zeros_like(embeds_init)
    for _ in range(adv_K):
        delta.requires_grad_()
        if via == "inputs_embeds":
            inputs = dict(batch)
            inputs["inputs_embeds"] = delta + embeds_init
            inputs["input_ids"] = None
            loss = model(**inputs).loss
        else:
            handle = embedding.register_forward_hook(lambda module, args, out, delta=delta: out + delta)
            try:
                loss = model(**batch).loss
            finally:
                handle.remove()
        loss = loss / adv_K
        loss.backward()
        delta_grad = delta.grad.clone().detach()
        if adv_norm_type == "l2":
            denorm = torch.norm(delta_grad.view(delta_grad.size(0), -1), dim=1).view(-1, 1, 1)
            denorm = torch.clamp(denorm, min=1e-8)
            delta = (delta + adv_lr * delta_grad / denorm).detach()
            if adv_max_norm > 0:
                delta_norm = torch.norm(delta.view(delta.size(0), -1).float(), p=2, dim=1).detach()
                exceed_mask = (delta_norm > adv_max_norm).to(embeds_init)
                reweights = (adv_max_norm / delta_norm * exceed_mask + (1 - exceed_mask)).view(-1, 1, 1)
                delta = (delta * reweights).detach()
        else:
            denorm = torch.norm(delta_grad.view(delta_grad.size(0), -1), dim=1, p=float("inf")).view(-1, 1, 1)
            denorm = torch.clamp(denorm, min=1e-8)
            delta = (delta + adv_lr * delta_grad / denorm).detach()
            if adv_max_norm > 0:
                delta = torch.clamp(delta, -adv_max_norm, adv_max_norm).detach()
        embeds_init = embedding(input_ids)
    return _grads(model), delta


def _grads(model):
    """Each trainable parameter's ``.grad`` (zeros where autograd left None)."""
    return {
        name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
        if p.requires_grad
    }
