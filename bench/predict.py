"""Scoring speed: minilm vs sentence-transformers 5.1.0, ONNX Runtime and transformers, same pairs, same weights.

    python bench/predict.py                    # the stand-in checkpoint, 256 pairs, batch 32, 3 interleaved rounds
    python bench/predict.py --model DIR --pairs 512 --rounds 5 --only minilm-fp32,minilm-bf16
    python bench/predict.py --device cuda --pairs 4096 --batch-size 128    # GPU: fp16/bf16 vs sentence-transformers fp16

Pairs follow the model card's length statistics (query ~41 chars; passage 88-1019 chars, mean ~369): TyDi-ru train
queries with their candidate passages cut at a word boundary to lengths drawn from a fixed-seed distribution. Every
system scores the same pairs, at most 32 to a batch: sentence-transformers in input order, the others on minilm's own
batches (longest first, at most `max_batch_tokens` padded tokens); rounds are interleaved so machine noise hits all
systems alike. The table gives pairs/s (best round), the ratio to sentence-transformers and max |score - minilm fp32|;
then the peak memory of the whole process, all systems together (RSS on the CPU, allocated GPU memory on a GPU).

On a GPU the systems are minilm fp32/fp16/bf16 and sentence-transformers in fp32 and in fp16 (its model loaded with
`dtype=float16`, the fair baseline for minilm's reduced-precision rows); ONNX Runtime and int8 are CPU-only.

Needs the reference extra (`pip install -e ".[reference]"`); systems whose library is missing are skipped.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # sentence-transformers would otherwise ask the Hub about a local folder
DATA = Path(os.environ.get("MINILM_TYDI", REPO.parent / "shared" / "data" / "tydiqa_ru")) / "train.jsonl"  # gpu.sh: a copy


def bench_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    rng = np.random.default_rng(seed)
    # lognormal passage lengths clipped to the card's range [88, 1019]; a median of 330 chars puts the mean near 369
    lengths = np.clip(rng.lognormal(np.log(330), 0.55, size=n), 88, 1019).astype(int)
    pairs = []
    rounds = -(-n // len(rows))  # more pairs than rows: each row again, in another order
    for i, length in zip(np.concatenate([rng.permutation(len(rows)) for _ in range(rounds)]), lengths):
        passage = " ".join(rows[i]["passage"].split())
        while len(passage) < length:  # a passage too short for its drawn length: take the next row instead
            i = (i + 1) % len(rows)
            passage = " ".join(rows[i]["passage"].split())
        cut = passage[: length + 1].rsplit(" ", 1)[0] if len(passage) > length else passage
        pairs.append((rows[i]["query"].strip(), cut))
    return pairs


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scoring_parser(doc: str, pairs: int) -> argparse.ArgumentParser:
    """The options of every scoring benchmark: --model, --pairs, --batch-size, --rounds, --device."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: build the stand-in in a temp dir)")
    ap.add_argument("--pairs", type=int, default=pairs, help=f"card-like pairs to score (default {pairs})")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best one counts (default 3)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    return ap


