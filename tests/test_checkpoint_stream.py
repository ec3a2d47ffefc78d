"""checkpoint.load_model with a precision, the streaming loader Sampler.load uses: the same model as the plain path
(prepare_for_decode of the loaded checkpoint) to the bit in every precision offered here, for our checkpoints
(tied or not, weights stored in bf16) and transformers' save_pretrained folders (whole or sharded); never
more than one part's tensors held at once and no full state dict; a damaged or misnamed weights file is one
CheckpointError line naming it."""

import json
import random
import struct
import weakref

import pytest
import torch

from midistral import checkpoint
from midistral.checkpoint import load_model, save_checkpoint
from midistral.errors import CheckpointError, MidistralError
from midistral.model import ModelConfig, RollingKVCache, Transformer, available_precisions, prepare_for_decode

CFG = dict(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, sliding_window=8, max_position_embeddings=256, initializer_range=0.1)


def saved(tmp_path, tie=False, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**CFG, tie_word_embeddings=tie))
    with torch.no_grad():  # norms at 1.0 would hide a norm loaded from the wrong tensor
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(tmp_path / "ck", model)
    return tmp_path / "ck"


def run(model, ids):
    """Logits of a prefill past the window, then three one-token decode steps through the ring."""
    with torch.inference_mode():
        cache = RollingKVCache.for_model(model, ids.shape[0])
        out = [model(ids, cache=cache)]
        for pos in range(ids.shape[1], ids.shape[1] + 3):
            out.append(model(ids[:, pos % ids.shape[1], None], cache=cache, start_pos=pos))
    return out


def assert_same_model(ckpt, precision):
    want = prepare_for_decode(load_model(ckpt), precision)
    got = load_model(ckpt, precision=precision)
    assert [(n, type(m)) for n, m in got.named_modules()] == [(n, type(m)) for n, m in want.named_modules()]
    assert getattr(got, "decode_precision", None) == getattr(want, "decode_precision", None)
    assert getattr(got, "kv_cache_dtype", None) == getattr(want, "kv_cache_dtype", None)
    ids = torch.randint(3, CFG["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(1))
    for a, b in zip(run(got, ids), run(want, ids)):
        assert torch.equal(a, b)
    return got


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("precision", available_precisions())
def test_same_model_as_the_plain_path(tmp_path, precision, tie):
    got = assert_same_model(saved(tmp_path, tie), precision)
    if tie:
        assert got.embed_tokens.weight.shape == (CFG["vocab_size"], CFG["hidden_size"])


def test_weights_stored_in_bf16_are_read_as_the_plain_path_reads_them(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = saved(tmp_path)
    state = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v.bfloat16() for k, v in state.items()}, str(ckpt / "model.safetensors"))
    for precision in available_precisions():
        assert_same_model(ckpt, precision)


@pytest.mark.parametrize("sharded", [False, True])
def test_transformers_save_pretrained_folder(tmp_path, sharded):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    hf_cfg = {k: v for k, v in CFG.items() if k != "initializer_range"}
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**hf_cfg, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path)
    if sharded:
        state = load_file(str(tmp_path / "model.safetensors"))
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for fname, keys in shards.items():
            save_file({k: state[k] for k in keys}, str(tmp_path / fname), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
        (tmp_path / "model.safetensors").unlink()
    for precision in available_precisions():
        assert_same_model(tmp_path, precision)


def test_holds_one_part_at_a_time_and_never_a_state_dict(tmp_path, monkeypatch):
    """A counting hook on the reader: when a tensor is read, the ones read before it and still alive belong to
    its own part (a block, the LM head, ...). safetensors' load_file (the whole state dict) is never called."""
    ckpt = saved(tmp_path)
    read, alive_at_read = [], []
    real = checkpoint.iter_tensors

    def counting(path, names):
        for name, tensor in real(path, names):
            alive_at_read.append([n for n, ref in read if ref() is not None])
            read.append((name, weakref.ref(tensor)))
            yield name, tensor

    def no_load_file(*a, **k):
        raise AssertionError("the streaming loader read a whole state dict")

    monkeypatch.setattr(checkpoint, "iter_tensors", counting)
    monkeypatch.setattr("safetensors.torch.load_file", no_load_file)
    model = load_model(ckpt, precision=available_precisions()[-1])
    part = lambda name: ".".join(name.split(".")[:2]) if name.startswith("layers.") else name.split(".")[0]  # noqa: E731
    assert len(read) == 2 * 9 + 3 and len({part(n) for n, _ in read}) == 2 + 3
    for (name, _), alive in zip(read, alive_at_read):
        assert all(part(n) == part(name) for n in alive), (name, alive)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())  # every fp32 linear converted


