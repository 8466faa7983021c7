"""The fast training loop's step on one GPU, captured as CUDA graphs and replayed.

At batch 16 a MiniLM-L6 training step is about 800 small kernels. Launched one by one from Python, they keep the host
busy for ~35 ms while the GPU works ~5 ms of it (H100, torch 2.11, `bench/train_profile.py`; docs/performance.md): the
eager loop runs at the speed of kernel launches. A CUDA graph records the step's kernels once and launches them all
with one call, so the host's part of a step shrinks to padding a batch and one launch: 99.7 steps/s on an H100, 3.5x
the eager loop. On by default on one GPU (train.py --cuda-graphs auto): on an H200, 107 steps/s, 4.7x the trainer's,
with its 500-step mean losses within 0.2% of the trainer's over 2,000 steps (docs/performance.md).

A graph replays fixed shapes, so batches are padded to a length bucket (the longest pair rounded up to a multiple of
64 tokens, at most max_length) and each (rows, bucket) shape gets its own graph the first time it comes up (at most
8 x 2 for max_length 512). Padding changes no result: the step is the padded model of model.py, whose attention
masks padded keys (as in the exact loop). Each graph holds train.py's whole step: forward, loss, backward, unscaling,
clipping, the lr looked up on the device, fused AdamW, the GradScaler's update, the loop's device counters. Whatever
lives from one step to the next (weights, optimizer and GradScaler state, those counters) exists before the first
capture and is only updated in place, so all graphs share one memory pool and keep nothing of their own between
replays. Replays draw dropout masks from the CUDA generator like eager kernels do (each replay advances it), so a run
resumed from a checkpoint draws the masks of the uninterrupted run. Its weights are then the same up to the order in
which the memory-efficient attention's backward adds up key blocks of 64 (torch's default for it is not
deterministic): bit for bit while no batch is longer than two blocks.
"""

import warnings

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

BUCKET = 64  # tokens; a multiple of 8 also keeps the memory-efficient attention kernel on its aligned path
# The SDPA kernels a graph may use. The memory-efficient one takes the padding mask and dropout and is meant to be safe
# to capture; cuDNN's (SDPA's first choice on Hopper) plans every new shape on the host; the math path only if the
# first were refused. bench/train.py's fast-graphs-math holds graphs to the math path, whose dropout is torch's plain
# dropout kernel: the graphs' losses fell under the trainer's as if attention dropout were missing (docs/performance.md).
ATTENTION = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def padded_length(longest: int, max_length: int) -> int:
    """The length a batch is padded to when its longest pair has `longest` tokens: its bucket, at most max_length."""
    return min(-(-longest // BUCKET) * BUCKET, max_length)


def usable(device: torch.device) -> bool:
    """CUDA graphs need a CUDA device (tests/graphs_launch.py stands one in on a CPU to test this module's logic)."""
    return device.type == "cuda"


class GraphedSteps:
    """`graphed(padded, labels)` runs `step(inputs, labels)` for one batch as a CUDA graph replay.

    step(inputs, labels): one training step on a dict of (B, T) int64 tensors (input_ids, attention_mask,
    token_type_ids) and (B,) float labels, every lasting effect in place on `model`'s parameters, `optimizer`'s state
    (AdamW with capturable=True), `scaler`'s state and the tensors in `counters`; no host sync inside."""

    def __init__(self, step, model, optimizer, scaler, counters, max_length: int, pad_id: int):
        self.step, self.model, self.optimizer, self.scaler, self.counters = step, model, optimizer, scaler, counters
        self.max_length, self.pad_id = max_length, pad_id
        self.device = next(model.parameters()).device
        self.graphs, self.inputs = {}, {}  # by (rows, length): the CUDAGraph; its static (3, B, T) inputs and (B,) labels
        self.pool = torch.cuda.graph_pool_handle()
        self.warm_up_stream = torch.cuda.Stream(self.device)
        for group in optimizer.param_groups:  # AdamW's lazily created state, created now: a graph must not allocate it
            for p in group["params"]:
                if not optimizer.state[p]:
                    optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                          "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        if scaler.is_enabled():
            scaler.scale(torch.ones((), device=self.device))  # creates the scale and growth tracker (lazily made)

    def __call__(self, padded: dict, labels: torch.Tensor) -> None:
        """padded: tokenizer.pad()'s int64 arrays (B, T); labels: (B,) float32 on the host."""
        B, T = padded["input_ids"].shape
        length = padded_length(T, self.max_length)
        host = np.zeros((3, B, length), dtype=np.int64)  # input_ids, attention_mask, token_type_ids
        host[0] = self.pad_id
        for i, name in enumerate(("input_ids", "attention_mask", "token_type_ids")):
            host[i, :, :T] = padded[name]
        key = (B, length)
        if key not in self.inputs:
            self.inputs[key] = (torch.empty((3, B, length), dtype=torch.int64, device=self.device),
                                torch.empty(B, dtype=torch.float32, device=self.device))
        inputs, static_labels = self.inputs[key]
        inputs.copy_(torch.from_numpy(host).pin_memory(), non_blocking=True)
        static_labels.copy_(labels.pin_memory(), non_blocking=True)
        if key not in self.graphs:
            self.graphs[key] = self.capture(inputs, static_labels)
        self.graphs[key].replay()

    def run_step(self, inputs, labels):
        with sdpa_kernel(ATTENTION):
            self.step(dict(zip(("input_ids", "attention_mask", "token_type_ids"), inputs)), labels)

    def capture(self, inputs, labels) -> torch.cuda.CUDAGraph:
        self.warm_up(inputs, labels)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.run_step(inputs, labels)
        return graph

    def warm_up(self, inputs, labels):
        """One eager step on a side stream before a capture, as torch's capture recipe asks (libraries initialise
        lazily on first use, which a capture must not see), then every tensor it changed put back, RNG states too."""
        lasting = [*self.model.parameters(), *self.counters,
                   *(t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))]
        # detached: a clone of a parameter would hold its AccumulateGrad node, made on this stream, through the warm-up's
        # backward on another (torch warns of the stream mismatch)
        saved, scaler_state = [t.detach().clone() for t in lasting], self.scaler.state_dict()
        with torch.random.fork_rng(devices=[self.device]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*capturable=True.*")  # "...running without CUDA graph capture"
            self.warm_up_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.warm_up_stream):
                self.run_step(inputs, labels)
            torch.cuda.current_stream(self.device).wait_stream(self.warm_up_stream)
        with torch.no_grad():
            for t, s in zip(lasting, saved):
                t.copy_(s)
        self.scaler.load_state_dict(scaler_state)  # fills its scale and growth tracker in place
