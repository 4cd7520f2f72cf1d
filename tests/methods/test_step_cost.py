"""What a step costs beyond its passes: vocabulary-sized tensors and host reads.

Both are observed with a ``TorchDispatchMode``, which sees every aten call of a step
(its backwards included), so the oracle is the list of operators actually run, not a
timer or a memory counter.
"""

from __future__ import annotations

import inspect
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import advfunc
from advfunc.core.engine import Engine
from advfunc.core.model import PerturbedModel
from advfunc.core.stateful import stateful
from tests.support.catalogue import CATALOGUE
from tests.support.method_harness import PassCounter
from tests.support.parity import assert_grads_match
from tests.support.tiny_decoders import completion_batch, tiny_decoder
from tests.support.tiny_models import padded_batch, tiny_model

LARGE_VOCAB = 50_000  # [V, H] = 50,000 × 32: no other tensor of a tiny BERT has V rows


def _seeded(model: torch.nn.Module) -> torch.Generator:
    return torch.Generator(next(model.parameters()).device).manual_seed(0)


# Every classifier method of the catalogue, and FGM on the other kind of target.
STEPS = {
    **{name: (name, {}) for name, entry in CATALOGUE.items() if entry.model == "classifier"},
    "fgm-embeds": ("fgm", {"target": "embeds"}),
}


def _step(method, model, **kwargs):
    """The catalogued step; draws from a generator on the model's device, ``compile`` where it means something."""
    name, overrides = STEPS[method]
    entry = CATALOGUE[name]
    if entry.seeded:
        overrides = {**overrides, "generator": _seeded(model)}
    if "compile" in kwargs and "compile" not in inspect.signature(entry.factory).parameters:
        kwargs = {k: v for k, v in kwargs.items() if k != "compile"}  # R3F, plain: eager only
    return entry.build(model, **overrides, **kwargs)


def _run(method, step, params, batch, passes_only=False, state=None):
    """One call of ``step`` through the stateful protocol from ``state`` (``step.init(params)`` unless given).

    ``passes_only`` hands the protocol the method's passes in place of ``Step``'s checked call.
    """
    protocol = stateful(step)
    state = protocol.init(params) if state is None else state
    grads, out, _ = protocol.carry(step.fn if passes_only else protocol, params, batch, state)
    return grads, out


