"""The GPU paths, run where CUDA is present (bench/gpu.sh) and skipped elsewhere: scoring on CUDA in fp32 against the
CPU (and the golden outputs of sentence-transformers when the checkpoint is the stand-in itself), fp16/bf16 ranking
like fp32, a long file streamed through infer.py, a short fp16 train.py run that finishes, logs and saves, and the fast
loop's CUDA graphs (minilm/cuda_graphs.py) against the eager fast loop, and resumed."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from minilm import CrossEncoder
from test_fast_train import losses
from test_train import PAIRS, read_log

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("MINILM_TYDI", os.path.join(REPO, "..", "shared", "data", "tydiqa_ru"))


def test_fp32_on_cuda_matches_the_cpu(standin_dir, golden, golden_pairs):
    cpu = CrossEncoder.from_pretrained(standin_dir, device="cpu").predict(golden_pairs)
    cuda = CrossEncoder.from_pretrained(standin_dir, device="cuda").predict(golden_pairs)
    assert np.abs(cuda - cpu).max() <= 1e-4
    if "MINILM_STANDIN" not in os.environ:  # the stand-in itself: the golden logits apply
        assert np.abs(cuda - np.asarray(golden["logits"]["512"]["32"])).max() <= 1e-4


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_reduced_precision_ranks_like_fp32(standin_dir, golden, dtype):
    fp32 = CrossEncoder.from_pretrained(standin_dir, device="cuda")
    fast = CrossEncoder.from_pretrained(standin_dir, device="cuda", dtype=dtype)
    for case in golden["rank"]:
        ref = [r["corpus_id"] for r in fp32.rank(case["query"], case["documents"])]
        got = [r["corpus_id"] for r in fast.rank(case["query"], case["documents"])]
        scores = fp32.predict([(case["query"], d) for d in case["documents"]])
        # the same order, except between documents whose fp32 scores are closer than the dtype's rounding
        swapped = [(a, b) for a, b in zip(ref, got) if a != b]
        assert all(abs(scores[a] - scores[b]) < 2e-2 for a, b in swapped), (dtype, case["name"], swapped)


def test_a_long_file_streams_on_cuda(standin_dir, tmp_path):
    rows = [json.loads(line) for line in open(os.path.join(DATA, "train.jsonl"), encoding="utf-8")][:3000]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"query": r["query"], "passage": r["passage"]}, ensure_ascii=False) + "\n"
                           for r in rows), encoding="utf-8")
    for device in ("cuda", "cpu"):
        done = subprocess.run([sys.executable, "infer.py", "--model", str(standin_dir), "--device", device, "--input",
                               str(src), "--output", str(tmp_path / f"{device}.jsonl"), "--max-length", "128", "--quiet"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    scores = {d: [json.loads(line)["score"] for line in open(tmp_path / f"{d}.jsonl")] for d in ("cuda", "cpu")}
    assert len(scores["cuda"]) == 3000 and np.abs(np.subtract(scores["cuda"], scores["cpu"])).max() <= 1e-4


def test_fp16_training_on_cuda_finishes_logs_and_saves(standin_dir, tmp_path):
    done = subprocess.run([sys.executable, "train.py", "--model", str(standin_dir), "--train",
                           os.path.join(DATA, "train.jsonl"), "--output", str(tmp_path), "--max-steps", "300",
                           "--log-every", "100", "--max-length", "256", "--save-every", "150"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [100, 200, 300] and all(np.isfinite(r["loss"]) for r in steps)
    assert all("scale" in r for r in steps)  # fp16 with its GradScaler, the default on CUDA
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "checkpoint-300").is_dir()
    CrossEncoder.from_pretrained(tmp_path, device="cuda").predict([("q", "p")])


def cuda_train(model, output, *extra):
    done = subprocess.run([sys.executable, "train.py", "--model", str(model), "--train", PAIRS, "--output", str(output),
                           "--batch-size", "8", "--max-length", "80", "--device", "cuda", "--log-every", "1",
                           *map(str, extra)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout  # train.py's log lines


def test_cuda_graphs_take_the_eager_fast_loops_steps(no_dropout, tmp_path):
    """Dropout off: replaying graphs of the padded model on length buckets gives the per-step losses and gradient
    norms of the eager, unpadded fast loop (fp32: within 1e-4 and 1e-3, fp16: 3e-2 and 5e-2, relative) and its lr at
    every step, over 10 steps (44 pairs in batches of 8: the sixth batch has 4 rows, another graph)."""
    runs = {"eager": ["--cuda-graphs", "false", "--precision", "fp32"], "graphs": ["--precision", "fp32"],  # auto: graphs
            "graphs fp16": ["--cuda-graphs", "true"]}
    for name, extra in runs.items():
        log = cuda_train(no_dropout, tmp_path / name, "--max-steps", 10, *extra)
        assert ("as CUDA graphs" in log) == (name != "eager"), log
    eager, graphs, fp16 = (losses(tmp_path / name) for name in runs)
    assert len(eager) == 10 and eager[0] > 0.1
    np.testing.assert_allclose(graphs, eager, rtol=1e-4)
    np.testing.assert_allclose(fp16, eager, rtol=3e-2)
    logs = {name: [r for r in read_log(tmp_path / name) if "loss" in r] for name in runs}
    for name, rtol in (("graphs", 1e-3), ("graphs fp16", 5e-2)):
        assert [r["lr"] for r in logs[name]] == pytest.approx([r["lr"] for r in logs["eager"]], rel=1e-6)
        np.testing.assert_allclose([r["grad_norm"] for r in logs[name]], [r["grad_norm"] for r in logs["eager"]], rtol=rtol)


@pytest.mark.parametrize("dropout", ["all", "attention only"])
def test_cuda_graph_replays_draw_new_dropout_masks(standin_dir, tmp_path, dropout):
    """The same batch at every step and an lr too small to move the weights: the steps' losses differ only through
    their dropout masks, so a replay that reused its capture's masks would log a loss again. With dropout on the
    attention probabilities only, the masks of the memory-efficient attention kernel are what varies."""
    model = tmp_path / "model"
    model.mkdir()
    for f in standin_dir.iterdir():
        if f.name != "config.json":
            (model / f.name).symlink_to(f)
    config = json.loads((standin_dir / "config.json").read_text())
    if dropout == "attention only":
        config["hidden_dropout_prob"] = 0.0
    (model / "config.json").write_text(json.dumps(config))
    same = tmp_path / "same.jsonl"
    row = {"query": "кто написал войну и мир", "passage": "Роман «Война и мир» написал Лев Толстой.", "label": 1}
    same.write_text((json.dumps(row, ensure_ascii=False) + "\n") * 16, encoding="utf-8")
    for name, extra in {"eager": ["--cuda-graphs", "false"], "graphs": ["--cuda-graphs", "true"]}.items():
        cuda_train(model, tmp_path / name, "--train", same, "--max-steps", 8, "--lr", 1e-12, "--precision", "fp32", *extra)
        per_step = list(losses(tmp_path / name))
        assert len(per_step) == 8 and len(set(per_step)) == 8, (name, per_step)


def test_cuda_graphs_resume_to_the_uninterrupted_weights(standin_dir, tmp_path):
    """Dropout on, fp16: a run resumed from its checkpoint 4 ends with the bytes of the uninterrupted run (the replays
    draw their dropout masks from the restored generator state; at max_length 80 the attention backward's sums over
    64-key blocks have two terms, so their order cannot change a bit)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    cuda_train(standin_dir, full, "--max-steps", 9, "--save-every", 4, "--keep-checkpoints", 3, "--cuda-graphs", "true")
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    cuda_train(standin_dir, resumed, "--max-steps", 9, "--save-every", 4, "--resume", "latest", "--cuda-graphs", "true")
    assert (resumed / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert list(losses(resumed)) == list(losses(full))
