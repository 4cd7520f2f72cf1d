"""``advfunc decoder --chat-template`` on a tiny random Llama whose word-level tokenizer has a chat template.

The oracle is the tokenizer's own ``apply_chat_template``, called here: the instruction as
the user turn with the generation prompt, the answer as the assistant turn after it.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from advfunc.app.cli import main
from advfunc.app.decoder import job as decoder_job
from advfunc.app.decoder.data import Answers, batch, prompts
from advfunc.app.decoder.evaluate import answer_scores
from advfunc.hf import AdversarialTrainer
from tests.app.test_decoder_job import HAS_WORDNET
from tests.support.tiny_decoders import tiny_decoder
from tests.support.tiny_task import FILLER, NEGATIVE, POSITIVE, save_tiny_model, sentences, write_csv

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "Review", ":", "Sentiment", "positive", "negative", "user", "assistant"]
WORDS += ["END", *POSITIVE, *NEGATIVE, *FILLER]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} END {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
ANSWERS = {"pos": " positive", "neg": " negative"}
METHOD = "cat:alpha=0.05,epsilon=0.2,steps=1"


def _tokenizer(template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """Whole words and punctuation; ids 0–2 are the tiny decoders' pad, bos and eos."""
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = template
    return tokenizer


def _folder(path, template: str | None = TEMPLATE):
    tiny_decoder("llama").save_pretrained(path)
    _tokenizer(template).save_pretrained(path)
    return path


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _oracle(tokenizer, text: str, word: str) -> tuple[list[int], list[int]]:
    """(the user turn rendered with the generation prompt, the assistant turn's ids after it)."""
    user = [{"role": "user", "content": f"Review: {text}\nSentiment:"}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": word}], tokenize=False)
    prompt_ids, whole_ids = _ids(tokenizer, prompt), _ids(tokenizer, whole)
    assert whole_ids[: len(prompt_ids)] == prompt_ids
    return prompt_ids, whole_ids[len(prompt_ids) :]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A CAT fine-tune through the job on the chat template, every batch the trainer fed recorded."""
    folder = _folder(tmp_path_factory.mktemp("tiny-chat-llama"))
    tokenizer = _tokenizer()
    answers = Answers.of(ANSWERS, tokenizer, chat=True)
    rows = sentences(16, seed=3)
    classes = [0 if label == "pos" else 1 for _, label in rows]
    data = prompts([text for text, _ in rows], classes, tokenizer, answers, max_length=32)
    seen = []
    original = AdversarialTrainer.training_step

    def recording(self, model, inputs, num_items_in_batch=None):
        seen.append({k: v.clone() for k, v in inputs.items()})
        return original(self, model, inputs, num_items_in_batch)

    settings = decoder_job.Settings(
        train_size=16, test_size=8, attack_examples=4, epochs=1, batch_size=8, lr=5e-2, warmup_ratio=0.0,
        max_grad_norm=1.0, max_length=32, radii=(0.5,), pgd_steps=1, synonym=None, lora_r=4, chat_template=True,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AdversarialTrainer, "training_step", recording)
        decoder_job.fine_tune(folder, lambda ix: batch(data, answers, ix, True), len(data), METHOD, 0, settings, False)
    return tokenizer, rows, seen


def test_training_rows_are_the_templates_user_turn_then_the_assistants_answer(chat_run):
    tokenizer, rows, seen = chat_run
    wanted = {}  # the oracle's prompt ids -> (answer ids, the other answer's ids)
    for text, label in rows:
        good, bad = ("positive", "negative") if label == "pos" else ("negative", "positive")
        prompt, answer = _oracle(tokenizer, text, good)
        assert _oracle(tokenizer, text, bad)[0] == prompt
        wanted[tuple(prompt)] = (answer, _oracle(tokenizer, text, bad)[1])
    assert tokenizer.convert_ids_to_tokens(next(iter(wanted.values()))[0])[-1] == "END"  # the turn's end is labelled
    found = []
    assert len(seen) == 2
    for inputs in seen:
        for ids, mask, labels, adv in zip(
            inputs["input_ids"], inputs["attention_mask"], inputs["labels"], inputs["adv_labels"], strict=True
        ):
            labelled = (labels != -100).nonzero().flatten().tolist()
            start, end = labelled[0], labelled[-1] + 1
            assert labelled == list(range(start, end))  # one contiguous answer
            prompt = tuple(ids[:start].tolist())
            answer, other = wanted[prompt]
            assert labels[start:end].tolist() == answer and ids[start:end].tolist() == answer
            assert int(mask.sum()) == end and bool((mask[:end] == 1).all())
            assert adv[start : start + len(other)].tolist() == other and int((adv != -100).sum()) == len(other)
            found.append(prompt)
    assert sorted(found) == sorted(wanted)  # every training row, once


def test_a_cut_review_keeps_the_template_and_the_answer_within_max_length():
    tokenizer = _tokenizer()
    answers = Answers.of(ANSWERS, tokenizer, chat=True)
    rows = sentences(12, seed=4)
    data = prompts([text for text, _ in rows], [0] * len(rows), tokenizer, answers, max_length=16)
    assert answers.ids == (tuple(_ids(tokenizer, "positive END")), tuple(_ids(tokenizer, "negative END")))
    for (text, _), prompt in zip(rows, data.input_ids, strict=True):
        assert len(prompt) + 2 <= 16
        kept = tokenizer.convert_ids_to_tokens(prompt)[4:-5]  # user : Review : ... Sentiment : END assistant :
        assert kept == text.split()[: len(kept)] and len(kept) == min(len(text.split()), 16 - 2 - 9)
        assert prompt == _oracle(tokenizer, " ".join(kept), "positive")[0]
    inputs = batch(data, answers, [0, 1], adversary=False)
    assert inputs["input_ids"].shape[1] <= 16


def test_a_tokenizer_without_a_chat_template_is_refused_before_the_data_is_read(tmp_path, capsys):
    folder = _folder(tmp_path / "plain", template=None)
    capsys.readouterr()  # the save's progress bar
    missing = tmp_path / "no-such-file.csv"
    args = ["--no-progress", "decoder", "--model", str(folder), "--data", str(missing), "--chat-template"]
    assert main([*args, "--output", str(tmp_path / "out"), "--no-synonym"]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "chat_template" in err and "leave --chat-template out" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_job_on_the_chat_template_writes_its_report(tmp_path):
    folder = _folder(tmp_path / "chat")
    train = write_csv(tmp_path / "train.csv", sentences(8, seed=0))
    test = write_csv(tmp_path / "test.csv", sentences(6, seed=1))
    out = tmp_path / "report"
    args = ["--no-progress", "decoder", "--chat-template", "--model", str(folder), "--data", str(train)]
    args += ["--eval-data", str(test), "--answer", "pos=positive", "--answer", "neg=negative", "--output", str(out)]
    args += ["--methods", METHOD, "--seeds", "0", "--batch-size", "4", "--max-length", "32", "--lora-r", "2"]
    args += ["--attack-examples", "4", "--radii", "0.5", "--synonym-examples", "2", "--synonym-queries", "20"]
    args += ["--encoder", str(save_tiny_model(tmp_path / "encoder"))] if HAS_WORDNET else ["--no-synonym"]
    assert main(args) == 0
    document = json.loads((out / "results.json").read_text())
    (run,) = document["runs"]
    assert run["method"] == "cat(alpha=0.05,epsilon=0.2,steps=1)" and run["train"]["steps"] == 2
    assert run["eval"]["examples"] == 6 and set(run["eval"]["robust"]) == {"0.5"}
    assert (run["eval"]["synonym"] is not None) == HAS_WORDNET  # the synonym attack queries the chat prompts too
    assert "chat template" in (out / "results.md").read_text()


def test_chat_and_plain_answer_scoring_read_the_token_after_the_rendered_prompt():
    tokenizer = _tokenizer()
    answers = Answers.of(ANSWERS, tokenizer, chat=True)
    rows = sentences(4, seed=5)
    data = prompts([text for text, _ in rows], [0, 1, 0, 1], tokenizer, answers, max_length=32)
    model = tiny_decoder("llama", seed=1).eval()
    scores = answer_scores(model, data, answers, batch_size=3)
    with torch.no_grad():
        for i, (text, _) in enumerate(rows):
            prompt, _ = _oracle(tokenizer, text, "positive")
            logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
            wanted = logits[[answers.ids[0][0], answers.ids[1][0]]]
            torch.testing.assert_close(scores[i], wanted, rtol=1e-5, atol=1e-5)
