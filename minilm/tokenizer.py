"""Pair tokenization identical to `BertTokenizerFast(pairs, padding=True, truncation=True)` in transformers.

`[CLS] query [SEP] passage [SEP]`, token types 0 for `[CLS] query [SEP]` and 1 for `passage [SEP]`; lowercasing with
accent stripping (й -> и, ё -> е: `strip_accents=None` follows `lowercase`); longest-first truncation from the right to
`max_length` tokens including the three specials; right padding to the longest pair of the batch.

The Rust `tokenizers` library normalizes and splits each text; the truncation rule is applied here, on the two
untruncated id lists, rather than by the library: for a pair it also builds every overflowing window of the cut-off
text, a cost that grows with the passage and that nothing here reads (measurements: docs/performance.md).
A long text is tokenized only as far as truncation can keep (`PairTokenizer.heads`), with the same ids.
Whatever truncation and padding a `tokenizer.json` stores (the all-MiniLM one says "pad everything to 128") is
ignored: transformers ignores it at call time too.
"""

import json
import numbers
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .checkpoint import CheckpointError, read_json

# transformers' stand-in for "no limit" when tokenizer_config.json has no model_max_length
NO_LIMIT = int(1e30)
# tokenizer_config.json's tokenizer_class -> whether the model is given token_type_ids, as transformers' class of that
# name does (its model_input_names); None: no class named, BERT's. The BERT-like classes rebuild tokenizer.json's
# normalizer from tokenizer_config.json (normalize_as_configured); PreTrainedTokenizerFast takes tokenizer.json as
# written.
TOKENIZER_CLASSES = {None: True, "PreTrainedTokenizerFast": True, "DistilBertTokenizer": False, "DistilBertTokenizerFast": False,
                     **{f"{name}Tokenizer{fast}": True for name in ("Bert", "Electra", "MobileBert", "SqueezeBert", "LayoutLM")
                        for fast in ("", "Fast")}}  # BERT's WordPiece, specials and normalizer rebuild, each of them
AS_WRITTEN = "PreTrainedTokenizerFast"
MIN_LENGTH = 5  # at 4, truncation (as transformers does it) leaves the query no token: every query the same
SIDES = {"truncation_side": "minilm truncates texts at their end only",
         "padding_side": "minilm pads at the right only (BERT's positions count from the first token: padding at the "
                         "left would shift them, and a pair's score would depend on the others in its batch)"}


def check_side(name: str, side) -> None:
    """truncation_side / padding_side must be "right": ValueError saying why otherwise."""
    if side != "right":
        raise ValueError(f"{name} {side!r}: {SIDES[name]}")


def normalizer_settings(tokenizer_config: dict) -> dict:
    """BertNormalizer's settings from tokenizer_config.json's do_lower_case, strip_accents and tokenize_chinese_chars
    (defaults True, None, True), as transformers' BertTokenizerFast takes them."""
    return {"lowercase": tokenizer_config.get("do_lower_case", True), "strip_accents": tokenizer_config.get("strip_accents"),
            "handle_chinese_chars": tokenizer_config.get("tokenize_chinese_chars", True)}


def normalize_as_configured(tokenizer: Tokenizer, tokenizer_config: dict) -> None:
    """transformers' BertTokenizerFast rebuilds the BERT normalizer of tokenizer.json with tokenizer_config.json's
    settings where they differ; so does this, or one checkpoint would be tokenized two ways (a do_lower_case false
    there keeps "Café" as it is)."""
    if not isinstance(tokenizer.normalizer, normalizers.BertNormalizer):
        return
    state = json.loads(tokenizer.normalizer.__getstate__())
    wanted = normalizer_settings(tokenizer_config)
    if any(state.get(key, value) != value for key, value in wanted.items()):
        tokenizer.normalizer = normalizers.BertNormalizer(clean_text=state.get("clean_text", True), **wanted)


