"""Evaluation: clean accuracy, and accuracy under the embedding-space and word-level attacks.

Robust accuracy at radius r counts an example as correct when it is classified
correctly clean and no attack at any radius r' ≤ r broke it: a perturbation found in the
r'-ball also lies in the r-ball, so this is the accuracy under the strongest attack run
within r, and it can never rise with the radius. The same holds for the HotFlip budget.
Attacks run on a bounded subset (the first ``examples`` of the evaluation set, which is
in a fixed pseudo-random order), clean accuracy on the whole set.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from advfunc import attacks
from advfunc.app import checkpoint
from advfunc.app.data import Encoded, evaluation_batches
from advfunc.app.progress import Progress
from advfunc.app.synonym_attack import AttackSummary, SynonymAttackConfig, attack_text
from advfunc.app.victim import SentenceEncoder, Victim
from advfunc.app.word_attacks import WordVocabulary, hotflip
from advfunc.app.wordnet import WordNet
from advfunc.core.arguments import require_positive, require_steps
from advfunc.core.model import PerturbedModel, logits_of
from advfunc.core.params import params_of
from advfunc.core.step import prepare

log = logging.getLogger("advfunc")


@dataclass(frozen=True)
class AttackConfig:
    """Attack settings. Radii are L2 norms per example over (seq, hidden) of the embedding output."""

    # A fine-tuned MiniLM loses most predictions by 0.25 (its token embeddings have norm ~1).
    radii: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    pgd_steps: int = 5
    hotflip_budget: int = 3
    neighbours: int = 50
    examples: int = 256
    batch_size: int = 32
    synonym: SynonymAttackConfig | None = field(default_factory=SynonymAttackConfig)  # None: not run
    encoder: str | None = None  # the similarity constraint's sentence encoder; None: all-MiniLM-L6-v2

    def check(self) -> None:
        """Raise ``ValueError`` naming the first setting that is not a finite number in its range."""
        if not self.radii:
            raise ValueError("radii is empty; give at least one radius")
        for radius in self.radii:
            require_positive("radius", radius)
        for name in ("pgd_steps", "neighbours", "examples", "batch_size"):
            require_steps(name.replace("_", "-"), getattr(self, name))
        if isinstance(self.hotflip_budget, bool) or not isinstance(self.hotflip_budget, int) or self.hotflip_budget < 0:
            raise ValueError(f"hotflip-budget must be an integer >= 0, got {self.hotflip_budget!r}")
        if self.synonym is not None:
            self.synonym.check()


@dataclass
class EvalResult:
    """Accuracies; ``robust``/``hotflip`` are over the ``attack_examples`` subset."""

    clean_accuracy: float
    examples: int
    attack_examples: int
    attack_clean_accuracy: float
    robust: dict[float, float] = field(default_factory=dict)  # radius -> accuracy
    hotflip: dict[int, float] = field(default_factory=dict)  # changed tokens -> accuracy
    synonym: dict[str, Any] | None = None  # the synonym attack's summary (AttackSummary's fields)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["robust"] = {str(k): v for k, v in self.robust.items()}
        data["hotflip"] = {str(k): v for k, v in self.hotflip.items()}
        return data


class EvalMode:
    """Eval mode for the block, the previous mode restored after (training may continue)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def _device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are: evaluation batches are built there."""
    return next(model.parameters()).device


def accuracy(model: nn.Module, data: Encoded, batch_size: int = 64, progress: bool = False) -> float:
    """Fraction of ``data`` the model classifies correctly (eval mode, no gradients)."""
    correct = 0
    device = _device_of(model)
    batches = evaluation_batches(data.lengths(), batch_size)
    with EvalMode(model), torch.inference_mode(), Progress(len(batches), "clean", progress) as bar:
        for indices in batches:
            batch = data.batch(indices, device)
            logits = model(**batch).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            bar.update()
    return correct / len(data)


def _trimmed(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows of ``batch``, cut to their own longest example (right padding)."""
    width = int(batch["attention_mask"][rows].sum(1).max())
    return {k: (v[rows, :width] if v.dim() == 2 else v[rows]) for k, v in batch.items()}


