"""The workloads the benchmarks run: BERT and decoder shapes, vocabularies, batch sizes and precision.

A BERT shape is a sequence classifier trained in full; a decoder shape (``family="qwen2"``) is a
causal LM with LoRA adapters on its attention projections, trained on completion-only batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

# Token ids below this are kept for special tokens (pad is 0), as in BERT's vocabulary.
FIRST_REAL_TOKEN = 1000
NUM_LABELS = 2


@dataclass(frozen=True)
class ModelShape:
    """A transformer's size; the vocabulary is chosen separately.

    ``family`` "bert" (a sequence classifier) or "qwen2" (a causal LM with LoRA, grouped-query
    attention with ``kv_heads`` key/value heads).
    """

    name: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    family: str = "bert"
    kv_heads: int = 0

    @property
    def decoder(self) -> bool:
        return self.family != "bert"


SHAPES = {
    # For the smoke test only: small enough to run every method in seconds.
    "tiny": ModelShape("tiny", layers=2, hidden=32, heads=4, intermediate=64),
    "minilm": ModelShape("minilm", layers=6, hidden=384, heads=12, intermediate=1536),
    # Small enough that per-pass overhead (Python, leaves, hooks) shows beside the matmuls.
    "small": ModelShape("small", layers=4, hidden=256, heads=4, intermediate=1024),
    "base": ModelShape("base", layers=12, hidden=768, heads=12, intermediate=3072),
    # For the smoke test only: a 2-layer causal LM with LoRA.
    "tiny-decoder": ModelShape(
        "tiny-decoder", layers=2, hidden=32, heads=4, intermediate=64, family="qwen2", kv_heads=2
    ),
    # Qwen2-0.5B's configuration (494M parameters with its 151,936-token vocabulary, tied embeddings).
    "qwen2-0.5b": ModelShape(
        "qwen2-0.5b", layers=24, hidden=896, heads=14, intermediate=4864, family="qwen2", kv_heads=2
    ),
}
VOCABS = (30_522, 250_002)
DECODER_VOCAB = 151_936  # Qwen2's
# LoRA as commonly fine-tuned: rank 16 on the attention projections, the rest frozen.
LORA_RANK = 16
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
CPU_BATCHES = ((16, 64),)
GPU_BATCHES = ((32, 128), (32, 512))


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration: model shape, vocabulary, batch × length, device, precision.

    ``autocast`` is None (fp32) or ``torch.bfloat16``/``torch.float16``; the model's weights
    stay fp32 either way, as in mixed-precision training.
    """

    shape: ModelShape
    vocab: int
    batch: int
    length: int
    device: str
    autocast: torch.dtype | None

    @property
    def dtype_name(self) -> str:
        return "fp32" if self.autocast is None else f"{str(self.autocast).removeprefix('torch.')} autocast"

    @property
    def label(self) -> str:
        return f"{self.shape.name} vocab={self.vocab} {self.batch}x{self.length} {self.dtype_name} {self.device}"

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (the record of what was measured)."""
        return {
            **asdict(self.shape),
            "vocab": self.vocab,
            "batch": self.batch,
            "length": self.length,
            "device": self.device,
            "dtype": self.dtype_name,
        }


def parse_autocast(name: str | None) -> torch.dtype | None:
    """``None``/"fp32" → None; "bf16" → bfloat16; "fp16" → float16."""
    table = {None: None, "fp32": None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown precision {name!r}; one of fp32, bf16, fp16")
    return table[name]


def autocast_name(dtype: torch.dtype | None) -> str:
    """Inverse of :func:`parse_autocast`."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def build_model(workload: Workload, seed: int = 0) -> nn.Module:
    """A randomly initialised model of the workload's shape, dropout off, train mode.

    BERT shapes: a classifier, every weight trainable. Decoder shapes: :func:`build_decoder`.

    Random weights: the benchmarks must not download anything, and timing does not depend
    on the values. ``problem_type`` is fixed up front because transformers sets it on the
    first forward, which would make a compiled step recompile once.
    """
    torch.manual_seed(seed)
    shape = workload.shape
    if shape.decoder:
        return build_decoder(workload)
    config = BertConfig(
        vocab_size=workload.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=max(512, workload.length),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        problem_type="single_label_classification",
        pad_token_id=0,
    )
    config.num_labels = NUM_LABELS
    model = BertForSequenceClassification(config)
    nn.Module.to(model, workload.device)
    model.train()  # dropout is 0: train mode is deterministic and what training runs
    return model


def build_decoder(workload: Workload) -> nn.Module:
    """A random Qwen2-family causal LM of the workload's shape with LoRA adapters (PEFT).

    Built on the workload's device (no CPU initialisation of half a billion weights);
    only the adapters (rank ``LORA_RANK`` on ``LORA_MODULES``) are trainable, the
    embedding matrix is frozen, so perturbations target the embedding output.
    """
    from peft import LoraConfig, get_peft_model

    shape = workload.shape
    config = Qwen2Config(
        vocab_size=workload.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=max(512, workload.length),
        tie_word_embeddings=True,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.device(workload.device):
        base: PreTrainedModel = Qwen2ForCausalLM(config)
    lora = LoraConfig(
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        target_modules=list(LORA_MODULES),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    model.train()
    return model


def make_batch(workload: Workload, seed: int = 0, length: int | None = None) -> dict[str, torch.Tensor]:
    """A right-padded batch of random tokens: ``length`` columns (default the workload's).

    Every example but the first is padded to a random length of at least half the
    columns, so attention masks matter as they do in real batches. BERT shapes get a
    class label per example; decoder shapes a completion-only batch: the first half of
    each example is the prompt (labels −100), the rest the completion (``labels`` its
    tokens), and ``adv_labels`` another completion at the same positions (the adversary's,
    for CAT and LAT).
    """
    columns = workload.length if length is None else length
    g = torch.Generator().manual_seed(seed)
    low = min(FIRST_REAL_TOKEN, workload.vocab // 2)
    ids = torch.randint(low, workload.vocab, (workload.batch, columns), generator=g)
    lengths = torch.randint(max(2, columns // 2), columns + 1, (workload.batch,), generator=g)
    lengths[0] = columns
    positions = torch.arange(columns)[None, :]
    mask = (positions < lengths[:, None]).long()
    ids = ids * mask  # pad id 0
    if workload.shape.decoder:
        completion = mask.bool() & (positions >= (lengths // 2)[:, None])
        other = torch.randint(low, workload.vocab, ids.shape, generator=g)
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.where(completion, ids, -100),
            "adv_labels": torch.where(completion, other, -100),
        }
    else:
        labels = torch.randint(0, NUM_LABELS, (workload.batch,), generator=g)
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}
    return {k: v.to(workload.device) for k, v in batch.items()}


def pad_to_bucket(batch: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """``batch`` right-padded (ids 0, mask 0) to the next multiple of ``multiple`` columns.

    Bucketing bounds the number of distinct shapes a static-shape compiled step sees.
    """
    columns = batch["input_ids"].shape[1]
    target = -(-columns // multiple) * multiple
    if target == columns:
        return dict(batch)
    extra = target - columns
    padded = dict(batch)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in batch:
            padded[key] = torch.nn.functional.pad(batch[key], (0, extra), value=0)
    return padded
