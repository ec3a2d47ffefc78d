"""The decoder against transformers' MistralForCausalLM (test-only oracle) with the same weights."""

import json

import pytest
import torch

from midistral.errors import CheckpointError, ConfigError
from midistral.checkpoint import load_model, save_checkpoint
from midistral.model import ModelConfig, Transformer
from midistral.model.model import RotaryEmbedding
from midistral.model.attention import attention_at_positions, sliding_window_attention_torch

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, sliding_window=16, max_position_embeddings=512, pad_token_id=0,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, attn_implementation="eager")).eval()
    with torch.no_grad():  # norms at 1.0 hide mistakes in their handling: perturb them
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    return hf, load_model(d).eval(), d


def naive_attention(q, k, v, W):
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    i = torch.arange(q.shape[2])
    s = s.masked_fill(~((i[None] <= i[:, None]) & (i[None] > i[:, None] - W)), float("-inf"))
    return s.softmax(-1) @ v


def test_reference_config_parameter_count():
    cfg = ModelConfig(vocab_size=5000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=512,
                      max_position_embeddings=8192, tie_word_embeddings=False)
    assert sum(p.numel() for p in Transformer(cfg).parameters()) == 24_003_072


@pytest.mark.parametrize("n", [5, 16, 53, 300])  # below, equal to, several times the window (16)
def test_logits_and_loss_equal_transformers(hf_pair, n):
    hf, ours, _ = hf_pair
    ids = torch.randint(0, SMALL["vocab_size"], (3, n), generator=torch.Generator().manual_seed(n))
    ids[0, -2:] = 0  # padding inside the batch
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets[0, -3:] = -100
    labels = ids.clone()
    labels[0, -2:] = -100
    with torch.no_grad():
        want = hf(ids, labels=labels)
        logits, loss = ours(ids, targets)
    torch.testing.assert_close(logits, want.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, want.loss, atol=1e-5, rtol=1e-5)


def test_gradients_equal_transformers(hf_pair):
    hf, ours, _ = hf_pair
    ids = torch.randint(0, SMALL["vocab_size"], (2, 70), generator=torch.Generator().manual_seed(1))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    hf.zero_grad(), ours.zero_grad()
    hf(ids, labels=ids).loss.backward()
    ours(ids, targets)[1].backward()
    theirs = {k.removeprefix("model."): p.grad for k, p in hf.named_parameters()}
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for name, p in ours.named_parameters():
        module, _, kind = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        g = torch.cat([theirs[f"{parent}.{part}.{kind}"] for part in fused.get(leaf, (leaf,))]) if leaf in fused else theirs[name]
        assert (p.grad - g).abs().max() <= 1e-4 * g.abs().max() + 1e-9, name


@pytest.mark.parametrize("N,W", [(1, 4), (17, 4), (300, 16), (700, 100), (1200, 513), (600, 1)])
def test_plain_attention_equals_naive(N, W):
    g = torch.Generator().manual_seed(N)
    q = torch.randn(2, 4, N, 16, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 2, N, 16, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 2, N, 16, dtype=torch.float64, generator=g, requires_grad=True)
    a, b = sliding_window_attention_torch(q, k, v, W), naive_attention(q, k, v, W)
    torch.testing.assert_close(a, b)
    go = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), go), torch.autograd.grad(b, (q, k, v), go)):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("N,W,lens", [(40, 8, (10, 17, 13)), (600, 64, (300, 150, 100, 50)), (600, 200, (599, 1)),
                                      (700, 512, (100, 450, 140, 10))])  # the band path and the blocked one
def test_packed_attention_equals_each_segment_alone(N, W, lens):
    """A packed row (segments end to end, a padding tail of -1) attends as if each segment had a row of its own."""
    g = torch.Generator().manual_seed(N)
    q = torch.randn(2, 4, N, 16, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 2, N, 16, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 2, N, 16, dtype=torch.float64, generator=g, requires_grad=True)
    row = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)] + [torch.full((N - sum(lens),), -1)])
    segments = torch.stack([row, row.flip(0)])  # the second row: padding first, segments in another order
    out = sliding_window_attention_torch(q, k, v, W, segments)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    for b in range(2):
        for s in segments[b].unique().tolist():
            at = (segments[b] == s).nonzero()[:, 0]
            if s == -1 and b == 1:
                continue  # the flipped padding run is not a causal segment of its own (its output is unused)
            assert (at.diff() == 1).all()
            sl = slice(int(at[0]), int(at[-1]) + 1)
            qs, ks, vs = (t[b:b + 1, :, sl].detach().requires_grad_() for t in (q, k, v))
            want = naive_attention(qs, ks, vs, W)
            torch.testing.assert_close(out[b:b + 1, :, sl], want)
            for got, ref in zip(grads, torch.autograd.grad(want, (qs, ks, vs), go[b:b + 1, :, sl])):
                torch.testing.assert_close(got[b:b + 1, :, sl], ref)