def test_sampler_load_streams(tiny_run, monkeypatch):
    from midistral.sampler import Sampler

    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: pytest.fail("load_file called"))
    for precision in available_precisions():
        smp = Sampler.load(tiny_run, precision=precision)
        assert smp.model.decode_precision == precision
        assert not any(isinstance(m, torch.nn.Linear) for m in smp.model.modules())


def header_of(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def with_header(path, header, body):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def rename(h):
    h["layers.0.mlp.gate_prj.weight"] = h.pop("layers.0.mlp.gate_proj.weight")


def reshape(h):
    h["norm.weight"]["shape"] = [32, 2]


def redtype(h):
    h["norm.weight"]["dtype"] = "F8_E4M3"


def past_end(h):
    h["norm.weight"]["data_offsets"][1] += 10**6


DAMAGE = {  # damage -> what the one line says
    "truncated to 40 bytes": (lambda p: p.write_bytes(p.read_bytes()[:40]), "truncated"),
    "truncated data": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated"),
    "shorter than 8 bytes": (lambda p: p.write_bytes(b"\x01\x02"), "truncated"),
    "header not JSON": (lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{abc}" + b"\0" * 64), "invalid JSON"),
    "header a list": (lambda p: with_header(p, [1, 2], b""), "invalid JSON"),
    "misnamed tensor": (rename, "missing tensor 'layers.0.mlp.gate_proj.weight'"),
    "wrong shape": (reshape, "tensor 'norm.weight' has shape (32, 2), expected (64,)"),
    "unknown dtype": (redtype, "invalid shape, data type, or offset"),
    "offsets past the end": (past_end, "invalid shape, data type, or offset"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_weights_are_one_line(tmp_path, damage):
    ckpt = saved(tmp_path)
    path = ckpt / "model.safetensors"
    hurt, says = DAMAGE[damage]
    if hurt.__name__ in ("rename", "reshape", "redtype", "past_end"):
        header, body = header_of(path)
        hurt(header)
        with_header(path, header, body)
    else:
        hurt(path)
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt, precision="fp32")
    assert "\n" not in str(e.value) and str(path) in str(e.value) and says in str(e.value), str(e.value)
    with pytest.raises(CheckpointError):  # the plain path refuses it too
        load_model(ckpt)


def test_misnamed_and_misshapen_tensors_get_the_plain_paths_message(tmp_path):
    """A shape that fits the bytes but not the model, an extra tensor: the same message as load_weights'."""
    from safetensors.torch import load_file, save_file

    ckpt = saved(tmp_path)
    state = load_file(str(ckpt / "model.safetensors"))
    for bad in ({**state, "norm.weight": state["norm.weight"].reshape(32, 2)}, {**state, "extra.weight": state["norm.weight"].clone()}):
        save_file(bad, str(ckpt / "model.safetensors"))
        with pytest.raises(CheckpointError) as plain:
            load_model(ckpt)
        with pytest.raises(CheckpointError) as streamed:
            load_model(ckpt, precision="fp32")
        assert str(streamed.value) == str(plain.value)


def test_mutated_headers_load_or_refuse_in_one_line(tmp_path):
    """Random byte changes in the header: a model, or one MidistralError line (never another exception)."""
    ckpt = saved(tmp_path)
    path = ckpt / "model.safetensors"
    good = path.read_bytes()
    n = 8 + struct.unpack("<Q", good[:8])[0]
    r = random.Random(0)
    for _ in range(40):
        data = bytearray(good)
        for _ in range(r.randint(1, 3)):
            data[r.randrange(n)] = r.choice(b'0123456789[]{}":,. \xffabc')
        path.write_bytes(bytes(data))
        try:
            load_model(ckpt, precision="fp32")
        except MidistralError as e:
            assert "\n" not in str(e)
