"""Everything that is not fp32: choosing a precision, converting a model to it, and running it.

The policy, in one place:
  * bf16 / fp16: layers 1..N-1 run under torch.autocast with their Linears' weights stored in that dtype; the residual
    stream, LayerNorms and embeddings stay fp32 (autocast keeps them so), and the head (the last layer, the pooler and
    the classifier, `CrossEncoderModel.head`) runs in fp32. The last layer is where rounding moves a logit most, and
    with [CLS]-only scoring it is ~3% of the FLOPs; a bf16 logit would also be rounded to 1/64 near 4, more than the
    gap between close passages.
  * On a CPU, those bf16 Linears are pre-packed for oneDNN once, with GELU fused into the FFN's first matmul
    (`PackedLinear`; `packed=False` keeps plain nn.Linear under autocast, for study).
  * int8: dynamic quantization of the same Linears (CPU only); no autocast.
Measurements behind these choices: docs/performance.md.
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


def check(precision: str, device: torch.device) -> str:
    """Refuse a precision where it would be slower than fp32: bf16 on CPUs without native bf16, fp16 on any CPU,
    int8 (fbgemm) anywhere but the CPU."""
    if device.type == "cpu":
        if precision == "bf16" and not native_bf16():
            raise ValueError("bf16 needs a CPU with AVX512-BF16 or AMX (this one would emulate it, slower than fp32); "
                             "use fp32 or int8")
        if precision == "fp16":
            raise ValueError("fp16 is for GPUs (CPUs emulate it, slower than fp32); on a CPU use bf16 or int8")
    elif precision == "int8":
        raise ValueError("int8 (dynamic quantization) runs on the CPU only; on a GPU use fp16 or bf16")
    return precision


def convert(model, precision: str, packed: bool = True):
    """The model converted in place for `precision` on the device its parameters are on (int8 returns a new one)."""
    device = next(model.parameters()).device
    check(precision, device)
    trunk = model.layers[:-1]
    linears = {name: m for name, m in trunk.named_modules() if isinstance(m, nn.Linear)}
    if precision == "int8":
        prefix = "bert.encoder.layer."
        return quantize_int8(model, {prefix + name for name in linears})
    if precision in AUTOCAST:
        for linear in linears.values():
            linear.to(AUTOCAST[precision])
        if packed and device.type == "cpu" and precision == "bf16" and packing_available():
            pack_layers(trunk)
    return model.eval()


def logits(model, inputs: dict, precision: str) -> torch.Tensor:
    """fp32 logits (B,): the trunk under autocast for bf16 / fp16, the head in fp32."""
    dtype = AUTOCAST.get(precision)
    device_type = inputs["input_ids"].device.type
    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
        x, bias = model.trunk(**inputs)
    return model.head(x.float(), bias)


def quantize_int8(model: nn.Module, names: set[str]) -> nn.Module:
    """Dynamic int8 quantization of the named Linears: int8 weights with one scale per output row, activations
    quantized at run time with one scale per call (fbgemm's dynamic Linear).

    torch.ao.quantization is deprecated in favour of the separate torchao package, which we do not depend on. Its
    fbgemm dynamic Linear rescales inside the GEMM, which a Linear built on torch._int_mm cannot (it was slower), so
    it is used with its deprecation notices silenced, and refused with a clear message once torch has removed it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        except ImportError:
            raise ValueError(f"dtype int8 needs torch.ao.quantization.quantize_dynamic, which torch {torch.__version__} "
                             "no longer has; use fp32 or bf16") from None
        # one weight scale per output row, not per matrix: int8 then ranks much closer to fp32 at the same speed
        return quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8)


# --------------------------------------------------------------------------------------------- CPU bf16 packing
# Under autocast a bf16 nn.Linear on the CPU casts its input, reorders its weight into oneDNN's blocked layout on every
# call, copies the bias into the output and runs GELU as a separate pass over the (T, 1536) activations. PackedLinear
# does the reorder once, and asks oneDNN for bias and exact-erf GELU in the matmul's own epilogue (computed on the fp32
# accumulator, rounded to bf16 once): the same math as F.gelu(F.linear(x, W, b)) in bf16.

def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


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
