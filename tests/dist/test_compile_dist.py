"""parallel.compile=true in one process, under FSDP and under TP x FSDP on 2 CPU ranks: the same losses as eager
(fp32; one eager run of one process is the reference of all three)."""

import pytest

from tests.helpers import RANDOM_IDS, read_metrics, run_torchrun, train_overrides

TRAIN = "qwen2_dist.cli.train"
JOB = {  # random token ids of a 1,024-token vocabulary: the real one's output matrix only made each step longer
    **RANDOM_IDS, "train.seq_len": 64, "train.global_batch_size": 8,
    "train.steps": 3, "optim.warmup_steps": 0, "optim.lr": 1e-3, "train.mixed_precision": "fp32",
    "train.deterministic": "true", "checkpoint.interval": 0, "checkpoint.save_final": "false",
}


def run(run_dir, corpus_cache, ranks: int, layout: dict, compile_: str) -> list[dict]:
    result = run_torchrun(ranks, TRAIN, train_overrides(run_dir, corpus_cache, **JOB, **layout,
                                                    **{"parallel.compile": compile_}),
                          env={"TORCH_LOGS": "recompiles"})
    assert result.returncode == 0, result.stderr[-4000:]
    # One compiled graph serves every block (under TP the embedding's output used to hold an AsyncCollectiveTensor,
    # which made the second block recompile).
    assert "Recompiling" not in result.stderr, result.stderr[-4000:]
    assert f"compile {'on' if compile_ == 'true' else 'off'}" in result.stdout + result.stderr
    if "parallel.tp" in layout:
        # The gradient norm over FSDP (here of size 1) x TP is one all-reduce: the mesh axes are flattened.
        assert "sequential all_reduce" not in result.stderr
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def eager(tmp_path_factory, corpus_cache) -> list[dict]:
    """The eager run of one process: in fp32 every layout trains as it does (tests/dist/test_parity.py: losses within
    1e-5, gradient norms within 1e-4 relative), so it is the reference of each compiled layout here."""
    return run(tmp_path_factory.mktemp("eager"), corpus_cache, 1, {}, "false")


@pytest.mark.parametrize("ranks, layout", [
    (1, {}),  # one process: the final norm is compiled too
    (2, {"parallel.activation_checkpointing": "selective"}),
    (2, {"parallel.tp": 2, "parallel.activation_checkpointing": "op"}),
], ids=["one-process", "fsdp2-selective", "tp2-op"])
def test_compiled_blocks_train_like_eager(tmp_path, corpus_cache, eager, ranks, layout):
    compiled = run(tmp_path, corpus_cache, ranks, layout, "true")
    assert len(compiled) == len(eager) == 3
    for got, want in zip(compiled, eager):
        assert abs(got["loss"] - want["loss"]) <= 1e-4, (compiled, eager)
        # Step 1's loss is forward only; the gradient norms check the compiled backward at every step.
        assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-3 * want["grad_norm"], (compiled, eager)