def test_packed_batch_loss_and_gradients_equal_padded(hf_pair):
    """The model on a packed batch (positions restart per segment) gives the padded batch's loss and gradients."""
    _, ours, _ = hf_pair
    g = torch.Generator().manual_seed(3)
    lens = (30, 7, 19, 12)
    seqs = [torch.randint(3, SMALL["vocab_size"], (n,), generator=g) for n in lens]
    L = max(lens)
    ids = torch.stack([torch.cat([s, torch.zeros(L - len(s), dtype=torch.long)]) for s in seqs])
    targets = torch.stack([torch.cat([s[1:], torch.full((L - len(s) + 1,), -100)]) for s in seqs])
    packed_ids = torch.stack([torch.cat([seqs[0], seqs[3]]), torch.cat([seqs[1], seqs[2], torch.zeros(16, dtype=torch.long)])])
    packed_t = torch.stack([torch.cat([targets[0, :30], targets[3, :12]]),
                            torch.cat([targets[1, :7], targets[2, :19], torch.full((16,), -100)])])
    segments = torch.tensor([[0] * 30 + [3] * 12, [1] * 7 + [2] * 19 + [-1] * 16])
    ours.zero_grad()
    _, loss = ours(ids, targets)
    loss.backward()
    want = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    logits, packed_loss = ours(packed_ids, packed_t, segments=segments)
    packed_loss.backward()
    torch.testing.assert_close(packed_loss, loss, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(logits[0, 30:], ours(ids[3:4, :12])[0], atol=1e-5, rtol=0)
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-4, msg=n)
    ours.zero_grad()
    with pytest.raises(ValueError, match="segments"):
        ours(packed_ids, segments=segments, start_pos=3)


def test_attention_at_positions_ring_order():
    """Keys in ring order with empty slots give the same output as the contiguous computation."""
    g = torch.Generator().manual_seed(0)
    N, W = 40, 8
    q, k, v = (torch.randn(1, 4 if i == 0 else 2, N, 16, generator=g, dtype=torch.float64) for i in range(3))
    full = naive_attention(q, k, v, W)
    p = N - 1
    slots = torch.arange(p - W + 1, p + 1) % W
    kr, vr, pos = torch.zeros(1, 2, W + 2, 16, dtype=torch.float64), torch.zeros(1, 2, W + 2, 16, dtype=torch.float64), torch.full((W + 2,), -1)
    kr[:, :, slots], vr[:, :, slots], pos[slots] = k[:, :, p - W + 1:], v[:, :, p - W + 1:], torch.arange(p - W + 1, p + 1)
    out = attention_at_positions(q[:, :, p:], kr, vr, p, pos, W)
    torch.testing.assert_close(out, full[:, :, p:])
    # k_pos None (what the cache returns for a one-token step): every key given is visible
    out = attention_at_positions(q[:, :, p:], kr[:, :, :W], vr[:, :, :W], p, None, W)
    torch.testing.assert_close(out, full[:, :, p:])


def test_rope_tables_cover_the_positions_asked_and_equal_one_full_table():
    """A sampler that stays below position 1,024 holds 1,024 rows, not max_positions (8 MB for the reference
    model); growing the table later gives exactly the values a full-size table has."""
    grown, full = RotaryEmbedding(128, 10000.0, 8192), RotaryEmbedding(128, 10000.0, 8192)
    full(8190, 2, "cpu", torch.float32)  # built once for every position
    grown(0, 300, "cpu", torch.float32)
    assert grown._tables[(torch.device("cpu"), torch.float32)][0].shape[0] == 1024
    for start, n in [(1000, 40), (5000, 7), (8185, 7)]:  # grows to 2,048, then 8,192
        for a, b in zip(grown(start, n, "cpu", torch.float32), full(start, n, "cpu", torch.float32)):
            assert a.shape == (n, 1, 128) and torch.equal(a, b)
    assert grown._tables[(torch.device("cpu"), torch.float32)][0].shape[0] == 8192


def test_save_load_roundtrip(tmp_path, hf_pair):
    _, ours, _ = hf_pair
    save_checkpoint(tmp_path / "ck", ours)
    back = load_model(tmp_path / "ck")
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        assert torch.equal(ours(ids), back(ids))


