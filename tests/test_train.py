"""train.py against the sentence-transformers 5.1.0 CrossEncoderTrainer, and its checkpoints, fp16 rules, data checks,
DDP and evaluation.

The reference is `reference/golden_train.json`, made by `reference/make_train_golden.py`: the trainer fine-tuning the
stand-in checkpoint for 30 steps (5 epochs of 44 pairs, batch 8, max_length 80, fp32, CPU, dropout on). Training runs
here are subprocesses of `python train.py` (as users run it) pinned to the golden's thread count, because the GEMM
split, and with it the last bit, depends on the number of threads. Bit-for-bit equality is required on the CPU kernel
family the golden was made on; on another one, only agreement within float tolerances can be expected.
"""

import errno
import fcntl
import json
import math
import os
import re
import runpy
import shutil
import socket
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minilm import CrossEncoder, cli
from minilm.checkpoint import TOKENIZER_FILES
from minilm.data import DataError, fingerprint, read_pairs, read_ranking_pairs
from minilm.evaluate import evaluate
from minilm.evaluate import main as evaluate_main
from minilm.metrics import rerank_metrics
from minilm.plot import line_chart_svg
from test_shard import still_running_after
from reference.make_train_golden import weights_fingerprint  # the function the golden weights were fingerprinted with

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TRAIN = REPO / "train.py"
PAIRS = TESTS / "reference" / "train_pairs.jsonl"
GOLDEN = json.loads((TESTS / "reference" / "golden_train.json").read_text(encoding="utf-8"))
ARGS = GOLDEN["args"]
EXACT = torch.backends.cpu.get_cpu_capability() == GOLDEN["cpu"]["capability"]
SAVE_EVERY, RESUME_AT = 7, 21  # checkpoints 7, 14, 21, 28; the newest two are kept. 21 = epoch 3, batch 3 of 6


