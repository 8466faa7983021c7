"""`CrossEncoder`: load a checkpoint, score (query, passage) pairs, rank passages, save.

Shaped like `sentence_transformers.CrossEncoder` (5.1.0) so that its usual code moves over: `CrossEncoder(name)` (or
`CrossEncoder.from_pretrained(name)`), `.predict(pairs)` / `.rank(query, docs)` / `.save_pretrained(dir)`, their
arguments in its order (what differs: docs/parity.md).
"""

import importlib
import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from . import precision as precisions
from .checkpoint import (TOKENIZER_FILES, json_text, load_weights, read_json, read_state_dict, replace_files_together,
                         resolve, safetensors_bytes)
from .model import Config, CrossEncoderModel
from .tokenizer import PairTokenizer
from .unpadded import copy_in

IDENTITY = "torch.nn.modules.linear.Identity"
SIGMOID = "torch.nn.modules.activation.Sigmoid"
# Padded tokens per forward pass. CPUs want batches whose activations stay in cache and get recycled by the allocator
# rather than page-faulted in fresh on every op; GPUs want big batches to fill the device.
BATCH_TOKENS = {"cpu": 2048, "cuda": 65536}


def default_activation(hf_config: dict) -> str:
    """The activation sentence-transformers 5.1 applies to this checkpoint's logits, as a dotted torch path.

    Priority as in ST: config.json["sentence_transformers"]["activation_fn"], then the legacy
    `sbert_ce_default_activation_function` key (the ms-marco models carry Identity there: their scores are raw
    logits), then Sigmoid for a 1-label model. A config.json names code to run, so only a module class of
    torch.nn.modules that maps (N, 1) logits to (N, 1) scores is used (vLLM's rule for the same key, for security);
    anything else gets a warning and Sigmoid, the default (ST would import any torch.* path)."""
    block = hf_config.get("sentence_transformers")
    if isinstance(block, dict) and "activation_fn" in block:  # even null: ST then takes Sigmoid, not the legacy key
        path = block["activation_fn"]
    else:
        path = hf_config.get("sbert_ce_default_activation_function")
    if path is None:
        return SIGMOID
    try:
        activation_from_path(path)
    except ValueError as e:
        warnings.warn(f"config.json: {e}; using Sigmoid instead")
        return SIGMOID
    return path


