"""`CrossEncoder`: load a checkpoint, score (query, passage) pairs, rank passages, save.

Shaped like `sentence_transformers.CrossEncoder` (5.1.0) so code moves over unchanged:
`CrossEncoder.from_pretrained(name).predict(pairs)` / `.rank(query, docs)` / `.save_pretrained(dir)`.
"""

import importlib
import json
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from . import precision as precisions
from .checkpoint import (TOKENIZER_FILES, atomic_write, load_weights, read_state_dict, resolve, save_weights, skip_init,
                         write_json)
from .model import Config, CrossEncoderModel
from .tokenizer import PairTokenizer

IDENTITY = "torch.nn.modules.linear.Identity"
SIGMOID = "torch.nn.modules.activation.Sigmoid"
# Padded tokens per forward pass. CPUs want batches whose activations stay in cache and get recycled by the allocator
# (a 16,384-token batch is ~1.5x slower per pair here); GPUs want big batches to fill the device.
BATCH_TOKENS = {"cpu": 2048, "cuda": 65536}


def default_activation(hf_config: dict) -> str:
    """The activation sentence-transformers 5.1 applies to this checkpoint's logits, as a dotted torch path.

    Priority as in ST: config.json["sentence_transformers"]["activation_fn"], then the legacy
    `sbert_ce_default_activation_function` key (the ms-marco models carry Identity there: their scores are raw
    logits), then Sigmoid for a 1-label model. Paths outside torch.* are not imported (ST needs trust_remote_code)."""
    path = (hf_config.get("sentence_transformers") or {}).get("activation_fn") or hf_config.get("sbert_ce_default_activation_function")
    if path is not None and not path.startswith("torch."):
        warnings.warn(f"activation {path!r} in config.json is not a torch.* path; using Sigmoid instead")
        path = None
    return path or SIGMOID


def activation_module(activation) -> torch.nn.Module | None:
    """None for Identity; otherwise a callable. Accepts a module/function, 'sigmoid', 'identity' or a torch path."""
    if callable(activation):
        return activation
    path = {"sigmoid": SIGMOID, "identity": IDENTITY}.get(str(activation).lower(), activation)
    if not isinstance(path, str) or not path.startswith("torch."):
        raise ValueError(f"activation must be a callable, 'sigmoid', 'identity' or a torch.* class path, got {activation!r}")
    module_name, _, class_name = path.rpartition(".")
    fn = getattr(importlib.import_module(module_name), class_name)()
    return None if isinstance(fn, torch.nn.Identity) else fn