# fp16 is refused on a CPU (emulated there, ~13x slower than fp32); its GradScaler rules are tested on one all the same
CPU_FP16 = "import runpy, sys, minilm.precision as p; p.check = lambda precision, *args, **kwargs: precision; " \
           "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def train(*args, timeout=600, cpu_fp16=False):
    env = {**os.environ, "OMP_NUM_THREADS": str(GOLDEN["cpu"]["threads"])}
    command = [sys.executable, *(["-c", CPU_FP16] if cpu_fp16 else []), str(TRAIN), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def golden_args(model, output, *extra):
    return ["--model", model, "--train", PAIRS, "--output", output, "--batch-size", ARGS["batch_size"], "--epochs",
            ARGS["epochs"], "--lr", ARGS["lr"], "--seed", ARGS["seed"], "--max-length", ARGS["max_length"],
            "--device", "cpu", "--log-every", 1, "--exact", "true", *extra]


def read_log(folder):
    return [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]


def summary(log):
    return next(r["train_loss"] for r in log if "train_loss" in r)


def assert_same_weights(folder, fingerprint):
    ours = weights_fingerprint(load_file(Path(folder) / "model.safetensors"))
    if EXACT:
        assert ours["sha256"] == fingerprint["sha256"], "final weights differ from the reference in some bit"
    else:
        for name, (s, ss) in fingerprint["tensors"].items():
            assert ours["tensors"][name] == pytest.approx([s, ss], rel=1e-3, abs=1e-4), name


@pytest.fixture(scope="module")
def run(standin_dir, tmp_path_factory):
    """The golden run by train.py, with checkpoints every 7 steps."""
    out = tmp_path_factory.mktemp("train") / "run"
    train(*golden_args(standin_dir, out, "--save-every", SAVE_EVERY, "--keep-checkpoints", 2))
    return out


# ------------------------------------------------------------------------------------------ parity with the trainer
def test_every_step_matches_the_trainer(run):
    steps = [r for r in read_log(run) if "loss" in r]
    assert len(steps) == len(GOLDEN["steps"]) == 30 and GOLDEN["steps_per_epoch"] == 6
    for ours, ref in zip(steps, GOLDEN["steps"]):
        assert ours["step"] == ref["step"] and ours["epoch"] == ref["epoch"]
        assert ours["lr"] == ref["lr"]  # same float formula: exact everywhere
        if EXACT:
            assert (ours["loss"], ours["grad_norm"]) == (ref["loss"], ref["grad_norm"]), f"step {ref['step']}"
        else:
            assert ours["loss"] == pytest.approx(ref["loss"], abs=1e-6) and ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert summary(read_log(run)) == pytest.approx(GOLDEN["train_loss"], abs=0 if EXACT else 1e-6)


def test_final_weights_match_the_trainer(run):
    assert_same_weights(run, GOLDEN["final_weights"])


def test_warmup_weight_decay_and_log_intervals_match_the_trainer(standin_dir, tmp_path):
    """What the golden run leaves at 0 or 1, as the trainer does it: warmup (3 of 12 steps), weight decay (never on
    biases and LayerNorms: the parameter groups), and the loss averaged over log intervals of 4 steps."""
    variant = GOLDEN["recipe_variant"]
    args = variant["args"]
    train(*golden_args(standin_dir, tmp_path, "--epochs", args["epochs"], "--warmup-ratio", args["warmup_ratio"],
                       "--weight-decay", args["weight_decay"], "--log-every", args["logging_steps"]))
    logged = [r for r in read_log(tmp_path) if "loss" in r]
    assert [(r["step"], r["epoch"], r["lr"]) for r in logged] == [(r["step"], r["epoch"], r["lr"]) for r in variant["logged"]]
    for ours, ref in zip(logged, variant["logged"]):
        assert round(ours["loss"], 4) == ref["loss"], ours  # the trainer logs the interval's mean to 4 decimals
        assert ours["grad_norm"] == (ref["grad_norm"] if EXACT else pytest.approx(ref["grad_norm"], rel=1e-5))
    assert summary(read_log(tmp_path)) == pytest.approx(variant["train_loss"], abs=0 if EXACT else 1e-6)
    assert_same_weights(tmp_path, variant["final_weights"])


def test_batches_are_the_trainers():
    """The golden rows come from the trainer's collator; train.py takes chunks of randperm(N, seed + epoch)."""
    n, bs = GOLDEN["train_size"], ARGS["batch_size"]
    for ref in GOLDEN["steps"]:
        epoch, b = divmod(ref["step"] - 1, GOLDEN["steps_per_epoch"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(ARGS["seed"] + epoch)).tolist()
        assert ref["rows"] == order[b * bs : (b + 1) * bs]


# ---------------------------------------------------------------------------------------------------- outputs
def test_outputs(run):
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-21", "checkpoint-28"]
    ckpt = run / "checkpoint-21"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "scaler.pt",
                 "rng_state_0.pth", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (21, 3, 3)

    model = CrossEncoder.from_pretrained(run, device="cpu")  # the final model is a normal checkpoint folder
    assert model.activation == "torch.nn.modules.linear.Identity"
    assert model.max_length == ARGS["max_length"] < 512  # it scores with the length it was trained at
    assert model.predict(("вопрос", "ответ")).dtype.name == "float32"
    card = (run / "README.md").read_text()
    assert "base_model:" in card and "| 5.0000 | 30 |" in card and "44 pairs" in card and "| batch_size | `8` |" in card
    svg = ET.fromstring((run / "loss.svg").read_text())
    assert svg.tag.endswith("svg") and svg.find("{http://www.w3.org/2000/svg}polyline") is not None


# ---------------------------------------------------------------------------------------------- exact resumption
def test_resume_ends_with_the_uninterrupted_weights(run, standin_dir, tmp_path):
    """A copy of checkpoint-21 (mid-epoch) resumed with `--resume latest`; evaluation on the way must not perturb it."""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(run / f"checkpoint-{RESUME_AT}", out / f"checkpoint-{RESUME_AT}")
    shutil.copytree(run / "checkpoint-28", out / f"checkpoint-{RESUME_AT}-best")  # a user's copy: not a checkpoint-STEP
    result = train(*golden_args(standin_dir, out, "--resume", "latest", "--eval", PAIRS, "--eval-every", 4))
    assert f"resumed from {out / f'checkpoint-{RESUME_AT}'} at step {RESUME_AT}" in result.stdout
    assert (out / f"checkpoint-{RESUME_AT}-best").is_dir()  # not pruned either
    assert (out / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    resumed, full = read_log(out), read_log(run)
    assert [r["loss"] for r in resumed if "loss" in r] == [r["loss"] for r in full if "loss" in r]  # 1-21 restored
    assert summary(resumed) == summary(full)
    evals = [r for r in resumed if "eval_mrr@10" in r]
    assert [r["step"] for r in evals] == [24, 28, 30] and all(r["eval_queries"] == 4 for r in evals)
    assert "## Evaluation" in (out / "README.md").read_text()


def test_resume_refuses_a_different_run(run, tmp_path, train_inprocess):
    code, err = train_inprocess(*golden_args(run, tmp_path / "x", "--batch-size", 4, "--resume", run / "checkpoint-28"))
    assert code == 2 and "batch_size 8 -> 4" in err, err


# ------------------------------------------------------------------------------------------------------ fp16 rules
@pytest.mark.parametrize("exact", ["true", "false"])
def test_fp16_skips_overflowing_steps_and_holds_the_schedule(standin_dir, tmp_path, exact):
    """CPU autocast + GradScaler. Scale 2^18 overflows fp16 gradients here: the step is skipped, the scale halves and
    the lr does not advance; after `growth interval` clean steps in a row the scale doubles."""
    init, growth, steps = 2.0**18, 2, 6
    train("--model", standin_dir, "--train", PAIRS, "--output", tmp_path, "--batch-size", 4, "--max-steps", steps,
          "--max-length", 32, "--device", "cpu", "--log-every", 1, "--precision", "fp16", "--fp16-init-scale", init,
          "--fp16-growth-interval", growth, "--exact", exact, cpu_fp16=True)
    scale, clean, taken, skipped, grown = init, 0, 0, 0, 0
    for r in (r for r in read_log(tmp_path) if "loss" in r):
        assert r["lr"] == 5e-5 * ((steps - taken) / steps)  # LambdaLR's, in both loops (the fast one holds it as fp32)
        if r["grad_norm"] is not None:  # null in log.jsonl: inf or nan
            taken, clean = taken + 1, clean + 1
            if clean == growth:
                scale, clean, grown = scale * 2, 0, grown + 1
        else:
            scale, clean, skipped = scale / 2, 0, skipped + 1
        assert r["scale"] == scale, r
    assert skipped and grown, "the run should show both an overflow and a growth"


def test_fp16_grad_scaler_defaults_are_the_trainers(standin_dir, tmp_path):
    """Without the options: GradScaler(init_scale 65536, growth 2.0, backoff 0.5, growth_interval 2000), as
    transformers builds it for the card's fp16 run."""
    train("--model", standin_dir, "--train", PAIRS, "--output", tmp_path, "--batch-size", 4, "--max-steps", 1,
          "--max-length", 16, "--device", "cpu", "--precision", "fp16", "--save-every", 1, cpu_fp16=True)
    scaler = torch.load(tmp_path / "checkpoint-1" / "scaler.pt", weights_only=True)
    assert {k: scaler[k] for k in ("growth_factor", "backoff_factor", "growth_interval")} == \
        {"growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
    assert scaler["scale"] in (65536.0, 32768.0)  # 32768 had the first step's gradients overflowed


def test_fp16_skipped_steps_leave_the_weights_alone(standin_dir, tmp_path):
    train("--model", standin_dir, "--train", PAIRS, "--output", tmp_path, "--batch-size", 4, "--max-steps", 2,
          "--max-length", 16, "--device", "cpu", "--log-every", 1, "--precision", "fp16", "--fp16-init-scale", 2.0**40,
          cpu_fp16=True)
    log = [r for r in read_log(tmp_path) if "loss" in r]
    assert [r["scale"] for r in log] == [2.0**39, 2.0**38] and [r["lr"] for r in log] == [5e-5, 5e-5]
    before, after = load_file(standin_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


# -------------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def train_inprocess(capsys):
    """train.py in this process, for runs that stop at a check before training: (exit status, stderr)."""

    def go(*args):
        argv, sys.argv = sys.argv, ["train.py", *map(str, args)]
        try:
            runpy.run_path(str(TRAIN), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            sys.argv = argv
        return code, capsys.readouterr().err

    return go


GOOD = '{"query": "q", "passage": "p", "label": 1}\n'
BAD_DATA = [
    ("t.jsonl", GOOD + '{"query": "q", "label": 0}\n', "t.jsonl:2: missing field 'passage'"),
    ("t.jsonl", GOOD + GOOD + '{"query": "q", "passage": "  ", "label": 0}\n', "t.jsonl:3: field 'passage' is empty"),
    ("t.jsonl", GOOD + '{"query": "q", "passage": "p", "label": 1.5}\n', "t.jsonl:2: field 'label': expected a number in [0, 1]"),
    ("t.jsonl", '{"query": "q", "passage": "p", "label": "yes"}\n', "t.jsonl:1: field 'label'"),
    ("t.jsonl", '{"query": "q", "passage": "p"}\n', "t.jsonl:1: missing field 'label'"),
    ("t.jsonl", GOOD + '{"query": "q", "passage": "p", "label": "0_1"}\n', "t.jsonl:2: field 'label'"),  # float() would take it
    ("t.jsonl", GOOD * 3 + '{"query": "q\\udc80", "passage": "p", "label": 1}\n', "t.jsonl:4: field 'query': not valid Unicode"),
    ("t.jsonl", GOOD + '{"query": "q", "passage": "p", "label": 1\n', "t.jsonl:2: malformed JSON"),
    ("t.jsonl", "", "t.jsonl: no rows"),
    ("t.jsonl", GOOD + '{"query": "q", "passage": "p", "label": 1' + "0" * 400 + '}\n', "t.jsonl:2: field 'label': expected "
     "a number in [0, 1], got 1000"),  # no float holds it: an OverflowError before
    ("t.jsonl", '{"query": "q", "passage": "p", "label": 1, "id": 1' + "0" * 5000 + '}\n', "t.jsonl:1: the number "
     "100000000000... has 5,001 digits; at most 4,300 are read"),  # not Python's advice to call sys.set_int_max_str_digits
    ("t.tsv", "query\tpassage\tlabel\nq\tp\t1\nq\tp\n", "t.tsv:3: expected 3 fields"),
    ("t.csv", "sentence_0,sentence_1\nq,p\n", "t.csv:2: missing field 'label'"),
    ("t.csv", "query,passage,score\nq,p,1\n", "t.csv:2: missing field 'label' (the row has 'query', 'passage', 'score'; "
     "sentence-transformers datasets call it 'score': rename that field)"),
]


@pytest.mark.parametrize("name,text,message", BAD_DATA, ids=[f"{i}-{m.split(': ', 1)[1][:24]}" for i, (_, _, m) in enumerate(BAD_DATA)])
@pytest.mark.parametrize("role", ["train", "eval"])
def test_bad_data_exits_2_naming_the_line(tmp_path, train_inprocess, name, text, message, role):
    bad = tmp_path / name
    bad.write_text(text, encoding="utf-8")
    good = tmp_path / "good.jsonl"
    good.write_text(GOOD, encoding="utf-8")
    files = {"train": bad, "eval": good} if role == "train" else {"train": good, "eval": bad}
    code, err = train_inprocess("--train", files["train"], "--eval", files["eval"], "--output", tmp_path / "out")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--epochs", "2.5"], "argument --epochs: expected a whole number, got '2.5'"),
    (["--lr=fast"], "argument --lr: expected a number, got 'fast'"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--batch_size"], "argument --batch-size: expected one argument"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),  # no abbreviations: a typo is not another option
    (["extra"], "unrecognized arguments: extra"),
    (["--precision", "fp8"], "--precision must be auto, fp32, fp16 or bf16"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--warmup-ratio", "nan"], "--warmup-ratio must be in [0, 1], got nan"),
    (["--lr", "inf"], "--lr must be > 0 and below 3.4e38 (the lr table is fp32), got inf"),
    (["--lr", "1e39"], "--lr must be > 0 and below 3.4e38"),  # a Python float, but inf in the fast loop's fp32 lr table
    (["--weight-decay", "inf"], "--weight-decay must be 0 or more and below 3.4e38 (fp32), got inf"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be > 0 (inf: no clipping), got nan"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1, got 0"),
    (["--max-length", "-1"], "--max-length must be 0 (the checkpoint's) or at least 5 (a token of query and passage each), got -1"),
    (["--max-length", "4"], "--max-length must be 0 (the checkpoint's) or at least 5"),  # 4 leaves the query no token
    (["--seed", str(2**32)], f"--seed must be in [0, 2**32) (numpy's limit), got {2**32}"),
    (["--fp16-init-scale", "inf"], "--fp16-init-scale must be > 0 and below 3.4e38"),  # every step skipped, nothing trained
    (["--eval-every", "5"], "--eval-every needs --eval FILE"),
    (["--cuda-graphs", "yes"], "--cuda-graphs must be auto, true or false, got 'yes'"),
    (["--cuda-graphs", "true"], "--cuda-graphs true is for the fast loop on one GPU"),  # this CPU
    (["--train", "-", "--eval", "-"], "--train and --eval cannot both read standard input ('-')"),
    (["--model="], "the model name is empty (''): give a local folder"),  # not the current folder
    (["--max-steps", "300000000"], "train.py runs at most 100,000,000"),  # not a MemoryError building the lr table
    (["--epochs", "200000000"], "train.py runs at most 100,000,000"),
    (["--seed", "-1"], "--seed must be in [0, 2**32) (numpy's limit), got -1"),
    (["--fp16-growth-interval", "0"], "--fp16-growth-interval must be at least 1, got 0"),
    (["--overwrite-output", "maybe"], "argument --overwrite-output: expected true or false, got 'maybe'"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 is for GPUs"),
    (["--precision", "fp16", "--device", "cpu"], "fp32"),  # suggested; not int8, which train.py does not take
    (["--train", "t.txt"], "t.txt: cannot tell the format from the extension 'txt'; use .jsonl, .tsv or .csv"),
    (["--device", "meta"], "train.py runs on cpu or cuda"),
    # what Python's int() and float() take but nobody means: a typo must not pass as another number
    (["--epochs", "1_0"], "argument --epochs: expected a whole number, got '1_0'"),
    (["--seed", "\u0663"], "argument --seed: expected a whole number, got '\u0663'"),  # int("٣") is 3
    (["--batch-size", " 16"], "argument --batch-size: expected a whole number, got ' 16'"),
    (["--lr", "5_0e-6"], "argument --lr: expected a number, got '5_0e-6'"),
    (["--lr", "5e-5 "], "argument --lr: expected a number, got '5e-5 '"),
    (["--exact", "yes"], "argument --exact: expected true or false, got 'yes'"),
    (["--lr", "-1e-5"], "--lr must be > 0 and below 3.4e38 (the lr table is fp32), got -1e-05"),  # not "expected one argument"
    (["--max-grad-norm", "-inf"], "--max-grad-norm must be > 0 (inf: no clipping), got -inf"),
])
def test_bad_options_exit_2(tmp_path, train_inprocess, args, message):
    (tmp_path / "t.jsonl").write_text(GOOD)
    (tmp_path / "t.txt").write_text(GOOD)
    code, err = train_inprocess("--train", tmp_path / "t.jsonl", "--output", tmp_path / "out", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "int8" not in err and "--format" not in err, err  # options train.py does not have
    assert err.startswith("train.py: error: "), err
    assert not (tmp_path / "out").exists()


def test_help_lists_every_option():
    done = subprocess.run([sys.executable, str(TRAIN), "--help"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    for name in TRAIN_OPTIONS:
        assert f"--{name} " in done.stdout, name


TRAIN_OPTIONS = ["model", "revision", "train", "output", "eval", "epochs", "batch-size", "lr", "warmup-ratio",
                 "weight-decay", "max-grad-norm", "seed", "precision", "max-length", "log-every", "eval-every",
                 "save-every", "keep-checkpoints", "exact", "cuda-graphs", "resume", "overwrite-output", "max-steps",
                 "device", "fp16-init-scale", "fp16-growth-interval"]


def test_train_and_output_are_required(train_inprocess):
    code, err = train_inprocess("--train", PAIRS)
    assert code == 2 and err.splitlines()[-1] == "train.py: error: --output DIR is required (see train.py --help)"


def test_underscored_options_are_accepted(tmp_path, train_inprocess):
    code, err = train_inprocess("--train", tmp_path / "none.jsonl", "--output", tmp_path / "out", "--batch_size=4", "--log_every", "2")
    assert code == 2 and "none.jsonl: cannot open" in err, err  # the options parsed; the missing file stopped it


@pytest.mark.parametrize("hf_option, ours", [("--learning_rate=2e-5", "use --lr"), ("--num_train_epochs", "use --epochs"),
                                             ("--fp16", "use --precision fp16"), ("--output-dir", "use --output")])
def test_hugging_face_option_names_are_pointed_to_ours(tmp_path, train_inprocess, hf_option, ours):
    """Not taken (TrainingArguments' per-device batch is not the global --batch-size): the error names the option."""
    code, err = train_inprocess("--train", tmp_path / "t.jsonl", "--output", tmp_path / "out", hf_option, "3")
    name = hf_option.partition("=")[0].lstrip("-").replace("-", "_")
    assert code == 2 and err.startswith("train.py: error: unrecognized arguments: ") and \
        f"; for Hugging Face's --{name}, {ours} (see train.py --help)" in err, err


# ------------------------------------------------------------------------------------- a reused --output folder
def short_run(model, output, *extra):
    return ["--model", model, "--train", PAIRS, "--output", output, "--batch-size", 8, "--max-steps", 2, "--max-length", 16,
            "--device", "cpu", "--log-every", 1, "--save-every", 1, *extra]


def test_a_head_drawn_at_load_follows_the_seed(standin_dir, tmp_path):
    """A checkpoint without a head (a bare encoder) gets one drawn when it is loaded: from --seed, so that one command
    always trains the same model."""
    bare = tmp_path / "bare"
    shutil.copytree(standin_dir, bare)
    state = load_file(bare / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("classifier.")}, bare / "model.safetensors")
    heads = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        train(*short_run(bare, tmp_path / name, "--seed", seed, "--save-every", 0))
        heads.append(load_file(tmp_path / name / "model.safetensors")["classifier.weight"])
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


def test_output_holding_another_run_is_refused_and_never_pruned(run, standin_dir, tmp_path, train_inprocess):
    """Checkpoints of an earlier run in --output are not taken for this run's, nor deleted by its pruning."""
    out = tmp_path / "reused"
    out.mkdir()
    shutil.copytree(run / "checkpoint-28", out / "checkpoint-28")  # another run (30 steps), further along
    code, err = train_inprocess(*short_run(standin_dir, out))
    assert code == 2 and "is not empty (checkpoint-28)" in err and "--resume latest" in err, err
    code, err = train_inprocess(*short_run(standin_dir, out, "--resume", "latest"))
    assert code == 2 and "training data" not in err and "total_steps 30 -> 2" in err and "max_length 80 -> 16" in err, err
    train(*short_run(standin_dir, out, "--overwrite-output", "true"))  # starts over: the old checkpoints go
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    shutil.copytree(run / "checkpoint-28", out / "checkpoint-28")
    train(*short_run(standin_dir, out, "--resume", str(out / "checkpoint-1"), "--keep-checkpoints", 1))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-28"]  # 28 is not ours


def test_resume_refuses_changed_data_or_settings(run, standin_dir, tmp_path, train_inprocess):
    """Same number of rows but other labels, or another lr / max_length / precision: not the run that was saved."""
    rows = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text("".join(json.dumps({**r, "label": 1 - r["label"]}) + "\n" for r in rows), encoding="utf-8")
    args = golden_args(standin_dir, tmp_path / "x", "--resume", run / "checkpoint-28")
    code, err = train_inprocess(*[flipped if a == PAIRS else a for a in args])
    assert code == 2 and "the training data's content (sha256 " in err and "exact resumption needs the same data" in err, err
    code, err = train_inprocess(*args, "--lr", "1e-4", "--precision", "bf16")
    assert code == 2 and "lr 5e-05 -> 0.0001" in err and "precision 'fp32' -> 'bf16'" in err, err


@pytest.mark.parametrize("damage", ["truncated optimizer.pt", "no scaler.pt", "empty trainer_state.json",
                                    "another step in trainer_state.json", "an empty interval in trainer_state.json",
                                    "a negative interval in trainer_state.json"])
def test_resume_from_a_damaged_checkpoint_exits_2(run, standin_dir, tmp_path, train_inprocess, damage):
    ckpt = tmp_path / "checkpoint-28"
    shutil.copytree(run / "checkpoint-28", ckpt)
    if damage.startswith("truncated"):
        (ckpt / "optimizer.pt").write_bytes((ckpt / "optimizer.pt").read_bytes()[:1000])
    elif damage.startswith("no"):
        (ckpt / "scaler.pt").unlink()
    elif damage.startswith("another"):  # checkpoint-28 that says step 21 would resume at the wrong place
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "step": 21}))
    elif damage.startswith("an empty"):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "interval": {}}))
    elif damage.startswith("a negative"):  # its mean loss would divide by zero steps at the next log
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "interval": {**state["interval"], "steps": -1}}))
    else:
        (ckpt / "trainer_state.json").write_text("{}")
    code, err = train_inprocess(*golden_args(standin_dir, tmp_path / "x", "--resume", ckpt))
    assert code == 2 and str(ckpt) in err and len(err.strip().splitlines()) == 1, err
    # `--resume latest` in a folder whose newest checkpoint is damaged: not skipped, but the one before it is named
    out = tmp_path / "latest"
    shutil.copytree(run / f"checkpoint-{RESUME_AT}", out / f"checkpoint-{RESUME_AT}")
    shutil.move(ckpt, out / "checkpoint-28")
    code, err = train_inprocess(*golden_args(standin_dir, out, "--resume", "latest"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--resume: {out / 'checkpoint-28'} is " in err, err
    assert err.strip().endswith(f"; the one before it: --resume {out / f'checkpoint-{RESUME_AT}'}"), err


def test_eval_data_without_a_relevant_passage_exits_2(tmp_path, train_inprocess, capsys):
    (tmp_path / "t.jsonl").write_text(GOOD)
    (tmp_path / "e.jsonl").write_text(GOOD.replace('"label": 1', '"label": 0') * 3)
    code, err = train_inprocess("--train", tmp_path / "t.jsonl", "--eval", tmp_path / "e.jsonl", "--output", tmp_path / "o")
    assert code == 2 and "e.jsonl: no query has a relevant passage" in err, err
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--model", "unused", "--data", str(tmp_path / "e.jsonl")])
    assert e.value.code == 2 and "no query has a relevant passage" in capsys.readouterr().err


QID_ERRORS = [
    ('{"qid": 1, "query": "a", "passage": "p", "label": 1}\n{"query": "a", "passage": "p", "label": 0}\n',
     "e.jsonl:2: line 1 has a 'qid' and line 2 none"),
    ('{"query": "a", "passage": "p", "label": 1}\n{"qid": null, "query": "a", "passage": "p", "label": 0}\n'
     '{"qid": 1, "query": "a", "passage": "p", "label": 0}\n', "e.jsonl:3: line 3 has a 'qid' and line 1 none"),
    ('{"qid": 1.5, "query": "a", "passage": "p", "label": 1}\n', "e.jsonl:1: field 'qid': expected text or a whole number, got 1.5"),
    ('{"qid": true, "query": "a", "passage": "p", "label": 1}\n', "e.jsonl:1: field 'qid': expected text or a whole number, got true"),
    ('{"qid": [1], "query": "a", "passage": "p", "label": 1}\n', "e.jsonl:1: field 'qid': expected text or a whole number, got [1]"),
    ('{"qid": " ", "query": "a", "passage": "p", "label": 1}\n', "e.jsonl:1: field 'qid' is empty"),
    # two files with qids 0, 1, ... concatenated: their candidates would be ranked together
    ('{"qid": 7, "query": "a", "passage": "p", "label": 1}\n{"qid": "7", "query": "b", "passage": "p", "label": 0}\n',
     """e.jsonl:2: qid "7" is the query 'b' here and 'a' at line 1: one qid, one query"""),
]


@pytest.mark.parametrize("text,message", QID_ERRORS, ids=[m.split(": ", 1)[1][:30] for _, m in QID_ERRORS])
def test_eval_qids_are_checked_before_training(tmp_path, train_inprocess, capsys, text, message):
    (tmp_path / "t.jsonl").write_text(GOOD)
    (tmp_path / "e.jsonl").write_text(text)
    code, err = train_inprocess("--train", tmp_path / "t.jsonl", "--eval", tmp_path / "e.jsonl", "--output", tmp_path / "o")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--model", "unused", "--data", str(tmp_path / "e.jsonl")])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_an_error_is_printed_outside_torchrun_whatever_local_rank_says(tmp_path, train_inprocess, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")  # left in the environment by some launcher; RANK is not set
    code, err = train_inprocess("--train", tmp_path / "missing.jsonl", "--output", tmp_path / "o")
    assert code == 2 and "missing.jsonl: cannot open" in err, err


def test_qids_1_and_text_1_are_one_query(tmp_path):
    (tmp_path / "e.jsonl").write_text('{"qid": 1, "query": "a", "passage": "p", "label": 1}\n'
                                      '{"qid": "1", "query": "a", "passage": "r", "label": 0}\n'
                                      '{"qid": "x", "query": "a", "passage": "s", "label": 0}\n')
    assert [p.qid for p in read_ranking_pairs(str(tmp_path / "e.jsonl"))] == ["1", "1", "x"]
    with_qids = read_pairs(str(PAIRS), require_label=True)
    assert fingerprint(with_qids, with_qids=True) != fingerprint(with_qids)
    (tmp_path / "none.jsonl").write_text(GOOD * 2)  # data without qids fingerprints as it did before qids counted
    no_qids = read_pairs(str(tmp_path / "none.jsonl"), require_label=True)
    assert fingerprint(no_qids, with_qids=True) == fingerprint(no_qids)
    (tmp_path / "e.tsv").write_text("qid\tquery\tpassage\tlabel\n1\ta\tp\t1\n1\tb\tp\t0\n")
    with pytest.raises(DataError, match=r"e.tsv:3: qid \"1\" is the query 'b' here and 'a' at line 2"):
        read_ranking_pairs(str(tmp_path / "e.tsv"))


LOGGED = '{"step": 1, "epoch": 0.2, "loss": 0.69}\n'  # a log.jsonl that a run wrote a step to


def test_output_that_is_not_this_runs_is_refused(run, standin_dir, tmp_path, train_inprocess):
    """A folder with someone's files, the model's own folder, or another run's while resuming from elsewhere: refused
    before anything is read or written (the Hugging Face Trainer would overwrite them)."""
    (tmp_path / "t.jsonl").write_text(GOOD)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    code, err = train_inprocess("--train", tmp_path / "t.jsonl", "--output", notes)
    assert code == 2 and "is not empty (notes.txt); choose another folder" in err and "--overwrite" not in err, err
    # a folder with the user's own README.md and config.json holds no run: --overwrite-output must not delete them
    (notes / "README.md").write_text("mine")
    (notes / "config.json").write_text("{}")
    for option in (["--overwrite-output", "true"], ["--resume", "latest"]):
        code, err = train_inprocess("--train", tmp_path / "t.jsonl", "--output", notes, *option)
        assert code == 2 and "holds no train.py run (no log.jsonl, no checkpoint-STEP folder)" in err, err
    (notes / "README.md").unlink()
    (notes / "config.json").unlink()
    stopped = tmp_path / "stopped"  # a run stopped before its first checkpoint: nothing to resume, say so
    stopped.mkdir()
    (stopped / "log.jsonl").write_text(LOGGED)
    code, err = train_inprocess("--train", tmp_path / "t.jsonl", "--output", stopped)
    assert code == 2 and "it holds a run that saved no checkpoint to resume from; --overwrite-output true to start " \
        "over" in err and "--resume" not in err, err
    model = tmp_path / "model"
    shutil.copytree(standin_dir, model)
    code, err = train_inprocess("--model", model, "--train", tmp_path / "t.jsonl", "--output", model, "--overwrite-output", "true")
    assert code == 2 and "holds no train.py run" in err, err
    (model / "log.jsonl").write_text(LOGGED)  # a model that train.py saved: its own run's folder
    code, err = train_inprocess("--model", model, "--train", tmp_path / "t.jsonl", "--output", model, "--overwrite-output", "true")
    assert code == 2 and "holds the --model folder" in err, err
    (tmp_path / "log.jsonl").write_text(LOGGED)
    code, err = train_inprocess("--model", model, "--train", tmp_path / "t.jsonl", "--output", tmp_path, "--overwrite-output", "true")
    assert code == 2 and "holds the --model folder" in err, err  # the folder above it: --overwrite-output would empty it
    (tmp_path / "log.jsonl").unlink()
    (model / "log.jsonl").unlink()
    code, err = train_inprocess("--train", tmp_path / "t.jsonl", "--output", notes, "--resume", run / "checkpoint-28")
    assert code == 2 and "its run is not the one in --output" in err, err
    assert sorted(p.name for p in notes.iterdir()) == ["notes.txt"] and len(list(model.iterdir())) == len(list(standin_dir.iterdir()))


def test_a_text_with_no_tokens_exits_2_naming_the_line(standin_dir, tmp_path, train_inprocess):
    """Only zero-width or soft-hyphen characters: no tokens, refused like an empty text, in --train and in --eval."""
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(GOOD)
    bad.write_text(GOOD * 3 + '{"query": "\\u200b", "passage": "\\u00ad", "label": 0}\n')
    for role in ("--train", "--eval"):
        files = {"--train": good, "--eval": good, role: bad}
        code, err = train_inprocess("--model", standin_dir, "--train", files["--train"], "--eval", files["--eval"],
                                    "--output", tmp_path / "out")
        assert code == 2 and "bad.jsonl:4: the query has no tokens" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_exits_2(tmp_path, train_inprocess):
    (tmp_path / "t.jsonl").write_text(GOOD)
    (tmp_path / "out").write_text("not a folder")
    code, err = train_inprocess("--train", tmp_path / "t.jsonl", "--output", tmp_path / "out")
    assert code == 2 and "exists and is not a folder" in err, err


@pytest.mark.parametrize("fails_at", [1, 2])
def test_a_full_disk_while_saving_a_checkpoint(standin_dir, tmp_path, train_inprocess, monkeypatch, fails_at):
    """The disk fills while checkpoint `fails_at` writes its optimizer state: one line saying so and which checkpoint
    is kept, exit status 1, no temporary checkpoint folder left."""
    import minilm.checkpoint

    write_bytes = minilm.checkpoint.write_bytes

    def full_disk_at(path, data):
        if Path(path).parent.name == f".checkpoint-{fails_at}.tmp" and Path(path).name == "optimizer.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_bytes(path, data)

    monkeypatch.setattr(minilm.checkpoint, "write_bytes", full_disk_at)
    code, err = train_inprocess(*short_run(standin_dir, tmp_path / "out"))
    kept = "the last complete checkpoint, checkpoint-1, is kept: --resume latest continues from it" if fails_at == 2 \
        else "no checkpoint to resume from"
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"train.py: error: writing checkpoint {tmp_path / 'out' / f'checkpoint-{fails_at}'} failed "
                          f"([Errno 28] No space left on device); {kept}"), err
    assert [p.name for p in (tmp_path / "out").glob("*checkpoint-*")] == ["checkpoint-1"] * (fails_at - 1)


