"""Hub ids resolved through huggingface_hub's cache, offline, against a cache laid out by the test itself.

huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into `huggingface_hub.constants` when it is first imported
(true for 0.2x/0.3x and for 1.x/2.x), so setting the environment variables is not enough once it is imported: the
fixture patches both the environment and the constants. Nothing here touches the network: the tests of an unreachable
Hub point HF_ENDPOINT at a closed port of this machine."""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import minilm.checkpoint
from minilm import CrossEncoder
from minilm.checkpoint import CheckpointError

REPO_ID = "org/name"
MAIN = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
TOL = 1e-5


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    if hasattr(constants, "HF_HOME"):
        monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    return cache


def lay_out(cache, repo_id, commit, src, refs=("main",), files=FILES):
    """The cache as `hf download` leaves it: blobs/<etag>, snapshots/<commit>/<file> -> ../../blobs/<etag>, refs/<ref>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for name in files:
        blob = repo / "blobs" / hashlib.sha256(f"{commit}/{name}".encode()).hexdigest()
        try:
            os.link(src / name, blob)  # a plain file, without copying 90 MB
        except OSError:
            blob.write_bytes((src / name).read_bytes())
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no newline: huggingface_hub reads the file verbatim
    return snapshot


@pytest.fixture(scope="module")
def short(golden, golden_pairs, tiny_indices):
    return [golden_pairs[i] for i in tiny_indices], np.asarray([golden["logits"]["512"]["32"][i] for i in tiny_indices])


@pytest.fixture(scope="module")
def negated_head_dir(standin_dir, tmp_path_factory):
    """The stand-in with the classifier weight negated (bias is 0): its logits are exactly minus the stand-in's."""
    out = tmp_path_factory.mktemp("negated")
    state = load_file(standin_dir / "model.safetensors")
    state["classifier.weight"] = -state["classifier.weight"]
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for name in FILES:
        if name != "model.safetensors":
            (out / name).symlink_to(standin_dir / name)
    return out


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def test_hub_id_loads_from_the_cache(hub_cache, standin_dir, standin_model, short):
    snapshot = lay_out(hub_cache, REPO_ID, MAIN, standin_dir)
    model = CrossEncoder.from_pretrained(REPO_ID, device="cpu")
    assert model.source_dir.resolve() == snapshot.resolve()
    pairs, gold = short
    assert torch.equal(model.score_logits(pairs), standin_model.score_logits(pairs))
    assert max_diff(model.predict(pairs), gold) <= TOL
    assert model.activation == "torch.nn.modules.linear.Identity"


def test_revisions(hub_cache, standin_dir, negated_head_dir, short):
    lay_out(hub_cache, REPO_ID, MAIN, standin_dir)
    lay_out(hub_cache, REPO_ID, OTHER, negated_head_dir, refs=("other",))
    pairs, gold = short
    for revision, sign in ((None, 1), ("main", 1), (MAIN, 1), ("other", -1), (OTHER, -1)):
        model = CrossEncoder.from_pretrained(REPO_ID, revision=revision, device="cpu")
        assert model.source_dir.name == (MAIN if sign == 1 else OTHER), revision
        assert max_diff(model.predict(pairs), sign * gold) <= TOL, revision
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        CrossEncoder.from_pretrained(REPO_ID, revision="no-such-branch", device="cpu")


def test_tokenizer_json_missing_from_the_snapshot(hub_cache, standin_dir, golden, golden_pairs):
    """A snapshot with vocab.txt but no tokenizer.json (older Hub repos) still tokenizes like sentence-transformers."""
    lay_out(hub_cache, REPO_ID, MAIN, standin_dir, files=[f for f in FILES if f != "tokenizer.json"])
    model = CrossEncoder.from_pretrained(REPO_ID, device="cpu")
    assert [e.ids for e in model.tokenizer.encode(golden_pairs)] == golden["input_ids"]["512"]


def test_model_absent_from_the_cache(hub_cache, standin_dir):
    lay_out(hub_cache, REPO_ID, MAIN, standin_dir)
    with pytest.raises(CheckpointError) as err:
        CrossEncoder.from_pretrained("org/absent-model", device="cpu")
    message = str(err.value)
    assert "org/absent-model" in message
    assert "not in the Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
    assert re.search(r"pass its directory|local (copy|directory)", message) and "weights/" in message
    assert not (hub_cache / "models--org--absent-model" / "snapshots").exists()  # nothing was downloaded


