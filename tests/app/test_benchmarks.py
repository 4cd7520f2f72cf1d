"""The benchmark scripts run end to end on a tiny shape and write well-formed outputs.

Benchmarks are not timed tests: nothing here asserts on speed, only on structure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import advfunc
import benchmarks.step as step_module
from benchmarks.baseline import import_revision
from benchmarks.cases import DECODER_METHODS, METHODS, available_methods
from benchmarks.shapes import SHAPES, Workload, build_model, make_batch, pad_to_bucket
from benchmarks.step import main

# One interleaved round of one timed block per case, no compilation: seconds, not minutes.
TINY = ["--model", "tiny", "--vocab", "128", "--batch-length", "2x8", "--threads", "1"]
ONE_ITERATION = ["--repeats", "1", "--min-run-time", "0", "--warmup", "1"]
# The decoder methods with a classic implementation (transformers' NEFTune hook, the CAT/LAT loops).
SEEDED = ("neftune", "cat", "lat")


def _run(out: Path, *extra: str) -> tuple[dict, dict, str]:
    payload = main([*TINY, *ONE_ITERATION, "--out", str(out), *extra])
    written = json.loads((out / "step.json").read_text(encoding="utf-8"))
    table = (out / "step.md").read_text(encoding="utf-8")
    return payload, written, table


def test_step_benchmark_writes_json_and_markdown(tmp_path):
    payload, written, table = _run(tmp_path, "--no-compile", "--no-memory")
    methods, _ = available_methods()
    assert written["meta"]["settings"]["methods"] == methods
    for key in ("device", "device_name", "torch", "transformers", "date", "num_threads", "command", "settings"):
        assert written["meta"][key] not in (None, ""), key
    assert written["meta"]["num_threads"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left behind

    (group,) = written["workloads"]
    assert group["workload"] == {
        **{k: v for k, v in vars(SHAPES["tiny"]).items()},
        "vocab": 128,
        "batch": 2,
        "length": 8,
        "device": "cpu",
        "dtype": "fp32",
    }
    rows = group["rows"]
    assert rows[0]["method"] == "plain" and rows[0]["ratio"] == pytest.approx(1.0)
    assert {(r["method"], r["impl"]) for r in rows[1:]} == {(m, i) for m in methods for i in ("seed", "eager")}
    for row in rows:
        assert row["median_ms"] > 0 and row["ratio"] > 0 and row["runs"] >= 1, row
        assert row["floor_passes"] >= 1 and row["floor"]
        assert row["memory"] is None
    assert "tiny vocab=128 2x8" in group["compare"]

    for method in methods:
        title = METHODS[method].title
        assert f"| {title} | {METHODS[method].floor.text} " in table  # summary line
        assert f"| {title} | seed |" in table and f"| {title} | eager |" in table  # detail lines
    assert written["meta"]["date"] in table and written["meta"]["torch"] in table
    assert payload["workloads"][0]["rows"][0]["median_ms"] == rows[0]["median_ms"]


@pytest.mark.slow
def test_step_benchmark_measures_memory_in_subprocesses(tmp_path):
    _, written, table = _run(tmp_path, "--no-compile", "--methods", "fgm", "--memory-calls", "1")
    rows = written["workloads"][0]["rows"]
    assert [(r["method"], r["impl"]) for r in rows] == [("plain", "plain"), ("fgm", "seed"), ("fgm", "eager")]
    for row in rows:
        memory = row["memory"]
        assert memory["peak_mb"] > 0 and memory["base_mb"] > 0 and memory["source"], row
    assert "peak MiB" in table


def test_a_baseline_revision_runs_in_the_same_rounds(tmp_path):
    _, written, table = _run(tmp_path, "--no-compile", "--no-memory", "--methods", "fgm,free_at", "--baseline", "HEAD")
    rows = written["workloads"][0]["rows"]
    assert [(r["method"], r["impl"]) for r in rows] == [
        ("plain", "plain"),
        *[(m, i) for m in ("fgm", "free_at") for i in ("seed", "eager", "baseline")],
    ]
    assert "eager / baseline" in table and "| FGM | baseline |" in table
    baseline = import_revision("HEAD")
    # The revision imports itself, never this checkout: its classes are its own.
    assert baseline.__name__ == "advfunc_HEAD" and baseline.Step is not advfunc.Step
    assert Path(baseline.__file__).parent.name == "advfunc_HEAD"
    with pytest.raises(ValueError, match="no-such-revision"):
        import_revision("no-such-revision")


def test_bucketing_pads_to_the_next_multiple():
    workload = Workload(SHAPES["tiny"], 128, 3, 20, "cpu", None)
    batch = make_batch(workload, seed=1)
    padded = pad_to_bucket(batch, 16)
    assert padded["input_ids"].shape == (3, 32)
    assert padded["attention_mask"][:, 20:].sum() == 0 and padded["input_ids"][:, 20:].sum() == 0
    assert (padded["input_ids"][:, :20] == batch["input_ids"]).all()
    assert (padded["labels"] == batch["labels"]).all()


@pytest.mark.slow
def test_decoder_with_lora_runs_every_decoder_method_per_method(tmp_path):
    args = ["--model", "tiny-decoder", "--vocab", "120", "--batch-length", "2x8", "--threads", "1", *ONE_ITERATION]
    payload = main([*args, "--per-method", "--no-compile", "--no-memory", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "step.json").read_text(encoding="utf-8"))
    table = (tmp_path / "step.md").read_text(encoding="utf-8")
    assert written["skipped"] == [] and written == json.loads(json.dumps(payload))
    (group,) = written["workloads"]
    assert group["workload"]["family"] == "qwen2" and group["workload"]["kv_heads"] == 2
    # Each method's rounds start with their own plain step; CAT, LAT and NEFTune have a classic loop on CPU.
    expected = []
    for method in DECODER_METHODS:
        expected += [("plain", "plain"), *((method, i) for i in ("seed", "eager") if i == "eager" or method in SEEDED)]
    assert [(r["method"], r["impl"]) for r in group["rows"]] == expected
    for row in group["rows"]:
        assert row["tokens_per_s"] == pytest.approx(2 * 8 / (row["median_ms"] / 1e3))
    assert "LoRA" in table and "| CAT-10 | seed |" in table and "tokens/s" in table


def test_decoder_workload_trains_lora_only_on_completion_batches():
    workload = Workload(SHAPES["tiny-decoder"], 120, 4, 12, "cpu", None)
    model = build_model(workload)
    trainable = advfunc.trainable_names(model)
    assert trainable and all("lora_" in name for name in trainable)
    assert not model.get_input_embeddings().weight.requires_grad
    batch = make_batch(workload)
    real, completion = batch["attention_mask"].bool(), batch["labels"] != -100
    assert (completion == (batch["adv_labels"] != -100)).all() and (completion <= real).all()
    assert ((real & ~completion).sum(1) > 0).all() and (completion.sum(1) > 0).all()  # a prompt and a completion
    assert (batch["labels"][completion] == batch["input_ids"][completion]).all()


class Stopped(BaseException):
    """Stands for a time limit's signal ending the process in the middle of a method (no handler runs)."""


