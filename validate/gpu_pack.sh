#!/usr/bin/env bash
# Here, before a GPU session: pack into .gpu/ what the GPU image lacks for `memplan validate`, for
# validate/gpu_session.sh there (name ".gpu" in the run's carry). The image has torch 2.11+cu130,
# accelerate, typer, rich, nvidia-ml-py and transformers 5.17, but no pydantic and no bitsandbytes
# (/work/.library/device/KINDS.md); the versions packed are this venv's, i.e. pyproject.toml's pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
v() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
rm -rf .gpu && mkdir -p .gpu/whl .gpu/site
# the image's python3 is CPython 3.12 on x86-64: its wheels, not this machine's
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  "transformers==$(v transformers)" "peft==$(v peft)" "pydantic==$(v pydantic)" "pydantic-core==$(v pydantic-core)" \
  "annotated-types==$(v annotated-types)" "typing-inspection==$(v typing-inspection)"
# bitsandbytes ships one library per CUDA and ROCm version (125 MB installed, over the 64 MiB a run
# carries): its Python code and metadata, with the CPU library and the CUDA 13.0 one that the
# image's torch (cu130) makes it load (bitsandbytes/cextension.py picks by torch.version.cuda)
site=$("$PY" -c 'import bitsandbytes, os; print(os.path.dirname(os.path.dirname(bitsandbytes.__file__)))')
cp -r "$site/bitsandbytes" "$site/bitsandbytes-$(v bitsandbytes).dist-info" .gpu/site/
find .gpu/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete
find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu
