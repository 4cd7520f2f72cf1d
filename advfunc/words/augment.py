"""A2T: adversarial training on word substitutions that a cheap attack finds during training.

Yoo & Qi, "Towards Improving Adversarial Training of NLP Models" (Findings of EMNLP 2021).
A2T trains on

.. math::
    L(θ) = L_{clean}(θ) + α · L_{adv}(θ)

where the adversarial examples of ``L_adv`` are made, with the parameters being trained,
for a share γ of the training examples by an attack cheap enough to run inside training:
TextFooler's greedy search with the words ranked by the norm of the loss gradient at
their embeddings (one forward and backward instead of one query per word), few synonym
candidates per word, few words changed and a sentence-similarity bound. A2T's attack
recipe (TextAttack's ``A2TYoo2021``) takes 20 candidates per word, changes at most 10% of
the words, keeps their part of speech and a sentence cosine >= 0.9; :data:`A2T_ATTACK`
sets the same bounds on this library's synonym attack
(:mod:`advfunc.words.synonym_attack`: WordNet candidates, the usual part of speech, a
sentence encoder given by the caller), and adds a query budget so that no example can
cost more than ``query_budget`` classifications.

:func:`a2t_examples` does one round of it for a batch: it draws ``ratio`` (γ) of the
examples with a seeded generator, attacks them with the model in eval mode (the mode of
every module restored after) and returns the adversarial texts that flipped the
prediction, with their labels and the cost. A trainer then adds α/B · Σ_j ℓ(x'_j, y_j) over
them to the batch's loss (B the batch size, :class:`advfunc.hf.augmentation.A2TAugmenter`):
each adversarial example weighs α times a clean one, as in A2T's training set, where the
adversarial examples join the clean ones with their loss multiplied by α. A2T makes them
once per epoch for γ of the training set; made per batch, they attack the parameters the
batch trains.

Cost of one round: for each attacked example at most ``attack.query_budget`` classified
texts (the gradient ranking counts as one) and the sentence encoder's passes over the
candidates; the examples not drawn cost nothing. Training on the adversarial examples costs
one more forward and backward over them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from advfunc.words.synonym_attack import Encode, SynonymAttackConfig, attack_texts
from advfunc.words.victim import Victim
from advfunc.words.wordnet import WordNet

# A2T's attack recipe on this library's synonym attack; the query budget is this library's own cap.
A2T_ATTACK = SynonymAttackConfig(
    max_candidates=20,
    max_change=0.1,
    query_budget=100,
    similarity=0.9,
    search="textfooler",
    order="gradient",
    part_of_speech="usual",
)


@dataclass(frozen=True)
class A2TConfig:
    """A2T's settings: the share of each batch attacked, the adversarial loss's weight, the attack."""

    ratio: float = field(default=0.2, metadata={"help": "γ: the share of each batch's examples attacked"})
    weight: float = field(default=1.0, metadata={"help": "α: an adversarial example's loss weighs α clean ones"})
    attack: SynonymAttackConfig = A2T_ATTACK

    def check(self) -> None:
        """Raise ``ValueError`` naming a bad value and what to give instead."""
        if not (isinstance(self.ratio, int | float) and 0 < self.ratio <= 1):
            raise ValueError(
                f"ratio must be the share of each batch to attack, in (0, 1], got {self.ratio!r}; e.g. 0.2"
            )
        if not (isinstance(self.weight, int | float) and math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(
                f"weight (α) must be a finite number > 0, got {self.weight!r}; e.g. 1.0 (to train without the "
                "adversarial examples, give no A2T config)"
            )
        if not isinstance(self.attack, SynonymAttackConfig):
            raise ValueError(f"attack must be a SynonymAttackConfig, got {type(self.attack).__name__}; e.g. A2T_ATTACK")
        self.attack.check()


@dataclass(frozen=True)
class AugmentationCost:
    """What the rounds of :func:`a2t_examples` cost: examples seen and attacked, flips found, queries, seconds.

    ``queries`` counts classified texts (the gradient ranking as one); ``seconds`` is the
    wall time of the attacks, the sentence encoder's and the gradient ranking's passes included.
    """

    examples: int = 0
    attacked: int = 0
    succeeded: int = 0
    queries: int = 0
    seconds: float = 0.0

    def __add__(self, other: AugmentationCost) -> AugmentationCost:
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return AugmentationCost(*(a + b for a, b in pairs))

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AdversarialExamples:
    """One round's successful adversarial texts, their labels, the positions of their originals, the cost."""

    texts: list[str]
    labels: list[int]
    positions: list[int]
    cost: AugmentationCost


def chosen_examples(count: int, ratio: float, generator: torch.Generator) -> list[int]:
    """The positions (ascending) of the examples to attack among ``count``: ``ratio`` of them, drawn uniformly.

    The number is ⌊ratio · count + u⌋ with u ~ U[0, 1) from ``generator``: ratio · count
    in expectation, and one of the two integers around it, so that small batches do not all
    round the share down. Each call draws u and one permutation, whatever the count drawn:
    the same generator state gives the same choice.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    shift = float(torch.rand((), generator=generator))
    order = torch.randperm(count, generator=generator)
    return sorted(order[: math.floor(ratio * count + shift)].tolist())


def a2t_examples(
    victim: Victim,
    texts: Sequence[str],
    labels: Sequence[int],
    config: A2TConfig,
    generator: torch.Generator,
    *,
    wordnet: WordNet,
    encode: Encode,
) -> AdversarialExamples:
    """A2T's adversarial examples for ``ratio`` of (``texts``, ``labels``), drawn with ``generator``.

    The drawn examples are attacked by :func:`advfunc.words.synonym_attack.attack_texts`
    with ``config.attack`` (words ranked by :meth:`Victim.gradient_importance`, only the
    words ``victim`` reads changed), the victim's model in eval mode; every module's mode
    is restored after, even when the attack raises. ``encode`` embeds texts for the
    similarity bound (it is never called when ``attack.similarity`` is -1). An example the
    model already misclassifies, or whose label does not flip within the budgets, gives none.
    """
    config.check()
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of texts, got one str; pass [text]")
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    chosen = chosen_examples(len(texts), config.ratio, generator)
    model = victim.model
    modes = [(module, module.training) for module in model.modules()]
    began = time.perf_counter()
    try:
        model.eval()
        results = attack_texts(
            [texts[i] for i in chosen],
            [labels[i] for i in chosen],
            victim,
            encode,
            wordnet,
            config.attack,
            victim.gradient_importance,
            victim.seen_ids,
        )
    finally:
        for module, training in modes:
            module.training = training
    seconds = time.perf_counter() - began
    flipped = [(i, r) for i, r in zip(chosen, results, strict=True) if r.status == "succeeded"]
    cost = AugmentationCost(len(texts), len(chosen), len(flipped), sum(r.queries for r in results), seconds)
    return AdversarialExamples(
        [r.adversarial for _, r in flipped], [r.label for _, r in flipped], [i for i, _ in flipped], cost
    )
