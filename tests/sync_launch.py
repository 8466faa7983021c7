"""train.py as tests/test_fast_train.py starts it to count host syncs: under a dispatch mode that counts the ops that
make the host wait for a GPU's results when their tensors are on one: a read of a tensor's value into Python
(aten._local_scalar_dense: .item(), float(), int(), bool() of a tensor, indexing with a 0-dim tensor) and the ops whose
output size depends on the data (nonzero, masked_select, indexing with a boolean mask). The count is the last line on
stderr. fp16 is allowed on the CPU here (train.py refuses it there: emulated, slow) so that the GradScaler's path is
counted too."""

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
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}


class CountSyncs(TorchDispatchMode):
    syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING or (func is aten.index.Tensor and any(
                i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])):
            CountSyncs.syncs += 1
        return func(*args, **(kwargs or {}))


minilm.precision.check = lambda precision, device: precision
atexit.register(lambda: print(f"host syncs: {CountSyncs.syncs}", file=sys.stderr))
sys.argv = [str(REPO / "train.py"), *sys.argv[1:]]
with CountSyncs():
    runpy.run_path(sys.argv[0], run_name="__main__")
