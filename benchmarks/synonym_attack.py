"""The synonym attack against another revision's, on one trained victim, interleaved in one process.

``python -m benchmarks.synonym_attack --victim runs/plain --texts 64 --baseline 1495e4c``
(run from the repository root, a checkpoint that ``advfunc train`` wrote as ``--victim``).
The first ``--texts`` test snippets are attacked in rounds of ``--chunk`` texts; every round
runs each case once on the same texts, the same victim and the same sentence encoder, the
cases' order alternating between rounds, so that load from other processes falls on all
cases alike. Cases:

* ``baseline``: the revision's attack with its default settings;
* ``same settings``: this checkout's attack set to the baseline's search (TextFooler's, delete
  order, the usual part of speech's senses, letter runs as words); its adversarial examples
  must equal the baseline's, and its seconds per query over the baseline's, per round, give
  the speed-up;
* ``defaults``: this checkout's attack with its default settings (PWWS).

Prints, per case, accuracy under attack, success rate, queries per attacked text, seconds per
text and per query, and the median over rounds of the baseline's seconds per query over each
case's. ``--out`` also writes them as JSON (temp name, then rename).

The floor: every text the ``same settings`` case sent to the victim and to the sentence
encoder is recorded, then sent again in one process, interleaved with the rounds, as bare
forwards: once in the calls the attack made (``replayed calls``) and once all together, sorted
by length, in batches of 64 (``ideal batches``: no padding to speak of, no per-call overhead).
A query cannot cost less than ``ideal batches`` per query without changing the victim's
arithmetic, so the baseline's seconds per query over it bound any speed-up per query.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.baseline import import_revision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", type=Path, required=True, help="a checkpoint folder `advfunc train` wrote")
    parser.add_argument("--texts", type=int, default=64, help="test snippets attacked (default 64)")
    parser.add_argument("--chunk", type=int, default=16, help="texts per round (default 16)")
    parser.add_argument("--baseline", default="1495e4c", help="the revision compared against (default 1495e4c)")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.texts < 1 or args.chunk < 1:
        parser.error(f"--texts and --chunk must be >= 1, got {args.texts} and {args.chunk}")

    from advfunc.app.common.data import Labels, fixed_split, rotten_tomatoes
    from advfunc.hf.loading import load_classifier, packaged_minilm
    from advfunc.words import synonym_attack
    from advfunc.words.victim import SentenceEncoder, Victim
    from advfunc.words.wordnet import WordNet

    old = importlib.import_module(import_revision(args.baseline).__name__ + ".app.synonym_attack")
    loaded = load_classifier(args.victim)
    loaded.model.eval()
    test = fixed_split(rotten_tomatoes())["test"].head(args.texts)
    texts, labels = list(test.texts), Labels(loaded.labels).encode(test)
    victim = Victim(loaded.model, loaded.tokenizer, max_length=64)
    encode = SentenceEncoder(str(packaged_minilm()), max_length=64)
    wordnet = WordNet()
    same = synonym_attack.SynonymAttackConfig(
        search="textfooler", order="delete", part_of_speech="usual", whole_words=False
    )
    victim_calls: list[list[str]] = []
    encoder_calls: list[list[str]] = []

    def recorded(function: Any, calls: list[list[str]]) -> Any:
        def call(batch: Any) -> Any:
            calls.append(list(batch))
            return function(batch)

        return call

    def replay(calls: list[list[str]], ideal: bool) -> None:
        for texts_, function in (
            (victim_calls[calls[0] : calls[1]], victim),
            (encoder_calls[calls[2] : calls[3]], encode),
        ):
            if ideal:
                flat = sorted((t for batch in texts_ for t in batch), key=len)
                texts_ = [flat[i : i + 64] for i in range(0, len(flat), 64)]
            for batch in texts_:
                function(batch)

    marks: list[int] = [0, 0, 0, 0]
    cases: dict[str, Any] = {
        "baseline": lambda t, y: old.attack_texts(t, y, victim, encode, wordnet, old.SynonymAttackConfig()),
        "same settings": lambda t, y: synonym_attack.attack_texts(
            t, y, recorded(victim, victim_calls), recorded(encode, encoder_calls), wordnet, same
        ),
        "defaults": lambda t, y: synonym_attack.attack_texts(
            t, y, victim, encode, wordnet, synonym_attack.SynonymAttackConfig()
        ),
    }
    results: dict[str, list[Any]] = {name: [] for name in cases}
    seconds = {name: 0.0 for name in [*cases, "replayed calls", "ideal batches"]}
    per_query: dict[str, list[float]] = {name: [] for name in seconds}  # per round
    for round_, start in enumerate(range(0, args.texts, args.chunk)):
        part, part_labels = texts[start : start + args.chunk], labels[start : start + args.chunk]
        names = list(cases) if round_ % 2 == 0 else list(reversed(cases))
        for name in names:
            began = time.perf_counter()
            found = cases[name](part, part_labels)
            elapsed = time.perf_counter() - began
            results[name] += found
            seconds[name] += elapsed
            per_query[name].append(elapsed / max(1, sum(r.queries for r in found)))
            if name == "same settings":
                marks = [marks[1], len(victim_calls), marks[3], len(encoder_calls)]
                queries = sum(r.queries for r in found)
        for name, ideal in (("replayed calls", False), ("ideal batches", True)):
            began = time.perf_counter()
            replay(marks, ideal)
            elapsed = time.perf_counter() - began
            seconds[name] += elapsed
            per_query[name].append(elapsed / max(1, queries))
        line = ", ".join(f"{n} {1000 * per_query[n][-1]:.1f} ms/query" for n in per_query)
        print(f"round {round_}: {line}", flush=True)

    def outcome(result: Any) -> tuple[Any, ...]:
        return (result.status, result.adversarial, result.prediction, result.queries)

    pairs = zip(results["baseline"], results["same settings"], strict=True)
    differing = sum(outcome(a) != outcome(b) for a, b in pairs)
    figures: dict[str, Any] = {"baseline revision": args.baseline, "victim": str(args.victim), "texts": args.texts}
    figures["same settings: examples differing from the baseline's"] = differing
    for name in cases:
        module = old if name == "baseline" else synonym_attack
        summary = dataclasses.asdict(module.AttackSummary.of(results[name]))
        queries = sum(r.queries for r in results[name])
        figures[name] = {
            **{k: summary[k] for k in ("accuracy_under_attack", "success_rate", "queries", "clean_accuracy")},
            "seconds_per_text": seconds[name] / args.texts,
            "ms_per_query": 1000 * seconds[name] / max(1, queries),
            "median_round_speedup_per_query": statistics.median(
                b / n for b, n in zip(per_query["baseline"], per_query[name], strict=True)
            ),
        }
    same_queries = sum(r.queries for r in results["same settings"])
    for name in ("replayed calls", "ideal batches"):
        figures[name] = {
            "ms_per_query": 1000 * seconds[name] / max(1, same_queries),
            "median_round_speedup_per_query": statistics.median(
                b / n for b, n in zip(per_query["baseline"], per_query[name], strict=True)
            ),
        }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out is not None:
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(text + "\n")
        partial.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
