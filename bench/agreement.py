"""Do the fast dtypes rank like fp32? Top-1 agreement per query and Spearman correlation, on TyDi-ru test.

    python bench/agreement.py --model DIR                  # bf16 and int8 against fp32, all 4,340 test pairs
    python bench/agreement.py --model DIR --queries 50     # the first 50 queries only
    python bench/agreement.py --model DIR --device cuda    # fp16 and bf16 against fp32 on a GPU

For every query (20 candidates each) the passage ranked first in fp32 is compared with the one ranked first by the
reduced-precision model; Spearman's rho is computed over all pair scores. Also prints each dtype's pairs/s on this
data, its MRR@10, its max |score - fp32|, and, over the queries whose top passage changed, the largest fp32 score gap
between the passage fp32 put first and the one the reduced-precision model put first (how close a call each was).
Runs on minilm alone (no reference library needed).

The fp32 MRR@10 comes first: agreement is only informative for a model whose scores separate passages (one that scores
every pair alike "agrees" or not by the toss of rounding noise). No real reranker checkpoint is reachable here;
docs/performance.md's figures use the stand-in with its last layer and head trained on TyDi-ru train (why: bench/tydi_ranker.py):
    python bench/tydi_ranker.py --model runs/standin --output runs/tydi-ranker     # ~8 min on 2 cores
    python bench/agreement.py --model runs/tydi-ranker                            # ~13 min
(runs/standin: bench/tydi_run.sh.)
"""

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TEST = Path(os.environ.get("MINILM_TYDI", REPO.parent / "shared" / "data" / "tydiqa_ru")) / "test.jsonl"  # gpu.sh: a copy


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory or name")
    ap.add_argument("--queries", type=int, help="only the first N queries")
    ap.add_argument("--dtypes", help="reduced precisions compared with fp32 (default: bf16,int8 on a CPU, fp16,bf16 on a GPU)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    args.dtypes = args.dtypes or ("fp16,bf16" if args.device.startswith("cuda") else "bf16,int8")

    from minilm import CrossEncoder
    from minilm.metrics import rerank_metrics

    rows = [json.loads(line) for line in TEST.read_text(encoding="utf-8").splitlines()]
    groups = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row["qid"]].append(i)
    qids = list(groups)[: args.queries]
    keep = [i for q in qids for i in groups[q]]
    pairs = [(rows[i]["query"], rows[i]["passage"]) for i in keep]
    position = {i: k for k, i in enumerate(keep)}
    qid_of, labels = [rows[i]["qid"] for i in keep], [rows[i]["label"] for i in keep]

    def mrr(scores):
        return rerank_metrics(qid_of, labels, scores)["mrr@10"]

    def score(dtype):
        ce = CrossEncoder.from_pretrained(args.model, device=args.device, dtype=dtype)
        # warm-up: kernel selection, the GPU's libraries loading; on a GPU every batch shape once, since fp16/bf16
        # attention may go to cuDNN, which plans each new shape on the host (tens of ms)
        ce.predict(pairs if ce.device.type == "cuda" else pairs[:8], batch_size=args.batch_size)
        t = time.perf_counter()
        scores = ce.predict(pairs, batch_size=args.batch_size)
        return scores, len(pairs) / (time.perf_counter() - t)

    reference, speed = score("fp32")
    top1 = {q: max(groups[q], key=lambda i: reference[position[i]]) for q in qids}
    spread = np.mean([reference[[position[i] for i in groups[q]]].std() for q in qids])
    margin = np.median([np.subtract(*np.sort(reference[[position[i] for i in groups[q]]])[::-1][:2]) for q in qids])
    # a model that does not rank (scores all but equal) makes agreement meaningless: show how well fp32 ranks
    print(f"{len(qids)} queries, {len(pairs)} pairs; fp32 {speed:.1f} pairs/s, MRR@10 {mrr(reference):.4f}; fp32 "
          f"scores: mean std within a query {spread:.4f}, median gap between the first and second passage {margin:.4f}\n")
    print("| dtype | pairs/s | MRR@10 | same top-1 | Spearman vs fp32 | max abs diff | largest fp32 gap of a changed top-1 |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        try:
            scores, speed = score(dtype)
        except ValueError as e:
            print(f"| {dtype} | refused: {e} | | | | | |")
            continue
        picked = {q: max(groups[q], key=lambda i: scores[position[i]]) for q in qids}
        same = np.mean([picked[q] == top1[q] for q in qids])
        # for each query whose top passage changed: how far apart fp32 put the two passages
        gaps = [reference[position[top1[q]]] - reference[position[picked[q]]] for q in qids if picked[q] != top1[q]]
        largest_gap = f"{max(gaps):.1e}" if gaps else "-"
        print(f"| {dtype} | {speed:.1f} | {mrr(scores):.4f} | {same:.1%} | {spearman(reference, scores):.4f} | "
              f"{np.abs(scores - reference).max():.1e} | {largest_gap} |")


if __name__ == "__main__":
    main()
