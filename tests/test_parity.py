"""minilm against the golden outputs of sentence-transformers 5.1.0 (tests/reference/golden_predict.json).

Token ids must be identical; logits and rank scores agree to 1e-6 (in practice ~5e-8: float summation order);
rank orders must be identical. The stand-in's logits are small (|x| < 0.05), and so are the errors a wrong detail of
the model makes in them: the tanh approximation of GELU moves them by 5e-5, LayerNorm's eps at 1e-5 instead of 1e-12
by 3e-5 (measured); 1e-6 catches those with a margin of 30, where 1e-5 left a margin of 3."""

import json
import math
import re
import sys
import warnings

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, normalizers

from minilm import CrossEncoder
from minilm.checkpoint import CheckpointError
from minilm.tokenizer import PairTokenizer, longest_first
from standin import TOKENIZER_VARIANT_PAIRS, TOKENIZER_VARIANTS, tokenizer_copy, tokenizer_variant

TOL = 1e-6


def max_diff(ours, golden_values) -> float:
    return float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - np.asarray(golden_values, dtype=np.float64))))


def standin_tokenizer_config(standin_dir) -> dict:
    return json.loads((standin_dir / "tokenizer_config.json").read_text())


@pytest.fixture(scope="module")
def model_64(standin_dir):
    return CrossEncoder.from_pretrained(standin_dir, device="cpu", max_length=64)