def activation_from_path(path) -> torch.nn.Module:
    """An instance of the torch.nn module class at dotted `path` (`torch.nn.modules.activation.Sigmoid`, or
    `torch.nn.Sigmoid`), checked to map (N, 1) logits to (N, 1) scores; ValueError for anything else."""
    cls = None
    if isinstance(path, str) and path.startswith("torch.nn."):
        module_name, _, class_name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            pass
    # a class defined in torch.nn.modules, not merely reachable from there (torch.nn.modules.activation.Tensor)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__module__.startswith("torch.nn.modules.")):
        raise ValueError(f"activation {path!r} is not a module class of torch.nn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Softmax() warns of its implicit dim; it is warned of when scoring
            fn = cls()
            ok = fn(torch.zeros(2, 1)).shape == (2, 1)
    except Exception:  # whatever a torch.nn constructor or forward raises: Linear() wants arguments, Module() a forward
        ok = False
    if not ok:
        raise ValueError(f"activation {path!r} cannot be built without arguments to map logits to scores")
    return fn


def activation_module(activation) -> torch.nn.Module | None:
    """None for Identity; otherwise a callable. Accepts a module/function, 'sigmoid', 'identity' or the path of a
    torch.nn module class (ValueError for anything else)."""
    if not callable(activation):
        activation = activation_from_path({"sigmoid": SIGMOID, "identity": IDENTITY}.get(str(activation).lower(), activation))
    if isinstance(activation, torch.nn.Identity):
        return None
    if isinstance(activation, torch.nn.Module):
        activation.eval()  # as in sentence-transformers' predict: a Dropout or RReLU then gives the same scores each call
    return activation


def activation_path(activation) -> str:
    """The dotted path config.json stores for `activation` (a path, 'sigmoid'/'identity', or a torch.nn module);
    ValueError for a callable that sentence-transformers could not build back from a path (a function, a lambda)."""
    if isinstance(activation, str):
        return {"sigmoid": SIGMOID, "identity": IDENTITY}.get(activation.lower(), activation)
    path = f"{type(activation).__module__}.{type(activation).__qualname__}"
    if not isinstance(activation, torch.nn.Module) or not path.startswith("torch.nn.modules."):
        raise ValueError(f"activation_fn {activation!r} cannot be saved in config.json: only a torch.nn module "
                         f"(torch.nn.Sigmoid(), torch.nn.Identity(), ...) or its path can")
    if activation_from_path(path).extra_repr() != activation.extra_repr():  # loaded, it is built without arguments
        raise ValueError(f"activation_fn {activation!r} cannot be saved in config.json, which names its class only: "
                         f"loaded back it would be {type(activation).__name__}() and score differently")
    return path


def refuse_softmax(apply_softmax: bool) -> None:
    if apply_softmax:  # ST 5.1 would return 1.0 for every pair
        raise ValueError("apply_softmax normalises over a model's labels, and this model has one logit: every score "
                         "would be 1.0; for probabilities use activation_fn='sigmoid'")


def default_device(precision: str) -> str:
    """cuda when there is one, except for int8 (CPUs only)."""
    return "cuda" if torch.cuda.is_available() and precision != "int8" else "cpu"


def usable_device(device) -> torch.device:
    """`device` as a torch.device that can hold this model here, else ValueError saying why (before the slow part)."""
    try:
        device = torch.device(device)
    except RuntimeError as e:  # "Expected one of cpu, cuda, ... device type at start of device string: gpu"
        raise ValueError(f"device {device!r}: {str(e).splitlines()[0]}") from None
    if device.type == "meta":
        raise ValueError("device 'meta' holds no data, so nothing can be scored on it; use cpu or cuda")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # "Torch not compiled with CUDA enabled" is an AssertionError
        raise ValueError(f"device {str(device)!r} is not available here ({str(e).split('. ')[0]})") from None
    return device


def ranked(scores, logits, documents: list, top_k: int | None = None, return_documents: bool = False) -> list:
    """rank's results: [{"corpus_id", "score"[, "text"]}] highest score first, equal scores by their logits, then in
    input order. (sentence-transformers sorts by score alone: a sigmoid rounds every logit above ~17 to 1.0 in fp32,
    and such passages would then come in input order, the best possibly last.)"""
    keys = [(float(s), float(x)) for s, x in zip(scores, logits)]
    order = sorted(range(len(keys)), key=keys.__getitem__, reverse=True)  # stable: equal keys keep input order
    return [{"corpus_id": i, "score": keys[i][0], **({"text": documents[i]} if return_documents else {})}
            for i in order[:top_k]]


class CrossEncoder:
    """A MiniLM/BERT cross-encoder with its tokenizer: `predict` scores pairs, `rank` orders passages for a query."""

    def __init__(self, model_name_or_path: "str | os.PathLike", num_labels: int | None = None,
                 max_length: int | None = None, activation_fn=None, device=None, cache_folder=None,
                 trust_remote_code: bool = False, revision: str | None = None, local_files_only: bool = False,
                 token=None, *, dtype=None, packed: bool = True):
        """Load a local directory, a name under weights/, or a Hugging Face Hub id (see `minilm.checkpoint`), taking
        sentence-transformers' arguments in its order.

        max_length: tokens per pair (default: the checkpoint's, at most 512). activation_fn: the default activation of
        predict and rank (default: the checkpoint's, see `default_activation`). device: default cuda when available,
        cpu for int8. cache_folder (the Hub cache), revision, local_files_only and token (private Hub models) go to
        huggingface_hub. num_labels: 1 or None (the head has one logit). trust_remote_code: accepted; minilm never runs
        code from a checkpoint. minilm's own, by keyword: dtype fp32 (default, exact), "bf16", "fp16", "int8" (see
        minilm.precision; `packed=False`: plain Linears for CPU bf16)."""
        if not isinstance(model_name_or_path, (str, os.PathLike)):
            raise TypeError(f"model_name_or_path must be a Hub id or a folder, got {type(model_name_or_path).__name__}")
        if num_labels not in (None, 1):
            raise ValueError(f"num_labels={num_labels!r}: minilm's cross-encoder has a 1-logit head")
        if activation_fn is not None:
            self.activation_fn = activation_fn  # ValueError now for an unknown name, not at the first predict
        self.precision = precisions.parse(dtype)  # "fp32", or what minilm.precision converts the model to
        device = usable_device(device if device is not None else default_device(self.precision))
        precisions.check(self.precision, device)  # before the slow part
        folder = resolve(str(model_name_or_path), revision, cache_dir=cache_folder, local_files_only=local_files_only,
                         token=token)
        self.source_dir = folder  # tokenizer files are copied from here by save_pretrained
        self.hf_config = read_json(folder / "config.json")
        config = Config.from_hf(self.hf_config, source=str(folder / "config.json"))
        self.tokenizer = PairTokenizer.from_dir(folder, max_length, config.max_position_embeddings)
        tokens = self.tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
        if tokens > config.vocab_size:  # an id past the embeddings would be an IndexError at some text, not here
            raise ValueError(f"{folder / 'config.json'}: the tokenizer has {tokens} tokens, more than vocab_size "
                             f"{config.vocab_size} (the rows of bert.embeddings.word_embeddings)")
        with torch.device("meta"):  # no memory, no random draws: every tensor comes from the checkpoint
            model = CrossEncoderModel(config)
        load_weights(model, read_state_dict(folder), folder)
        self.model = precisions.convert(model.to(device).eval(), self.precision, packed)
        if activation_fn is None:  # the default activation of predict and rank, saved by save_pretrained
            self.activation = default_activation(self.hf_config)

    @classmethod
    def from_pretrained(cls, model_name_or_path, **options) -> "CrossEncoder":
        """`CrossEncoder(model_name_or_path, **options)`, under transformers' name."""
        return cls(model_name_or_path, **options)

    @property
    def activation_fn(self) -> torch.nn.Module:
        """The default activation of predict and rank, as a module (sentence-transformers' attribute); assignable."""
        return activation_module(self.activation) or torch.nn.Identity()

    @activation_fn.setter
    def activation_fn(self, activation) -> None:
        activation_module(activation)  # ValueError for an unknown name
        self.activation = activation

    def to(self, device) -> "CrossEncoder":
        """Move the model to `device`, as nn.Module.to does (a converted model's weights are made for its device)."""
        device = torch.device(device)
        if device != self.device and self.precision != "fp32":
            raise ValueError(f"this model was converted to {self.precision} on {self.device}; load it again with "
                             f"device={str(device)!r} to use it there")
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_labels(self) -> int:
        """Logits per pair, as sentence-transformers' attribute: the head has one."""
        return 1

    @property
    def max_length(self) -> int:
        """Tokens per pair; assignable, as in sentence-transformers (5 to the model's position embeddings)."""
        return self.tokenizer.max_length

    @max_length.setter
    def max_length(self, max_length: int) -> None:
        self.tokenizer.max_length = max_length

    @property
    def max_batch_tokens(self) -> int:
        return BATCH_TOKENS.get(self.device.type, BATCH_TOKENS["cuda"])

    @torch.inference_mode()
    def predict(self, sentences, batch_size: int = 32, show_progress_bar: bool | None = None, activation_fn=None,
                apply_softmax: bool = False, convert_to_numpy: bool = True, convert_to_tensor: bool = False, *,
                activation=None):
        """Score (query, passage) pairs (`sentences`, sentence-transformers' name for them). Returns np.float32 of
        shape (N,); a single pair gives a scalar.

        activation_fn (or `activation`): None for the model's default (raw logits for the ms-marco family), or a
        callable / 'sigmoid' / 'identity', applied to this call only. convert_to_tensor: a CPU torch.Tensor instead;
        convert_to_numpy=False (without it): a list of 0-d tensors. The arguments are sentence-transformers', in its
        order: `predict(pairs, 32, False, torch.nn.Sigmoid())` means what it means there."""
        refuse_softmax(apply_softmax)
        single = isinstance(sentences, (list, tuple)) and len(sentences) == 2 and isinstance(sentences[0], str)
        pairs = [sentences] if single else list(sentences)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise TypeError(f"pair {i} must be a (query, passage) tuple of two strings, got {pair!r}")
            for name, text in zip(("query", "passage"), pair):
                try:  # the tokenizer refuses a lone surrogate only where it reads: in the part kept after truncation
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"pair {i}: the {name} is not Unicode text (a lone surrogate {text[e.start]!r} "
                                     f"at character {e.start})") from None
        scores = self.activate(self.score_logits(pairs, batch_size, show_progress_bar),
                               activation if activation is not None else activation_fn)
        if not convert_to_tensor:  # no pairs: float64, sentence-transformers' np.array([])
            scores = (scores if pairs else scores.double()).numpy() if convert_to_numpy else list(scores)
        return scores[0] if single else scores

    def activate(self, logits: torch.Tensor, activation=None) -> torch.Tensor:
        """Scores from logits (N,): `activation` (see predict), or the model's default when None."""
        fn = activation_module(activation if activation is not None else self.activation)
        # on (N, 1) rows, as sentence-transformers does per batch: a Softmax over dim 1 sees one logit; one over dim 0
        # sees all N pairs here, each batch of batch_size there (docs/parity.md)
        return fn(logits[:, None]).reshape(len(logits)) if fn is not None else logits

    @torch.inference_mode()
    def score_logits(self, pairs, batch_size: int = 32, show_progress_bar: bool | None = None) -> torch.Tensor:
        """Raw fp32 logits (N,) on the CPU, in input order.

        Pairs are tokenized once and scored longest first, so each batch pads little. A batch holds at most
        `batch_size` pairs and at most `max_batch_tokens` padded tokens (`model.max_batch_tokens`): on a CPU, small
        working sets stay in cache and are recycled by the allocator instead of page-faulting fresh memory on every op.
        Batching (and where the weights sit in memory) changes results only at float-rounding level (~1e-6 relative)."""
        return self.score_encodings(self.tokenizer.encode(pairs), batch_size, show_progress_bar)

    @torch.inference_mode()
    def score_encodings(self, encodings, batch_size: int = 32, show_progress_bar: bool | None = None,
                        progress=None) -> torch.Tensor:
        """score_logits of pairs already tokenized by `self.tokenizer.encode` (elsewhere: infer.py tokenizes the next
        chunk of a file in a thread while this one is scored). progress: a tqdm bar counting pairs, advanced batch by
        batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        dtype = next(self.model.parameters()).dtype if self.precision == "fp32" else torch.float32
        if dtype != torch.float32:  # model.model.half(): the head would get mixed dtypes
            raise ValueError(f"the model's weights are {dtype} but it was loaded in fp32; load it with "
                             f"dtype='fp16' or 'bf16' (minilm.precision) instead of converting model.model")
        self.model.eval()
        out = torch.empty(len(encodings), dtype=torch.float32)
        batches = self.batches(encodings, batch_size)
        if show_progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Scoring", unit="batch")
        # On a GPU: pinned, non-blocking copies in and one copy out at the end, so that the CPU pads the next batch
        # while the GPU scores this one, with no wait between batches
        scored = []
        for idx in batches:
            batch = self.tokenizer.model_inputs([encodings[i] for i in idx])
            inputs = {k: copy_in(torch.from_numpy(v), self.device) for k, v in batch.items()}
            scored.append((idx, precisions.logits(self.model, inputs, self.precision)))
            if progress is not None:
                progress.update(len(idx))
        for idx, logits in scored:
            out[idx] = logits.cpu()
        return out

    def batches(self, encodings, batch_size: int) -> list[list[int]]:
        """Indices of `encodings` in the batches score_encodings runs: longest first, each at most `batch_size` pairs
        and `max_batch_tokens` padded tokens."""
        lengths = [len(e.ids) for e in encodings]
        order = sorted(range(len(encodings)), key=lambda i: -lengths[i])
        batches, start = [], 0
        while start < len(order):
            n = max(1, min(batch_size, self.max_batch_tokens // lengths[order[start]]))  # the first is the longest
            batches.append(order[start : start + n])
            start += n
        return batches

    def rank(self, query: str, documents, top_k: int | None = None, return_documents: bool = False, batch_size: int = 32,
             show_progress_bar: bool | None = None, activation_fn=None, apply_softmax: bool = False,
             convert_to_numpy: bool = True, convert_to_tensor: bool = False, *, activation=None) -> list:
        """Score every document against `query`; [{"corpus_id", "score"[, "text"]}] highest first (see `ranked`).

        top_k: the number of results (None: all). `documents` is a list (or iterable) of strings. The other
        arguments are predict's, in sentence-transformers' order; the scores are Python floats whatever
        convert_to_numpy and convert_to_tensor say (sentence-transformers gives np.float32, or 0-d tensors)."""
        refuse_softmax(apply_softmax)
        if isinstance(documents, str):  # iterating it would score one-character documents
            raise TypeError("documents must be a list of strings, got one string; pass [text] for a single document")
        if top_k is not None and top_k < 0:  # results[:-1] would silently drop the last one
            raise ValueError(f"top_k must be at least 0 (None: all documents), got {top_k}")
        documents = list(documents)
        logits = self.predict([(query, d) for d in documents], batch_size, show_progress_bar, "identity", convert_to_tensor=True)
        return ranked(self.activate(logits, activation if activation is not None else activation_fn), logits, documents,
                      top_k, return_documents)

    def save(self, path) -> None:
        """`save_pretrained`, under sentence-transformers' other name for it."""
        self.save_pretrained(path)

    def save_pretrained(self, path) -> None:
        """Write a folder that minilm, sentence-transformers (5.1 and newer) and transformers all load: every file is
        written before any replaces its old version, so that a failed save leaves the folder as it was. The activation
        goes into config.json["sentence_transformers"], which sentence-transformers 4.0 and newer read (older versions
        read only the legacy key, which is not written)."""
        if self.precision != "fp32":
            raise ValueError(f"a model converted to {self.precision} cannot be saved; save the fp32 model (load it without dtype)")
        model_config = self.export_config()  # first: an activation that cannot be saved writes nothing
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        source = self.source_dir
        # The tokenizer files written are the ones this model uses: the source's own, or made from the loaded
        # tokenizer; a tokenizer file already in `path` that the source does not have would be read back instead
        # (tokenizer.json before vocab.txt, tokenizer_config.json's model_max_length), so it is removed.
        # model_max_length is the max_length this model scores with (a model trained with --max-length 256 loads
        # back truncating at 256, as sentence-transformers saves it), not the source's.
        writes = {}  # name: write(temporary path)
        for name in TOKENIZER_FILES:
            if name == "tokenizer_config.json":
                config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
                if source is not None and (source / name).exists():
                    config = read_json(source / name)
                text = json_text({**config, "model_max_length": self.max_length, "padding_side": "right",
                                  "truncation_side": "right"})
                writes[name] = lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8")
            elif source is not None and (source / name).exists():
                writes[name] = lambda tmp, name=name: shutil.copyfile(source / name, tmp)
            elif name == "tokenizer.json":
                writes[name] = lambda tmp: self.tokenizer.tokenizer.save(tmp)
        weights = safetensors_bytes(self.model)
        writes["model.safetensors"] = lambda tmp: Path(tmp).write_bytes(weights)
        writes["config.json"] = lambda tmp: Path(tmp).write_text(json_text(model_config), encoding="utf-8")  # last
        replace_files_together(path, writes)  # a failed save (a full disk) leaves `path` as it was
        for name in set(TOKENIZER_FILES) - set(writes):
            (path / name).unlink(missing_ok=True)

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
            sentence_transformers={"activation_fn": activation_path(self.activation), "version": "5.1.0"},
            transformers_version="4.56.0",  # the format written is that version's, not the source checkpoint's
        )
        return dict(sorted(config.items()))
