"""The README's custom-loop example runs as written, on a tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tests.tiny_models import padded_batch, tiny_model

README = Path(__file__).resolve().parent.parent / "README.md"


def _custom_loop_code() -> str:
    text = README.read_text()
    section = text.split("## A custom training loop", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README lost its custom-loop example"
    return match.group(1)


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
