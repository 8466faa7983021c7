"""train.py with --cuda-graphs true on a CPU, as tests/test_fast_train.py starts it: the CUDA calls of
minilm/cuda_graphs.py are stood in for, so that the rest of it runs for real (length buckets, static inputs, one graph
per shape, the warm-up step before each capture and the undoing of it, RNG and GradScaler states included) together
with train.py's step as a function of lasting tensors. A "capture" here runs the real warm-up and records the step; a
"replay" runs the step's Python again on the static inputs, so what a real capture would freeze (an effect of the
Python only at capture time) cannot show here: the capture itself and replays on a GPU are tests/test_cuda.py's. fp16
is allowed on the CPU (as in tests/sync_launch.py), for the GradScaler's path. The shapes captured are the last line
on stderr."""

import atexit
import contextlib
import runpy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import minilm.precision  # noqa: E402
from minilm import cuda_graphs  # noqa: E402


class NoStream:
    def wait_stream(self, other):
        pass


class Replay:
    def __init__(self, step):
        self.replay = step


def capture(self, inputs, labels):
    self.warm_up(inputs, labels)
    captured.append(tuple(inputs.shape[1:]))
    return Replay(lambda: self.run_step(inputs, labels))


captured = []
fork_rng = torch.random.fork_rng
torch.random.fork_rng = lambda devices, **kw: fork_rng(devices=[], **kw)  # the CPU generator only
torch.cuda.graph_pool_handle = lambda: None
torch.cuda.Stream = torch.cuda.current_stream = lambda device=None: NoStream()
torch.cuda.stream = lambda stream: contextlib.nullcontext()
torch.Tensor.pin_memory = lambda self: self
cuda_graphs.usable = lambda device: True
minilm.precision.check = lambda precision, *args, **kwargs: precision
cuda_graphs.GraphedSteps.capture = capture
atexit.register(lambda: print(f"captured: {captured}", file=sys.stderr))
sys.argv = [str(REPO / "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