def test_name_under_weights(hub_cache, standin_dir, short, tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    (weights / "someone").mkdir(parents=True)
    (weights / "my-reranker").symlink_to(standin_dir, target_is_directory=True)
    (weights / "someone" / "their-reranker").symlink_to(standin_dir, target_is_directory=True)
    monkeypatch.setattr(minilm.checkpoint, "WEIGHTS_DIRS", (tmp_path / "elsewhere", weights))
    pairs, gold = short
    for name in ("my-reranker", "someone/their-reranker"):  # found under weights/ by the name exactly as given
        model = CrossEncoder.from_pretrained(name, device="cpu")
        assert model.source_dir == weights / name
        assert max_diff(model.predict(pairs), gold) <= TOL
    # never by a part of the name: another org's model, a missing path or another revision is not weights/NAME
    for name, revision in (("other-org/my-reranker", None), ("someone/their-reranker", "v2")):
        with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
            CrossEncoder.from_pretrained(name, revision=revision, device="cpu")
    for name in (str(tmp_path / "no" / "such" / "my-reranker"), "./my-reranker", "a/b/my-reranker"):
        with pytest.raises(CheckpointError, match="no such directory"):
            CrossEncoder.from_pretrained(name, device="cpu")



def test_sentence_transformers_hub_options(hub_cache, standin_dir, short, tmp_path, monkeypatch):
    """cache_folder, token and local_files_only, as sentence-transformers' CrossEncoder takes them, reach
    huggingface_hub; local_files_only never touches the network, even online."""
    import huggingface_hub
    import huggingface_hub.constants as constants

    elsewhere = tmp_path / "elsewhere"
    snapshot = lay_out(elsewhere, REPO_ID, MAIN, standin_dir)
    calls, download = [], huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **kw: calls.append(kw) or download(*a, **kw))
    pairs, gold = short
    model = CrossEncoder(REPO_ID, device="cpu", cache_folder=str(elsewhere), token="hf_secret")
    assert model.source_dir.resolve() == snapshot.resolve() and max_diff(model.predict(pairs), gold) <= TOL
    assert calls and all(kw["cache_dir"] == str(elsewhere) and kw["token"] == "hf_secret" for kw in calls)
    with pytest.raises(CheckpointError, match=f"not in the Hugging Face cache \\({re.escape(str(hub_cache))}\\)"):
        CrossEncoder(REPO_ID, device="cpu")  # the default cache does not hold it

    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, but the Hub must not even be probed
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(minilm.checkpoint, "reachable", lambda url: pytest.fail(f"probed {url}"))
    calls.clear()
    model = CrossEncoder(REPO_ID, device="cpu", cache_folder=elsewhere, local_files_only=True)
    assert model.source_dir.resolve() == snapshot.resolve() and all(kw["local_files_only"] for kw in calls)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache .*; local_files_only=True"):
        CrossEncoder("org/absent-model", device="cpu", local_files_only=True)

LOAD_IN_A_FRESH_PROCESS = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from minilm import CrossEncoder
from minilm.checkpoint import CheckpointError
start = time.perf_counter()
try:
    source, error = str(CrossEncoder.from_pretrained(sys.argv[2], device="cpu").source_dir), None
except CheckpointError as e:
    source, error = None, str(e)
print(json.dumps({"seconds": time.perf_counter() - start, "source": source, "error": error}))
"""


def load_with_unreachable_hub(hf_home, name) -> dict:
    """from_pretrained(name) in a fresh process (huggingface_hub reads its settings on import) whose Hub endpoint is
    a closed port on this machine and whose cache is `hf_home`, online (no HF_HUB_OFFLINE) and without proxies."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return load_from_hub(hf_home, name, port)


