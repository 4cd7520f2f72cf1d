"""advfunc: functional adversarial training for PyTorch transformer models.

Every attack is a pure function that returns a perturbation, and every method a pure
step of ``(params, batch)`` built on ``torch.func``::

    params = advfunc.params_of(model)
    delta = advfunc.attacks.pgd(model, epsilon=1.0, alpha=0.3, steps=3)(params, batch)
    pgd_step = advfunc.pgd(model, epsilon=1.0, alpha=0.3, steps=3)
    grads, out = pgd_step(params, batch)
    advfunc.set_grads(model, grads)
    optimizer.step()
"""

from advfunc import attacks
from advfunc.attacks.awp import awp_parameters
from advfunc.core.completion import ADV_LABELS, away_loss
from advfunc.core.divergence import kl_logits, label_positions, symmetric_kl
from advfunc.core.params import params_of, set_grads, trainable_names
from advfunc.core.perturbed_loss import perturbed_loss
from advfunc.core.perturbed_outputs import perturbed_outputs
from advfunc.core.projection import project_l2, project_linf
from advfunc.core.stateful import StatefulStep, stateful
from advfunc.core.step import Step, StepOutput
from advfunc.core.targets import PERTURB_MASK
from advfunc.methods.ascc import ascc
from advfunc.methods.awp import awp
from advfunc.methods.cat import cat
from advfunc.methods.dne import dne
from advfunc.methods.fgm import fgm
from advfunc.methods.free_at import free_at
from advfunc.methods.freelb import freelb
from advfunc.methods.lat import lat
from advfunc.methods.neftune import neftune
from advfunc.methods.pgd import pgd
from advfunc.methods.r3f import r3f
from advfunc.methods.refat import refat
from advfunc.methods.rerouting import rerouting
from advfunc.methods.residual import HARMFUL
from advfunc.methods.smart import smart
from advfunc.methods.teacher import ema, teacher_of
from advfunc.methods.vat import vat
from advfunc.scale import distributed, precision
from advfunc.scale.accumulation import Accumulated, accumulate, split_batch
from advfunc.scale.precision import LossScale

__all__ = [
    "ADV_LABELS",
    "HARMFUL",
    "PERTURB_MASK",
    "Accumulated",
    "LossScale",
    "StatefulStep",
    "Step",
    "StepOutput",
    "accumulate",
    "ascc",
    "attacks",
    "away_loss",
    "awp",
    "awp_parameters",
    "cat",
    "distributed",
    "dne",
    "ema",
    "fgm",
    "free_at",
    "freelb",
    "kl_logits",
    "label_positions",
    "lat",
    "neftune",
    "params_of",
    "perturbed_loss",
    "perturbed_outputs",
    "pgd",
    "precision",
    "project_l2",
    "project_linf",
    "r3f",
    "refat",
    "rerouting",
    "set_grads",
    "smart",
    "split_batch",
    "stateful",
    "symmetric_kl",
    "teacher_of",
    "trainable_names",
    "vat",
]
__version__ = "0.1.0"
