"""The command line on hostile input: nothing lost, nothing silently wrong, every bad input one line and exit 2."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as load_safetensors
from transformers import BertTokenizerFast

from advfunc.app.cli import main
from advfunc.app.common import checkpoint
from advfunc.app.common.data import DataError, Labels, encode, load_file
from advfunc.attacks.robustness import pgd_logits
from advfunc.core.params import params_of
from advfunc.hf import atomic
from advfunc.hf.loading import load_classifier
from tests.support.tiny_task import save_tiny_model, sentences, write_csv

QUIET = ["--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    save_tiny_model(root / "model")
    write_csv(root / "train.csv", sentences(48, seed=0))
    write_csv(root / "numbered.csv", [(t, "1" if y == "pos" else "0") for t, y in sentences(16, seed=1)])
    return root


def _train_args(task: Path, output: Path, *extra: str) -> list[str]:
    args = [*QUIET, "train", "--model", str(task / "model"), "--data", str(task / "train.csv")]
    return [*args, "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--output", str(output), *extra]


def _one_line_error(capsys, *named: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advfunc: error: "), err
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(str(directory / "model.safetensors"))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


# ---- point 1: --overwrite never deletes what advfunc did not write -------------------------------------------------


def test_overwrite_refuses_a_directory_that_is_not_an_advfunc_checkpoint(task, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(task / "train.csv", folder / "train.csv")
    (folder / "notes.txt").write_text("keep me")
    assert main(_train_args(task, folder, "--overwrite")) == 2
    _one_line_error(capsys, str(folder), "did not write")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "train.csv"]
    assert (folder / "notes.txt").read_text() == "keep me"


def test_overwrite_keeps_a_file_a_user_added_to_a_checkpoint(task, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_train_args(task, out, "--stop-after", "1")) == 0
    (out / "my_notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main(_train_args(task, out, "--overwrite")) == 2
    _one_line_error(capsys, "my_notes.txt", "did not write")
    assert (out / "my_notes.txt").read_text() == "keep me"
    (out / "my_notes.txt").unlink()
    assert main(_train_args(task, out, "--overwrite")) == 0  # its own files only: replaced


# ---- points 2 and 17: readers fail loudly and name the row -----------------------------------------------------------


def test_tsv_with_bare_quotes_keeps_every_row_and_label(tmp_path):
    # A field that starts with a quote opened a quoted field that ran over the tab and newline.
    rows = ["text\tlabel", '"Quoted start and more\tpos', "the next line\tneg", 'it said "fine"\tpos']
    path = tmp_path / "glue.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = load_file(path)
    assert data.texts == ('"Quoted start and more', "the next line", 'it said "fine"')
    assert data.labels == ("pos", "neg", "pos")


def test_csv_row_that_would_merge_or_shift_is_an_error_naming_its_line(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text('text,label\ngood film,pos\n"unbalanced quote,neg\nbad film,neg\nfine,pos\n', encoding="utf-8")
    with pytest.raises(DataError, match="line"):
        load_file(path)
    extra = tmp_path / "extra.csv"
    extra.write_text("text,label\ngood film,pos\nbad, film,neg\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: 3 fields, the header has 2"):
        load_file(extra)


def test_a_header_naming_a_column_twice_is_an_error(tmp_path):
    path = tmp_path / "twice.csv"
    path.write_text("text,label,text\ngood,pos,bad\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: .*\['text'\] twice"):
        load_file(path)


def test_a_json_list_where_a_text_belongs_is_an_error(tmp_path):
    path = tmp_path / "nested.jsonl"
    path.write_text('{"text": "fine", "label": "pos"}\n{"text": ["a", "b"], "label": "neg"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2: column 'text' holds a JSON list"):
        load_file(path)


def test_unreadable_csv_field_names_its_line(tmp_path):
    path = tmp_path / "stray_quote.csv"
    path.write_text('text,label\ngood,pos\nbad,neg\n"quoted"then more,pos\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 4: unreadable field"):
        load_file(path)


def test_bytes_that_are_not_utf8_name_their_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ngood,pos\nbad,neg\ncaf\u00e9,pos\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"line 4: not UTF-8"):
        load_file(path)


def test_one_class_in_the_first_rows_blames_train_size(task, tmp_path, capsys):
    rows = sorted(sentences(24), key=lambda row: row[1])  # all "neg" first
    write_csv(tmp_path / "sorted.csv", rows)
    args = _train_args(task, tmp_path / "out", "--train-size", "4")
    args[args.index(str(task / "train.csv"))] = str(tmp_path / "sorted.csv")
    assert main(args) == 2
    _one_line_error(capsys, "--train-size 4", "'neg'")


# ---- point 3: a model without a tokenizer ---------------------------------------------------------------------------


def test_model_directory_without_tokenizer_is_refused_for_train_and_evaluate(task, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(task / "model" / name, bare / name)
    args = _train_args(task, tmp_path / "out")
    args[args.index(str(task / "model"))] = str(bare)
    assert main(args) == 2
    _one_line_error(capsys, "no usable tokenizer")
    assert main([*QUIET, "evaluate", "--model", str(bare), "--data", str(task / "numbered.csv")]) == 2
    _one_line_error(capsys, "no usable tokenizer")


def test_a_tokenizer_that_knows_none_of_the_words_is_an_error(tmp_path):
    """A tokenizer of another model passes the load check but turns every word into [UNK]."""
    tokenizer = BertTokenizerFast(
        vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zz"])}
    )
    data = load_file(write_csv(tmp_path / "d.csv", sentences(6)))
    with pytest.raises(DataError, match="unknown token"):
        encode(data, tokenizer, Labels.from_data(data), max_length=16)
    known = BertTokenizerFast(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the"])})
    assert len(encode(data, known, Labels.from_data(data), max_length=16)) == 6  # one known word is enough


# ---- points 7 and 13: exact resume for methods that draw noise, leftovers removed ---------------------------------


# SMART's run stays in the fast loop; the others, each drawing its noise its own way, run in the full suite.
@pytest.mark.parametrize(
    "method",
    [
        *(
            pytest.param(m, marks=pytest.mark.slow)
            for m in ("vat:epsilon=0.5", "freelb:init_mag=0.1,steps=2", "r3f:sigma=0.01")
        ),
        "smart",
    ],
)
def test_resume_is_bitwise_exact_for_methods_that_draw_noise(task, tmp_path, method):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(_train_args(task, whole, "--method", method)) == 0
    assert main(_train_args(task, part, "--method", method, "--stop-after", "5")) == 0
    assert main(_train_args(task, part, "--method", method, "--resume")) == 0
    expected, resumed = _weights(whole), _weights(part)
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), f"{method}: {name} differs after resume"


def test_leftovers_of_a_killed_run_are_removed_and_a_lost_checkpoint_restored(task, tmp_path):
    out = tmp_path / "out"
    assert main(_train_args(task, out, "--stop-after", "3")) == 0
    dead = _dead_pid()
    partial = tmp_path / f".out.partial-{dead}-0123abcd"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 1024)
    stray_file = tmp_path / f".out.tmp-{dead}-89abcdef"
    stray_file.write_text("half")
    foreign = tmp_path / ".out.partial-notes"  # not of our form: never touched
    foreign.write_text("user file")
    # Killed between the two renames of a save: the checkpoint sits aside under .old.
    aside = tmp_path / f".out.old-{dead}-456789ab"
    os.rename(out, aside)
    assert main(_train_args(task, out, "--resume")) == 0
    assert json.loads((out / checkpoint.STATE_FILE).read_text())["finished"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial-notes", "out"]


def test_leftovers_of_a_live_process_are_left_alone(tmp_path):
    live = tmp_path / f".out.partial-{os.getppid()}-0123abcd"
    live.mkdir()
    atomic.recover(tmp_path / "out")
    assert live.exists()


# ---- point 8: absurd radii ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("radius", ["inf", "nan", "-0.1", "0"])
def test_non_finite_or_non_positive_radii_are_refused(task, capsys, radius):
    args = [*QUIET, "evaluate", "--model", str(task / "model"), "--data", str(task / "numbered.csv")]
    assert main([*args, "--radii", "0.1", radius]) == 2
    _one_line_error(capsys, "--radii", radius)


def test_a_radius_that_overflows_is_an_error_not_an_attack_without_effect(task, capsys):
    loaded = load_classifier(task / "model")
    batch = {
        "input_ids": torch.tensor([[2, 5, 6, 3], [2, 13, 3, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "labels": torch.tensor([0, 1]),
    }
    with pytest.raises(FloatingPointError, match="radius 1e\\+30 overflowed"):
        pgd_logits(loaded.model, params_of(loaded.model), batch, 1e30, 3, "embeds")
    _, logits = pgd_logits(loaded.model, params_of(loaded.model), batch, 0.1, 3, "embeds")
    assert bool(torch.isfinite(logits).all())
    args = [*QUIET, "evaluate", "--model", str(task / "model"), "--data", str(task / "numbered.csv")]
    assert main([*args, "--radii", "1e30", "--attack-examples", "4", "--hotflip-budget", "0"]) == 2
    _one_line_error(capsys, "overflowed", "--radii")


# ---- points 9 and 14: compare counts each run once and checks every method first ------------------------------------


@pytest.mark.parametrize(
    "flags",
    [["--seeds", "1", "1"], ["--methods", "fgm", "fgm"], ["--methods", "fgm", "fgm:epsilon=1.0"]],
    ids=["seed twice", "method twice", "method twice with its default spelt out"],
)
def test_compare_refuses_a_run_listed_twice(task, tmp_path, capsys, flags):
    args = [*QUIET, "compare", "--model", str(task / "model"), "--data", str(task / "train.csv")]
    assert main([*args, "--output", str(tmp_path / "report"), *flags]) == 2
    _one_line_error(capsys, flags[0], "twice")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("bad", ["vat:xi=-1", "free_at:replays=0", "smart:beta=1.5"])
def test_compare_checks_every_method_before_the_first_run(task, tmp_path, capsys, bad):
    args = [*QUIET, "compare", "--model", str(task / "model"), "--data", str(task / "train.csv")]
    assert main([*args, "--methods", "none", bad, "--output", str(tmp_path / "report")]) == 2
    line = _one_line_error(capsys)
    assert bad.split(":")[1].split("=")[0] in line
    assert not (tmp_path / "report" / "runs").exists(), "a run was trained before the bad method was seen"


# ---- point 12: outputs checked before the work ----------------------------------------------------------------------


def test_unwritable_train_output_is_refused_before_training(task, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    cases = {
        tmp_path / "a_file" / "out": "is a file",
        tmp_path / "a_file": "is a file",
        Path("/proc/advfunc-cannot-write/out"): "cannot be written",
    }
    for output, message in cases.items():
        assert main(_train_args(task, output)) == 2
        _one_line_error(capsys, str(output), message)
    monkeypatch.chdir(tmp_path)
    assert main(_train_args(task, Path("."))) == 2
    _one_line_error(capsys, "current directory")


def test_unwritable_evaluate_and_compare_outputs_are_refused_before_the_work(task, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    evaluate = [*QUIET, "evaluate", "--model", str(task / "model"), "--data", str(task / "numbered.csv")]
    for output in (tmp_path, tmp_path / "a_file" / "result.json"):
        assert main([*evaluate, "--output", str(output)]) == 2
        _one_line_error(capsys, "--output", str(output))
    compare = [*QUIET, "compare", "--model", str(task / "model"), "--data", str(task / "train.csv")]
    assert main([*compare, "--output", str(tmp_path / "a_file")]) == 2
    _one_line_error(capsys, "--output", "is a file")


# ---- point 15: every numeric flag and method value -----------------------------------------------------------------

BAD_FLAGS = [
    ["--lr", "-1e-5"],
    ["--lr", "nan"],
    ["--lr", "0"],
    ["--warmup-ratio", "1"],
    ["--warmup-ratio", "-0.1"],
    ["--weight-decay", "-0.01"],
    ["--max-grad-norm", "nan"],
    ["--epochs", "0"],
    ["--batch-size", "-3"],
    ["--grad-accum", "0"],
    ["--train-size", "0"],
    ["--max-length", "1"],
    ["--save-steps", "-1"],
    ["--stop-after", "0"],
    ["--seed", "-1"],
    ["--epochs", "2.5"],
    ["--method", "pgd:epsilon=nan"],
    ["--method", "pgd:epsilon=-1e-5"],
    ["--method", "pgd:steps=0"],
    ["--method", "freelb:init_mag=-1"],
    ["--method", "free_at:replays=0"],
    ["--method", "smart:beta=1.5"],
    ["--method", "smart:beta=nan"],
]


@pytest.mark.parametrize("flags", BAD_FLAGS, ids=[" ".join(f) for f in BAD_FLAGS])
def test_every_bad_number_is_one_line_naming_it(task, tmp_path, capsys, flags):
    assert main(_train_args(task, tmp_path / "out", *flags)) == 2
    line = _one_line_error(capsys)
    named = flags[1].split(":")[1].split("=")[0] if flags[0] == "--method" else flags[0]
    assert named in line, line
    assert not (tmp_path / "out").exists()


def test_max_length_beyond_the_models_positions_is_refused(task, tmp_path, capsys):
    assert main(_train_args(task, tmp_path / "out", "--max-length", "65")) == 2  # the tiny BERT has 64
    _one_line_error(capsys, "--max-length 65", "64 positions")


def test_threads_and_attack_flags_are_range_checked(task, capsys):
    evaluate = [*QUIET, "evaluate", "--model", str(task / "model")]
    for flags in (["--pgd-steps", "0"], ["--hotflip-budget", "-1"], ["--neighbours", "0"], ["--test-size", "-2"]):
        assert main([*evaluate, *flags]) == 2
        _one_line_error(capsys, flags[0])
    assert main(["--threads", "0", "methods"]) == 2
    _one_line_error(capsys, "--threads")


# ---- the crash test: SIGKILL at random moments, then --resume ---------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bitwise_exact_and_leaves_nothing_behind(task, tmp_path):
    """Three SIGKILLs, each a random 0–0.25 s after a random one of the first checkpoints of a process.

    Training steps and checkpoint writes each take tens of milliseconds here, so the kills
    land inside steps, inside the writing of a checkpoint and between its two renames.
    FreeLB with ``init_mag`` draws noise every step: a resume that re-seeded its generator
    would differ from the uninterrupted run.
    """
    method = ["--method", "freelb:init_mag=0.1,steps=2", "--save-steps", "1"]
    whole, out = tmp_path / "whole", tmp_path / "crashed"
    assert main(_train_args(task, whole, *method)) == 0
    command = [sys.executable, "-m", "advfunc", *_train_args(task, out, *method)]
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    rng = random.Random(1234)
    kills = 0
    for _ in range(3):
        resume = ["--resume"] if out.exists() or any(tmp_path.glob(".crashed.old-*")) else []
        process = subprocess.Popen([*command, *resume], stderr=subprocess.PIPE, text=True, env=environment)
        assert process.stderr is not None
        wanted, seen = rng.randint(1, 3), 0
        for line in process.stderr:
            seen += "checkpoint at step" in line
            if seen == wanted:
                time.sleep(rng.uniform(0.0, 0.25))
                process.send_signal(signal.SIGKILL)
                kills += 1
                break
        process.wait(timeout=120)
        process.stderr.close()
    assert kills >= 2, "the runs finished before they could be killed; the test no longer tests a crash"
    resume = ["--resume"] if out.exists() or any(tmp_path.glob(".crashed.old-*")) else []
    assert main([*_train_args(task, out, *method), *resume]) == 0
    assert json.loads((out / checkpoint.STATE_FILE).read_text())["finished"]
    expected, resumed = _weights(whole), _weights(out)
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), f"{name} differs after {kills} kills and resumes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crashed", "whole"], "a temporary directory was left"
