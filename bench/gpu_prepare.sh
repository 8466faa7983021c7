#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before bench/gpu.sh: fills the git-ignored folder .gpu/ that the device call
# carries, since the GPU machine reaches no network and ../shared does not travel (64 MiB at most):
#   .gpu/standin/   the stand-in checkpoint with fp16 weights (45 MB; minilm upcasts them to fp32 on load)
#   .gpu/tydi/      the first 6,000 TyDi-ru train rows (bench pairs, the CUDA tests) and the test rows of the first
#                   60 queries (bench/agreement.py)
#   .gpu/tydi-ranker/  runs/tydi-ranker (bench/tydi_ranker.py; built here if missing, ~8 min) as the tensors that
#                   differ from the stand-in's (the last layer and the head, 3.4 MB), in fp16 like the stand-in: gpu.sh
#                   puts together runs/tydi-ranker with every weight rounded to fp16 (the model whose fp32, fp16 and
#                   bf16 scores bench/agreement.py compares there)
#   .gpu/whl/       wheels the GPU image lacks: datasets (sentence-transformers' trainer needs it), dill, multiprocess;
#                   this set ran bench/train.py's trainer with sentence-transformers 6.0.1, transformers 5.17,
#                   accelerate 1.15 and huggingface_hub 1.33 (the GPU image's) on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/tydi .gpu/whl
python - <<'PY'
import json
import sys
sys.path.insert(0, "tests")
from safetensors.torch import load_file, save_file
from standin import build_standin
folder = build_standin(".gpu/standin")
state = {k: v.half() for k, v in load_file(folder / "model.safetensors").items()}
save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
# transformers 5 loads with dtype "auto": the config says fp32, so sentence-transformers' fp32 rows stay fp32
config = json.loads((folder / "config.json").read_text())
config.update(torch_dtype="float32", dtype="float32")
(folder / "config.json").write_text(json.dumps(config, indent=2))
PY
head -n 6000 ../shared/data/tydiqa_ru/train.jsonl > .gpu/tydi/train.jsonl
head -n 1200 ../shared/data/tydiqa_ru/test.jsonl > .gpu/tydi/test.jsonl  # 20 candidates per query
[ -f runs/tydi-ranker/model.safetensors ] || python bench/tydi_ranker.py --model .gpu/standin --output runs/tydi-ranker
python - <<'PY'
import shutil
from pathlib import Path
from safetensors.torch import load_file, save_file
standin = load_file(".gpu/standin/model.safetensors")
ranker = load_file("runs/tydi-ranker/model.safetensors")
assert standin.keys() == ranker.keys()
differs = {k: v.half() for k, v in ranker.items() if not v.half().equal(standin[k])}
shutil.copytree("runs/tydi-ranker", ".gpu/tydi-ranker", ignore=shutil.ignore_patterns("model.safetensors"))
save_file(differs, ".gpu/tydi-ranker/differs.safetensors", metadata={"format": "pt"})
print(f"tydi-ranker: {len(differs)} of {len(ranker)} tensors differ from the stand-in's")
PY
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"
du -sh .gpu
