"""Tests for midistral/model/cache.py's snapshot / restore: reading ahead speculatively and forgetting it.

Oracle: the ring itself before the speculative read (its slots come back bit for bit), and a plain forward
pass without a cache over the ids actually kept.
"""

import pytest
import torch

from midistral.model import ModelConfig, RollingKVCache, Transformer

torch.set_num_threads(1)


def tiny(window=8):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, sliding_window=window, max_position_embeddings=256)
    return Transformer(cfg).eval()


def test_restore_puts_back_the_slots_it_took():
    cache = RollingKVCache(2, 1, 1, 4, 8)
    cache.k.normal_(), cache.v.normal_()
    cache.pos[:] = torch.arange(8)
    cache.n_seen = [8, 8]
    before = (cache.k.clone(), cache.v.clone(), cache.pos.clone())
    snap = cache.snapshot(8, 5)  # positions 8..12 go to slots 0..4
    assert snap.slots.tolist() == [0, 1, 2, 3, 4]
    cache.k[:, :, :, :5] = 7.0
    cache.pos[:, :5] = torch.arange(8, 13)
    cache.restore(snap, 10)  # positions 8 and 9 were kept, 10..12 forgotten
    assert torch.equal(cache.k[:, :, :, 2:], before[0][:, :, :, 2:]) and (cache.k[:, :, :, :2] == 7.0).all()
    assert cache.pos[0].tolist() == [8, 9, 2, 3, 4, 5, 6, 7] and cache.n_seen == [10, 10]
    assert torch.equal(cache.v, before[1])


def test_snapshot_larger_than_the_ring_is_refused():
    with pytest.raises(ValueError, match="at most"):
        RollingKVCache(1, 1, 1, 4, 8).snapshot(0, 9)


@torch.inference_mode()
@pytest.mark.parametrize("kept", [0, 2, 5])
def test_speculative_read_then_restore_equals_the_plain_stream(kept):
    """Read 6 ids, then 5 draft ids past them (the ring wraps), keep `kept` of the draft, go on with 3 other
    ids: the logits equal a full pass over the ids kept (window 8, so the draft overwrote live slots)."""
    model = tiny()
    ids = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(1))
    head, draft, tail = ids[:, :6], ids[:, 6:11], ids[:, 11:14]
    cache = RollingKVCache.for_model(model, 1)
    model(head, cache=cache, start_pos=0)
    snap = cache.snapshot(6, 5)
    model(draft, cache=cache, start_pos=6)
    cache.restore(snap, 6 + kept)
    got = model(tail, cache=cache, start_pos=6 + kept)[0, -1]
    stream = torch.cat([head, draft[:, :kept], tail], 1)
    torch.testing.assert_close(got, model(stream)[0, -1], atol=1e-5, rtol=1e-5)
