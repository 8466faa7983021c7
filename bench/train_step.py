"""Where the fast training loop's speed comes from: one forward + backward of a batch of 16 card-like pairs, per variant.

    python bench/train_step.py                  # stand-in, CPU, 3 interleaved rounds, best and median seconds

Variants: the exact loop's padded model (fp32, bf16 autocast) and the fast loop's `Unpadded` forward (fp32, bf16),
each with dropout on; plus the cost per element of torch's dropout mask (`bernoulli_`) and of `drop_mask`.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from predict import bench_pairs  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: build the stand-in in a temp dir)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from minilm import CrossEncoder
    from minilm.unpadded import Unpadded, drop_mask, pack

    from standin import model_or_standin

    model_dir = model_or_standin(args.model)
    ce = CrossEncoder.from_pretrained(model_dir, device="cpu")
    encodings = ce.tokenizer.encode(bench_pairs(16, seed=1))
    lengths = [len(e.ids) for e in encodings]
    labels = torch.rand(16).round()
    model = ce.model.train()
    fast = Unpadded(model).train()
    padded = {k: torch.from_numpy(v) for k, v in ce.tokenizer.pad(encodings).items()}

    def step(unpadded: bool, bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = fast(pack(encodings, torch.device("cpu"))) if unpadded else model(**padded)
        F.binary_cross_entropy_with_logits(logits.float(), labels).backward()
        model.zero_grad(set_to_none=True)

    variants = {"padded fp32 (the exact loop)": (False, False), "padded bf16": (False, True),
                "unpadded fp32 (fast loop, --precision fp32)": (True, False), "unpadded bf16 (fast loop)": (True, True)}
    times = {name: [] for name in variants}
    for name, v in variants.items():  # warm-up
        step(*v)
    for _ in range(args.rounds):
        for name, v in variants.items():
            t = time.perf_counter()
            step(*v)
            times[name].append(time.perf_counter() - t)
    base = min(times["padded fp32 (the exact loop)"])
    print(f"16 pairs, {sum(lengths)} real tokens, padded to {max(lengths)} ({1 - sum(lengths) / 16 / max(lengths):.0%} "
          f"padding); {torch.get_num_threads()} threads; forward + backward, dropout on, {args.rounds} rounds\n")
    print("| variant | best s | median s | vs padded fp32 |\n|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {min(ts):.2f} | {statistics.median(ts):.2f} | {base / min(ts):.2f}x |")

    n = 50_000_000
    x = torch.empty(n)
    masks = {"torch bernoulli_ (F.dropout's mask)": lambda: x.bernoulli_(0.9), "minilm drop_mask": lambda: drop_mask((n,), 0.1, "cpu")}
    print("\n| dropout mask | ns per element |\n|---|---|")
    for name, fn in masks.items():
        fn()
        t = time.perf_counter()
        fn()
        print(f"| {name} | {(time.perf_counter() - t) / n * 1e9:.2f} |")


if __name__ == "__main__":
    main()
