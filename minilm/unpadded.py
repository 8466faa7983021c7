"""The fast training forward: the same model and parameters, run on the real tokens of a batch only.

train.py's default loop switches this in (`Unpadded(model)`), the way minilm.precision switches packed Linears in for
scoring; model.py stays the plain padded model that the exact loop and scoring use. Three changes, none to the math:

  * Unpadding. The pairs of a batch are concatenated into one (N, H) matrix of real tokens (`pack`), so every Linear,
    LayerNorm and GELU skips the padding (about a third of a padded batch with the card's length profile).
  * Attention per sequence on the CPU. SDPA with dropout falls back there to a materialised (B, 12, T, T) softmax and a
    float mask of the same size; here each pair's (12, L, L) scores stay in cache and the dropout mask is a bool drawn
    4x cheaper (`drop_mask`). On CUDA, SDPA (cuDNN's or the memory-efficient kernel, as torch picks) takes the
    padding mask and dropout itself, so the pairs are padded for attention only.
  * The last layer for [CLS] only, as when scoring: the pooler reads nothing else, so the loss and every gradient are
    the ones of the full layer.
Dropout keeps the recipe's p = 0.1 on embeddings, attention probabilities, both residual branches and the classifier,
with masks from other random draws. On the CPU a mask keeps an element with probability 1 - round(p * 2^16) / 2^16
(0.899994 for p = 0.1) and scales it by exactly the inverse, so the expected value is unchanged; on CUDA the masks
are torch's (F.dropout) and SDPA's own, with p = 0.1 exactly.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Packed:
    """A batch of pairs without padding: pair i owns lengths[i] consecutive rows of the (N,) tensors."""

    input_ids: torch.Tensor  # (N,)
    token_type_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,) 0..L-1 within each pair
    cls_rows: torch.Tensor  # (B,) the row of each pair's [CLS] token
    rows: torch.Tensor  # (N,) where each token sits in a right-padded (B * T) batch; for attention on CUDA
    lengths: list  # (B,) python ints: no device sync to read them


def pack(encodings, device) -> Packed:
    """Packed tensors of tokenized pairs (minilm.tokenizer.PairEncoding), copied to `device` without blocking."""
    lengths = [len(e.ids) for e in encodings]
    T = max(lengths)
    arrays = [np.concatenate([e.ids for e in encodings]), np.concatenate([e.type_ids for e in encodings]),
              np.concatenate([np.arange(n) for n in lengths]), np.cumsum([0] + lengths[:-1]),
              np.concatenate([i * T + np.arange(n) for i, n in enumerate(lengths)])]
    return Packed(*(copy_in(torch.from_numpy(np.asarray(a, dtype=np.int64)), device) for a in arrays), lengths)


def copy_in(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor` on `device`; to a GPU from pinned host memory without blocking, so the copy runs while the GPU works
    on what was queued before (the previous step, the previous batch); from pageable memory the host may wait."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# ------------------------------------------------------------------------------------------------------- dropout
def drop_mask(shape, p: float, device) -> tuple[torch.Tensor, float]:
    """(bool mask, True = drop; the scale 1 / P(keep) for what is kept). One 64-bit draw gives four 16-bit numbers; an
    element is dropped iff its number is among the lowest round(p * 2^16) of the 2^16 values (at least 1 for any p > 0:
    a p below 2^-17 still drops; p = 1 drops everything, as F.dropout does)."""
    drop = max(round(p * 65536), 1 if p > 0 else 0)
    if drop == 65536:
        return torch.ones(shape, dtype=torch.bool, device=device), 0.0
    n = int(np.prod(shape))
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # every bit random
    return (bits.view(torch.int16)[:n] < drop - 32768).view(shape), 65536 / (65536 - drop)


class CheapDropout(torch.autograd.Function):
    """Dropout with `drop_mask`; autograd keeps the 1-byte mask, not a float one."""

    @staticmethod
    def forward(ctx, x, p):
        dropped, scale = drop_mask(x.shape, p, x.device)
        ctx.save_for_backward(dropped)
        ctx.scale = scale
        return x.masked_fill(dropped, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (dropped,) = ctx.saved_tensors
        return grad.masked_fill(dropped, 0).mul_(ctx.scale), None


def dropout(x, p: float, training: bool):
    if not training or p == 0:
        return x
    return CheapDropout.apply(x, p) if x.device.type == "cpu" else F.dropout(x, p, True)  # CUDA's own is cheap


# ----------------------------------------------------------------------------------------------------- attention
def attention_per_sequence(q, k, v, batch: Packed, n_head: int, p: float, cls_only: bool):
    """q: (N or B, H), k and v: (N, H) -> (N or B, H); softmax(q k^T / sqrt(d)) with dropout, one pair at a time."""
    H = k.shape[1]
    hd = H // n_head
    q = q * hd**-0.5  # scale the (N, H) queries rather than the (nh, L, L) scores
    out = []
    # split, not slices: its backward is one concatenation, where each slice's would be a zero-filled (N, H) tensor
    for qi, ki, vi in zip(q.split(1 if cls_only else batch.lengths), k.split(batch.lengths), v.split(batch.lengths)):
        qi = qi.view(-1, n_head, hd).transpose(0, 1)  # (nh, Lq, hd)
        ki = ki.view(-1, n_head, hd).transpose(0, 1)  # (nh, L, hd)
        vi = vi.view(-1, n_head, hd).transpose(0, 1)  # (nh, L, hd)
        att = (qi @ ki.transpose(1, 2)).softmax(-1)  # (nh, Lq, L)
        if p > 0:
            dropped, scale = drop_mask(att.shape, p, att.device)
            y = (att.masked_fill(dropped, 0) @ vi) * scale  # the scale on the small (nh, Lq, hd) result
        else:
            y = att @ vi  # (nh, Lq, hd)
        out.append(y.transpose(0, 1).reshape(-1, H))  # (Lq, H)
    return torch.cat(out)  # (N or B, H)


def attention_padded(q, k, v, batch: Packed, n_head: int, p: float, cls_only: bool):
    """The same attention through SDPA on a right-padded copy of q, k, v (its CUDA kernels take mask and dropout)."""
    B, T, H = len(batch.lengths), max(batch.lengths), k.shape[1]
    hd = H // n_head

    def padded(x):  # (N, H) -> (B, nh, T, hd)
        return x.new_zeros(B * T, H).index_copy_(0, batch.rows, x).view(B, T, n_head, hd).transpose(1, 2)

    real = torch.zeros(B * T, dtype=torch.bool, device=k.device).index_fill_(0, batch.rows, True).view(B, 1, 1, T)
    q = q.view(B, 1, n_head, hd).transpose(1, 2) if cls_only else padded(q)  # (B, nh, Tq, hd)
    y = F.scaled_dot_product_attention(q, padded(k), padded(v), attn_mask=real, dropout_p=p)  # (B, nh, Tq, hd)
    y = y.transpose(1, 2).reshape(-1, H)  # (B * Tq, H)
    return y if cls_only else y[batch.rows]  # (N or B, H)


# --------------------------------------------------------------------------------------------------------- model
class Unpadded(nn.Module):
    """CrossEncoderModel's forward on a Packed batch -> (B,) logits, with the model's own modules and parameters."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.per_sequence = None  # None: per sequence on the CPU, through SDPA elsewhere; True / False to force one

    def forward(self, batch: Packed):
        model, training = self.model, self.training
        per_sequence = batch.input_ids.device.type == "cpu" if self.per_sequence is None else self.per_sequence
        attention = attention_per_sequence if per_sequence else attention_padded
        emb = model.bert.embeddings  # same addition order as Embeddings.forward
        x = emb.word_embeddings(batch.input_ids) + emb.token_type_embeddings(batch.token_type_ids)  # (N, H)
        x = x + emb.position_embeddings(batch.positions)
        x = dropout(emb.LayerNorm(x), emb.dropout.p, training)  # (N, H)
        for i, layer in enumerate(model.layers):
            cls_only = i == len(model.layers) - 1  # the pooler reads only [CLS]: its rows alone go on
            sa, ao, ffn_out = layer.attention.self, layer.attention.output, layer.output
            xq = x[batch.cls_rows] if cls_only else x  # (N or B, H)
            a = attention(sa.query(xq), sa.key(x), sa.value(x), batch, sa.n_head, sa.dropout_p if training else 0.0, cls_only)
            x = ao.LayerNorm(dropout(ao.dense(a), ao.dropout.p, training) + xq)  # post-LN, as in the model
            x = ffn_out.LayerNorm(dropout(ffn_out.dense(layer.intermediate(x)), ffn_out.dropout.p, training) + x)
        pooled = model.bert.pooler.dense(x).tanh()  # (B, H): x holds the [CLS] rows only
        return model.classifier(dropout(pooled, model.dropout.p, training)).squeeze(-1)  # (B,) raw logits