STOPPED_WHILE_SAVING = """
import os, runpy, signal, sys
import minilm.checkpoint
torch_save = minilm.checkpoint.torch_save
def sigterm_at_optimizer(path, obj):  # SIGTERM (a job scheduler, kill) while checkpoint-2 is written
    if path.parent.name == ".checkpoint-2.tmp" and path.name == "optimizer.pt":
        os.kill(os.getpid(), signal.SIGTERM)
    torch_save(path, obj)
minilm.checkpoint.torch_save = sigterm_at_optimizer
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigterm_while_saving_a_checkpoint_leaves_no_half_checkpoint(standin_dir, tmp_path):
    """Stopped while a checkpoint is written: one line, checkpoint-1 to resume from, and no .checkpoint-2.tmp (270 MB
    for this model) left behind."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", STOPPED_WHILE_SAVING, TRAIN, *map(str, short_run(standin_dir, out))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        "train.py: stopped by SIGTERM; --resume latest continues from the last checkpoint", done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "log.jsonl"]


@pytest.mark.parametrize("save_every, limit_mb, what", [
    (1, 120, "writing checkpoint {out}/checkpoint-1"),  # model.safetensors (91 MB) fits, optimizer.pt (182 MB) not
    (0, 60, "saving the trained model to {out}")])
