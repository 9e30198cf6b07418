#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv: torch, the package with its dev extra.
# Idempotent: a second run with the same pyproject.toml and TORCH_SPEC returns in about a second.
#   TORCH_SPEC   the torch requirement (default torch==2.13.0; on a GPU machine pick the build that matches its
#                CUDA, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."). .venv remembers the spec its torch came
#                from: a run with another TORCH_SPEC reinstalls torch, a run without TORCH_SPEC keeps that torch
#   VENV         where the environment lives (default .venv in the repository; a relative path is taken from the
#                current directory). The launchers use it when VENV is set for them too (or PYTHON=$VENV/bin/python)
#   PYTHON3      the Python (3.10 or newer) that creates the environment (default python3 on PATH; a relative path
#                is taken from the current directory)
#   INSTALLER    uv (default) or pip: what installs the dependencies once torch is in. uv carries pip's configuration
#                over (qwen2_dist/uv_install.py) and leaves the work to pip where it cannot
set -euo pipefail
installer=${INSTALLER:-uv}
if [ "$installer" != uv ] && [ "$installer" != pip ]; then
    echo "error: INSTALLER=$installer: must be uv or pip (what installs the dependencies; default uv)" >&2
    exit 2
fi
venv=${VENV:-}
if [ -n "$venv" ] && [ "${venv#/}" = "$venv" ]; then
    venv=$PWD/$venv
