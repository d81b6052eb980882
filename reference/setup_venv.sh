#!/usr/bin/env bash
# Create reference/.venv: the independent Python reference (PyTorch + transformers, gguf,
# llama-cpp-python) used to produce fixtures/ and speed baselines. Idempotent: a venv that already
# imports every package at the pinned versions is left alone.
#
#   bash reference/setup_venv.sh          # create / complete the venv
#   bash reference/setup_venv.sh --force  # delete and recreate it
#
# Versions are pinned in reference/requirements.txt (accelerate: transformers needs it to load a GGUF). torch comes from the default index (a CUDA
# build of ~5.6 GB that runs on CPU; ~2.5 min to install). llama-cpp-python has no wheel for this
# platform on the default index and is compiled from source (~5 min on 2 cores; needs gcc/g++,
# cmake comes in as a build dependency), with the llama.cpp it bundles built portable
# (CMAKE_ARGS=-DGGML_NATIVE=OFF, below: no -march=native) and CMAKE_BUILD_PARALLEL_LEVEL=2.
# Its server extras (uvicorn, fastapi, sse-starlette, starlette-context, pydantic-settings,
# PyYAML: `python -m llama_cpp.server`, the llama.cpp column of scripts/bench_serve.py) are pinned
# in requirements.txt too; on a venv that has llama-cpp-python already they install in seconds
# without rebuilding it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
req="$here/requirements.txt"
py="$venv/bin/python"

log() { printf '[setup_venv] %s\n' "$*"; }
die() { printf '[setup_venv] ERROR: %s\n' "$*" >&2; exit 1; }

if [[ "${1:-}" == "--force" ]]; then
    log "removing $venv"
    rm -rf "$venv"
fi

# Checks that every pinned requirement is installed at its pinned version.
venv_complete() {
    [[ -x "$py" ]] || return 1
    "$py" - "$req" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
ok = True
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, _, want = line.partition("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != want:
        ok = False
sys.exit(0 if ok else 1)
EOF
}

if venv_complete; then
    log "$venv is complete (all pins in requirements.txt satisfied); nothing to do"
    exit 0
fi

command -v python3 >/dev/null || die "python3 not found"
command -v gcc >/dev/null && command -v g++ >/dev/null || {
    log "installing a C/C++ compiler (needed to build llama-cpp-python)"
    apt-get update -qq && apt-get install -y -qq build-essential || die "could not install build-essential"
}

if [[ ! -x "$py" ]]; then
    log "creating $venv"
    python3 -m venv "$venv" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
fi
"$py" -m pip install -q --upgrade pip wheel setuptools || die "could not upgrade pip in the venv"

t0=$(date +%s)
log "installing torch (large CUDA build, runs on CPU) and the rest of requirements.txt"
# torch first so a failure is easy to attribute; llama-cpp-python compiles with 2 jobs.
grep -E '^torch==' "$req" >/dev/null || die "requirements.txt has no torch pin"
"$py" -m pip install "$(grep -E '^torch==' "$req")" || die "pip install torch failed"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
# llama.cpp's default CPU build uses -march=native, which faults (illegal instruction) on some
# Intel Xeon machines with AMX; build it portable unless the caller passes its own CMAKE_ARGS.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
"$py" -m pip install -r "$req" || die "pip install -r $req failed"
log "installed in $(( $(date +%s) - t0 )) s"

venv_complete || die "venv still does not satisfy $req after install"
"$py" - <<'EOF'
from importlib.metadata import version
import torch, transformers, accelerate, gguf, numpy, safetensors, llama_cpp  # noqa: F401  (all import)
import llama_cpp.server.app  # noqa: F401  (the [server] extras are complete)
print("[setup_venv] ok:", ", ".join(f"{p} {version(p)}" for p in
      ("torch", "transformers", "gguf", "llama_cpp_python", "numpy", "safetensors")))
EOF
