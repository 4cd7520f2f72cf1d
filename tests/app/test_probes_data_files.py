"""Data files a hostile or careless user gives: each is read right or refused naming the file, line and fix."""

from __future__ import annotations

import codecs
import os

import pytest

from advfunc.app.common.data import DataError, load_file

GOOD = "text,label\nnice film,1\nbad film,0\n"


def test_utf32_with_a_byte_order_mark_is_read(tmp_path):
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be")):
        path = tmp_path / f"{codec}.csv"
        path.write_bytes(bom + GOOD.encode(codec))
        data = load_file(path)
        assert data.texts == ("nice film", "bad film") and data.labels == ("1", "0")


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (GOOD.encode("utf-16-le"), 1),  # UTF-16 without its mark decodes as UTF-8 with a NUL beside each character
        (b"text,label\nnice\x00 film,1\nbad,0\n", 2),
    ],
)
def test_a_nul_character_is_refused_naming_its_line(tmp_path, content, line):
    path = tmp_path / "data.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"data\.csv, line {line}: a NUL character.*save it as UTF-8"):
        load_file(path)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_constants_that_are_not_json_are_refused(tmp_path, constant):
    path = tmp_path / "data.jsonl"
    path.write_text(f'{{"text": "a", "label": 0}}\n{{"text": "b", "label": {constant}}}\n')
    with pytest.raises(DataError, match=rf"line 2: .*{constant} is not a JSON value"):
        load_file(path)


@pytest.mark.parametrize("number", ["1e400", "-1e400"])
def test_a_json_number_past_a_floats_range_is_refused_not_made_class_inf(tmp_path, number):
    path = tmp_path / "data.jsonl"
    path.write_text(f'{{"text": "a", "label": 0}}\n{{"text": "b", "label": {number}}}\n')
    with pytest.raises(DataError, match=rf"line 2: .*{number} is beyond a float's range"):
        load_file(path)


def test_a_lone_surrogate_escape_is_refused_before_the_tokenizer_sees_it(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine", "label": 0}\n{"text": "a\\ud800b", "label": 1}\n')
    with pytest.raises(DataError, match=r"row 2: column 'text' holds a lone surrogate"):
        load_file(path)


def test_a_pipe_is_refused_not_waited_on(tmp_path):
    path = tmp_path / "data.csv"
    os.mkfifo(path)  # reading it would wait for a writer that never comes
    with pytest.raises(DataError, match=r"data\.csv is not a regular file"):
        load_file(path)