fi
# A PYTHON3 given by a relative path (./py, bin/python3.12) is taken from the current directory too; a bare name
# (python3.12) is looked up on PATH.
if [[ ${PYTHON3:-} == */* ]] && [ "${PYTHON3#/}" = "$PYTHON3" ]; then
    PYTHON3=$PWD/$PYTHON3
fi
cd "$(dirname "$0")/.."
venv=${venv:-.venv}
py="$venv/bin/python"
stamp="$venv/.qwen2-dist-installed"
spec_file="$venv/torch-spec.txt"  # the TORCH_SPEC the installed torch came from
installed_spec=$(cat "$spec_file" 2>/dev/null || true)
# Without TORCH_SPEC, a torch that must be installed again (gone after a run stopped part way) is the recorded one.
torch_spec=${TORCH_SPEC:-${installed_spec:-torch==2.13.0}}
stamped=$(cat "$stamp" 2>/dev/null || true)
want=$(sha256sum pyproject.toml launch/install.sh | sha256sum | cut -c1-16)
# Nothing to do when the last run finished with these files and TORCH_SPEC is unset or the one torch came from.
if [ -x "$py" ] && [ "$stamped" = "$want" ] && [ "${TORCH_SPEC:-$installed_spec}" = "$installed_spec" ]; then
    exit 0
fi
# Not done until the end: a run stopped part way (a failed download between torch's uninstall and install) must not
# leave the stamp that makes the next run do nothing.
rm -f "$stamp"

# No venv yet, or one whose creation stopped part way (without pip: e.g. Debian without python3-venv, where
# ensurepip fails after bin/python exists). venv sets up an existing directory again and adds pip to it.
if ! "$py" -m pip --version >/dev/null 2>&1; then
    python3=${PYTHON3:-python3}
    # Checked first: with an older Python, the first error would be pip's "No matching distribution found for torch".
    version=$("$python3" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
    if ! [[ $version =~ ^([0-9]+)\.([0-9]+)$ ]]; then
        echo "error: PYTHON3=$python3: not found or does not run; set PYTHON3 to a Python 3.10 or newer" \
            "(e.g. PYTHON3=python3.12 bash launch/install.sh)" >&2
        exit 2
    fi
    if [ "${BASH_REMATCH[1]}" -lt 3 ] || { [ "${BASH_REMATCH[1]}" = 3 ] && [ "${BASH_REMATCH[2]}" -lt 10 ]; }; then
        echo "error: PYTHON3=$python3 is Python $version; qwen2-dist needs 3.10 or newer (pyproject.toml," \
            "requires-python): set PYTHON3 to a newer one (e.g. PYTHON3=python3.12 bash launch/install.sh)" >&2
        exit 2
    fi
    # A venv without a working pip that is there already (made part way; its Python gone, or another than PYTHON3):
    # made again from scratch. Made over as it is, it kept its bin/python links, so a Python that was removed stayed
    # missing and an old one stayed, the version check above bypassed. Only a venv (pyvenv.cfg) is cleared.
    clear=()
    if [ -f "$venv/pyvenv.cfg" ]; then
        echo "note: $venv has no working pip (made part way, or its Python is gone): making it again with $python3"
        clear=(--clear)
    fi
    "$python3" -m venv ${clear[@]+"${clear[@]}"} "$venv"
    # The pip a new venv brings is the Python's own (23.2 with 3.11), which took much longer over this install than
    # a current one when pip installed everything (on a 2-core machine on 2026-12-06: 139-156 s with pip 23.2,
    # 102-114 s with pip 26.3 and its 2 s upgrade); it now installs uv, what uv cannot, and reads pip's settings for
    # uv (qwen2_dist/uv_install.py). Only in a venv made here; where the upgrade fails (no index), the bundled pip
    # goes on.
    "$py" -m pip install --quiet --upgrade "pip>=25" ||
        echo "warning: could not upgrade pip in $venv; installing with $("$py" -m pip --version)" >&2
fi

install_torch() {
    # With uv where it can (the CPU wheel from a local directory: 5-11 s on a 2-core machine on 2026-12-07, pip 21 s),
    # else pip; compiled to bytecode below.
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options on purpose
    if [ "$installer" != uv ] || ! "$py" -I qwen2_dist/uv_install.py --quiet $torch_spec; then
        [ "$installer" != uv ] || echo "warning: uv did not install $torch_spec; installing it with pip" >&2
        # shellcheck disable=SC2086
        "$py" -m pip install --quiet $torch_spec --no-compile
    fi
    echo "$torch_spec" > "$spec_file"
}
if ! "$py" -c "import torch" 2>/dev/null; then
    install_torch
elif [ -n "${TORCH_SPEC:-}" ] && [ "$TORCH_SPEC" != "$installed_spec" ]; then
    echo "TORCH_SPEC changed (was: ${installed_spec:-not recorded}): reinstalling torch as $TORCH_SPEC"
    # Uninstalled first: the same version from another index (another CUDA) would count as installed already.
    "$py" -m pip uninstall --quiet -y torch
    install_torch
fi
# Keep the torch just installed: without this pin, dependencies that ask for an unpinned torch (via torchvision)
# make the installer replace it with a multi-GB CUDA build.
torch_version=$("$py" -c "import importlib.metadata as m; print(m.version('torch').split('+')[0])")
echo "torch==$torch_version" > "$venv/torch-constraint.txt"
# Compiled to bytecode here, on every core (pip would compile each file it installs, one at a time; uv compiles
# nothing): the .pyc files an interpreter under PYTHONDONTWRITEBYTECODE=1 cannot write itself (torch and the CLIs then
# import in 16 s, not 5). A file that does not compile is no error, as under pip. What is installed now (torch and its
# dependencies, a third of the files) while the dependencies are fetched, the rest after them (on a 2-core machine on
# 2026-12-07: 58 s of compiling after the dependencies, then 9 s of waiting for the first pass and 40 s). A file the
# first pass compiled stays compiled (compileall and imports check each .pyc against its source's size and time).
purelib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mapfile -t present < <(find "$purelib" -mindepth 1 -maxdepth 1 -type d ! -name oci)
"$py" -m compileall -qq -j 0 "${present[@]}" > /dev/null 2>&1 &
compile_pid=$!
deps=(--quiet -c "$venv/torch-constraint.txt" -e ".[dev]")
case $installer in
    # uv fetches and unpacks the ~130 packages in parallel: 14 s on a 2-core machine (2026-12-07), pip 50 s.
    uv) "$py" -I qwen2_dist/uv_install.py "${deps[@]}" || {
            echo "warning: uv did not install the dependencies; installing them with pip" >&2
            "$py" -m pip install "${deps[@]}" --no-compile
        } ;;
    pip) "$py" -m pip install "${deps[@]}" --no-compile ;;
esac
wait "$compile_pid" || true
# Not oci, the Oracle Cloud SDK mosaicml-streaming requires: 18,000 of the 33,000 files, 33 s of a 76 s compile on 2
# cores; only what an oci:// source imports of it is compiled, by importing that with bytecode written. Nor the
# models of transformers other than Qwen2 (and its auto classes): 45 of the 240 MB of source left, none of it ever
# imported here (transformers imports a model's files when the model is asked for).
"$py" -m compileall -qq -j 0 -x '/site-packages/(oci/|transformers/models/(?!auto/|qwen2/)[^/]+/)' "$purelib" \
    > /dev/null || true
env -u PYTHONDONTWRITEBYTECODE "$py" -c "import oci.object_storage" 2>/dev/null || true
# mosaicml-streaming pulls torchvision, which we never use; PyPI's build fails to import next to a CPU torch
# ("operator torchvision::nms does not exist") and transformers then fails to import too. Remove it.
if "$py" -m pip show torchvision >/dev/null 2>&1 && ! "$py" -c "import torchvision" 2>/dev/null; then
    "$py" -m pip uninstall --quiet -y torchvision
fi
"$py" -c "import qwen2_dist.data.streaming_compat as s, transformers; s.import_streaming()"
echo "$want" > "$stamp"
echo "environment ready: $venv (torch $torch_version)"
