"""Fine-tune a MiniLM/BERT cross-encoder on (query, passage, label) pairs with binary cross-entropy.

    python train.py --train train.jsonl --output runs/ft                       # the model card's recipe
    python train.py --model weights/x --train t.jsonl --output runs/ft --eval test.jsonl --epochs 1 --max-length 256
    python train.py ... --resume latest                                        # continue from runs/ft/checkpoint-*
    torchrun --nproc-per-node 2 train.py ...                                   # DDP, same global batch and order

Options are `--key value` or `--key=value` for every field of TrainConfig below (`--help` lists them); their types are
checked and unknown keys are refused (exit status 2, like bad data).

Two loops share this script. `--exact true` is the loop that sentence-transformers 5.1.0's CrossEncoderTrainer runs
(transformers 4.56 Trainer, accelerate 1.10) for the target model card, written out: on CPU in fp32 it reproduces the
trainer's per-step losses, learning rates, gradient norms and final weights bit for bit (tests/test_train.py). What
has to match, and why:
  * global RNGs seeded AFTER the model is loaded (the Trainer's set_seed runs in its __init__);
  * epoch e visits the rows in the order torch.randperm(N) gives with a fresh generator seeded seed + e (accelerate's
    SeedableRandomSampler), in consecutive batches, the last partial batch kept;
  * every epoch the DataLoader draws a base seed from the global CPU generator; on CPU the dropout masks come from that
    generator, so the draw is repeated here;
  * AdamW without fused/foreach arguments, two parameter groups (no weight decay on biases and LayerNorms), the lr of
    a linear LambdaLR schedule that advances only when the fp16 GradScaler did not skip the step, clipping after
    unscaling;
  * the logged loss is an fp32 tensor sum over the interval divided by its length.
Sources: transformers/trainer.py (_inner_training_loop, create_optimizer), transformers/optimization.py,
accelerate/data_loader.py (SeedableRandomSampler), torch/utils/data/dataloader.py (_BaseDataLoaderIter).
The default, `--exact false`, keeps that recipe and changes how it is computed: batches packed without padding and
cheaper dropout masks (minilm/unpadded.py), fused AdamW, no host sync per step, bf16 on CPUs with native bf16
(docs/training.md); on one GPU, each step (`train_step`) is replayed as a CUDA graph (minilm/cuda_graphs.py;
--cuda-graphs false for the eager loop).

Outputs in --output: the model in Hugging Face format (loads in minilm, sentence-transformers and transformers) with
a README.md model card, log.jsonl (one record per --log-every steps at full precision, plus evaluations and the final
totals), loss.svg, and checkpoint-STEP/ folders every --save-every steps: model, optimizer, GradScaler, the schedule's
position, every RNG state and the position in the epoch, so that --resume ends with exactly the weights of an
uninterrupted run.
A checkpoint folder is written under a temporary name and renamed when complete.

DDP (torchrun): --batch-size stays the GLOBAL batch. Every rank builds the same per-epoch permutation and the same
global batches; rank r takes the r-th contiguous slice of each (16 rows on 2 ranks: rows 0-7 and 8-15). Each rank's
mean loss is weighted by its share of the batch, so the gradient DDP averages is the gradient of the global batch mean
and the optimizer sees what a single process would see, up to float rounding and dropout masks (drawn per rank).
NCCL on GPUs, gloo on CPUs. Only rank 0 logs, evaluates and saves; each rank saves its own RNG state in checkpoints.
"""

import argparse
import fcntl
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from minilm import cli, cuda_graphs
from minilm import precision as precisions
from minilm.checkpoint import TOKENIZER_FILES, CheckpointError, fsync, torch_save, write_json, write_text
from minilm.crossencoder import CrossEncoder
from minilm.data import DataError, fingerprint, read_pairs, read_ranking_pairs, shown
from minilm.evaluate import evaluate, format_metrics
from minilm.metrics import RELEVANT, has_relevant
from minilm.plot import line_chart_svg
from minilm.tokenizer import MaxLengthError, NoTokens
from minilm.unpadded import Unpadded, copy_in, pack


