#!/usr/bin/env bash
# Every GPU check and benchmark, in one call on the GPU machine (about 6-8 minutes on one H100):
#   bash bench/gpu_prepare.sh                      # here, first: fills .gpu/ (see there)
#   device run, carry [".gpu"]: bash bench/gpu.sh  # results as markdown + JSON under $OUT (or runs/gpu)
# It runs: the CUDA tests (tests/test_cuda.py); train.py's fast and exact loops and the sentence-transformers trainer,
# fp16, batch 16, card-like pairs (bench/train.py); scoring speed of minilm fp32/fp16/bf16 against
# sentence-transformers fp32/fp16 (bench/predict.py); infer.py's file mode with and without tokenizing ahead
# (bench/infer_file.py); fp16/bf16 against fp32 on the TyDi-ru ranker (bench/agreement.py). A failing part is
# reported and the rest still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MINILM_STANDIN=$PWD/.gpu/standin MINILM_TYDI=$PWD/.gpu/tydi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
  && export PYTHONPATH=/tmp/site
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, sentence_transformers as st; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| sentence-transformers', st.__version__)"
} 2>&1 | tee "$OUT/versions.txt"
status=0
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.txt" || status=1
python3 bench/train.py --device cuda --model .gpu/standin --steps 2000 --log-every 500 --only fast,trainer \
  --json "$OUT/train.json" 2>&1 | tee "$OUT/train.md" || status=1
python3 bench/train.py --device cuda --model .gpu/standin --steps 400 --log-every 100 --only exact,fast \
  --json "$OUT/train_exact.json" 2>&1 | tee "$OUT/train_exact.md" || status=1
python3 bench/predict.py --device cuda --model .gpu/standin --pairs 4096 --batch-size 128 --rounds 3 --svg "$OUT/predict.svg" 2>&1 \
  | tee "$OUT/predict.md" || status=1
python3 bench/infer_file.py --device cuda --dtype fp16 --model .gpu/standin --pairs 16384 --batch-size 128 --rounds 2 2>&1 \
  | tee "$OUT/infer_file.md" || status=1
python3 - <<'PY' || status=1  # runs/tydi-ranker again: the stand-in's tensors and the ranker's own (bench/gpu_prepare.sh)
import shutil
from safetensors.torch import load_file, save_file
shutil.copytree(".gpu/tydi-ranker", "/tmp/tydi-ranker", ignore=shutil.ignore_patterns("differs.safetensors"), dirs_exist_ok=True)
state = load_file(".gpu/standin/model.safetensors") | load_file(".gpu/tydi-ranker/differs.safetensors")
save_file(state, "/tmp/tydi-ranker/model.safetensors", metadata={"format": "pt"})
PY
python3 bench/agreement.py --device cuda --model /tmp/tydi-ranker 2>&1 | tee "$OUT/agreement.md" || status=1
exit $status
