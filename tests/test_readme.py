"""Every Python block of the README, and the decoder loop of docs/decoders.md, runs as written on tiny models."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tests.support.tiny_decoders import LAYER, completion_batch, tiny_decoder
from tests.support.tiny_models import padded_batch, tiny_model

README = Path(__file__).resolve().parent.parent / "README.md"
DECODERS = README.parent / "docs" / "decoders.md"


def _loop_code(heading: str, last: bool = False, document: Path = README) -> str:
    """The first (``last``: the last) Python block of ``document``'s text under ``heading``, up to the next heading."""
    section = re.split(r"\n#{2,3} ", document.read_text().split(f"{heading}\n", 1)[1], maxsplit=1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, f"the README lost the example under {heading!r}"
    return blocks[-1 if last else 0]


def _custom_loop_code() -> str:
    return _loop_code("## A custom training loop")


def test_readme_custom_loop_trains(capsys):
    code = _custom_loop_code()
    assert len(code.strip().splitlines()) <= 12
    model = tiny_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    namespace = {"model": model, "loader": [padded_batch("bert", seed=s) for s in range(2)]}
    exec(compile(code, str(README), "exec"), namespace)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "classifier.weight" in moved and "bert.embeddings.word_embeddings.weight" in moved
    assert capsys.readouterr().out.count("adversarial") == 2


def _run_loop(code: str, model: torch.nn.Module, loader: list) -> list[str]:
    assert len(code.strip().splitlines()) <= 12
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    exec(compile(code, str(README), "exec"), {"model": model, "loader": loader})
    return [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]


def test_readme_attack_api_loop_trains():
    code = _loop_code("### The same loop on the attack API")
    assert "advfunc.attacks." in code and "perturbed_loss" in code
    moved = _run_loop(code, tiny_model("bert"), [padded_batch("bert", seed=s) for s in range(2)])
    assert "classifier.weight" in moved and "bert.embeddings.word_embeddings.weight" in moved


def test_readme_decoder_loop_trains():
    code = _loop_code("## Decoder LLMs", last=True, document=DECODERS)
    assert "advfunc.attacks.lat" in code
    loader = [completion_batch("right", seed=s, adversary=True) for s in range(2)]
    moved = _run_loop(code.replace("model.layers.4", LAYER["llama"]), tiny_decoder("llama"), loader)
    assert "lm_head.weight" in moved or "model.embed_tokens.weight" in moved
    assert any(".layers.0." in name for name in moved)


def test_readme_trl_recipe_trains_the_adapters(tmp_path):
    from datasets import Dataset

    from tests.hf.test_trl import _chat, _tokenizer

    code = _loop_code("## Fine-tuning an LLM with TRL")
    assert len(code.strip().splitlines()) <= 15
    # A two-step run on the CPU in fp32 (SFTConfig would autocast to bf16 where it can).
    settings = f"output_dir={str(tmp_path)!r}, max_steps=2, max_length=64, use_cpu=True, bf16=False, report_to=[], "
    code = code.replace('SFTConfig(output_dir="out", ', f"SFTConfig({settings}")
    model = tiny_decoder("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    namespace = {"model": model, "tokenizer": _tokenizer(), "chat_dataset": Dataset.from_list(_chat())}
    exec(compile(code, str(README), "exec"), namespace)
    trained = namespace["trainer"].model
    assert trained.is_gradient_checkpointing and namespace["trainer"].state.global_step == 2
    moved = [n for n, p in trained.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert moved, "the adapters' B matrices left zero"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before), "base weights moved"


def test_every_python_block_of_the_readme_is_one_the_tests_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks == [
        _custom_loop_code(),
        _loop_code("### The same loop on the attack API"),
        _loop_code("## Fine-tuning an LLM with TRL"),
    ]
