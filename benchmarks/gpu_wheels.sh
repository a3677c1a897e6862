#!/usr/bin/env bash
# Download, here, the wheels that a bare GPU machine needs to run benchmarks/run_all.sh, into .whl/ (git-ignored).
#
#   bash benchmarks/gpu_wheels.sh [DIR]      # default DIR: .whl
#
# The GPU machine's image has Python 3.12 with torch, torchvision, transformers, lightning, torchmetrics, scipy,
# opencv and safetensors, but not the packages below, and nothing can be fetched there. The versions are those this
# project is tested with (timm is carried too: DINOv3 needs timm >= 1.0.20). Install them there with
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$dir" albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16 pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hydra-core==1.3.8 omegaconf==2.3.1 \
    pycocotools==2.0.11 segmentation_models_pytorch==0.6.0 timm==1.0.31
"$python" -m pip wheel -q --no-deps -w "$dir" antlr4-python3-runtime==4.9.3  # published as a source archive only
ls "$dir"
du -sh "$dir"
