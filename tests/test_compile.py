"""The compiled static-shape decode step (midistral/model/static.py): the tensor-position step against the
plain one (eager, no compiler needed), the compiled step's tokens against eager's for the same seed in fp32,
the argmax of the narrow precisions against the exact model, and the one-line fallback without a compiler."""

import pytest
import torch

from midistral.generate import generate
from midistral.model import ModelConfig, RollingKVCache, Transformer, available_precisions, prepare_for_decode
from midistral.model import static

torch.set_num_threads(1)


def small_model(seed=0, window=8):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, sliding_window=window, max_position_embeddings=256, initializer_range=0.1)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("precision", available_precisions())
def test_tensor_position_step_equals_the_plain_step(precision):
    """The static path (0-d tensor position, index_copy_ into the whole ring, mask from the ring's position tags)
    run eagerly gives the plain step's logits, before and after the ring wraps; its ring holds the same keys."""
    runner = prepare_for_decode(small_model(), precision)
    ids = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain, tagged = RollingKVCache.for_model(runner, 2), RollingKVCache.for_model(runner, 2)
        runner(ids[:, :5], cache=plain, start_pos=0)
        runner(ids[:, :5], cache=tagged, start_pos=0)
        for pos in range(5, 30):  # window 8: the ring wraps three times
            want = runner(ids[:, pos, None], cache=plain, start_pos=pos)[:, -1]
            got = runner(ids[:, pos, None], cache=tagged, start_pos=torch.tensor(pos))[:, -1]
            tagged.advance(pos + 1)
            tol = 1e-5 if precision == "fp32" else 0.01 * float(want.abs().max())  # a bf16 ring: SDPA's bf16 order
            torch.testing.assert_close(got, want, atol=tol, rtol=1e-5)
        assert torch.equal(plain.k, tagged.k) and torch.equal(plain.pos, tagged.pos)
        assert tagged.n_seen == plain.n_seen


def test_compiled_fp32_gives_eager_tokens():
    """Same seed, same tokens, through the compiled step (fp32), batch 2, past the ring's wrap."""
    if static.compile_unavailable() is not None:
        pytest.skip(static.compile_unavailable())
    model = small_model()
    prompt = torch.randint(3, 61, (2, 6), generator=torch.Generator().manual_seed(3))
    eager = generate(model, prompt, 24, temperature=0.8, top_k=10, seed=5)
    compiled = generate(model, prompt, 24, temperature=0.8, top_k=10, seed=5, compile=True)
    assert static._state["fn"] is not None, static._state["reason"]  # it compiled (no silent fallback)
    assert torch.equal(compiled, eager)


def test_fused_attention_under_compile_equals_sdpa():
    """The one-query attention a compiled CPU step takes (products and sums fused by inductor) against SDPA's, on a
    ring with empty slots, positions older than the window and a bf16 ring."""
    if static.compile_unavailable() is not None:
        pytest.skip(static.compile_unavailable())
    from midistral.model.attention import attention_at_positions

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 16, generator=g), torch.randn(3, 2, 8, 16, generator=g), torch.randn(3, 2, 8, 16, generator=g)
    k_pos = torch.tensor([8, 9, 10, 3, 4, 5, -1, 7])  # 3 and 4 are out of a window of 6 at position 10, -1 empty
    fn = torch.compile(attention_at_positions, fullgraph=True, dynamic=False)
    for ring in (torch.float32, torch.bfloat16):
        want = attention_at_positions(q, k.to(ring), v.to(ring), torch.tensor(10), k_pos, 6)
        got = fn(q, k.to(ring), v.to(ring), torch.tensor(10), k_pos, 6)
        assert got.dtype == want.dtype == ring
        torch.testing.assert_close(got.float(), want.float(), atol=1e-5 if ring == torch.float32 else 0.02, rtol=1e-4)