def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model: str = option("cross-encoder/ms-marco-MiniLM-L6-v2", "local dir, name under weights/, or Hugging Face Hub id")
    revision: str = option("", "Hub revision (branch, tag or commit) of --model; empty: main")
    train: str = option("", "required: .jsonl/.tsv/.csv with query/passage (or sentence_0/sentence_1) and label in [0, 1]")
    output: str = option("", "required: folder for the model, logs and checkpoints")
    eval: str = option("", "labelled pairs (qid optional) for MRR@10, NDCG@10, R@1 at the end and every --eval-every steps")
    epochs: int = option(30, "passes over the training data")
    batch_size: int = option(16, "global batch; split over ranks under torchrun")
    lr: float = option(5e-5, "peak learning rate")
    warmup_ratio: float = option(0.0, "linear warmup over ceil(ratio * total steps), then linear decay to 0")
    weight_decay: float = option(0.0, "decoupled (AdamW); never applied to biases and LayerNorm parameters")
    max_grad_norm: float = option(1.0, "clip the global gradient 2-norm; inf disables clipping")
    seed: int = option(42, "seeds the epoch permutations (seed + epoch), dropout and the head's init")
    precision: str = option("auto", "auto: fp16 on CUDA (the card's); on a CPU bf16 in the fast loop where the CPU has "
                                     "native bf16 (AVX512-BF16/AMX: ~1.8x the speed of fp32 there), else fp32. Or fp32, "
                                     "fp16 (autocast + GradScaler; CUDA only), bf16 (autocast; CUDA or native-bf16 CPUs)")
    max_length: int = option(0, "tokens per pair including [CLS] and 2x[SEP]; 0 = the checkpoint's (512 for MiniLM-L6)")
    log_every: int = option(500, "log the mean loss every N steps (and the rest at the end)")
    eval_every: int = option(0, "0 = evaluate only at the end")
    save_every: int = option(0, "write a checkpoint every N steps; 0 = none")
    keep_checkpoints: int = option(2, "keep the newest N checkpoint-STEP folders of this run")
    exact: bool = option(False, "true: the sentence-transformers trainer's own computation (bit for bit on a CPU in fp32: "
                                "padded batches, its kernels and random draws); false: the fast loop, same recipe "
                                "(unpadded batches, cheaper dropout masks, fused AdamW, no host sync per step)")
    cuda_graphs: str = option("auto", "auto: on for the fast loop on one GPU, off otherwise; true/false. Each step is "
                                      "replayed as a CUDA graph, batches padded to 64-token length buckets (one graph "
                                      "per bucket, captured when first seen): the eager loop waits on Python launching "
                                      "~800 kernels a step. H200: 4.7x the trainer's steps/s, 500-step mean losses "
                                      "within 0.2%% of its (docs/performance.md). true is refused on a CPU, under "
                                      "torchrun and with --exact true")
    resume: str = option("", "a checkpoint folder, or 'latest' for the newest in --output")
    overwrite_output: bool = option(False, "start over in an --output that holds an earlier run (its model, logs and "
                                           "checkpoints are deleted; other files stay)")
    max_steps: int = option(0, "> 0: train exactly this many steps, the schedule decaying to 0 there (overrides --epochs)")
    device: str = option("auto", "auto = cuda when available, else cpu")
    fp16_init_scale: float = option(65536.0, "GradScaler's initial scale (torch's default, the card's run)")
    fp16_growth_interval: int = option(2000, "GradScaler: double the scale after N clean steps")


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")  # exactly: a user's checkpoint-500-best is not one
LOST_PEER = re.compile(r"Connection (closed|reset) by peer|NCCL communicator was aborted|Socket Timeout")  # gloo, NCCL
MAX_STEPS = 100_000_000  # 1.6 billion pairs in batches of 16
FP32_MAX = 3.4028234663852886e38  # the lr table, weight decay and the GradScaler's scale live in fp32
METAVARS = {int: "N", float: "X", str: "TEXT", bool: "true|false"}
OPTION_TYPES = {int: cli.whole_number(), float: cli.real_number, str: str, bool: cli.true_or_false}


