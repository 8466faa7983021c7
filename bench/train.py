"""Training speed: train.py's fast loop, its exact loop and the sentence-transformers 5.1.0 CrossEncoderTrainer, side by
side on the same data, settings and machine.

    python bench/train.py                                   # CPU: stand-in, 16 steps of batch 16, 4 warm-up steps
    python bench/train.py --device cuda --steps 2000 --log-every 500 --model DIR     # GPU, fp16 (bench/gpu.sh)

Every run starts from the same checkpoint and sees the same labelled pairs (TyDi-ru train rows cut to the model card's
length profile, as in bench/predict.py) with the card's recipe (BCE, batch 16, lr 5e-5, linear decay, AdamW, max grad
norm 1.0, seed 42). Speed is taken after the first --log-every steps (warm-up: allocator, oneDNN kernel choice, CUDA
context): train.py's log.jsonl gives tokens/s per interval, the trainer is timed by a callback from the same step on.
Each system's own precision default is used unless --precision says otherwise (fast loop: bf16 on CPUs with native
bf16, fp16 on CUDA; exact loop and trainer: fp32 on CPUs, fp16 on CUDA). Printed: steps/s, real tokens/s, the ratio to
the exact loop and to the trainer, the projected time of the card's 23,310 steps, and per interval the mean loss
and the last step's lr and gradient norm.
"""

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from predict import DATA, bench_pairs  # noqa: E402

CARD_STEPS = 23310  # 30 epochs of 12,431 pairs in batches of 16


def labelled_pairs(n: int) -> list[dict]:
    labels = {}
    for line in DATA.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        labels[row["query"].strip(), " ".join(row["passage"].split())[:40]] = row["label"]
    return [{"query": q, "passage": p, "label": float(labels[q, p[:40]])} for q, p in bench_pairs(n)]


