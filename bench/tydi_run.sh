#!/usr/bin/env bash
# A short real CPU fine-tune on TyDi-ru: base stand-in, train.py and the ST trainer, 200 steps each, max_length 160.
set -x
cd "$(dirname "$0")/.."
D=../shared/data/tydiqa_ru
python -c "import sys; sys.path.insert(0, 'tests'); from standin import build_standin; build_standin('runs/standin')"
time python -m minilm.evaluate --model runs/standin --data $D/test.jsonl --max-length 160 --device cpu
time python train.py --model runs/standin --train $D/train.jsonl --eval $D/test.jsonl --output runs/tydi-minilm \
    --max-steps 200 --max-length 160 --log-every 25 --device cpu
time ${REFERENCE_PYTHON:-python} bench/tydi_st_train.py   # needs the reference extra (sentence-transformers 5.1.0)
time python -m minilm.evaluate --model runs/tydi-st --data $D/test.jsonl --max-length 160 --device cpu
cmp runs/tydi-minilm/model.safetensors runs/tydi-st/model.safetensors && echo "final weights byte-identical"
