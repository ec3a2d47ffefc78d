"""Sampling: prefill the prompt, then decode token by token with a rolling KV cache.

    ids = generate(model, prompt_ids, max_new_tokens=512, temperature=0.7, top_k=12,
                   no_repeat_ngram_size=6, eos_id=tok.eos_id, seed=0)

The sampling defaults are midistral.sampling.SamplingConfig's (one set for every caller).

Three pieces, each small:
- `RollingKVCache` (midistral/model/cache.py): per layer a ring of W = sliding_window slots, so memory stays
  flat however long the piece grows; the model in the sampling precision (model/precision.py) runs on it.
- `NoRepeatNGram`: transformers' no-repeat-n-gram ban (any (n-1)-gram seen anywhere so far, prompt
  included, bans the tokens that followed it), kept as an incremental table updated once per new token
  instead of rescanning the history at every step.
- `sample_next`: the logits pipeline in transformers' order: n-gram ban, then temperature, then top-k,
  then top-p, on the k best only. Temperature 0 means greedy.

Constraints restrict what may come next, for example the token grammar (every token decodes):

    from midistral.tokenize.grammar import GrammarConstraint
    ids = generate(model, prompt_ids, 512, eos_id=tok.eos_id, constraints=[GrammarConstraint(tok, 512)])
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from midistral.model import RollingKVCache, prepare_for_decode
from midistral.sampling import SAMPLING
from midistral.model.static import StaticDecoder

# ----------------------------------------------------------------------------------------------------
# No-repeat-n-gram ban, incremental


class NoRepeatNGram:
    """transformers' `no_repeat_ngram_size`, as a table updated once per token.

    For each row: a dict from an (n-1)-gram (tuple) to the set of tokens that followed it somewhere in
    the sequence, plus the last n-1 tokens. The tokens banned at the next step are
    table[last n-1 tokens]. Building it from the prompt is one pass; each new token is one dict update.
    """

    def __init__(self, n: int, prompt_ids: torch.Tensor):
        if n < 1:
            raise ValueError(f"no_repeat_ngram_size must be >= 1, got {n}")
        self.n = n
        self.tables: list[dict[tuple, set]] = []
        self.tails: list[deque] = []
        for row in prompt_ids.tolist():
            table: dict[tuple, set] = {}
            for i in range(len(row) - n + 1):
                table.setdefault(tuple(row[i:i + n - 1]), set()).add(row[i + n - 1])
            self.tables.append(table)
            self.tails.append(deque(row[len(row) - (n - 1):] if n > 1 else [], maxlen=n - 1))
        self.length = prompt_ids.shape[1]
        self.exempt: set[int] = set()  # never banned: tokens a constraint gives rather than the model draws

    def push(self, tokens: list[int]) -> None:
        """Append one token per row."""
        full = self.length >= self.n - 1  # the tail holds a whole (n-1)-gram
        for table, tail, t in zip(self.tables, self.tails, tokens):
            if full:
                table.setdefault(tuple(tail), set()).add(t)
            tail.append(t)
        self.length += 1

    def banned(self) -> tuple[list[int], list[int]]:
        """(rows, tokens) banned at the next step, ready for one index_put."""
        rows: list[int] = []
        toks: list[int] = []
        if self.length < self.n - 1:  # transformers: no ban while cur_len + 1 < n
            return rows, toks
        for r, (table, tail) in enumerate(zip(self.tables, self.tails)):
            ban = table.get(tuple(tail))
            if ban and self.exempt:
                ban = ban - self.exempt
            if ban:
                rows.extend([r] * len(ban))
                toks.extend(ban)
        return rows, toks

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Set banned logits (B, V) to -inf, in place."""
        rows, toks = self.banned()
        if rows:
            logits[rows, toks] = float("-inf")
        return logits


