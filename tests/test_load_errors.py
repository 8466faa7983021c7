"""Damaged or ill-typed checkpoint files and bad options: one error naming the file (or option) and the problem,
from the library (CheckpointError / ValueError) and from the CLIs (one line, exit status 2), never a traceback.

Every checkpoint here is the stand-in (conftest.py) with one file replaced in a tmp dir."""

import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import infer  # noqa: E402
from minilm import CrossEncoder  # noqa: E402
from minilm import evaluate  # noqa: E402
from minilm.checkpoint import CheckpointError  # noqa: E402


def variant(src: Path, dst: Path, files: dict) -> Path:
    """The checkpoint in `src` with some files replaced (name -> bytes or text), the others linked."""
    dst.mkdir()
    for name, data in files.items():
        (dst / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    for path in src.iterdir():
        if path.name not in files:
            os.symlink(path, dst / path.name)
    return dst


def one_line_cli_error(capsys, folder: Path, device: str = "cpu") -> str:
    """infer.py on `folder`: exit status 2 and exactly one line on stderr, which is returned."""
    assert infer.main(["--model", str(folder), "--device", device, "a query", "a passage"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infer.py: error: ") and not out, err
    return lines[0]


def torch_bin(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def config(standin_dir) -> dict:
    return json.loads((standin_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def safetensors_bytes(standin_dir) -> bytes:
    return (standin_dir / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "name, damage, problem",
    [
        ("model.safetensors", lambda b: b"", "not a complete safetensors file"),
        ("model.safetensors", lambda b: b[:1000], "not a complete safetensors file"),
        ("model.safetensors", lambda b: b[: len(b) // 2], "not a complete safetensors file"),
        ("tokenizer.json", lambda b: b"", "not a valid tokenizer file"),
        ("tokenizer.json", lambda b: b[:1000], "not a valid tokenizer file"),
        ("config.json", lambda b: b"", "not valid JSON"),
        ("config.json", lambda b: b'{"hidden_size": 384 "vocab_size": 30522}', "Expecting ',' delimiter"),
        ("config.json", lambda b: b"[1, 2]", "expected a JSON object {...}, got an array"),
        ("tokenizer_config.json", lambda b: b"{", "not valid JSON"),
        ("tokenizer_config.json", lambda b: b'{"model_max_length": "big"}', 'model_max_length must be a number, got "big"'),
    ],
)
def test_damaged_file(standin_dir, safetensors_bytes, tmp_path, capsys, name, damage, problem):
    whole = safetensors_bytes if name == "model.safetensors" else (standin_dir / name).read_bytes()
    folder = variant(standin_dir, tmp_path / "bad", {name: damage(whole)})
    with pytest.raises(CheckpointError) as err:
        CrossEncoder.from_pretrained(folder, device="cpu")
    assert str(folder / name) in str(err.value) and problem in str(err.value)
    line = one_line_cli_error(capsys, folder)
    assert str(folder / name) in line and problem in line


@pytest.mark.parametrize(
    "data, problem",
    [
        (lambda state: b"", "the file ends too early"),
        (lambda state: torch_bin(state)[:-100], "cannot be read as a PyTorch checkpoint"),
        (lambda state: b"not a pickle at all", "not a PyTorch checkpoint of plain tensors"),
        (lambda state: torch_bin([1, 2]), "holds a list, not a dict of tensors"),
    ],
)
def test_damaged_pytorch_model_bin(standin_dir, tmp_path, capsys, data, problem):
    folder = variant(standin_dir, tmp_path / "bin", {"pytorch_model.bin": data(load_file(standin_dir / "model.safetensors"))})
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as err:
        CrossEncoder.from_pretrained(folder, device="cpu")
    assert problem in str(err.value)
    assert problem in one_line_cli_error(capsys, folder)


@pytest.mark.parametrize(
    "key, value, problem",
    [
        ("hidden_size", "384", 'hidden_size must be int, got "384"'),
        ("layer_norm_eps", "1e-12", 'layer_norm_eps must be int or float, got "1e-12"'),
        ("vocab_size", None, "vocab_size must be int, got null"),
        ("classifier_dropout", "0.1", 'classifier_dropout must be int or float or null, got "0.1"'),
        ("num_hidden_layers", True, "num_hidden_layers must be int, got true"),
        ("num_attention_heads", 5, "num_attention_heads 5 does not divide hidden_size 384"),
        ("hidden_size", 0, "hidden_size must be at least 1, got 0"),
        ("hidden_dropout_prob", 1.5, "hidden_dropout_prob must be between 0 and 1, got 1.5"),
        ("pad_token_id", 30522, "pad_token_id 30522 is not an id of the 30522-token vocabulary"),
        ("id2label", None, "a cross-encoder reranker has exactly 1 label"),
        # transformers would score these with a causal mask, or build cross-attention layers: another model
        ("is_decoder", True, "has is_decoder true; only a BERT encoder (false) is implemented"),
        ("add_cross_attention", True, "has add_cross_attention true; only a BERT encoder (false) is implemented"),
        ("type_vocab_size", 1, "type_vocab_size must be at least 2 (the passage is segment 1), got 1"),
        ("vocab_size", 30000, "the tokenizer has 30522 tokens, more than vocab_size 30000"),
        ("pruned_heads", {"0": [1]}, "has pruned_heads; attention with pruned heads is not implemented"),
    ],
)
def test_config_value_of_the_wrong_type_or_range(standin_dir, config, tmp_path, capsys, key, value, problem):
    folder = variant(standin_dir, tmp_path / "bad", {"config.json": json.dumps(dict(config, **{key: value}))})
    with pytest.raises(ValueError) as err:
        CrossEncoder.from_pretrained(folder, device="cpu")
    assert str(err.value).startswith(str(folder / "config.json")) and problem in str(err.value)
    assert problem in one_line_cli_error(capsys, folder)


@pytest.mark.parametrize("key", ["model_type", "hidden_size", "num_hidden_layers", "intermediate_size"])
def test_config_without_a_key_transformers_would_default_otherwise(standin_dir, config, tmp_path, capsys, key):
    """Without num_hidden_layers transformers builds BERT-base's 12 layers (6 of them random) where minilm's default
    is MiniLM-L6's 6: a silently different model. Without model_type transformers refuses the folder. So minilm does."""
    folder = variant(standin_dir, tmp_path / "bad", {"config.json": json.dumps({k: v for k, v in config.items() if k != key})})
    problem = f"config.json has no {key}"
    with pytest.raises(ValueError, match=problem):
        CrossEncoder.from_pretrained(folder, device="cpu")
    assert problem in one_line_cli_error(capsys, folder)


def test_vocab_txt_that_is_not_utf8(standin_dir, tmp_path, capsys):
    folder = variant(standin_dir, tmp_path / "bad", {"vocab.txt": b"[PAD]\n\xff\xfe\n"})
    (folder / "tokenizer.json").unlink()  # so vocab.txt is read
    with pytest.raises(CheckpointError, match="vocab.txt: not UTF-8 text"):
        CrossEncoder.from_pretrained(folder, device="cpu")
    assert "vocab.txt: not UTF-8 text" in one_line_cli_error(capsys, folder)


def test_special_tokens_stored_as_added_tokens_load(standin_dir, golden, golden_pairs, tmp_path):
    """tokenizer_config.json may hold {"content": "[PAD]", ...} objects for its special tokens, as older
    transformers wrote them; vocab.txt is then built with those tokens, not refused with a TypeError."""
    added = {k: {"__type": "AddedToken", "content": v, "lstrip": False, "rstrip": False}
             for k, v in (("pad_token", "[PAD]"), ("unk_token", "[UNK]"), ("cls_token", "[CLS]"), ("sep_token", "[SEP]"))}
    tok_config = dict(json.loads((standin_dir / "tokenizer_config.json").read_text()), **added)
    folder = variant(standin_dir, tmp_path / "added", {"tokenizer_config.json": json.dumps(tok_config)})
    (folder / "tokenizer.json").unlink()  # so vocab.txt and the special tokens of tokenizer_config.json are used
    model = CrossEncoder.from_pretrained(folder, device="cpu")
    assert [e.ids for e in model.tokenizer.encode(golden_pairs)] == golden["input_ids"]["512"]


# ---------------------------------------------------------------------------------------------------------------------
# devices and options


@pytest.mark.parametrize("device", ["meta", "mps", "cuda", "gpu"])
def test_unusable_device(standin_dir, tmp_path, capsys, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    with pytest.raises(ValueError, match=f"device '{device}'"):
        CrossEncoder.from_pretrained(standin_dir, device=device)
    assert device in one_line_cli_error(capsys, standin_dir, device)  # infer.py checks cuda and gpu itself
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"query": "q", "passage": "p", "label": 1}\n')
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--model", str(standin_dir), "--data", str(data), "--device", device])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and f"device '{device}'" in err and not out, err


def test_evaluate_refuses_batch_size_0(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--data", str(tmp_path / "pairs.jsonl"), "--batch-size", "0"])
    assert exit_.value.code == 2
    assert "argument --batch-size: must be at least 1, got 0" in capsys.readouterr().err
