#!/usr/bin/env bash
# Download into .whl/ the wheels that benchmarks/gpu_check.sh installs on a GPU machine without network access.
#
#   bash benchmarks/fetch_wheels.sh        # on a machine with the package index, before the GPU check
#
# The GPU image has python3 with torch, transformers (and so numpy, safetensors, PyYAML, packaging, regex, tqdm) and
# triton; this adds Liger-Kernel, torchao (float8 training is Python over torch._scaled_mm), what qwen2_dist imports on the benchmark path (hydra-core, omegaconf with its
# antlr4 runtime, tiktoken, zstandard) and pytest, all without dependencies. Binary wheels are for CPython
# PY_VERSION (3.12) on x86_64 Linux; versions are those of the project's CI (liger-kernel 0.8.5 is built for
# transformers 5). .whl/ is git-ignored: pass it in the device run's carry list.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
PY_VERSION=${PY_VERSION:-3.12}
# Into a fresh directory, which then replaces .whl/: wheels of an older pin left beside the new ones would make
# the GPU check's offline install of all of them fail (two versions of one package); a failed download leaves the
# old .whl/ as it was.
fresh=$(mktemp -d .whl.new-XXXXXX)
trap 'rm -rf "$fresh"' EXIT
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$fresh" \
    --python-version "$PY_VERSION" --implementation cp --abi "cp${PY_VERSION/./}" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any \
    liger-kernel==0.8.5 torchao==0.18.0 hydra-core==1.3.8 omegaconf==2.3.1 tiktoken==0.14.0 zstandard==0.25.0 regex==2026.11.19 \
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
# antlr4-python3-runtime 4.9.3 (pinned by omegaconf 2.3) is published as a source archive only: build its wheel.
"$PYTHON" -m pip wheel -q --no-deps -w "$fresh" antlr4-python3-runtime==4.9.3
rm -rf .whl
mv "$fresh" .whl
ls -l .whl
