"""Compare train.py runs from their log.jsonl: final evaluation, train loss, speed, and one SVG of their loss curves.

    python bench/compare_runs.py runs/tydi-exact runs/tydi-fast --svg docs/loss_tydi_exact_vs_fast.svg

Each run's last evaluation record is the one train.py writes after its final step (--eval FILE).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minilm.plot import line_chart_svg  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="train.py --output folders")
    ap.add_argument("--svg", help="write the loss curves here")
    args = ap.parse_args()
    series = {}
    print("| run | steps | train loss | eval MRR@10 | eval NDCG@10 | steps/s |")
    print("|---|---|---|---|---|---|")
    for run in map(Path, args.runs):
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        losses = [r for r in log if "loss" in r]
        summary = next(r for r in log if "train_loss" in r)
        final = [r for r in log if "eval_mrr@10" in r][-1]
        print(f"| {run.name} | {summary['step']} | {summary['train_loss']:.4f} | {final['eval_mrr@10']:.4f} | "
              f"{final['eval_ndcg@10']:.4f} | {summary['train_steps_per_second']:.3f} |")
        series[run.name] = ([r["step"] for r in losses], [r["loss"] for r in losses])
    if args.svg:
        Path(args.svg).write_text(line_chart_svg(series, "training loss (mean per log interval)", "step", "BCE loss"),
                                  encoding="utf-8")


if __name__ == "__main__":
    main()
