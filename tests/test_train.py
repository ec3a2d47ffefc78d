"""train.py end to end on a tiny config: loss falls, --resume is exact (after a kill, a signal, mid-epoch), 2 DDP
processes equal 1, a folder holding a run is refused unless --resume or --overwrite."""

import json
import os
import shutil
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

    from midistral.runs import resume_dir

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


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_trained_weights(first_run, tmp_path):
    """train.init_from: a new run whose weights start as the checkpoint's (lr 0 keeps them, so its best/ equals
    the source); a checkpoint with another tokenizer is a one-line error naming it."""
    from safetensors.torch import load_file

    src = first_run / "best"
    run_train(tmp_path / "warm", "train.max_steps=2", "train.eval_every=1", "train.lr=0",
              f"train.init_from={json.dumps(str(src))}", data=first_run / "data")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "warm" / "best" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    other = shutil.copytree(src, tmp_path / "other_tokens")
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["config"]["num_velocities"] += 1
    (other / "tokenizer.json").write_text(json.dumps(tok))
    r = subprocess.run(train_cmd(tmp_path / "other", "train.max_steps=1",
                                 f"train.init_from={json.dumps(str(other))}", data=first_run / "data"),
                       capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert r.returncode == 1 and "tokenizer differs" in r.stderr and str(other) in r.stderr
    assert r.stderr.strip().count("\n") == 0


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


# ----------------------------------------------------------------------------------------------------
# A folder that holds a run, interrupts, time-based checkpoints (midistral/runs.py)


def fake_run(out):
    """A run folder holding best/ and last/ (a tiny random model), as a finished run leaves it."""
    import torch

    from midistral.checkpoint import save_checkpoint
    from midistral.model import ModelConfig, Transformer
    from midistral.tokenize import REMI

    model = Transformer(ModelConfig(vocab_size=len(REMI()), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, sliding_window=8,
                                    max_position_embeddings=64))
    best = '{"step": 7, "val_loss": 2.5}'
    save_checkpoint(out / "best", model, REMI(), extra=lambda d: (d / "best.json").write_text(best))
    save_checkpoint(out / "last", model, REMI(), extra=lambda d: torch.save({"step": 9}, d / "state.pt"))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0, "lr": 0.001}\n')
    return (out / "best" / "model.safetensors").read_bytes()


def test_a_folder_holding_a_run_is_refused_then_overwritten_by_name(tmp_path):
    before = fake_run(tmp_path)
    r = subprocess.run(train_cmd(tmp_path), capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "holds a run (best/ (step 7, val loss 2.5000), last/ (step 9))" in r.stderr and "--resume" in r.stderr
    assert "--overwrite" in r.stderr and (tmp_path / "best" / "model.safetensors").read_bytes() == before
    r = subprocess.run(train_cmd(tmp_path, "--overwrite", "--resume"), capture_output=True, text=True, cwd=ROOT,
                       env=ENV)
    assert r.returncode == 1 and "not allowed with" in r.stderr
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == before


def test_overwrite_names_what_it_removes(tmp_path):
    from midistral.runs import claim_run

    fake_run(tmp_path)
    (tmp_path / "data").mkdir()
    assert claim_run(tmp_path, resume=False, overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the prepared data stays
    assert claim_run(tmp_path, resume=False, overwrite=False) is None  # nothing left to protect


def test_guard_checkpoints_on_its_clock_and_at_a_signal():
    from midistral.runs import Guard, Interrupted

    now, saves = [0.0], []
    with Guard(ROOT / "r", 0.5, master=True, ddp=False, resume_hint="python train.py --resume",
               clock=lambda: now[0]) as guard:
        for step in range(1, 8):
            now[0] += 10.0  # 10 s a step: a checkpoint every 30 s
            guard.after_step(step, lambda: saves.append(step))
        assert saves == [3, 6]
        guard.saved(7)  # the loop saved at an epoch end: the clock starts again
        now[0] += 25.0
        guard.after_step(8, lambda: saves.append(8))
        assert saves == [3, 6]
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(Interrupted) as e:
            guard.after_step(9, lambda: saves.append(9))
    assert saves == [3, 6, 9] and e.value.exit_code == 130
    assert str(e.value) == f"SIGINT at step 9: saved {ROOT / 'r' / 'last'}; continue with: python train.py --resume"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored


def test_a_second_signal_exits_at_once():
    code = ("import os, signal, time\nfrom pathlib import Path\nfrom midistral.runs import Guard\n"
            "with Guard(Path('r'), 0, True, False, 'hint'):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(0.2)\n    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(60)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=60)
    assert r.returncode == 130 and r.stderr.strip() == "SIGINT again: stopped at once without saving"


def interrupted(out, sig, at_row, *extra, data):
    """train.py sent `sig` once metrics.jsonl has `at_row` rows: (exit code, stderr)."""
    proc = subprocess.Popen(train_cmd(out, *extra, data=data), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < at_row:
        assert proc.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.slow
def test_a_signal_mid_epoch_then_resume_gives_the_same_weights(first_run, tmp_path):
    """SIGINT and SIGTERM mid-epoch (no checkpoint due): last/ is written at that step, one line says how to
    resume, and --resume ends with the weights of a run never stopped, bit for bit. kill -9 with
    train.checkpoint_minutes tiny: last/ was written mid-epoch by the clock."""
    data = first_run / "data"
    long = ("train.batch_size=16", "train.epochs=3", "train.max_steps=60", "train.eval_every=25")
    run_train(tmp_path / "straight", *long, data=data)
    want = {f: (tmp_path / "straight" / f / "model.safetensors").read_bytes() for f in ("best", "last")}
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        out = tmp_path / sig.name
        # 31 rows: steps 1-30 and the evaluation at 25 (at 30 rows the signal may land right after step 29)
        rc, err = interrupted(out, sig, 31, *long, "train.checkpoint_minutes=0", data=data)
        line = err.strip().splitlines()[-1]
        assert rc == code and "Traceback" not in err, err[-2000:]
        assert line.startswith(f"{sig.name} at step ") and line.endswith("--resume") and str(out) in line, line
        step = int(line.split(" at step ")[1].split(":")[0])
        assert 30 <= step < 60 and json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step
        run_train(out, *long, data=data, resume=True)
        assert {f: (out / f / "model.safetensors").read_bytes() for f in ("best", "last")} == want
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(out, *long, "train.checkpoint_minutes=0.0001", data=data), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "last" / "state.pt").is_file():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from midistral.runs import read_train_state, resume_dir

    assert 0 < read_train_state(resume_dir(out) / "state.pt")["step"] < 60  # mid-epoch: the clock's checkpoint
    run_train(out, *long, data=data, resume=True)
    assert (out / "last" / "model.safetensors").read_bytes() == want["last"]


@pytest.mark.slow
def test_a_finished_run_is_refused_under_torchrun_too(first_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    before = (out / "best" / "model.safetensors").read_bytes()
    r = subprocess.run(train_cmd(out, data=first_run / "data", nproc=2), capture_output=True, text=True, cwd=ROOT,
                       env=ENV, timeout=600)
    assert r.returncode != 0 and r.stderr.count("holds a run") == 1  # rank 0's line (torchrun adds its own summary)
    assert (out / "best" / "model.safetensors").read_bytes() == before
