"""``advfunc.hf.AdversarialTrainer`` against a hand-written loop, with LoRA, bf16, SMART, free AT and resume."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import TrainerCallback, TrainingArguments, default_data_collator

import advfunc
from advfunc.hf import AdversarialTrainer
from advfunc.methods import registry
from tests.support.tiny_decoders import completion_batch, tiny_decoder
from tests.support.tiny_models import padded_batch, tiny_model

pytest.importorskip("accelerate")  # Trainer needs it
peft = pytest.importorskip("peft")


def _examples(count: int, with_types: bool = False) -> list[dict[str, torch.Tensor]]:
    batch = padded_batch("bert", batch=count, length=12, seed=3, num_labels=2)
    if with_types:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    return [{k: v[i] for k, v in batch.items()} for i in range(count)]


def _args(tmp_path, **overrides) -> TrainingArguments:
    settings = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 0.05,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "logging_strategy": "no",
        "remove_unused_columns": False,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def reference_run(model, method, batches, *, accumulate=1, replays=1, max_grad_norm=0.0, lr=1e-2, beta=0.9):
    """The loop a user writes around an advfunc step (README), by hand; the gradients before each optimizer step.

    Each ``accumulate`` batches make one optimizer step on the mean of their gradients,
    replayed ``replays`` times (free AT, δ carried); then clipping, AdamW (no weight decay),
    a linear decay to zero and SMART's teacher θ̃ ← β θ̃ + (1 − β) θ. The noise generator is
    the one a spec's run draws from (seed 0).
    """
    spec = registry.parse_method(method)
    noise = registry.seeded_generator(model, 0) if registry.draws_noise(spec) else None
    step = registry.build_step(spec, model, generator=noise)
    params = advfunc.params_of(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    teacher = advfunc.teacher_of({n: p for n, p in model.named_parameters() if p.requires_grad})
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    total = len(batches) // accumulate * replays
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, (total - t) / total))
    before_steps = []
    model.train()
    for k in range(0, len(batches), accumulate):
        group, delta = batches[k : k + accumulate], None
        for _ in range(replays):
            for i, batch in enumerate(group):
                if spec.name == "smart":
                    grads, out = step(params, batch, teacher)
                elif spec.name == "free_at":
                    grads, out = step(params, batch, delta)
                    delta = out.delta
                else:
                    grads, out = step(params, batch)
                advfunc.set_grads(model, {n: g / len(group) for n, g in grads.items()}, accumulate=i > 0)
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            before_steps.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if spec.name == "smart":
                teacher = advfunc.ema(teacher, params, beta)
    return before_steps


class RecordingTrainer(AdversarialTrainer):
    """Keeps the micro-batches Trainer fed, in order, to replay them through the hand-written loop."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[dict[str, torch.Tensor]] = []
        self.autocast_seen: list[bool] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