def test_bad_inputs(tmp_path, hf_pair):
    _, ours, folder = hf_pair
    with pytest.raises(ValueError, match="out of range"):
        ours(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(ConfigError, match="not divisible"):
        ModelConfig(hidden_size=65, num_attention_heads=4)
    with pytest.raises(ConfigError, match="unknown model config key 'hiden_size'"):
        ModelConfig.from_dict({"hiden_size": 3})
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(json.dumps(SMALL))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**SMALL, "model_type": "mistral"}))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "ck")


class RingCache:
    """A tiny rolling KV cache written for the test (the protocol of midistral/generate.py): per layer a
    buffer of `size` slots, position p stored in slot p % size, -1 marks an empty slot."""

    def __init__(self, n_layers, B, Hkv, D, size):
        self.k = [torch.zeros(B, Hkv, size, D) for _ in range(n_layers)]
        self.v = [torch.zeros(B, Hkv, size, D) for _ in range(n_layers)]
        self.pos = {i: torch.full((size,), -1) for i in range(n_layers)}
        self.size = size

    def update(self, i, k, v, start_pos):
        n = k.shape[2]
        assert n <= self.size
        slots = torch.arange(start_pos, start_pos + n) % self.size
        self.k[i][:, :, slots], self.v[i][:, :, slots] = k, v
        self.pos[i][slots] = torch.arange(start_pos, start_pos + n)
        return self.k[i], self.v[i], self.pos[i]


def test_kv_cache_decode_equals_full_forward(hf_pair):
    """Prefill, then 1-token and 3-token steps through a ring buffer that wraps several times: the logits
    at every step equal those of one no-cache forward over the whole sequence (and transformers')."""
    hf, ours, _ = hf_pair
    W = SMALL["sliding_window"]
    ids = torch.randint(3, SMALL["vocab_size"], (2, 75), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = ours(ids)
        torch.testing.assert_close(full, hf(ids).logits, atol=1e-4, rtol=0)
        cache = RingCache(SMALL["num_hidden_layers"], 2, SMALL["num_key_value_heads"], 16, size=W + 2)
        steps, p = [10], 10  # prefill shorter than the window, then mixed step sizes
        while p < ids.shape[1]:
            steps.append(min(1 if len(steps) % 4 else 3, ids.shape[1] - p))
            p += steps[-1]
        p = 0
        for n in steps:
            out = ours(ids[:, p:p + n], cache=cache, start_pos=p)
            torch.testing.assert_close(out, full[:, p:p + n], atol=1e-4, rtol=0)
            p += n
        assert int(cache.pos[0].min()) >= 0 and p > 3 * (W + 2)  # the ring is full and wrapped
        # last_only (a prefill's logits): the last position's row of the full forward, and the same cache state
        cache2 = RingCache(SMALL["num_hidden_layers"], 2, SMALL["num_key_value_heads"], 16, size=W + 2)
        last = ours(ids[:, :15], cache=cache2, start_pos=0, last_only=True)
        assert last.shape == (2, 1, SMALL["vocab_size"])
        torch.testing.assert_close(last, full[:, 14:15], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours(ids[:, 15:16], cache=cache2, start_pos=15), full[:, 15:16], atol=1e-4, rtol=0)


def test_from_hf_sharded_index(tmp_path, hf_pair):
    """A sharded save_pretrained folder (model.safetensors.index.json + shards) loads; a missing shard is named."""
    from safetensors.torch import load_file, save_file

    _, ours, folder = hf_pair
    state = load_file(str(folder / "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(ids), ours(ids))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("batch", [1, 4, 8])
def test_decode_attention_over_a_bf16_ring_by_products(batch):
    """A decode step over a bf16 ring at batch >= 4 attends by two batched products (faster than SDPA's flash
    kernel for so few queries): the same output as SDPA in fp32 within bf16's rounding, masked and unmasked."""
    from midistral.model import attention

    g = torch.Generator().manual_seed(batch)
    W, D = 16, 32
    q = torch.randn(batch, 4, 1, D, generator=g)
    k, v = (torch.randn(batch, 2, W, D, generator=g).to(torch.bfloat16) for _ in range(2))
    pos = torch.arange(W)
    pos[11:] = -1  # five empty slots
    for k_pos, p in ((pos, 10), (None, W - 1)):
        got = attention_at_positions(q, k, v, p, k_pos, W).float()
        visible = None if k_pos is None else ((k_pos >= 0) & (k_pos <= p))[None]
        want = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=visible, enable_gqa=True)
        assert torch.allclose(got, want, atol=2e-2), (got - want).abs().max()
        assert attention._products_attend(k, batch) == (batch >= 4)