VALUE_RULES = [  # (option, test, the rule as the error says it)
    *((name, lambda v: v >= 1, "at least 1") for name in ("epochs", "batch_size", "log_every", "keep_checkpoints")),
    *((name, lambda v: v >= 0, "0 or more") for name in ("eval_every", "save_every", "max_steps")),
    ("max_length", lambda v: v == 0 or v >= 5, "0 (the checkpoint's) or at least 5 (a token of query and passage each)"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32) (numpy's limit)"),
    ("lr", lambda v: 0 < v < FP32_MAX, "> 0 and below 3.4e38 (the lr table is fp32)"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("weight_decay", lambda v: 0 <= v < FP32_MAX, "0 or more and below 3.4e38 (fp32)"),
    ("max_grad_norm", lambda v: v > 0, "> 0 (inf: no clipping)"),
    ("precision", lambda v: v in ("auto", "fp32", "fp16", "bf16"), "auto, fp32, fp16 or bf16"),
    ("cuda_graphs", lambda v: v in ("auto", "true", "false"), "auto, true or false"),
    ("fp16_init_scale", lambda v: 0 < v < FP32_MAX, "> 0 and below 3.4e38 (the GradScaler's scale is fp32)"),
    ("fp16_growth_interval", lambda v: v >= 1, "at least 1"),
]


# Hugging Face's names for these options (TrainingArguments, its example scripts), named in the error when one is
# used: hints, not aliases (their meanings differ)
HF_NAMES = {"learning_rate": "--lr", "num_train_epochs": "--epochs", "output_dir": "--output",
            "model_name_or_path": "--model", "train_file": "--train", "eval_file": "--eval", "logging_steps": "--log-every",
            "save_steps": "--save-every", "eval_steps": "--eval-every", "save_total_limit": "--keep-checkpoints",
            "resume_from_checkpoint": "--resume", "fp16": "--precision fp16", "bf16": "--precision bf16",
            "per_device_train_batch_size": "--batch-size (the global batch, split over the processes under torchrun)",
            "train_batch_size": "--batch-size", "warmup_steps": "--warmup-ratio (a fraction of the total steps)",
            "max_seq_length": "--max-length"}


def parse_config(argv) -> TrainConfig:
    """argparse built from TrainConfig: `--key value` or `--key=value` (dashes or underscores), typed, unknown keys
    refused, exit status 2 for any mistake (as for bad data)."""
    parser = cli.ArgumentParser(prog="train.py", usage="%(prog)s --train FILE --output DIR [--option VALUE ...]",
                                description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter, renamed=HF_NAMES)
    for f in fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=OPTION_TYPES[f.type],
                            default=f.default, metavar=METAVARS[f.type], help=f"{f.metadata['help']} (default: {str(f.default).lower() if f.type is bool else repr(f.default)})")
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    for bad, message in [
        (not cfg.train, "--train FILE is required"),
        (not cfg.output, "--output DIR is required"),
        (cfg.eval_every and not cfg.eval, "--eval-every needs --eval FILE"),
        (cfg.train == cfg.eval == "-", "--train and --eval cannot both read standard input ('-')"),
        ("RANK" in os.environ and "-" in (cfg.train, cfg.eval), "under torchrun every process reads --train and --eval: "
                                                               "give files, not standard input ('-')"),
        (cfg.resume and cfg.overwrite_output, "--resume continues the run in --output; --overwrite-output starts over: not both"),
    ]:
        if bad:
            parser.error(message)
    for name, ok, rule in VALUE_RULES:  # NaN fails every comparison, so every rule refuses it
        value = getattr(cfg, name)
        if not ok(value):
            parser.error(f"--{name.replace('_', '-')} must be {rule}, got {value!r}")
    return cfg


def die(message, every_process=False):
    """One line and exit status 2. Under torchrun every process checks the same options, data and files: one process
    per machine says so (LOCAL_RANK 0; another machine may lack a file), unless the problem is this process's own."""
    if every_process or "RANK" not in os.environ or os.environ.get("LOCAL_RANK", "0") == "0":
        sys.stderr.write(f"train.py: error: {message}\n")  # one write: lines of two processes are not interleaved
    said_why()
    if globals().get("lock") is not None:  # the --output lock, for a caller that goes on (train.py run in-process)
        os.close(globals()["lock"])
    sys.exit(2)


def said_why():
    """This process has said why it stops: the SIGTERM torchrun then sends every process adds no second line (and no
    traceback from whatever the exit was running)."""
    global stopping
    stopping = True


stopping = False  # set by said_why()


def checkpoints(folder, run=None):
    """checkpoint-STEP folders in `folder`, oldest first; with `run`, only those of that run (same run_info)."""
    found = [p for p in Path(folder).glob("checkpoint-*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    if run is not None:
        found = [p for p in found if {k: read_state(p).get(k) for k in run} == run]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def left_by_a_run(path: Path) -> bool:
    """Anything but hidden files and the empty log.jsonl of a run stopped before its first step."""
    return not path.name.startswith(".") and not (path.name == "log.jsonl" and path.is_file() and not path.stat().st_size)


def model_id(name_or_path: str) -> str:
    """--model as a run is identified by: a local folder by its absolute path (however it was written), else the name."""
    return str(Path(name_or_path).resolve()) if Path(name_or_path).is_dir() else name_or_path


def read_state(ckpt) -> dict:
    try:
        state = json.loads((Path(ckpt) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict):
        return {}
    return {"cuda_graphs": False, **state} if state else {}  # checkpoints written before the option: eager runs


def one_line_errors(kind, error, traceback):
    """A full disk or a vanished folder while logging or saving (exit status 1), another process of torchrun gone, or
    Ctrl-C: one line, no traceback."""
    if issubclass(kind, KeyboardInterrupt):
        say_stopped("interrupted")
    elif issubclass(kind, OSError):
        print(f"train.py: error: {error}", file=sys.stderr)
    elif "RANK" in os.environ and issubclass(kind, RuntimeError) and LOST_PEER.search(str(error)):
        reason = str(error).splitlines()[0].split("] ", 1)[-1].split(". ")[0]  # without gloo's source line and advice
        print(f"train.py: error: process {os.environ['RANK']} lost contact with another process ({reason}); that one "
              "failed or was stopped, and says why if it could", file=sys.stderr)
        said_why()
    else:
        sys.__excepthook__(kind, error, traceback)


def stop(signum, frame):
    if stopping:  # on its way out already, having said why
        return
    say_stopped(f"stopped by {signal.Signals(signum).name}")
    sys.exit(128 + signum)  # unwinds like Ctrl-C, so no temporary file is left behind


def say_stopped(how):
    if os.environ.get("RANK", "0") == "0":  # under torchrun, process 0 speaks for all
        hint = "; --resume latest continues from the last checkpoint" if checkpoints(out) else ""
        print(f"train.py: {how}{hint}", file=sys.stderr)


cfg = parse_config(sys.argv[1:])
out = Path(cfg.output)
sys.excepthook = one_line_errors
cli.stop_on_signals(stop)
if out.exists() and not out.is_dir():
    die(f"--output {out}: exists and is not a folder")
if not os.access(out if out.is_dir() else next(p for p in out.absolute().parents if p.exists()), os.W_OK):
    die(f"--output {out}: not writable")
# The Hugging Face Trainer's rule, stricter: never mix two runs, never overwrite files of someone else's (hidden
# files such as .DS_Store or a killed run's .checkpoint-*.tmp do not count)
earlier = sorted(p.name for p in out.iterdir() if left_by_a_run(p)) if out.is_dir() else []
if cfg.resume and cfg.resume != "latest" and earlier and Path(cfg.resume).resolve().parent != out.resolve():
    die(f"--resume {cfg.resume}: its run is not the one in --output {out} ({', '.join(earlier[:5])}); to continue it "
        "elsewhere, give an empty or new --output")
listed = f"{', '.join(earlier[:5])}{', ...' if len(earlier) > 5 else ''}"
holds_a_run = "log.jsonl" in earlier or bool(checkpoints(out))  # what train.py writes first
if earlier and not holds_a_run and (cfg.resume == "latest" or cfg.overwrite_output):
    die(f"--output {out} holds no train.py run (no log.jsonl, no checkpoint-STEP folder) but other files ({listed}): "
        f"nothing to {'resume' if cfg.resume else 'start over'}, nothing deleted; choose another folder")
if earlier and not (cfg.resume or cfg.overwrite_output):
    die(f"--output {out} is not empty ({listed}); "
        + ("pass --resume latest to continue the run there, " if checkpoints(out) else
           "it holds a run that saved no checkpoint to resume from; " if holds_a_run else "")
        + ("--overwrite-output true to start over (deletes its model, logs and checkpoints; other files stay), or "
           "choose another folder" if holds_a_run else "choose another folder"))

# -------------------------------------------------------------------------------------------- processes and device
ddp = "RANK" in os.environ  # set by torchrun
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
if cfg.device == "auto":
    cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
try:
    device = torch.device(cfg.device)
except RuntimeError as e:
    die(f"--device: {e}")
if device.type not in ("cpu", "cuda"):
    die(f"--device {cfg.device}: train.py runs on cpu or cuda")
if device.type == "cuda" and not torch.cuda.is_available():
    die(f"--device {cfg.device}: no CUDA device is available")
if ddp and device.type == "cuda":
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
fast = not cfg.exact
precision = cfg.precision
if precision == "auto":  # the trainer's choice for the exact loop; the fast loop also takes a CPU's native bf16
    precision = "fp16" if device.type == "cuda" else "bf16" if fast and precisions.native_bf16() else "fp32"
try:
    precisions.check(precision, device, offered=("fp32", "fp16", "bf16"))
except ValueError as e:
    die(f"--precision {precision}: {e}")
graphs_fit = fast and cuda_graphs.usable(device) and not ddp  # minilm/cuda_graphs.py
if cfg.cuda_graphs == "true" and not graphs_fit:
    die("--cuda-graphs true is for the fast loop on one GPU: not with --exact true, on a CPU or under torchrun")
graphed = cfg.cuda_graphs == "true" or (cfg.cuda_graphs == "auto" and graphs_fit)
if ddp:
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
master = rank == 0
amp_dtype = precisions.AUTOCAST.get(precision)
# a graph must not keep autocast's cache of fp16 weight copies across replays (each weight is cast once per step anyway)
autocast = torch.autocast(device.type, dtype=amp_dtype, cache_enabled=not graphed) if amp_dtype else nullcontext()


def log(line):
    if master:
        tqdm.write(line)


# ---------------------------------------------------------------------------------------------------------- data
try:  # every row of both files is checked before anything is loaded or written
    train_pairs = read_pairs(cfg.train, require_label=True)
    eval_pairs = read_ranking_pairs(cfg.eval) if cfg.eval else []
except DataError as e:
    die(e)
if eval_pairs and not has_relevant(p.label for p in eval_pairs):
    die(f"--eval {cfg.eval}: no query has a relevant passage (label >= {RELEVANT}): nothing to rank")
N = len(train_pairs)
steps_per_epoch = math.ceil(N / cfg.batch_size)
total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
if total_steps > MAX_STEPS:  # the lr schedule is a table of every step's lr, on the device
    die(f"{total_steps:,} steps: train.py runs at most {MAX_STEPS:,} (check --max-steps and --epochs)")
epochs = math.ceil(total_steps / steps_per_epoch)

# --------------------------------------------------------------------------------------------------------- model
# A checkpoint without a head (a bare BERT encoder) gets one drawn at load time: from --seed, so that one command
# always trains the same model (the Trainer's seed comes after the model, so there the head is drawn unseeded)
torch.manual_seed(cfg.seed)
try:
    ce = CrossEncoder.from_pretrained(cfg.model, revision=cfg.revision or None, device=device,
                                      max_length=cfg.max_length or None)
except MaxLengthError as e:  # more than the model's position embeddings
    die(f"--max-length {cfg.max_length}: {e}")
except (CheckpointError, ValueError, OSError) as e:
    die(e)
model = ce.model  # fp32 parameters; autocast lowers the precision of the forward only
if ce.source_dir is not None and out.resolve() in (ce.source_dir.resolve(), *ce.source_dir.resolve().parents):
    die(f"--output {out} holds the --model folder {ce.source_dir}: saving would overwrite the model trained from; "
        "choose another folder")


def encode(pairs, path):
    """Token ids of every pair; a text with no tokens is a bad row, like an empty one (which it would be taken for)."""
    try:
        return ce.tokenizer.encode([(p.query, p.passage) for p in pairs], require_tokens=True)
    except NoTokens as e:
        die(e.at(f"{shown(path)}:{pairs[e.index].line}"))


t0 = time.time()
encodings = encode(train_pairs, cfg.train)  # once; each batch is padded or packed
encode(eval_pairs, cfg.eval)  # checked only: evaluation scores them itself
tokenize_seconds = time.time() - t0
labels_all = torch.tensor([p.label for p in train_pairs], dtype=torch.float32)
# the fast loop's forward on real tokens only (minilm/unpadded.py); as CUDA graphs, the padded model on length buckets
train_model = Unpadded(model) if fast and not graphed else model
if ddp:
    # find_unused_parameters as the Trainer sets it for a model without gradient checkpointing; it also keeps DDP's
    # gradient buckets as first built (without it they are rebuilt after the first step, so a run resumed from a
    # checkpoint summed its first step's gradients in another order: other last bits with 3 or more processes)
    train_model = DDP(train_model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True)

random.seed(cfg.seed)  # transformers.set_seed, called by the Trainer once the model exists
np.random.seed(cfg.seed)
torch.manual_seed(cfg.seed)  # CPU and every CUDA device

# ------------------------------------------------------------------------------------- optimizer and lr schedule
no_decay = {n for n, _ in model.named_parameters() if "bias" in n or "norm" in n.lower()}  # transformers' rule
optimizer = torch.optim.AdamW(  # exact: torch's default kernel choice, as optim="adamw_torch"; fast: one fused kernel
    [{"params": [p for n, p in model.named_parameters() if n not in no_decay], "weight_decay": cfg.weight_decay},
     {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0}],
    lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=fast or None, capturable=graphed)
warmup = math.ceil(cfg.warmup_ratio * total_steps)


def lr_factor(s):  # transformers.get_linear_schedule_with_warmup; s = scheduler steps taken so far
    if s < warmup:
        return float(s) / float(max(1, warmup))
    return max(0.0, float(total_steps - s) / float(max(1, total_steps - warmup)))


# The lr after s scheduler steps, as LambdaLR computes it (base lr * factor, in Python floats). The schedule advances
# only on steps the fp16 GradScaler did not skip; `taken` counts them on the device, so the fast loop looks its lr up
# there, with no host sync.
schedule = [cfg.lr * lr_factor(s) for s in range(total_steps + 1)]
schedule_on_device = torch.tensor(schedule, dtype=torch.float32, device=device)  # fused AdamW's CUDA kernel reads fp32
taken = torch.zeros((), dtype=torch.int64, device=device)
lr_now = torch.zeros((), device=device)  # the fast loop's lr for this step, looked up on the device
scaler = torch.amp.GradScaler(device.type, init_scale=cfg.fp16_init_scale, growth_factor=2.0, backoff_factor=0.5,
                              growth_interval=cfg.fp16_growth_interval, enabled=precision == "fp16")

# -------------------------------------------------------------------------------------- checkpoints and resuming
state = {"step": 0, "loss_total": 0.0, "history": []}  # loss_total: sum of the logged interval sums (the trainer's)
tr_loss = torch.zeros((), device=device)  # fp32 sum of the step losses since the last log, like the trainer's tr_loss
steps_done = torch.zeros((), dtype=torch.int64, device=device)  # `step` on the device, for first_nonfinite
first_nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # the first step whose loss was inf/nan, 0: none
grad_norm = torch.zeros((), device=device)  # the last step's, before clipping
interval = {"steps": 0, "tokens": 0, "padded": 0}  # the rest of what the next log line averages over
interval_seconds = 0.0
# What must be the same for --resume to continue a run exactly (the data by content, the recipe, the processes)
run_info = {"train_sha256": fingerprint(train_pairs), "train_size": N, "exact": cfg.exact,
            "model": model_id(cfg.model), "revision": cfg.revision or None,
            "log_every": cfg.log_every,
            "batch_size": cfg.batch_size, "total_steps": total_steps, "lr": cfg.lr, "warmup_ratio": cfg.warmup_ratio,
            "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm, "seed": cfg.seed, "precision": precision,
            "max_length": ce.max_length, "fp16_init_scale": cfg.fp16_init_scale,
            "fp16_growth_interval": cfg.fp16_growth_interval, "world_size": world, "cuda_graphs": graphed}


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def interval_totals():
    """(loss sum, real tokens, padded tokens) since the last log, summed over ranks; the loss sum is the trainer's
    fp32 sum."""
    totals = torch.stack([tr_loss.double(), *(torch.tensor(interval[k], dtype=torch.float64, device=device)
                                              for k in ("tokens", "padded"))])
    if ddp:
        dist.all_reduce(totals)
    return totals.tolist()


def stop_if_diverged():
    """Exit 1 at the first non-finite loss or weight (checked at log, checkpoint and end: no host sync per step)."""
    bad = int(first_nonfinite)
    if bad:
        diverged(f"the loss was not finite at step {bad}")
    broken = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]  # the last update's
    if broken:
        diverged(f"weights are NaN or infinite after step {step} ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''})")


def diverged(what):
    if not master:  # process 0 speaks for all
        sys.exit(1)
    kept = checkpoints(out, run_info)
    print(f"train.py: error: {what} (the run diverged: try a lower --lr); nothing after it was saved"
          f"{f', the last checkpoint ({kept[-1].name}) is kept' if kept else ''}", file=sys.stderr)
    sys.exit(1)


def save_failed(what, error, lost=""):
    """A full disk (or another I/O error) while saving: one line saying what is kept to resume from; exit status 1."""
    kept = checkpoints(out, run_info)
    resume = f"the last complete checkpoint, {kept[-1].name}, is kept: --resume latest continues from it" if kept else \
        "no checkpoint to resume from"
    print(f"train.py: error: {what} failed ({str(error).splitlines()[0]}); {lost}{resume}", file=sys.stderr)
    sys.exit(1)


def save_checkpoint(step):
    stop_if_diverged()
    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    loss_sum, tokens, _ = interval_totals()  # a log interval may straddle the checkpoint
    pending = {**interval, "loss": loss_sum, "tokens": int(tokens), "seconds": time.time() - t_log}
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        if ddp:
            dist.barrier()
        # each process's own random state, and its own share of the open log interval: restored as it was, the
        # interval's sum over ranks is the uninterrupted run's to the last bit
        torch_save(tmp / f"rng_state_{rank}.pth", {**rng_state(), "interval_loss": tr_loss.cpu(), "interval": interval})
        if master:
            ce.save_pretrained(tmp)
            torch_save(tmp / "optimizer.pt", optimizer.state_dict())
            torch_save(tmp / "scaler.pt", scaler.state_dict())
            write_json(tmp / "trainer_state.json", {**run_info, **state, "epoch": step // steps_per_epoch,
                                                    "batch_in_epoch": step % steps_per_epoch, "scheduler_steps": int(taken),
                                                    "interval": pending})
        if ddp:
            dist.barrier()
        if master:
            if final.exists():  # resumed from an earlier checkpoint, this step was saved before
                remove_checkpoint(final)
            os.replace(tmp, final)
            fsync(out)
    except BaseException as e:  # a full disk, or stopped while saving (SIGTERM, Ctrl-C, a lost process)
        shutil.rmtree(tmp, ignore_errors=True)  # no 270 MB half-checkpoint left
        if isinstance(e, OSError):
            save_failed(f"writing checkpoint {final}", e)
        raise
    if master:
        for old in checkpoints(out, run_info)[: -cfg.keep_checkpoints]:  # never another run's
            remove_checkpoint(old)


def remove_checkpoint(folder: Path) -> None:
    """Renamed out of the way first: a run killed while deleting it leaves a temporary folder (removed when the next
    run starts), never a checkpoint-STEP that cannot be resumed from."""
    doomed = folder.with_name(f".{folder.name}.deleted.tmp")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def json_line(entry) -> str:
    """One log record; a non-finite number (a skipped fp16 step's gradient norm) is written as null, as JSON has none."""
    return json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in entry.items()}) + "\n"


def lock_output() -> int:
    """An flock on --output, held until this process ends, however it ends: two runs in one folder would mix their
    logs, checkpoints and models (and the processes of a torchrun killed outright may still be stopping, or, off
    Linux, training on)."""
    lock = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        die(f"--output {out}: another train.py is writing there now (a run still going, or the processes of a "
            "killed torchrun); wait for it or stop it, or choose another folder")
    except OSError:
        pass  # a file system without locks (some network ones): nothing to check with
    return lock


lock = lock_output() if master and out.is_dir() else None  # before a checkpoint is read: another run may be pruning it
if cfg.resume:
    ckpt, one_before = Path(cfg.resume), ""
    if cfg.resume == "latest":
        found = checkpoints(out)
        ckpt = found[-1] if found else die(f"--resume latest: no checkpoint-STEP folder in {out}")
        # checkpoints are renamed into place only when complete, so damage came from outside: never skipped silently
        one_before = f"; the one before it: --resume {found[-2]}" if len(found) > 1 else ""
    saved = read_state(ckpt)
    if isinstance(saved.get("model"), str):
        saved["model"] = model_id(saved["model"])  # checkpoints of earlier versions hold it as it was written
    # a key an earlier version did not save (log_every) does not stop its checkpoints from resuming
    changed = [f"the training data's content (sha256 {saved[k][:12]}... -> {v[:12]}...)" if k == "train_sha256" else
               f"{k} {saved[k]!r} -> {v!r}" for k, v in run_info.items() if k in saved and saved[k] != v]
    if changed:
        die(f"--resume: this run differs from the checkpoint's ({'; '.join(changed)}); exact resumption needs the same "
            "data and settings")
    missing = [f.name for f in (ckpt / "trainer_state.json", ckpt / "model.safetensors", ckpt / "optimizer.pt",
                                ckpt / "scaler.pt", ckpt / f"rng_state_{rank}.pth") if not f.is_file()]
    if missing or "step" not in saved:
        die(f"--resume: {ckpt} is not a complete checkpoint of train.py ({', '.join(missing) or 'trainer_state.json'} "
            f"missing or unreadable){one_before}", every_process=True)  # rng_state_{rank}.pth is each process's own
    try:
        model.load_state_dict(load_file(ckpt / "model.safetensors", device=str(device)))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
        own = torch.load(ckpt / f"rng_state_{rank}.pth", weights_only=True)
        set_rng_state(own)
        state = {k: saved[k] for k in state}
        taken.fill_(saved["scheduler_steps"])
        pending = saved["interval"]  # sums over all ranks
        named = CHECKPOINT_NAME.fullmatch(ckpt.name)
        if not (isinstance(state["step"], int) and 0 < state["step"] <= total_steps and isinstance(state["history"], list)
                and isinstance(state["loss_total"], (int, float)) and isinstance(pending, dict)
                and all(isinstance(pending.get(k), (int, float)) and 0 <= pending[k] < math.inf
                        for k in ("loss", "steps", "tokens", "padded"))
                and isinstance(pending.get("seconds", 0.0), (int, float))  # checkpoints before 2026-11-28 have none
                and 0 <= pending.get("seconds", 0.0) < math.inf):
            raise ValueError("trainer_state.json: step, history, loss_total or interval of the wrong type or range")
        if named and int(named[1]) != state["step"]:
            raise ValueError(f"trainer_state.json says step {state['step']}, the folder's name step {named[1]}")
        if "interval_loss" in own:  # this process's share of the open log interval, as it was
            if not (isinstance(own["interval"], dict) and sorted(own["interval"]) == ["padded", "steps", "tokens"]):
                raise ValueError(f"rng_state_{rank}.pth: interval of the wrong type")
            tr_loss.copy_(own["interval_loss"])
            interval = own["interval"]
        else:  # checkpoints before 2026-11-28 hold the sums over ranks only: rank 0 carries them on
            tr_loss.fill_(pending["loss"] if master else 0.0)
            interval = {"steps": pending["steps"], "tokens": pending["tokens"] if master else 0, "padded": pending["padded"]}
    except Exception as e:  # a truncated or foreign file: name it, do not train from a half-restored state
        die(f"--resume: {ckpt} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}){one_before}",
            every_process=True)
    steps_done.fill_(state["step"])
    interval_seconds = pending.get("seconds", 0.0)  # the interval's time before the checkpoint, for its tokens/s
    log(f"resumed from {ckpt} at step {state['step']}")

if master:
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = lock if lock is not None else lock_output()
        if cfg.overwrite_output:  # the earlier run's files only: not a failed new run beside an old model
            for old in checkpoints(out):
                remove_checkpoint(old)
            for name in ("model.safetensors", "config.json", "README.md", "loss.svg", *TOKENIZER_FILES):
                (out / name).unlink(missing_ok=True)
        for tmp in out.glob(".checkpoint-*.tmp"):  # left by a run killed while saving or deleting a checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
        write_text(out / "log.jsonl", "".join(json_line(r) for r in state["history"]))
        log_file = open(out / "log.jsonl", "a", encoding="utf-8")
    except OSError as e:
        die(f"--output {out}: {e.strerror or e}")


def record(entry):
    state["history"].append(entry)
    if master:
        log_file.write(json_line(entry))
        log_file.flush()


def log_interval(step, epoch):
    """The mean loss of the steps since the last log line, and what else the log shows (syncs the host: log time)."""
    global t_log, interval
    loss_sum, tokens, padded = interval_totals()
    tr_loss.zero_()
    dt, t_log = time.time() - t_log, time.time()
    # the last step's lr, from the schedule's Python floats (the fast loop's copy on the device is fp32): `taken`
    # counts that step unless the GradScaler skipped it
    lr = schedule[int(taken) - (int(torch.isfinite(grad_norm)) if scaler.is_enabled() else 1)]
    entry = {"step": step, "epoch": epoch, "loss": loss_sum / interval["steps"], "lr": lr,
             "grad_norm": grad_norm.item(), "tokens_per_s": tokens / dt, "seconds": dt,
             "padding": 1 - tokens / padded}
    if scaler.is_enabled():
        entry["scale"] = scaler.get_scale()
    state["loss_total"] += loss_sum
    record(entry)
    log(f"step {step} | epoch {epoch:.4f} | loss {entry['loss']:.4f} | lr {entry['lr']:.3e} | grad norm "
        f"{entry['grad_norm']:.4f} | {entry['tokens_per_s']:,.0f} tok/s | pad {entry['padding']:.0%}")
    interval = {"steps": 0, "tokens": 0, "padded": 0}


eval_sha256 = fingerprint(eval_pairs, with_qids=True)  # a resumed run may evaluate on other data: the card shows this data's


def run_eval(step):
    if not (eval_pairs and master):
        return
    try:
        metrics = evaluate(ce, eval_pairs)  # in fp32, whatever the training precision: comparable across runs
    except ValueError as e:  # scores that are not numbers
        diverged(f"evaluating at step {step}: {e}")
    record({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}, "eval_sha256": eval_sha256})
    log(f"eval step {step} | {format_metrics(metrics)}")


