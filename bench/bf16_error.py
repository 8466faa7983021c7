"""Where does bf16's scoring error come from? Round one thing at a time to bf16 and measure the logits against fp32.

    python bench/bf16_error.py --model runs/tydi-ranker --queries 20      # ~7 min on 2 cores

Every Linear of layers 1..N-1 (the ones bf16 scoring runs in bf16) is run in fp32 with its weights, its inputs or its
outputs rounded to bf16 (or all three, which is what a bf16 GEMM with fp32 accumulation does), for all of them at once,
then one Linear type at a time, then one layer at a time; the last row is the real bf16 path. Prints mean and max
|logit - fp32| on the first --queries TyDi-ru test queries (20 candidates each) and how many top-1s changed.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TEST = REPO.parent / "shared" / "data" / "tydiqa_ru" / "test.jsonl"


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


def rounding_linear(linear: torch.nn.Linear, what: str):
    """A forward for `linear` in fp32 that rounds its weights ("w"), inputs ("x") and/or outputs ("y") to bf16."""
    weight = bf16(linear.weight) if "w" in what else linear.weight

    def forward(x):
        y = F.linear(bf16(x) if "x" in what else x, weight, linear.bias)
        return bf16(y) if "y" in what else y

    return forward


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--queries", type=int, default=20)
    args = ap.parse_args()

    from minilm import CrossEncoder

    rows = [json.loads(line) for line in TEST.read_text(encoding="utf-8").splitlines()][: args.queries * 20]
    pairs = [(r["query"], r["passage"]) for r in rows]
    blocks = [{r["qid"] for r in rows[i : i + 20]} for i in range(0, len(rows), 20)]
    assert all(len(b) == 1 for b in blocks), "top-1 below reads each query's 20 candidates as 20 consecutive rows"
    ce = CrossEncoder.from_pretrained(args.model, device="cpu")
    reference = ce.predict(pairs)
    layers = ce.model.layers
    linears = [(name, m) for name, m in layers[:-1].named_modules() if isinstance(m, torch.nn.Linear)]  # "3.intermediate.dense"

    def report(label, scores):
        diff = np.abs(scores - reference)
        changed = (scores.reshape(-1, 20).argmax(1) != reference.reshape(-1, 20).argmax(1)).sum()
        print(f"| {label} | {diff.mean():.2e} | {diff.max():.2e} | {changed} |", flush=True)

    def rounded(label, chosen, what):
        """Score with the chosen Linears rounding `what` ("w" weights, "x" inputs, "y" outputs) to bf16."""
        originals = {}
        for name, m in linears:
            if chosen(name):
                originals[m] = m.forward
                m.forward = rounding_linear(m, what)
        try:
            report(label, ce.predict(pairs))
        finally:
            for m, forward in originals.items():
                m.forward = forward

    print(f"{len(pairs)} pairs, {args.queries} queries\n")
    print("| rounded to bf16 | mean abs diff | max abs diff | top-1 changed |")
    print("|---|---|---|---|")
    for what, label in [("w", "weights"), ("x", "inputs"), ("y", "outputs"), ("wxy", "all three")]:
        rounded(f"every Linear: {label}", lambda name: True, what)
    kinds = {"query": ".query", "key": ".key", "value": ".value", "attention output": "attention.output.dense",
             "FFN in": "intermediate.dense"}
    for kind, part in kinds.items():
        rounded(f"{kind} only: all three", lambda name, part=part: part in name, "wxy")
    rounded("FFN out only: all three", lambda name: name.endswith(".output.dense") and "attention" not in name, "wxy")
    for i in range(len(layers) - 1):
        rounded(f"layer {i + 1} only: all three", lambda name, i=i: name.startswith(f"{i}."), "wxy")
    report("the real bf16 path", CrossEncoder.from_pretrained(args.model, device="cpu", dtype="bf16").predict(pairs))


if __name__ == "__main__":
    main()
