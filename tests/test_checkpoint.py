"""Reading and writing checkpoints: the save/load round trip, the layouts found in the wild, and clear errors.

Every checkpoint here is derived from the stand-in in a tmp dir; scores are checked against the golden outputs of
sentence-transformers 5.1.0 (or bitwise against the stand-in itself where the weights are the same)."""

import json
import os
import re
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, normalizers

from minilm import CrossEncoder
from minilm.checkpoint import CheckpointError
from standin import encoder_dir

IDENTITY = "torch.nn.modules.linear.Identity"
SIGMOID = "torch.nn.modules.activation.Sigmoid"
TOL = 1e-5
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def make_variant(src, dst, *, state=None, config=None, weights="model.safetensors", files=TOKENIZER_FILES):
    """A checkpoint folder from the stand-in: `state` / `config` replace its tensors / config.json (else symlinks)."""
    dst.mkdir(parents=True)
    if state is None:
        os.symlink(src / "model.safetensors", dst / weights) if weights == "model.safetensors" else None
    elif weights == "model.safetensors":
        save_file(state, dst / weights, metadata={"format": "pt"})
    else:
        torch.save(state, dst / weights)
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    else:
        os.symlink(src / "config.json", dst / "config.json")
    for name in files:
        os.symlink(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def standin_state(standin_dir):
    return load_file(standin_dir / "model.safetensors")


@pytest.fixture(scope="module")
def standin_config(standin_dir):
    return json.loads((standin_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def tiny(golden, golden_pairs, tiny_indices):
    """(pairs, golden logits) for the golden pairs of at most 40 tokens."""
    return [golden_pairs[i] for i in tiny_indices], np.asarray([golden["logits"]["512"]["32"][i] for i in tiny_indices])


@pytest.fixture(scope="module")
def short(golden, golden_pairs, short_indices):
    """(pairs, golden logits) for the golden pairs of at most 128 tokens."""
    return [golden_pairs[i] for i in short_indices], np.asarray([golden["logits"]["512"]["32"][i] for i in short_indices])


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


# ---------------------------------------------------------------------------------------------------------------------
# save_pretrained -> from_pretrained


def test_save_pretrained_round_trip_is_exact(standin_model, standin_state, short, tmp_path, golden):
    pairs, gold = short
    out = tmp_path / "saved"
    standin_model.save_pretrained(out)
    loaded = CrossEncoder.from_pretrained(out, device="cpu")

    before, after = standin_model.model.state_dict(), loaded.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ours, theirs = standin_model.score_logits(pairs), loaded.score_logits(pairs)
    assert torch.equal(ours, theirs)  # bitwise
    assert max_diff(theirs.numpy(), gold) <= TOL

    config = json.loads((out / "config.json").read_text())
    assert config == golden["interop"]["st_saved_config"]  # what sentence-transformers 5.1 saves, key for key
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert {k: tokenizer_config[k] for k in ("model_max_length", "padding_side", "truncation_side")} == \
        {"model_max_length": 512, "padding_side": "right", "truncation_side": "right"}
    assert config["sentence_transformers"]["activation_fn"] == IDENTITY
    assert "sbert_ce_default_activation_function" not in config
    assert config["architectures"] == ["BertForSequenceClassification"] and config["model_type"] == "bert"
    assert config["id2label"] == {"0": "LABEL_0"} and config["num_hidden_layers"] == 6
    assert loaded.activation == IDENTITY

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
    assert len(keys) == 105 and keys == set(standin_state)
    assert not any("position_ids" in k for k in keys)
    for name in TOKENIZER_FILES:
        if name == "tokenizer_config.json":  # the source's, with the max_length the model scores with
            saved, source = (json.loads((folder / name).read_text()) for folder in (out, standin_model.source_dir))
            assert saved == {**source, "model_max_length": standin_model.max_length, "padding_side": "right",
                             "truncation_side": "right"}
        else:
            assert (out / name).read_bytes() == (standin_model.source_dir / name).read_bytes()

    loaded.save_pretrained(out)  # saving over the folder it was loaded from keeps it intact
    again = CrossEncoder.from_pretrained(out, device="cpu")
    assert torch.equal(again.score_logits(pairs), ours)


# ---------------------------------------------------------------------------------------------------------------------
# layouts found in the wild


def test_bare_bert_model_checkpoint(standin_model, standin_state, short):
    """all-MiniLM-L6-v2 as published: a BertModel (no `bert.` prefix, no classifier, old position_ids buffer)."""
    with pytest.warns(UserWarning, match=r"classifier\.(weight|bias).*initialised"):
        bare = CrossEncoder.from_pretrained(encoder_dir(), device="cpu")
    state = bare.model.state_dict()
    for key, value in standin_state.items():
        if not key.startswith("classifier."):
            assert torch.equal(state[key], value), key
    head = bare.model.classifier
    assert torch.count_nonzero(head.bias) == 0
    assert 0.01 < head.weight.std().item() < 0.03 and not torch.equal(head.weight, standin_state["classifier.weight"])
    assert bare.activation == SIGMOID  # no activation in its config: ST's default for 1 label
    with torch.no_grad():
        head.weight.copy_(standin_state["classifier.weight"])
    pairs, gold = short
    assert max_diff(bare.predict(pairs, activation="identity"), gold) <= TOL


def test_position_ids_buffer_is_ignored(standin_dir, standin_state, standin_model, short, tmp_path):
    state = dict(standin_state)
    state["bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    folder = make_variant(standin_dir, tmp_path / "with_position_ids", state=state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = CrossEncoder.from_pretrained(folder, device="cpu")
    pairs, _ = short
    assert torch.equal(model.score_logits(pairs), standin_model.score_logits(pairs))


def test_legacy_names_buffers_and_a_pretraining_head_load_as_in_transformers(standin_dir, standin_state, standin_model,
                                                                             standin_config, short, tmp_path):
    """TensorFlow-era LayerNorm.gamma/beta names, a stored token_type_ids buffer, an MLM head (cls.*, as in
    bert-base-uncased's files) and hidden_act "gelu_python" (the same erf GELU): transformers loads all of these with
    the same scores, so minilm does too; the head is warned of."""
    state = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
             for k, v in standin_state.items()}
    state["bert.embeddings.token_type_ids"] = torch.zeros(1, 512, dtype=torch.int64)
    state["cls.predictions.bias"] = torch.zeros(30522)
    state["cls.predictions.transform.dense.weight"] = torch.zeros(384, 384)
    folder = make_variant(standin_dir, tmp_path / "legacy", state=state, config=dict(standin_config, hidden_act="gelu_python"))
    with pytest.warns(UserWarning, match=r"the pretraining head \(2 cls\.\* tensors\) is not used"):
        model = CrossEncoder.from_pretrained(folder, device="cpu")
    pairs, gold = short
    # other tensors in the file move the weights' addresses, and with them the last bit of CPU GEMV (see bin_only)
    assert (model.score_logits(pairs) - standin_model.score_logits(pairs)).abs().max() <= 1e-6
    assert max_diff(model.predict(pairs), gold) <= TOL


def test_a_tensor_under_its_old_and_new_name_is_refused(standin_dir, standin_state, tmp_path):
    state = dict(standin_state, **{"bert.embeddings.LayerNorm.gamma": torch.zeros(384)})
    with pytest.raises(CheckpointError, match="tensors bert.embeddings.LayerNorm.gamma and bert.embeddings.LayerNorm.weight "
                                              "are both bert.embeddings.LayerNorm.weight|tensors bert.embeddings.LayerNorm.weight "
                                              "and bert.embeddings.LayerNorm.gamma are both"):
        CrossEncoder.from_pretrained(make_variant(standin_dir, tmp_path / "both", state=state), device="cpu")


def test_errors_name_the_checkpoints_own_keys_and_stay_short(standin_dir, standin_state, tmp_path):
    roberta = {f"roberta.{k.removeprefix('bert.')}": v for k, v in standin_state.items()}
    folder = make_variant(standin_dir, tmp_path / "roberta", state=roberta)
    with pytest.raises(CheckpointError) as err:
        CrossEncoder.from_pretrained(folder, device="cpu")
    message = str(err.value)
    assert "unexpected tensor(s), which a BERT cross-encoder does not have: roberta.classifier.bias, " in message
    assert "bert.roberta" not in message and re.search(r", and \d+ more$", message) and len(message) < 500


def test_loads_in_threads_leave_torch_nn_alone(standin_dir, short):
    """Two loads at once give the same model, and modules other threads build meanwhile get torch's own init (a
    load used to swap reset_parameters out of torch.nn.Linear for the whole process)."""
    built, models = [], []
    start = threading.Barrier(3)

    def load():
        start.wait()
        models.append(CrossEncoder(standin_dir, device="cpu"))

    def build():
        start.wait()
        built.extend(torch.nn.Linear(64, 64).weight for _ in range(200))

    threads = [threading.Thread(target=f) for f in (load, load, build)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pairs, gold = short
    assert len(models) == 2 and all(max_diff(m.predict(pairs), gold) <= TOL for m in models)
    for weight in built + [torch.nn.Linear(64, 64).weight]:  # kaiming-uniform in +-1/8
        assert weight.device.type == "cpu" and 0.05 < weight.std().item() < 0.1 and weight.abs().max().item() <= 0.125


def test_pytorch_model_bin_only(standin_dir, standin_state, standin_model, short, tmp_path):
    folder = make_variant(standin_dir, tmp_path / "bin", state=standin_state, weights="pytorch_model.bin")
    assert not (folder / "model.safetensors").exists()
    model = CrossEncoder.from_pretrained(folder, device="cpu")
    state = model.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in standin_state.items())
    pairs, gold = short
    # same values, but torch.load gives aligned memory where safetensors is memory-mapped at unaligned addresses, and
    # CPU GEMV kernels round the last bit differently for those (semantics.md section 1): not bitwise, within 1e-6
    assert (model.score_logits(pairs) - standin_model.score_logits(pairs)).abs().max() <= 1e-6
    assert max_diff(model.predict(pairs), gold) <= TOL


def test_vocab_txt_without_tokenizer_json(standin_dir, golden, golden_pairs, tmp_path):
    files = ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
    folder = make_variant(standin_dir, tmp_path / "vocab_only", files=files)
    assert not (folder / "tokenizer.json").exists()
    for max_length, key in ((None, "512"), (64, "64")):
        model = CrossEncoder.from_pretrained(folder, device="cpu", max_length=max_length)
        encodings = model.tokenizer.encode(golden_pairs)
        wrong = [n for n, e, ids in zip(golden["names"], encodings, golden["input_ids"][key]) if e.ids != ids]
        assert not wrong, f"vocab.txt tokenizer differs from tokenizer.json (max_length {key}) on {wrong}"
        assert [e.type_ids.count(0) for e in encodings] == golden["segment_a_length"][key]
    specials = [("what is [SEP]?", "a [MASK] b [CLS]x [UNK] [PAD]"), ("[sep] in lower case", "[ SEP ]")]
    with_json = CrossEncoder.from_pretrained(standin_dir, device="cpu").tokenizer.encode(specials)
    assert [e.ids for e in model.tokenizer.encode(specials)] == [e.ids for e in with_json]
    assert 102 in with_json[0].ids[1:-1] and 103 in with_json[0].ids  # written in the text: the special tokens


def test_save_into_a_reused_folder_writes_what_the_model_uses(standin_dir, golden_pairs, tmp_path):
    """A vocab.txt-only checkpoint saved over a folder holding another model's tokenizer files: the reloaded model
    must tokenize as the saved one did, not read the stale tokenizer.json / tokenizer_config.json left there."""
    source = make_variant(standin_dir, tmp_path / "vocab_only", files=("tokenizer_config.json", "vocab.txt"))
    model = CrossEncoder.from_pretrained(source, device="cpu")
    reused = tmp_path / "reused"
    reused.mkdir()
    (reused / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16, "do_lower_case": False}))
    (reused / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[UNK]"}))
    stale = Tokenizer.from_file(str(standin_dir / "tokenizer.json"))
    stale.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    stale.save(str(reused / "tokenizer.json"))
    model.save_pretrained(reused)
    again = CrossEncoder.from_pretrained(reused, device="cpu")
    assert again.max_length == model.max_length == 512
    shorter = CrossEncoder.from_pretrained(source, device="cpu", max_length=48)  # as train.py --max-length 48 saves it
    shorter.save_pretrained(tmp_path / "shorter")
    assert CrossEncoder.from_pretrained(tmp_path / "shorter", device="cpu").max_length == 48
    assert not (reused / "special_tokens_map.json").exists()
    pairs = golden_pairs[:40] + [("Ёлка ЙОД", "Straße ÀÉÎ")]
    assert [e.ids for e in again.tokenizer.encode(pairs)] == [e.ids for e in model.tokenizer.encode(pairs)]
    assert torch.equal(again.score_logits(pairs[-4:]), model.score_logits(pairs[-4:]))


def test_saved_files_get_the_usual_permissions(standin_model, tmp_path):
    out = tmp_path / "saved"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    os.chmod(out / "model.safetensors", 0o644)
    standin_model.save_pretrained(out)
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644  # an existing file keeps its mode
    assert (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask  # a new one gets a new file's
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]



def test_a_failed_save_leaves_the_folder_as_it_was(standin_dir, tmp_path):
    """The disk fills (here: a file size limit of 60 MB, which the 91 MB of weights pass) while a model is saved over
    an earlier save of another max_length: the folder keeps the earlier model whole. Saved file by file, it held the
    new tokenizer_config.json beside the old weights: a model that loaded, silently mixed."""
    import resource
    import signal
    import subprocess
    import sys

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (60 << 20, 60 << 20))

    CrossEncoder.from_pretrained(standin_dir, device="cpu", max_length=48).save_pretrained(tmp_path / "saved")
    before = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    save = (f"from minilm import CrossEncoder\nCrossEncoder.from_pretrained({str(standin_dir)!r}, device='cpu', "
            f"max_length=64).save_pretrained({str(tmp_path / 'saved')!r})")
    done = subprocess.run([sys.executable, "-c", save], capture_output=True, text=True, preexec_fn=limited)
    assert done.returncode == 1 and "File too large" in done.stderr, done.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()} == before  # no temporary file either
    assert CrossEncoder.from_pretrained(tmp_path / "saved", device="cpu").max_length == 48