class GradsBeforeStep(TrainerCallback):
    """The accumulated (and clipped) gradients Trainer hands to the optimizer, per step."""

    def __init__(self, model):
        self.model = model
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_gradient_accumulation_matches_a_hand_written_loop(tmp_path, max_grad_norm):
    # AdamW hides a constant gradient scale, so the gradients before each optimizer step are
    # compared too; without clipping (0.0) they expose any 1/n_accum mistake.
    model = tiny_model("bert", num_labels=2)
    twin = copy.deepcopy(model)
    start = copy.deepcopy(model)
    method = "pgd:alpha=0.2,epsilon=0.5,steps=2,target=embeds"
    recorder = GradsBeforeStep(model)
    trainer = RecordingTrainer(
        model=model,
        args=_args(tmp_path, max_grad_norm=max_grad_norm),
        train_dataset=_examples(8),
        data_collator=default_data_collator,
        callbacks=[recorder],
        step_factory=partial(advfunc.pgd, epsilon=0.5, alpha=0.2, steps=2, target="embeds"),
    )
    trainer.train()
    assert len(trainer.seen) == 4 and trainer.state.global_step == 2

    ours = reference_run(twin, method, trainer.seen, accumulate=2, max_grad_norm=max_grad_norm)
    assert len(ours) == len(recorder.grads) == 2
    for t, (mine, theirs) in enumerate(zip(ours, recorder.grads, strict=True)):
        assert set(mine) == set(theirs)
        for name in mine:
            torch.testing.assert_close(theirs[name], mine[name], rtol=1e-5, atol=1e-7, msg=f"step {t} {name}")
    with torch.no_grad():
        for (name, ours_p), theirs_p in zip(twin.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(theirs_p, ours_p, rtol=1e-5, atol=1e-6, msg=name)
        assert sum(float((p - q).abs().sum()) for p, q in zip(model.parameters(), start.parameters(), strict=True)) > 0


def test_lora_trains_only_the_adapter(tmp_path):
    base = tiny_model("bert", num_labels=2)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    model = peft.get_peft_model(base, config)
    assert not model.get_input_embeddings().weight.requires_grad
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trainer = AdversarialTrainer(
        model=model,
        args=_args(tmp_path, max_grad_norm=1.0),
        train_dataset=_examples(8, with_types=True),  # token_type_ids: the base model's forward takes them
        data_collator=default_data_collator,
        step_factory="fgm:epsilon=0.1,target=embeds",  # the CLI's method spec works too
    )
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert changed <= trainable, f"frozen weights moved: {sorted(changed - trainable)[:3]}"
    assert all("lora_" in n or "modules_to_save" in n for n in changed)
    assert any("lora_B" in n for n in changed), "the LoRA B matrices (zero at start) must move"


def test_bf16_runs_the_step_under_autocast(tmp_path):
    model = tiny_model("bert", num_labels=2)
    seen: list[bool] = []
    model.classifier.register_forward_hook(lambda m, a, o: seen.append(torch.is_autocast_enabled("cpu")))
    trainer = AdversarialTrainer(
        model=model,
        args=_args(tmp_path, bf16=True, gradient_accumulation_steps=1),
        train_dataset=_examples(4),
        data_collator=default_data_collator,
        step_factory=partial(advfunc.fgm, epsilon=0.1),
    )
    trainer.train()
    assert seen and all(seen), "the adversarial passes did not run under Trainer's bf16 autocast"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights stay fp32"


@pytest.mark.parametrize(
    "method",
    ["smart:beta=0.9,step_size=0.01,epsilon=0.01", "free_at:epsilon=0.05,replays=3"],
    ids=["smart teacher", "free_at replays"],
)
def test_methods_with_their_own_state_match_a_hand_written_loop(tmp_path, method):
    """SMART's EMA teacher and free AT's replays, driven by the Trainer, against the hand-written loop."""
    model = tiny_model("bert", num_labels=2)
    twin = copy.deepcopy(model)
    replays = 3 if method.startswith("free_at") else 1
    trainer = RecordingTrainer(
        model=model,
        args=_args(tmp_path, gradient_accumulation_steps=1, max_steps=2 * replays, max_grad_norm=1.0),
        train_dataset=_examples(4),
        data_collator=default_data_collator,
        step_factory=method,
    )
    trainer.train()
    assert len(trainer.seen) == 2 * replays
    batches = trainer.seen[::replays]
    for k, batch in enumerate(batches):  # each batch comes back `replays` times in a row
        for again in trainer.seen[k * replays : (k + 1) * replays]:
            assert all(torch.equal(again[key], batch[key]) for key in batch)
    reference_run(twin, method, batches, replays=replays, max_grad_norm=1.0)
    # A key bias's gradient is zero up to rounding (softmax ignores a shift of all of a query's
    # scores), and Adam scales that rounding up to steps of about lr: those are compared loosely.
    keys = {id(layer.attention.self.key.bias) for layer in model.bert.encoder.layer}
    keys |= {id(layer.attention.self.key.bias) for layer in twin.bert.encoder.layer}
    with torch.no_grad():
        for (name, ours), theirs in zip(twin.named_parameters(), model.parameters(), strict=True):
            atol = 1e-4 if id(ours) in keys else 1e-6
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize(
    "method", ["smart:step_size=0.01,epsilon=0.01", "free_at:epsilon=0.05,replays=3"], ids=["smart", "free_at"]
)
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, method):
    """Teacher, carried δ (step 2 of 3 replays) and the noise generator come back from the checkpoint."""

    def run(resume=None):
        model = tiny_model("bert", num_labels=2)
        trainer = AdversarialTrainer(
            model=model,
            args=_args(
                tmp_path / "run", gradient_accumulation_steps=1, max_steps=5, save_strategy="steps", save_steps=2
            ),
            train_dataset=_examples(12),
            data_collator=default_data_collator,
            step_factory=method,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, {n: p.detach().clone() for n, p in model.named_parameters()}

    first, whole = run()
    assert first.method_state(), "the method kept no state to checkpoint"
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir())
    assert "advfunc_method.pt" in saved, saved
    _, resumed = run(resume=str(tmp_path / "run" / "checkpoint-2"))
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    (tmp_path / "run" / "checkpoint-2" / "advfunc_method.pt").unlink()
    with pytest.raises(ValueError, match=r"advfunc_method\.pt"):
        run(resume=str(tmp_path / "run" / "checkpoint-2"))


def test_non_finite_step_grads_never_reach_the_weights(tmp_path):
    model = tiny_model("bert", num_labels=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = AdversarialTrainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_examples(8),
        data_collator=default_data_collator,
        step_factory=partial(advfunc.fgm, epsilon=1e30),
    )
    with pytest.raises(FloatingPointError, match="non-finite gradients"):
        trainer.train()
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name]), name


