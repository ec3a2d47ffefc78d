"""User mistakes on the command-line tools: each ends with exit code 1 and one `error: ...` line, no traceback.

train.py, python -m midistral.data, python -m midistral.tokenize and sample.py are called in this process
(their `main(argv)`, stderr captured): an exception other than the project's errors would fail the test
with its traceback. A few cases run as real subprocesses too, to check the whole path from the shell.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from midistral import sample
from midistral import train
from conftest import ROOT, shared_midi_dir
from midistral.data.__main__ import main as data_main
from midistral.io import RunLock
from midistral.tokenize.__main__ import main as tokenize_main

TINY = str(ROOT / "configs" / "tiny.toml")
MAINS = {"train": train.main, "data": data_main, "tokenize": tokenize_main, "sample": sample.main}


def q(path) -> str:
    return json.dumps(str(path))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained tiny run (10 steps) with its data prepared beside it, and files of every wrong kind."""
    w = tmp_path_factory.mktemp("world")
    dev = shared_midi_dir("dev")
    base = [TINY, f"data.dir={q(dev)}", f"data.prepared_dir={q(w / 'data')}", "train.max_steps=10"]
    assert train.main(["--config", base[0], f"out_dir={q(w / 'run')}", *base[1:]]) == 0
    (w / "empty.toml").write_text("")
    (w / "garbage.toml").write_text("[train\nlr = = 3\n")
    (w / "binary.toml").write_bytes(bytes(range(256)))
    (w / "empty.mid").write_bytes(b"")
    (w / "text.mid").write_text("not a midi file\n")
    (w / "cut.mid").write_bytes(sorted(dev.glob("*.mid"))[0].read_bytes()[:40])
    (w / "bad.json").write_text("{ not json")
    (w / "other.json").write_text(json.dumps({"tokenizer": "someone.else", "version": 9}))
    (w / "nomidi").mkdir()
    (w / "nomidi" / "readme.txt").write_text("no MIDI here")
    (w / "broken_only").mkdir()
    for f in shared_midi_dir("broken").glob("*.mid"):
        shutil.copy(f, w / "broken_only" / f.name)
    (w / "a_file").write_text("x")
    return w