def test_a_write_that_fails_in_torch_or_safetensors_is_one_line(standin_dir, tmp_path, save_every, limit_mb, what):
    """Real writers, failing as on a full disk: a file size limit (RLIMIT_FSIZE) makes every write past it fail. Given
    a file, torch's zip writer turns that error into a RuntimeError ("unexpected pos ...") with a traceback, and
    safetensors' save_file into a SafetensorError after leaving a temporary file of its own behind."""
    import resource
    import signal

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_mb << 20, limit_mb << 20))

    out = tmp_path / "out"
    argv = [sys.executable, str(TRAIN), *map(str, short_run(standin_dir, out)), "--max-steps", 1, "--save-every", save_every]
    done = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=300, cwd=REPO,
                          preexec_fn=limited, env={**os.environ, "OMP_NUM_THREADS": "2"})
    lost = "the trained weights are lost; " if save_every == 0 else ""
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"train.py: error: {what.format(out=out)} failed ([Errno 27] File too "
                                                    f"large); {lost}no checkpoint to resume from"), done.stderr
    assert "Traceback" not in done.stderr
    assert not list(out.glob(".*")) and not (out / "model.safetensors").exists()  # no writer's temporary file or folder
    assert not [name for name in ("config.json", *TOKENIZER_FILES) if (out / name).exists()]  # nor half a model