def _per_method_with(monkeypatch, tmp_path, interruption: BaseException) -> tuple[dict, str]:
    """A per-method run of FGM, PGD and FreeLB whose second method raises ``interruption``."""
    real_time_runs = step_module.time_runs
    calls = []

    def interrupt_the_second_method(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise interruption
        return real_time_runs(*args, **kwargs)

    monkeypatch.setattr(step_module, "time_runs", interrupt_the_second_method)
    flags = ["--methods", "fgm,pgd,freelb", "--per-method", "--no-compile", "--no-memory", "--out", str(tmp_path)]
    # A time limit ends the run at once; a method's error lets the others run, then fails the run.
    with pytest.raises(Stopped if isinstance(interruption, Stopped) else RuntimeError):
        main([*TINY, *ONE_ITERATION, *flags])
    written = json.loads((tmp_path / "step.json").read_text(encoding="utf-8"))
    return written, (tmp_path / "step.md").read_text(encoding="utf-8")


def _cases(written: dict) -> list[tuple[str, str]]:
    return [(r["method"], r["impl"]) for r in written["workloads"][0]["rows"]]


def test_a_per_method_run_stopped_midway_keeps_what_it_finished(tmp_path, monkeypatch):
    written, table = _per_method_with(monkeypatch, tmp_path, Stopped())
    assert _cases(written) == [("plain", "plain"), ("fgm", "seed"), ("fgm", "eager")]
    assert [line.split(" ")[0] for line in written["skipped"]] == ["pgd", "freelb"]
    assert "not finished" in table


def test_a_failing_method_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    written, table = _per_method_with(monkeypatch, tmp_path, ValueError("out of memory, say"))
    plain = ("plain", "plain")
    assert _cases(written) == [plain, ("fgm", "seed"), ("fgm", "eager"), plain, ("freelb", "seed"), ("freelb", "eager")]
    (failure,) = written["skipped"]
    assert failure.startswith("pgd ") and "failed: ValueError: out of memory, say" in failure
    assert "failed: ValueError" in table
