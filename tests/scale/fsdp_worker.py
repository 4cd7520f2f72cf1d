"""One rank of the FSDP2 checks in tests/scale/test_fsdp.py.

Run under ``torchrun --nproc_per_node 2 tests/scale/fsdp_worker.py OUT_DIR``: for each case of
:data:`CASES` a tiny Llama is sharded per layer with ``fully_shard`` (gloo, CPU), the
step runs inside ``advfunc.scale.fsdp.unsharded`` on this rank's own batch, the grads are
averaged over the ranks, handed to the shards and one SGD step is taken. Each rank saves
the gathered gradients and parameters to ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import advfunc
from advfunc.scale.fsdp import shard_grads, unsharded
from tests.support.tiny_decoders import completion_batch, tiny_decoder

LR = 0.1
CASES = {
    "pgd embeds": lambda m, prefix: advfunc.pgd(m, epsilon=0.1, alpha=0.05, steps=2, target="embeds"),
    "pgd layer": lambda m, prefix: advfunc.pgd(m, epsilon=0.1, alpha=0.05, steps=2, target=prefix + "model.layers.0"),
    "lora pgd embeds": lambda m, prefix: advfunc.pgd(m, epsilon=0.1, alpha=0.05, steps=2, target="embeds"),
}


def model_for(case: str) -> tuple[torch.nn.Module, str]:
    """The case's model (LoRA adapters on q and v for the "lora" cases) and its parameter-name prefix."""
    model = tiny_decoder("llama")
    model.config.use_cache = False
    if not case.startswith("lora"):
        return model, ""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config), "base_model.model."


def whole(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


def reshard_settings_after_unsharded() -> dict[str, bool]:
    """Whether each layer's parameters are gathered after a forward that follows an ``unsharded`` block.

    Layer 0 is sharded with ``reshard_after_forward=False`` (kept gathered after its
    forward), layer 1 with the default (sharded again): the block must leave both as set.
    """
    model = tiny_decoder("llama")
    model.config.use_cache = False
    first, second = model.model.layers
    fully_shard(first, reshard_after_forward=False)
    fully_shard(second)
    fully_shard(model)
    with unsharded(model):
        pass
    with torch.no_grad():
        model(**{k: v for k, v in completion_batch("right").items() if k != "labels"})
    layers = {"0": first, "1": second}
    gathered = {name: not isinstance(layer.mlp.up_proj.weight, DTensor) for name, layer in layers.items()}
    for module in (first, second, model):
        module.reshard()
    return gathered


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    saved: dict = {"reshard_settings": reshard_settings_after_unsharded()}
    for case, build in CASES.items():
        model, prefix = model_for(case)
        decoder = model.get_base_model() if prefix else model
        for layer in decoder.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        batch = completion_batch("right", seed=rank)
        with unsharded(model):
            step = build(model, prefix)
            grads, _ = step(advfunc.params_of(model), batch)
        try:
            step(advfunc.params_of(model), batch)
            refused = ""
        except TypeError as error:
            refused = str(error)
        grads = advfunc.distributed.all_reduce_grads(grads)
        shard_grads(model, grads)
        optimizer.step()
        saved[case] = {
            "grads": {n: whole(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None},
            "params": {n: whole(p).detach().clone() for n, p in model.named_parameters()},
            "refused": refused,
            "world": dist.get_world_size(),
        }
    torch.save(saved, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
