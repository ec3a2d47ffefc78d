"""Tests for midistral/generate.py against independent oracles.

- the rolling KV cache: next-token logits equal a full re-run without cache (a naive test-only model that
  speaks the cache protocol, and our Transformer), past the window and after the ring wraps;
- no-repeat-n-gram table and the logits warpers: transformers' processors;
- greedy decoding with no-repeat-n-gram: transformers' MistralForCausalLM.generate, token for token;
- top-k support, reproducibility with a seed, EOS / min_new_tokens handling.
"""

import math
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from midistral.generate import NoRepeatNGram, RollingKVCache, generate, sample_next

torch.set_num_threads(2)


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """Full-vocabulary processed logits (B, V), filtered entries -inf; what sampling draws from.

    Same semantics as transformers' TemperatureLogitsWarper, TopKLogitsWarper (ties with the k-th value
    are kept) and TopPLogitsWarper (keeps the smallest set whose mass reaches top_p, at least one token).
    `sample_next` does the same work on the k best only; this full version states what it must equal.
    """
    logits = logits.float()
    if temperature and temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= 1 - top_p
        remove_sorted[..., -1] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


# ----------------------------------------------------------------------------------------------------
# A naive model speaking the cache protocol, written here (independent of midistral.model)


class ProtocolModel(nn.Module):
    """Embedding -> L single-head-group attention layers (sliding window, masked by positions) -> head.

    Without a cache it masks with the plain (i - W < j <= i) band; with a cache it masks by the positions
    the cache returns. Positions enter the values through a position embedding so a wrong slot shows.
    """

    def __init__(self, vocab=50, dim=32, n_layers=2, n_heads=4, n_kv=2, window=8, max_pos=256):
        super().__init__()
        hd = dim // n_heads
        self.cfg = SimpleNamespace(num_hidden_layers=n_layers, num_key_value_heads=n_kv, head_dim=hd,
                                   hidden_size=dim, num_attention_heads=n_heads, sliding_window=window,
                                   max_position_embeddings=max_pos, vocab_size=vocab)
        self.emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(max_pos, dim)
        self.q = nn.ModuleList(nn.Linear(dim, n_heads * hd) for _ in range(n_layers))
        self.kv = nn.ModuleList(nn.Linear(dim, 2 * n_kv * hd) for _ in range(n_layers))
        self.o = nn.ModuleList(nn.Linear(n_heads * hd, dim) for _ in range(n_layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids, cache=None, start_pos=0, last_only=False):
        c = self.cfg
        B, N = ids.shape
        hd, W = c.head_dim, c.sliding_window
        q_pos = torch.arange(start_pos, start_pos + N)
        x = self.emb(ids) + self.pos_emb(q_pos)
        for i in range(c.num_hidden_layers):
            q = self.q[i](x).view(B, N, -1, hd).transpose(1, 2)
            k, v = self.kv[i](x).view(B, N, 2, -1, hd).permute(2, 0, 3, 1, 4)
            if cache is not None:
                k, v, k_pos = cache.update(i, k, v, start_pos)
            else:
                k_pos = q_pos
            rep = c.num_attention_heads // c.num_key_value_heads
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            if k_pos is not None:  # None: the cache guarantees every returned key is visible
                d = q_pos[:, None] - k_pos[None, :]
                ok = (k_pos[None, :] >= 0) & (d >= 0) & (d < W)
                s = s.masked_fill(~ok, float("-inf"))
            x = x + self.o[i]((s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1))
        return self.head(x[:, -1:] if last_only else x)


def cached_logits_match_full(model, ids, chunks, tol=1e-5):
    """Feed `ids` through the cache in the given chunk sizes; after every chunk the last position's
    logits must equal those of a full re-run (no cache) of the prefix."""
    cache = RollingKVCache.for_model(model, ids.shape[0])
    pos = 0
    for n in chunks:
        got = model(ids[:, pos:pos + n], cache=cache, start_pos=pos)[:, -1]
        pos += n
        want = model(ids[:, :pos])[:, -1]
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=f"prefix length {pos}")


@pytest.mark.slow
@pytest.mark.parametrize("prompt_len", [3, 8, 13, 30])  # shorter, equal, longer, much longer than W=8
def test_rolling_cache_protocol_model(prompt_len):
    torch.manual_seed(0)
    model = ProtocolModel(window=8).eval()
    ids = torch.randint(0, 50, (2, prompt_len + 25))  # 25 decode steps: the ring wraps several times
    with torch.no_grad():
        cached_logits_match_full(model, ids, [prompt_len] + [1] * 25)
        # chunked prefill, chunks shorter and longer than the window, after decode steps
        chunks, left = [], ids.shape[1]
        for n in [5, 1, 1, 11, 1, 9, 3] + [1] * ids.shape[1]:
            if left > 0:
                chunks.append(min(n, left))
                left -= chunks[-1]
        cached_logits_match_full(model, ids, chunks)