def load_from_hub(hf_home, name, port) -> dict:
    """from_pretrained(name) in a fresh process whose Hub is http://127.0.0.1:PORT and whose cache is `hf_home`."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGINGFACE")) and "PROXY" not in k.upper()}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=f"http://127.0.0.1:{port}")
    repo = str(Path(minilm.checkpoint.__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, repo, name], env=env, capture_output=True,
                          text=True, timeout=60)  # huggingface_hub alone retried for ~25 s per file
    return json.loads(done.stdout.splitlines()[-1])


def serve_hub(folder: Path, failing: str, pushed: Path | None = None, refused: str = ""):
    """A Hub on a free local port serving the files of `folder` as REPO_ID at commit MAIN, the file `failing` with an
    HTTP error (400: not retried by huggingface_hub), any other file as absent (404, EntryNotFound). With `pushed`,
    branch main moves to commit OTHER, the files of `pushed`, once config.json has been sent (a push meanwhile). With
    `refused` (the Hub's X-Error-Code: RepoNotFound, GatedRepo), every request is answered 401 (no token sent)."""
    commits = {MAIN: folder, OTHER: pushed}
    branch = {"main": MAIN}

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self, body=False):
            revision, _, name = self.path.split("?")[0].partition("/resolve/")[2].partition("/")
            commit = branch.get(revision, revision)
            files = commits.get(commit) or Path("/nonexistent")
            status = 401 if refused else 400 if name == failing else 200 if (files / name).is_file() else 404
            self.send_response(status)
            if status in (401, 404):
                self.send_header("X-Error-Code", refused or "EntryNotFound")
            data = (files / name).read_bytes() if status == 200 else b""
            if status == 200:
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)
                if name == "config.json" and pushed is not None:
                    branch["main"] = OTHER

        def do_GET(self):
            self.do_HEAD(body=True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("failing", ["tokenizer_config.json", "special_tokens_map.json"])
def test_a_file_the_hub_fails_to_send_is_an_error_not_skipped(tmp_path, standin_dir, failing):
    """A tokenizer file that could not be downloaded was taken for one the repo does not have: the model loaded
    without it and scored otherwise (a tokenizer_config.json's model_max_length, ...). A file the Hub says is absent
    (404) is still skipped."""
    model = tmp_path / "model"
    model.mkdir()
    for f in standin_dir.iterdir():
        if f.name != "vocab.txt":  # absent from the repo: the Hub answers 404
            (model / f.name).symlink_to(f)
    server = serve_hub(model, failing)
    try:
        result = load_from_hub(tmp_path / "hf_home", REPO_ID, server.server_address[1])
    finally:
        server.shutdown()
    assert result["seconds"] < 30, result
    assert result["source"] is None and result["error"].startswith(f"{REPO_ID}: {failing} could not be fetched from the "
                                                                   "Hub ("), result
    assert result["error"].endswith("nothing was loaded: try again"), result


def test_a_repo_without_some_tokenizer_files_loads_from_the_hub(tmp_path, standin_dir):
    model = tmp_path / "model"
    model.mkdir()
    for f in standin_dir.iterdir():
        if f.name != "vocab.txt":
            (model / f.name).symlink_to(f)
    server = serve_hub(model, failing="")
    try:
        result = load_from_hub(tmp_path / "hf_home", REPO_ID, server.server_address[1])
    finally:
        server.shutdown()
    assert result["error"] is None and (Path(result["source"]) / "tokenizer.json").is_file(), result
    assert not (Path(result["source"]) / "vocab.txt").exists()


def test_unreachable_hub_fails_fast_for_a_model_not_in_the_cache(tmp_path):
    result = load_with_unreachable_hub(tmp_path / "hf_home", "org/absent-model")
    assert result["seconds"] < 5, result
    assert "not in the Hugging Face cache" in result["error"] and "could not be reached" in result["error"]


def test_unreachable_hub_still_loads_from_the_cache(tmp_path, standin_dir):
    snapshot = lay_out(tmp_path / "hf_home" / "hub", REPO_ID, MAIN, standin_dir)
    result = load_with_unreachable_hub(tmp_path / "hf_home", REPO_ID)
    assert result["seconds"] < 5, result
    assert result["error"] is None and Path(result["source"]).resolve() == snapshot.resolve()


def test_a_push_while_downloading_does_not_mix_two_commits(tmp_path, standin_dir, negated_head_dir, short):
    """Every file comes from the commit config.json came from. Taken from branch main as it moves, the weights landed
    in the new commit's snapshot folder and the model was loaded from the old one, which lacked them."""
    server = serve_hub(standin_dir, failing="", pushed=negated_head_dir)
    try:
        result = load_from_hub(tmp_path / "hf_home", REPO_ID, server.server_address[1])
    finally:
        server.shutdown()
    assert result["error"] is None and Path(result["source"]).name == MAIN, result
    pairs, gold = short
    assert max_diff(CrossEncoder.from_pretrained(result["source"], device="cpu").predict(pairs), gold) <= TOL


@pytest.mark.parametrize("refused, said", [("RepoNotFound", "was not found on the Hugging Face Hub; if it is private or gated"),
                                           ("GatedRepo", "is gated: accept its conditions")])
def test_a_private_or_gated_repo_says_how_to_log_in(tmp_path, standin_dir, refused, said):
    server = serve_hub(standin_dir, failing="", refused=refused)
    try:
        result = load_from_hub(tmp_path / "hf_home", REPO_ID, server.server_address[1])
    finally:
        server.shutdown()
    assert result["error"].startswith(f"{REPO_ID} {said}") and "`hf auth login`" in result["error"], result


def test_train_py_takes_a_revision(hub_cache, standin_dir, negated_head_dir, tmp_path):
    lay_out(hub_cache, REPO_ID, MAIN, standin_dir)
    lay_out(hub_cache, REPO_ID, OTHER, negated_head_dir, refs=("other",))
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"query": "q", "passage": "p", "label": 1}\n{"query": "q", "passage": "x", "label": 0}\n')
    train = [sys.executable, str(Path(minilm.checkpoint.__file__).resolve().parent.parent / "train.py"), "--train", data,
             "--max-steps", "1", "--lr", "1e-30", "--max-length", "16", "--device", "cpu"]
    done = subprocess.run([*train, "--model", REPO_ID, "--revision", "other", "--output", tmp_path / "out"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    trained = load_file(tmp_path / "out" / "model.safetensors")["classifier.weight"]
    assert torch.equal(trained, load_file(negated_head_dir / "model.safetensors")["classifier.weight"])
    assert "| revision | `other` |" in (tmp_path / "out" / "README.md").read_text()
    done = subprocess.run([*train, "--model", standin_dir, "--revision", "other", "--output", tmp_path / "out2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "a revision (other) applies to Hub ids only" in done.stderr, done.stderr