@contextmanager
def untimed():
    """Leave the time spent inside out of the open log interval: its seconds and tokens/s are the training's."""
    global t_log
    started = time.time()
    yield
    t_log += time.time() - started


# ------------------------------------------------------------------------------------------------------ the loop
n_params = sum(p.numel() for p in model.parameters())
log(f"{N} training pairs (tokenized in {tokenize_seconds:.1f} s), {steps_per_epoch} steps/epoch, {total_steps} steps "
    f"({total_steps / steps_per_epoch:.4g} epochs), {n_params / 1e6:.1f}M parameters, {'exact' if cfg.exact else 'fast'} loop"
    f"{' as CUDA graphs' if graphed else ''}, {precision} on {device}{f', {world} processes' if ddp else ''}, "
    f"max_length {ce.max_length}")


def train_step(inputs, labels, weight=1.0):
    """One optimizer step on a batch already on the device. Everything it changes lives in tensors and, in the fast
    loop, it reads nothing back to the host, so that on a GPU it can be captured once and replayed (cuda_graphs.py)."""
    with autocast:
        logits = train_model(**inputs) if isinstance(inputs, dict) else train_model(inputs)
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels)  # mean over the rows, fp32, outside autocast
    loss = loss * weight
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm.copy_(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))  # norm before clipping
    # index_select: indexing with the 0-dim `taken` itself would read it into Python (.item(), a sync on a GPU); into
    # one lasting tensor, which a CUDA graph updates in place
    lr = lr_now.copy_(schedule_on_device.index_select(0, taken.view(1)).view(())) if fast else schedule[int(taken)]
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)  # skipped when fp16 gradients overflowed (then the norm is inf/nan); the scale halves
    scaler.update()
    taken.add_(torch.isfinite(grad_norm) if scaler.is_enabled() else 1)  # the schedule holds on a skipped step
    optimizer.zero_grad(set_to_none=True)
    tr_loss.add_(loss.detach() / world)
    steps_done.add_(1)
    first_bad = (first_nonfinite == 0) & ~torch.isfinite(loss.detach())
    first_nonfinite.copy_(torch.where(first_bad, steps_done, first_nonfinite))  # masked_fill_ would read steps_done