# ----------------------------------------------------------------------------------------------------
# Logits processors (transformers' order: temperature, then top-k, then top-p)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row (B,) from logits (B, V). temperature 0 (or None) = greedy argmax.

    With top-k the softmax and the draw run over the k best only (the rest would get probability 0
    anyway), which keeps the per-step cost independent of the vocabulary size after one topk.
    """
    if not temperature:
        return logits.argmax(dim=-1)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        vals, idx = logits.float().topk(top_k, dim=-1)  # sorted, best first
    else:
        vals, idx = logits.float(), None
    vals = vals / temperature
    if top_p is not None and top_p < 1.0:
        if idx is None:
            vals, idx = vals.sort(dim=-1, descending=True)
        probs = vals.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly better tokens
        vals = vals.masked_fill(mass_before >= top_p, float("-inf"))  # the best token always stays
    probs = vals.softmax(dim=-1)
    choice = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return choice if idx is None else idx.gather(-1, choice[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# The loop


@torch.inference_mode()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = SAMPLING.temperature,
             top_k: int | None = SAMPLING.top_k, top_p: float | None = SAMPLING.top_p,
             no_repeat_ngram_size: int | None = SAMPLING.no_repeat_ngram_size,
             min_new_tokens: int = 0, eos_id: int | None = None, pad_id: int | None = None,
             seed: int | None = None, prefill_chunk: int | None = None, progress: bool = False,
             constraints: Sequence = (), precision: str = "fp32", compile: bool = False) -> torch.Tensor:
    """Continue `prompt_ids` (B, N) by up to `max_new_tokens` tokens; returns (B, N + new) LongTensor.

    Defaults are SamplingConfig's (temperature 0.7, top-k 12, no-repeat-6-gram). `model` is our
    Transformer or any module called as model(ids, cache=, start_pos=, last_only=) -> (B, N or 1, V) logits.
    - Rows run as one batch. A row that emits `eos_id` is finished: its later positions hold `pad_id`
      (or `eos_id` when pad_id is None), as transformers pads them. Generation stops when every row has
      finished or after max_new_tokens; `new` is the number of steps taken.
    - EOS is masked for the first `min_new_tokens` steps.
    - `seed` seeds a private torch.Generator: same seed, same weights, same output. seed=None draws fresh
      randomness.
    - The prompt is prefilled in chunks of `prefill_chunk` tokens (default: the sliding window), so a long
      prompt never builds an N x N attention mask.
    - `constraints`: objects that say which ids may come next (the token grammar, instrument and length
      controls). Each has `start(prompt_ids)`, `mask(logits)` (sets forbidden ids of (B, V) logits to
      -inf, in place) and `push(tokens)` (the ids just chosen, one per row). They apply after the n-gram
      ban and before temperature/top-k; where the n-gram ban leaves a row no allowed id, the ban yields.
      A constraint's `ngram_exempt` ids (optional) are never banned by it.
    - `precision`: "fp32" (exact), "fp16", "bf16" or "int8" weights and KV ring, among
      `midistral.model.available_precisions()`; the converted weights are built once per model.
    - `compile`: decode steps through the compiled static-shape step (midistral/model/static.py), built once
      per batch size and precision and cached on disk; where it cannot compile, a one-line note and eager.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be (B, N) with N >= 1, got shape {tuple(prompt_ids.shape)}")
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompt_ids.long(), max_new_tokens, temperature, top_k, top_p,
                         no_repeat_ngram_size, min_new_tokens, eos_id, pad_id, seed, prefill_chunk, progress,
                         list(constraints), precision, compile)
    finally:
        model.train(was_training)


def _prefill(runner, cache, prompt_ids, chunk, chooser=None):
    """Run the prompt through the model `chunk` positions at a time; the last position's logits. `chooser`
    (DecodeThreads) sets the thread count of each chunk and watches it as it watches decode steps."""
    for s in range(0, prompt_ids.shape[1], chunk):  # only the last chunk's last position matters
        start = chooser.next() if chooser is not None else None
        logits = runner(prompt_ids[:, s:s + chunk], cache=cache, start_pos=s, last_only=True)
        if chooser is not None:
            chooser.record(start)
    return logits[:, -1]


def _mask_logits(logits, banned_eos, constraints, ngram):
    """Mask in place what may not come next: EOS before min_new_tokens, the grammar/controls, repeats."""
    if banned_eos is not None:
        logits[:, banned_eos] = float("-inf")
    for c in constraints:
        c.mask(logits)
    allowed = logits.clone() if constraints and ngram is not None else None
    if ngram is not None:
        ngram.apply(logits)
        if allowed is not None:  # the ban yields where it would leave a row no allowed id
            dead = torch.isinf(logits).all(-1) & ~torch.isinf(allowed).all(-1)
            if bool(dead.any()):
                logits[dead] = allowed[dead]
    return logits


# Decode steps use every core while they get them, and one thread while another CPU-bound job takes cores: on a
# quiet machine the report's model steps faster on 2 cores (batch 1, compiled: 2.3-3.5 against 3.9-5.4 ms), but
# beside a competing job a step split over cores waits for a descheduled thread (16-300 ms a step at 2 threads
# against 5-7 ms at 1). Measured with bench/generate.py --busy (bench/RESULTS.md).
FIXED_THREADS: int | None = None  # set by benchmarks to compare thread counts