class CrossEncoder:
    """A MiniLM/BERT cross-encoder with its tokenizer: `predict` scores pairs, `rank` orders passages for a query."""

    def __init__(self, model: CrossEncoderModel, tokenizer: PairTokenizer, hf_config: dict, source_dir: Path | None = None,
                 precision: str = "fp32"):
        self.model = model
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.source_dir = source_dir  # tokenizer files are copied from here by save_pretrained
        self.activation = default_activation(hf_config)
        self.precision = precision  # "fp32", or what minilm.precision converted the model to: "bf16", "fp16", "int8"
        self.max_batch_tokens = BATCH_TOKENS.get(self.device.type, BATCH_TOKENS["cuda"])

    @classmethod
    def from_pretrained(cls, name_or_path, *, revision=None, device=None, dtype=None, max_length=None,
                        packed: bool = True) -> "CrossEncoder":
        """Load a local directory, a name under weights/, or a Hugging Face Hub id (see `minilm.checkpoint`).

        device: "cpu", "cuda", ... (default: cuda when available, cpu for int8). dtype: fp32 (default, exact), or
        "bf16" / "fp16" / "int8" for speed (see minilm.precision; `packed=False` keeps plain Linears for CPU bf16).
        max_length: tokens per pair including specials (default 512)."""
        precision = precisions.parse(dtype)
        if device is None:
            device = "cuda" if torch.cuda.is_available() and precision != "int8" else "cpu"  # int8 runs on CPUs only
        device = torch.device(device)
        precisions.check(precision, device)  # before the slow part
        folder = resolve(str(name_or_path), revision)
        hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = Config.from_hf(hf_config)
        with skip_init():
            model = CrossEncoderModel(config)
        load_weights(model, read_state_dict(folder), folder)
        model = precisions.convert(model.to(device).eval(), precision, packed)
        tokenizer = PairTokenizer.from_dir(folder, max_length, config.max_position_embeddings)
        return cls(model, tokenizer, hf_config, folder, precision)

    def to(self, device) -> "CrossEncoder":
        """Move the model to `device`, as nn.Module.to does. A model converted to reduced precision stays where it was
        converted (its packed or quantized weights are made for that device): load it again with `device=`."""
        device = torch.device(device)
        if device != self.device and self.precision != "fp32":
            raise ValueError(f"this model was converted to {self.precision} on {self.device}; load it again with "
                             f"device={str(device)!r} to use it there")
        self.model.to(device)
        self.max_batch_tokens = BATCH_TOKENS.get(device.type, BATCH_TOKENS["cuda"])
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    @torch.inference_mode()
    def predict(self, pairs, batch_size: int = 32, activation=None, show_progress_bar: bool | None = None,
                convert_to_tensor: bool = False, activation_fn=None):
        """Score (query, passage) pairs. Returns np.float32 of shape (N,); a single pair gives a scalar.

        activation: None for the model's default (raw logits for the ms-marco family), or a callable / 'sigmoid' /
        'identity' applied to this call only. `activation_fn` is accepted as an alias (sentence-transformers' name)."""
        single = isinstance(pairs, (list, tuple)) and len(pairs) == 2 and isinstance(pairs[0], str)
        pairs = [pairs] if single else list(pairs)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise TypeError(f"pair {i} must be a (query, passage) tuple of two strings, got {pair!r}")
        logits = self.score_logits(pairs, batch_size, show_progress_bar)
        fn = activation_module(activation if activation is not None else activation_fn if activation_fn is not None else self.activation)
        scores = fn(logits) if fn is not None else logits
        if convert_to_tensor:
            return scores[0] if single else scores
        scores = scores.numpy()
        return scores[0] if single else scores

    @torch.inference_mode()
    def score_logits(self, pairs, batch_size: int = 32, show_progress_bar: bool | None = None) -> torch.Tensor:
        """Raw fp32 logits (N,) on the CPU, in input order.

        Pairs are tokenized once and scored longest first, so each batch pads little. A batch holds at most
        `batch_size` pairs and at most `max_batch_tokens` padded tokens (`model.max_batch_tokens`): on a CPU, small
        working sets stay in cache and are recycled by the allocator instead of page-faulting fresh memory on every op.
        Batching changes results only at float-rounding level (~1e-7)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model.eval()
        out = torch.empty(len(pairs), dtype=torch.float32)
        encodings = self.tokenizer.encode(pairs)
        lengths = [len(e.ids) for e in encodings]
        order = sorted(range(len(pairs)), key=lambda i: -lengths[i])
        batches, start = [], 0
        while start < len(order):
            n = max(1, min(batch_size, self.max_batch_tokens // lengths[order[start]]))  # the first is the longest
            batches.append(order[start : start + n])
            start += n
        if show_progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Scoring", unit="batch")
        for idx in batches:
            batch = self.tokenizer.pad([encodings[i] for i in idx])
            inputs = {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}
            out[idx] = precisions.logits(self.model, inputs, self.precision).cpu()
        return out

    def rank(self, query: str, documents, top_k: int | None = None, return_documents: bool = False, batch_size: int = 32,
             activation=None, show_progress_bar: bool | None = None) -> list:
        """Score every document against `query`; [{"corpus_id", "score"[, "text"]}] highest first, ties in input order."""
        documents = list(documents)
        scores = self.predict([(query, d) for d in documents], batch_size, activation, show_progress_bar)
        results = [{"corpus_id": i, "score": float(s)} for i, s in enumerate(scores)]
        if return_documents:
            for r in results:
                r["text"] = documents[r["corpus_id"]]
        results.sort(key=lambda r: r["score"], reverse=True)  # stable: equal scores keep input order
        return results[:top_k]

    def save_pretrained(self, path) -> None:
        """Write a folder that minilm, sentence-transformers (5.1 and newer) and transformers all load, file by file
        atomically. The activation goes into config.json["sentence_transformers"], which every ST version reads."""
        if self.precision != "fp32":
            raise ValueError(f"a model converted to {self.precision} cannot be saved; save the fp32 model (load it without dtype)")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        source = self.source_dir
        # The tokenizer files written are the ones this model uses: the source's own, or made from the loaded
        # tokenizer; a tokenizer file already in `path` that the source does not have would be read back instead
        # (tokenizer.json before vocab.txt, tokenizer_config.json's model_max_length), so it is removed.
        for name in TOKENIZER_FILES:
            if source is not None and (source / name).exists():
                if (source / name).resolve() != (path / name).resolve():
                    atomic_write(path / name, lambda tmp, name=name: shutil.copyfile(source / name, tmp))
            elif name == "tokenizer.json":
                atomic_write(path / name, lambda tmp: self.tokenizer.tokenizer.save(tmp))
            elif name == "tokenizer_config.json":
                write_json(path / name, {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                                         "model_max_length": self.max_length})
            else:
                (path / name).unlink(missing_ok=True)
        save_weights(path / "model.safetensors", self.model)
        write_json(path / "config.json", self.export_config())

    def export_config(self) -> dict:
        config = {k: v for k, v in self.hf_config.items() if k not in ("sbert_ce_default_activation_function", "torch_dtype")}
        config.update(asdict(self.model.config))
        config.update(
            architectures=["BertForSequenceClassification"],
            model_type="bert",
            id2label={"0": "LABEL_0"},
            label2id={"LABEL_0": 0},
            position_embedding_type="absolute",
            dtype="float32",
            sentence_transformers={"activation_fn": self.activation, "version": "5.1.0"},
        )
        return dict(sorted(config.items()))
