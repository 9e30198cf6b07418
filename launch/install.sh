#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv: torch, the package with its dev extra.
# Idempotent: a second run with the same pyproject.toml returns in about a second.
#   TORCH_SPEC   the torch requirement when .venv has no torch yet (default torch==2.13.0; on a GPU machine
#                pick the build that matches its CUDA, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...")
#   VENV         where the environment lives (default .venv in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.qwen2-dist-installed"
want=$(sha256sum pyproject.toml launch/install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

if ! "$py" -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options on purpose
    "$py" -m pip install --quiet $torch_spec
fi
# Keep the torch just installed: without this pin, dependencies that ask for an unpinned torch (via torchvision)
# make pip replace it with a multi-GB CUDA build.
torch_version=$("$py" -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$torch_version" > "$venv/torch-constraint.txt"
"$py" -m pip install --quiet -c "$venv/torch-constraint.txt" -e ".[dev]"
# mosaicml-streaming pulls torchvision, which we never use; PyPI's build fails to import next to a CPU torch
# ("operator torchvision::nms does not exist") and transformers then fails to import too. Remove it.
if "$py" -m pip show torchvision >/dev/null 2>&1 && ! "$py" -c "import torchvision" 2>/dev/null; then
    "$py" -m pip uninstall --quiet -y torchvision
fi
"$py" -c "import qwen2_dist.data.streaming_compat as s, transformers; s.import_streaming()"
echo "$want" > "$stamp"
echo "environment ready: $venv (torch $torch_version)"
