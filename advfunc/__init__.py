"""advfunc: functional adversarial training for PyTorch transformer models.

Every method is a pure function of ``(params, batch)`` built on ``torch.func``::

    params = advfunc.params_of(model)
    pgd_step = advfunc.pgd(model, epsilon=1.0, alpha=0.3, steps=3)
    grads, out = pgd_step(params, batch)
    advfunc.set_grads(model, grads)
    optimizer.step()
"""

from advfunc.methods.fgm import fgm
from advfunc.methods.freelb import freelb
from advfunc.methods.pgd import pgd
from advfunc.parameters import params_of, set_grads, trainable_names
from advfunc.projection import project_l2, project_linf
from advfunc.step import Step, StepOutput

__all__ = [
    "Step",
    "StepOutput",
    "fgm",
    "freelb",
    "params_of",
    "pgd",
    "project_l2",
    "project_linf",
    "set_grads",
    "trainable_names",
]
__version__ = "0.1.0"