KILLED_WHILE_SAVING = """
import os, signal, sys
import minilm.checkpoint as checkpoint
from minilm import CrossEncoder
standin, folder, at = sys.argv[1:]
fsync, replace, renames = checkpoint.fsync, os.replace, []
def fsync_then_die(path):  # SIGKILL while the weights are flushed to disk
    if at == "flush" and ".model.safetensors." in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    fsync(path)
def replace_then_die(src, dst):  # SIGKILL between the first and the second rename
    renames.append(dst)
    if at == "rename" and len(renames) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)
checkpoint.fsync, checkpoint.os.replace = fsync_then_die, replace_then_die
CrossEncoder.from_pretrained(standin, device="cpu", max_length=64).save_pretrained(folder)
"""


@pytest.mark.parametrize("at", ["flush", "rename"])
def test_a_save_killed_outright_never_leaves_a_mixed_model(standin_dir, tmp_path, at):
    """SIGKILL (the OOM killer; a power cut) while a model is saved over an earlier save of another max_length. While
    the files are written and flushed, the folder keeps the earlier model whole; amid the renames, it holds no
    config.json, so loading it fails, saying so. Renamed one by one as each was flushed, the new tokenizer_config.json
    sat beside the old weights: a model that loaded, silently mixed."""
    import subprocess
    import sys

    saved = tmp_path / "saved"
    CrossEncoder.from_pretrained(standin_dir, device="cpu", max_length=48).save_pretrained(saved)
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    done = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(standin_dir), str(saved), at],
                          capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    if at == "flush":
        assert {p.name: p.read_bytes() for p in saved.iterdir() if not p.name.startswith(".")} == before
        assert CrossEncoder.from_pretrained(saved, device="cpu").max_length == 48
    else:
        with pytest.raises(CheckpointError, match="config.json"):
            CrossEncoder.from_pretrained(saved, device="cpu")
    CrossEncoder.from_pretrained(standin_dir, device="cpu", max_length=64).save_pretrained(saved)  # saved again:
    assert not [p.name for p in saved.iterdir() if p.name.startswith(".")]  # what the killed save left is removed
    assert CrossEncoder.from_pretrained(saved, device="cpu").max_length == 64



