"""infer.py's file mode: the next chunk tokenized in a worker thread while this one is scored (infer.TOKENIZE_AHEAD)
against tokenizing each chunk in line before scoring it (the default: the thread lost on an H100, docs/performance.md).
Same file, same loaded model, interleaved rounds.

    python bench/infer_file.py                                          # CPU, bf16, 2,048 card-like pairs
    python bench/infer_file.py --device cuda --dtype fp16 --pairs 32768 --batch-size 128

Each round runs `infer.main` on a JSONL file of card-like pairs (bench/predict.py's) into a temporary output, with
the model loaded once beforehand, so a round's time is reading, tokenizing, scoring and writing the file. It also
prints how long tokenizing alone takes (one thread calling the tokenizer as infer.py does, chunk by chunk): the most
that tokenizing ahead can hide. The two ways must write the same bytes; the script stops if they do not.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

import infer  # noqa: E402
from predict import bench_pairs, scoring_parser  # noqa: E402


def main():
    ap = scoring_parser(__doc__, pairs=2048)
    ap.add_argument("--dtype", default="bf16", choices=infer.DTYPE_CHOICES)
    args = ap.parse_args()

    import torch

    from standin import model_or_standin

    tmp = Path(tempfile.mkdtemp())
    src = tmp / "pairs.jsonl"
    pairs = bench_pairs(args.pairs)
    src.write_text("".join(json.dumps({"query": q, "passage": p}, ensure_ascii=False) + "\n" for q, p in pairs),
                   encoding="utf-8")
    argv = ["--input", str(src), "--model", str(model_or_standin(args.model, tmp)), "--device", args.device,
            "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--quiet"]
    model = infer.load_model(infer.build_parser().parse_args(argv))
    infer.load_model = lambda _: model  # loaded once, outside the timed rounds

    t = time.perf_counter()
    for start in range(0, len(pairs), infer.CHUNK_ROWS):
        model.tokenizer.encode(pairs[start : start + infer.CHUNK_ROWS])
    tokenize_s = time.perf_counter() - t
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{len(pairs)} pairs, {args.dtype}, batch {args.batch_size}, chunks of {infer.CHUNK_ROWS} rows, {device}; "
          f"tokenizing alone: {tokenize_s:.2f} s ({len(pairs) / tokenize_s:.0f} pairs/s)")

    ways = {"tokenize ahead": True, "tokenize in line": False}
    best, outputs = dict.fromkeys(ways, float("inf")), {}
    infer.main(argv + ["--output", str(tmp / "warm-up.jsonl")])
    for _ in range(args.rounds):
        for name, ahead in ways.items():
            infer.TOKENIZE_AHEAD = ahead
            out = tmp / f"{ahead}.jsonl"
            t = time.perf_counter()
            assert infer.main(argv + ["--output", str(out)]) == 0
            best[name] = min(best[name], time.perf_counter() - t)
            outputs[name] = out.read_bytes()
    if len(set(outputs.values())) != 1:
        sys.exit("the two ways wrote different outputs")
    base = best["tokenize in line"]
    print("\n| infer.py file mode | pairs/s (best round) | vs in line |\n|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {len(pairs) / seconds:.1f} | {base / seconds:.2f} |")


if __name__ == "__main__":
    main()
