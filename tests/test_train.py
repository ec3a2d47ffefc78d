"""train.py end to end on a tiny config: loss falls, --resume is exact, 2 DDP processes equal 1."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, shared_midi_dir
from midistral.checkpoint import load_model_and_tokenizer, resolve_checkpoint


def train_cmd(out, *extra, data=None, nproc=1, resume=False):
    args = ["--config", str(ROOT / "configs" / "tiny.toml"), f"out_dir={json.dumps(str(out))}",
            f"data.dir={json.dumps(str(shared_midi_dir('dev')))}"]
    if data:
        args.append(f"data.prepared_dir={json.dumps(str(data))}")
    args += list(extra) + (["--resume"] if resume else [])
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(ROOT / "train.py"), *args]
    return cmd


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run_train(out, *extra, **kw):
    r = subprocess.run(train_cmd(out, *extra, **kw), capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r for r in rows if "val_loss" in r]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_train(out, "train.max_steps=30", "train.eval_every=10", "train.lr=1e-2")
    return out


@pytest.mark.slow
def test_loss_falls_and_checkpoints_load(first_run):
    train, val = losses(first_run)
    assert len(train) == 30 and [v["step"] for v in val] == [10, 20, 30]
    first, last = sum(train[s] for s in (1, 2, 3)) / 3, sum(train[s] for s in (28, 29, 30)) / 3
    assert last < first - 0.5
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    for sub in ("last", "best"):
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (first_run / sub).iterdir()}
    assert resolve_checkpoint(first_run) == first_run / "best"
    best = min(val, key=lambda v: v["val_loss"])  # best/ is the best of every evaluation, not only epoch ends
    assert json.loads((first_run / "best" / "best.json").read_text()) == {"step": best["step"], "val_loss": best["val_loss"]}
    model, tok = load_model_and_tokenizer(first_run)
    assert model.config.vocab_size == len(tok)
    assert (first_run / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_resume_equals_uninterrupted(first_run, tmp_path):
    data = first_run / "data"
    run_train(tmp_path / "a", "train.max_steps=10", "train.eval_every=5", data=data)
    run_train(tmp_path / "a", "train.max_steps=20", "train.eval_every=5", data=data, resume=True)
    run_train(tmp_path / "b", "train.max_steps=20", "train.eval_every=5", data=data)
    a, va = losses(tmp_path / "a")
    b, vb = losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in b)
    assert [round(v["val_loss"], 6) for v in va] == [round(v["val_loss"], 6) for v in vb]


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume(first_run, tmp_path):
    """A run killed (SIGKILL) some steps after its first epoch checkpoint, then --resume'd: every step is
    logged once, and the losses equal those of a run that was never stopped."""
    data, killed = first_run / "data", tmp_path / "killed"
    # epochs of ~29 steps (batch 64), a schedule over 40 of them and no step limit: the run is killed long before
    long = ("train.batch_size=64", "train.epochs=40", "train.eval_every=0", "train.max_steps=0")
    proc = subprocess.Popen(train_cmd(killed, *long, data=data), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (killed / "last" / "state.pt").is_file():  # the folder is swapped in whole
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        n_rows = len((killed / "metrics.jsonl").read_text().splitlines())
        while len((killed / "metrics.jsonl").read_text().splitlines()) < n_rows + 3:  # steps past the checkpoint
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    import torch

    from train import resume_dir

    saved = torch.load(resume_dir(killed) / "state.pt", weights_only=True)["step"]
    logged = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]  # the kill may cut a line
    assert max(json.loads(line)["step"] for line in logged) > saved  # rows logged after the checkpoint
    stop = saved + 6
    r = run_train(killed, *long, f"train.max_steps={stop}", data=data, resume=True)
    assert f"resumed {killed} at step {saved}" in r.stdout and "dropped" in r.stdout
    run_train(tmp_path / "straight", *long, f"train.max_steps={stop}", data=data)
    a, b = losses(killed)[0], losses(tmp_path / "straight")[0]
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, stop + 1))  # each step once
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in b)


@pytest.mark.slow
def test_early_stopping_after_patience_epochs(first_run, tmp_path):
    """lr 0: the validation loss never improves after epoch 1, so patience 2 stops the run at the end of epoch 3."""
    out = tmp_path / "flat"
    r = run_train(out, "train.batch_size=64", "train.epochs=40", "train.max_steps=0", "train.eval_every=0",
                  "train.lr=0", "train.patience=2", data=first_run / "data")
    per_epoch = int(r.stdout.split(" steps/epoch")[0].rsplit(" ", 1)[-1])
    train, val = losses(out)
    assert f"early stop at step {3 * per_epoch}" in r.stdout and max(train) == 3 * per_epoch
    assert [v["step"] for v in val] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert json.loads((out / "best" / "best.json").read_text())["step"] == per_epoch


@pytest.mark.slow
def test_two_gloo_processes_equal_one(first_run, tmp_path):
    data = first_run / "data"
    run_train(tmp_path / "one", "train.max_steps=5", "train.batch_size=4", data=data)
    run_train(tmp_path / "two", "train.max_steps=5", "train.batch_size=4", data=data, nproc=2)
    one, _ = losses(tmp_path / "one")
    two, _ = losses(tmp_path / "two")
    assert sorted(one) == sorted(two)
    assert all(abs(one[s] - two[s]) <= 1e-5 for s in one)


def test_resume_without_checkpoint_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.toml"),
                        f"out_dir={json.dumps(str(tmp_path))}", f"data.dir={json.dumps(str(shared_midi_dir('dev')))}",
                        "--resume"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "nothing to resume" in r.stderr and r.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_killed_anywhere_then_run_again_ends_with_the_same_weights(tmp_path):
    """bench/killtest.py with 2 trials: kill -9 at random moments of prepare + train, then resume (or start
    again): the final weights equal an uninterrupted run's bit for bit. The benchmark runs 20 trials."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "killtest.py"), "--trials", "2", "--seed", "1",
                        "--dir", str(shared_midi_dir("dev")), "--work", str(tmp_path), "--json"],
                       capture_output=True, text=True, cwd=ROOT, env=dict(ENV, PYTHONPATH=str(ROOT)), timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["same"] == summary["trials"] == 2
