"""Why tokenizing ahead in a thread (infer.TOKENIZE_AHEAD) can slow a GPU's scoring loop: a lead, measured on a CPU.

    python bench/tokenize_contention.py                       # the tokenizer's thread pool as it comes (one per core)
    RAYON_NUM_THREADS=1 python bench/tokenize_contention.py   # the tokenizer on one core

On a GPU the scoring loop is Python launching small kernels, one core's work. Printed: how much of tokenizing runs
inside the Rust tokenizer (which releases the GIL but by default runs a thread per core) rather than in Python, and
how much slower a loop of small torch ops on the main thread runs while another thread tokenizes.
"""

import argparse
import cProfile
import os
import pstats
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from predict import bench_pairs  # noqa: E402


def main():
    from minilm import CrossEncoder
    from standin import model_or_standin

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: build the stand-in in a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokenizer = CrossEncoder.from_pretrained(model_or_standin(args.model), device="cpu").tokenizer
    pairs = bench_pairs(4096)
    tokenizer.encode(pairs[:64])

    profiler = cProfile.Profile()
    profiler.enable()
    tokenizer.encode(pairs)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    total = sum(tt for _, _, tt, _, _ in stats.values())
    rust = sum(tt for (_, _, name), (_, _, tt, _, _) in stats.items() if "encode_batch" in name)
    print(f"tokenizing {len(pairs)} card-like pairs: {total:.2f} s, of which {rust:.2f} s ({rust / total:.0%}) in the "
          "Rust tokenizer's encode_batch")

    x = torch.zeros(8)

    def small_ops(n=30_000):
        start = time.perf_counter()
        for _ in range(n):
            x.add_(1)
        return time.perf_counter() - start

    alone = min(small_ops() for _ in range(3))
    stop = threading.Event()
    worker = threading.Thread(target=lambda: [tokenizer.encode(pairs) for _ in iter(stop.is_set, True)])
    worker.start()
    time.sleep(0.2)
    beside = min(small_ops() for _ in range(3))
    stop.set()
    worker.join()
    print(f"RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs: 30,000 small "
          f"torch ops alone {alone:.3f} s, beside a thread tokenizing {beside:.3f} s ({beside / alone:.2f}x)")


if __name__ == "__main__":
    main()