def embedding_pgd(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    batch: Mapping[str, Any],
    radius: float,
    steps: int,
    step_size: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 PGD on the embedding output, :func:`advfunc.attacks.pgd`: (δ [B, L, H], broken [B] bool).

    .. math::
        δ_0 = 0,\\quad δ_t = Π_r\\big(δ_{t-1} + α · G_t/‖G_t‖₂\\big),\\quad
        G_t = ∇_δ \\mathrm{CE}(f(x + δ), y)

    with per-example norms over (seq, hidden) and padding masked, α = 2.5·r/steps unless
    ``step_size`` is given (Madry et al., 2018). ``broken[b]`` is true when example b is
    misclassified clean or at δ_K. Cost: ``steps`` passes to δ only and two forwards.

    Raises ``FloatingPointError`` when the attack's arithmetic overflowed (a non-finite
    gradient, which makes the attack drop δ, or non-finite logits at δ_K): a broken attack
    must not be reported as an attack that changed nothing.
    """
    alpha = step_size if step_size is not None else 2.5 * radius / steps
    attack = attacks.pgd(model, epsilon=radius, alpha=alpha, steps=steps, target="embeds", compile=False)
    call = prepare(model, attack.perturbed, attack.target, params, batch)
    with attack.perturbed.hooked(count=False):
        placed, skipped = attack.run(call)
        with torch.no_grad():
            clean = logits_of(attack.engine.outputs(call.params, call.kwargs, call.layout, call.zeros(attack.target)))
            attacked = logits_of(attack.engine.outputs(call.params, call.kwargs, call.layout, placed))
    if bool(skipped) or not bool(torch.isfinite(attacked).all()):
        raise FloatingPointError(
            f"embedding PGD at radius {radius:g} overflowed (non-finite gradients or logits), so it cannot say "
            "whether the model is robust there; use smaller --radii"
        )
    labels = call.kwargs["labels"]
    return placed["embeds"], (clean.argmax(-1) != labels) | (attacked.argmax(-1) != labels)


def robust_accuracy(
    model: nn.Module, data: Encoded, radii: Sequence[float], steps: int, batch_size: int = 32, progress: bool = False
) -> tuple[float, dict[float, float]]:
    """(clean accuracy, {radius: accuracy under embedding PGD within that radius}) on ``data``."""
    params = params_of(model)
    device = _device_of(model)
    ordered = sorted(radii)
    standing = {r: 0 for r in ordered}
    clean = 0
    batches = evaluation_batches(data.lengths(), batch_size)
    with EvalMode(model), Progress(len(batches), "attack embedding-pgd", progress) as bar:
        for indices in batches:
            batch = data.batch(indices, device)
            with torch.no_grad():
                alive = model(**batch).logits.argmax(-1) == batch["labels"]
            clean += int(alive.sum())
            for radius in ordered:
                rows = alive.nonzero().squeeze(1)
                if rows.numel():
                    _, broken = embedding_pgd(model, params, _trimmed(batch, rows), radius, steps)
                    alive[rows[broken]] = False
                standing[radius] += int(alive.sum())
            bar.update()
    return clean / len(data), {r: standing[r] / len(data) for r in ordered}


def hotflip_accuracy(
    model: nn.Module,
    tokenizer: Any,
    data: Encoded,
    budget: int,
    neighbours: int,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[int, float]:
    """{b: accuracy when HotFlip may change up to b words} for b = 0..budget."""
    perturbed = PerturbedModel(model)
    params = params_of(model)
    weight = getattr(perturbed.embedding, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError("HotFlip needs an input-embedding module with a weight matrix")
    vocabulary = WordVocabulary.of(tokenizer, weight.shape[0])
    survived = [0] * (budget + 1)
    device = _device_of(model)
    batches = evaluation_batches(data.lengths(), batch_size)
    with EvalMode(model), Progress(len(batches), "attack hotflip", progress) as bar:
        for indices in batches:
            flips, _ = hotflip(perturbed, params, data.batch(indices, device), vocabulary, budget, neighbours)
            for b in range(budget + 1):
                survived[b] += int((flips > b).sum())
            bar.update()
    return {b: survived[b] / len(data) for b in range(budget + 1)}


@functools.cache
def shared_wordnet() -> WordNet:
    return WordNet()  # a few seconds to parse: once per process


@functools.cache
def shared_sentence_encoder(folder: str, max_length: int, device: torch.device | str = "cpu") -> SentenceEncoder:
    return SentenceEncoder(folder, max_length, device=device)


def synonym_attack(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    config: SynonymAttackConfig,
    max_length: int,
    encoder: str | None = None,
    progress: bool = False,
) -> AttackSummary:
    """The synonym-substitution attack (:mod:`advfunc.app.synonym_attack`) on each (text, label).

    The similarity constraint embeds texts with ``encoder`` (a folder; all-MiniLM-L6-v2,
    mean-pooled, when None).
    """
    config.check()
    victim = Victim(model, tokenizer, max_length)
    folder = encoder if encoder is not None else checkpoint.default_model_dir()
    encode = shared_sentence_encoder(str(folder), max_length, _device_of(model))
    wordnet = shared_wordnet()
    importance = victim.gradient_importance if config.order == "gradient" else None
    results = []
    with EvalMode(model), Progress(len(texts), "attack synonyms", progress) as bar:
        for text, label in zip(texts, labels, strict=True):
            results.append(attack_text(text, int(label), victim, encode, wordnet, config, importance))
            bar.update()
    return AttackSummary.of(results)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    data: Encoded,
    config: AttackConfig,
    progress: bool = True,
    texts: Sequence[str] | None = None,
    max_length: int = 64,
) -> EvalResult:
    """Clean accuracy on ``data``; the attacks on its first ``config.examples`` examples.

    The synonym attack needs the raw ``texts`` of ``data`` (same order); it is skipped
    when they are not given or ``config.synonym`` is None.
    """
    config.check()
    started = time.perf_counter()
    clean = accuracy(model, data, max(config.batch_size, 64), progress)
    subset = data.select(range(min(config.examples, len(data))))
    subset_clean, robust = robust_accuracy(model, subset, config.radii, config.pgd_steps, config.batch_size, progress)
    flipped = hotflip_accuracy(
        model, tokenizer, subset, config.hotflip_budget, config.neighbours, config.batch_size, progress
    )
    synonym = None
    if config.synonym is not None and texts is not None:
        if len(texts) != len(data):
            raise ValueError(f"{len(texts)} texts for {len(data)} encoded examples; pass the data set's own texts")
        summary = synonym_attack(
            model, tokenizer, texts[: len(subset)], subset.labels, config.synonym, max_length, config.encoder, progress
        )
        synonym = asdict(summary)
    result = EvalResult(
        clean_accuracy=clean,
        examples=len(data),
        attack_examples=len(subset),
        attack_clean_accuracy=subset_clean,
        robust=robust,
        hotflip={b: a for b, a in flipped.items() if b > 0},
        synonym=synonym,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "clean %.4f (%d examples); embedding PGD %s; HotFlip %s (%d examples)",
        clean,
        len(data),
        " ".join(f"r={r:g}:{a:.3f}" for r, a in robust.items()),
        " ".join(f"{b}:{a:.3f}" for b, a in result.hotflip.items()),
        len(subset),
    )
    return result
