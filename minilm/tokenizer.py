"""Pair tokenization identical to `BertTokenizerFast(pairs, padding=True, truncation=True)` in transformers.

`[CLS] query [SEP] passage [SEP]`, token types 0 for `[CLS] query [SEP]` and 1 for `passage [SEP]`; lowercasing with
accent stripping (й -> и, ё -> е: `strip_accents=None` follows `lowercase`); longest-first truncation from the right to
`max_length` tokens including the three specials; right padding to the longest pair of the batch.

The Rust `tokenizers` library does the work. Whatever truncation and padding a `tokenizer.json` stores (the
all-MiniLM one says "pad everything to 128") is replaced: transformers ignores it at call time too.
"""

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# transformers' stand-in for "no limit" when tokenizer_config.json has no model_max_length
NO_LIMIT = int(1e30)


def build_from_vocab(vocab_file: Path, tokenizer_config: dict) -> Tokenizer:
    """A BERT WordPiece tokenizer from `vocab.txt` + `tokenizer_config.json`, as transformers' converter builds it."""
    vocab = {}
    lines = vocab_file.read_text(encoding="utf-8").split("\n")
    for i, token in enumerate(lines[:-1] if lines[-1] == "" else lines):
        vocab[token] = i  # one token per line, the line number is the id (a later duplicate wins, as in transformers)
    unk, cls, sep = (tokenizer_config.get(k, d) for k, d in (("unk_token", "[UNK]"), ("cls_token", "[CLS]"), ("sep_token", "[SEP]")))
    for token in (unk, cls, sep, tokenizer_config.get("pad_token", "[PAD]")):
        if token not in vocab:
            raise ValueError(f"{vocab_file}: special token {token!r} is not in the vocabulary")
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=tokenizer_config.get("tokenize_chinese_chars", True),
        strip_accents=tokenizer_config.get("strip_accents"),
        lowercase=tokenizer_config.get("do_lower_case", True),
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


class PairTokenizer:
    """Turns (query, passage) pairs into padded int64 arrays for the model."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_token: str = "[PAD]"):
        if max_length < 4:
            raise ValueError(f"max_length must be at least 4 ([CLS] q [SEP] p [SEP] needs 3 special tokens), got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length, strategy="longest_first", direction="right")

    @classmethod
    def from_dir(cls, path: Path, max_length: int | None, max_position_embeddings: int) -> "PairTokenizer":
        """Load `tokenizer.json` (or build from `vocab.txt`); default max_length = min(model_max_length, positions)."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        if (path / "tokenizer.json").exists():
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.txt").exists():
            tokenizer = build_from_vocab(path / "vocab.txt", config)
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json and no vocab.txt")
        limit = min(int(config.get("model_max_length") or NO_LIMIT), max_position_embeddings)
        if max_length is None:
            max_length = limit
        elif max_length > max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the model's {max_position_embeddings} position embeddings")
        return cls(tokenizer, max_length, config.get("pad_token", "[PAD]"))

    def encode(self, pairs) -> list:
        """Unpadded encodings of a list of (query, passage) pairs, truncated longest-first."""
        return self.tokenizer.encode_batch([(q, p) for q, p in pairs])

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

    def __call__(self, pairs) -> dict:
        return self.pad(self.encode(pairs))