# train.py run as it is, except (argv[1], argv[2]): its dropout masks drawn from seed 42 + OFFSET (train.py seeds the
# global generators once, with torch.manual_seed; the epoch orders come from generators of their own, so the batches
# stay those of seed 42), and with ATTENTION "math" its CUDA graphs' attention held to SDPA's math path
# (minilm.cuda_graphs.ATTENTION)
VARIANT = ("import runpy, sys, torch; from torch.nn.attention import SDPBackend; import minilm.cuda_graphs as graphs; "
           "offset, attention = int(sys.argv[1]), sys.argv[2]; seed = torch.manual_seed; "
           "torch.manual_seed = lambda s: seed(s + offset); "
           "graphs.ATTENTION = [SDPBackend.MATH] if attention == 'math' else graphs.ATTENTION; "
           "sys.argv = sys.argv[3:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run_minilm(model, train_file, args, exact: bool, out: Path, *extra, masks=0, attention="default") -> dict:
    cmd = [sys.executable, "-c", VARIANT, str(masks), attention, str(REPO / "train.py"), "--model", model, "--train",
           str(train_file), "--output", str(out), "--max-steps", str(args.steps), "--log-every", str(args.log_every),
           "--device", args.device, "--exact", str(exact).lower(), "--max-length", str(args.max_length), *extra]
    if args.precision:
        cmd += ["--precision", args.precision]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    intervals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    intervals = [r for r in intervals if "loss" in r]
    timed = intervals[1:]  # after warm-up
    seconds = sum(r["seconds"] for r in timed)
    return {"steps_per_s": (intervals[-1]["step"] - intervals[0]["step"]) / seconds,
            "tokens_per_s": sum(r["tokens_per_s"] * r["seconds"] for r in timed) / seconds,
            "losses": [r["loss"] for r in intervals], "lrs": [r["lr"] for r in intervals],
            "grad_norms": [r["grad_norm"] for r in intervals]}


def token_lengths(model, rows, max_length: int) -> list[int]:
    """Tokens of each row's pair, truncated at max_length."""
    from minilm import CrossEncoder

    tokenizer = CrossEncoder(model, device="cpu", max_length=max_length).tokenizer
    return [len(e.ids) for e in tokenizer.encode([(r["query"], r["passage"]) for r in rows])]


def train_py_batches(n: int, steps: int) -> list[list[int]]:
    """The rows of train.py's first `steps` batches of 16: randperm(n, seed 42 + epoch) order."""
    import torch

    per_epoch, batches = -(-n // 16), []
    for epoch in range(-(-steps // per_epoch)):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(42 + epoch)).tolist()
        batches += [order[b * 16 : (b + 1) * 16] for b in range(per_epoch)]
    return batches[:steps]


def run_st(model, rows, args, out: Path, attention=None) -> dict:
    """The trainer; attention="efficient": its SDPA calls held to the memory-efficient kernel (on a GPU the default
    may be cuDNN's), the one train.py's CUDA graphs use, to tell a kernel's effect from the loop's."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import TrainerCallback

    losses, lrs, grad_norms, marks = [], [], [], {}

    class Record(TrainerCallback):
        def on_step_end(self, args_, state, control, **kw):
            if state.global_step in (args.log_every, args.steps):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])
                lrs.append(logs.get("learning_rate"))
                grad_norms.append(logs.get("grad_norm"))

    ce = CrossEncoder(model, device=args.device, max_length=args.max_length)
    data = Dataset.from_dict({"sentence_0": [r["query"] for r in rows], "sentence_1": [r["passage"] for r in rows],
                              "label": [r["label"] for r in rows]})
    precision = args.precision or ("fp16" if args.device.startswith("cuda") else "fp32")
    targs = CrossEncoderTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=16, learning_rate=5e-5, max_steps=args.steps, seed=42,
        fp16=precision == "fp16", bf16=precision == "bf16", optim="adamw_torch", logging_steps=args.log_every,
        save_strategy="no", report_to="none", use_cpu=args.device == "cpu", disable_tqdm=True)
    trainer = CrossEncoderTrainer(model=ce, args=targs, train_dataset=data, loss=BinaryCrossEntropyLoss(ce), callbacks=[Record()])
    # the rows of every batch the trainer takes (its sampler, not an assumption: sentence-transformers and accelerate
    # versions differ), to count its real tokens and to check that they are train.py's batches
    batches, row_of = [], {(r["query"], r["passage"]): i for i, r in enumerate(rows)}

    class Recording:  # the trainer's collator, noting each batch's rows
        def __init__(self, collate):
            self.collate = collate

        def __getattr__(self, name):  # its settings, e.g. valid_label_columns
            return getattr(self.collate, name)

        def __call__(self, examples):
            batches.append([row_of[e["sentence_0"], e["sentence_1"]] for e in examples])
            return self.collate(examples)

    trainer.data_collator = Recording(trainer.data_collator)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION) if attention == "efficient" else nullcontext():
        trainer.train()
    seconds = marks[args.steps] - marks[args.log_every]
    lengths, ours = token_lengths(model, rows, args.max_length), train_py_batches(len(rows), args.steps)
    differ = next((step for step, (a, b) in enumerate(zip(batches, ours), 1) if a != b), None)
    if differ or len(batches) < args.steps:
        print(f"trainer: its batches are not train.py's (first difference at step {differ or len(batches) + 1}): its "
              "losses are not comparable step for step", flush=True)
    tokens = sum(lengths[i] for batch in batches[args.log_every : args.steps] for i in batch)
    return {"steps_per_s": (args.steps - args.log_every) / seconds, "tokens_per_s": tokens / seconds, "losses": losses,
            "lrs": lrs, "grad_norms": grad_norms, "same_batches": differ is None and len(batches) >= args.steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: build the stand-in in a temp dir)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=4, help="interval of the loss means; the first one is warm-up")
    ap.add_argument("--pairs", type=int, default=2048)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="default: each system's own")
    ap.add_argument("--only", default="fast,exact,trainer",
                    help="comma-separated subset of fast, fast-graphs (GPU only: --cuda-graphs true), fast-graphs-math "
                         "(their attention on SDPA's math path), exact, trainer, trainer-efficient (its attention held "
                         "to SDPA's memory-efficient kernel). NAME*K runs a train.py system K times, with the dropout "
                         "masks of seeds 42 to 42+K-1 and the batches of seed 42: how far losses move by dropout alone")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.steps % args.log_every or args.steps <= args.log_every:  # the trainer logs whole intervals only
        ap.error("--steps must be a multiple of --log-every, and more than one interval")
    tmp = Path(tempfile.mkdtemp())
    from standin import model_or_standin

    model = model_or_standin(args.model, tmp)
    rows = labelled_pairs(args.pairs)
    train_file = tmp / "train.jsonl"
    train_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    graphs = ("--cuda-graphs", "true")
    systems = {"fast": lambda m: run_minilm(model, train_file, args, False, tmp / f"fast{m}", "--cuda-graphs", "false",
                                            masks=m),
               "fast-graphs": lambda m: run_minilm(model, train_file, args, False, tmp / f"graphs{m}", *graphs, masks=m),
               "fast-graphs-math": lambda m: run_minilm(model, train_file, args, False, tmp / f"graphs-math{m}", *graphs,
                                                        masks=m, attention="math"),
               "exact": lambda m: run_minilm(model, train_file, args, True, tmp / f"exact{m}", masks=m),
               "trainer": lambda m: run_st(model, rows, args, tmp / "st"),
               "trainer-efficient": lambda m: run_st(model, rows, args, tmp / "st-efficient", attention="efficient")}
    runs = []  # (name as printed, system, mask seed offset)
    for item in args.only.split(","):
        system, star, times = item.partition("*")
        if system not in systems or any(s == system for _, s, _ in runs) or \
                (star and (not times.isdecimal() or int(times) < 1 or system.startswith("trainer"))):
            ap.error(f"--only: unknown or repeated system, or a bad repeat count: {item!r}")
        runs += [(system if m == 0 else f"{system} masks+{m}", system, m) for m in range(int(times or 1))]
    results, failed = {}, []

    def write_json():
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "failed": failed}, indent=2))

    def cut_off(signum, frame):
        raise CutOff

    signal.signal(signal.SIGTERM, cut_off)  # gpu.sh's timeout: the tables of the systems done so far still print
    for name, system, masks in runs:
        try:
            results[name] = systems[system](masks)
            # kept if a later system hangs past SIGTERM
            print(f"{name}: {results[name]['steps_per_s']:.3f} steps/s, losses", *(f"{x:.4f}" for x in results[name]["losses"]), flush=True)
            write_json()
        except ImportError as e:
            print(f"{name} skipped ({e})")
        except CutOff:
            print(f"{name}: cut off by SIGTERM; the systems done so far:")
            failed.append(name)
            break
        except Exception:  # one system failing (e.g. the trainer's datasets on the GPU image) keeps the others' numbers
            traceback.print_exc()
            print(f"{name} failed (traceback above)")
            failed.append(name)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(f"\n{args.steps} steps of batch 16 ({args.log_every} warm-up), {args.device}, card-like pairs, max_length {args.max_length}\n")
    print("| loop | steps/s | real tokens/s | vs exact | vs trainer | card's 23,310 steps |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        ratios = [f"{r['tokens_per_s'] / results[b]['tokens_per_s']:.2f}x" if b in results else "-" for b in ("exact", "trainer")]
        hours = CARD_STEPS / r["steps_per_s"] / 3600
        print(f"| {name} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:,.0f} | {ratios[0]} | {ratios[1]} | {hours:.1f} h |")
    print("\nmean loss per interval of", args.log_every, "steps; then the lr and gradient norm of each interval's last step:")
    for name, r in results.items():
        print(f"  {name:26s}", " ".join(f"{x:.4f}" for x in r["losses"]))
        print(f"  {'':26s}", " ".join("-" if x is None else f"{x:.3e}" for x in r["lrs"]), "|",
              " ".join("-" if x is None else f"{x:.3f}" for x in r["grad_norms"]))
    print_bands(runs, results)
    write_json()
    return 1 if failed else 0


class CutOff(BaseException):  # not an Exception: a system's own failure handling must not take it
    pass


def print_bands(runs, results) -> None:
    """For each system run with several dropout seeds: per interval the mean of its runs' losses and their spread, and
    how far every other run's loss lies from that mean (the trainer's: the issue's "within 5%")."""
    for system in dict.fromkeys(s for _, s, _ in runs):
        band = [results[name]["losses"] for name, s, _ in runs if s == system and name in results]
        if len(band) < 2 or len({len(b) for b in band}) > 1:
            continue
        means = [sum(col) / len(col) for col in zip(*band)]
        print(f"\n{system}, {len(band)} dropout seeds: mean loss per interval (min-max as % of the mean), and the other "
              "runs against that mean:")
        print(f"  {system:26s}", " ".join(f"{m:.4f} ({min(c) / m - 1:+.1%} {max(c) / m - 1:+.1%})"
                                          for m, c in zip(means, zip(*band))))
        of_system = {name: s for name, s, _ in runs}
        for name, r in results.items():
            if of_system[name] != system and len(r["losses"]) == len(means):
                print(f"  {name:26s}", " ".join(f"{x:.4f} ({x / m - 1:+.1%})" for x, m in zip(r["losses"], means)))


if __name__ == "__main__":
    sys.exit(main())
