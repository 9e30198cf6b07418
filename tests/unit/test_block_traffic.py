"""benchmarks/block_traffic.py: the bytes Inductor counts for a compiled tiny block, split into a part per token and a
fixed part, checked against what the block's kernels must move (compiled on the CPU, in this process)."""

import json
import math

from benchmarks import block_traffic
from qwen2_dist.model.args import get_model_args


def test_each_kernel_groups_bytes_split_into_per_token_and_weights(tmp_path, capsys):
    args = get_model_args("tiny")
    out = tmp_path / "traffic.json"
    assert block_traffic.main(["--size", "tiny", "--probe-tokens", "16,32", "--step-tokens", "64",
                               "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]

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
    assert report["totals"]["generated"]["bytes_per_token"] == sum(r["bytes_per_token"] for r in generated)
    assert "generated (fused element-wise and reductions)" in capsys.readouterr().out


def test_refuses_probe_lengths_out_of_order(capsys):
    assert block_traffic.main(["--size", "tiny", "--probe-tokens", "32,16"]) == 2
    assert "error: --probe-tokens '32,16'" in capsys.readouterr().err
