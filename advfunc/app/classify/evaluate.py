"""A classifier's clean accuracy, and its accuracy under the embedding-space and word-level attacks.

Robust accuracy counts survivors over increasing radii (:mod:`advfunc.attacks.robustness`) and HotFlip
budgets, on the first ``examples`` of the evaluation set (a fixed pseudo-random order); clean accuracy on all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import advfunc
from advfunc.app.common.data import Encoded, evaluation_batches
from advfunc.app.common.flags import COUNT, NATURAL, POSITIVE, option
from advfunc.app.common.progress import Progress
from advfunc.app.common.word_attacks import synonym_attack
from advfunc.attacks.robustness import EvalMode, pgd_logits, survivors_over_radii, worst_case
from advfunc.core.arguments import require_positive, require_steps
from advfunc.core.model import PerturbedModel
from advfunc.hf.loading import label_names
from advfunc.words.hotflip import WordVocabulary, hotflip
from advfunc.words.synonym_attack import SynonymAttackConfig
from advfunc.words.victim import Victim

log = logging.getLogger("advfunc")


@dataclass(frozen=True)
class AttackConfig:
    """Attack settings. Radii are L2 norms per example over (seq, hidden) of the embedding output."""

    # A fine-tuned MiniLM loses most predictions by 0.25 (its token embeddings have norm ~1).
    radii: tuple[float, ...] = option((0.05, 0.1, 0.2, 0.4), POSITIVE, "embedding PGD L2 radii per example")
    pgd_steps: int = option(5, COUNT, "PGD iterations per radius")
    hotflip_budget: int = option(3, NATURAL, "max changed words (0: no HotFlip)")
    neighbours: int = option(50, COUNT, "HotFlip candidates per word")
    examples: int = option(256, COUNT, "attack the first N evaluation examples", flag="attack-examples")
    batch_size: int = option(32, COUNT, "attack batch size")
    synonym: SynonymAttackConfig | None = field(default_factory=SynonymAttackConfig)  # None: not run
    encoder: str | None = option(None, str, "sentence encoder folder (default: all-MiniLM-L6-v2)")

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
    """Accuracies; ``robust``/``hotflip``/``worst_case`` are over the ``attack_examples`` subset."""

    clean_accuracy: float
    examples: int
    attack_examples: int
    attack_clean_accuracy: float
    robust: dict[float, float] = field(default_factory=dict)  # radius -> accuracy
    hotflip: dict[int, float] = field(default_factory=dict)  # changed tokens -> accuracy
    synonym: dict[str, Any] | None = None  # the synonym attack's summary (AttackSummary's fields)
    worst_case: float | None = None  # held under every word-level attack that ran
    seconds: float = 0.0
    pending: list[str] = field(default_factory=list)  # the attacks not run yet (a partial result)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["robust"] = {str(k): v for k, v in self.robust.items()}
        data["hotflip"] = {str(k): v for k, v in self.hotflip.items()}
        return data


def correct(model: nn.Module, data: Encoded, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """[N] bool: whether the model classifies each example of ``data`` correctly (eval mode, no gradients)."""
    found = torch.zeros(len(data), dtype=torch.bool)
    batches = evaluation_batches(data.lengths(), batch_size)
    with EvalMode(model), torch.inference_mode(), Progress(len(batches), "clean", progress) as bar:
        for indices in batches:
            batch = data.batch(indices, next(model.parameters()).device)
            found[indices] = (model(**batch).logits.argmax(-1) == batch["labels"]).cpu()
            bar.update()
    return found


def robust_accuracy(
    model: nn.Module, data: Encoded, radii: Sequence[float], steps: int, batch_size: int = 32, progress: bool = False,
    clean: torch.Tensor | None = None,
) -> tuple[float, dict[float, float]]:  # fmt: skip
    """(clean accuracy, {radius: accuracy under embedding PGD within that radius}) on ``data``."""
    params = advfunc.params_of(model)
    clean = correct(model, data, batch_size) if clean is None else clean
    lengths = data.lengths()

    def holds(indices: list[int], radius: float) -> torch.Tensor:
        batch = data.batch(indices, next(model.parameters()).device)  # padded to the longest standing example
        _, logits = pgd_logits(model, params, batch, radius, steps, "embeds")
        return logits.argmax(-1) == batch["labels"]

    def batches(indices: list[int]) -> list[list[int]]:
        return [[indices[i] for i in chunk] for chunk in evaluation_batches([lengths[i] for i in indices], batch_size)]

    with EvalMode(model), Progress(len(radii), "attack embedding-pgd", progress) as bar:
        robust = survivors_over_radii(clean, radii, holds, batches, bar.update)
    return float(clean.float().mean()), robust


def hotflip_flips(
    model: nn.Module, tokenizer: Any, data: Encoded, budget: int, neighbours: int, batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:  # fmt: skip
    """[N] long: HotFlip's changed words before each example broke (``budget + 1``: it survived)."""
    perturbed, params = PerturbedModel(model), advfunc.params_of(model)
    weight = getattr(perturbed.embedding, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError("HotFlip needs an input-embedding module with a weight matrix")
    vocabulary = WordVocabulary.of(tokenizer, weight.shape[0])
    flips = torch.zeros(len(data), dtype=torch.long)
    batches = evaluation_batches(data.lengths(), batch_size)
    with EvalMode(model), Progress(len(batches), "attack hotflip", progress) as bar:
        for indices in batches:
            batch = data.batch(indices, next(model.parameters()).device)
            flips[indices] = hotflip(perturbed, params, batch, vocabulary, budget, neighbours)[0].cpu()
            bar.update()
    return flips


def evaluate(
    model: nn.Module, tokenizer: Any, data: Encoded, config: AttackConfig, progress: bool = True,
    texts: Sequence[str] | None = None, max_length: int = 64, finished: Callable[[EvalResult], object] | None = None,
) -> EvalResult:  # fmt: skip
    """Clean accuracy on ``data``; the attacks on its first ``config.examples`` examples (the synonym attack needs
    ``data``'s ``texts`` and ``config.synonym``). The word-level worst case is over the word-level attacks that ran
    (HotFlip at its full budget, synonyms). Before each of them ``finished`` gets the result so far (``pending``
    lists it and those after it)."""
    config.check()
    if texts is not None and len(texts) != len(data):
        raise ValueError(f"{len(texts)} texts for {len(data)} encoded examples; pass the data set's own texts")
    started = time.perf_counter()
    clean = correct(model, data, max(config.batch_size, 64), progress)
    subset = data.select(range(min(config.examples, len(data))))
    subset_clean, robust = robust_accuracy(
        model, subset, config.radii, config.pgd_steps, config.batch_size, progress, clean[: len(subset)]
    )
    result = EvalResult(float(clean.float().mean()), len(data), len(subset), subset_clean, robust)

    def run_hotflip() -> list[bool]:
        budget = config.hotflip_budget
        flips = hotflip_flips(model, tokenizer, subset, budget, config.neighbours, config.batch_size, progress)
        result.hotflip = {b: float((flips > b).float().mean()) for b in range(1, budget + 1)}
        return (flips > budget).tolist()

    def run_synonym() -> list[bool]:
        assert config.synonym is not None and texts is not None
        victim = Victim(model, tokenizer, max_length)
        importance = victim.gradient_importance if config.synonym.order == "gradient" else None
        with EvalMode(model):
            summary, held = synonym_attack(
                victim, texts[: len(subset)], subset.labels, config.synonym, config.encoder, max_length, importance,
                progress, next(model.parameters()).device,
            )  # fmt: skip
        names = label_names(getattr(model, "config", None))  # the data's labels after training
        result.synonym = name_classes(asdict(summary), names)
        return held

    attacks = {"hotflip": run_hotflip, "synonym": run_synonym}
    chosen = {"hotflip": config.hotflip_budget > 0, "synonym": config.synonym is not None and texts is not None}
    result.pending = [name for name in attacks if chosen[name]]
    survived: list[list[bool]] = []  # per word-level attack that ran: each attacked example held
    for name in list(result.pending):
        result.seconds = time.perf_counter() - started
        if finished is not None:
            finished(result)
        survived.append(attacks[name]())
        result.pending.remove(name)
        result.worst_case = worst_case(survived)
    result.seconds = time.perf_counter() - started
    pgd = " ".join(f"r={r:g}:{a:.3f}" for r, a in robust.items())
    flips = "".join(f"; HotFlip {b}:{a:.3f}" for b, a in result.hotflip.items())
    log.info("clean %.4f (%d examples); on the first %d (clean %.4f): embedding PGD %s%s", result.clean_accuracy,
             len(data), len(subset), subset_clean, pgd, flips)  # fmt: skip
    return result


def name_classes(summary: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """``summary`` with each example's label and prediction as its class name, not its id."""
    for example in summary.get("examples", []):
        for key in ("label", "prediction"):
            index = int(example[key])
            example[key] = names[index] if 0 <= index < len(names) else str(index)
    return summary
