#!/bin/bash
# The one prepared run on a lent GPU machine: the CUDA tests, then gpu_check, logs into $OUT.
#   bash benchmarks/device_wheels.sh     # here, once: .whl/ (the packages its image lacks)
#   device tool: run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=600)
#   OUT=/tmp/out WHEELS=/tmp/wh bash benchmarks/device_check.sh --device cpu --quick   # a dry run here
# Installs the wheels (--target /tmp/site, no index: no network there) and rtsr itself (editable,
# no build isolation: setuptools is in the image; if that fails, or INSTALL=copy, the package is
# assembled in /tmp/site as pyproject.toml maps its folders, and Python runs with -P so that the
# checkout's rtsr/ does not shadow it), checks that everything the run imports imports, then runs
# the tests that need CUDA (skipped without it) and benchmarks/gpu_check.py (extra arguments go
# to it). Exit status: gpu_check's, or 3 / 5 when the set-up failed (said on stderr).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/device_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "${WHEELS:-.whl}"/*.whl || { echo "device_check: the wheels did not install" >&2; exit 3; }
export PYTHONPATH=/tmp/site:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
py=(python3)
if [ "${INSTALL:-editable}" = copy ] || ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
  echo "device_check: rtsr assembled in /tmp/site (not installed by pip)" >&2
  rm -rf /tmp/site/rtsr && cp -r rtsr /tmp/site/rtsr
  for folder in kernels models training; do cp -r "$folder" "/tmp/site/rtsr/$folder"; done
  py=(python3 -P)
fi
"${py[@]}" -c "import rtsr.kernels.intake, rtsr.serve, rtsr.bench, rtsr.graphs, torch; print('rtsr from',
rtsr.__file__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  || { echo "device_check: an import failed" >&2; exit 5; }
# the graphs and the bank first (quick), then compile's and auto's (their first compiles take a while)
timeout 75 "${py[@]}" -m pytest -q -p no:cacheprovider -k "cuda and not compile and not auto" tests/test_bank.py \
  tests/test_backends.py 2>&1 | tee "$out/cuda_tests.txt" | tail -15
timeout 90 "${py[@]}" -m pytest -q -p no:cacheprovider -k "cuda and (compile or auto)" tests/test_backends.py 2>&1 \
  | tee -a "$out/cuda_tests.txt" | tail -15
timeout 400 "${py[@]}" benchmarks/gpu_check.py "$@" 2>&1 | tee "$out/gpu_check.txt"
exit "${PIPESTATUS[0]}"