KILLED_WHILE_DELETING = """
import os, runpy, shutil, signal, sys
rmtree = shutil.rmtree
def rmtree_then_die(path, *args, **kwargs):  # SIGKILL halfway through deleting checkpoint-1
    state = os.path.join(path, "trainer_state.json")
    if os.path.basename(path) in ("checkpoint-1", ".checkpoint-1.deleted.tmp") and os.path.isfile(state):
        os.remove(state)
        os.kill(os.getpid(), signal.SIGKILL)
    return rmtree(path, *args, **kwargs)
shutil.rmtree = rmtree_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_an_output_left_by_a_run_stopped_before_its_first_step_is_reused(standin_dir, tmp_path):
    """Ctrl-C before step 1 leaves an empty log.jsonl: the same command again trains, instead of asking for
    --overwrite-output."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text("")
    train(*short_run(standin_dir, out, "--save-every", 0))
    assert (out / "model.safetensors").is_file() and (out / "log.jsonl").stat().st_size > 0


def test_a_run_killed_while_deleting_a_checkpoint_leaves_none_half_deleted(standin_dir, tmp_path):
    """A checkpoint being deleted (--keep-checkpoints) is renamed out of the way first. Deleted in place, a kill
    halfway left a checkpoint-STEP without its trainer_state.json: never counted as the run's again, never removed,
    and offered by --resume's error as the one to go back to."""
    out = tmp_path / "out"
    args = short_run(standin_dir, out, "--max-steps", 3, "--keep-checkpoints", 1)
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_DELETING, TRAIN, *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert not (out / "checkpoint-1").exists() and (out / "checkpoint-2" / "trainer_state.json").is_file()
    train(*args, "--resume", "latest")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]