def test_cache_one_token_step_returns_exactly_the_visible_keys():
    """The guarantee a one-token step relies on (k_pos None, no mask): after writing position p, the keys
    returned are those of positions max(0, p - W + 1) .. p, each once, whatever came before (prefill chunks
    shorter and longer than the window, wrap-arounds)."""
    W = 8
    for prefill in (1, 3, 8, 13, 30):
        cache = RollingKVCache(1, 1, 1, 1, W)
        mark = lambda a, b: torch.arange(a, b, dtype=torch.float32).view(1, 1, -1, 1)  # noqa: E731  key = its position
        cache.update(0, mark(0, prefill), mark(0, prefill), 0)
        for p in range(prefill, prefill + 3 * W):
            k, v, k_pos = cache.update(0, mark(p, p + 1), mark(p, p + 1), p)
            assert k_pos is None
            assert sorted(k.flatten().tolist()) == list(range(max(0, p - W + 1), p + 1))
            assert torch.equal(k, v)


@pytest.mark.parametrize("ours", [False, True])
def test_cache_memory_is_flat(ours, monkeypatch):
    """The cache generate() really uses (recorded at every update) is one preallocated ring of W slots that
    is never reallocated, and a decode step attends to it in place (no copy grows with the piece)."""
    import midistral.generate as gen
    from midistral.model import ModelConfig, Transformer

    calls = []

    class RecordingCache(RollingKVCache):
        def update(self, layer_idx, k, v, start_pos):
            out = super().update(layer_idx, k, v, start_pos)
            calls.append((self.k.data_ptr(), self.v.data_ptr(), tuple(self.k.shape), start_pos, k.shape[2],
                          out[0].data_ptr() == self.k[layer_idx].data_ptr()))
            return out

    monkeypatch.setattr(gen, "RollingKVCache", RecordingCache)
    if ours:
        model = Transformer(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8))
    else:
        model = ProtocolModel(window=8)
    generate(model, torch.zeros(3, 4, dtype=torch.long), 100, temperature=1.0, top_k=None,
             no_repeat_ngram_size=None, seed=0)
    assert len(calls) == 2 * 100  # 2 layers x (1 prefill + 99 decode steps)
    assert {c[:3] for c in calls} == {(calls[0][0], calls[0][1], (2, 3, 2, 8, 8))}
    assert max(c[3] for c in calls) == 4 + 98
    assert all(in_place for *_, n, in_place in calls if n == 1)


# ----------------------------------------------------------------------------------------------------
# Logits processors vs transformers


def test_no_repeat_ngram_matches_transformers():
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    g = torch.Generator().manual_seed(0)
    V = 7  # small vocabulary: many repeats
    for n in (1, 2, 3, 4):
        for prompt_len in (1, 2, 5):
            ids = torch.randint(0, V, (3, prompt_len), generator=g)
            table = NoRepeatNGram(n, ids)
            oracle = NoRepeatNGramLogitsProcessor(n)
            for _ in range(25):
                want = oracle(ids, torch.zeros(3, V))
                got = table.apply(torch.zeros(3, V))
                assert torch.equal(torch.isinf(got), torch.isinf(want)), (n, ids.tolist())
                nxt = torch.randint(0, V, (3,), generator=g)
                ids = torch.cat([ids, nxt[:, None]], 1)
                table.push(nxt.tolist())


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.5, 6, None), (0.7, None, 0.8),
                                                     (1.3, 10, 0.9), (0.5, 1, None), (2.0, 40, 0.3)])
def test_process_logits_matches_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p:
        procs.append(TopPLogitsWarper(top_p))
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1)) * 3
    want = procs(torch.zeros(4, 1, dtype=torch.long), logits.clone())
    got = process_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


@pytest.mark.slow
@pytest.mark.parametrize("top_k,top_p", [(6, None), (1, None), (20, 0.5), (None, 0.7)])
def test_sample_next_stays_in_support(top_k, top_p):
    """Every draw lies among the tokens process_logits keeps (top-k: the k best); frequencies follow it."""
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(2)) * 2
    g = torch.Generator().manual_seed(3)
    allowed = ~torch.isinf(process_logits(logits, 0.5, top_k, top_p))
    if top_k:  # the k best, or fewer when top-p cuts further
        best = logits.topk(top_k, dim=-1).indices
        outside = torch.ones_like(allowed).scatter(1, best, False)
        assert not (allowed & outside).any()
        if not top_p:
            assert allowed.gather(1, best).all()
    counts = torch.zeros(3, 200)
    for _ in range(2000):
        tok = sample_next(logits, 0.5, top_k, top_p, g)
        assert allowed.gather(1, tok[:, None]).all()
        counts[torch.arange(3), tok] += 1
    probs = process_logits(logits, 0.5, top_k, top_p).softmax(-1)
    assert (counts / 2000 - probs).abs().max() < 0.05