def build_from_vocab(vocab_file: Path, tokenizer_config: dict) -> Tokenizer:
    """A BERT WordPiece tokenizer from `vocab.txt` + `tokenizer_config.json`, as transformers' converter builds it."""
    vocab = {}
    try:
        lines = vocab_file.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{vocab_file}: not UTF-8 text ({e})") from None
    for i, token in enumerate(lines[:-1] if lines[-1] == "" else lines):
        vocab[token] = i  # one token per line, the line number is the id (a later duplicate wins, as in transformers)
    unk, cls, sep = (tokenizer_config.get(k, d) for k, d in (("unk_token", "[UNK]"), ("cls_token", "[CLS]"), ("sep_token", "[SEP]")))
    for token in (unk, cls, sep, tokenizer_config.get("pad_token", "[PAD]")):
        if token not in vocab:
            raise ValueError(f"{vocab_file}: special token {token!r} is not in the vocabulary")
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, **normalizer_settings(tokenizer_config))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # as in the tokenizer.json transformers writes: a special token written in a text is that token ("[SEP]" is 102)
    specials = [tokenizer_config.get(f"{name}_token", f"[{name.upper()}]") for name in ("pad", "unk", "cls", "sep", "mask")]
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in specials if t in vocab])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


ENCODE_BATCH = 256  # pairs handed to the Rust tokenizer at a time: bounds the untruncated encodings held at once
# Long texts are tokenized from a head of ~8 characters per token that truncation can keep (English wordpieces average
# ~4-5 with the space), so memory does not grow with passage length (it took 3.2 GB for 1,024 passages of 100k
# characters at max_length 64); a head that falls short is doubled until it holds enough.
HEAD_CHARS_PER_TOKEN = 8
HEAD_SLACK_CHARS = 100  # so that a small budget's head still holds a few long words
COUNT_PIECE_CHARS = 1 << 16  # piece size when a long text's length must be counted


class PairEncoding(NamedTuple):
    ids: list  # [CLS] query [SEP] passage [SEP]
    type_ids: list  # 0 for [CLS] query [SEP], 1 for passage [SEP]
    truncated: bool = False  # tokens of the query or the passage were cut to fit max_length


def longest_first(n_query: int, n_passage: int, budget: int) -> tuple[int, int]:
    """Content lengths (query, passage) kept when a pair must fit `budget` tokens: tokenizers' LongestFirst rule.

    The shorter text is kept whole and the longer one cut to the rest, unless the shorter alone takes more than half:
    then both are cut to half the budget, the odd token going to the text that was longer (to the passage on a tie)."""
    if n_query + n_passage <= budget:
        return n_query, n_passage
    short, long = sorted((n_query, n_passage))
    long = short if short > budget else max(short, budget - short)
    if short + long > budget:
        short, long = budget // 2, budget - budget // 2
    return (min(long, n_query), min(short, n_passage)) if n_query > n_passage else (min(short, n_query), min(long, n_passage))


class MaxLengthError(ValueError):
    """A max_length the model cannot take (below 5, above its position embeddings, not a whole number)."""


class NoTokens(ValueError):
    """A text of pair `index` ("query" or "passage") gives no tokens at all: it holds only spaces, control, zero-width
    or combining characters, which the normalizer removes, so the model would score it as an empty text."""

    def __init__(self, index: int, text: str):
        self.index, self.text = index, text
        self.problem = "has no tokens (only spaces, control, zero-width or combining characters)"
        super().__init__(self.at(f"pair {index}"))

    def at(self, where: str) -> str:
        """The message, saying where the pair came from ("train.jsonl:17")."""
        return f"{where}: the {self.text} {self.problem}"