def main():
    ap = scoring_parser(__doc__, pairs=256)
    ap.add_argument("--only", help="comma-separated subset of systems")
    ap.add_argument("--svg", help="also draw the pairs/s as a bar chart into this file (docs/performance.md's picture)")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")

    from minilm import CrossEncoder

    from standin import model_or_standin

    model_dir = model_or_standin(args.model)
    pairs = bench_pairs(args.pairs)
    fp32 = CrossEncoder.from_pretrained(model_dir, device=args.device)
    lengths = [len(e.ids) for e in fp32.tokenizer.encode(pairs)]
    print(f"{len(pairs)} pairs: query {np.mean([len(q) for q, _ in pairs]):.0f} chars, passage "
          f"{np.mean([len(p) for _, p in pairs]):.0f} chars (min {min(len(p) for _, p in pairs)}, max "
          f"{max(len(p) for _, p in pairs)}), {np.mean(lengths):.0f} tokens per pair; batch {args.batch_size}; "
          f"torch {torch.__version__}, " + (torch.cuda.get_device_name(args.device) if gpu else
          f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"))

    systems = {}  # name -> callable(pairs) -> np.ndarray of scores
    systems["minilm-fp32"] = lambda p: fp32.predict(p, batch_size=args.batch_size)
    for dtype in ("fp16", "bf16") if gpu else ("bf16", "int8"):
        try:
            ce = CrossEncoder.from_pretrained(model_dir, device=args.device, dtype=dtype)
            systems[f"minilm-{dtype}"] = lambda p, ce=ce: ce.predict(p, batch_size=args.batch_size)
        except (ValueError, RuntimeError) as e:
            print(f"minilm-{dtype}: skipped ({e})")
    try:
        from sentence_transformers import CrossEncoder as STCrossEncoder

        st = STCrossEncoder(model_dir, device=args.device)
        systems["sentence-transformers"] = lambda p: st.predict(p, batch_size=args.batch_size)
        if gpu:
            st16 = STCrossEncoder(model_dir, device=args.device, model_kwargs={"dtype": torch.float16})
            systems["sentence-transformers-fp16"] = lambda p: st16.predict(p, batch_size=args.batch_size)
    except ImportError:
        print("sentence-transformers: not installed, skipped")
    try:
        systems["transformers-sorted"] = hf_sorted(model_dir, fp32, args.batch_size)
    except ImportError:
        print("transformers: not installed, skipped")
    if not gpu:
        try:
            systems["onnxruntime-sorted"] = onnx_sorted(fp32, args.batch_size)
        except ImportError as e:
            print(f"onnxruntime: not installed, skipped ({e})")
    if args.only:
        systems = {k: v for k, v in systems.items() if k in args.only.split(",")}

    for fn in systems.values():  # warm-up: first-call allocations, oneDNN kernel selection
        fn(pairs[:8])
    reference = fp32.predict(pairs, batch_size=args.batch_size)
    best = {k: float("inf") for k in systems}
    max_diff = {}
    for _ in range(args.rounds):
        for name, fn in systems.items():
            t = time.perf_counter()
            scores = fn(pairs)
            best[name] = min(best[name], time.perf_counter() - t)
            max_diff[name] = float(np.abs(np.asarray(scores, dtype=np.float64) - reference).max())
    base = best.get("sentence-transformers")
    base16 = best.get("sentence-transformers-fp16")
    print("\n| system | pairs/s | vs sentence-transformers | " + ("vs sentence-transformers fp16 | " if base16 else "")
          + "max abs diff vs minilm fp32 |")
    print("|---|---|---|---|" + ("---|" if base16 else ""))
    for name, seconds in best.items():
        ratios = [f"{b / seconds:.2f}" if b else "-" for b in ([base, base16] if base16 else [base])]
        print(f"| {name} | {len(pairs) / seconds:.1f} | {' | '.join(ratios)} | {max_diff[name]:.1e} |")
    if gpu:
        print(f"\npeak GPU memory allocated: {torch.cuda.max_memory_allocated(args.device) / 2**20:.0f} MiB")
    print(f"peak RSS of this process: {peak_rss_mib():.0f} MiB")
    if args.svg:
        device = torch.cuda.get_device_name(args.device) if gpu else f"CPU, {torch.get_num_threads()} threads"
        Path(args.svg).write_text(bar_chart_svg({name: len(pairs) / seconds for name, seconds in best.items()},
                                                f"pairs/s, {len(pairs)} card-like pairs, batch {args.batch_size}, {device}"))


def bar_chart_svg(values: dict, title: str, width: int = 640) -> str:
    """Horizontal bars, one per system, longest first, each labelled with its value."""
    rows = sorted(values.items(), key=lambda kv: -kv[1])
    left, bar, gap, top = 200, 22, 8, 36
    height = top + len(rows) * (bar + gap) + 12
    scale = (width - left - 70) / max(values.values())
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="13">{title}</text>']
    for i, (name, value) in enumerate(rows):
        y = top + i * (bar + gap)
        color = "#1f77b4" if name.startswith("minilm") else "#999"
        parts += [f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{name}</text>',
                  f'<rect x="{left}" y="{y}" width="{value * scale:.1f}" height="{bar}" fill="{color}"/>',
                  f'<text x="{left + value * scale + 6:.1f}" y="{y + 15}">{value:.1f}</text>']
    return "\n".join(parts + ["</svg>"]) + "\n"


def hf_sorted(model_dir, ours, batch_size):
    """transformers' BertForSequenceClassification fed minilm's batches."""
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(model_dir).eval().to(ours.device)

    def run(pairs):
        return sorted_batches(pairs, ours, batch_size,
                              lambda b: hf(**{k: torch.from_numpy(v).to(ours.device) for k, v in b.items()}).logits[:, 0])

    return run


def onnx_sorted(ours, batch_size):
    """ONNX Runtime (CPU, all graph optimisations) on a torch.onnx export of the same fp32 weights.

    Exported with minilm's fast inference path off, i.e. the standard BERT graph that exporting the transformers model
    gives (every layer computes every token), so the row measures ONNX Runtime, not minilm's [CLS]-only last layer."""
    import onnxruntime as ort

    path = Path(tempfile.mkdtemp()) / "model.onnx"
    ids = torch.ones(2, 16, dtype=torch.int64)
    mask = ids.clone()
    mask[1, 10:] = 0  # trace with padding so the exported graph keeps the attention mask
    ours.model.fast_inference = False
    torch.onnx.export(ours.model, (ids, mask, ids), str(path), input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["logits"], dynamic_axes={k: {0: "B", 1: "T"} for k in ("input_ids", "attention_mask", "token_type_ids")},
                      dynamo=False)
    ours.model.fast_inference = True
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(pairs):
        return sorted_batches(pairs, ours, batch_size, lambda b: torch.from_numpy(session.run(None, b)[0]))

    return run


@torch.inference_mode()
def sorted_batches(pairs, ours, batch_size, forward):
    """`forward` run on minilm's own batches (CrossEncoder.batches: longest first, capped in pairs and padded tokens),
    the logits copied off the device once at the end, as minilm does."""
    encodings = ours.tokenizer.encode(pairs)
    out = np.empty(len(pairs), dtype=np.float32)
    scored = [(idx, forward(ours.tokenizer.pad([encodings[i] for i in idx]))) for idx in ours.batches(encodings, batch_size)]
    for idx, logits in scored:
        out[idx] = logits.float().cpu().numpy().reshape(-1)
    return out


if __name__ == "__main__":
    main()
