"""train.py as tests/test_fast_train.py starts it to count host syncs: under a dispatch mode that counts the ops that
make the host wait for a GPU's results when their tensors are on one: a read of a tensor's value into Python
(aten._local_scalar_dense: .item(), float(), int(), bool() of a tensor, indexing with a 0-dim tensor), ops whose output
size depends on the data (nonzero, masked_select, indexing or index_put_ with a boolean mask, repeat_interleave without
output_size), torch.equal, masked_fill with a tensor as the value (the CUDA kernel reads it with .item()), and every
call of Tensor.cpu(), .tolist() and .numpy() (copies to the host; on a CPU they dispatch nothing). Not seen: `.to("cpu")` of a tensor already on the CPU. The count is the last line on stderr.
fp16 is allowed on the CPU here (train.py refuses it there: emulated, slow) so that the GradScaler's path is counted too."""

import atexit
import runpy
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import minilm.precision  # noqa: E402

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
           aten.repeat_interleave.Tensor, aten.masked_fill.Tensor, aten.masked_fill_.Tensor}
MASK_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class CountSyncs(TorchDispatchMode):
    syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in SYNCING and kwargs.get("output_size") is None) or (func in MASK_INDEXED and any(
                i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])):
            CountSyncs.syncs += 1
        return func(*args, **kwargs)


def counted(method):
    def call(self, *args, **kwargs):
        CountSyncs.syncs += 1
        return method(self, *args, **kwargs)

    return call


for name in ("cpu", "tolist", "numpy"):
    setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
minilm.precision.check = lambda precision, *args, **kwargs: precision
atexit.register(lambda: print(f"host syncs: {CountSyncs.syncs}", file=sys.stderr))
sys.argv = [str(REPO / "train.py"), *sys.argv[1:]]
with CountSyncs():
    runpy.run_path(sys.argv[0], run_name="__main__")