def test_greedy_is_argmax():
    logits = torch.randn(5, 30)
    assert torch.equal(sample_next(logits, 0.0), logits.argmax(-1))


# ----------------------------------------------------------------------------------------------------
# The loop


def test_seeded_generation_is_reproducible():
    torch.manual_seed(0)
    model = ProtocolModel(window=8).eval()
    prompt = torch.randint(0, 50, (4, 6))
    a = generate(model, prompt, 40, temperature=0.9, top_k=10, no_repeat_ngram_size=3, seed=123)
    b = generate(model, prompt, 40, temperature=0.9, top_k=10, no_repeat_ngram_size=3, seed=123)
    c = generate(model, prompt, 40, temperature=0.9, top_k=10, no_repeat_ngram_size=3, seed=124)
    assert a.shape == (4, 46) and torch.equal(a[:, :6], prompt)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the ban holds: no 3-gram occurs twice in any row
    for row in a.tolist():
        grams = list(zip(row, row[1:], row[2:]))
        assert len(grams) == len(set(grams))


def test_eos_and_min_new_tokens():
    torch.manual_seed(0)
    model = ProtocolModel(vocab=50, window=8).eval()
    with torch.no_grad():  # make token 7 (EOS) overwhelmingly likely everywhere
        model.head.bias.zero_()
        model.head.bias[7] = 100.0
    prompt = torch.randint(0, 50, (3, 5))
    out = generate(model, prompt, 30, temperature=1.0, top_k=None, no_repeat_ngram_size=None, eos_id=7,
                   min_new_tokens=4, seed=0)
    assert out.shape == (3, 5 + 5)  # 4 masked steps, then EOS everywhere, then stop
    assert (out[:, 5:9] != 7).all() and (out[:, 9] == 7).all()
    # rows finishing at different times: finished rows are padded with pad_id
    with torch.no_grad():
        model.head.bias[7] = 2.0
    out = generate(model, prompt, 30, temperature=1.0, top_k=None, no_repeat_ngram_size=None, eos_id=7,
                   pad_id=0, seed=1)
    for row in out[:, 5:].tolist():
        if 7 in row:
            assert all(t == 0 for t in row[row.index(7) + 1:])


# ----------------------------------------------------------------------------------------------------
# Our Transformer: cache vs full re-run, and greedy + no-repeat-n-gram vs transformers


def small_hf_model(tmp_path, window=8, vocab=61):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=window,
                        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        tie_word_embeddings=False)
    hf = MistralForCausalLM(cfg).eval()
    with torch.no_grad():  # random init is near-uniform; sharpen so greedy choices are well separated
        for p in hf.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


@pytest.mark.parametrize("prompt_len", [3, 8, 21])
def test_rolling_cache_our_transformer(prompt_len, tmp_path):
    from midistral.checkpoint import load_model

    _, folder = small_hf_model(tmp_path)
    model = load_model(folder).eval()
    ids = torch.randint(0, 61, (2, prompt_len + 20), generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        cached_logits_match_full(model, ids, [prompt_len] + [1] * 20)
        cached_logits_match_full(model, ids, [5, 11, 1, 9] + [1] * (ids.shape[1] - 26))


@pytest.mark.parametrize("prepacked", [True, False])
def test_decode_step_equals_full_forward(prepacked, tmp_path, monkeypatch):
    """The fp32 decode step generate() runs (the model prepared for decoding, its linears prepacked for
    oneDNN where the build has it, or the plain product) gives the logits of a full re-run without cache,
    before and after the ring wraps."""
    from midistral.checkpoint import load_model
    from midistral.model import prepare_for_decode
    from midistral.model.precision import OneDNNLinear

    if prepacked:  # this model's weights are small: prepack them anyway, to test oneDNN's path
        monkeypatch.setattr(OneDNNLinear, "MIN_WEIGHTS", 0)
    else:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    _, folder = small_hf_model(tmp_path)
    model = load_model(folder).eval()
    ids = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        runner = prepare_for_decode(model, "fp32")
        cache = RollingKVCache.for_model(runner, 2)
        runner(ids[:, :5], cache=cache, start_pos=0)
        if runner is not model:
            assert (runner.lm_head.packed is not None) == (prepacked and torch.backends.mkldnn.is_available())
        for pos in range(5, 30):  # window 8: the ring wraps three times
            got = runner(ids[:, pos, None], cache=cache, start_pos=pos)[:, -1]
            want = model(ids[:, :pos + 1])[:, -1]
            assert torch.allclose(got, want, atol=1e-5, rtol=0), (pos, (got - want).abs().max())


def test_small_weights_keep_the_plain_product():
    """oneDNN's call overhead outweighs its gain below OneDNNLinear.MIN_WEIGHTS: those weights keep MKL's plain
    product (the same weight tensor, no packed copy); larger ones are prepacked where the build has oneDNN."""
    from midistral.model.precision import OneDNNLinear

    small, large = torch.nn.Linear(128, 256, bias=False), torch.nn.Linear(512, 1024, bias=False)
    assert OneDNNLinear(small).packed is None and OneDNNLinear(small).weight is not None
    assert (OneDNNLinear(large).packed is not None) == torch.backends.mkldnn.is_available()
    x = torch.randn(3, 512)
    torch.testing.assert_close(OneDNNLinear(large)(x), x @ large.weight.detach().T, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3, 6])