def _idle_cores() -> tuple[float, float] | None:
    """(idle, total) jiffies over all CPUs from /proc/stat (Linux), None elsewhere."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return float(fields[3] + fields[4]), float(sum(fields[:8]))


def _others_running(samples: int = 3) -> float | None:
    """How many threads of other processes are running right now (Linux: /proc/loadavg's running count less this
    process's own running threads), the least of a few reads 1 ms apart (the two files are not read at one
    instant: right after a parallel op one read may count a worker of ours that is just going to sleep); None
    elsewhere. Beside a 2-thread matmul job each read gives 1-3, on a quiet machine 0."""
    reads = []
    try:
        for i in range(samples):
            with open("/proc/loadavg", "rb") as f:
                total = int(f.read().split()[3].split(b"/")[0])
            own = 0
            for t in os.listdir("/proc/self/task"):
                try:
                    with open(f"/proc/self/task/{t}/stat", "rb") as f:
                        own += f.read().rsplit(b")", 1)[1].split()[0] == b"R"
                except OSError:  # the thread ended meanwhile
                    pass
            reads.append(total - own)
            if i + 1 < samples:
                time.sleep(0.001)
    except (OSError, ValueError, IndexError):
        return None
    return min(reads)


class DecodeThreads:
    """The thread count of decode steps, watched per window of WINDOW_S seconds (at least MIN_STEPS steps):
    - at several threads, the process's CPU time over wall time within the steps says whether it gets its cores
      (about 2.0 on an idle 2-core machine, 1.0-1.2 beside a matmul job): below `threads - 0.5`, the next steps
      run on one thread. Only the steps count: the masks and the draw between them run on one thread anyway;
    - at one thread, the machine's idle time (/proc/stat) says whether the other cores are free again: when at
      least all but a quarter of one of them idle, back to every thread. Without /proc/stat every PROBE_WINDOWS
      windows try every thread again (the first rule returns within a window if the cores are still taken).
      A return that fails its first window doubles the windows the next one waits (up to MAX_WAIT): /proc/stat
      may count CPUs this process may not use (a container's CPU quota), which would otherwise flip every window.
    A call starts where the last one ended if that was within CARRY_S, else on every thread; on one thread in
    either case if another process's thread is running as it starts (/proc/loadavg).
    Nothing is timed against anything else, so a quiet machine never runs a slower step to check."""

    WINDOW_S, MIN_STEPS, PROBE_WINDOWS, MAX_WAIT = 0.05, 2, 8, 64
    CARRY_S = 10.0  # a call starts where the last one ended, if that was this recent (a busy machine stays busy)
    _last: tuple[int, float, float] | None = None  # (most, current, when) of the last call

    def __init__(self, most: int, fixed: bool = False):
        self.most, self.fixed = max(1, int(most)), fixed  # fixed: benchmarks pin the count (FIXED_THREADS)
        self.current = self.most
        self.cpus = os.cpu_count() or 1
        self.windows_at_one, self.wait, self.returned, self.decided = 0, 1, False, False
        self._start()

    @classmethod
    def for_decode(cls) -> "DecodeThreads":
        chooser = cls(FIXED_THREADS or torch.get_num_threads(), fixed=FIXED_THREADS is not None)
        last = cls._last
        if chooser.fixed or chooser.most == 1:
            return chooser
        if last is not None and last[0] == chooser.most and time.monotonic() - last[2] < cls.CARRY_S:
            chooser.current = last[1]
        # A job holds a core now: start on one, even right after a call on every core (a compiled step on two
        # threads beside a 2-thread job took 17-50 ms against 1.8 idle, and the first window runs two of them).
        if chooser.current > 1 and (others := _others_running()) is not None and others >= 1:
            chooser.current = 1
        return chooser

    def close(self) -> None:
        """The call is over: the next one within CARRY_S starts at this call's last choice (if a window made one:
        a call too short for any keeps the last)."""
        if not self.fixed and self.decided:
            DecodeThreads._last = (self.most, self.current, time.monotonic())

    def _start(self) -> None:
        self.steps, self.step_wall, self.step_cpu = 0, 0.0, 0.0
        self.wall, self.stat = time.perf_counter(), _idle_cores()

    def next(self) -> tuple[float, float]:
        """Set the thread count of the coming step; returns its start (give it to `record` after the step)."""
        if torch.get_num_threads() != self.current:
            torch.set_num_threads(self.current)
        return time.perf_counter(), time.process_time()

    def record(self, start: tuple[float, float]) -> None:
        """After a step begun at `start`: at the end of a window, the rules above."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.steps += 1
        self.step_wall += wall - start[0]
        self.step_cpu += cpu - start[1]
        if self.fixed or self.most == 1 or self.steps < self.MIN_STEPS or wall - self.wall < self.WINDOW_S:
            return
        self.decided = True
        if self.current > 1:
            if self.step_cpu / max(self.step_wall, 1e-9) < self.current - 0.5:
                if self.returned:  # back too soon: wait longer before the next return
                    self.wait = min(2 * self.wait, self.MAX_WAIT)
                self.current, self.windows_at_one = 1, 0
            else:
                self.wait = 1
            self.returned = False
        else:
            self.windows_at_one += 1
            now = _idle_cores()
            if now is not None and self.stat is not None and now[1] > self.stat[1]:
                idle = (now[0] - self.stat[0]) / (now[1] - self.stat[1]) * self.cpus
                free = idle >= min(self.most, self.cpus) - 1 - 0.25
            else:
                free = self.windows_at_one >= self.PROBE_WINDOWS
            if free and self.windows_at_one >= self.wait:
                self.current, self.returned = self.most, True
        self._start()