if graphed:
    lasting = [taken, lr_now, tr_loss, steps_done, first_nonfinite, grad_norm]  # the loop's state on the device
    graphed_steps = cuda_graphs.GraphedSteps(train_step, model, optimizer, scaler, lasting, ce.max_length, ce.tokenizer.pad_id)
step = first_step = state["step"]
t_start = time.time()
t_log = t_start - interval_seconds
bar = tqdm(total=total_steps, initial=step, disable=not master or not sys.stderr.isatty(), unit="step", dynamic_ncols=True)
start_epoch, start_batch = divmod(step, steps_per_epoch)
for epoch in range(start_epoch, epochs):
    if epoch > start_epoch or start_batch == 0:
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader's per-epoch _base_seed draw (see the docstring)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
    for b in range(start_batch if epoch == start_epoch else 0, steps_per_epoch):
        if step == total_steps:
            break
        batch = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        lo, hi = rank * len(batch) // world, (rank + 1) * len(batch) // world
        rows = batch[lo:hi] or batch[:1]  # a rank with no row computes one at weight 0
        weight = (hi - lo) * world / len(batch)  # 1.0 on one process; DDP: this rank's share of the batch mean
        train_model.train()
        if graphed:  # padded to its length bucket, replayed (minilm/cuda_graphs.py)
            graphed_steps(ce.tokenizer.pad([encodings[i] for i in rows]), labels_all[rows])
        else:
            if fast:
                inputs = pack([encodings[i] for i in rows], device)  # real tokens only
            else:
                padded = ce.tokenizer.model_inputs([encodings[i] for i in rows])  # padded to this batch's longest pair
                inputs = {k: torch.from_numpy(v).to(device) for k, v in padded.items()}
            train_step(inputs, copy_in(labels_all[rows], device), weight)
        step += 1
        bar.update(1)
        lengths = [len(encodings[i].ids) for i in rows] if hi > lo else [0]  # a rank sitting out counts nothing
        interval["steps"] += 1
        interval["tokens"] += sum(lengths)
        if graphed:  # padded to its length bucket
            interval["padded"] += len(lengths) * cuda_graphs.padded_length(max(lengths), ce.max_length)
        else:  # the exact loop pads to the batch's longest pair, the unpadded fast loop not at all
            interval["padded"] += sum(lengths) if fast else len(lengths) * max(lengths)
        if step % cfg.log_every == 0 or step == total_steps:  # the last, partial interval too
            stop_if_diverged()
            log_interval(step, epoch + (b + 1) / steps_per_epoch)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            with untimed():
                run_eval(step)
        if cfg.save_every and step % cfg.save_every == 0:
            state["step"] = step
            with untimed():
                save_checkpoint(step)
