"""MiniLM-L6-H384 cross-encoder: embeddings -> 6 post-LN encoder layers -> tanh pooler -> dropout -> 1 logit.

This is BERT exactly as `transformers.BertForSequenceClassification` computes it (transformers 4.56,
`models/bert/modeling_bert.py`), written out in one file so every step is visible. Module and parameter names are the
Hugging Face ones (`bert.encoder.layer.3.attention.self.query.weight`, ...), so a checkpoint's state dict loads with no
renaming and what we save loads back in transformers and sentence-transformers.

    input_ids, token_type_ids  (B, T)
      -> Embeddings: word + token type + position, LayerNorm, dropout          (B, T, H)
      -> Layer x N:  x = LN(x + dropout(attention(x)))                          post-LN, as in the original BERT
                     x = LN(x + dropout(W2 gelu(W1 x)))
      -> Pooler:     tanh(dense(x[:, 0]))                                       (B, H)    the [CLS] token
      -> Classifier: linear(dropout(pooled))                                    (B,)      raw logits, no activation

The defaults of `Config` are the MiniLM-L6-H384 checkpoints (`cross-encoder/ms-marco-MiniLM-L6-v2`);
`Config.from_hf` reads any BERT `config.json` of this family (L2, L4, L12, TinyBERT-L2).
"""

import json
import math
from dataclasses import dataclass, fields
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12  # head dim 384 / 12 = 32
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # segment A = query (0), segment B = passage (1)
    layer_norm_eps: float = 1e-12  # BERT's TensorFlow value, not torch's 1e-5
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None  # None means hidden_dropout_prob, as in transformers
    hidden_act: str = "gelu"  # exact erf GELU; the tanh approximation moves logits by ~2e-5
    pad_token_id: int = 0
    initializer_range: float = 0.02  # std of the head's init when a checkpoint has none

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "Config":
        """Read a Hugging Face BERT `config.json` dict; refuse what this model does not implement or what is not a
        value of the right type and range (ValueError naming `source` and the key), before any tensor is built."""
        if hf.get("model_type") != "bert":  # transformers too refuses a config.json without one
            got = f"model_type {hf['model_type']!r}" if "model_type" in hf else "no model_type"
            raise ValueError(f"{source} has {got}; only 'bert' checkpoints are supported")
        for name in ("hidden_size", "num_hidden_layers", "intermediate_size"):
            if name not in hf:  # the defaults below are MiniLM-L6's; transformers would take BERT-base's (768, 12, 3072)
                raise ValueError(f"{source} has no {name}; transformers and minilm would read different defaults")
        if hf.get("pruned_heads"):
            raise ValueError(f"{source} has pruned_heads; attention with pruned heads is not implemented")
        if hf.get("hidden_act", "gelu") not in ("gelu", "gelu_python"):  # both are transformers' exact erf GELU
            raise ValueError(f"{source} has hidden_act {hf['hidden_act']!r}; only exact 'gelu' is implemented")
        for name in ("is_decoder", "add_cross_attention"):  # a causal mask or cross-attention layers: another model
            if hf.get(name, False) is not False:
                raise ValueError(f"{source} has {name} {json.dumps(hf[name])}; only a BERT encoder (false) is implemented")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{source}: only position_embedding_type 'absolute' is implemented")
        id2label = hf.get("id2label", {"0": "LABEL_0"})
        if not isinstance(id2label, dict) or len(id2label) != 1:
            raise ValueError(f"{source} has id2label {id2label!r}; a cross-encoder reranker has exactly 1 label")
        for f in fields(cls):
            value = hf.get(f.name, f.default)
            allowed = get_args(f.type) or (f.type,)  # `float | None` -> (float, NoneType)
            allowed = ((int,) if float in allowed else ()) + allowed  # JSON writes 0.0 as 0
            if isinstance(value, bool) or not isinstance(value, allowed):
                names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
                raise ValueError(f"{source}: {f.name} must be {names}, got {json.dumps(value)}")
        config = cls(**{k: v for k, v in hf.items() if k in {f.name for f in fields(cls)}})
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size")
        for name in sizes:
            if getattr(config, name) < 1:
                raise ValueError(f"{source}: {name} must be at least 1, got {getattr(config, name)}")
        if config.type_vocab_size < 2:
            raise ValueError(f"{source}: type_vocab_size must be at least 2 (the passage is segment 1), got {config.type_vocab_size}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"{source}: num_attention_heads {config.num_attention_heads} does not divide hidden_size "
                             f"{config.hidden_size}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            p = getattr(config, name)
            if p is not None and not 0 <= p <= 1:
                raise ValueError(f"{source}: {name} must be between 0 and 1, got {p}")
        if not config.layer_norm_eps > 0:
            raise ValueError(f"{source}: layer_norm_eps must be positive, got {config.layer_norm_eps}")
        if not 0 <= config.pad_token_id < config.vocab_size:
            raise ValueError(f"{source}: pad_token_id {config.pad_token_id} is not an id of the {config.vocab_size}-token vocabulary")
        return config


class Embeddings(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # TF name kept for checkpoints
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        T = input_ids.shape[1]
        # positions are always 0..T-1: right padding never shifts them. Same addition order as transformers
        # (word + type, then + position) so results agree to the last bit.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, T, H)
        x = x + self.position_embeddings.weight[:T]
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob
        self.use_sdpa = True  # False: the plain softmax path below, for study; same numbers to ~3e-8

    def forward(self, x, bias, queries):
        """Attend from `queries` (x itself, or its [CLS] row) to every position of x."""
        B, T, H = x.shape
        Tq = queries.shape[1]
        hd = H // self.n_head
        q = self.query(queries).view(B, Tq, self.n_head, hd).transpose(1, 2)  # (B, nh, Tq, hd)
        k = self.key(x).view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        v = self.value(x).view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        p = self.dropout_p if self.training else 0.0
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # (B, nh, Tq, hd)
        else:
            att = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (B, nh, Tq, T)
            if bias is not None:
                att = att + bias
            y = F.dropout(att.softmax(dim=-1), p) @ v  # (B, nh, Tq, hd)
        return y.transpose(1, 2).reshape(B, Tq, H)  # re-assemble heads: (B, Tq, H)


class DenseDropoutResidualNorm(nn.Module):
    """LayerNorm(x + dropout(dense(h))): the post-LN residual step that closes both halves of a BERT layer.

    transformers calls this module `attention.output` after attention and `output` after the FFN."""

    def __init__(self, d_in: int, cfg: Config):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h, x):
        return self.LayerNorm(self.dropout(self.dense(h)) + x)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.self = SelfAttention(cfg)  # named `attention.self.*` in checkpoints
        self.output = DenseDropoutResidualNorm(cfg.hidden_size, cfg)

    def forward(self, x, bias, queries):
        return self.output(self.self(x, bias, queries), queries)


class Intermediate(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact erf GELU ("gelu" in transformers), not the tanh approximation


class Layer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseDropoutResidualNorm(cfg.intermediate_size, cfg)

    def forward(self, x, bias, cls_only=False):
        """(B, T, H) -> (B, T, H); with cls_only, (B, 1, H): only [CLS] asks the queries, every token still answers."""
        x = self.attention(x, bias, x[:, :1] if cls_only else x)
        return self.output(self.intermediate(x), x)


class Pooler(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))  # the [CLS] token's final state: (B, H)


def attention_bias(attention_mask, dtype):
    """Additive attention mask (B, 1, 1, T): 0 where the key is a real token, the dtype's minimum where it is padding.

    It broadcasts over heads and query rows (transformers materialises the same values as (B, 1, T, T)). None when
    nothing is padded, as on transformers' SDPA path, which also lets SDPA pick its fastest kernel; that is checked
    for a mask on the CPU only: on a GPU, reading the answer would make the host wait for the device at every batch."""
    if attention_mask is None or (attention_mask.device.type == "cpu" and bool(attention_mask.all())):
        return None
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)  # (B, T)
    return bias.masked_fill(attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]  # (B, 1, 1, T)


