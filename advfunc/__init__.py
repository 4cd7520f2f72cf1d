"""advfunc: functional adversarial training for PyTorch transformer models.

Every method is a pure function of ``(params, batch)`` built on ``torch.func``::

    params = advfunc.params_of(model)
    pgd_step = advfunc.pgd(model, epsilon=1.0, alpha=0.3, steps=3)
    grads, out = pgd_step(params, batch)
    advfunc.set_grads(model, grads)
    optimizer.step()
"""

from advfunc import distributed, precision
from advfunc.accumulation import Accumulated, accumulate, split_batch
from advfunc.divergence import kl_logits, symmetric_kl
from advfunc.methods.awp import awp, awp_parameters
from advfunc.methods.fgm import fgm
from advfunc.methods.free_at import free_at
from advfunc.methods.freelb import freelb
from advfunc.methods.pgd import pgd
from advfunc.methods.r3f import r3f
from advfunc.methods.smart import smart
from advfunc.methods.vat import vat
from advfunc.parameters import params_of, set_grads, trainable_names
from advfunc.precision import LossScale
from advfunc.projection import project_l2, project_linf
from advfunc.step import Step, StepOutput
from advfunc.teacher import ema, teacher_of

__all__ = [
    "Accumulated",
    "LossScale",
    "Step",
    "StepOutput",
    "accumulate",
    "awp",
    "awp_parameters",
    "distributed",
    "ema",
    "fgm",
    "free_at",
    "freelb",
    "kl_logits",
    "params_of",
    "pgd",
    "precision",
    "project_l2",
    "project_linf",
    "r3f",
    "set_grads",
    "smart",
    "split_batch",
    "symmetric_kl",
    "teacher_of",
    "trainable_names",
    "vat",
]
__version__ = "0.1.0"