class PairTokenizer:
    """Turns (query, passage) pairs into padded int64 arrays for the model."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_token: str = "[PAD]", max_positions: int | None = None,
                 token_types: bool = True):
        self.tokenizer = tokenizer
        self.token_types = token_types  # False: every token in segment 0 (a tokenizer whose model gets no token_type_ids)
        self.max_positions = max_positions  # the model's position embeddings, when known: max_length's ceiling
        self.max_length = max_length
        self.pad_id = tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        tokenizer.no_padding()
        tokenizer.no_truncation()
        specials = tokenizer.encode("", "")  # what the post-processor wraps an empty pair in
        if len(specials.ids) != 3 or specials.ids[1] != specials.ids[2] or specials.type_ids != [0, 0, 1]:
            raise ValueError(f"the tokenizer's post-processor gives {specials.tokens} for an empty pair; a BERT pair "
                             "template [CLS] A [SEP] B [SEP] is expected")
        self.cls_id, self.sep_id = specials.ids[:2]
        # A head of a text that ends at a space gives exactly the text's first tokens when the normalizer works
        # character by character, no word spans a space and no added token holds one: true of BERT's normalizer and
        # pre-tokenizer. Any other tokenizer gets whole texts.
        self.cuttable = (isinstance(tokenizer.normalizer, (normalizers.BertNormalizer, type(None)))
                         and isinstance(tokenizer.pre_tokenizer, pre_tokenizers.BertPreTokenizer)
                         and not any(" " in t.content for t in tokenizer.get_added_tokens_decoder().values()))

    @property
    def max_length(self) -> int:
        """Tokens per pair, specials included; assignable (transformers' name, model_max_length, too)."""
        return self._max_length

    @max_length.setter
    def max_length(self, max_length: int) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral):
            raise TypeError(f"max_length must be a whole number of tokens, got {max_length!r}")
        max_length = int(max_length)
        if max_length < MIN_LENGTH:
            raise MaxLengthError(f"max_length must be at least {MIN_LENGTH} ([CLS] query [SEP] passage [SEP] with a "
                                 f"token of each), got {max_length}")
        if self.max_positions is not None and max_length > self.max_positions:
            raise MaxLengthError(f"max_length {max_length} exceeds the model's {self.max_positions} position embeddings")
        self._max_length = max_length

    model_max_length = max_length

    # transformers' attributes, never silently ignored
    truncation_side = property(lambda self: "right", lambda self, side: check_side("truncation_side", side))
    padding_side = property(lambda self: "right", lambda self, side: check_side("padding_side", side))

    @classmethod
    def from_dir(cls, path: Path, max_length: int | None, max_position_embeddings: int) -> "PairTokenizer":
        """Load `tokenizer.json` (or build from `vocab.txt`); default max_length = min(model_max_length, positions)."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = read_json(config_file) if config_file.exists() else {}
        # special tokens may be stored as serialized AddedTokens: {"content": "[PAD]", "lstrip": false, ...}
        config = {k: v["content"] if isinstance(v, dict) and "content" in v else v for k, v in config.items()}
        kind = config.get("tokenizer_class")
        if kind not in TOKENIZER_CLASSES:
            raise CheckpointError(f"{config_file}: tokenizer_class {json.dumps(kind)}: minilm tokenizes only as BERT's "
                                  f"tokenizers do ({', '.join(sorted(k for k in TOKENIZER_CLASSES if k))}, or none named)")
        if (path / "tokenizer.json").exists():
            try:
                tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # the library raises a bare Exception that does not name the file
                raise CheckpointError(f"{path / 'tokenizer.json'}: not a valid tokenizer file ({e})") from None
            if kind != AS_WRITTEN:
                normalize_as_configured(tokenizer, config)
        elif (path / "vocab.txt").exists() and kind != AS_WRITTEN:
            tokenizer = build_from_vocab(path / "vocab.txt", config)
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json{'' if kind == AS_WRITTEN else ' and no vocab.txt'}")
        for side in ("truncation_side", "padding_side"):  # sentence-transformers would cut the query's start, or pad left
            try:
                check_side(side, config.get(side, "right"))
            except ValueError as e:
                raise CheckpointError(f"{config_file}: {e}") from None
        names = config.get("model_input_names", ["input_ids", "token_type_ids", "attention_mask"] if TOKENIZER_CLASSES[kind]
                           else ["input_ids", "attention_mask"])
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and "input_ids" in names):
            raise CheckpointError(f"{config_file}: model_input_names must be a list of names with input_ids, got "
                                  f"{json.dumps(names)}")
        if "attention_mask" not in names:  # transformers would let the model attend to the padding
            raise CheckpointError(f"{config_file}: model_input_names {json.dumps(names)} has no attention_mask: the "
                                  "model would attend to padding, and a pair's score would depend on its batch; minilm "
                                  "always masks padding")
        limit = config.get("model_max_length") or NO_LIMIT
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise CheckpointError(f"{config_file}: model_max_length must be a number, got {json.dumps(limit)}")
        limit = min(int(limit), max_position_embeddings)
        if max_length is None and limit < MIN_LENGTH:
            raise CheckpointError(f"{config_file}: model_max_length {limit} is below {MIN_LENGTH} tokens, too few for a "
                                  "pair; pass a max_length")
        return cls(tokenizer, limit if max_length is None else max_length, config.get("pad_token", "[PAD]"),
                   max_position_embeddings, token_types="token_type_ids" in names)

    def encode(self, pairs, require_tokens: bool = False) -> list[PairEncoding]:
        """Unpadded [CLS] query [SEP] passage [SEP] ids of (query, passage) pairs, truncated longest-first.
        require_tokens: raise NoTokens for a text that gives no token (scored as if empty, as sentence-transformers
        would: infer.py and train.py refuse such rows, as they refuse empty ones)."""
        out = []
        budget = self.max_length - 3  # [CLS], [SEP], [SEP]
        cls, sep = [self.cls_id], [self.sep_id]
        for start in range(0, len(pairs), ENCODE_BATCH):
            chunk = pairs[start : start + ENCODE_BATCH]
            queries = self.heads([q for q, _ in chunk], budget)
            passages = self.heads([p for _, p in chunk], budget)
            for i, ((query, passage), (q, q_whole), (p, p_whole)) in enumerate(zip(chunk, queries, passages), start):
                if require_tokens and not (q and p):  # a head with no token is the whole text (see heads)
                    raise NoTokens(i, "passage" if q else "query")
                n_q, n_p = len(q), len(p)
                # A cut text is known to be longer than the budget, which fixes what LongestFirst keeps, except for
                # an odd budget's last token when both texts exceed it: that goes to the longer one, so count them.
                if budget % 2 and n_q > budget and n_p > budget:
                    n_q = n_q if q_whole else self.count(query)
                    n_p = n_p if p_whole else self.count(passage)
                a, b = longest_first(n_q, n_p, budget)
                out.append(PairEncoding(cls + q[:a] + sep + p[:b] + sep, [0] * (a + 2) + [int(self.token_types)] * (b + 1),
                                        a < len(q) or b < len(p)))
        return out

    def heads(self, texts, budget: int) -> list[tuple[list, bool]]:
        """(ids, whole) per text: the ids of the whole text, or (whole False) the first ids of a longer text, more
        than `budget` of them, from a head of the text ending at a space (see HEAD_CHARS_PER_TOKEN)."""
        chars = budget * HEAD_CHARS_PER_TOKEN + HEAD_SLACK_CHARS
        heads = [self.head(t, chars) for t in texts]
        out = []
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which nothing here reads
        encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        for text, head, enc in zip(texts, heads, encode_batch(heads, add_special_tokens=False)):
            ids, n = enc.ids, chars
            while len(ids) <= budget and len(head) < len(text):  # long words: fewer tokens than guessed, cut later
                n *= 2
                head = self.head(text, n)
                ids = self.tokenizer.encode(head, add_special_tokens=False).ids
            out.append((ids, len(head) == len(text)))
        return out

    def head(self, text: str, chars: int) -> str:
        """`text` up to the first space at or after `chars` characters (all of it if shorter, without such a space,
        or if this tokenizer cannot be cut)."""
        end = text.find(" ", chars) + 1 if self.cuttable else 0
        return text[:end] if end else text

    def count(self, text: str) -> int:
        """The number of tokens in `text`, tokenized in pieces ending at spaces: memory independent of its length."""
        n, start = 0, 0
        while start < len(text):
            end = text.find(" ", start + COUNT_PIECE_CHARS) + 1 or len(text)
            n += len(self.tokenizer.encode(text[start:end], add_special_tokens=False).ids)
            start = end
        return n

    def pad(self, encodings) -> dict:
        """Right-pad encodings to the longest one: input_ids, attention_mask, token_type_ids as int64 (B, T)."""
        T = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), T), self.pad_id, dtype=np.int64)
        types = np.zeros((len(encodings), T), dtype=np.int64)
        mask = np.zeros((len(encodings), T), dtype=np.int64)
        for i, e in enumerate(encodings):
            n = len(e.ids)
            ids[i, :n], types[i, :n], mask[i, :n] = e.ids, e.type_ids, 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def model_inputs(self, encodings) -> dict:
        """pad(), without the attention mask when nothing is padded: the model needs none then (as transformers
        decides), and this way it never has to look: it checks a mask only on the CPU, since on a GPU reading the
        answer makes the host wait for the device."""
        batch = self.pad(encodings)
        if batch["attention_mask"].all():
            del batch["attention_mask"]
        return batch

    def __call__(self, pairs) -> dict:
        return self.pad(self.encode(pairs))