def test_a_second_run_in_the_same_output_is_refused(standin_dir, tmp_path, train_inprocess):
    """Two runs in one folder would mix logs, checkpoints and models, and both say they saved theirs. The running one
    holds a lock on the folder (taken here as it would hold it)."""
    out = tmp_path / "out"
    out.mkdir()
    held = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        errors = [train_inprocess(*short_run(standin_dir, out))]
        (out / "checkpoint-1").mkdir()  # being deleted by the running one, say: --resume must not read it first
        errors.append(train_inprocess(*short_run(standin_dir, out, "--resume", "latest")))
    finally:
        os.close(held)
    for code, err in errors:
        assert code == 2 and err == f"train.py: error: --output {out}: another train.py is writing there now (a run " \
            "still going, or the processes of a killed torchrun); wait for it or stop it, or choose another folder\n"
    (out / "checkpoint-1").rmdir()
    assert list(out.iterdir()) == []
    code, err = train_inprocess(*short_run(standin_dir, out), "--max-steps", 1)  # released: the folder is usable
    assert code == 0, err


# ------------------------------------------------------------------------------------------------------------ DDP
def ddp_worker(rank, world, port, argv, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.argv = ["train.py", *argv]
    exit_after_process_group, cli.exit_after_process_group = cli.exit_after_process_group, lambda status: None
    script = runpy.run_path(str(TRAIN), run_name="__main__")  # its last step is left to this worker: the weights first
    Path(out, f"rank{rank}.json").write_text(json.dumps(weights_fingerprint(script["model"].state_dict())))
    exit_after_process_group(0)


LOSES_A_PROCESS = """
import os, runpy, sys
import torch.nn.functional as F
bce, calls = F.binary_cross_entropy_with_logits, []
def dying(*args, **kwargs):  # process 1 crashes at its third step, saying nothing
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        os._exit(3)
    return bce(*args, **kwargs)
F.binary_cross_entropy_with_logits = dying
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_process_lost_under_torchrun_is_one_line(standin_dir, tmp_path):
    """The process left behind says so in one line (not gloo's traceback), and nothing else (no "stopped by SIGTERM"
    when torchrun then stops it)."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--no-python", sys.executable, "-c", LOSES_A_PROCESS, str(TRAIN), *map(str, short_run(
                               standin_dir, tmp_path / "o", "--batch-size", 4, "--max-steps", 6, "--save-every", 0))],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if "train.py:" in line]
    assert len(said) == 1 and re.search(r"train.py: error: process 0 lost contact with another process \(.*by peer\); "
                                        "that one failed or was stopped", said[0]), done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_kill_9_of_torchrun_stops_its_processes(standin_dir, tmp_path):
    """torchrun starts its processes in sessions of their own: killed outright, it left them training on, holding
    --output. They now get SIGTERM when it dies and stop as on Ctrl-C: one line, nothing half-written, --output free."""
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(TRAIN), *map(str, short_run(standin_dir, out, "--max-steps", 10_000))],
                            cwd=REPO, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 240
    while not (out / "checkpoint-2").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert (out / "checkpoint-2").is_dir(), proc.stderr.read() if proc.poll() is not None else "no checkpoint yet"
    proc.kill()
    proc.wait(timeout=60)
    assert still_running_after(60, str(out)) == [], "torchrun's processes outlived it"
    said = [line for line in proc.stderr.read().splitlines() if line.startswith("train.py:")]
    assert said == ["train.py: stopped by SIGTERM; --resume latest continues from the last checkpoint"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no half-written checkpoint or model
    held = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while a process of the run holds --output
    finally:
        os.close(held)


def test_standard_input_under_torchrun_is_refused(tmp_path, train_inprocess, monkeypatch):
    """Every process would read the one pipe: each got part of it (malformed JSON, or no rows)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = train_inprocess("--train", "-", "--output", tmp_path / "o")
    assert code == 2 and "under torchrun every process reads --train and --eval: give files" in err, err


def test_bad_data_under_torchrun_is_one_line(tmp_path):
    """Every process finds the same bad row; one of them (per machine) says so."""
    (tmp_path / "t.jsonl").write_text(GOOD + '{"query": "q", "passage": "p", "label": 2}\n')
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(TRAIN), "--train", tmp_path / "t.jsonl", "--output", tmp_path / "o", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "train.py: error:" in line]
    assert errors == [f"train.py: error: {tmp_path / 't.jsonl'}:2: field 'label': expected a number in [0, 1], got 2"], done.stderr


def spawn_ddp(world: int, argv: list, out: Path) -> str:
    """train.py in `world` gloo processes; the fingerprint of the weights, which every process must hold."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(ddp_worker, args=(world, port, [str(a) for a in argv], out), nprocs=world)
    shas = {json.loads((out / f"rank{r}.json").read_text())["sha256"] for r in range(world)}
    assert len(shas) == 1, "replicas diverged"
    return shas.pop()


def test_ddp_three_processes_resume_to_the_uninterrupted_weights(standin_dir, tmp_path):
    """With 3 processes the gloo ring's sums depend on DDP's gradient buckets: rebuilt after the first step (as DDP
    does without find_unused_parameters), a resumed run's first step summed in another order (1.6e-7 apart)."""
    data = tmp_path / "ten.jsonl"
    data.write_text("".join(PAIRS.read_text(encoding="utf-8").splitlines(keepends=True)[:10]), encoding="utf-8")
    argv = ["--model", standin_dir, "--train", data, "--batch-size", 4, "--max-steps", 6, "--max-length", 32,
            "--device", "cpu", "--log-every", 4, "--save-every", 3, "--exact", "true"]
    uninterrupted = spawn_ddp(3, [*argv, "--output", tmp_path / "ddp"], tmp_path)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "ddp" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    assert spawn_ddp(3, [*argv, "--output", tmp_path / "resumed", "--resume", "latest"], tmp_path) == uninterrupted


@pytest.mark.parametrize("exact", ["true", "false"])
def test_ddp_gloo_two_processes(standin_dir, tmp_path, exact):
    """2 CPU ranks on 9 pairs in global batches of 8: rows 0-3 / 4-7, then a 1-row batch that rank 0 sits out. The
    first log interval (steps 1-2) straddles checkpoint-1: resumed from there, the run logs what it logged."""
    data = tmp_path / "nine.jsonl"
    data.write_text("".join(PAIRS.read_text(encoding="utf-8").splitlines(keepends=True)[:9]), encoding="utf-8")
    argv = ["--model", standin_dir, "--train", data, "--batch-size", 8, "--max-steps", 3, "--max-length", 32,
            "--device", "cpu", "--log-every", 2, "--save-every", 1, "--keep-checkpoints", 3, "--exact", exact]

    def torchrun(*args):
        return spawn_ddp(2, argv + list(args), tmp_path)

    uninterrupted = torchrun("--output", tmp_path / "ddp")
    assert weights_fingerprint(load_file(tmp_path / "ddp" / "model.safetensors"))["sha256"] == uninterrupted
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "ddp" / "checkpoint-1", tmp_path / "resumed" / "checkpoint-1")
    assert torchrun("--output", tmp_path / "resumed", "--resume", "latest") == uninterrupted
    timings = ("seconds", "tokens_per_s", "train_runtime", "train_steps_per_second")
    resumed, full = ([{k: v for k, v in r.items() if k not in timings} for r in read_log(tmp_path / d)] for d in ("resumed", "ddp"))
    assert resumed == full

    train(*argv, "--output", tmp_path / "single")  # the same run in one process: same data and batches
    ddp_log, single_log = ([r for r in read_log(tmp_path / d) if "loss" in r] for d in ("ddp", "single"))
    assert [r["lr"] for r in ddp_log] == [r["lr"] for r in single_log]
    for a, b in zip(ddp_log, single_log):  # dropout masks differ (drawn per rank), the rest agrees
        assert a["loss"] == pytest.approx(b["loss"], abs=0.05) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.2)
    # Adam's first steps move every weight by about lr whatever the gradient's size, so the small, dropout-dominated
    # gradients scatter; the direction of the update still agrees (measured: cosine 0.62 overall, 0.90 classifier).
    start, ddp_w, single_w = (load_file(p / "model.safetensors") for p in (standin_dir, tmp_path / "ddp", tmp_path / "single"))

    def cosine(keys):
        update = [torch.cat([(w[k] - start[k]).flatten() for k in keys]) for w in (ddp_w, single_w)]
        return torch.nn.functional.cosine_similarity(*update, dim=0).item()

    assert cosine(list(start)) > 0.4 and cosine(["classifier.weight"]) > 0.7


