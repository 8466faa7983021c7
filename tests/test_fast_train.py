"""train.py's fast loop (the default, minilm/unpadded.py) against the exact loop: the same model trained, the same
recipe, deterministic and resumable; and what every run does at its end (the last partial log interval, divergence)."""

import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from minilm import CrossEncoder
from minilm.checkpoint import safetensors_bytes, write_bytes
from minilm.cuda_graphs import padded_length
from minilm.model import Config, CrossEncoderModel
from minilm.tokenizer import PairEncoding
from minilm.unpadded import Unpadded, drop_mask, dropout, pack
from test_train import GOLDEN, PAIRS, REPO, TRAIN, read_log, train


def short(model, output, *extra):
    return ["--model", model, "--train", PAIRS, "--output", output, "--batch-size", 8, "--max-length", 80,
            "--device", "cpu", "--log-every", 1, *extra]


def losses(folder):
    return np.array([r["loss"] for r in read_log(folder) if "loss" in r])


def test_without_dropout_the_fast_loop_takes_the_exact_loops_steps(no_dropout, tmp_path):
    """Same batches, loss, optimizer and schedule: per-step losses within 1e-4 (relative) in fp32, and within 3e-2 with
    the fast loop's own precision (bf16 on a CPU with native bf16), over 10 steps (about 1.7 epochs of 44 pairs)."""
    runs = {"exact": ["--exact", "true"], "fast fp32": ["--precision", "fp32"], "fast default": []}
    for name, extra in runs.items():
        train(*short(no_dropout, tmp_path / name, "--max-steps", 10, *extra))
    exact, fast, default = (losses(tmp_path / name) for name in runs)
    assert len(exact) == 10 and exact[0] > 0.1
    np.testing.assert_allclose(fast, exact, rtol=1e-4)
    np.testing.assert_allclose(default, exact, rtol=3e-2)
    weights = [load_file(tmp_path / name / "model.safetensors") for name in ("exact", "fast fp32")]
    update = [torch.cat([(w[k] - s).flatten() for k, s in load_file(no_dropout / "model.safetensors").items()]) for w in weights]
    assert F.cosine_similarity(*update, dim=0) > 0.999  # the same training, not only the same losses


