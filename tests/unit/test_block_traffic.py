"""benchmarks/block_traffic.py: the bytes Inductor counts for a compiled tiny block, split into a part per token and a
fixed part, checked against what the block's kernels must move (compiled on the CPU, in this process)."""

import json
import math

import pytest

from benchmarks import block_traffic
from qwen2_dist.model.args import get_model_args

TINY = ["--size", "tiny", "--probe-tokens", "16,32", "--step-tokens", "64"]


def traffic(path, *ours: str) -> dict:
    assert block_traffic.main([*TINY, *(arg for o in ours for arg in ("--ours", o)), "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    return traffic(tmp_path_factory.mktemp("traffic") / "default.json")


def test_each_kernel_groups_bytes_split_into_per_token_and_weights(default):
    args = get_model_args("tiny")
    rows = default["rows"]

    def group(phase, test):
        (row,) = [r for r in rows if r["pass"] == phase and not r["extern"] and test(r["computes"])]
        return row

    # SwiGLU in bf16: forward reads gate and up and writes their product, 6 bytes an intermediate element; backward
    # reads both and the product's gradient and writes two gradients, 10. Nothing of it depends on the weights.
    inter = args.intermediate_size
    forward, backward = (group(p, lambda c: "exp" in c) for p in ("forward", "backward"))
    assert (forward["bytes_per_token"], forward["fixed_bytes"]) == (6 * inter, 0)
    assert (backward["bytes_per_token"], backward["fixed_bytes"]) == (10 * inter, 0)
    # The weight gradients' conversions, bf16 product to fp32 gradient (read 2 bytes, write 4), one per matrix: a
    # fixed part only, 6 bytes a weight.
    q, kv, mlp = args.hidden_size ** 2, args.num_key_value_heads * args.head_dim * args.hidden_size, \
        inter * args.hidden_size
    matrices = 2 * q + 2 * kv + 3 * mlp  # q, o; k, v; gate, up, down
    conversions = group("backward", lambda c: c == "convert_element_type")
    assert conversions["kernels"] == 7
    assert (conversions["bytes_per_token"], conversions["fixed_bytes"]) == (0, 6 * matrices)
    # Forward casts every weight matrix and q/k/v bias to bf16 (6 bytes each), in two groups of kernels.
    casts = [r for r in rows if r["pass"] == "forward" and r["computes"].startswith("convert_element_type")]
    biases = args.hidden_size + 2 * args.num_key_value_heads * args.head_dim
    assert sum(r["fixed_bytes"] for r in casts) == 6 * (matrices + biases)

    step = args.num_hidden_layers * (64 * forward["bytes_per_token"] + forward["fixed_bytes"]) / 1e9
    # GB / (3 TB/s) in ms: GB / 3.0
    assert math.isclose(forward["gb_per_step"], step) and math.isclose(forward["ms_per_step"], step / 3.0)
    generated = [r for r in rows if not r["extern"]]
    assert default["totals"]["generated"]["bytes_per_token"] == sum(r["bytes_per_token"] for r in generated)


def test_fused_projections_cast_each_weight_once_as_separate_ones_do(default, tmp_path, capsys):
    """model.fuse_projections=true under autocast: the concatenated weights cost what the separate casts cost, no
    fp32 copy of them (kernels.fused_linear casts, then concatenates)."""
    fused = traffic(tmp_path / "fused.json", "model.fuse_projections=true")
    assert fused["overrides"][-1] == "model.fuse_projections=true"
    assert "model=tiny parallel.compile=true model.fuse_projections=true: 2 blocks" in capsys.readouterr().out
    # q/k/v one matmul instead of three, gate/up one instead of two: 3 fewer in forward, 6 in backward.
    assert (default["totals"]["extern"]["kernels"], fused["totals"]["extern"]["kernels"]) == (28, 19)
    # The weights' casts cost the same; the q/k/v biases are concatenated after their cast (4 bytes each at most).
    args = get_model_args("tiny")
    biases = args.hidden_size + 2 * args.num_key_value_heads * args.head_dim
    extra = fused["totals"]["generated"]["fixed_bytes"] - default["totals"]["generated"]["fixed_bytes"]
    assert 0 <= extra <= 4 * biases, extra


def test_refuses_bad_input_in_one_line_naming_it(capsys):
    for argv, error in [
        (["--probe-tokens", "32,16"], "error: --probe-tokens '32,16': give two lengths"),
        (["--ours", "parallel.no_such_key=1"], "error: bad override in "),
        (["--ours", "parallel.fp32_weight_grads=true"], "error: parallel.fp32_weight_grads=true needs compiled blocks "
                                                        "on CUDA"),
    ]:
        assert block_traffic.main(["--size", "tiny", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(error) and len(err.strip().splitlines()) == 1, err