def test_ahead_of_time_file_loads_in_a_new_process_and_replaces_a_damaged_one(tmp_path, monkeypatch):
    """The first compiled call saves the step to CACHE_DIR/aot; with the process's memory of it cleared (a new
    process), the file is loaded, not traced again, and gives eager's tokens for other weights of the same shape;
    a damaged file is compiled again and replaced."""
    if static.compile_unavailable() is not None:
        pytest.skip(static.compile_unavailable())
    monkeypatch.setattr(static, "CACHE_DIR", tmp_path)
    monkeypatch.setitem(static._state, "aot", {})
    prompt = torch.randint(3, 61, (1, 6), generator=torch.Generator().manual_seed(3))
    model = small_model(seed=0)
    assert torch.equal(generate(model, prompt, 12, seed=5, compile=True), generate(model, prompt, 12, seed=5))
    files = list((tmp_path / "aot").glob("*.bin"))
    assert len(files) == 1
    static._state["aot"].clear()
    loaded = []
    real_load = torch.compiler.load_compiled_function
    monkeypatch.setattr(torch.compiler, "load_compiled_function", lambda f: loaded.append(1) or real_load(f))
    other = small_model(seed=1)  # other weights: inputs of the graph, not constants in it
    assert torch.equal(generate(other, prompt, 12, seed=5, compile=True), generate(other, prompt, 12, seed=5))
    assert loaded == [1]
    static._state["aot"].clear()
    files[0].write_bytes(b"not a compiled function")
    assert torch.equal(generate(other, prompt, 12, seed=5, compile=True), generate(other, prompt, 12, seed=5))
    assert files[0].stat().st_size > 1000  # compiled again and saved over the damaged file


def test_a_step_that_cannot_be_saved_ahead_of_time_is_compiled_once(tmp_path, monkeypatch):
    """Where aot_compile fails (bf16's oneDNN-packed weights), the plain compiled step serves every later call:
    before, each generate call tried the ahead-of-time compile again (batch 8 in bf16: 8.5 s a call, not 2.5)."""
    if static.compile_unavailable() is not None:
        pytest.skip(static.compile_unavailable())
    monkeypatch.setattr(static, "CACHE_DIR", tmp_path)
    monkeypatch.setitem(static._state, "aot", {})
    monkeypatch.setitem(static._state, "not_aot", set())
    tries, real_compile = [], torch.compile

    def compile_without_aot(*args, **kwargs):
        fn = real_compile(*args, **kwargs)

        def aot_compile(*_a, **_k):
            tries.append(1)
            raise NotImplementedError("not serialisable (test)")
        fn.aot_compile = aot_compile
        return fn

    monkeypatch.setattr(torch, "compile", compile_without_aot)
    model = small_model(seed=2)
    prompt = torch.randint(3, 61, (1, 6), generator=torch.Generator().manual_seed(3))
    want = generate(model, prompt, 10, seed=5)
    for _ in range(3):
        assert torch.equal(generate(model, prompt, 10, seed=5, compile=True), want)
    assert tries == [1]


@pytest.mark.slow
@pytest.mark.parametrize("precision", [p for p in available_precisions() if p != "fp32"])
def test_compiled_narrow_precisions_keep_the_argmax(precision):
    """Greedy through the compiled step in a narrow precision agrees with the eager step's argmax on >= 97% of
    positions (the quality guard's int8 bound) and with the compiled fp32 step's tokens."""
    if static.compile_unavailable() is not None:
        pytest.skip(static.compile_unavailable())
    model = small_model(window=16)
    prompt = torch.randint(3, 61, (1, 8), generator=torch.Generator().manual_seed(4))
    eager = generate(model, prompt, 40, temperature=0, no_repeat_ngram_size=None, precision=precision)
    compiled = generate(model, prompt, 40, temperature=0, no_repeat_ngram_size=None, precision=precision, compile=True)
    assert (compiled == eager).float().mean() >= 0.97


def test_without_a_compiler_one_note_and_eager(monkeypatch, capsys):
    monkeypatch.setattr(static, "_state", {"fn": None, "reason": None, "noted": False})
    monkeypatch.setattr(static, "compile_unavailable", lambda device="cpu": "no C++ compiler (test)")
    model = small_model()
    prompt = torch.randint(3, 61, (1, 4), generator=torch.Generator().manual_seed(0))
    want = generate(model, prompt, 12, seed=1)
    assert torch.equal(generate(model, prompt, 12, seed=1, compile=True), want)
    generate(model, prompt, 12, seed=1, compile=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: compiled decoding unavailable (no C++ compiler (test)); decoding eagerly"]


def test_compile_pays_off_rule():
    assert static.compile_pays_off(1, 21_000_000)
    assert not static.compile_pays_off(8, 21_000_000)
    assert not static.compile_pays_off(1, 900_000) and not static.compile_pays_off(1, None)