# ------------------------------------------------------------------------------------------------------ evaluation
def test_metrics_by_hand():
    groups = ["a", "a", "a", "b", "b", "c", "c", "d"] + ["e"] * 12
    labels = [0, 1, 0, 1, 0, 0, 0, 1] + [0] * 11 + [1]
    scores = [3, 2, 1, 0.9, 0.5, 1, 2, 7] + list(range(20, 9, -1)) + [5]
    m = rerank_metrics(groups, labels, scores)
    # a: hit at rank 2; b: rank 1; c: no relevant candidate (left out); d: rank 1; e: rank 12, beyond the cut-off
    assert m["mrr@10"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 + 1 + 0) / 4)
    assert m["r@1"] == pytest.approx(2 / 4) and (m["queries"], m["skipped"]) == (4, 1)
    # equal scores count against the model, whatever the file's order: a constant scorer earns nothing by it
    for labels in ([0, 1], [1, 0]):
        assert rerank_metrics(["q", "q"], labels, [1.0, 1.0])["mrr@10"] == 0.5
    flat = rerank_metrics(["q"] * 5, [1, 0, 0, 0, 0], [0.3] * 5)
    assert (flat["mrr@10"], flat["r@1"]) == (0.2, 0.0) and flat["ndcg@10"] == pytest.approx(1 / math.log2(6))
    graded = rerank_metrics(["q"] * 3, [0.5, 1.0, 0.0], [3, 2, 1])["ndcg@10"]
    assert graded == pytest.approx((0.5 + 1 / math.log2(3)) / (1 + 0.5 / math.log2(3)))


def test_copies_of_a_pair_tie_whatever_the_file_order(standin_dir, tmp_path, capsys):
    """Two passages that are one model input (they differ only in spaces, which the tokenizer drops), one relevant:
    scored apart they differed in their last bits (7e-9), and the file's order decided which came first (MRR 1.0 one
    way, 0.5 the other). The tie counts against the model both ways."""
    rows = ['{"qid": 1, "query": "Где находится Москва?", "passage": "Москва —%s столица России.", "label": %d}'
            % (" " * label, label) for label in (0, 1)]
    for order in (rows, rows[::-1]):
        (tmp_path / "pairs.jsonl").write_text("\n".join(order) + "\n")
        evaluate_main(["--model", str(standin_dir), "--data", str(tmp_path / "pairs.jsonl"), "--device", "cpu",
                       "--max-length", "32"])  # where the stand-in's two copies in one batch differed
        assert capsys.readouterr().out.startswith("MRR@10 0.5000 | NDCG@10 0.6309 | R@1 0.0000")