class ScaledTrainer(AdversarialTrainer):
    """fp16's GradScaler as accelerate gives it on a GPU, here on CPU (accelerate makes none there)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)


def test_with_a_loss_scaler_the_update_is_unchanged_and_an_overflow_skips_it(tmp_path):
    """The scaler path (the surrogate through Trainer's backward) against the plain one."""
    plain, scaled = tiny_model("bert", num_labels=2), tiny_model("bert", num_labels=2)
    settings = {"optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.0}  # the scaler unscales inside step()
    for cls, model in ((AdversarialTrainer, plain), (ScaledTrainer, scaled)):
        cls(
            model=model,
            args=_args(tmp_path / cls.__name__, **settings),
            train_dataset=_examples(8),
            data_collator=default_data_collator,
            step_factory="pgd:alpha=0.2,epsilon=0.5,steps=2,target=embeds",
        ).train()
    start = tiny_model("bert", num_labels=2)
    assert not torch.equal(plain.classifier.weight, start.classifier.weight)
    for (name, want), got in zip(plain.named_parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)  # a power-of-two scale is exact

    model = tiny_model("bert", num_labels=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = ScaledTrainer(
        model=model,
        args=_args(tmp_path / "overflow", **settings),
        train_dataset=_examples(8),
        data_collator=default_data_collator,
        step_factory=partial(advfunc.fgm, epsilon=1e30),
    )
    trainer.train()  # no error: the scaler skips each overflowing update and lowers its scale
    assert trainer.accelerator.scaler.get_scale() < 2.0**10
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name]), name


def test_batch_keys_advfunc_consumes_survive_trainers_column_removal(tmp_path):
    # Trainer drops every batch key the model's forward does not take (remove_unused_columns,
    # on by default): a perturb_mask dropped there would silently perturb every token.
    examples = _examples(4)
    for example in examples:
        example["perturb_mask"] = torch.zeros_like(example["input_ids"])
        example["adv_labels"] = torch.full_like(example["input_ids"], -100)
    trainer = AdversarialTrainer(
        model=tiny_model("bert", num_labels=2),
        args=_args(tmp_path, remove_unused_columns=True),
        train_dataset=examples,
        data_collator=default_data_collator,
        step_factory="pgd:epsilon=0.5,alpha=0.2,steps=1,target=embeds",
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"perturb_mask", "input_ids", "labels"} <= set(batch)
    assert "adv_labels" not in batch  # PGD takes no adversary's completion; CAT and LAT do
    evaluated = next(iter(trainer.get_eval_dataloader(examples)))  # the model's own forward: its keys only
    assert "perturb_mask" not in evaluated and "input_ids" in evaluated
    decoder = tiny_decoder("llama")
    rows = completion_batch("right", adversary=True)
    rows["perturb_mask"] = torch.ones_like(rows["input_ids"])
    trainer = AdversarialTrainer(
        model=decoder,
        args=_args(tmp_path, remove_unused_columns=True),
        train_dataset=[{k: v[i] for k, v in rows.items()} for i in range(3)],
        data_collator=default_data_collator,
        step_factory=partial(advfunc.cat, steps=1),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"perturb_mask", "adv_labels", "input_ids", "labels"} <= set(batch)


@pytest.mark.slow
@pytest.mark.parametrize("compile", [True, False])
def test_a_specs_step_compiles_as_the_trainer_is_told(tmp_path, compile):
    """``compile`` reaches the spec's step: True compiles even on the CPU, False stays eager (on CUDA too)."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("bert", num_labels=2)
    trainer = AdversarialTrainer(
        model=model,
        args=_args(tmp_path, max_steps=1, gradient_accumulation_steps=1),
        train_dataset=_examples(2),
        data_collator=default_data_collator,
        step_factory="fgm:epsilon=0.1,target=embeds",
        compile=compile,
    )
    trainer.train()
    assert (counters["stats"]["unique_graphs"] > 0) is compile


def test_free_at_on_an_iterable_dataset_is_refused_before_training(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(_examples(8))

    model = tiny_model("bert", num_labels=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = AdversarialTrainer(
        model=model,
        args=_args(tmp_path, gradient_accumulation_steps=1),
        train_dataset=Stream(),
        data_collator=default_data_collator,
        step_factory="free_at:epsilon=0.05,replays=3",
    )
    with pytest.raises(ValueError, match=r"free_at replays each batch.*iterable Stream"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # Without replays the same stream trains.
    AdversarialTrainer(
        model=model,
        args=_args(tmp_path, gradient_accumulation_steps=1),
        train_dataset=Stream(),
        data_collator=default_data_collator,
        step_factory="free_at:epsilon=0.05,replays=1",
    ).train()
