"""Cold start: wall time and peak RSS of a fresh process that scores one pair.

    python bench/cold_start.py                 # stand-in checkpoint, 5 runs each, median wall time
    python bench/cold_start.py --model DIR --runs 10

Rows: `python infer.py --model DIR QUERY PASSAGE`; the same pair through sentence-transformers 5.1.0 (when installed);
and the floor, a process that only imports torch, tokenizers and safetensors. Each run is a new interpreter, so the
numbers include Python start-up, imports, loading the checkpoint and the first forward pass.
"""

import argparse
import importlib.util
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUERY = "Когда появился термин правовое государство?"
PASSAGE = "Правовое государство — понятие, введённое в научный оборот немецкими юристами в начале XIX века."

ST_SCRIPT = """
import sys
from sentence_transformers import CrossEncoder
print(CrossEncoder(sys.argv[1], device="cpu").predict([(sys.argv[2], sys.argv[3])]))
"""
IMPORTS_ONLY = "import torch, tokenizers, safetensors.torch"


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process, via a wrapper so each child's maxrss is its own."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "w = time.perf_counter() - t\n"
        "print(r.returncode, w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "0":
        raise RuntimeError(f"{' '.join(cmd)} exited with {out[0]}")
    return float(out[1]), float(out[2])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: build the stand-in in a temp dir)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from standin import model_or_standin

    model = model_or_standin(args.model)

    rows = {
        "minilm infer.py": [sys.executable, str(REPO / "infer.py"), "--model", model, "--quiet", QUERY, PASSAGE],
        "imports only (torch, tokenizers, safetensors)": [sys.executable, "-c", IMPORTS_ONLY],
    }
    if importlib.util.find_spec("sentence_transformers"):
        rows["sentence-transformers 5.1.0"] = [sys.executable, "-c", ST_SCRIPT, model, QUERY, PASSAGE]
    else:
        print("sentence-transformers not installed: its row is skipped")

    results = {name: [] for name in rows}
    for _ in range(args.runs):  # interleaved, so slow phases of the machine hit every row
        for name, cmd in rows.items():
            results[name].append(measure(cmd))
    print(f"\n{args.runs} runs each, median wall time, max peak RSS\n")
    print("| process | wall s | peak RSS MiB |")
    print("|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {statistics.median(w for w, _ in runs):.2f} | {max(m for _, m in runs):.0f} |")


if __name__ == "__main__":
    main()
