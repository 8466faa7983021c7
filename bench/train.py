"""Training speed: minilm's train.py vs the sentence-transformers 5.1.0 CrossEncoderTrainer, same data and settings.

    python bench/train.py                         # stand-in checkpoint, 20 steps of batch 16, CPU fp32
    python bench/train.py --steps 200 --device cuda --precision fp16 --model DIR

Both runs start from the same checkpoint, see the same labelled pairs (TyDi-ru train rows cut to the model card's
length statistics, as in bench/predict.py) and use the card's recipe (BCE, batch 16, lr 5e-5, linear decay, AdamW
`adamw_torch`, max grad norm 1.0, seed 42). Steps/s are each loop's own count (setup and saving excluded);
the per-step losses of the two runs are compared too (on CPU in fp32 they are identical).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from predict import DATA, bench_pairs  # noqa: E402


def labelled_pairs(n: int) -> list[dict]:
    labels = {}
    for line in DATA.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        labels[row["query"].strip(), " ".join(row["passage"].split())[:40]] = row["label"]
    return [{"query": q, "passage": p, "label": float(labels[q, p[:40]])} for q, p in bench_pairs(n)]


def run_minilm(model, train_file, steps, precision, device, out) -> dict:
    cmd = [sys.executable, str(REPO / "train.py"), "--model", model, "--train", str(train_file), "--output", str(out),
           "--max-steps", str(steps), "--log-every", "1", "--precision", precision, "--device", device]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {"steps_per_s": next(r["train_steps_per_second"] for r in records if "train_steps_per_second" in r),
            "losses": [r["loss"] for r in records if "loss" in r]}


def run_st(model, rows, steps, precision, device, out) -> dict:
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import TrainerCallback

    losses, times = [], []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not times:
                times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

        def on_train_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    ce = CrossEncoder(model, device=device)
    data = Dataset.from_dict({"sentence_0": [r["query"] for r in rows], "sentence_1": [r["passage"] for r in rows],
                              "label": [r["label"] for r in rows]})
    args = CrossEncoderTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=16, learning_rate=5e-5, max_steps=steps, seed=42,
        fp16=precision == "fp16", bf16=precision == "bf16", optim="adamw_torch", logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=device == "cpu", disable_tqdm=True)
    trainer = CrossEncoderTrainer(model=ce, args=args, train_dataset=data, loss=BinaryCrossEntropyLoss(ce), callbacks=[Record()])
    trainer.train()
    return {"steps_per_s": steps / (times[-1] - times[0]), "losses": losses}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: build the stand-in in a temp dir)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = args.model
    if model is None:
        from standin import build_standin

        model = str(build_standin(tmp / "standin"))
    rows = labelled_pairs(args.pairs)
    train_file = tmp / "train.jsonl"
    train_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    results = {"minilm train.py": run_minilm(model, train_file, args.steps, args.precision, args.device, tmp / "minilm")}
    try:
        results["sentence-transformers trainer"] = run_st(model, rows, args.steps, args.precision, args.device, tmp / "st")
    except ImportError as e:
        print(f"sentence-transformers trainer skipped ({e})")
    base = results.get("sentence-transformers trainer", {}).get("steps_per_s")
    print(f"\n{args.steps} steps, batch 16, {args.precision} on {args.device}\n")
    print("| system | steps/s | vs sentence-transformers |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['steps_per_s']:.3f} | {r['steps_per_s'] / base:.2f} |" if base else f"| {name} | {r['steps_per_s']:.3f} | - |")
    if base:
        ours, ref = results["minilm train.py"]["losses"], results["sentence-transformers trainer"]["losses"]
        diffs = [abs(a - b) for a, b in zip(ours, ref)]  # ST logs losses rounded to 4 decimals
        print(f"\nper-step losses: max |diff| {max(diffs):.1e} over {len(diffs)} steps (the trainer logs 4 decimals)")


if __name__ == "__main__":
    main()
