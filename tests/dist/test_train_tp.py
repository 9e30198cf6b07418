"""qwen2-train under torchrun with tensor parallelism: 2 ranks, tp 2, the tiny model, the real data path."""

import json
import math

from tests.helpers import first_error, read_metrics, run_cli, run_torchrun, train_overrides

TRAIN = "qwen2_dist.cli.train"
# model.z_loss on: under TP its term is taken from the vocabulary-sharded logits (loss.vocab_parallel_z_term), in
# one process by the chunked loss; 0.1, so that a wrong gradient of it would move the second step's loss. (The TP
# layouts of tests/dist/test_parity.py train through the same Trainer without it.)
JOB = {"parallel.activation_checkpointing": "full", "train.steps": 2, "checkpoint.interval": 0, "model.z_loss": 0.1,
       "logging.norms": "true"}


def losses(run_dir, key="loss") -> list[float]:
    return [r[key] for r in read_metrics(run_dir)]


def test_tensor_parallel_job_trains_like_one_process(tmp_path, corpus_cache):
    tp_dir, one_dir = tmp_path / "tp2", tmp_path / "one"
    result = run_torchrun(2, TRAIN, train_overrides(tp_dir, corpus_cache, **JOB, **{"parallel.tp": 2}))
    assert result.returncode == 0, first_error(result.stderr)
    with open(tp_dir / "checkpoints" / "step_00000002" / "metadata.json") as f:
        assert json.load(f)["layout"] == {"dp_replicate": 1, "dp_shard": 1, "tp": 2, "grad_accum_steps": 2}
    single = run_cli(TRAIN, train_overrides(one_dir, corpus_cache, **JOB))
    assert single.returncode == 0, single.stderr[-4000:]
    # Both TP ranks read the batches of data-parallel rank 0, so the run is the one-process run.
    got, expected = losses(tp_dir), losses(one_dir)
    assert len(got) == len(expected) == 2
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-5, (got, expected)
    got, expected = losses(tp_dir, "z_loss"), losses(one_dir, "z_loss")
    assert min(expected) > 1 and max(abs(a - b) / b for a, b in zip(got, expected)) <= 1e-5, (got, expected)
    # logging.norms from the tensor-parallel shards (q/k/v and gate/up by rows, o and down by columns, the norms'
    # weights replicated): each block's as in one process, and all of them together the logged grad_norm.
    for tp_record, one_record in zip(read_metrics(tp_dir), read_metrics(one_dir)):
        blocks = [key for key in one_record if "norm/layers." in key]
        assert len(blocks) == 4 and all(abs(tp_record[k] - one_record[k]) <= 1e-5 * one_record[k] for k in blocks)
        grads = [value for key, value in tp_record.items() if key.startswith("grad_norm/")]
        assert abs(math.hypot(*grads) - tp_record["grad_norm"]) <= 1e-5 * tp_record["grad_norm"]