@pytest.fixture(scope="module")
def raw_tokenizer(standin_dir):
    """The same tokenizer.json with truncation and padding off: the untruncated pieces of each text."""
    tok = Tokenizer.from_file(str(standin_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


# ---------------------------------------------------------------------------------------------------------------------
# tokenization


@pytest.mark.parametrize("max_length", ["512", "64"])
def test_token_ids_identical(standin_model, model_64, golden, golden_pairs, max_length):
    model = standin_model if max_length == "512" else model_64
    assert model.max_length == int(max_length)
    encodings = model.tokenizer.encode(golden_pairs)
    wrong = [name for name, enc, ids in zip(golden["names"], encodings, golden["input_ids"][max_length]) if enc.ids != ids]
    assert not wrong, f"token ids differ from sentence-transformers for: {wrong}"
    for name, enc, k in zip(golden["names"], encodings, golden["segment_a_length"][max_length]):
        assert enc.type_ids == [0] * k + [1] * (len(enc.ids) - k), name


def test_padded_batch_holds_the_golden_ids(standin_model, golden, golden_pairs):
    batch = standin_model.tokenizer(golden_pairs)
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    assert ids.dtype == mask.dtype == types.dtype == np.int64
    assert ids.shape == (len(golden_pairs), 512)
    for row, (gold, k) in enumerate(zip(golden["input_ids"]["512"], golden["segment_a_length"]["512"])):
        n = len(gold)
        assert ids[row, :n].tolist() == gold and not ids[row, n:].any()
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert types[row, :k].sum() == 0 and types[row, k:n].all() and not types[row, n:].any()


def test_model_inputs_leave_out_the_mask_only_when_nothing_is_padded(standin_model, golden_pairs):
    tokenizer = standin_model.tokenizer
    encodings = tokenizer.encode(golden_pairs[:4])
    padded = tokenizer.model_inputs(encodings)
    assert len({len(e.ids) for e in encodings}) > 1 and padded.keys() == tokenizer.pad(encodings).keys()
    unpadded = tokenizer.model_inputs([encodings[0]] * 3)
    assert sorted(unpadded) == ["input_ids", "token_type_ids"]
    np.testing.assert_array_equal(unpadded["input_ids"], tokenizer.pad([encodings[0]] * 3)["input_ids"])


@pytest.mark.parametrize("max_length", [64, 100, 128, 512])
def test_truncation_matches_the_tokenizers_library(standin_dir, raw_tokenizer, golden_pairs, max_length):
    """minilm truncates the two untruncated id lists itself; the Rust library's own LongestFirst pair truncation (what
    transformers calls) must give the same ids, on the golden pairs and on every split of one-token words."""
    tokenizer = PairTokenizer.from_dir(standin_dir, max_length, 512)
    raw_tokenizer.enable_truncation(max_length, strategy="longest_first", direction="right")
    try:
        words = [(" ".join(["a"] * n_q), " ".join(["b"] * (n - n_q))) for n in (max_length - 4, max_length - 3,
                 max_length - 2, 2 * max_length + 1) for n_q in range(0, n + 1, max(1, n // 40))]
        pairs = golden_pairs + words
        expected = [e.ids for e in raw_tokenizer.encode_batch(pairs)]
        ours = tokenizer.encode(pairs)
    finally:
        raw_tokenizer.no_truncation()
    assert [e.ids for e in ours] == expected
    assert sum(len(ids) == max_length for ids in expected) >= 10  # truncation was actually exercised


@pytest.mark.parametrize("setting", [{"strip_accents": False}, {"do_lower_case": False}, {"tokenize_chinese_chars": False},
                                     {"do_lower_case": True}])
def test_tokenizer_config_overrides_the_normalizer_as_transformers_does(standin_dir, tmp_path, setting):
    """transformers' BertTokenizerFast rebuilds tokenizer.json's BERT normalizer from tokenizer_config.json's
    do_lower_case / strip_accents / tokenize_chinese_chars (defaults True, None, True). Checked once against
    sentence-transformers 5.1 on such copies of the stand-in: the same scores to 1e-6 (docs/parity.md)."""
    folder = tokenizer_copy(standin_dir, tmp_path / "model", {**standin_tokenizer_config(standin_dir), **setting})
    rule = {"lowercase": True, "strip_accents": None, "handle_chinese_chars": True}
    names = {"do_lower_case": "lowercase", "strip_accents": "strip_accents", "tokenize_chinese_chars": "handle_chinese_chars"}
    expected = Tokenizer.from_file(str(standin_dir / "tokenizer.json"))
    expected.no_padding()
    expected.normalizer = normalizers.BertNormalizer(clean_text=True, **{**rule, **{names[k]: v for k, v in setting.items()}})
    pairs = [("Who lives in Berlin?", "Café naïve, Тёмная ночь"), ("ÉCOLE Ёлка", "Straße ÄÖÜ 北京市")]
    ours = PairTokenizer.from_dir(folder, 64, 512).encode(pairs)
    assert [e.ids for e in ours] == [e.ids for e in expected.encode_batch(pairs)]
    changed = setting != {"do_lower_case": True}  # the stand-in's own setting: nothing to change
    plain = PairTokenizer.from_dir(standin_dir, 64, 512).encode(pairs)
    assert ([e.ids for e in ours] != [e.ids for e in plain]) == changed


@pytest.mark.parametrize("name", list(TOKENIZER_VARIANTS))
def test_tokenizer_class_and_model_input_names_as_in_sentence_transformers(standin_dir, tmp_path, golden, name):
    """PreTrainedTokenizerFast takes tokenizer.json as written (no normalizer rebuilt from tokenizer_config.json);
    DistilBERT's tokenizer, or model_input_names without token_type_ids, gives the model no token types (all 0)."""
    want = golden["tokenizer_variants"][name]
    model = CrossEncoder.from_pretrained(tokenizer_variant(standin_dir, tmp_path / name, name), device="cpu")
    encodings = model.tokenizer.encode(TOKENIZER_VARIANT_PAIRS)
    assert [e.ids for e in encodings] == want["input_ids"]
    assert [e.type_ids for e in encodings] == (want["token_type_ids"] or [[0] * len(ids) for ids in want["input_ids"]])
    assert max_diff(model.predict(TOKENIZER_VARIANT_PAIRS), want["logits"]) <= TOL
    if name != "as-written-lowercasing":  # which keeps the stand-in's lowercasing: its do_lower_case false is not read
        standin = CrossEncoder.from_pretrained(standin_dir, device="cpu")
        assert max_diff(standin.predict(TOKENIZER_VARIANT_PAIRS), want["logits"]) > 1e-3


@pytest.mark.parametrize("name", ["ElectraTokenizer", "MobileBertTokenizerFast", "LayoutLMTokenizer"])
def test_tokenizer_classes_that_tokenize_as_bert_does(standin_dir, tmp_path, golden, golden_pairs, name):
    """transformers' tokenizers of these names are BERT's WordPiece with its specials and token types; sentence-
    transformers 5.1 scores the stand-in with ElectraTokenizer as without it (checked: -0.0615407, -0.0400882)."""
    folder = tokenizer_copy(standin_dir, tmp_path / "model", {**standin_tokenizer_config(standin_dir), "tokenizer_class": name})
    encodings = PairTokenizer.from_dir(folder, None, 512).encode(golden_pairs)
    assert [e.ids for e in encodings] == golden["input_ids"]["512"]
    assert [e.type_ids.count(0) for e in encodings] == golden["segment_a_length"]["512"]


@pytest.mark.parametrize("setting, message", [
    ({"truncation_side": "left"}, "truncation_side 'left': minilm truncates texts at their end only"),
    ({"padding_side": "left"}, "padding_side 'left': minilm pads at the right only"),
    ({"tokenizer_class": "XLMRobertaTokenizer"}, 'tokenizer_class "XLMRobertaTokenizer": minilm tokenizes only as '
                                                 "BERT's tokenizers do (BertTokenizer, BertTokenizerFast, "),
    ({"model_input_names": "input_ids"}, 'model_input_names must be a list of names with input_ids, got "input_ids"'),
    ({"model_max_length": 4}, "model_max_length 4 is below 5 tokens, too few for a pair; pass a max_length"),
    ({"model_input_names": ["input_ids", "token_type_ids"]}, 'model_input_names ["input_ids", "token_type_ids"] has no '
                                                             "attention_mask: the model would attend to padding"),
])
def test_tokenizer_settings_minilm_cannot_follow_are_refused(standin_dir, tmp_path, setting, message):
    folder = tokenizer_copy(standin_dir, tmp_path / "model", setting)
    with pytest.raises(CheckpointError, match=f"^{folder / 'tokenizer_config.json'}: " + re.escape(message)):
        PairTokenizer.from_dir(folder, None, 512)
    if "model_max_length" in setting:  # a max_length given at load is taken instead
        assert PairTokenizer.from_dir(folder, 64, 512).max_length == 64
    tokenizer = PairTokenizer.from_dir(standin_dir, 64, 512)
    for side in ("truncation_side", "padding_side"):  # the attributes, set as in transformers
        with pytest.raises(ValueError, match=f"{side} 'left'"):
            setattr(tokenizer, side, "left")
        setattr(tokenizer, side, "right")


def long_texts(golden_pairs) -> dict:
    """Texts of 1k to 100k characters that tokenizing a head of must not change: every golden text, a first word
    longer than a head, long [UNK] words, no space at all, literal specials, accents split from their letters."""
    prose = " ".join(t for pair in golden_pairs for t in pair)
    return {
        "prose": (prose * (100_000 // len(prose) + 1))[:100_000],
        "prose_1k": prose[:1_000],
        "long_first_word": "x" * 5_000 + " " + prose[:20_000],
        "unk_words": " ".join(["y" * 150] * 300),  # one [UNK] per 151 characters: the first head is too short
        "no_space": "\u4e2d\u6587" * 10_000 + "ab\tcd\u00a0ef" * 1_000,
        "specials": "[SEP] [CLS][MASK] [SE P] " * 2_000,
        "accents": "e\u0301 \u0301e caf\u00e9  \t\n \u0130stanbul \u00c5ngstr\u00f6m " * 1_000,
    }


@pytest.mark.parametrize("max_length", [64, 65, 512])
def test_long_texts_give_the_ids_of_the_whole_text(standin_dir, raw_tokenizer, golden_pairs, max_length):
    """Only a head of a long text is tokenized; the ids are those of the whole text truncated longest-first (the rule
    checked against the tokenizers library above, whose own pair truncation takes gigabytes here), also when both
    texts are long: an odd budget's last token goes to the longer one (max_length 64 has an odd budget)."""
    tokenizer = PairTokenizer.from_dir(standin_dir, max_length, 512)
    texts = long_texts(golden_pairs)
    short = golden_pairs[0][0]
    pairs = [(short, t) for t in texts.values()] + [(t, short) for t in texts.values()]
    pairs += [(a[:12_000], b[:12_000]) for a in texts.values() for b in texts.values()]
    pairs += [(texts["prose"][:n], texts["prose"][:m]) for n, m in ((12_000, 12_004), (12_004, 12_000), (12_000, 12_000))]
    budget = max_length - 3
    expected = []
    for query, passage in pairs:
        q, p = (raw_tokenizer.encode(t, add_special_tokens=False).ids for t in (query, passage))
        a, b = longest_first(len(q), len(p), budget)
        expected.append([101] + q[:a] + [102] + p[:b] + [102])
    assert [e.ids for e in tokenizer.encode(pairs)] == expected


class LengthSpy:
    """Forwards encoding calls to a tokenizers.Tokenizer and records the longest text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def encode(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tokenizer.encode(text, **kwargs)

    def encode_batch_fast(self, texts, **kwargs):
        self.longest = max([self.longest] + [len(t) for t in texts])
        return self.tokenizer.encode_batch_fast(texts, **kwargs)

    encode_batch = encode_batch_fast  # whichever the code under test calls


def test_long_passages_are_tokenized_only_as_far_as_truncation_keeps(standin_dir, golden_pairs):
    """Memory must not grow with passage length: 100k-character passages reach the Rust tokenizer as ~600-character
    heads at max_length 64 (whole, they made 1,024 rows peak at 3.2 GB)."""
    tokenizer = PairTokenizer.from_dir(standin_dir, 64, 512)
    whole = [e.ids for e in tokenizer.encode([("a query", long_texts(golden_pairs)["prose"])])]
    tokenizer.tokenizer = spy = LengthSpy(tokenizer.tokenizer)
    assert [e.ids for e in tokenizer.encode([("a query", long_texts(golden_pairs)["prose"])])] == whole
    assert 61 * 8 <= spy.longest <= 61 * 8 + 200


@pytest.mark.parametrize(
    "lengths, expected",
    # content lengths (query, passage) -> after truncation to 512 tokens; verified against tokenizers 0.22 (semantics.md §3)
    [((34, 600), (34, 475)), ((600, 34), (475, 34)), ((100, 300), (100, 300)), ((300, 600), (254, 255)),
     ((600, 300), (255, 254)), ((400, 400), (254, 255)), ((254, 400), (254, 255)), ((509, 1), (508, 1)), ((0, 700), (0, 509))],
)
def test_truncation_of_one_token_words(standin_model, lengths, expected):
    n_q, n_p = lengths
    enc = standin_model.tokenizer.encode([(" ".join(["a"] * n_q), " ".join(["b"] * n_p))])[0]
    assert enc.ids.count(1037) == expected[0] and enc.ids.count(1038) == expected[1]  # "a" = 1037, "b" = 1038
    assert longest_first(n_q, n_p, 509) == expected


# ---------------------------------------------------------------------------------------------------------------------
# predict


@pytest.mark.parametrize("batch_size", ["32", "7", "1"])
def test_logits_match_golden(standin_model, golden, golden_pairs, batch_size):
    gold = golden["logits"]["512"][batch_size]
    ours = standin_model.predict(golden_pairs, batch_size=int(batch_size))
    assert ours.dtype == np.float32 and ours.shape == (len(golden_pairs),)
    worst = int(np.argmax(np.abs(ours - np.asarray(gold))))
    assert max_diff(ours, gold) <= TOL, f"{golden['names'][worst]}: {ours[worst]} vs {gold[worst]}"


def test_logits_max_length_64(model_64, golden, golden_pairs):
    assert max_diff(model_64.predict(golden_pairs), golden["logits"]["64"]["32"]) <= TOL


def test_max_length_set_on_a_loaded_model_as_in_sentence_transformers(standin_dir, golden, golden_pairs):
    """`model.max_length = n` and `model.tokenizer.model_max_length = n` (sentence-transformers' and transformers'
    habits) truncate at n from then on; what minilm cannot do is refused, never ignored."""
    model = CrossEncoder(standin_dir, device="cpu")
    model.tokenizer.model_max_length = 64
    assert model.max_length == 64 and max_diff(model.predict(golden_pairs), golden["logits"]["64"]["32"]) <= TOL
    model.max_length = 512
    assert max_diff(model.predict(golden_pairs), golden["logits"]["512"]["32"]) <= TOL
    with pytest.raises(TypeError, match="max_length must be a whole number of tokens, got 64.5"):
        model.max_length = 64.5
    for name, value, problem in (("max_length", 513, "exceeds the model's 512 position embeddings"),
                                 ("max_length", 4, "max_length must be at least 5"),
                                 ("truncation_side", "left", "minilm truncates texts at their end only")):
        with pytest.raises(ValueError, match=problem):
            setattr(model if name == "max_length" else model.tokenizer, name, value)
    assert model.max_length == 512 and model.tokenizer.truncation_side == "right"


def test_activation_fn_attribute_as_in_sentence_transformers(standin_dir, golden, golden_pairs, tiny_indices):
    model = CrossEncoder(standin_dir, device="cpu")
    pairs = [golden_pairs[i] for i in tiny_indices]
    gold = np.asarray([golden["logits"]["512"]["32"][i] for i in tiny_indices])
    assert isinstance(model.activation_fn, torch.nn.Identity)
    model.activation_fn = torch.nn.Sigmoid()  # from then on, and saved
    assert max_diff(model.predict(pairs), 1 / (1 + np.exp(-gold))) <= TOL / 4
    assert isinstance(model.activation_fn, torch.nn.Sigmoid) and model.export_config()["sentence_transformers"]["activation_fn"] == "torch.nn.modules.activation.Sigmoid"
    with pytest.raises(ValueError, match="not a module class of torch.nn"):
        model.activation_fn = "tanh"


def test_weights_converted_by_hand_are_refused_with_the_way_to_do_it(standin_dir):
    model = CrossEncoder(standin_dir, device="cpu")
    model.model.half()  # the head computes in fp32: a bare dtype error from deep inside otherwise
    with pytest.raises(ValueError, match="weights are torch.float16 but it was loaded in fp32; load it with dtype='fp16'"):
        model.predict([("q", "p")])


def test_plain_softmax_attention_path(standin_model, golden, golden_pairs, monkeypatch):
    """set_sdpa(False): the explicit softmax(q k^T / sqrt(d) + mask) v path gives the same logits."""

    def no_sdpa(*args, **kwargs):
        raise AssertionError("scaled_dot_product_attention called with set_sdpa(False)")

    standin_model.model.set_sdpa(False)
    try:
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
        ours = standin_model.predict(golden_pairs)
    finally:
        standin_model.model.set_sdpa(True)
    assert max_diff(ours, golden["logits"]["512"]["32"]) <= TOL


def test_single_pair_gives_a_float32_scalar(standin_model, golden, golden_pairs):
    for i in (0, 1):
        for pair in (golden_pairs[i], list(golden_pairs[i])):
            score = standin_model.predict(pair)
            assert isinstance(score, np.float32) and np.ndim(score) == 0
            assert abs(float(score) - golden["logits"]["512"]["1"][i]) <= TOL


def test_empty_input_gives_what_sentence_transformers_gives(standin_model):
    for empty in ([], ()):  # np.array([]): float64, as sentence-transformers 5.1 returns it
        scores = standin_model.predict(empty)
        assert isinstance(scores, np.ndarray) and scores.dtype == np.float64 and scores.shape == (0,)
        tensor = standin_model.predict(empty, convert_to_tensor=True)
        assert tensor.dtype == torch.float32 and tensor.shape == (0,)
        assert standin_model.predict(empty, convert_to_numpy=False) == []
    assert standin_model.rank("query", []) == []


def test_activation_applies_to_one_call_only(standin_model, golden, golden_pairs, tiny_indices):
    pairs = [golden_pairs[i] for i in tiny_indices]
    gold = np.asarray([golden["logits"]["512"]["32"][i] for i in tiny_indices])
    assert golden["activation_fn"] == standin_model.activation == "torch.nn.modules.linear.Identity"
    sigmoid = 1.0 / (1.0 + np.exp(-gold))
    assert max_diff(standin_model.predict(pairs, activation="sigmoid"), sigmoid) <= TOL / 4
    assert max_diff(standin_model.predict(pairs), gold) <= TOL  # raw logits again: not sticky (unlike ST 5.1.0)
    assert max_diff(standin_model.predict(pairs, activation_fn=torch.nn.Sigmoid()), sigmoid) <= TOL / 4
    assert max_diff(standin_model.predict(pairs, activation=torch.tanh), np.tanh(gold)) <= TOL
    assert max_diff(standin_model.predict(pairs), gold) <= TOL
    assert standin_model.activation == "torch.nn.modules.linear.Identity"


def test_positional_arguments_mean_what_they_mean_in_sentence_transformers(standin_model, golden, golden_pairs,
                                                                           tiny_indices):
    """predict(sentences, batch_size, show_progress_bar, activation_fn) and rank(query, documents, top_k,
    return_documents, batch_size, show_progress_bar, activation_fn): code written for sentence-transformers passes its
    arguments in that order (or by those names), and an activation taken for something else would give raw logits
    without a word."""
    pairs = [golden_pairs[i] for i in tiny_indices]
    sigmoid = 1.0 / (1.0 + np.exp(-np.asarray([golden["logits"]["512"]["32"][i] for i in tiny_indices])))
    assert max_diff(standin_model.predict(pairs, 32, False, torch.nn.Sigmoid()), sigmoid) <= TOL / 4
    assert max_diff(standin_model.predict(sentences=pairs, batch_size=32, activation_fn=torch.nn.Sigmoid()), sigmoid) <= TOL / 4
    query, documents = pairs[0][0], [p for _, p in pairs[:4]]
    plain = standin_model.rank(query, documents)
    for results in (standin_model.rank(query, documents, None, False, 32, False, torch.nn.Sigmoid()),
                    standin_model.rank(query, documents, activation_fn="sigmoid")):
        assert [r["corpus_id"] for r in results] == [r["corpus_id"] for r in plain]
        assert [r["score"] for r in results] == pytest.approx([1 / (1 + math.exp(-r["score"])) for r in plain], abs=1e-6)


def test_constructed_by_name_as_in_sentence_transformers(standin_dir, standin_model, golden_pairs, tiny_indices):
    pairs = [golden_pairs[i] for i in tiny_indices]
    model = CrossEncoder(str(standin_dir), device="cpu", max_length=64)
    assert model.max_length == 64 and model.source_dir == standin_dir
    assert max_diff(model.predict(pairs), standin_model.predict(pairs)) <= TOL
    with pytest.raises(TypeError, match="model_name_or_path must be a Hub id or a folder, got CrossEncoderModel"):
        CrossEncoder(standin_model.model)
    # sentence-transformers' positional order: num_labels, max_length, activation_fn, device
    model = CrossEncoder(str(standin_dir), None, 64, torch.nn.Sigmoid(), "cpu")
    assert model.max_length == 64 and model.device.type == "cpu" and model.num_labels == 1
    assert max_diff(model.predict(pairs), 1 / (1 + np.exp(-standin_model.predict(pairs)))) <= TOL
    with pytest.raises(ValueError, match="num_labels=2: minilm's cross-encoder has a 1-logit head"):
        CrossEncoder(str(standin_dir), num_labels=2)
    assert CrossEncoder(str(standin_dir), num_labels=1, trust_remote_code=True, device="cpu").max_length == 512


def test_convert_to_tensor(standin_model, golden, golden_pairs, tiny_indices):
    pairs = [golden_pairs[i] for i in tiny_indices]
    gold = [golden["logits"]["512"]["32"][i] for i in tiny_indices]
    scores = standin_model.predict(pairs, convert_to_tensor=True)
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float32 and scores.shape == (len(pairs),)
    assert max_diff(scores.numpy(), gold) <= TOL
    one = standin_model.predict(pairs[0], convert_to_tensor=True)
    assert isinstance(one, torch.Tensor) and one.ndim == 0 and abs(one.item() - gold[0]) <= TOL
    sig = standin_model.predict(pairs, convert_to_tensor=True, activation="sigmoid")
    assert max_diff(sig.numpy(), [1 / (1 + math.exp(-g)) for g in gold]) <= TOL


def test_convert_to_numpy_false_and_apply_softmax(standin_model, golden, golden_pairs, tiny_indices):
    """convert_to_numpy=False gives what sentence-transformers 5.1 gives: a list of 0-d tensors. apply_softmax over a
    1-logit model would make every score 1.0 there: refused, in predict and in rank."""
    pairs = [golden_pairs[i] for i in tiny_indices]
    gold = [golden["logits"]["512"]["32"][i] for i in tiny_indices]
    scores = standin_model.predict(pairs, 32, False, None, False, False)
    assert isinstance(scores, list) and all(isinstance(s, torch.Tensor) and s.ndim == 0 for s in scores)
    assert max_diff([s.item() for s in scores], gold) <= TOL
    one = standin_model.predict(pairs[0], convert_to_numpy=False)
    assert isinstance(one, torch.Tensor) and one.ndim == 0 and abs(one.item() - gold[0]) <= TOL
    for call in (lambda: standin_model.predict(pairs, apply_softmax=True),
                 lambda: standin_model.rank(pairs[0][0], [p for _, p in pairs], apply_softmax=True)):
        with pytest.raises(ValueError, match="this model has one logit: every score would be 1.0"):
            call()


# ---------------------------------------------------------------------------------------------------------------------
# rank


def test_rank_records_cover_ties(golden):
    names = [r["name"] for r in golden["rank"]]
    assert len(names) == 3 and "card" in names and "duplicates" in names
    assert len(golden["rank"][0]["documents"]) == 20
    dup = next(r for r in golden["rank"] if r["name"] == "duplicates")
    scores = [r["score"] for r in dup["results"]]
    assert len(set(scores)) < len(scores)  # the golden file really holds exact ties


@pytest.mark.parametrize("index", [0, 1, 2])
def test_rank_matches_golden(standin_model, golden, index):
    record = golden["rank"][index]
    results = standin_model.rank(record["query"], record["documents"], batch_size=record["batch_size"])
    assert [r["corpus_id"] for r in results] == [r["corpus_id"] for r in record["results"]], record["name"]
    assert max_diff([r["score"] for r in results], [r["score"] for r in record["results"]]) <= TOL
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    if len(record["documents"]) > 6:
        return
    top = standin_model.rank(record["query"], record["documents"], top_k=2, return_documents=True,
                             batch_size=record["batch_size"])
    assert [r["corpus_id"] for r in top] == [r["corpus_id"] for r in results[:2]]
    assert [r["text"] for r in top] == [record["documents"][r["corpus_id"]] for r in top]


def test_rank_refuses_what_it_would_get_silently_wrong(standin_model):
    """top_k=-1 would drop the last document (results[:-1]) and a str would be scored letter by letter."""
    documents = ["Paris is in France.", "Bananas are yellow.", "Berlin is in Germany."]
    assert len(standin_model.rank("where is paris", documents, top_k=3)) == 3
    assert standin_model.rank("where is paris", documents, top_k=0) == []  # as in sentence-transformers
    with pytest.raises(ValueError, match="top_k must be at least 0 .*got -1"):
        standin_model.rank("where is paris", documents, top_k=-1)
    with pytest.raises(TypeError, match="documents must be a list of strings, got one string"):
        standin_model.rank("where is paris", "abc")


def test_a_lone_surrogate_is_refused_wherever_it_is(standin_model):
    """The tokenizer refuses a lone surrogate (not Unicode text) only in the part of a text it reads, the part kept
    after truncation: one past it was scored, and whether it was read depended on the other text's length."""
    standin_model.max_length = 16
    try:
        for pair, name, at in [(("q", "word " * 100 + "\ud800"), "passage", 500), (("q\udfff", "p"), "query", 1)]:
            with pytest.raises(ValueError, match=rf"pair 1: the {name} is not Unicode text \(a lone surrogate "
                                                 rf"'\\ud[8f]\w\w' at character {at}\)"):
                standin_model.predict([("q", "p"), pair])
    finally:
        standin_model.max_length = 512


def test_rank_orders_by_logits_where_a_sigmoid_saturates(standin_model):
    """fp32's sigmoid is 1.0 for every logit above ~17: ranking by those scores alone would put the passages in input
    order (sentence-transformers does); equal scores are ordered by their logits."""
    documents = ["Bananas are yellow.", "Paris is the capital of France.", "Berlin is in Germany.", "paris france"]
    head = standin_model.model.classifier
    saved = head.bias.detach().clone()
    try:
        plain = standin_model.rank("capital of france", documents)
        with torch.no_grad():
            head.bias += 60.0 - min(r["score"] for r in plain)  # every logit now above 60
        raw = standin_model.rank("capital of france", documents)
        squashed = standin_model.rank("capital of france", documents, activation="sigmoid")
    finally:
        with torch.no_grad():
            head.bias.copy_(saved)
    assert [r["corpus_id"] for r in raw] == [r["corpus_id"] for r in plain] != list(range(4))
    assert all(r["score"] == 1.0 for r in squashed)  # saturated: the scores alone cannot order them
    assert [r["corpus_id"] for r in squashed] == [r["corpus_id"] for r in plain]


def test_score_logits_outside_inference_mode(standin_model, golden, golden_pairs, short_indices):
    """score_logits() is public (minilm.evaluate calls it): called without a no_grad/inference_mode context it must not
    build an autograd graph that keeps every batch's activations alive, and its result must convert to numpy."""
    pairs = [golden_pairs[i] for i in short_indices]
    assert torch.is_grad_enabled()
    logits = standin_model.score_logits(pairs)
    assert not logits.requires_grad and logits.grad_fn is None
    assert max_diff(logits.numpy(), [golden["logits"]["512"]["32"][i] for i in short_indices]) <= TOL


def test_full_last_layer_matches_cls_only_fast_path(standin_model, golden, golden_pairs):
    """fast_inference=False computes every token in the last layer, as transformers does: same logits."""
    standin_model.model.fast_inference = False
    try:
        ours = standin_model.predict(golden_pairs)
    finally:
        standin_model.model.fast_inference = True
    assert max_diff(ours, golden["logits"]["512"]["32"]) <= TOL


def test_reduced_precision_scores_stay_close(standin_dir, golden, golden_pairs):
    """bf16 (where the CPU has native bf16) and int8 track fp32: small error, same order on the golden pairs."""
    gold = np.asarray(golden["logits"]["512"]["32"])
    bound = {"bf16": 2e-3, "int8": 3e-2}  # measured: bf16 1.6e-4, int8 1.1e-2 on these near-zero logits
    for dtype, tol in bound.items():
        if dtype == "bf16" and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
            with pytest.raises(ValueError, match="AVX512-BF16"):
                CrossEncoder.from_pretrained(standin_dir, device="cpu", dtype=dtype)
            continue
        scores = CrossEncoder.from_pretrained(standin_dir, device="cpu", dtype=dtype).predict(golden_pairs)
        assert scores.dtype == np.float32
        assert max_diff(scores, gold) <= tol, dtype
        rho = np.corrcoef(np.argsort(np.argsort(scores)), np.argsort(np.argsort(gold)))[0, 1]
        # int8 measured 0.97 (0.86 with one weight scale per matrix instead of per row): its noise ~ the spread
        assert rho >= (0.99 if dtype == "bf16" else 0.92), (dtype, rho)


needs_bf16 = pytest.mark.skipif(not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()),
                                reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")


@needs_bf16
def test_bf16_fast_path_layout_and_its_plain_twin(standin_dir, golden, golden_pairs):
    """bf16 on a CPU: layers 0..4 run pre-packed oneDNN Linears (GELU fused), the last layer and head stay fp32; the
    plain autocast path (packed=False) computes the same bf16 math, and running the last layer in bf16 too is worse."""
    from minilm.precision import PackedLinear

    gold = np.asarray(golden["logits"]["512"]["32"])
    fast = CrossEncoder.from_pretrained(standin_dir, device="cpu", dtype="bf16")
    layers = fast.model.layers
    assert all(isinstance(layer.intermediate, PackedLinear) and isinstance(layer.attention.self.query, PackedLinear)
               for layer in layers[:-1])
    assert all(m.weight.dtype == torch.float32 for m in layers[-1].modules() if isinstance(m, torch.nn.Linear))

    plain = CrossEncoder.from_pretrained(standin_dir, device="cpu", dtype="bf16", packed=False)
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    fast_scores, plain_scores = fast.predict(golden_pairs), plain.predict(golden_pairs)
    assert max_diff(fast_scores, plain_scores) <= 5e-4  # measured 1.4e-4: both bf16, rounded in different places
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # the head under autocast as well
        all_bf16 = np.concatenate([plain.model(**{k: torch.from_numpy(v) for k, v in plain.tokenizer(golden_pairs[i : i + 8]).items()}).float().numpy()
                                   for i in range(0, len(golden_pairs), 8)])
    errors = {name: float(np.abs(s - gold).mean()) for name, s in
              [("fast", fast_scores), ("plain", plain_scores), ("all_bf16", all_bf16)]}
    # measured mean |error|: fast 6.5e-5, plain 7.0e-5, last layer in bf16 too 1.5e-4
    assert errors["fast"] < errors["all_bf16"] and errors["plain"] < errors["all_bf16"], errors


def test_reduced_precision_models_stay_where_they_were_converted_and_are_not_saved(standin_dir, tmp_path):
    int8 = CrossEncoder.from_pretrained(standin_dir, dtype="int8")  # no device: int8 means the CPU, even with CUDA
    assert int8.precision == "int8" and int8.device.type == "cpu"
    layers = int8.model.layers
    assert all(type(m) is torch.nn.Linear for m in layers[-1].modules() if "Linear" in type(m).__name__)  # last: fp32
    assert all(type(m) is not torch.nn.Linear for m in layers[0].modules())  # the others quantized
    with pytest.raises(ValueError, match="load it again"):
        int8.to("meta")
    assert int8.to("cpu") is int8  # the same device again: nothing to do
    with pytest.raises(ValueError, match="cannot be saved"):
        int8.save_pretrained(tmp_path / "int8")
    assert not (tmp_path / "int8" / "model.safetensors").exists()


def test_int8_converts_quietly_and_is_refused_once_torch_drops_it(standin_dir, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.ao's deprecation notices are ours to handle, not the user's to read
        CrossEncoder.from_pretrained(standin_dir, device="cpu", dtype="int8")
    monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)  # as in a torch release that has removed it
    with pytest.raises(ValueError, match="no longer has"):
        CrossEncoder.from_pretrained(standin_dir, device="cpu", dtype="int8")


def test_fp16_and_int8_are_refused_where_they_would_be_slow(standin_dir):
    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        CrossEncoder.from_pretrained(standin_dir, device="cpu", dtype="fp16")
    with pytest.raises(ValueError, match="dtype must be one of fp32, bf16, fp16, int8"):
        CrossEncoder.from_pretrained(standin_dir, device="cpu", dtype="fp8")
