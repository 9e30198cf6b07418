#!/usr/bin/env bash
# Rehearse on a CPU machine with the versions of the GPU image (torch 2.11.0+cu130, transformers 5.17.0: see
# /work/.library/device), so that a session's few GPU minutes are not spent finding a version mismatch. The CI runs
# torch 2.13 and transformers 4.57; code that passes there has failed under the image's versions before (RoPE's theta
# read from transformers 5's config, Inductor's CPU code generator under torch 2.11: BENCHMARKS.md).
#
#   bash benchmarks/rehearse_gpu_versions.sh                  # every check below
#   bash benchmarks/rehearse_gpu_versions.sh tests/unit/test_loss.py tests/dist   # the checks, with only these tests
#   SKIP_TESTS=1 bash benchmarks/rehearse_gpu_versions.sh     # the checks without the test suite
#
# 1. A venv of its own (VENV, default /tmp/qwen2-dist-gpu-versions; about 5.4 GB: PyPI's torch 2.11.0 is the CUDA
#    build with its CUDA libraries, and it runs on a CPU), made once and reused: torch and transformers at the image's
#    versions, the project's other dependencies, mosaicml-streaming without its own (it asks for transformers < 5),
#    and this repository installed editable without dependencies (the tests' subprocesses import qwen2_dist).
# 2. The test suite (or the paths given) with that venv: the GPU-only tests skip themselves.
# 3. gpu_check.sh's Qwen2-1.5B step as it runs on a GPU -- compiled, ours with the baselines and every variant row of
#    one process (the combined row without fp32 weight gradients, which need CUDA) -- on the tiny size at seq 128:
#    every row must be ok, and each variant's losses those of the default
#    row (same weights and batches; q/k/v as one matmul sums in another order: within 1e-3).
# 4. benchmarks/loss_parity.py compiled, as on a GPU (the dry run below runs it eagerly): 3 steps of the tiny size,
#    with the overlap curve.
# 5. The dry run of gpu_check.sh with that venv.
# Exit code 1 when a check failed; each one's output is under OUT (default /tmp/rehearse_gpu_versions).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/qwen2-dist-gpu-versions}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-5.17.0}
OUT=${OUT:-/tmp/rehearse_gpu_versions}
py=$VENV/bin/python
mkdir -p "$OUT"

stamp=$VENV/.rehearsal-ready
want="torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION $(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    echo "== making $VENV ($want)"
    [[ -x $py ]] || python3 -m venv "$VENV"
    echo "torch==$TORCH_VERSION" > "$VENV/constraint.txt"
    pip=("$py" -m pip install --quiet -c "$VENV/constraint.txt")
    "${pip[@]}" "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION"
    # The project's dependencies and dev tools, as pyproject.toml lists them, except the two pinned above and
    # mosaicml-streaming, whose own dependencies are installed below without its transformers < 5.
    deps=$("$py" - <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
skip = ("torch", "transformers", "mosaicml-streaming")
wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
print("\n".join(d for d in wanted if not d.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() in skip))
EOF
)
    mapfile -t deps <<< "$deps"
    "${pip[@]}" "${deps[@]}" boto3 Brotli catalogue python-snappy xxhash zstd paramiko
    "${pip[@]}" --no-deps mosaicml-streaming
    "${pip[@]}" --no-deps -e .
    "$py" -m pip uninstall --quiet -y torchvision 2> /dev/null || true
    "$py" -c "import qwen2_dist.data.streaming_compat as s; s.import_streaming()"
    echo "$want" > "$stamp"
fi
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

FAILED=0
check() {  # check NAME COMMAND...: run it, its output in $OUT/NAME.log, one line of outcome
    local name=$1 started=$SECONDS rc=0
    shift
    "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    if ((rc == 0)); then
        echo "$name: ok ($((SECONDS - started)) s)"
    else
        echo "$name: FAILED (exit $rc, $((SECONDS - started)) s; $OUT/$name.log)"
        tail -n 15 "$OUT/$name.log"
        FAILED=1
    fi
}

if [[ ${SKIP_TESTS:-0} != 1 ]]; then
    paths=("$@")
    ((${#paths[@]})) || paths=(tests)
    check tests "$py" -m pytest -q -p no:cacheprovider "${paths[@]}"
    tail -n 1 "$OUT/tests.log"
fi

# shellcheck disable=SC2317  # run through check
compare_rows() {
    "$py" benchmarks/throughput.py --size tiny --seq-len 128 --warmup 1 --steps 2 --micro-batch 2 \
        --ours parallel.compile=true --baseline hf:2 \
        --variant "overlap+chunk_16384:optim.overlap=true model.loss_chunk_tokens=16384" \
        --variant overlap:optim.overlap=true --variant loss_chunk_16384:model.loss_chunk_tokens=16384 --variant fuse_qkv:model.fuse_projections=qkv \
        --variant full_recompute:parallel.activation_checkpointing=full \
        --variant default_again:parallel.compile=true --json "$OUT/compiled_rows.json"
    "$py" - "$OUT/compiled_rows.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
ours = rows[0]
bad = [r for r in rows if r["status"] != "ok"]
for row in rows[2:] if ours["status"] == "ok" else []:
    tolerance = 1e-3 if row["variant"] == "fuse_qkv" else 0.0
    if row["status"] == "ok" and any(abs(row[k] - ours[k]) > tolerance for k in ("first_loss", "last_loss")):
        bad.append(row)
for row in rows:
    print(row["name"], row.get("variant") or "", row["status"], row.get("first_loss"), row.get("last_loss"))
sys.exit(f"rows not ok or off the default row's losses: {[(r['name'], r.get('variant')) for r in bad]}" if bad else 0)
EOF
}
check compiled_rows compare_rows
check loss_parity_compiled "$py" benchmarks/loss_parity.py --size tiny --steps 3 --overlap \
    --out "$OUT/loss_parity.json"
check gpu_check_dry_run env DRY_RUN=1 PYTHON="$py" OUT="$OUT/gpu_check" bash benchmarks/gpu_check.sh
exit $FAILED
