"""The compiled path under varying sequence lengths: exact lengths, bucketing, ``dynamic=True``.

The factories call ``torch.compile(fn, fullgraph=True)`` and take no ``dynamic`` option,
so the study sets what ``torch.compile(dynamic=...)`` would set, from outside, around each
call: ``torch.compile`` turns ``dynamic=True`` into the dynamo config
``assume_static_by_default=False`` and ``dynamic=False`` into
``automatic_dynamic_shapes=False, assume_static_by_default=True``
(``torch._dynamo.eval_frame.make_set_enable_dynamic``), read while dynamo traces, which
happens inside the call. Variants:

- eager (reference);
- compiled, exact lengths, dynamo's default: static first, and after the first
  shape-driven recompile the changed dimension is dynamic (automatic dynamic shapes);
- compiled, lengths bucketed to a multiple, default dynamo settings;
- compiled, lengths bucketed, static per bucket (``dynamic=False``): one graph per bucket;
- compiled, exact lengths, ``dynamic=True``: symbolic shapes from the first call.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import advfunc
from benchmarks.cases import METHODS, Batch, build_step, supports_compile
from benchmarks.shapes import Workload, build_model, make_batch, pad_to_bucket

STATIC: dict[str, Any] = {
    "automatic_dynamic_shapes": False,
    "assume_static_by_default": True,
}  # torch.compile(dynamic=False)
DYNAMIC: dict[str, Any] = {"assume_static_by_default": False}  # torch.compile(dynamic=True)


@dataclass(frozen=True)
class Variant:
    """How a compiled step meets varying lengths: padding multiple and dynamo settings."""

    key: str  # how --dynamic-variants names it
    name: str
    compiled: bool
    bucket: int | None
    dynamo: dict[str, Any]


def variants(bucket: int) -> list[Variant]:
    return [
        Variant("eager", "eager, exact lengths", False, None, {}),
        Variant("static", f"compiled, bucketed to ×{bucket}, static (dynamic=False)", True, bucket, STATIC),
        Variant("bucketed", f"compiled, bucketed to ×{bucket}, default (automatic dynamic)", True, bucket, {}),
        Variant("exact", "compiled, exact lengths, default (automatic dynamic)", True, None, {}),
        Variant("dynamic", "compiled, exact lengths, dynamic=True", True, None, DYNAMIC),
    ]


VARIANT_KEYS = tuple(v.key for v in variants(1))


def default_lengths(length: int) -> list[int]:
    """Eight lengths in [L/4, L], fixed so that runs compare."""
    generator = torch.Generator().manual_seed(0)
    low = max(2, length // 4)
    drawn = torch.randint(low, length + 1, (7,), generator=generator).tolist()
    return [length, *drawn]


def rotten_tomatoes_lengths(batch: int, count: int, cap: int, seed: int = 0) -> list[int]:
    """Padded lengths of ``count`` batches of ``batch`` random Rotten Tomatoes snippets.

    Each batch is padded to its longest example, as the CLI's loader does. A snippet's
    length is its count of words and punctuation marks + 2 ([CLS], [SEP]): wordpiece
    splits a few rare words further, and no tokenizer is downloaded. Capped at ``cap``.
    The corpus is the CLI's default (``advfunc.app.common.data.rotten_tomatoes``).
    """
    from advfunc.app.common.data import rotten_tomatoes

    texts = rotten_tomatoes().texts
    generator = torch.Generator().manual_seed(seed)
    lengths = []
    for _ in range(count):
        chosen = torch.randint(0, len(texts), (batch,), generator=generator).tolist()
        longest = max(len(re.findall(r"\w+|[^\w\s]", texts[i])) + 2 for i in chosen)
        lengths.append(min(longest, cap))
    return lengths


def _timed_pass(run: Callable[[Batch], None], batches: list[Batch], device: str) -> list[float]:
    times = []
    for batch in batches:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(batch)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _unique_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def run_variant(
    variant: Variant, method: str, model: torch.nn.Module, workload: Workload, batches: list[Batch]
) -> dict[str, Any]:
    """First pass (compiles included) and a steady pass over ``batches`` with one fresh step."""
    torch._dynamo.reset()  # the engines' code objects are shared: start each variant cold
    step = build_step(method, model, workload, compiled=variant.compiled)
    if METHODS[method].extra is not None:
        raise ValueError(f"the dynamic study runs methods called as step(params, batch); {method} is not")
    if variant.bucket is not None:
        batches = [pad_to_bucket(dict(b), variant.bucket) for b in batches]

    def run(batch: Batch) -> None:
        with torch._dynamo.config.patch(**variant.dynamo):
            grads, _ = step(advfunc.params_of(model), batch)
        advfunc.set_grads(model, grads)

    before = _unique_graphs()
    try:
        first = _timed_pass(run, batches, workload.device)
        graphs = _unique_graphs() - before
        steady = _timed_pass(run, batches, workload.device)
    except Exception as error:  # a variant that cannot compile is a finding, not a crash
        return {"variant": variant.name, "error": f"{type(error).__name__}: {str(error)[:500]}"}
    tokens_run = sum(b["input_ids"].numel() for b in batches)
    return {
        "variant": variant.name,
        "bucket": variant.bucket,
        "dynamo_config": variant.dynamo,
        "graphs_compiled": graphs,
        "first_pass_s": sum(first),
        "first_call_s": first,
        "steady_ms_per_step": 1e3 * sum(steady) / len(steady),
        "steady_call_s": steady,
        "tokens_run": tokens_run,
    }


def dynamic_study(
    workload: Workload, method: str, lengths: list[int] | None, bucket: int, keys: tuple[str, ...] = VARIANT_KEYS
) -> dict[str, Any]:
    """Compare the ways a compiled step can meet varying sequence lengths (see module docstring).

    ``keys`` selects variants (:data:`VARIANT_KEYS`); the eager one, the reference of
    "steady / eager", always runs first.
    """
    unknown = sorted(set(keys) - set(VARIANT_KEYS))
    if unknown:
        raise ValueError(f"unknown dynamic variants {unknown}; choose from {list(VARIANT_KEYS)}")
    if not supports_compile(method):
        raise ValueError(f"advfunc.{method} takes no compile= option; pick a compiled method")
    lengths = lengths or default_lengths(workload.length)
    model = build_model(workload)
    batches: list[Batch] = [make_batch(workload, seed=i, length=n) for i, n in enumerate(lengths)]
    real_tokens = sum(b["input_ids"].numel() for b in batches)
    results = []
    for variant in variants(bucket):
        if variant.key != "eager" and variant.key not in keys:
            continue
        print(f"  dynamic: {variant.name}", flush=True)
        results.append(run_variant(variant, method, model, workload, batches))
        print(f"  dynamic: {results[-1]}", flush=True)  # a run stopped later keeps this variant's numbers
    eager = results[0].get("steady_ms_per_step")
    for result in results:
        if "error" in result:
            result.update(graphs_compiled=None, first_pass_s=None, steady_ms_per_step=None)
            result.update(steady_vs_eager=None, padded_tokens_ratio=None)
            continue
        result["steady_vs_eager"] = result["steady_ms_per_step"] / eager if eager else None
        result["padded_tokens_ratio"] = result["tokens_run"] / real_tokens
    torch._dynamo.reset()
    return {
        "method": method,
        "title": METHODS[method].title,
        "workload": workload.describe(),
        "lengths": lengths,
        "bucket": bucket,
        "variants": results,
        "how": (
            "The factories take no `dynamic=` option: `dynamic=True` and the static buckets are emulated by "
            "patching the dynamo config that `torch.compile(dynamic=...)` sets (assume_static_by_default, "
            "automatic_dynamic_shapes) around each call. 'graphs compiled' counts dynamo's unique graphs."
        ),
    }