bar.close()
stop_if_diverged()

# ------------------------------------------------------------------------------------------------ totals, saving
elapsed = time.time() - t_start
summary = {"step": step, "train_loss": state["loss_total"] / step, "train_runtime": elapsed,
           "train_steps_per_second": (step - first_step) / elapsed}
record(summary)
log(f"done: train_loss {summary['train_loss']:.4f} | {elapsed:.1f} s | {summary['train_steps_per_second']:.2f} steps/s")
run_eval(step)


def model_card() -> str:
    """README.md of the saved model: how it was trained, its loss curve as a table, its evaluations."""
    losses = [r for r in state["history"] if "loss" in r]
    evals = [r for r in state["history"] if "eval_mrr@10" in r and r.get("eval_sha256", eval_sha256) == eval_sha256]
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("train", "output", "resume", "overwrite_output") and v != ""}
    settings.update(epochs=epochs if total_steps % steps_per_epoch == 0 else round(total_steps / steps_per_epoch, 4),
                    precision=precision, processes=world, total_steps=total_steps,  # as run, not as asked
                    max_length=ce.max_length, device=str(device))
    settings = {k: str(v).lower() if isinstance(v, bool) else v for k, v in settings.items()}  # as the options take them
    return "\n".join([
        "---", "library_name: minilm", "pipeline_tag: text-ranking", f"base_model: {cfg.model}",
        f"tags: [cross-encoder, reranker, generated_from_trainer, dataset_size:{N}, loss:BinaryCrossEntropyLoss]", "---", "",
        f"# Cross-encoder fine-tuned from `{cfg.model}`", "",
        "Trained with minilm's `train.py` (the sentence-transformers CrossEncoderTrainer recipe, BCE on raw logits). "
        "Scores are raw logits; apply a sigmoid for probabilities.", "",
        "```python", "from minilm import CrossEncoder", f'model = CrossEncoder.from_pretrained("{out}")',
        'scores = model.predict([("query", "passage")])', "```", "",
        "## Training data", "",
        f"`{cfg.train}`: {N:,} pair{'s' if N > 1 else ''}, mean label {sum(p.label for p in train_pairs) / N + 0.0:.3f}.", "",
        "## Hyperparameters", "", "| setting | value |", "|:--|:--|",
        *(f"| {k} | `{v}` |" for k, v in settings.items()), "",
        "## Training logs", "", "| Epoch | Step | Training Loss |", "|:-:|:-:|:-:|",
        *(f"| {r['epoch']:.4f} | {r['step']} | {r['loss']:.4f} |" for r in losses), "",
        f"train_loss (mean of all {step} steps) {summary['train_loss']:.4f}, {elapsed:.0f} s"
        f"{f' since resuming at step {first_step}' if first_step else ''}.", "",
        *(["## Evaluation", "", f"`{cfg.eval}`: {len(eval_pairs):,} pairs.", "",
           "| Step | MRR@10 | NDCG@10 | R@1 | queries |", "|:-:|:-:|:-:|:-:|:-:|",
           *(f"| {r['step']} | {r['eval_mrr@10']:.4f} | {r['eval_ndcg@10']:.4f} | {r['eval_r@1']:.4f} | {r['eval_queries']} |" for r in evals), ""]
          if evals else []),
    ])


if master:
    losses = [r for r in state["history"] if "loss" in r]
    rest = step % cfg.log_every if step > cfg.log_every else 0  # the last interval, when shorter
    svg = line_chart_svg({"loss": ([r["step"] for r in losses], [r["loss"] for r in losses])},
                         f"training loss on {Path(cfg.train).name} (mean of every {min(cfg.log_every, step)} steps"
                         f"{f', the last of {rest}' if rest else ''})", "step", "BCE loss")
    try:
        ce.save_pretrained(out)
        write_text(out / "loss.svg", svg)
        write_text(out / "README.md", model_card())
    except OSError as e:  # a full disk
        save_failed(f"saving the trained model to {out}", e, lost="the trained weights are lost; ")
    log_file.close()
    os.close(lock)
    log(f"saved the model to {out}")
if ddp:
    dist.barrier()
    dist.destroy_process_group()
    cli.exit_after_process_group(0)
