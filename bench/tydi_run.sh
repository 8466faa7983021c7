#!/usr/bin/env bash
# A short real CPU fine-tune on TyDi-ru, both train.py loops: base stand-in, 200 steps of 16, max_length 160, the
# test set evaluated at the end; then their losses, MRR@10 and loss curves side by side (docs/training.md).
# WITH_ST=1 adds the sentence-transformers trainer (needs the reference extra; the exact loop reproduces it bit for bit).
set -euxo pipefail
cd "$(dirname "$0")/.."
D=../shared/data/tydiqa_ru
python -c "import sys; sys.path.insert(0, 'tests'); from standin import build_standin; build_standin('runs/standin')"
python -m minilm.evaluate --model runs/standin --data $D/test.jsonl --max-length 160 --device cpu
for loop in exact fast; do
  time python train.py --model runs/standin --train $D/train.jsonl --eval $D/test.jsonl --output runs/tydi-$loop \
      --max-steps 200 --max-length 160 --log-every 25 --device cpu --overwrite-output true \
      --exact $([ $loop = exact ] && echo true || echo false)
done
python bench/compare_runs.py runs/tydi-exact runs/tydi-fast --svg docs/loss_tydi_exact_vs_fast.svg
if [ "${WITH_ST:-0}" = 1 ]; then
  time ${REFERENCE_PYTHON:-python} bench/tydi_st_train.py
  cmp runs/tydi-exact/model.safetensors runs/tydi-st/model.safetensors && echo "exact loop and trainer: byte-identical weights"
fi
