"""Peak memory of a step with and without activation checkpointing, SmolLM2-135M's shape.

A randomly initialised LlamaForCausalLM with SmolLM2-135M-Instruct's configuration
(30 layers, hidden 576, vocabulary 49,152, tied embeddings; 134.5M parameters), fp32,
one step on a batch of 8 × 256 tokens whose labels are every token. Each setting runs in
a fresh process (``python -m benchmarks.checkpointing_memory --one METHOD on|off``):
peak RSS (``VmHWM``, reset after the model and batch are built) minus the RSS then is
the ``step`` figure, what the step adds to the model. On CUDA (``--device cuda``) the
figures are ``torch.cuda.max_memory_allocated`` instead.

    python -m benchmarks.checkpointing_memory            # every method, both settings
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import advfunc
from benchmarks.memory import _reset_high_water_mark, _rss_mb, _status_kib

MARKER = "CHECKPOINTING_MEMORY "
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49_152,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
METHODS = {
    "none": lambda m: advfunc.stateful(_plain(m)),
    "pgd-embeds-2": lambda m: advfunc.pgd(m, epsilon=0.1, alpha=0.05, steps=2, target="embeds"),
    "lat": lambda m: advfunc.lat(m, epsilon=1.0, alpha=0.5, steps=2),
}


def _plain(model: torch.nn.Module) -> advfunc.Step:
    from advfunc.methods.plain import plain

    return plain(model)


def measure(method: str, checkpointing: bool, batch: int, length: int, device: str) -> dict[str, Any]:
    """One step of ``method`` in this process; the figures in MiB."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(device).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SMOLLM2_135M["vocab_size"], (batch, length), generator=g).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if method == "lat":
        inputs["labels"][:, : length // 2] = -100  # prompt, then completion; the adversary's completion:
        inputs["adv_labels"] = torch.where(inputs["labels"] == -100, -100, ids.roll(1, dims=1))
    step = METHODS[method](model)
    params = advfunc.params_of(model)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mb()
        if not _reset_high_water_mark():
            raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs): this measurement needs Linux >= 4.0")
    start = time.perf_counter()
    _grads, out = step(params, inputs)  # the grads stay alive: they are part of the peak
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        kib = _status_kib("VmHWM")
        assert kib is not None
        peak = kib / 1024
    seconds = time.perf_counter() - start
    assert bool(torch.isfinite(out.loss))
    return {
        "method": method,
        "checkpointing": checkpointing,
        "base_mb": round(base, 1),
        "peak_mb": round(peak, 1),
        "step_mb": round(peak - base, 1),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "on|off"), help="measure one setting in this process")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.one:
        method, setting = args.one
        record = measure(method, setting == "on", args.batch, args.length, args.device)
        print(MARKER + json.dumps(record), flush=True)
        return
    for method in args.methods:
        for setting in ("off", "on"):
            command = [sys.executable, "-m", "benchmarks.checkpointing_memory", "--one", method, setting]
            command += ["--batch", str(args.batch), "--length", str(args.length), "--device", args.device]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            line = next(x for x in done.stdout.splitlines() if x.startswith(MARKER))
            print(line[len(MARKER) :], flush=True)


if __name__ == "__main__":
    main()
