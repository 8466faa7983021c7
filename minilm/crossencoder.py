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

from . import packed as minilm_packed
from .checkpoint import (TOKENIZER_FILES, atomic_write, load_weights, read_state_dict, resolve, save_weights, skip_init,
                         write_json)
from .model import Config, CrossEncoderModel
from .tokenizer import PairTokenizer

IDENTITY = "torch.nn.modules.linear.Identity"
SIGMOID = "torch.nn.modules.activation.Sigmoid"
# Padded tokens per forward pass. CPUs want batches whose activations stay in cache and get recycled by the allocator
# (a 16,384-token batch is ~1.5x slower per pair here); GPUs want big batches to fill the device.
BATCH_TOKENS = {"cpu": 2048, "cuda": 65536}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "int8": "int8"}


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


def parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be a torch dtype or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def check_dtype(dtype, device: torch.device):
    """Refuse reduced precision where it would be slow rather than fast: bf16 needs native bf16 dot products on a CPU
    (AVX512-BF16 or AMX), fp16 is for GPUs, int8 dynamic quantization for CPUs."""
    if device.type == "cpu":
        if dtype == torch.bfloat16 and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
            raise ValueError("dtype bf16 needs a CPU with AVX512-BF16 or AMX (this one would emulate it, slower than "
                             "fp32); use fp32 or int8")
        if dtype == torch.float16:
            raise ValueError("dtype fp16 is for GPUs (CPUs emulate it, slower than fp32); on a CPU use bf16 or int8")
    elif dtype == "int8":
        raise ValueError("dtype int8 (dynamic quantization) runs on the CPU only; on a GPU use fp16 or bf16")
    return dtype


def quantize_int8(model: torch.nn.Module, names: set[str]) -> torch.nn.Module:
    """Dynamic int8 quantization of the named Linears: int8 weights with one scale per output row, activations
    quantized at run time with one scale per call (fbgemm's dynamic Linear).

    torch.ao.quantization is deprecated in favour of the separate torchao package, which we do not depend on. Its
    fbgemm dynamic Linear rescales inside the GEMM; a Linear built on torch._int_mm must rescale its int32 output in
    separate passes and measured 1.7-5x slower here. So it is used with its deprecation notices silenced, and refused
    with a clear message once a torch release has removed it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        except ImportError:
            raise ValueError(f"dtype int8 needs torch.ao.quantization.quantize_dynamic, which torch {torch.__version__} "
                             "no longer has; use fp32 or bf16") from None
        # one weight scale per output row: on TyDi-ru test (bench/agreement.py) same top-1 62% instead of 52% with one
        # scale per matrix, Spearman 0.88 instead of 0.72, same speed
        return quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8)


class CrossEncoder:
    """A MiniLM/BERT cross-encoder with its tokenizer: `predict` scores pairs, `rank` orders passages for a query."""

    def __init__(self, model: CrossEncoderModel, tokenizer: PairTokenizer, hf_config: dict, source_dir: Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.source_dir = source_dir  # tokenizer files are copied from here by save_pretrained
        self.activation = default_activation(hf_config)
        self.max_batch_tokens = BATCH_TOKENS["cpu"]  # set for the device by `to()`
        self.dtype = torch.float32  # or bf16 / fp16 / "int8" once `to()` converted the model

    @classmethod
    def from_pretrained(cls, name_or_path, *, revision=None, device=None, dtype=None, max_length=None) -> "CrossEncoder":
        """Load a local directory, a name under weights/, or a Hugging Face Hub id (see `minilm.checkpoint`).

        device: "cpu", "cuda", ... (default: cuda when available, cpu for int8). dtype: torch.float32 (default, exact), or
        "bf16" / "fp16" / "int8" for speed. max_length: tokens per pair including specials (default 512)."""
        folder = resolve(str(name_or_path), revision)
        hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = Config.from_hf(hf_config)
        with skip_init():
            model = CrossEncoderModel(config)
        load_weights(model, read_state_dict(folder), folder)
        tokenizer = PairTokenizer.from_dir(folder, max_length, config.max_position_embeddings)
        ce = cls(model, tokenizer, hf_config, folder)
        if device is None:
            device = "cuda" if torch.cuda.is_available() and dtype != "int8" else "cpu"  # int8 runs on CPUs only
        return ce.to(device, dtype)

    def to(self, device, dtype=None, packed: bool = True) -> "CrossEncoder":
        """Move to `device`, and optionally convert to reduced precision (once: reload to go back to fp32).

        bf16 / fp16 run every layer but the last under autocast, their Linears' weights stored in `dtype`; the residual
        stream, LayerNorms and embeddings stay fp32, and the last layer, pooler and classifier run in fp32 (see
        `CrossEncoderModel.fp32_tail`). On a CPU, bf16 Linears are also pre-packed for oneDNN with GELU fused
        (`minilm.packed`; `packed=False` keeps plain nn.Linear under autocast). int8 is dynamic quantization of the
        same Linears."""
        device = torch.device(device)
        dtype = check_dtype(parse_dtype(dtype), device)
        if self.dtype != torch.float32 and (dtype != self.dtype or device != self.device):
            raise ValueError(f"this model was converted to {self.dtype}; load it again to move it or change its dtype")
        self.model.to(device)
        last = f"bert.encoder.layer.{len(self.model.bert.encoder.layer) - 1}."
        reduced = {name: m for name, m in self.model.bert.encoder.named_modules(prefix="bert.encoder")
                   if isinstance(m, torch.nn.Linear) and not name.startswith(last)}  # every layer's Linears but the last
        if dtype == "int8":
            self.model = quantize_int8(self.model, set(reduced))
        elif dtype != torch.float32:
            for module in reduced.values():
                module.to(dtype)
            if packed and device.type == "cpu" and dtype == torch.bfloat16 and minilm_packed.available():
                minilm_packed.pack_layers(self.model.bert.encoder.layer[:-1])
        self.dtype = dtype
        self.model.fp32_tail = self.autocast_dtype is not None
        self.model.eval()
        self.max_batch_tokens = BATCH_TOKENS.get(device.type, BATCH_TOKENS["cuda"])
        return self

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 / fp16 scoring runs under torch.autocast in that dtype; fp32 and int8 do not."""
        return self.dtype if self.dtype in (torch.bfloat16, torch.float16) else None

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
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                out[idx] = self.model(**inputs).float().cpu()
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
        if self.dtype != torch.float32:
            raise ValueError(f"a model converted to {self.dtype} cannot be saved; save the fp32 model (load it without dtype)")
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