@pytest.mark.parametrize("at", [4, 6], ids=["mid-epoch", "epoch-end"])
def test_fast_loop_resumes_to_the_uninterrupted_weights(standin_dir, tmp_path, at):
    """Dropout on: kill after checkpoint `at` (simulated by copying it; 6 steps make an epoch), resume, same bytes as
    without a stop."""
    full = tmp_path / "full"
    train(*short(standin_dir, full, "--max-steps", 9, "--save-every", 2, "--keep-checkpoints", 4))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / f"checkpoint-{at}", resumed / f"checkpoint-{at}")
    train(*short(standin_dir, resumed, "--max-steps", 9, "--save-every", 2, "--resume", "latest"))
    assert (resumed / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert list(losses(resumed)) == list(losses(full))


def graphs_launch(*args) -> subprocess.CompletedProcess:
    """train.py --cuda-graphs true under tests/graphs_launch.py (CUDA stood in for)."""
    return subprocess.run([sys.executable, str(REPO / "tests" / "graphs_launch.py"), *map(str, args), "--cuda-graphs",
                           "true"], capture_output=True, text=True, timeout=600, cwd=REPO)


def graphed_on_cpu(*args) -> str:
    """graphs_launch() that must succeed; the shapes it captured."""
    done = graphs_launch(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


def test_cuda_graph_steps_are_the_exact_loops_steps(no_dropout, tmp_path):
    """minilm/cuda_graphs.py on a CPU, its CUDA calls stood in for: dropout off, fp32, batches of 5 (the ninth has 4
    rows) padded to 64-token buckets, three graphs, each after a warm-up step that must leave no trace (one left in
    place would be an extra optimizer step), then train.py's step replayed: the exact loop's per-step losses within
    1e-5 (relative) over 10 steps."""
    args = ["--batch-size", 5, "--max-length", 512, "--max-steps", 10]
    train(*short(no_dropout, tmp_path / "exact", *args, "--exact", "true"))
    captured = graphed_on_cpu(*short(no_dropout, tmp_path / "graphs", *args, "--precision", "fp32"))
    assert captured == "captured: [(5, 192), (5, 256), (4, 192)]"
    exact, graphs = losses(tmp_path / "exact"), losses(tmp_path / "graphs")
    assert len(exact) == 10 and exact[0] > 0.1
    np.testing.assert_allclose(graphs, exact, rtol=1e-5)
    padding = [r["padding"] for r in read_log(tmp_path / "graphs") if "loss" in r]
    assert all(0 < x < 0.5 for x in padding)  # the buckets' padding, logged


def test_cuda_graph_steps_resume_to_the_uninterrupted_weights(standin_dir, tmp_path):
    """The same stand-in, dropout on: resumed from checkpoint 4, the bytes of the uninterrupted run (the warm-up
    before each capture restores the random generators it drew from)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["--batch-size", 5, "--max-length", 512, "--max-steps", 9, "--save-every", 4]
    graphed_on_cpu(*short(standin_dir, full, *args, "--keep-checkpoints", 3))
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    graphed_on_cpu(*short(standin_dir, resumed, *args, "--resume", "latest"))
    assert (resumed / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert list(losses(resumed)) == list(losses(full))


def test_checkpoints_from_before_cuda_graphs_are_eager_runs(standin_dir, tmp_path):
    """A trainer_state.json written before --cuda-graphs existed has no such key: an eager run's. Resuming it with
    graphs is refused; without, it continues, and counts as this run's checkpoint (pruned by --keep-checkpoints)."""
    out, args = tmp_path / "run", ["--max-steps", 6, "--save-every", 3]
    train(*short(standin_dir, out, *args))
    state = out / "checkpoint-3" / "trainer_state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "cuda_graphs"}))
    shutil.rmtree(out / "checkpoint-6")
    done = graphs_launch(*short(standin_dir, out, *args, "--resume", "latest"))
    assert done.returncode == 2 and "cuda_graphs False -> True" in done.stderr, done.stderr[-3000:]
    train(*short(standin_dir, out, *args, "--resume", "latest", "--keep-checkpoints", 1))
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]


def test_cuda_graph_length_buckets():
    assert [padded_length(n, 512) for n in (1, 63, 64, 65, 128, 129, 511, 512)] == [64, 64, 64, 128, 128, 192, 512, 512]
    assert [padded_length(n, 80) for n in (40, 64, 65, 80)] == [64, 64, 80, 80]  # never past max_length


def test_cuda_graph_steps_keep_the_gradscalers_schedule(tiny_dir, tmp_path):
    """fp16 (emulated on the CPU), the scale starting at 1 and doubling every 2 clean steps: the graphed loop logs the
    exact loop's scales and, dropout off, its losses within 1e-3. The warm-up before each capture runs a GradScaler
    update; left in place, the scale would double a step early."""
    no_dropout = tmp_path / "tiny_no_dropout"
    no_dropout.mkdir()
    for f in tiny_dir.iterdir():
        (no_dropout / f.name).symlink_to(f)
    (no_dropout / "config.json").unlink()
    config = json.loads((tiny_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (no_dropout / "config.json").write_text(json.dumps(config))
    args = ["--batch-size", 5, "--max-length", 512, "--max-steps", 8, "--precision", "fp16", "--fp16-init-scale", 1,
            "--fp16-growth-interval", 2]
    train(*short(no_dropout, tmp_path / "exact", *args, "--exact", "true"), cpu_fp16=True)
    graphed_on_cpu(*short(no_dropout, tmp_path / "graphs", *args))
    logs = [[r for r in read_log(tmp_path / name) if "loss" in r] for name in ("exact", "graphs")]
    assert [r["scale"] for r in logs[1]] == [r["scale"] for r in logs[0]] == [1, 2, 2, 4, 4, 8, 8, 16]
    np.testing.assert_allclose([r["loss"] for r in logs[1]], [r["loss"] for r in logs[0]], rtol=1e-3)


@pytest.fixture(scope="module")
def tiny_dir(standin_dir, tmp_path_factory):
    """A 2-layer, 64-wide model with random weights and the stand-in's tokenizer: the same code paths, in a fraction
    of the time (the dispatch mode of tests/sync_launch.py calls Python for every op)."""
    folder = tmp_path_factory.mktemp("tiny")
    for f in standin_dir.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (folder / f.name).symlink_to(f)
    config = json.loads((standin_dir / "config.json").read_text())
    config.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    write_bytes(folder / "model.safetensors", safetensors_bytes(CrossEncoderModel(Config.from_hf(config))))
    return folder


@pytest.mark.parametrize("precision", ["fp32", "fp16"], ids=["fp32", "fp16-gradscaler"])
def test_fast_loop_makes_no_host_sync_per_step(tiny_dir, tmp_path, precision):
    """On a GPU every read of a tensor's value waits for the device. Counted on the CPU (tests/sync_launch.py) over a
    3-step and a 6-step run that log once, at the end: the same count, so no step reads one. fp16 runs the GradScaler,
    skip detection and the schedule held on the device. (Indexing the lr table with the 0-dim step counter did read
    it, once per step.)"""
    syncs = []
    for steps in (3, 6):
        args = short(tiny_dir, tmp_path / str(steps), "--max-steps", steps, "--log-every", 100, "--precision", precision)
        done = subprocess.run([sys.executable, str(REPO / "tests" / "sync_launch.py"), *map(str, args)],
                              capture_output=True, text=True, timeout=600, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        syncs.append(int(done.stderr.strip().splitlines()[-1].removeprefix("host syncs: ")))
    assert syncs[0] == syncs[1] > 0, syncs


def test_forward_passes_read_no_tensor_value_off_the_cpu():
    """On the meta device (shapes, no data) reading a value raises, as it would wait for a GPU: scoring's forward with
    a padding mask, and the fast loop's forward and backward on its CUDA attention path, must not read any."""
    model = CrossEncoderModel(Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128))
    model.to("meta")
    ids = torch.ones(3, 7, dtype=torch.int64, device="meta")
    with torch.inference_mode():
        assert model.eval()(ids, torch.ones_like(ids), ids).shape == (3,)
    encodings = [PairEncoding([101, 5, 102, 6, 7, 102], [0, 0, 0, 1, 1, 1]), PairEncoding([101, 5, 102, 6, 102], [0, 0, 0, 1, 1])]
    logits = Unpadded(model.train())(pack(encodings, torch.device("meta")))
    logits.sum().backward()
    assert logits.shape == (2,) and model.classifier.weight.grad.shape == (1, 64)


def test_fast_forward_and_gradients_match_the_padded_model(no_dropout):
    """Unpadded, both attention paths (per pair, as on CPUs; padded SDPA, as on CUDA) against the plain model."""
    ce = CrossEncoder.from_pretrained(no_dropout, device="cpu", max_length=80)
    rows = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()][:8]
    encodings = ce.tokenizer.encode([(r["query"], r["passage"]) for r in rows])
    labels = torch.tensor([float(r["label"]) for r in rows])
    assert len({len(e.ids) for e in encodings}) > 1, "the batch should need padding"
    model = ce.model.train()

    def logits_and_grads(logits):
        model.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(logits, labels).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, ref_grads = logits_and_grads(model(**{k: torch.from_numpy(v) for k, v in ce.tokenizer.pad(encodings).items()}))
    fast = Unpadded(model).train()
    scale = max(g.norm() for g in ref_grads.values())
    for per_sequence in (True, False):
        fast.per_sequence = per_sequence
        out, grads = logits_and_grads(fast(pack(encodings, torch.device("cpu"))))
        assert (out - ref).abs().max() <= 1e-6, per_sequence
        for name, g in grads.items():  # key biases have a true gradient of 0 (softmax ignores a constant): noise only
            assert (g - ref_grads[name]).norm() <= 1e-5 * max(ref_grads[name].norm(), 1e-3 * scale), (per_sequence, name)


def test_cheap_dropout_masks_keep_the_rate_and_the_expectation():
    torch.manual_seed(0)
    n = 1 << 22
    dropped, scale = drop_mask((n,), 0.1, "cpu")
    p = 6554 / 65536  # round(0.1 * 2^16) / 2^16 = 0.100006
    assert abs(dropped.float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert scale * (1 - p) == pytest.approx(1.0, abs=1e-15)
    a, _ = drop_mask((n,), 0.1, "cpu")
    assert (a != dropped).any(), "every draw is a new mask"
    # the ends: p = 1 drops everything (F.dropout's zeros, not a ZeroDivisionError); a p too small for 16 bits still
    # drops 1 in 2^16 rather than nothing
    everything, _ = drop_mask((n,), 1.0, "cpu")
    assert bool(everything.all()) and dropout(torch.ones(8, requires_grad=True), 1.0, True).abs().sum() == 0
    assert drop_mask((n,), 1e-7, "cpu")[0].any() and not drop_mask((n,), 0.0, "cpu")[0].any()


def test_a_run_shorter_than_log_every_logs_its_steps(standin_dir, tmp_path):
    train(*short(standin_dir, tmp_path, "--max-steps", 3, "--log-every", 500))
    logged = [r for r in read_log(tmp_path) if "loss" in r]
    assert [r["step"] for r in logged] == [3]
    summary = next(r for r in read_log(tmp_path) if "train_loss" in r)
    assert summary["train_loss"] == pytest.approx(logged[0]["loss"])
    assert "<polyline" in (tmp_path / "loss.svg").read_text() and "| 3 |" in (tmp_path / "README.md").read_text()
    card = (tmp_path / "README.md").read_text()
    assert "| max_steps | `3` |" in card and "| epochs | `0.5` |" in card  # what ran (6 steps an epoch), not --epochs 30


def test_a_diverging_run_stops_with_status_1_and_keeps_the_last_good_checkpoint(standin_dir, tmp_path):
    cmd = [sys.executable, str(TRAIN), *map(str, short(standin_dir, tmp_path, "--max-steps", 6, "--lr", 1e20,
                                                      "--save-every", 1, "--exact", "true", "--precision", "fp32"))]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={"OMP_NUM_THREADS": str(GOLDEN["cpu"]["threads"]), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1, result.stderr
    assert "the loss was not finite at step" in result.stderr and "Traceback" not in result.stderr
    bad = int(result.stderr.split("at step ")[1].split()[0])
    kept = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    assert kept and max(kept) < bad and not (tmp_path / "model.safetensors").exists()
    assert all(np.isfinite(r["loss"]) for r in read_log(tmp_path) if "loss" in r)


def test_weights_gone_nan_are_never_saved_and_overwrite_clears_the_earlier_model(tiny_dir, tmp_path):
    """A last update that overflows the weights (the loss before it was finite): exit 1, no model saved. With
    --overwrite-output the earlier run's model and card are gone, not left beside the failed run's log; other files stay."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.safetensors", "README.md", "loss.svg", "log.jsonl", "notes.txt"):
        (out / name).write_text("earlier")
    (out / "checkpoint-3").mkdir()
    result = subprocess.run([sys.executable, str(TRAIN), *map(str, short(tiny_dir, out, "--max-steps", 1, "--lr", 1e20,
                                                                         "--weight-decay", 1e20, "--overwrite-output", "true"))],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 1, result.stderr
    assert "weights are NaN or infinite after step 1" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "notes.txt"]


def test_ctrl_c_says_how_to_resume_in_one_line(tiny_dir, tmp_path):
    args = short(tiny_dir, tmp_path / "out", "--max-steps", 100000, "--save-every", 1, "--keep-checkpoints", 1)
    proc = subprocess.Popen([sys.executable, str(TRAIN), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "training pairs" in proc.stdout.readline()
    assert proc.stdout.readline().startswith("step 1 |")
    assert proc.stdout.readline().startswith("step 2 |")  # so checkpoint-1 is saved
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (-signal.SIGINT, 130)
    assert err.strip() == "train.py: interrupted; --resume latest continues from the last checkpoint", err