class NewVocabularyTensors(TorchDispatchMode):
    """Storages of every op output with ``rows`` rows that no tensor in ``known`` already owned."""

    def __init__(self, rows: int, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.rows = rows
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.new: dict[int, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1 and tensor.shape[0] == self.rows:
                pointer = tensor.untyped_storage().data_ptr()
                if pointer not in self.known:
                    self.new.setdefault(pointer, str(func))
        return out


@pytest.mark.parametrize("method", sorted(STEPS))
def test_a_step_allocates_one_vocabulary_sized_tensor_the_gradient_it_returns(method):
    """Every later pass adds the embedding gradient by rows: the only [V, H] tensor is the returned one.

    The method's passes are called directly: ``Step.__call__``'s non-finite check of the
    returned grads is not a pass (and ``torch.isfinite`` of a [V, H] gradient allocates).
    """
    model = tiny_model("bert", vocab=LARGE_VOCAB)
    params, batch = advfunc.params_of(model), padded_batch("bert")
    step = _step(method, model)
    name = "bert.embeddings.word_embeddings.weight"
    state = stateful(step).init(params)  # SMART's θ̃ is the caller's copy, made before the step
    held = [t for t in tree_leaves(state) if isinstance(t, torch.Tensor)]
    with NewVocabularyTensors(LARGE_VOCAB, [*params.values(), *held]) as seen:
        grads, _ = _run(method, step, params, batch, passes_only=True, state=state)
    assert list(seen.new) == [grads[name].untyped_storage().data_ptr()], seen.new


def test_the_oracle_sees_each_dense_embedding_gradient(monkeypatch):
    """Without the rows path, FreeLB-3's later passes form dense [V, H] gradients of their own.

    (Freed ones may be reused by the next, so distinct storages number at least 2.)
    """
    monkeypatch.setattr(Engine, "rows_name", lambda self, call: None)
    model = tiny_model("bert", vocab=LARGE_VOCAB)
    params, batch = advfunc.params_of(model), padded_batch("bert")
    step = _step("freelb", model, steps=3, init_mag=1.0)
    with NewVocabularyTensors(LARGE_VOCAB, list(params.values())) as seen:
        step.fn(params, batch)
    assert len(seen.new) >= 2


@pytest.mark.parametrize("method", sorted(set(STEPS) - {"none"}))
def test_rows_gradient_equals_autograds_dense_gradient(method, monkeypatch):
    """∂L/∂W by rows equals nn.Embedding's own backward (padding row zero included)."""
    model = tiny_model("bert")
    params, batch = advfunc.params_of(model), padded_batch("bert")
    by_rows = _run(method, _step(method, model), params, batch)[0]
    monkeypatch.setattr(Engine, "rows_name", lambda self, call: None)
    dense = _run(method, _step(method, model), params, batch)[0]
    assert_grads_match(by_rows, dense, where=f"{method}: rows vs dense")
    assert torch.count_nonzero(by_rows["bert.embeddings.word_embeddings.weight"][0]) == 0  # padding_idx


def test_rows_path_only_where_the_matrix_is_read_by_the_lookup_alone():
    from transformers import BertConfig, BertForMaskedLM

    assert PerturbedModel(tiny_model("bert")).rows_name == "bert.embeddings.word_embeddings.weight"
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    assert PerturbedModel(BertForMaskedLM(config)).rows_name is None  # tied to the output head
    frozen = tiny_model("bert")
    frozen.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    assert PerturbedModel(frozen).rows_name is None

    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    scaled = tiny_model("bert")
    old = scaled.bert.embeddings.word_embeddings
    scaled.bert.embeddings.word_embeddings = Scaled(old.num_embeddings, old.embedding_dim, padding_idx=0)
    assert PerturbedModel(scaled).rows_name is None


# Every read of a tensor's value on the host (.item(), int(), bool(), a data-dependent
# shape) lowers to one of these; on CUDA each one waits for the stream. So does a tensor
# made from a host value (torch.tensor(x, device=...): lift_fresh), a copy from pageable
# host memory on CUDA.
HOST_READS = {
    "_local_scalar_dense",
    "is_nonzero",
    "equal",
    "nonzero",
    "_unique2",
    "unique_dim",
    "masked_select",
    "lift_fresh",
}
ADVFUNC = str(Path(advfunc.__file__).parent)


class HostReads(TorchDispatchMode):
    """Host reads of tensor values, each with the innermost Python frame outside torch and this file."""

    def __init__(self) -> None:
        super().__init__()
        self.where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
            self.where.append(f"{frames[-1].filename}:{frames[-1].lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", sorted(STEPS))
def test_no_step_reads_a_tensor_value_on_the_host(method):
    """A CPU proxy for "no host-device sync": advfunc's own code never reads a value back.

    The model may (transformers reads ``attention_mask.all()`` to pick an SDPA path, in a
    plain step too); reads from advfunc would stall a CUDA stream on every step.
    """
    model = tiny_model("bert")
    params, batch = advfunc.params_of(model), padded_batch("bert")
    step = _step(method, model)
    with HostReads() as reads:
        _run(method, step, params, batch)
    assert reads.where, "the model's own mask check should be seen: the proxy is blind otherwise"
    ours = [where for where in reads.where if where.startswith(ADVFUNC)]
    assert not ours, ours


PROMPT_STEPS = {
    "pgd@prompt": lambda m: CATALOGUE["pgd"].build(m, target="embeds@prompt"),
    "cat": CATALOGUE["cat"].build,
    "lat": CATALOGUE["lat"].build,
}


@pytest.mark.parametrize("method", sorted(PROMPT_STEPS))
def test_prompt_steps_read_no_tensor_value_on_the_host(method):
    """Prompt targets and the adversary's completion check their rows on the device, not by reading them back."""
    model = tiny_decoder("llama")
    step = PROMPT_STEPS[method](model)
    with HostReads() as reads:
        step(advfunc.params_of(model), completion_batch("left", adversary=method != "pgd@prompt"))
    ours = [where for where in reads.where if where.startswith(ADVFUNC)]
    assert not ours, ours


def test_the_host_read_proxy_sees_a_read_in_advfunc():
    """The batch check reads values only to word its error, and the proxy sees that read."""
    model = tiny_model("bert")
    batch = {**padded_batch("bert"), "input_ids": padded_batch("bert")["input_ids"] + 1000}
    with HostReads() as reads, pytest.raises(ValueError, match="vocabulary"):
        PerturbedModel(model).check_batch(batch)
    assert any(where.startswith(ADVFUNC) for where in reads.where)


TORCH = str(Path(torch.__file__).parent)


def _innermost_caller() -> str:
    """The innermost Python frame outside torch and the warnings machinery that called this."""
    stack = traceback.extract_stack()[:-2]  # less this function and the showwarning hook
    frames = [f for f in stack if not f.filename.startswith(TORCH) and f.filename != warnings.__file__]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the CPU proxy above stands in")
@pytest.mark.parametrize("compile", [False, None], ids=["eager", "default"])
@pytest.mark.parametrize("method", sorted(STEPS))
def test_no_step_synchronises_a_cuda_stream(method, compile):
    """On CUDA, torch's sync debug mode flags every synchronising call; none is advfunc's own.

    ``compile=None`` is the default, compiled on CUDA. Each warning is attributed to the
    innermost Python frame active when it is issued (the model's own synchronising calls
    are left to the model). A read in this test, under the same mode, shows the check is
    not blind.
    """
    torch._dynamo.reset()  # each test compiles a new model: stay under dynamo's recompile limit
    model = tiny_model("bert").cuda()
    params = advfunc.params_of(model)
    batch = {k: v.cuda() for k, v in padded_batch("bert").items()}
    step = _step(method, model, compile=compile)
    _run(method, step, params, batch)  # transformers sets config.problem_type on its first forward
    torch.cuda.synchronize()
    seen: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda *args, **kwargs: seen.append(_innermost_caller())
        torch.cuda.set_sync_debug_mode("warn")
        try:
            control = float(batch["labels"].sum())  # a host read here: must be seen
            _run(method, step, params, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert control >= 0 and any(where.startswith(__file__) for where in seen), seen
    ours = [where for where in seen if where.startswith(ADVFUNC)]
    assert not ours, ours


COST_CASES = [(name, variant) for name, entry in sorted(CATALOGUE.items()) for variant in entry.cost_variants]


@pytest.mark.parametrize(
    ("name", "variant"), COST_CASES, ids=[f"{n}-{','.join(f'{k}={v}' for k, v in o.items())}" for n, o in COST_CASES]
)
def test_every_method_costs_its_documented_passes(name, variant):
    """Forwards and backwards counted with hooks equal the docstring's formula and ``Step.passes``.

    A pass that differentiates the perturbation only counts as one; a forward without a
    backward (SMART's teacher) is counted apart.
    """
    entry = CATALOGUE[name]
    model = entry.make_model()
    step = entry.build(model, **variant)
    settings = entry.settings(**variant)
    assert step.passes == entry.passes(settings)
    assert step.config["forward_only_passes"] == entry.forward_only(settings)
    params = advfunc.params_of(model)
    state = entry.init(step, params)  # ReFAT's direction: its init's passes, not the step's
    with PassCounter(model) as count:
        entry.call(step, params, entry.make_batch(), state)
    assert count.forwards == step.passes + step.config["forward_only_passes"]
    assert count.backwards == step.passes
