"""Dropout on the attention probabilities, as each SDPA kernel does it, eagerly and replayed as a CUDA graph.

With the values an identity matrix (head size = T), attention's output *is* its dropped-out probability matrix:
out = (softmax(q k^T / sqrt(d) + bias) * mask / (1 - p)) @ I. So one call shows the mask a kernel drew (the zeros of
out among real keys), and everything else can be checked against it: the kept entries are the softmax scaled by
1 / (1 - p), about p of them are dropped, and the gradients of q, k and v are those of the math with that same mask
(a backward that regenerated another mask, or none, would differ by far more than rounding). A replayed graph must also
draw a new mask at every replay, from every graph sharing the generator.

These run on the CPU for the math path (which checks the test itself) and on CUDA for every kernel (bench/gpu.sh):
the fast loop's CUDA graphs trained to lower losses than the trainer as if attention dropout were missing
(docs/performance.md), and this pins down whether the kernel, or its replay, is the cause.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from minilm import cuda_graphs

P = 0.1
B, H, T = 2, 12, 64  # T is also the head size: the values are the (T, T) identity
PADDED_KEYS = 8  # the last keys of the second row are padding


def inputs(device, dtype, masked: bool):
    gen = torch.Generator().manual_seed(0)
    q, k, grad_out = (torch.randn(B, H, T, T, generator=gen).to(device, dtype) for _ in range(3))
    v = torch.eye(T).expand(B, H, T, T).to(device, dtype)
    bias = None
    if masked:
        bias = torch.zeros(B, 1, 1, T, dtype=dtype)
        bias[1, ..., -PADDED_KEYS:] = torch.finfo(dtype).min
        bias = bias.to(device)
    return q, k, v, bias, grad_out


def attend(kernel, q, k, v, bias, grad_out):
    """SDPA's output and its gradients for the upstream gradient grad_out, on `kernel` only."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([kernel]):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=P)  # (B, H, T, T)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return (out.detach(), *grads)


def check_one_draw(q, k, v, bias, grad_out, out, dq, dk, dv):
    """out, dq, dk, dv: a kernel's, from one call. Returns the mask it drew (True: kept) over the real keys."""
    q, k, v, grad_out = (t.double().requires_grad_() for t in (q, k, v, grad_out))
    real = torch.ones(B, 1, 1, T, dtype=torch.bool, device=q.device)
    scores = q @ k.transpose(-2, -1) / T ** 0.5  # (B, H, T, T)
    if bias is not None:
        real = bias == 0  # (B, 1, 1, T)
        scores = scores.masked_fill(~real, float("-inf"))
    probs = scores.softmax(-1)
    kept = (out != 0) & real  # (B, H, T, T): no kept probability is small enough to round to 0 (all are ~1/T)
    dropped = 1 - kept.sum().item() / real.expand_as(kept).sum().item()
    assert abs(dropped - P) < 0.01, f"{dropped:.4f} of the attention probabilities dropped, expected {P}"
    assert not out.masked_select(~real.expand_as(out)).any(), "a padded key was attended to"
    # the same mask in the math: the kernel's output and its gradients
    want = probs * kept / (1 - P) @ v
    half = out.dtype == torch.float16
    # out is one rounding of each probability: tight enough to see a missing or wrong 1 / (1 - p) (an 11% change)
    torch.testing.assert_close(out.double(), want.detach(), **(dict(rtol=5e-3, atol=1e-5) if half else
                                                              dict(rtol=1e-5, atol=1e-8)))
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    tol = dict(rtol=2e-2, atol=2e-3) if half else dict(rtol=1e-4, atol=1e-5)  # of the largest entry: sums of 64 terms
    for name, got, expected in zip("qkv", (dq, dk, dv), want_grads):
        scale = expected.abs().max()
        torch.testing.assert_close(got.double() / scale, expected / scale, **tol, msg=lambda m: f"grad of {name}: {m}")
    return kept


CASES = [("cpu", SDPBackend.MATH, False)] + [
    ("cuda", kernel, graphed) for kernel in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                             SDPBackend.FLASH_ATTENTION, SDPBackend.MATH) for graphed in (False, True)
    if not graphed or kernel in (cuda_graphs.ATTENTION[0], SDPBackend.MATH)]  # the graphs use these


@pytest.mark.parametrize("device, kernel, graphed", CASES, ids=[f"{d}-{k.name.lower()}{'-graphed' if g else ''}"
                                                                 for d, k, g in CASES])
def test_attention_dropout_draws_one_mask_for_forward_and_backward(device, kernel, graphed):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dtype = torch.float16 if device == "cuda" else torch.float32
    masked = kernel != SDPBackend.FLASH_ATTENTION  # flash attention takes no attention mask
    args = inputs(device, dtype, masked)
    try:
        draws = [attend(kernel, *args) for _ in range(2)] if not graphed else replays(kernel, args)
    except RuntimeError as e:
        if "No available kernel" in str(e):
            pytest.skip(f"{kernel.name} does not take these inputs on this GPU")
        raise
    masks = [check_one_draw(*args, *draw) for draw in draws]
    for i in range(len(masks)):
        for j in range(i):  # independent masks agree on 0.9^2 + 0.1^2 = 82% of the entries
            agree = (masks[i] == masks[j]).float().mean().item()
            assert agree < 0.9, f"draws {j} and {i}: {agree:.1%} of their dropout masks are the same"


def replays(kernel, args):
    """Two graphs in one memory pool (as train.py's length buckets share it), each of two calls (as a step holds one
    per layer), replayed in turn: the first, the second, the first again. Each call's output and gradients, copied."""
    static = [a if a is None else a.clone() for a in args]
    stream, pool = torch.cuda.Stream(), torch.cuda.graph_pool_handle()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up before capture, as torch's recipe asks
        attend(kernel, *static)
    torch.cuda.current_stream().wait_stream(stream)
    graphs, results = [], []
    for _ in range(2):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            calls = [attend(kernel, *static) for _ in range(2)]
        graphs.append(graph), results.append(calls)
    draws = []
    for g in (0, 1, 0):
        graphs[g].replay()
        draws += [[t.clone() for t in call] for call in results[g]]
    return draws
