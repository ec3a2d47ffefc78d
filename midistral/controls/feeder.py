"""Reading a model over a stream that is forced most of the time, with one rolling KV cache, speculatively
(the accompaniment walk's reader: midistral.controls.accompany)."""

from __future__ import annotations

import torch

from midistral.model import RollingKVCache, prepare_for_decode
from midistral.model.cache import model_config

DRAFT_IDS = 48  # longest draft the walk hands the model in one call (see Feeder)
DRAFT_GAIN, DRAFT_MIN = 2.0, 4  # a draft: this many times the ids the walk tends to follow, plus this


class Feeder:
    """Runs the model over the ids of the walk with one rolling KV cache, speculatively.

    A call may carry a draft after the ids it must read: the ids the walk will read next if the piece goes
    on without a new note for a few ticks. Their logits are kept; while the ids the walk asks about are the
    draft's next ones, the answer comes from there without a model call. When the walk leaves the draft
    (it writes a note), the ring slots the rest of the draft overwrote are put back, so the cache holds the
    walk's own stream only. Past the model's positions it re-reads the last window at position 0."""

    def __init__(self, model, precision: str = "fp32"):
        self.model = prepare_for_decode(model, precision)  # the decode path generate() uses, built once
        self.max_pos = model_config(model).max_position_embeddings
        self.cache = RollingKVCache.for_model(self.model, 1)
        self.window = self.cache.window
        self.history: list[int] = []
        self.pos = 0
        self.draft: list[int] = []  # ids read speculatively after self.pos, and the logits after each
        self.draft_logits = self.last = None
        self.saved = None  # the ring slots the draft positions overwrite, as they were before (a CacheSnapshot)
        self.followed = 4.0  # draft ids the walk followed, running mean: sizes the next draft
        self.calls = 0

    def feed(self, ids: list[int], draft=lambda limit: []) -> torch.Tensor:
        """Logits (V,) after the last of `ids`; `draft(limit)` gives up to `limit` ids expected next (called
        on a miss). Drafts are about twice as long as the walk tends to follow them: each id in a call costs
        a little, a call saved costs a lot."""
        n = len(ids)
        if n == 0:
            return self.last
        if ids == self.draft[:n]:  # the walk follows the draft: no model call
            self.last = self.draft_logits[n - 1]
            self.draft, self.draft_logits = self.draft[n:], self.draft_logits[n:]
            self._commit(ids)
            return self.last
        self._rollback()
        if self.pos + n > self.max_pos:  # restart the positions with the last window re-read
            tail = self.history[-(self.window - 1):] if self.window > 1 else []
            self.cache = RollingKVCache.for_model(self.model, 1)
            self.history, self.pos = [], 0
            ids, n = tail + ids, len(tail) + n
        # the draft shares the call's one chunk, so its slots are none of the slots the call's own ids fill
        room = min(self.window - n, self.max_pos - self.pos - n, DRAFT_IDS)
        spec = draft(min(int(DRAFT_GAIN * self.followed) + DRAFT_MIN, room))[:room] if room > 0 else []
        if spec:
            self.saved = self.cache.snapshot(self.pos + n, len(spec))
        ids_all = ids + spec
        for s in range(0, len(ids_all), self.window):
            chunk = torch.tensor([ids_all[s:s + self.window]])
            logits = self.model(chunk, cache=self.cache, start_pos=self.pos + s)[0]
            self.calls += 1
        self.last = logits[len(logits) - len(spec) - 1]
        self.draft, self.draft_logits = spec, logits[len(logits) - len(spec):]
        self._commit(ids)
        return self.last

    def _commit(self, ids: list[int]) -> None:
        self.pos += len(ids)
        self.history += ids
        if len(self.history) > 4 * self.window:
            del self.history[:-self.window]

    def _rollback(self) -> None:
        """Put back the ring slots of the draft positions the walk did not follow."""
        if self.saved is not None:
            self.followed = 0.8 * self.followed + 0.2 * (self.pos - self.saved.start)
            self.cache.restore(self.saved, self.pos)
        self.saved, self.draft, self.draft_logits = None, [], None