def test_two_layer_model(standin_dir, standin_state, standin_config, golden, golden_pairs, tmp_path):
    """A config with num_hidden_layers 2 (layers 2..5 dropped) loads and scores like sentence-transformers."""
    keep = golden["two_layer_logits"]["num_hidden_layers"]
    state = {k: v for k, v in standin_state.items() if not (k.startswith("bert.encoder.layer.") and int(k.split(".")[3]) >= keep)}
    config = dict(standin_config, num_hidden_layers=keep)
    model = CrossEncoder.from_pretrained(make_variant(standin_dir, tmp_path / "two", state=state, config=config), device="cpu")
    assert len(model.model.bert.encoder.layer) == keep
    assert max_diff(model.predict(golden_pairs), golden["two_layer_logits"]["logits"]) <= TOL


# ---------------------------------------------------------------------------------------------------------------------
# errors


def _drop(state, key):
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    "case, key, edit",
    [
        ("missing", "bert.encoder.layer.3.attention.self.key.bias", lambda s, k: _drop(s, k)),
        ("missing", "bert.embeddings.LayerNorm.weight", lambda s, k: _drop(s, k)),
        ("mis-shaped", "classifier.weight", lambda s, k: {**s, k: torch.zeros(2, 384)}),  # a 2-label head
        ("mis-shaped", "bert.pooler.dense.weight", lambda s, k: {**s, k: s[k][:, :383].contiguous()}),
        ("unexpected", "bert.encoder.layer.6.attention.self.query.weight", lambda s, k: {**s, k: torch.zeros(384, 384)}),
        ("unexpected", "lm_head.bias", lambda s, k: {**s, k: torch.zeros(30522)}),
    ],
)
def test_bad_tensor_raises_naming_the_key(standin_dir, standin_state, tmp_path, case, key, edit):
    folder = make_variant(standin_dir, tmp_path / "bad", state=edit(standin_state, key))
    with pytest.raises(CheckpointError, match=re.escape(key)) as err:
        CrossEncoder.from_pretrained(folder, device="cpu")
    assert {"missing": "missing", "mis-shaped": "shape", "unexpected": "unexpected"}[case] in str(err.value)


