"""Same loss curve as the peer: transformers' MistralForCausalLM and ours, same initial weights, same
batches (chunks of the first 12 `lmd__*.mid` files of a folder of MIDI files), same AdamW and schedule, 50 steps.

    python bench/train_curve.py [--steps 50] [--dir PATH (default: tests/data/dev)]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import MistralConfig, MistralForCausalLM

from midistral.checkpoint import load_model
from midistral.tokenize import REMI


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "dev"),
                    help="a folder of MIDI files (the lmd__*.mid ones are read)")
    args = ap.parse_args()
    tok = REMI()
    dev = Path(args.dir)
    ids = np.concatenate([tok.encode(f) for f in sorted(dev.glob("lmd__*.mid"))[:12]])
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(ids) - args.seq - 1, (args.steps, args.batch))
    cfg = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, sliding_window=64, max_position_embeddings=1024, tie_word_embeddings=False,
               pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(**cfg, attn_implementation="sdpa"))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d)
    curves, speed = {}, {}
    for name, model in (("transformers", hf), ("midistral", ours)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
        losses = []
        t = time.perf_counter()
        for s in range(args.steps):
            batch = torch.from_numpy(np.stack([ids[a:a + args.seq + 1] for a in starts[s]])).long()
            x, y = batch[:, :-1], batch[:, 1:]
            if name == "transformers":
                logits = model(x).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            else:
                _, loss = model(x, y)
            loss.backward()
            opt.step(), sched.step(), opt.zero_grad()
            losses.append(loss.item())
        speed[name] = args.steps / (time.perf_counter() - t)
        curves[name] = losses
    a, b = np.array(curves["transformers"]), np.array(curves["midistral"])
    for s in list(range(0, args.steps, 5)) + [args.steps - 1]:
        print(f"step {s + 1:3d}  transformers {a[s]:.5f}  midistral {b[s]:.5f}  diff {abs(a[s] - b[s]):.2e}")
    print(f"max |diff| steps 1-10: {np.abs(a - b)[:10].max():.2e}; all steps: {np.abs(a - b).max():.2e}")
    print(f"steps/s: transformers {speed['transformers']:.2f}, midistral {speed['midistral']:.2f} "
          f"(x{speed['midistral'] / speed['transformers']:.2f})")


if __name__ == "__main__":
    main()
