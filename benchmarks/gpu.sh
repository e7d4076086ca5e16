#!/usr/bin/env bash
# The whole GPU part of the benchmarks in one command, on a machine with an NVIDIA GPU:
#
#     bash benchmarks/gpu.sh [OUT]            # OUT defaults to benchmarks/results-gpu
#
# 1. checks that CuPy sees a GPU (and says why not if it does not);
# 2. runs the whole test suite on the CuPy backend (DEQREF_BACKEND=cupy) -> OUT/pytest-cupy.log;
# 3. runs `python -m deqref.bench` (sections 1-5; section 4 = the same benchmarks on CuPy, CuPy
#    against NumPy at d = 2048, n = 1024, and deqref-on-CuPy against TorchDEQ on CUDA)
#    -> OUT/bench.json, OUT/bench.md, OUT/bench.log.
#
# It installs nothing, so it also runs on machines without a network. It needs, importable by
# $PYTHON (default python3): deqref's dependencies (numpy, scipy, matplotlib, array-api-compat,
# scikit-learn), pytest, hypothesis and array-api-strict (the test extra), a CuPy wheel that matches
# the CUDA driver (cupy-cuda12x or cupy-cuda13x), and for section 4d torch with CUDA and torchdeq
# (skipped, and the table says so, without them). deqref itself is imported from this checkout.
# pytest reads PYTEST_ADDOPTS: with pytest-xdist, PYTEST_ADDOPTS="-n 8" runs the suite on 8 workers
# (140 s on an H200 machine with 16 cores), each with its own CUDA context.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results-gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# JAX (the cross-check tests) takes 75 % of the GPU's memory per process by default, which leaves
# CuPy, and every other pytest worker, out of memory: allocate on demand instead
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

"$PYTHON" - <<'PY' || exit 1
import importlib, sys
missing = [m for m in ("numpy", "scipy", "matplotlib", "array_api_compat", "sklearn", "pytest",
                       "hypothesis", "array_api_strict", "cupy") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu.sh: missing Python packages {missing}; install them first (see the header)")
from deqref.backend import BackendError, _load
try:
    _load("cupy")
except BackendError as err:
    sys.exit(f"gpu.sh: {err}")
import cupy
p = cupy.cuda.runtime.getDeviceProperties(0)
print(f"gpu.sh: CuPy {cupy.__version__} on {p['name'].decode() if isinstance(p['name'], bytes) else p['name']}")
PY
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

echo "gpu.sh: the test suite on CuPy"
DEQREF_BACKEND=cupy "$PYTHON" -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-cupy.log"
rc_tests=${PIPESTATUS[0]}

echo "gpu.sh: the benchmarks (NumPy, TorchDEQ, CuPy)"
"$PYTHON" -m deqref.bench --out "$OUT" 2>&1 | tee "$OUT/bench.log"
rc_bench=${PIPESTATUS[0]}

echo "gpu.sh: tests exit $rc_tests, bench exit $rc_bench; results in $OUT/"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
