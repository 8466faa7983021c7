"""Everything that is not fp32: choosing a precision, converting a model to it, running it.

bf16 / fp16: layers 1..N-1 run under torch.autocast with their Linears stored in that dtype (on a CPU, bf16 ones are
pre-packed for oneDNN with GELU fused); the residual stream, LayerNorms and embeddings stay fp32, and so does the head
(`CrossEncoderModel.head`: last layer, pooler, classifier), where rounding would move a logit most for ~3% of the
FLOPs. int8: dynamic quantization of the same Linears, CPU only. Measurements behind these choices: docs/performance.md.
"""

import warnings

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", torch.float32: "fp32", torch.bfloat16: "bf16",
           torch.float16: "fp16"}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse(precision) -> str:
    """'fp32' / 'bf16' / 'fp16' / 'int8' from that name, a torch dtype or its long name; None means fp32."""
    name = "fp32" if precision is None else ALIASES.get(precision, precision)
    if name not in PRECISIONS:
        raise ValueError(f"dtype must be one of {', '.join(PRECISIONS)} (or a torch float dtype), got {precision!r}")
    return name


def native_bf16() -> bool:
    """Whether this CPU has bf16 dot products in hardware (AVX512-BF16 or AMX); without, bf16 is emulated and slow."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def check(precision: str, device: torch.device, offered=PRECISIONS) -> str:
    """Refuse a precision where it would be slower than fp32: bf16 on CPUs without native bf16, fp16 on any CPU,
    int8 (fbgemm) anywhere but the CPU. `offered`: the precisions the caller takes, of which the error suggests those
    that run well here."""
    def instead(*names):
        return " or ".join(name for name in names if name in offered)

    if device.type == "cpu":
        if precision == "bf16" and not native_bf16():
            raise ValueError("bf16 needs a CPU with AVX512-BF16 or AMX (this one would emulate it, slower than fp32); "
                             f"use {instead('fp32', 'int8')}")
        if precision == "fp16":
            raise ValueError("fp16 is for GPUs (CPUs emulate it, slower than fp32); on this CPU use "
                             f"{instead(*(['bf16'] if native_bf16() else []), 'fp32', 'int8')}")
    elif precision == "int8":
        raise ValueError(f"int8 (dynamic quantization) runs on the CPU only; on a GPU use {instead('fp16', 'bf16', 'fp32')}")
    return precision


def convert(model, precision: str, packed: bool = True):
    """The model converted in place for `precision` on the device its parameters are on (int8 returns a new one)."""
    device = next(model.parameters()).device
    check(precision, device)
    trunk = model.layers[:-1]
    linears = {f"bert.encoder.layer.{name}": m for name, m in trunk.named_modules() if isinstance(m, nn.Linear)}
    if precision == "int8":
        return quantize_int8(model, set(linears))
    for linear in linears.values() if precision in AUTOCAST else ():
        linear.to(AUTOCAST[precision])
    if packed and device.type == "cpu" and precision == "bf16" and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        pack_layers(trunk)
    return model.eval()


def logits(model, inputs: dict, precision: str) -> torch.Tensor:
    """fp32 logits (B,): the trunk under autocast for bf16 / fp16, the head in fp32."""
    dtype = AUTOCAST.get(precision)
    with torch.autocast(inputs["input_ids"].device.type, dtype=dtype, enabled=dtype is not None):
        x, bias = model.trunk(**inputs)
    return model.head(x.float(), bias)


def quantize_int8(model: nn.Module, names: set[str]) -> nn.Module:
    """Dynamic int8 quantization (fbgemm) of the named Linears: weights with one scale per output row, activations
    with one scale per call. torch.ao.quantization is deprecated (for the separate torchao package, not a dependency):
    its notices are silenced here, and int8 is refused with a clear message once torch has removed it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        except ImportError:
            raise ValueError(f"dtype int8 needs torch.ao.quantization.quantize_dynamic, which torch {torch.__version__} "
                             "no longer has; use fp32 or bf16") from None
        return quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8)


# --------------------------------------------------------------------------------------------- CPU bf16 packing
# A bf16 nn.Linear under autocast on the CPU reorders its weight into oneDNN's layout on every call and runs GELU as
# a separate pass; PackedLinear reorders once and fuses bias and exact-erf GELU into the matmul's epilogue.

class PackedLinear(nn.Module):
    """y = x W^T + b, or gelu(x W^T + b) with `gelu=True`, in bf16; the weight pre-packed for oneDNN. Inference only."""

    def __init__(self, linear: nn.Linear, gelu: bool = False, batch_tokens: int = 2048):
        super().__init__()
        weight = linear.weight.detach().to(torch.bfloat16)
        # batch_tokens is a hint for the layout; any number of rows works
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight, batch_tokens), persistent=False)
        self.register_buffer("bias", linear.bias.detach().to(torch.bfloat16), persistent=False)
        self.epilogue, self.algorithm = ("gelu", "none") if gelu else ("none", "")  # gelu "none" = exact erf GELU

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.weight, self.bias, self.epilogue, [],
                                                  self.algorithm)  # (B, T, out)


def pack_layers(layers) -> None:
    """Swap every Linear of these encoder layers for a PackedLinear; `intermediate` (gelu(dense(x))) becomes one."""
    for layer in layers:
        attention = layer.attention.self
        for name in ("query", "key", "value"):
            setattr(attention, name, PackedLinear(getattr(attention, name)))
        layer.attention.output.dense = PackedLinear(layer.attention.output.dense)
        layer.intermediate = PackedLinear(layer.intermediate.dense, gelu=True)
        layer.output.dense = PackedLinear(layer.output.dense)
