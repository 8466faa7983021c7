"""Does memory grow with passage length? Peak RSS of `CrossEncoder.predict` on passages of growing length.

    python bench/long_passages.py                          # 1,024 x 1k, 1,024 x 100k, 1 x 30M characters, max_length 64
    python bench/long_passages.py --cases 1024x1000,1024x100000 --max-length 512 --model runs/ft

Each case runs in a fresh process that loads the model, builds ROWS passages of CHARS characters (the golden test texts
repeated, each row from another offset so no two are equal), scores them against one query and reports its peak
resident memory (ru_maxrss). The passages themselves take memory too (a Python str holds 1-4 bytes a character); that
is given beside the peak: the rest is what scoring costs. Truncation keeps max_length tokens of each pair, so a scorer
that tokenizes only what it keeps needs the same memory for every passage length.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
GOLDEN = REPO / "tests" / "reference" / "golden_predict.json"


def child(model: str, rows: int, chars: int, max_length: int) -> None:
    from minilm import CrossEncoder

    ce = CrossEncoder.from_pretrained(model, device="cpu", max_length=max_length)
    prose = " ".join(t for pair in json.loads(GOLDEN.read_text(encoding="utf-8"))["pairs"] for t in pair)
    prose = prose * (chars // len(prose) + 2)
    offsets = [i * 97 % (len(prose) - chars) for i in range(rows)]
    passages = [prose[o : o + chars] for o in offsets]
    text_mib = sum(sys.getsizeof(p) for p in passages) / 2**20
    start = time.perf_counter()
    ce.predict([("what is the longest river", p) for p in passages], batch_size=32)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak": peak_mib, "text": text_mib, "seconds": seconds}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: build the stand-in in a temp dir)")
    ap.add_argument("--cases", default="1024x1000,1024x100000,1x30000000", help="comma-separated ROWSxCHARS")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--child", nargs=2, type=int, metavar=("ROWS", "CHARS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.model, *args.child, args.max_length)

    with tempfile.TemporaryDirectory() as tmp:
        from standin import model_or_standin

        model = model_or_standin(args.model, tmp)
        print(f"`python bench/long_passages.py --cases {args.cases} --max-length {args.max_length}`, "
              f"model {args.model or 'stand-in'}, fp32 CPU\n")
        print("| rows x characters | peak RSS (MiB) | of which the passages (MiB) | predict seconds |")
        print("|---|---|---|---|")
        for case in args.cases.split(","):
            rows, chars = (int(x) for x in case.split("x"))
            out = subprocess.run([sys.executable, __file__, "--model", model, "--max-length", str(args.max_length),
                                  "--child", str(rows), str(chars)], check=True, capture_output=True, text=True).stdout
            r = json.loads(out.splitlines()[-1])
            print(f"| {rows:,} x {chars:,} | {r['peak']:.0f} | {r['text']:.0f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
