#!/usr/bin/env bash
# Training on a lent GPU machine (see training/README.md): the working tree arrives with packed
# training audio under .gpu/ (made by `python -m rtsr.training.corpus pack`), nothing can be
# installed from the network there, and everything under $OUT comes back.
#   bash training/lease_train.sh stage DIR   # copy packed audio DIR into /tmp/data (first call)
#   bash training/lease_train.sh train DIR J,D,S   # add DIR, then train joint/distill/speech for J,D,S s
set -euo pipefail
mode=$1; src=$2
mkdir -p /tmp/data
cp -r "$src"/. /tmp/data/
{ cat "$src"/manifest.jsonl; echo; } >> /tmp/data/all.jsonl
[ "$mode" = stage ] && { du -sh /tmp/data; exit 0; }
budgets=${3:-240,110,90}
# wheels the GPU image lacks (soundfile and its cffi), carried in .whl/ (README.md of the device tool)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site
# the installed layout without an install: rtsr/, with kernels/, models/ and training/ as its subpackages
rm -rf /tmp/rtsr && mkdir -p /tmp/rtsr && cp -r rtsr /tmp/rtsr/rtsr
cp -r kernels /tmp/rtsr/rtsr/kernels && cp -r models /tmp/rtsr/rtsr/models && cp -r training /tmp/rtsr/rtsr/training
export PYTHONPATH=/tmp/site:/tmp/rtsr
cp /tmp/data/all.jsonl /tmp/data/manifest.jsonl
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no GPU"; } | tee "$OUT/gpu.txt"
cd /tmp && PYTHONUNBUFFERED=1 python3 -m rtsr.training.train --data /tmp/data --out /tmp/run \
  --stages joint,distill,speech --budgets "$budgets" --batch "${BATCH:-64}" --frames "${FRAMES:-256}" --lr 1e-3 \
  --log-every 200 --ckpt-s 60 --slim-dir "$OUT" 2>&1 | grep -v Warning | tee "$OUT/train.log" | tail -40