class CrossEncoderModel(nn.Module):
    """BertForSequenceClassification with one label: (input_ids, attention_mask, token_type_ids) -> logits (B,), as
    `trunk` (embeddings, layers 1..N-1) then `head` (last layer, pooler, classifier): minilm.precision runs them apart."""

    def __init__(self, cfg: Config = Config()):
        super().__init__()
        self.config = cfg
        self.fast_inference = True  # in eval mode, run the last layer for [CLS] only (same logits to ~1e-7)
        # ModuleDicts only to give the parameters their checkpoint names: bert.embeddings.*, bert.encoder.layer.N.*
        self.bert = nn.ModuleDict(dict(
            embeddings=Embeddings(cfg),
            encoder=nn.ModuleDict(dict(layer=nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers)))),
            pooler=Pooler(cfg),
        ))
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout)
        self.classifier = nn.Linear(cfg.hidden_size, 1)

    @property
    def layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.head(*self.trunk(input_ids, attention_mask, token_type_ids))  # (B,) raw logits

    def trunk(self, input_ids, attention_mask=None, token_type_ids=None):
        """Embeddings and layers 1..N-1: hidden states (B, T, H) and the attention bias that goes with them."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.bert.embeddings(input_ids, token_type_ids)  # (B, T, H)
        bias = attention_bias(attention_mask, x.dtype)
        for layer in self.layers[:-1]:
            x = layer(x, bias)  # (B, T, H)
        return x, bias

    def head(self, x, bias):
        """The last layer, the pooler and the classifier: (B, T, H) -> (B,) logits."""
        # The pooler reads only [CLS], so when scoring the last layer may compute just that row: keys and values still
        # come from every token, but the query, output projection and FFN shrink from T rows to 1 (~14% of all FLOPs).
        x = self.layers[-1](x, bias, cls_only=self.fast_inference and not self.training)  # (B, T or 1, H)
        pooled = self.bert.pooler(x)  # (B, H)
        return self.classifier(self.dropout(pooled)).squeeze(-1)  # (B,) raw logits

    def set_sdpa(self, enabled: bool):
        """Switch every layer between F.scaled_dot_product_attention (default) and the plain softmax path."""
        for layer in self.layers:
            layer.attention.self.use_sdpa = enabled
