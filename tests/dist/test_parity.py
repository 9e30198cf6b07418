"""Every parallel layout trains like one process (losses, gradient norms, final weights); the tie survives.

Each layout runs tests/dist/parity_worker.py: 5 steps of the tiny model (2 blocks of width 32) with a vocabulary of
1,024 on random token ids (the real 151,936 made each step several times as long; tests/dist/test_train_tp.py and
tests/dist/test_loader_dist.py train it under TP and FSDP), 2 micro-batches
per step, activation checkpointing on (full, per-op under TP x FSDP, every 2nd block under HSDP, which also fuses the
projections), gloo on the CPU; the reference is one plain process (no FSDP, no checkpointing). The tiny model ties
its embeddings; tp2_untied checks the separate column-parallel head of the untied sizes. The chunked loss runs in
the tp=1 layouts and the reference, the vocabulary-parallel one under TP.
"""

import dataclasses
import os

import pytest
import torch

from tests.helpers import REPO, run_python

WORKER = os.path.join(REPO, "tests", "dist", "parity_worker.py")
# layout -> (its one-process reference, the layout validate() resolves)
EXPECTED_LAYOUTS = {
    "fsdp4": ("single", {"dp_replicate": 1, "dp_shard": 4, "tp": 1, "grad_accum_steps": 2}),
    "tp2_fsdp2": ("single", {"dp_replicate": 1, "dp_shard": 2, "tp": 2, "grad_accum_steps": 2}),
    "hsdp2x2": ("single", {"dp_replicate": 2, "dp_shard": 2, "tp": 1, "grad_accum_steps": 2}),
    "tp2_untied": ("single_untied", {"dp_replicate": 1, "dp_shard": 1, "tp": 2, "grad_accum_steps": 2}),
}
TIED_LAYOUTS = ["fsdp4", "hsdp2x2", "tp2_fsdp2"]


@pytest.fixture(scope="module")
def run_layout(tmp_path_factory):
    """run_layout(name) -> what the worker saved; each layout runs once per module."""
    out_dir = tmp_path_factory.mktemp("parity")
    done: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in done:
            out = out_dir / f"{name}.pt"
            result = run_python([WORKER, name, str(out)], timeout=240)
            assert result.returncode == 0, result.stderr[-4000:]
            done[name] = torch.load(out)
        return done[name]

    return run


@pytest.mark.parametrize("layout", sorted(EXPECTED_LAYOUTS))
def test_layout_trains_like_one_process(layout, run_layout):
    reference_name, expected_layout = EXPECTED_LAYOUTS[layout]
    reference, got = run_layout(reference_name), run_layout(layout)
    assert got["layout"] == expected_layout
    assert len(got["losses"]) == len(reference["losses"]) == 5
    loss_diff = max(abs(a - b) for a, b in zip(got["losses"], reference["losses"]))
    assert loss_diff <= 1e-5, (got["losses"], reference["losses"])
    # A wrong gradient scale (FSDP averaging, tokens counted per TP rank) would hardly move AdamW's weights but
    # shows in the norm.
    for a, b in zip(got["grad_norms"], reference["grad_norms"]):
        assert abs(a - b) <= 1e-4 * b, (got["grad_norms"], reference["grad_norms"])
    assert sorted(got["weights"]) == sorted(reference["weights"])
    # AdamW moves an element by about lr whatever its gradient's size, so where a gradient is ~0 its sign -- and so a
    # step of ~lr -- can differ with the summation order of another layout (seen with the debug model: tp2_fsdp2,
    # 1 or 2 elements in 8 matrices, 29 of the embedding's 19M). A wrong gradient or update shows on many elements
    # of the tensor it touches: per tensor at most 0.1% of the elements (none of a tensor under 1,000 elements:
    # biases, norms) may differ by more than 1e-5, and none by more than one step's lr (1e-3).
    mismatched, weight_diff = 0, 0.0
    for name, ref in reference["weights"].items():
        diff = (got["weights"][name] - ref).abs()
        weight_diff = max(weight_diff, diff.max().item())
        count = int((diff > 1e-5).sum())
        assert count <= diff.numel() // 1000, (name, count, diff.numel())
        mismatched += count
    assert weight_diff <= 1e-3
    # eval.tasks' log-likelihoods, scored before the first step: each row's on whichever rank and micro-batch.
    torch.testing.assert_close(got["task_scores"], reference["task_scores"], rtol=0, atol=1e-4)
    print(f"{layout}: max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}, {mismatched} elements > 1e-5")


@pytest.mark.parametrize("layout", TIED_LAYOUTS)
def test_tied_embedding_is_one_parameter_with_both_gradients(layout, run_layout):
    reference, got = run_layout("single"), run_layout(layout)
    tie = got["tie"]
    assert tie["head_is_embedding"]
    assert tie["vocab_parameters"] == ["embed_tokens.weight"]
    assert tie["num_parameters"] == tie["num_parameters_plain"]
    # The reference's gradient is the lookup's plus the head's (tests/unit/test_model.py): equal here means both
    # uses reached the one sharded parameter.
    torch.testing.assert_close(got["embedding_grad"], reference["embedding_grad"], rtol=0, atol=1e-6)


def test_hugging_face_weights_load_into_the_tp_and_fsdp_sharded_model(tmp_path):
    """model.init_from_hf under TP x FSDP (4 ranks): each rank reads its slices, from safetensors files split mid-
    model, and the gathered weights are the file's exactly (the tied head, the q/k/v biases, the norms included)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen2_dist.model.args import get_model_args
    from qwen2_dist.model.hf import hf_config_from_args, hf_to_native_state_dict

    torch.manual_seed(0)
    args = dataclasses.replace(get_model_args("tiny"), vocab_size=1024)  # parity_worker's vocabulary
    original = Qwen2ForCausalLM(Qwen2Config(**hf_config_from_args(args)))
    with torch.no_grad():
        for param in original.parameters():
            param.normal_(0.0, 0.05)  # biases and norms too, so a slice read from the wrong place shows
    hf_dir = tmp_path / "hf"
    original.save_pretrained(hf_dir, safe_serialization=True, max_shard_size="20KB")
    assert len(list(hf_dir.glob("*.safetensors"))) >= 3
    out = tmp_path / "tp2_fsdp2.pt"
    result = run_python([WORKER, "tp2_fsdp2", str(out), f"model.init_from_hf={hf_dir}", "train.steps=1"],
                        timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = torch.load(out)["initial"]
    expected = hf_to_native_state_dict(original.state_dict(), args)
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