def test_greedy_ngram_matches_transformers(n, tmp_path):
    from midistral.checkpoint import load_model

    hf, folder = small_hf_model(tmp_path)
    ours = load_model(folder).eval()
    prompt = torch.randint(3, 61, (3, 10), generator=torch.Generator().manual_seed(n))
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                       no_repeat_ngram_size=n, max_new_tokens=40, min_new_tokens=40, pad_token_id=0)
    got = generate(ours, prompt, 40, temperature=0.0, no_repeat_ngram_size=n, min_new_tokens=40, eos_id=2)
    assert torch.equal(got, want)


def test_decode_threads_leave_cores_to_a_competing_job(monkeypatch):
    """DecodeThreads runs every thread while the process gets its cores, one thread while a competing job takes
    them (CPU time over wall time), and every thread again once the machine's other cores idle (/proc/stat);
    FIXED_THREADS pins one count."""
    import midistral.generate as G

    clock = {"wall": 0.0, "cpu": 0.0, "idle": 0.0, "total": 0.0}
    monkeypatch.setattr(G.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(G.time, "process_time", lambda: clock["cpu"])
    monkeypatch.setattr(G, "_idle_cores", lambda: (clock["idle"], clock["total"]))
    monkeypatch.setattr(G.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(G.torch, "set_num_threads", lambda n: None)
    chooser = G.DecodeThreads(2)
    seen = []

    def run(steps, busy):
        for _ in range(steps):
            start = chooser.next()
            n = chooser.current
            seen.append(n)
            step = 0.02 if busy and n > 1 else 0.003  # a descheduled thread: slow, and the process gets ~1 core
            clock["wall"] += step
            clock["cpu"] += step * (1.0 if busy else n)
            other_idle = 0.0 if busy else (2 - n)  # the cores this process leaves idle
            clock["idle"] += step * other_idle * 100
            clock["total"] += step * 2 * 100
            chooser.record(start)
            clock["wall"] += 0.002  # the masks and the draw, on one thread: not counted
            clock["cpu"] += 0.002

    run(100, busy=False)
    assert set(seen) == {2}
    seen.clear()
    run(100, busy=True)
    assert seen[-80:] == [1] * 80  # moved to one thread within the first window
    seen.clear()
    run(100, busy=False)
    assert seen[-60:] == [2] * 60  # and back once the other core idles
    # /proc/stat says the cores idle (a container's quota hides the competition) but the process never gets them:
    # the returns to two threads back off instead of flipping every window
    seen.clear()
    monkeypatch.setattr(G, "_idle_cores", lambda: (clock["total"], clock["total"] + 1))
    run(2000, busy=True)
    assert seen[-1000:].count(2) < 100
    # a call right after a busy one starts on one thread
    monkeypatch.setattr(G.DecodeThreads, "_last", None)
    monkeypatch.setattr(G.torch, "get_num_threads", lambda: 2)
    chooser.close()
    assert chooser.current == 1 and G.DecodeThreads.for_decode().current == 1
    # a first call starts on one thread if another process's thread runs as it starts (/proc/loadavg)
    monkeypatch.setattr(G.DecodeThreads, "_last", None)
    for others, start in ((2, 1), (0, 2), (None, 2)):
        monkeypatch.setattr(G, "_others_running", lambda o=others: o)
        assert G.DecodeThreads.for_decode().current == start
    # ... and so does a call right after one that ended on every thread, if a job started meanwhile
    monkeypatch.setattr(G.DecodeThreads, "_last", (2, 2, time.monotonic()))
    for others, start in ((1, 1), (0, 2)):
        monkeypatch.setattr(G, "_others_running", lambda o=others: o)
        assert G.DecodeThreads.for_decode().current == start
    G.FIXED_THREADS = 1
    try:
        assert G.DecodeThreads.for_decode().most == 1
    finally:
        G.FIXED_THREADS = None