def damaged_run(world, tmp_path, what: str):
    """A copy of the trained run with one file of last/ damaged (its data folder is shared, not copied)."""
    run = tmp_path / "run"
    shutil.copytree(world / "run", run, ignore=shutil.ignore_patterns(".lock"))
    last = run / "last"
    if what == "state_truncated":
        data = (last / "state.pt").read_bytes()
        (last / "state.pt").write_bytes(data[: len(data) // 2])
    elif what == "state_pickle":
        torch.save({"step": 1, "evil": Payload(tmp_path / "pwned")}, last / "state.pt")
    elif what == "state_garbage":
        (last / "state.pt").write_bytes(os.urandom(5000))
    elif what == "weights":
        (last / "model.safetensors").write_bytes(b"\x00" * 100)
    elif what == "tokenizer":
        (last / "tokenizer.json").write_text('{"tokenizer": "midistral.REMI", "version": 1, "config": {"pitch_range": "ab"}}')
    elif what == "metrics":
        (run / "metrics.jsonl").write_text("garbage line\n" + (run / "metrics.jsonl").read_text())
    return run


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def resume_args(world, run, *extra):
    return ["--config", TINY, f"out_dir={q(run)}", "--resume", f"data.dir={q(shared_midi_dir('dev'))}",
            f"data.prepared_dir={q(world / 'data')}", *extra]


def train_args(world, out, *extra):
    return ["--config", TINY, f"out_dir={q(out)}", f"data.dir={q(shared_midi_dir('dev'))}", *extra]


# (id, tool, argv builder (world, tmp_path) -> argv, a piece of the expected message)
CASES = [
    ("train-no-config-option", "train", lambda w, t: ["train.lr=1"], "--config"),
    ("train-unknown-option", "train", lambda w, t: ["--config", TINY, "--bogus"], "--bogus"),
    ("train-config-missing", "train", lambda w, t: ["--config", str(t / "nope.toml")], "no such config file"),
    ("train-config-is-folder", "train", lambda w, t: ["--config", str(w)], "is a folder"),
    ("train-config-empty", "train", lambda w, t: ["--config", str(w / "empty.toml"), f"out_dir={q(t / 'r')}"], "data.dir is empty"),
    ("train-config-garbage", "train", lambda w, t: ["--config", str(w / "garbage.toml")], "not valid TOML"),
    ("train-config-binary", "train", lambda w, t: ["--config", str(w / "binary.toml")], "binary.toml"),
    ("train-lr-word", "train", lambda w, t: train_args(w, t / "r", "train.lr=abc"), "train.lr='abc'"),
    ("train-epochs-negative", "train", lambda w, t: train_args(w, t / "r", "train.epochs=-1"), "train.epochs=-1"),
    ("train-batch-zero", "train", lambda w, t: train_args(w, t / "r", "train.batch_size=0"), "train.batch_size=0"),
    ("train-warmup-ratio", "train", lambda w, t: train_args(w, t / "r", "train.warmup_ratio=1.5"), "train.warmup_ratio"),
    ("train-split-two", "train", lambda w, t: train_args(w, t / "r", "data.split=[0.5,0.5]"), "data.split"),
    ("train-device", "train", lambda w, t: train_args(w, t / "r", "train.device=gpu"), "train.device='gpu'"),
    ("train-device-absent", "train", lambda w, t: train_args(w, t / "r", f"data.prepared_dir={q(w / 'data')}",
                                                             "train.device=cuda:99"), "train.device='cuda:99'"),
    ("train-bool-word", "train", lambda w, t: train_args(w, t / "r", "train.restart=yes"), "train.restart='yes'"),
    ("train-unknown-key", "train", lambda w, t: train_args(w, t / "r", "train.lrr=1"), "unknown config key 'train.lrr'"),
    ("train-override-no-equals", "train", lambda w, t: train_args(w, t / "r", "train.lr"), "expected section.key=value"),
    ("train-min-over-max-seq", "train", lambda w, t: train_args(w, t / "r", "data.min_seq=999"), "data.min_seq=999"),
    ("train-heads", "train", lambda w, t: train_args(w, t / "r", "model.hidden_size=30"), "not divisible"),
    ("train-context-short", "train", lambda w, t: train_args(w, t / "r", f"data.prepared_dir={q(w / 'data')}",
                                                             "model.max_position_embeddings=64"), "max_position_embeddings=64"),
    ("train-data-dir-missing", "train", lambda w, t: train_args(w, t / "r", f"data.dir={q(t / 'nowhere')}"), "no such folder"),
    ("train-data-dir-no-midi", "train", lambda w, t: train_args(w, t / "r", f"data.dir={q(w / 'nomidi')}"), "no .mid/.midi files"),
    ("train-data-all-broken", "train", lambda w, t: train_args(w, t / "r", f"data.dir={q(w / 'broken_only')}"), "no usable training piece"),
    ("train-val-split-empty", "train", lambda w, t: train_args(w, t / "r", "data.split=[1,0,0]"), "val split has no usable piece"),
    ("train-out-dir-under-file", "train", lambda w, t: train_args(w, w / "a_file" / "run"), "a_file"),
    ("train-resume-nothing", "train", lambda w, t: resume_args(w, t / "fresh"), "nothing to resume"),
    ("train-resume-finished", "train", lambda w, t: resume_args(w, damaged_run(w, t, "none"), "train.max_steps=10"), "nothing to train"),
    ("train-resume-other-data", "train", lambda w, t: resume_args(w, damaged_run(w, t, "none"), "data.max_files=6",
                                                                   "train.max_steps=20"), "another [data] config"),
    ("train-state-truncated", "train", lambda w, t: resume_args(w, damaged_run(w, t, "state_truncated"), "train.max_steps=20"), "state.pt"),
    ("train-state-pickle", "train", lambda w, t: resume_args(w, damaged_run(w, t, "state_pickle"), "train.max_steps=20"), "refused"),
    ("train-state-garbage", "train", lambda w, t: resume_args(w, damaged_run(w, t, "state_garbage"), "train.max_steps=20"), "state.pt"),
    ("train-weights-corrupt", "train", lambda w, t: resume_args(w, damaged_run(w, t, "weights"), "train.max_steps=20"), "model.safetensors"),
    ("train-tokenizer-corrupt", "train", lambda w, t: resume_args(w, damaged_run(w, t, "tokenizer"), "train.max_steps=20"), "tokenizer.json"),
    ("train-metrics-corrupt", "train", lambda w, t: resume_args(w, damaged_run(w, t, "metrics"), "train.max_steps=20"), "metrics.jsonl"),
    ("data-no-command", "data", lambda w, t: ["--config", TINY], "command"),
    ("data-bad-command", "data", lambda w, t: ["prep", "--config", TINY], "prep"),
    ("data-config-missing", "data", lambda w, t: ["prepare", "--config", str(t / "nope.toml")], "no such config file"),
    ("data-dir-missing", "data", lambda w, t: ["prepare", "--config", TINY, f"data.dir={q(t / 'x')}", f"out_dir={q(t)}"], "no such folder"),
    ("data-source", "data", lambda w, t: ["prepare", "--config", TINY, "data.source=web"], "data.source='web'"),
    ("data-bpe-too-small", "data", lambda w, t: ["prepare", "--config", TINY, f"data.dir={q(shared_midi_dir('dev'))}",
                                                 f"out_dir={q(t)}", "data.bpe_vocab_size=10"], "vocab_size=10"),
    ("data-max-seq", "data", lambda w, t: ["prepare", "--config", TINY, "data.max_seq=1"], "data.max_seq=1"),
    ("data-transpose", "data", lambda w, t: ["stats", "--config", TINY, "data.transpose=[5]"], "data.transpose"),
    ("data-prepared-dir-under-file", "data", lambda w, t: ["prepare", "--config", TINY, f"data.dir={q(shared_midi_dir('dev'))}",
                                                           f"data.prepared_dir={q(w / 'a_file' / 'd')}"], "a_file"),
    ("tokenize-missing", "tokenize", lambda w, t: [str(t / "nope.mid")], "no such file"),
    ("tokenize-empty", "tokenize", lambda w, t: [str(w / "empty.mid")], "empty file"),
    ("tokenize-text", "tokenize", lambda w, t: [str(w / "text.mid")], "not a MIDI file"),
    ("tokenize-truncated", "tokenize", lambda w, t: [str(w / "cut.mid")], "cut.mid"),
    ("tokenize-folder", "tokenize", lambda w, t: [str(w)], "is a folder"),
    ("tokenize-tokenizer-missing", "tokenize", lambda w, t: ["--tokenizer", str(t / "no.json"), str(w / "cut.mid")], "no such tokenizer file"),
    ("tokenize-tokenizer-corrupt", "tokenize", lambda w, t: ["--tokenizer", str(w / "bad.json"), str(w / "cut.mid")], "bad.json"),
    ("tokenize-tokenizer-other", "tokenize", lambda w, t: ["--tokenizer", str(w / "other.json"), str(w / "cut.mid")], "someone.else"),
    ("sample-prompt-missing", "sample", lambda w, t: [str(t / "nope.mid"), "--ckpt", str(w / "run")], "no such prompt file"),
    ("sample-prompt-not-midi", "sample", lambda w, t: [str(w / "text.mid"), "--ckpt", str(w / "run")], "text.mid"),
    ("sample-ckpt-missing", "sample", lambda w, t: ["--ckpt", str(t / "none")], "no such checkpoint"),
    ("sample-ckpt-file", "sample", lambda w, t: ["--ckpt", str(w / "a_file")], "is a file"),
    ("sample-ckpt-not-a-run", "sample", lambda w, t: ["--ckpt", str(w / "nomidi")], "not a checkpoint"),
    ("sample-ckpt-weights-corrupt", "sample", lambda w, t: ["--ckpt", str(damaged_run(w, t, "weights") / "last")], "model.safetensors"),
    ("sample-style-unknown", "sample", lambda w, t: ["--style", "jazz"], "style 'jazz'"),  # the shipped model
    ("sample-num-samples-0", "sample", lambda w, t: ["--ckpt", str(w / "run"), "--num-samples", "0"], "--num-samples"),
    ("sample-temperature-word", "sample", lambda w, t: ["--ckpt", str(w / "run"), "--temperature", "abc"], "abc"),
    ("sample-top-p-2", "sample", lambda w, t: ["--ckpt", str(w / "run"), "--top-p", "2"], "--top-p"),
    ("sample-seed-negative", "sample", lambda w, t: ["--ckpt", str(w / "run"), "--seed", "-1"], "--seed"),
    ("sample-out-under-a-file", "sample", lambda w, t: ["--ckpt", str(w / "run"), "--out", str(w / "a_file" / "x")], "--out"),
    ("sample-device-cuda", "sample", lambda w, t: ["--ckpt", str(w / "run"), "--device", "cuda:99"], "cuda:99"),
    ("sample-precision-unknown", "sample", lambda w, t: ["--ckpt", str(w / "run"), "--precision", "fp8"], "fp8"),
    ("sample-programs-unknown", "sample", lambda w, t: ["--ckpt", str(w / "run"), "--programs", "banjoo"], "banjoo"),
    ("sample-add-track-no-prompt", "sample", lambda w, t: ["--ckpt", str(w / "run"), "--add-track", "bass"], "prompt"),
]


def run_main(tool: str, argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = MAINS[tool](argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_error_line(code, err: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 1, (code, err[-1500:])
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err[-1500:]
    assert expected in errors[0], errors[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_user_mistake_is_one_line(case, world, tmp_path, capsys):
    _, tool, argv, expected = case
    argv = argv(world, tmp_path)
    capsys.readouterr()
    code, err = run_main(tool, argv, capsys)
    assert_one_error_line(code, err, expected)
    assert not (tmp_path / "pwned").exists()


def test_locked_run_is_refused_and_a_stale_lock_taken_over(world, tmp_path, capsys):
    run = damaged_run(world, tmp_path, "none")
    args = resume_args(world, run, "train.max_steps=12")
    with RunLock(run):  # a training still running in this folder
        code, err = run_main("train", args, capsys)
    assert_one_error_line(code, err, "locked by a training still running")
    (run / ".lock").write_text("pid 999999999 on a-host-that-died\n")  # left by a killed run: no flock held
    code, err = run_main("train", args, capsys)
    assert code == 0, err[-1500:]


def test_overrides_anywhere_on_the_line(world, tmp_path, capsys):
    """The README's `... --resume train.max_steps=N` form: overrides after an option."""
    run = damaged_run(world, tmp_path, "none")
    code, err = run_main("train", resume_args(world, run, "train.max_steps=11", "train.eval_every=0"), capsys)
    assert code == 0, err[-1500:]
    code, err = run_main("data", ["--config", TINY, "prepare", f"data.dir={q(shared_midi_dir('dev'))}",
                                  f"data.prepared_dir={q(world / 'data')}"], capsys)
    assert code == 0, err[-1500:]


@pytest.mark.parametrize("argv, expected", [
    ([str(ROOT / "train.py"), "--config", TINY, "train.lr=abc"], "train.lr='abc'"),
    (["-m", "midistral.data", "prepare", "--config", TINY, "data.dir=/nonexistent/x"], "no such folder"),
    (["-m", "midistral.tokenize", "/nonexistent/x.mid"], "no such file"),
    ([str(ROOT / "sample.py"), "/nonexistent/x.mid", "--ckpt", "/nonexistent"], "no such prompt file"),
], ids=["train", "data", "tokenize", "sample"])
def test_from_the_shell(argv, expected, tmp_path):
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert_one_error_line(r.returncode, r.stderr, expected)
