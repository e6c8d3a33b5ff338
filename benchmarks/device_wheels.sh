#!/bin/bash
# The packages rtsr needs that the lent GPU machine's image lacks, as wheels in .whl/ for the
# device tool's `carry` (that machine has no network; its python3 is 3.12: ../.library/device/
# KINDS.md lists what it has: torch, numpy, scipy, numba, onnxruntime, onnx, safetensors, tqdm,
# pytest, but not soundfile, its cffi and pycparser, or pyzmq; PyAV is imported only to decode
# files libsndfile cannot, which no device check does).
#   bash benchmarks/device_wheels.sh                # -> .whl/ (git-ignored), for Python 3.12
#   PY=3.11 WHEELS=/tmp/wh bash benchmarks/device_wheels.sh   # the same for a local dry run
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PY:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "${WHEELS:-.whl}" soundfile==0.14.0 cffi==2.0.0 pycparser==3.0 pyzmq==27.3.0
ls -la "${WHEELS:-.whl}"
