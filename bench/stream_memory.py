"""Does `infer.py` stream? Peak memory while scoring files of growing size, sampled from the outside.

    python bench/stream_memory.py                                   # 2,000 / 20,000 / 100,000 pairs, max_length 48
    python bench/stream_memory.py --pairs 1000,10000 --max-length 512 --model runs/ft

Each file repeats TyDi-ru test rows (with the row number appended to the query, so no two pairs are equal) and is scored
by `python infer.py --input FILE --output OUT --quiet` in a fresh process. The process's resident memory is sampled
every 0.1 s; the table gives the peak over the whole run, the peak over its last half, and pairs/s. A file mode that
streams has the same peak for every size; one that holds the file grows with it. A short --max-length keeps a
100,000-pair run to minutes on a CPU; it changes the batch, not what is being measured.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
TEST = REPO.parent / "shared" / "data" / "tydiqa_ru" / "test.jsonl"


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None  # the process has just exited
    return None


def write_pairs(path: Path, n: int) -> None:
    rows = [json.loads(line) for line in TEST.read_text(encoding="utf-8").splitlines()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = rows[i % len(rows)]
            f.write(json.dumps({"id": i, "query": f"{row['query']} {i}", "passage": row["passage"]}, ensure_ascii=False) + "\n")


def measure(model: str, n: int, max_length: int, dtype: str, workdir: Path) -> dict:
    pairs, out = workdir / f"pairs-{n}.jsonl", workdir / f"scores-{n}.jsonl"
    write_pairs(pairs, n)
    cmd = [sys.executable, str(REPO / "infer.py"), "--model", model, "--input", str(pairs), "--output", str(out),
           "--max-length", str(max_length), "--dtype", dtype, "--device", "cpu", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    samples = []  # (seconds since start, RSS MiB)
    while proc.poll() is None:
        rss = rss_mib(proc.pid)
        if rss is not None:
            samples.append((time.perf_counter() - start, rss))
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"infer.py exited {proc.returncode} on {n} pairs")
    if sum(1 for _ in open(out, encoding="utf-8")) != n:
        raise SystemExit(f"{out}: expected {n} scored rows")
    half = seconds / 2
    return {"pairs": n, "seconds": seconds, "peak": max(r for _, r in samples),
            "peak_last_half": max(r for t, r in samples if t >= half)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: build the stand-in in a temp dir)")
    ap.add_argument("--pairs", default="2000,20000,100000", help="comma-separated file sizes")
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        from standin import model_or_standin

        model = model_or_standin(args.model, workdir)
        print(f"infer.py file mode, {args.dtype}, max_length {args.max_length}, model {args.model or 'stand-in'}\n")
        print("| pairs | peak RSS (MiB) | peak RSS, last half of the run (MiB) | pairs/s (incl. start-up) |")
        print("|---|---|---|---|")
        for n in (int(x) for x in args.pairs.split(",")):
            r = measure(model, n, args.max_length, args.dtype, workdir)
            print(f"| {n:,} | {r['peak']:.0f} | {r['peak_last_half']:.0f} | {n / r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
