"""Hugging Face integration: any ``Trainer`` (and TRL's ``SFTTrainer``) trained with an advfunc step.

- :class:`AdversarialTrainer`: ``transformers.Trainer`` with an advfunc step, on one process or many.
- :func:`adversarial`: the same for any ``Trainer`` subclass, e.g. ``adversarial(trl.SFTTrainer)``.
- :class:`ChatAdversaryCollator`: CAT/LAT batches (the adversary's completion) from a chat dataset.
"""

from advfunc.hf.chat import ChatAdversaryCollator
from advfunc.hf.replay import ReplaySampler
from advfunc.hf.trainer import METHOD_STATE, AdversarialTrainer, adversarial

__all__ = ["METHOD_STATE", "AdversarialTrainer", "ChatAdversaryCollator", "ReplaySampler", "adversarial"]
