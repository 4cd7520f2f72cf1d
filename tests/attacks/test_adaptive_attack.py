"""The adaptive embedding attack on a tiny Llama trained to refuse one set of prompts and comply with another.

The oracle for "a radius that provably suffices": replacing a refused prompt's
embeddings by those of a complied-with prompt of the same length makes the model read
that prompt, which yields the target; the largest per-coordinate change that takes is
the L∞ radius at which success is possible for every example.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

import advfunc
from advfunc import attacks
from advfunc.scale.attack_callback import AttackSuccessCallback
from tests.support.purity import assert_step_is_pure
from tests.support.tiny_decoders import tiny_decoder

pytestmark = pytest.mark.slow  # every test attacks a model the module trains first (a few seconds)

PROMPT = 4
REFUSAL = [5, 6, 7]
TARGET = [8, 9, 10]
EXAMPLES = 6


def _rows(prompts: torch.Tensor, completion: list[int]) -> dict[str, torch.Tensor]:
    """Prompt then completion; labels only at the completion."""
    tail = torch.tensor(completion).expand(prompts.shape[0], -1)
    ids = torch.cat([prompts, tail], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, PROMPT:] = tail
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _prompts():
    g = torch.Generator().manual_seed(0)
    refused = torch.randint(20, 60, (EXAMPLES, PROMPT), generator=g)
    complied = torch.randint(60, 120, (EXAMPLES, PROMPT), generator=g)
    return refused, complied


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama that answers the refused prompts with REFUSAL and the others with TARGET (greedy, exactly)."""
    torch.manual_seed(0)
    model = tiny_decoder("llama")
    refused, complied = _prompts()
    train = _rows(torch.cat([refused, complied]), REFUSAL)
    train["labels"][EXAMPLES:, PROMPT:] = torch.tensor(TARGET)
    train["input_ids"][EXAMPLES:, PROMPT:] = torch.tensor(TARGET)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        model(**train).loss.backward()
        optimizer.step()
    model.eval()
    return model


def _attack_batch(refused: torch.Tensor) -> dict[str, torch.Tensor]:
    """The refused prompts, their desired completion (the refusal) as labels, the target as the adversary's."""
    batch = _rows(refused, REFUSAL)
    adv = torch.full_like(batch["labels"], -100)
    adv[:, PROMPT:] = torch.tensor(TARGET)
    return {**batch, "adv_labels": adv}


def _replacement(model, refused, complied) -> torch.Tensor:
    """δ [B, L, H] that turns each refused prompt's embeddings into a complied-with prompt's."""
    embed = model.get_input_embeddings().weight.detach()
    delta = torch.zeros(refused.shape[0], PROMPT + len(TARGET), embed.shape[1])
    delta[:, :PROMPT] = embed[complied] - embed[refused]
    return delta


def test_the_trained_model_refuses_and_the_replacement_forces_the_target(trained):
    refused, complied = _prompts()
    attack = attacks.adaptive(trained, epsilon=1.0)
    params, batch = advfunc.params_of(trained), _attack_batch(refused)
    zero = torch.zeros(EXAMPLES, PROMPT + len(TARGET), trained.config.hidden_size)
    assert not attack.forced(params, batch, zero).any(), "the model must refuse every prompt unattacked"
    assert attack.forced(params, batch, _replacement(trained, refused, complied)).all()


def test_success_rises_with_the_radius_and_is_one_where_a_replacement_fits(trained):
    refused, complied = _prompts()
    sufficient = float(_replacement(trained, refused, complied).abs().max())  # L∞: every example can be forced
    radii = [sufficient * f for f in (0.01, 0.1, 0.3, 1.0, 2.0)]
    table = attacks.success_rate(
        trained,
        advfunc.params_of(trained),
        _attack_batch(refused),
        radii,
        steps=(5, 40),
        restarts=3,
        norm="linf",
        generator=torch.Generator().manual_seed(1),
    )
    assert [(row.radius, row.steps) for row in table] == [(r, k) for r in radii for k in (5, 40)]
    rates = {(row.radius, row.steps): row.rate for row in table}
    for k in (5, 40):
        along = [rates[(r, k)] for r in radii]
        assert along == sorted(along), f"success must not fall as the radius grows ({k} steps): {along}"
    for r in radii:
        assert rates[(r, 5)] <= rates[(r, 40)]
    assert rates[(radii[0], 40)] == 0.0
    assert rates[(sufficient, 40)] == 1.0 and rates[(2 * sufficient, 40)] == 1.0
    assert all(row.total == EXAMPLES for row in table)