def test_evaluation_does_not_depend_on_the_batch_size(standin_dir, monkeypatch):
    """Passages that differ only past the max_length cut are one model input. Scored as separate rows, the same input
    came out a few units in the last place apart depending on its place in the batch, and the metrics moved with
    --batch-size (a reviewer's case: MRR 0.2 at batch sizes 1, 4, 32; 0.33 at 2; 0.5 at 3). Nor on the chunks a large
    file is scored in (copies of one input in different chunks)."""
    import minilm.evaluate
    from minilm.data import Pair

    ce = CrossEncoder.from_pretrained(standin_dir, device="cpu", max_length=16)
    text = "Москва — столица России, крупнейший по численности населения город страны и её"
    passages = [(text + " хвост номер один.", 1)] + [(text + f" совсем другой хвост {i}.", 0) for i in range(4)] + \
        [(f"Ответ {i}.", 0) for i in range(4)]
    pairs = [Pair("Где находится Москва?", passage, label, "1", n, {}) for n, (passage, label) in enumerate(passages, 1)]
    results = {batch_size: evaluate(ce, pairs, batch_size) for batch_size in (1, 2, 3, 4, 32)}
    monkeypatch.setattr(minilm.evaluate, "CHUNK_PAIRS", 2)
    results["chunks of 2"] = evaluate(ce, pairs, 3)
    assert len({tuple(sorted(m.items())) for m in results.values()}) == 1, results
    m = results[32]
    assert m["truncated"] == 9 and m["repeated"] == 0  # at 16 tokens, the short passages are cut too
    scores = ce.predict([(p.query, p.passage) for p in pairs], activation_fn=torch.nn.Identity())
    tied_or_above = sum(scores[i] >= scores[0] - 1e-5 for i in range(1, 9))  # its 4 copies and any negative above
    assert m["mrr@10"] == pytest.approx(1 / (1 + tied_or_above)) and tied_or_above >= 4


def test_evaluation_data_that_contradicts_itself_or_repeats(standin_dir, tmp_path, capsys):
    rows = [{"qid": 1, "query": "q", "passage": "p1", "label": 1}, {"qid": 1, "query": "q", "passage": "p2", "label": 0}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {**rows[1], "label": 1}]))
    with pytest.raises(DataError, match=r"pairs.jsonl:3: the passage 'p2' of this query is labelled 1 here and 0 at "
                                        r"line 2: which is it\?"):
        read_ranking_pairs(str(data))
    data.write_text("".join(json.dumps(r) + "\n" for r in [*rows, rows[1], rows[1]]))
    evaluate_main(["--model", str(standin_dir), "--data", str(data), "--device", "cpu", "--max-length", "16"])
    assert capsys.readouterr().out.endswith("| 1 query (4 pairs; 2 repeating an earlier row, counted again)\n")


def test_evaluation_with_scores_that_are_not_numbers_is_an_error(standin_dir, tmp_path, capsys):
    """Weights that are finite but overflow the logits (a broken fine-tune): the ranking by NaN and inf was printed as
    metrics."""
    ce = CrossEncoder.from_pretrained(standin_dir, device="cpu")
    with torch.no_grad():
        ce.model.classifier.weight.copy_(torch.sign(ce.model.classifier.weight) * 3e38)
    broken = tmp_path / "broken"
    ce.save_pretrained(broken)
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--model", str(broken), "--data", str(PAIRS), "--device", "cpu", "--max-length", "16"])
    assert e.value.code == 2
    assert re.fullmatch(r"python -m minilm.evaluate: error: \d+ of 44 scores are NaN or infinite: the model's weights "
                        r"are broken, or too large for its precision\n", capsys.readouterr().err)


def test_evaluation_data_through_a_pipe_with_its_format(standin_dir, tmp_path, capsys):
    tsv = "".join(f"{r.query}\t{r.passage}\t{r.label:g}\n" for r in read_pairs(str(PAIRS), require_label=True))
    (tmp_path / "pairs.tsv").write_text("query\tpassage\tlabel\n" + tsv, encoding="utf-8")
    read, write = os.pipe()
    os.write(write, (tmp_path / "pairs.tsv").read_bytes())
    os.close(write)
    try:
        evaluate_main(["--model", str(standin_dir), "--data", f"/dev/fd/{read}", "--format", "tsv", "--device", "cpu",
                       "--max-length", "16"])
    finally:
        os.close(read)
    piped = capsys.readouterr().out
    evaluate_main(["--model", str(standin_dir), "--data", str(tmp_path / "pairs.tsv"), "--device", "cpu", "--max-length", "16"])
    assert piped == capsys.readouterr().out and "(44 pairs; 44 cut to fit max_length)" in piped
    with pytest.raises(SystemExit):
        evaluate_main(["--model", str(standin_dir), "--data", str(tmp_path / "pairs.txt")])
    assert "use .jsonl, .tsv or .csv (or --format)" in capsys.readouterr().err


def test_evaluate_interrupted_is_one_line(standin_dir, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for stage in ("read_ranking_pairs", "evaluate"):  # reading a big file, scoring it
        with monkeypatch.context() as patched:
            patched.setattr(f"minilm.evaluate.{stage}", interrupted)
            with pytest.raises(SystemExit) as e:
                evaluate_main(["--model", str(standin_dir), "--data", str(PAIRS), "--device", "cpu"])
        assert e.value.code == 130 and capsys.readouterr().err == "python -m minilm.evaluate: interrupted\n"


def test_loss_chart_leaves_out_non_finite_points():
    svg = line_chart_svg({"loss": ([1, 2, 3, 4, 5], [math.nan, 0.5, math.inf, 0.3, 0.4])})
    assert "nan" not in svg and "inf" not in svg
    assert re.findall(r'<polyline points="([^"]*)"', svg) == ["64.0,32.0", "437.3,316.0 624.0,174.0"]  # a gap at step 3
    assert ">0.5<" in svg and ">0.3<" in svg  # the scale of the finite points


def test_evaluate_cli(standin_dir, tmp_path, capsys):
    assert evaluate_main(["--model", str(standin_dir), "--data", str(PAIRS), "--device", "cpu", "--max_length", "64"]) is None
    out = capsys.readouterr().out
    assert out.startswith("MRR@10 0.") and out.endswith("| 4 queries (44 pairs; 41 cut to fit max_length)\n")
    with pytest.raises(SystemExit) as e:  # as train.py and infer.py: no abbreviations
        evaluate_main(["--model", str(standin_dir), "--dat", str(PAIRS)])
    assert e.value.code == 2 and capsys.readouterr().err.startswith(
        "python -m minilm.evaluate: error: the following arguments are required: --data")
    (tmp_path / "bad.jsonl").write_text(GOOD + '{"query": "q", "passage": "p", "label": -1}\n')
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--model", str(standin_dir), "--data", str(tmp_path / "bad.jsonl")])
    assert e.value.code == 2 and "bad.jsonl:2: field 'label'" in capsys.readouterr().err
