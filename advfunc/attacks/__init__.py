"""Attacks as pure functions: ``delta = attack(params, batch, grads=None)``.

Each factory binds one perturbation rule (:class:`Rule`) to a model and returns an
:class:`Attack`. ``grads`` is the gradient with respect to the perturbation at δ = 0 when
the caller already has it; the delta is the same with and without it. Train on any
objective around an attack with :func:`advfunc.perturbed_loss`::

    attack = advfunc.attacks.pgd(model, epsilon=1.0, alpha=0.3, steps=3, target="embeds")
    loss_at = advfunc.perturbed_loss(model, target="embeds")
    delta = attack(params, batch)                                # [B, L, H]
    grads = torch.func.grad(lambda p: loss_at(p, batch, 0 * delta) + loss_at(p, batch, delta))(params)
"""

from advfunc.attacks.adaptive import AdaptiveAttack, SuccessRate, adaptive, success_rate
from advfunc.attacks.ascc import ascc
from advfunc.attacks.attack import Attack, Rule
from advfunc.attacks.awp import awp, awp_parameters
from advfunc.attacks.cat import CompletionAttack, cat
from advfunc.attacks.dne import dne
from advfunc.attacks.fgm import fgm
from advfunc.attacks.free_at import free_at
from advfunc.attacks.freelb import freelb
from advfunc.attacks.lat import lat
from advfunc.attacks.neftune import neftune
from advfunc.attacks.pgd import pgd
from advfunc.attacks.r3f import r3f
from advfunc.attacks.smart import smart
from advfunc.attacks.synonyms import SynonymTable
from advfunc.attacks.vat import vat

__all__ = [
    "AdaptiveAttack",
    "Attack",
    "CompletionAttack",
    "Rule",
    "SuccessRate",
    "SynonymTable",
    "adaptive",
    "ascc",
    "awp",
    "awp_parameters",
    "cat",
    "dne",
    "fgm",
    "free_at",
    "freelb",
    "lat",
    "neftune",
    "pgd",
    "r3f",
    "smart",
    "success_rate",
    "vat",
]
