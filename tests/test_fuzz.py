"""Fuzzing, seeded and bounded: byte-mutated real MIDI files through encode and decode, random id sequences
through decode (with and without BPE), random and adversarial run configs through the config loader, and a
pickle payload in state.pt. The only exception allowed is the project's one-line MidistralError."""

import dataclasses
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from conftest import ROOT
from fuzzing import mutate
from midistral.runs import read_train_state
from midistral.config import SECTIONS, RunConfig, default_values, load_config
from midistral.data.prepare import made_with
from midistral.errors import CheckpointError, ConfigError, MidistralError
from midistral.tokenize import REMI


def one_line(e: Exception) -> bool:
    return isinstance(e, MidistralError) and "\n" not in str(e) and len(str(e)) < 400


@pytest.fixture(scope="module")
def sources(dev_midi_files):
    """The real files small enough to mutate by the thousand (the large ones only slow the loop down)."""
    small = [f.read_bytes() for f in dev_midi_files if f.stat().st_size < 40_000]
    assert len(small) >= 20
    return small


@pytest.fixture(scope="module")
def tokenizers(dev_midi_files):
    plain = REMI()
    with_bpe = REMI()
    with_bpe.train_bpe([f for f in dev_midi_files if f.stat().st_size < 40_000][:8], 700, workers=1)
    return {"base": plain, "bpe": with_bpe}


def fuzz_files(tok, sources, n: int, seed: int) -> tuple[int, list[str]]:
    """Encode then decode n mutated files: (how many were refused, the failures that were not one-line errors)."""
    refused, failures = 0, []
    for i in range(n):
        data = mutate(sources[i % len(sources)], seed * 1_000_003 + i)
        try:
            ids = tok.encode(data)
        except Exception as e:  # noqa: BLE001 - anything but a one-line error is a failure
            if one_line(e):
                refused += 1
            else:
                failures.append(f"case {i} (seed {seed}): {e.__class__.__name__}: {e}")
            continue
        try:
            score = tok.decode(ids)
            score.dumps_midi()
        except Exception as e:  # noqa: BLE001
            failures.append(f"case {i} (seed {seed}) decode: {e.__class__.__name__}: {e}")
    return refused, failures


@pytest.mark.parametrize("n, seed", [(150, 1), pytest.param(1000, 2, marks=pytest.mark.slow)])
def test_mutated_midi_files_encode_or_refuse(sources, tokenizers, n, seed):
    refused, failures = fuzz_files(tokenizers["base"], sources, n, seed)
    assert not failures, failures[:5]
    assert 0 < refused < n  # the mutations both break files and leave some readable


def test_mutated_midi_files_with_bpe(sources, tokenizers):
    _, failures = fuzz_files(tokenizers["bpe"], sources, 100, 3)
    assert not failures, failures[:5]