def test_folder_without_config_json(standin_dir, tmp_path):
    folder = tmp_path / "no_config"
    folder.mkdir()
    os.symlink(standin_dir / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        CrossEncoder.from_pretrained(folder, device="cpu")
    with pytest.raises(CheckpointError, match="no such directory"):
        CrossEncoder.from_pretrained(tmp_path / "does" / "not" / "exist", device="cpu")


def test_folder_without_weights(standin_dir, tmp_path):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copyfile(standin_dir / "config.json", folder / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        CrossEncoder.from_pretrained(folder, device="cpu")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')  # shards: named as such, not "no weights"
    with pytest.raises(CheckpointError, match=r"sharded weights \(model\.safetensors\.index\.json\) are not supported"):
        CrossEncoder.from_pretrained(folder, device="cpu")


# ---------------------------------------------------------------------------------------------------------------------
# the activation a checkpoint asks for (sentence-transformers 5.1.0 rules)


@pytest.mark.parametrize(
    "block, legacy_key, expected",
    [
        (None, IDENTITY, IDENTITY),  # the ms-marco base / the stand-in: legacy key only
        ({"activation_fn": IDENTITY, "version": "5.1.0"}, None, IDENTITY),  # what ST 5.1.0 and minilm write
        ({"activation_fn": SIGMOID}, IDENTITY, SIGMOID),  # config.json["sentence_transformers"] wins over the legacy key
        (None, SIGMOID, SIGMOID),
        (None, None, SIGMOID),  # neither: Sigmoid, ST's default for a 1-label model
        ({"activation_fn": None}, IDENTITY, SIGMOID),  # there but null: ST's default, not the legacy key
        ({"version": "5.1.0"}, IDENTITY, IDENTITY),  # a block without the key: the legacy key
        ("x", IDENTITY, IDENTITY),  # not an object: ignored, as ST 5.1 does
    ],
)
def test_default_activation(standin_dir, standin_config, tiny, tmp_path, block, legacy_key, expected):
    config = {k: v for k, v in standin_config.items() if k != "sbert_ce_default_activation_function"}
    if block is not None:
        config["sentence_transformers"] = block
    if legacy_key:
        config["sbert_ce_default_activation_function"] = legacy_key
    model = CrossEncoder.from_pretrained(make_variant(standin_dir, tmp_path / "act", config=config), device="cpu")
    assert model.activation == expected
    pairs, gold = tiny
    want = gold if expected == IDENTITY else 1 / (1 + np.exp(-gold))
    assert max_diff(model.predict(pairs), want) <= TOL
    model.save_pretrained(tmp_path / "resaved")  # the choice survives a save, in the key every ST version reads
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert saved["sentence_transformers"]["activation_fn"] == expected and "sbert_ce_default_activation_function" not in saved
    assert CrossEncoder.from_pretrained(tmp_path / "resaved", device="cpu").activation == expected



@pytest.mark.parametrize("given", [torch.nn.Sigmoid(), "sigmoid", SIGMOID])
def test_activation_fn_given_at_load_is_the_default_and_is_saved(standin_dir, tiny, tmp_path, given):
    """CrossEncoder(name, activation_fn=...), as in sentence-transformers: the default of predict and rank, and what
    save (sentence-transformers' name for save_pretrained) writes into config.json."""
    model = CrossEncoder(standin_dir, device="cpu", activation_fn=given)
    pairs, gold = tiny
    sigmoid = 1 / (1 + np.exp(-gold))
    assert max_diff(model.predict(pairs), sigmoid) <= TOL / 4
    assert max_diff(model.predict(pairs, activation_fn="identity"), gold) <= TOL  # this call only
    query, documents = pairs[0][0], [p for _, p in pairs]
    logits = model.predict([(query, d) for d in documents], activation_fn="identity")
    assert [r["score"] for r in model.rank(query, documents)] == pytest.approx(sorted(1 / (1 + np.exp(-logits)), reverse=True), abs=1e-6)
    model.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["sentence_transformers"]["activation_fn"] == SIGMOID
    assert max_diff(CrossEncoder(tmp_path / "saved", device="cpu").predict(pairs), sigmoid) <= TOL / 4


def test_an_activation_function_that_config_json_cannot_name_scores_but_is_not_saved(standin_dir, tiny, tmp_path):
    model = CrossEncoder(standin_dir, device="cpu", activation_fn=torch.sigmoid)
    pairs, gold = tiny
    assert max_diff(model.predict(pairs), 1 / (1 + np.exp(-gold))) <= TOL / 4
    with pytest.raises(ValueError, match="cannot be saved in config.json: only a torch.nn module"):
        model.save_pretrained(tmp_path / "saved")
    model.activation_fn = torch.nn.Hardtanh(-0.01, 0.01)  # config.json names the class only: loaded, +-1
    assert model.predict(pairs).tolist() == pytest.approx(np.clip(gold, -0.01, 0.01).tolist(), abs=1e-6)
    with pytest.raises(ValueError, match=r"loaded back it would be Hardtanh\(\) and score differently"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="'tanh' is not a module class of torch.nn"):  # at load, not at the first predict
        CrossEncoder(standin_dir, device="cpu", activation_fn="tanh")

def test_softmax_activation_is_per_pair(standin_dir, standin_config, tiny, tmp_path):
    """A Softmax from config.json sees each pair's one logit (sentence-transformers applies the activation to (N, 1)
    rows), so every score is 1.0 whatever the other pairs of the call, not a distribution over the call's pairs."""
    config = dict(standin_config, sentence_transformers={"activation_fn": "torch.nn.modules.activation.Softmax"})
    model = CrossEncoder.from_pretrained(make_variant(standin_dir, tmp_path / "softmax", config=config), device="cpu")
    pairs, _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Softmax() without dim warns, in sentence-transformers too
        scores = model.predict(pairs)
        assert scores.tolist() == [1.0] * len(pairs)
        assert model.predict(pairs[0]) == 1.0
        assert [r["score"] for r in model.rank(pairs[0][0], [p for _, p in pairs])] == [1.0] * len(pairs)


@pytest.mark.parametrize(
    "path",
    ["torch.Tensor", "torch.nn.modules.activation.Tensor", "torch.nn.modules.linear.Linear",
     "torch.nn.modules.module.Module", "torch.nn.modules.no_such.Thing", "torch.nn.functional.relu", "os.system",
     "builtins.print", 42],
)
def test_activation_from_config_json_must_be_a_torch_nn_module_class(standin_dir, standin_config, tiny, tmp_path, path):
    """config.json names code to run: only a module class of torch.nn.modules that maps logits to scores is
    instantiated; anything else is warned of at load time and the default (Sigmoid) used, never a traceback later."""
    config = dict(standin_config, sbert_ce_default_activation_function=path)
    with pytest.warns(UserWarning, match=r"config\.json: activation .*using Sigmoid instead"):
        model = CrossEncoder.from_pretrained(make_variant(standin_dir, tmp_path / "act", config=config), device="cpu")
    assert model.activation == SIGMOID
    pairs, gold = tiny
    assert max_diff(model.predict(pairs), 1 / (1 + np.exp(-gold))) <= TOL
    if isinstance(path, str):  # the same paths from the caller: refused outright
        with pytest.raises(ValueError, match="activation"):
            model.predict(pairs, activation=path)


def test_activation_modules_score_in_eval_mode(standin_dir, standin_config, tiny, tmp_path):
    """sentence-transformers' predict puts its activation in eval mode: a Dropout from config.json passes the logits
    through, and an RReLU given by the caller takes its fixed eval slope, the same scores on every call."""
    pairs, gold = tiny
    config = dict(standin_config, sentence_transformers={"activation_fn": "torch.nn.modules.dropout.Dropout"})
    model = CrossEncoder.from_pretrained(make_variant(standin_dir, tmp_path / "act", config=config), device="cpu")
    assert max_diff(model.predict(pairs), gold) <= TOL and max_diff(model.predict(pairs), gold) <= TOL
    rrelu = torch.nn.RReLU()  # in training mode, as built
    slope = (rrelu.lower + rrelu.upper) / 2
    for _ in range(2):
        assert max_diff(model.predict(pairs, activation_fn=rrelu), np.where(gold < 0, slope * gold, gold)) <= TOL


def test_activation_by_short_torch_nn_path(standin_dir, standin_config, tiny, tmp_path):
    """`torch.nn.Tanh` names the class torch.nn.modules.activation.Tanh: accepted, from config.json and from callers."""
    config = dict(standin_config, sbert_ce_default_activation_function="torch.nn.Tanh")
    model = CrossEncoder.from_pretrained(make_variant(standin_dir, tmp_path / "tanh", config=config), device="cpu")
    pairs, gold = tiny
    assert model.activation == "torch.nn.Tanh" and max_diff(model.predict(pairs), np.tanh(gold)) <= TOL
    assert max_diff(model.predict(pairs, activation="torch.nn.modules.activation.Tanh"), np.tanh(gold)) <= TOL