def test_the_returned_delta_forces_the_target_stays_in_the_ball_and_off_the_completion(trained):
    refused, _ = _prompts()
    params, batch = advfunc.params_of(trained), _attack_batch(refused)
    for norm, epsilon in (("linf", 0.5), ("l2", 2.0)):
        attack = attacks.adaptive(trained, epsilon=epsilon, steps=30, restarts=2, norm=norm)
        found = attack.search(params, batch)
        forced = attack.forced(params, batch, found.delta)
        assert torch.equal(forced, found.first_success >= 0), norm
        assert forced.any(), f"{norm}: the attack should force some prompt at radius {epsilon}"
        size = found.delta.abs().amax(-1) if norm == "linf" else found.delta.norm(dim=-1)  # [B, L] per token
        assert float(size.max()) <= epsilon * (1 + 1e-5)
        assert float(found.delta[:, PROMPT:].abs().max()) == 0.0


def test_the_attack_is_pure_and_draws_from_its_generator(trained):
    refused, _ = _prompts()
    params, batch = advfunc.params_of(trained), _attack_batch(refused)

    def run(seed):
        attack = attacks.adaptive(
            trained, epsilon=0.3, steps=4, restarts=3, generator=torch.Generator().manual_seed(seed)
        )
        return attack(params, batch)

    first = assert_step_is_pure(trained, lambda: run(3), params, batch)
    assert torch.equal(first, run(3))


def test_bad_arguments_are_named(trained):
    with pytest.raises(ValueError, match="restarts must be >= 1"):
        attacks.adaptive(trained, restarts=0)
    with pytest.raises(ValueError, match="norm must be one of"):
        attacks.adaptive(trained, norm="l1")
    with pytest.raises(ValueError, match="radii is empty"):
        attacks.success_rate(trained, advfunc.params_of(trained), _attack_batch(_prompts()[0]), [])
    batch = _attack_batch(_prompts()[0])
    with pytest.raises(ValueError, match="leave start= out"):
        attacks.adaptive(trained)(advfunc.params_of(trained), batch, start=torch.zeros(EXAMPLES, 7, 32))
    with pytest.raises(ValueError, match="adv_labels"):
        attacks.adaptive(trained).search(advfunc.params_of(trained), _rows(_prompts()[0], REFUSAL))


def test_the_trainer_callback_reports_the_success_rates_at_each_evaluation(trained, tmp_path):
    refused, _ = _prompts()
    batch = _attack_batch(refused)
    radii = (0.01, 0.5)
    callback = AttackSuccessCallback(batch, radii=radii, steps=(3, 10), restarts=2, seed=4)
    rows = [{k: v[i] for k, v in _rows(refused, REFUSAL).items()} for i in range(EXAMPLES)]
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=EXAMPLES)
    trainer = Trainer(
        model=trained, args=args, eval_dataset=rows, data_collator=default_data_collator, callbacks=[callback]
    )
    metrics = trainer.evaluate()
    expected = attacks.success_rate(
        trained,
        advfunc.params_of(trained),
        batch,
        radii,
        steps=(3, 10),
        restarts=2,
        generator=torch.Generator().manual_seed(4),
    )
    assert callback.last == expected
    for row in expected:
        assert metrics[f"eval_asr_r{row.radius:g}_k{row.steps}"] == row.rate
    assert trainer.state.log_history[-1]["eval_asr_r0.5_k10"] == 1.0
    with pytest.raises(ValueError, match="radii is empty"):
        AttackSuccessCallback(batch, radii=())