@pytest.mark.parametrize("kind", ["base", "bpe"])
def test_random_ids_decode(tokenizers, kind):
    """3,000 random sequences: uniform ids (out of range included), runs of one family, token strings."""
    tok = tokenizers[kind]
    rng = np.random.default_rng(4)
    n_ids = len(tok)
    names = list(tok.vocab)
    for i in range(3000):
        length = int(rng.integers(0, 400))
        mode = i % 3
        if mode == 0:
            seq = rng.integers(-5, n_ids + 20, length)
        elif mode == 1:  # in-vocabulary ids in long runs: many Bar / Position / Pitch in a row
            seq = np.repeat(rng.integers(0, n_ids, max(1, length // 8)), 8)[:length]
        else:
            seq = [names[j] for j in rng.integers(0, len(names), length)] + ["Nonsense_1"] * (i % 2)
        score, skipped = tok.decode_with_report(seq)
        assert skipped >= 0 and (kind == "bpe" or skipped <= len(seq))  # BPE ids count their base tokens
        score.dumps_midi()


def random_value(r: random.Random, depth: int = 0):
    pool = [0, 1, -1, 2**63, -(2**63), 1e308, -1e-308, float("nan"), float("inf"), 0.5, 3.7, "", "abc", "~/x",
            "cpu", "cuda:99", "chorales", True, False, [], [0, 0, 0], [1, -1], [0.9, 0.999], [0.8, 0.1, 0.1],
            ["a", "b"], [1, [2]], {"k": 1}]
    v = r.choice(pool)
    if depth < 2 and r.random() < 0.1:
        return {r.choice(["a", "b", "lr"]): random_value(r, depth + 1)}
    return v


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, float) and abs(v) == float("inf"):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v) if isinstance(v, str) else repr(v)


DEFAULTS = default_values()  # every key of a run config, `section.key`, with its default


def default_of(key: str):
    return DEFAULTS[key]


def random_config(r: random.Random, valid: bool = False) -> tuple[str, list[str]]:
    """A TOML text of random known (and a few unknown) keys with random values, and random overrides.
    valid: known keys with their default values (which the rules must accept), and no overrides."""
    keys = list(DEFAULTS) + ["train.lrr", "data.bogus", "tokenizer.num_velocities", "tokenizer.pitch_range",
                          "tokenizer.beat_res", "tokenizer.nope"]
    by_section: dict[str, dict] = {}
    if valid:  # keys whose default is "unset" (None) have no TOML spelling
        keys = [k for k in DEFAULTS if default_of(k) is not None]
    for key in r.sample(keys, r.randint(1, 8)):
        section, _, name = key.rpartition(".")
        by_section.setdefault(section, {})[name] = default_of(key) if valid else random_value(r)
    lines = [f"{k} = {toml_value(v)}" for k, v in by_section.pop("", {}).items()]
    for section, table in by_section.items():
        lines += [f"[{section}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    if valid:
        return "\n".join(lines) + "\n", []
    overrides = [f"{r.choice(keys)}={toml_value(random_value(r))}" for _ in range(r.randint(0, 3))]
    overrides += r.choice([[], ["=1"], ["train"], ["train.lr"], ["a.b.c=1"], ["train.lr==1"], ["data.split=[1,"]])
    return "\n".join(lines) + "\n", overrides


def test_random_configs_load_or_refuse(tmp_path):
    r = random.Random(7)
    accepted = 0
    for i in range(600):
        # every third config holds only default values: the rules must accept those (random values almost never pass)
        text, overrides = random_config(r, valid=i % 3 == 1)
        if i % 10 == 0 and i % 3 != 1:  # raw garbage now and then
            text = "".join(r.choice("[]=\"'.\n abc123{}#\\") for _ in range(r.randint(0, 80)))
        path = tmp_path / "c.toml"
        path.write_text(text)
        try:
            cfg = load_config(path, overrides)
            made_with(cfg)  # builds the tokenizer config as data preparation does
            accepted += 1
        except ConfigError as e:
            assert i % 3 != 1, (text, e)  # a default value refused
            assert one_line(e), (text, overrides, e)
    assert 200 <= accepted < 600


def test_every_config_key_has_a_check_and_help():
    for kind in [RunConfig, *SECTIONS.values()]:
        for f in dataclasses.fields(kind):
            if f.name not in SECTIONS and f.name != "tokenizer":
                assert f.metadata.get("help") and "check" in f.metadata, (kind.__name__, f.name)
    load_config(ROOT / "configs" / "report.toml")  # the shipped configs pass their own checks
    load_config(ROOT / "configs" / "chorales.toml")


class Payload:
    """Unpickling this runs a shell command: what a tampered checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_in_state_pt_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "state.pt"
    torch.save({"step": 1, "best_val": 1.0, "optimizer": {}, "torch_rng": torch.get_rng_state(),
                "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused") as e:
        read_train_state(path)
    assert one_line(e.value) and not marker.exists()
    # the same payload as a plain pickle (not a torch zip file)
    path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError) as e:
        read_train_state(path)
    assert one_line(e.value) and not marker.exists()


def test_damaged_state_pt_is_one_line(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"step": 3, "best_val": 1.0, "optimizer": {"state": {}, "param_groups": []},
                "torch_rng": torch.get_rng_state()}, good)
    assert read_train_state(good)["step"] == 3
    data = good.read_bytes()
    r = random.Random(6)
    for i in range(60):
        bad = tmp_path / f"bad{i}.pt"
        bad.write_bytes(mutate(data, i) if i % 3 else data[: r.randrange(len(data))])
        try:
            read_train_state(bad)
        except CheckpointError as e:
            assert one_line(e)
    torch.save({"step": -1, "best_val": 1.0, "optimizer": {}, "torch_rng": torch.get_rng_state()}, good)
    with pytest.raises(CheckpointError, match="'step'"):
        read_train_state(good)
    torch.save([1, 2], good)
    with pytest.raises(CheckpointError, match="not a training state"):
        read_train_state(good)


def test_damaged_tokenizer_files_load_or_refuse(tokenizers, tmp_path):
    """Tokenizer JSON with bytes mutated, keys dropped or values replaced: a tokenizer or a one-line error."""
    from midistral.tokenizer_file import load_tokenizer

    r = random.Random(8)
    good = json.dumps(tokenizers["bpe"].to_dict())
    path = tmp_path / "tokenizer.json"
    loaded = 0
    for i in range(300):
        if i % 2:
            text = mutate(good.encode(), i).decode("utf-8", errors="replace")
        else:
            d = json.loads(good)
            section = d["config"] if i % 4 == 0 else d.get("bpe", d)
            key = r.choice(sorted(section))
            if r.random() < 0.3:
                del section[key]
            else:
                section[key] = random_value(r)
            text = json.dumps(d)
        path.write_text(text)
        try:
            load_tokenizer(path)
            loaded += 1
        except MidistralError as e:
            assert one_line(e), e
    assert 0 < loaded < 300