def _generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, no_repeat_ngram_size,
              min_new_tokens, eos_id, pad_id, seed, prefill_chunk, progress, constraints, precision, compile):
    B, N = prompt_ids.shape
    device = prompt_ids.device
    out = torch.empty(B, N + max_new_tokens, dtype=torch.long, device=device)
    out[:, :N] = prompt_ids
    if max_new_tokens <= 0:
        return out[:, :N]
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,)).item()))

    runner = prepare_for_decode(model, precision)  # the model in `precision`, built once per model
    cache = RollingKVCache.for_model(runner, B)
    threads = torch.get_num_threads()
    chooser = DecodeThreads.for_decode()  # the prefill too: beside a busy job it is as slow on every core
    try:
        logits = _prefill(runner, cache, prompt_ids, prefill_chunk or cache.window, chooser)
        step_fn = StaticDecoder(runner, cache, device) if compile and hasattr(runner, "rope") else (
            lambda tok, pos: runner(tok, cache=cache, start_pos=pos)[:, -1])
        ngram = NoRepeatNGram(no_repeat_ngram_size, prompt_ids) if no_repeat_ngram_size else None
        if ngram is not None:  # e.g. the attribute tokens controls.attributes writes before every bar
            ngram.exempt = {int(i) for c in constraints for i in getattr(c, "ngram_exempt", ())}
        for c in constraints:
            c.start(prompt_ids)
        return _decode(out, logits, step_fn, ngram, constraints, N, max_new_tokens, min_new_tokens, temperature,
                       top_k, top_p, generator, eos_id, pad_id, progress, chooser)
    finally:
        chooser.close()
        torch.set_num_threads(threads)


def _decode(out, logits, step_fn, ngram, constraints, N, max_new_tokens, min_new_tokens, temperature,
            top_k, top_p, generator, eos_id, pad_id, progress, chooser):
    B, device = out.shape[0], out.device
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    fill = eos_id if pad_id is None else pad_id
    steps = range(max_new_tokens)
    if progress:
        steps = tqdm(steps, desc="generating", unit="tok", leave=False)
    n_new = 0
    for step in steps:
        logits = _mask_logits(logits.float(), eos_id if step < min_new_tokens else None, constraints, ngram)
        next_tok = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_tok = torch.where(finished, fill, next_tok)
            finished |= next_tok == eos_id
        out[:, N + step] = next_tok
        n_new = step + 1
        if ngram is not None:
            ngram.push(next_tok.tolist())
        for c in constraints:
            c.push(next_tok)
        if eos_id is not None and bool(finished.all()):
            break
        if step + 1 < max_new_tokens:
            start = chooser.next()
            logits = step_fn(next_tok[:, None], N + step)
            if step:  # not the first: it may be a compiled step's first call
                chooser.record(start)
    if progress:
        steps.close()
    return out[:, :N + n_new]


class ProgressReport:
    """A constraint that masks nothing: it calls on_progress(step, total) after every generated token."""

    def __init__(self, on_progress: Callable[[int, int], None], total: int):
        self.on_progress, self.total, self.step = on_progress, total, 0

    def start(self, prompt_ids) -> None:
        self.step = 0

    def mask(self, logits) -> None:
        pass

    def push(self, tokens) -> None:
        self.step += 1
        self.on_progress(self.step, self.total)
