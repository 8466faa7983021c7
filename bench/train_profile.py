"""Where a training step's time goes: train.py itself (fast loop by default) under torch.profiler.

    python bench/train_profile.py --device cuda --model DIR          # docs/performance.md: the H100 profile
    python bench/train_profile.py --steps 4 --exact true              # CPU, the exact loop

On a GPU the question is whether the device or the host sets the pace: at batch 16 a MiniLM-L6 step is a few hundred
small kernels, so if the device's kernel time per step is far under the wall time per step, the loop waits on Python
and kernel launches (then CUDA graphs or torch.compile would pay), not on arithmetic. Printed: wall and device time per
step, kernel launches per step, and the ops that take the most host and device time. The profiler adds host overhead
of its own, so its wall time per step is a ceiling; bench/train.py gives the unprofiled speed.
"""

import argparse
import importlib.util
import json
import runpy
import sys
import tempfile
from pathlib import Path

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: build the stand-in in a temp dir)")
    ap.add_argument("--steps", type=int, default=40,
                    help="steps timed, after as many warm-up steps (summarising 2 x 150 took over a minute on an H100 machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--exact", default="false")
    ap.add_argument("--cuda-graphs", default="false", help="true: profile the replays of --cuda-graphs true")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    from standin import model_or_standin

    spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench" / "train.py")  # not the repo's train.py
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    tmp = Path(tempfile.mkdtemp())
    model = model_or_standin(args.model, tmp)
    train_file = tmp / "train.jsonl"
    rows = bench_train.labelled_pairs(2048)
    train_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    # The profile covers the whole script (it cannot start mid-run): the wall time per step is the second log
    # interval's (after warm-up), the device time per step the mean over all steps, warm-up included.
    out = tmp / "run"
    sys.argv = ["train.py", "--model", model, "--train", str(train_file), "--output", str(out), "--device", args.device,
                "--max-steps", str(2 * args.steps), "--log-every", str(args.steps), "--exact", args.exact,
                "--cuda-graphs", args.cuda_graphs]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    wall = [r["seconds"] for r in log if "loss" in r][1] / args.steps

    events = prof.key_averages()
    steps = 2 * args.steps
    # device time: the GPU-side events only (kernels, copies, memsets), as the profiler's own table totals them, not
    # the GPU ranges of annotations such as Optimizer.step, which span other kernels
    on_device = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    device_total = sum(e.device_time_total for e in on_device) / 1e6  # seconds, the whole run
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"))
    print(f"train.py --exact {args.exact} --cuda-graphs {args.cuda_graphs} on {args.device}: {steps} steps profiled, "
          f"wall time from the last {args.steps}")
    print(f"wall per step (profiled, second half): {wall * 1e3:.2f} ms")
    if args.device.startswith("cuda"):
        busy = device_total / steps
        print(f"device time per step (mean over all steps; the final save's copies included): {busy * 1e3:.2f} ms "
              f"= {busy / wall:.0%} of the wall time; kernel launches per step: {launches / steps:.0f}")
        print(events.table(sort_by="self_device_time_total", row_limit=args.top))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
