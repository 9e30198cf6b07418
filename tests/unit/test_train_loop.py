"""The training loop: a skipped step is acted on even when the steps after it were fine, a resumed run's spike
guard decides as the uninterrupted one would, a checkpoint's save time is not counted against the logged
throughput, the last step's checkpoint is written again when its background save failed, and train.stop_at stops
with a checkpoint."""

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import time

import pytest
import torch

from qwen2_dist.errors import ResumeMismatch, UserError
from qwen2_dist.model.loss import IGNORE_INDEX
from qwen2_dist.train import checkpoint
from qwen2_dist.train.faults import INJECT_NAN_ENV, StepGuard, TrainingHalted
from qwen2_dist.train.optim import norm_group
from tests.helpers import cpu_trainer

FINITE = torch.tensor(1.0)


def test_a_run_of_skipped_steps_is_seen_after_it_ended():
    guard = StepGuard(torch.device("cpu"))
    for loss in (1.0, float("nan"), float("nan"), 1.0, 1.0):
        guard.verdict(torch.tensor(loss), FINITE)
    assert guard.counts() == (2, 2)  # the run ended two steps ago
    guard.verdict(torch.tensor(1.0), FINITE)
    assert guard.counts() == (2, 0)  # none since the last read
    guard.verdict(torch.tensor(float("inf")), FINITE)
    assert guard.counts() == (3, 1)


def test_a_resumed_spike_guard_decides_as_the_uninterrupted_one():
    losses = [3.0 + 0.01 * (i % 3) for i in range(12)] + [9.0, 3.0, 9.0]
    whole = StepGuard(torch.device("cpu"), spike_sigma=3.0, window=8)
    first, resumed = StepGuard(torch.device("cpu"), spike_sigma=3.0, window=8), None
    verdicts_whole, verdicts_resumed = [], []
    for i, loss in enumerate(losses):
        verdicts_whole.append(float(whole.verdict(torch.tensor(loss), FINITE)))
        if i < 10:
            first.verdict(torch.tensor(loss), FINITE)
            continue
        if resumed is None:  # the state goes through train_state.json
            resumed = StepGuard(torch.device("cpu"), spike_sigma=3.0, window=8)
            resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        verdicts_resumed.append(float(resumed.verdict(torch.tensor(loss), FINITE)))
    assert verdicts_whole[10:] == verdicts_resumed and verdicts_whole[12] == 1.0 and verdicts_whole[14] == 1.0
    assert whole.counts() == resumed.counts()


def test_a_step_skipped_before_the_spike_window_filled_leaves_no_empty_slot_in_it():
    """A non-finite step early in a run (the window not yet full) must not leave a slot of the window at its initial
    0: the window taken as full with a 0 in it widens the band about tenfold, and a real spike is applied."""
    losses = [3.0 + 0.02 * ((-1) ** i) for i in range(10)]  # 9 applied: the window of 8 is full
    losses[3] = float("nan")
    guard = StepGuard(torch.device("cpu"), spike_sigma=3.0, window=8)
    verdicts = [float(guard.verdict(torch.tensor(loss), FINITE)) for loss in losses + [3.5]]
    assert verdicts[3] == 1.0 and sum(verdicts[:10]) == 1.0
    assert verdicts[-1] == 1.0, guard.history  # the spike is skipped
    assert float(guard.history.min()) > 2.9


def test_the_spike_window_keeps_turning_past_two_to_the_24_applied_steps():
    """A float32 count of applied steps stopped at 2**24 (16.8M steps), and each later loss overwrote one slot."""
    guard = StepGuard(torch.device("cpu"), spike_sigma=3.0, window=4)
    state = guard.state_dict()
    guard.load_state_dict({**state, "filled": float(2**24), "history": [0.9, 1.1] * 2})  # as earlier versions saved it
    for loss in (1.02, 1.01, 0.99, 0.98):
        guard.verdict(torch.tensor(loss), FINITE)
    assert sorted(guard.history.tolist()) == pytest.approx([0.98, 0.99, 1.01, 1.02])
    assert guard.state_dict()["filled"] == 2**24 + 4


def _trainer(tmp_path, *overrides):
    return cpu_trainer(tmp_path, "train.global_batch_size=2", "eval.interval=0", "checkpoint.interval=0", *overrides)


def _timed_steps(trainer, monkeypatch) -> dict[int, float]:
    """Each step's own seconds, by step number, as fit() runs them."""
    seconds, train_step = {}, trainer.train_step

    def timed_step():
        started = time.monotonic()
        result = train_step()
        seconds[trainer.step + 1] = time.monotonic() - started
        return result

    monkeypatch.setattr(trainer, "train_step", timed_step)
    return seconds


def _slow_saves(trainer, monkeypatch, seconds: float) -> list[int]:
    """Every save takes `seconds` longer; returns the list of the steps saved, filled as fit() saves."""
    save, saved = trainer.save, []
    monkeypatch.setattr(trainer, "save", lambda *args, **kwargs: (time.sleep(seconds), saved.append(trainer.step),
                                                                  save(*args, **kwargs))[2])
    return saved


@pytest.mark.parametrize("interval", [0, 2])
def test_garbage_is_collected_at_the_same_steps_on_every_rank_not_automatically(tmp_path, monkeypatch, interval):
    """train.gc_interval: no automatic collection during the steps, a young-generation one after every 2nd step, a
    full one before the first, after each checkpoint.interval save and after each evaluation (steps 4 and 5, the
    last); 0 leaves Python's automatic collection on. What is alive after the first collection is frozen (left out of
    the later ones) and thawed after fit(). Collection is on again after fit()."""
    import gc

    import numpy as np

    from qwen2_dist.train.tasks import Task

    trainer = _trainer(tmp_path, "train.steps=5", f"train.gc_interval={interval}", "checkpoint.save_final=false",
                       "checkpoint.interval=3", "eval.interval=4")
    trainer.tasks = [Task("t", "-", [np.arange(3)] * 2, np.ones(2), np.zeros(2), np.ones(2), np.zeros(1), length=4,
                          pad_id=0)]
    events, collect, train_step = [], gc.collect, trainer.train_step
    monkeypatch.setattr(gc, "collect", lambda *generation: (events.append(("collect", *generation)),
                                                            collect(*generation))[1])
    monkeypatch.setattr(trainer, "train_step", lambda: (events.append(("step", gc.isenabled(),
                                                                       gc.get_freeze_count() > 0)), train_step())[1])
    assert gc.isenabled() and gc.get_freeze_count() == 0
    trainer.fit()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    if interval:
        step = ("step", False, True)
        assert events == [("collect",), step, step, ("collect", 1), step, ("collect",), step, ("collect", 1),
                          ("collect",), step, ("collect",)]
    else:
        assert events == [("step", True, False)] * 5


def test_objects_the_caller_froze_stay_frozen_after_fit(tmp_path):
    import gc

    trainer = _trainer(tmp_path, "train.steps=1", "checkpoint.save_final=false")
    gc.freeze()
    try:
        assert gc.get_freeze_count() > 0
        trainer.fit()
        assert gc.get_freeze_count() > 0 and gc.isenabled()  # not thawed (freed objects leave it, so no equality)
    finally:
        gc.unfreeze()


def test_halt_stops_on_a_skipped_step_between_logging_steps(tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_NAN_ENV, "2")
    trainer = _trainer(tmp_path, "train.nonfinite=halt", "logging.interval=4", "train.steps=8")
    with pytest.raises(TrainingHalted, match="train.nonfinite=halt"):
        trainer.fit()
    assert trainer.step == 4  # acted on at the next logging step, though steps 3 and 4 were fine


def test_a_run_restarted_after_a_halt_does_not_halt_again_for_the_same_steps(tmp_path, monkeypatch):
    """The halt's checkpoint ends with a skipped step; the restarted run (the cause fixed) trains on, where it halted
    again at its first logging step for the streak it had already halted for."""
    monkeypatch.setenv(INJECT_NAN_ENV, "4")
    trainer = _trainer(tmp_path, "train.nonfinite=halt", "logging.interval=4", "train.steps=8")
    with pytest.raises(TrainingHalted):
        trainer.fit()
    assert _committed(trainer) == [4]
    monkeypatch.delenv(INJECT_NAN_ENV)
    restarted = _trainer(tmp_path, "train.nonfinite=halt", "logging.interval=4", "train.steps=8")
    restarted.restore(checkpoint.committed_checkpoints(restarted.checkpointer.ckpt_root)[-1])
    assert restarted.fit().step == 8 and restarted.guard.counts() == (1, 0)


def test_the_logged_throughput_leaves_out_a_save_between_logging_steps(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "logging.interval=4", "train.steps=4", "checkpoint.interval=2",
                       "checkpoint.save_final=false")
    step_seconds = _timed_steps(trainer, monkeypatch)
    saves = _slow_saves(trainer, monkeypatch, 1.5)
    started = time.monotonic()
    trainer.fit()
    whole = time.monotonic() - started
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    tokens, stepped = 4 * _tokens_per_step(trainer), sum(step_seconds.values())
    # All four steps over at least their own time (not only the two after the save); and the window, which lies
    # within fit(), without the saves' 1.5 s each (the save at step 2 left out of it, the one at step 4 after it): a
    # bound that needs no allowance for a loaded machine's time outside the steps.
    assert len(saves) == 2
    assert tokens / (whole - 1.5 * len(saves)) <= record["tokens_per_sec"] <= tokens / stepped, (record, stepped, whole)
    assert record["data_wait_pct"] <= 100


def test_the_logged_throughput_leaves_out_the_commit_of_a_background_save(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "logging.interval=6", "train.steps=6", "checkpoint.interval=2",
                       "checkpoint.async_save=true", "checkpoint.save_final=false")
    train_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda: (time.sleep(0.3), train_step())[1])  # the write ends meanwhile
    step_seconds = _timed_steps(trainer, monkeypatch)
    wait, save, saving, commits = trainer.checkpointer.wait, trainer.save, [], []

    def marked_save(*args, **kwargs):
        saving.append(True)
        try:
            return save(*args, **kwargs)
        finally:
            saving.pop()

    def slow_first_commit():  # a shared filesystem's renames and deletes; a save's own wait is the save's time
        if trainer.checkpointer.pending_done() is not None and not saving:
            commits.append(trainer.step)
            if len(commits) == 1:
                time.sleep(3.0)
        return wait()

    monkeypatch.setattr(trainer, "save", marked_save)
    monkeypatch.setattr(trainer.checkpointer, "wait", slow_first_commit)
    started = time.monotonic()
    trainer.fit()
    whole = time.monotonic() - started
    assert commits and commits[0] < 6, commits  # committed by the loop inside the window
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    tokens, stepped = 6 * _tokens_per_step(trainer), sum(step_seconds.values())
    # The window lies within fit() and leaves out the commit's 3 s (a fixed allowance of 0.75 s over the steps' own
    # time for the loop's was exceeded once, 0.9 s, in a serial run of the suite under torch 2.11, 2026-12-07).
    assert tokens / (whole - 3.0) <= record["tokens_per_sec"] <= tokens / stepped, (record, stepped, whole)


def test_a_batch_rampup_trains_each_step_on_its_size_as_a_run_of_that_batch_would(tmp_path):
    """train.batch_rampup=[[2,2]], then 4: steps 1-2 are those of a run of global batch 2, steps 3-4 those of a run of
    global batch 4 resumed from its step 2 (the same samples, the loss over each step's own token count), and
    tokens_seen counts each step's size."""
    (tmp_path / "r").mkdir()
    (tmp_path / "s").mkdir()
    ramped = _trainer(tmp_path / "r", "train.global_batch_size=4", "train.batch_rampup=[[2,2]]", "train.steps=4",
                      "logging.interval=1")
    ramped.fit()
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens_seen"] for r in records] == [32, 64, 128, 192]
    small = _trainer(tmp_path / "s", "train.steps=4", "train.stop_at=2", "logging.interval=1")
    small.fit()
    large = _trainer(tmp_path / "s", "train.global_batch_size=4", "train.steps=4", "logging.interval=1")
    large.restore(checkpoint.committed_checkpoints(large.checkpointer.ckpt_root)[-1])
    large.fit()
    alone = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in alone], rel=1e-6, abs=0)


def test_eval_datasets_are_evaluated_apart_from_the_training_datas_eval_loss(tmp_path, caplog):
    """eval.datasets: each one's first eval.samples of its split (train here: a dataset prepared for evaluation),
    logged as eval_loss/NAME with the loss of that dataset evaluated alone, and left out of eval_loss; a split
    without samples is refused by the launchers' check, naming the field."""
    from qwen2_dist.cli.train import build_evals
    from qwen2_dist.config import check_saved
    from qwen2_dist.data.loader import TokenBatches
    from qwen2_dist.data.prepare import VAL
    from tests.datasets import make_dataset, sample_ids

    web = make_dataset(tmp_path / "web", 8, 16, val_samples=7)
    wiki = make_dataset(tmp_path / "wiki", 9, 16, first_id=3000)  # more than eval.samples: which 5 matters
    trainer = cpu_trainer(tmp_path / "run", "train.global_batch_size=2", f"data.path={web}", "eval.samples=5",
                          f"eval.datasets=[{{path: {wiki}, split: train}}]", qwen2_vocab=True)
    loader_args = dict(seq_len=16, micro_batch_size=2, dp_rank=0, dp_size=1, cache_dir=None, run_key="default")
    evals, complete = build_evals(trainer.cfg, [(web, 1.0)], loader_args, 1)
    assert [(ev.name, ev.samples, ev.extra) for ev in evals] == [(None, 5, False), ("wiki", 5, True)]
    assert sample_ids(evals[1].batches.next_batch()) == [3000, 3001]  # its own order from its first sample
    trainer.evals, trainer.evals_complete = evals, complete
    generator = torch.get_rng_state()
    with caplog.at_level(logging.INFO):
        record, text = trainer.evaluate_all()
    assert torch.equal(torch.get_rng_state(), generator)  # what a checkpoint saves does not depend on evaluation
    # No training-data log line (epochs) from an eval set.
    assert "starts epoch" not in caplog.text
    alone = {}
    for name, path, split in (("web", web, VAL), ("wiki", wiki, "train")):  # eval.datasets in their own order
        batches = TokenBatches([(path, 1.0)], seq_len=16, micro_batch_size=2, global_batch_size=6, split=split,
                               shuffle=name == "web")
        alone[name] = trainer.evaluate(batches, 5)
        batches.close()
    assert record == pytest.approx({"eval_loss": alone["web"], "eval_loss/wiki": alone["wiki"]}, rel=1e-6)
    assert abs(alone["web"] - alone["wiki"]) > 1e-3  # the two datasets' samples differ
    assert text.endswith("held-out samples | eval.datasets: wiki %.4f on 5 samples" % alone["wiki"]), text
    for ev in evals:
        ev.batches.close()
    job = dataclasses.replace(trainer.cfg, eval=dataclasses.replace(trainer.cfg.eval, datasets=[
        dataclasses.replace(trainer.cfg.eval.datasets[0], split="val")]))
    with pytest.raises(UserError, match=r"eval.datasets\[0\]: .*wiki holds no sample in its val split; set "
                                        r"eval.datasets\[0\].split=train"):
        check_saved(job)


def test_logging_norms_gives_each_blocks_gradient_norm_before_the_clip_and_its_weights_norm(tmp_path):
    """logging.norms: the blocks' gradient norms make up the logged (unclipped) grad_norm, with the clip acting in
    place (torch's AdamW without the fused kernel, clip 0.01); the weight norms are those of the weights the step
    started from."""
    trainer = _trainer(tmp_path, "logging.norms=true", "optim.fused=false", "train.grad_clip=0.01", "train.steps=1",
                       "logging.interval=1")
    weights = {}
    for name, param in trainer.model.named_parameters():
        weights.setdefault(norm_group(name), []).append(param.detach().clone())
    trainer.fit()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    layers = trainer.args.num_hidden_layers
    groups = [f"layers.{i}" for i in range(layers)] + ["embed_tokens", "norm"]  # the tiny model's head is tied
    assert sorted(k for k in record if "norm/" in k) == sorted(f"{kind}/{g}" for kind in ("grad_norm", "param_norm")
                                                               for g in groups)
    assert math.hypot(*(record[f"grad_norm/{g}"] for g in groups)) == pytest.approx(record["grad_norm"], rel=1e-5)
    assert record["grad_norm"] > 1  # so the clip to 0.01 acted
    for group, tensors in weights.items():
        assert record[f"param_norm/{group}"] == pytest.approx(math.hypot(*(t.norm().item() for t in tensors)),
                                                              rel=1e-5)


def test_a_new_data_stage_starts_the_spike_window_anew_and_is_refused_without_the_flag(tmp_path, caplog):
    """data.new_stage from a checkpoint of other data (random tokens of another seed): the step, the next global
    batch and the skip counts go on, the spike guard's window of the old data's losses is emptied (it would skip
    every step of data whose loss lies higher); without the flag the checkpoint is refused."""
    guard = ("train.spike_sigma=3", "train.spike_window=2", "train.steps=6")
    (tmp_path / "a").mkdir()
    first = _trainer(tmp_path / "a", *guard, "train.stop_at=3", "checkpoint.interval=3")
    first.fit()
    assert float(first.guard.filled) == 3
    path = checkpoint.committed_checkpoints(first.checkpointer.ckpt_root)[-1]
    refused = _trainer(tmp_path / "b", *guard)
    refused.batches.seed = 1  # cpu_trainer's random tokens are of seed 0 whatever the job's
    with pytest.raises(ResumeMismatch, match="seed 0, this job's seed is 1; restore the seed, or set data.new_stage"):
        refused.restore(path)
    stage = _trainer(tmp_path / "c", *guard, "data.new_stage=true")
    stage.batches.seed = 1
    with caplog.at_level(logging.WARNING):
        stage.restore(path)
    assert stage.step == 3 and stage.batches.batches_read == 3 and float(stage.guard.filled) == 0
    assert "was trained on other data (random tokens of seed 0)" in caplog.text
    assert "the spike guard's loss window starts anew" in caplog.text


def _tokens_per_step(trainer):
    return trainer.cfg.train.global_batch_size * trainer.cfg.train.seq_len


def _committed(trainer):
    return [int(path[-8:]) for path in checkpoint.committed_checkpoints(trainer.checkpointer.ckpt_root)]


def test_eval_at_start_logs_the_starting_weights_as_step_0_once(tmp_path, monkeypatch):
    """eval.at_start: a run starting at step 0 evaluates before its first step (the tasks here), logged as step 0; a
    start again from step 0 moves the earlier step-0 record aside; a resume evaluates at its interval steps only."""
    import numpy as np

    from qwen2_dist.train.faults import Watchdog
    from qwen2_dist.train.tasks import Task, accuracies

    rows = [np.arange(5) + 7 * i for i in range(6)]
    task = Task("t", "-", rows, np.full(6, 2), np.repeat([0, 1, 2], 2), np.ones(6), np.array([0, 1, 0]), length=8,
                pad_id=0)
    overrides = ("eval.at_start=true", "eval.interval=2", "checkpoint.interval=2", "logging.interval=1")

    evaluated, rearmed = [], []  # the step each evaluation ran at; the watchdog given its first-step limit again
    monkeypatch.setattr(Watchdog, "rearm_first", lambda self: rearmed.append(evaluated[-1]))

    def build(steps, *more, resume=False):
        trainer = _trainer(tmp_path, f"train.steps={steps}", *overrides, *more)
        trainer.tasks = [task]
        if resume:
            trainer.restore(checkpoint.committed_checkpoints(trainer.checkpointer.ckpt_root)[-1])
        evaluate_all = trainer.evaluate_all
        monkeypatch.setattr(trainer, "evaluate_all",
                            lambda **kw: (evaluated.append(trainer.step), evaluate_all(**kw))[1])
        return trainer

    def run(steps, *more):
        trainer = build(steps, *more)
        before = accuracies(task, trainer.task_log_likelihoods(task))
        trainer.fit()
        return trainer, before, [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    trainer, before, records = run(1)
    assert [r["step"] for r in records] == [0, 1] and evaluated == [0, 1] and rearmed == [0]
    assert (records[0]["task_acc/t"], records[0]["task_acc_norm/t"]) == before and "loss" not in records[0]
    shutil.rmtree(tmp_path / "checkpoints")  # a start from step 0 again: the first start's records move aside
    trainer, _, records = run(3)
    assert [r["step"] for r in records] == [0, 1, 2, 3] and evaluated == [0, 1, 0, 2, 3]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()] \
        == [0, 1]
    build(4, resume=True).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4] and evaluated == [0, 1, 0, 2, 3, 4]
    assert [r["step"] for r in records if "task_acc/t" in r] == [0, 2, 3, 4]
    # A checkpoint at step 0 (train.stop_at=0) resumed is a resume too: evaluated at the start only once.
    shutil.rmtree(tmp_path / "checkpoints")
    evaluated.clear()
    run(2, "train.stop_at=0")
    build(2, resume=True).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert evaluated == [0, 2] and [r["step"] for r in records] == [0, 1, 2] and rearmed == [0, 0, 0]
    # Another run's checkpoint at step 0 (what qwen2-convert from-hf writes, given as checkpoint.resume=) is where
    # this run starts: evaluated at step 0 (it was skipped, unsaid, as a resume's).
    evaluated.clear()
    other = tmp_path / "other"
    other.mkdir()
    trainer = _trainer(other, "train.steps=1", *overrides)
    trainer.tasks = [task]
    trainer.restore(str(tmp_path / "checkpoints" / "step_00000000"))
    evaluate_all = trainer.evaluate_all
    monkeypatch.setattr(trainer, "evaluate_all", lambda **kw: (evaluated.append(trainer.step), evaluate_all(**kw))[1])
    trainer.fit()
    assert evaluated == [0, 1]
    assert [json.loads(line)["step"] for line in (other / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_a_failed_background_save_of_the_last_step_is_written_again(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "train.steps=4", "checkpoint.interval=4", "checkpoint.async_save=true")
    write_data, failed = checkpoint._Writer.write_data, []

    def fails_once(writer, plan, planner):  # a transient disk error in the background write of step 4
        if "step_00000004" in str(writer.path) and not failed:
            failed.append(writer.path)
            raise OSError(28, "No space left on device (test)")
        return write_data(writer, plan, planner)

    monkeypatch.setattr(checkpoint._Writer, "write_data", fails_once)
    trainer.fit()
    assert failed and _committed(trainer) == [4] and trainer.saved_step == 4


def _fit_with_sigterm_during_step(trainer, monkeypatch, step: int):
    """trainer.fit(), with a SIGTERM to this process while step `step` runs; the signal handlers put back after."""
    train_step = trainer.train_step

    def step_then_preempted():
        result = train_step()
        if trainer.step == step - 1:  # the step now running is `step`
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer, "train_step", step_then_preempted)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return trainer.fit()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _failing_writes(monkeypatch, step: int) -> None:
    """Every write of step `step`'s checkpoint fails (a full disk)."""
    write_data = checkpoint._Writer.write_data

    def fails(writer, plan, planner):
        if f"step_{step:08d}" in str(writer.path):
            raise OSError(28, "No space left on device (test)")
        return write_data(writer, plan, planner)

    monkeypatch.setattr(checkpoint._Writer, "write_data", fails)


def test_a_final_save_that_fails_is_an_error_not_done(tmp_path, monkeypatch):
    """The run said "done" and exited 0 though its last steps were saved nowhere."""
    trainer = _trainer(tmp_path, "train.steps=4", "checkpoint.interval=2")
    _failing_writes(monkeypatch, 4)
    with pytest.raises(UserError, match=r"the checkpoint of step 4, where this job ends, could not be written .* "
                                        r"the training since step 2 is not saved. Fix the storage"):
        trainer.fit()
    assert _committed(trainer) == [2]


def test_a_stop_whose_save_fails_still_stops_and_says_where_the_next_start_resumes(tmp_path, monkeypatch, caplog):
    trainer = _trainer(tmp_path, "train.steps=8", "checkpoint.interval=2")
    _failing_writes(monkeypatch, 3)
    result = _fit_with_sigterm_during_step(trainer, monkeypatch, 3)
    assert result.stopped_by_signal and result.step == 3 and _committed(trainer) == [2]
    assert "stop: the checkpoint of step 3 could not be written (the error is above); the next start resumes from " \
           "step 2" in caplog.text
    # The run's last line says so too (it said "saved; the next start resumes there").
    from qwen2_dist.cli.train import ending

    assert result.saved_step == 2
    assert ending(result, trainer.cfg.train) == ("stopped by signal at step 3 of 8 (not saved: the next start resumes "
                                                 "from step 2)")


def test_a_halts_save_deletes_none_of_the_checkpoints_to_roll_back_to(tmp_path, monkeypatch):
    """With checkpoint.keep_last=1 the halt's own save deleted the last checkpoint before the bad steps, the one its
    message says to roll back to."""
    monkeypatch.setenv(INJECT_NAN_ENV, "3")
    trainer = _trainer(tmp_path, "train.nonfinite=halt", "logging.interval=1", "train.steps=6",
                       "checkpoint.interval=1", "checkpoint.keep_last=1")
    with pytest.raises(TrainingHalted, match="roll back to an earlier checkpoint"):
        trainer.fit()
    assert _committed(trainer) == [2, 3]


def test_stop_at_stops_with_a_checkpoint_without_save_final(tmp_path):
    trainer = _trainer(tmp_path, "train.steps=8", "train.stop_at=3", "checkpoint.save_final=false")
    trainer.fit()
    assert trainer.step == 3 and _committed(trainer) == [3]


def test_a_resumed_job_trains_with_its_own_optimizer_settings(tmp_path, caplog):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _trainer(tmp_path / "a", "train.steps=2", "optim.weight_decay=0.1", "optim.beta2=0.95")
    first.fit()
    resumed = _trainer(tmp_path / "b", "train.steps=4", "optim.weight_decay=0.0", "optim.beta2=0.999")
    caplog.set_level(logging.INFO, logger="qwen2_dist.train.trainer")
    resumed.restore(checkpoint.committed_checkpoints(first.checkpointer.ckpt_root)[-1])
    assert resumed.step == 2
    assert {(g["weight_decay"], tuple(g["betas"])) for g in resumed.optimizer.param_groups} == {(0.0, (0.9, 0.999))}
    assert "weight_decay 0.1 -> 0.0" in caplog.text and "betas" in caplog.text
    # fused: the step hands a fused AdamW its skip flag, which an unfused one refuses (the saved setting crashed).
    (tmp_path / "c").mkdir()
    (tmp_path / "d").mkdir()
    unfused = _trainer(tmp_path / "c", "train.steps=2", "optim.fused=false")
    unfused.fit()
    fused = _trainer(tmp_path / "d", "train.steps=4")
    fused.restore(checkpoint.committed_checkpoints(unfused.checkpointer.ckpt_root)[-1])
    assert all(g["fused"] for g in fused.optimizer.param_groups) and "fused False -> True" in caplog.text
    fused.train_step()


@pytest.mark.parametrize("loss", ["chunked", "plain"])
def test_evaluation_reads_the_same_samples_whatever_the_micro_batches(tmp_path, loss):
    """eval.samples=5 read in micro-batches of 1, 2 and 4 (as on 1, 2 or 4 data-parallel ranks): the rows past the
    fifth, which fill the last micro-batch, count for nothing, also where they wrap past the 7 held-out samples."""
    from qwen2_dist.data.loader import TokenBatches
    from qwen2_dist.data.prepare import VAL
    from tests.datasets import make_dataset

    data = make_dataset(tmp_path / "data", 8, 16, val_samples=7)
    trainer = cpu_trainer(tmp_path / "run", f"model.loss={loss}", "train.global_batch_size=2")
    losses = []
    for micro in (1, 2, 4):
        step = -(-5 // micro) * micro
        batches = TokenBatches([(data, 1.0)], seq_len=16, micro_batch_size=micro, global_batch_size=step, split=VAL)
        losses.append(trainer.evaluate(batches, 5))
        batches.close()
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)


def test_a_mixture_is_evaluated_per_source_and_weighted_as_in_training(tmp_path, caplog):
    """data.sources: each source's first eval.samples held-out samples on their own (eval_loss/NAME, the same loss
    as that source evaluated alone; a split smaller than eval.samples evaluated whole), eval_loss their mean by the
    training weights. A source without a held-out split is left out, and then there is no mixture eval_loss."""
    from qwen2_dist.cli.train import build_evals
    from qwen2_dist.config import DataSource
    from qwen2_dist.data.loader import TokenBatches
    from qwen2_dist.data.prepare import VAL
    from qwen2_dist.train.trainer import EvalSet
    from tests.datasets import make_dataset

    web = make_dataset(tmp_path / "web", 8, 16, val_samples=7)
    code = make_dataset(tmp_path / "code" / "v1", 8, 16, first_id=3000, val_samples=3)
    nothing_held_out = make_dataset(tmp_path / "books", 8, 16)
    sources = f"[{{path: {web}, weight: 3}}, {{path: {code}, weight: 1, name: code}}]"
    trainer = cpu_trainer(tmp_path / "run", "train.global_batch_size=2", f"data.sources={sources}",
                          "eval.samples=5", qwen2_vocab=True)
    loader_args = dict(seq_len=16, micro_batch_size=2, dp_rank=0, dp_size=1, cache_dir=None, run_key="default")
    evals, complete = build_evals(trainer.cfg, [(web, 3.0), (code, 1.0)], loader_args, 1)
    assert complete and [(ev.name, ev.samples, ev.weight) for ev in evals] == [("web", 5, 3.0), ("code", 3, 1.0)]
    assert "eval.samples=5 is more than the 3 held-out samples of code" in caplog.text
    trainer.evals = evals
    record, text = trainer.evaluate_all()
    alone = {}
    for name, path, samples in (("web", web, 5), ("code", code, 3)):
        batches = TokenBatches([(path, 1.0)], seq_len=16, micro_batch_size=2, global_batch_size=6, split=VAL)
        alone[name] = trainer.evaluate(batches, samples)
        batches.close()
    assert record["eval_loss/web"] == pytest.approx(alone["web"], rel=1e-6)
    assert record["eval_loss/code"] == pytest.approx(alone["code"], rel=1e-6)
    assert abs(alone["web"] - alone["code"]) > 1e-3  # the two sources' samples differ
    assert record["eval_loss"] == pytest.approx(0.75 * alone["web"] + 0.25 * alone["code"], rel=1e-6)
    assert "web" in text and "code" in text and "on 3" in text
    # An eval dataset beside the mixture (eval.datasets, here the books): logged on its own, not in eval_loss.
    books = TokenBatches([(nothing_held_out, 1.0)], seq_len=16, micro_batch_size=2, global_batch_size=6,
                         split="train", shuffle=False, evaluation=True)
    trainer.evals = evals + [EvalSet(books, 5, "books", extra=True)]
    with_books, text = trainer.evaluate_all()
    assert with_books == {**record, "eval_loss/books": pytest.approx(trainer.evaluate(books, 5), rel=1e-6)}
    assert text.endswith("held-out samples | eval.datasets: books %.4f on 5 samples" % with_books["eval_loss/books"])
    books.close()
    for ev in evals:
        ev.batches.close()

    # The source without a held-out split first: names and weights stay with their sources.
    sources = [DataSource(path=nothing_held_out, weight=1.0), DataSource(path=web, weight=3.0)]
    job = dataclasses.replace(trainer.cfg, data=dataclasses.replace(trainer.cfg.data, sources=sources))
    evals, complete = build_evals(job, [(nothing_held_out, 1.0), (web, 3.0)], loader_args, 1)
    assert not complete and [(ev.name, ev.samples, ev.weight) for ev in evals] == [("web", 5, 3.0)]
    assert f"no held-out split in {nothing_held_out}" in caplog.text
    trainer.evals, trainer.evals_complete = evals, complete
    assert set(trainer.evaluate_all()[0]) == {"eval_loss/web"}
    evals[0].batches.close()


def test_evaluation_runs_every_interval_and_at_the_last_step_not_at_a_stop_before_it(tmp_path):
    from qwen2_dist.data.loader import TokenBatches
    from qwen2_dist.data.prepare import VAL
    from qwen2_dist.train.trainer import EvalSet
    from tests.datasets import make_dataset
    from tests.helpers import read_metrics

    data = make_dataset(tmp_path / "data", 8, 16, val_samples=4)
    for name, steps, stop_at, evaluated in (("end", 5, None, [2, 4, 5]), ("stop", 5, 3, [2])):
        (tmp_path / name).mkdir()
        trainer = cpu_trainer(tmp_path / name, "train.global_batch_size=2", f"train.steps={steps}",
                              f"train.stop_at={stop_at if stop_at else 'null'}", "eval.interval=2",
                              "logging.interval=1", "checkpoint.interval=0")
        batches = TokenBatches([(data, 1.0)], seq_len=16, micro_batch_size=2, global_batch_size=4, split=VAL)
        trainer.evals = [EvalSet(batches, 4)]
        trainer.fit()
        batches.close()
        assert [r["step"] for r in read_metrics(tmp_path / name) if "eval_loss" in r] == evaluated, name


def test_source_names_come_from_the_paths_unless_given(tmp_path):
    from qwen2_dist.config import DataSource, source_names

    def names(*sources):
        return source_names([DataSource(path=p, name=n) for p, n in sources])

    assert names(("/d/web/", None), ("s3://bucket/code", None), ("/d/x", "books")) == ["web", "code", "books"]
    assert names(("/d/web/v1", None), ("s3://b/code/v1", None), ("/d/v1", "v9")) == ["web-v1", "code-v1", "v9"]
    assert names(("/d/web", None), ("/e/web", "other")) == ["web", "other"]  # no clash with a given name
    assert names(("/a/x/web", None), ("/b/x/web", None)) == ["x-web_0", "x-web_1"]
    assert names(("hf://datasets/org/my data", None), ("/d/web/..", None)) == ["my_data", "d"]
    with pytest.raises(UserError, match=r"data.sources\[0\] and data.sources\[1\] are both named 'a'"):
        names(("/d/x", "a"), ("/d/y", "a"))
    with pytest.raises(UserError, match=r"data.sources\[1\].name='a/b'"):
        names(("/d/x", None), ("/d/y", "a/b"))
    assert names(("/d/web", None), ("/f/x", "web")) == ["d-web", "web"]
    with pytest.raises(UserError, match="would both be named 'x-web_0'"):
        names(("/a/x/web", None), ("/b/x/web", None), ("/f/x", "x-web_0"))


@pytest.mark.parametrize("loss", ["chunked", "plain"])
def test_with_eod_mask_loss_a_step_s_loss_is_the_mean_over_the_counted_targets(tmp_path, loss):
    """data.eod_mask_loss: the first token of each sample's second document is no target. A step's loss is the mean
    over the counted targets of the global batch (torch's cross_entropy over the batch at once), and the loss and
    the gradient norm are the same whether the batch comes in micro-batches of 1, 2 or 4."""
    import torch.nn.functional as F

    from qwen2_dist.data.loader import TokenBatches
    from tests.datasets import make_dataset

    data = make_dataset(tmp_path / "data", 8, 16, first_id=100)
    results = []
    for micro in (1, 2, 4):
        trainer = cpu_trainer(tmp_path / f"run{micro}", f"model.loss={loss}", "data.eod_mask_loss=true",
                              "train.global_batch_size=4", f"train.micro_batch_size={micro}", qwen2_vocab=True)
        reader = TokenBatches([(data, 1.0)], seq_len=16, micro_batch_size=4, global_batch_size=4, eod_mask_loss=True)
        whole = reader.next_batch()
        reader.close()
        assert (whole.targets == IGNORE_INDEX).sum() == 4
        with torch.no_grad():
            logits = trainer.model(whole.inputs)
        expected = F.cross_entropy(logits.float().flatten(0, 1), whole.targets.flatten()).item()
        trainer.batches = TokenBatches([(data, 1.0)], seq_len=16, micro_batch_size=micro, global_batch_size=4,
                                       eod_mask_loss=True)
        step_loss, grad_norm, _ = trainer.train_step()
        trainer.batches.close()
        assert step_loss.item() == pytest.approx(expected, rel=1e-5)
        results.append((step_loss.item(), grad_norm.item()))
    assert results[1] == pytest.approx(results[0], rel=1e-5) and results[2] == pytest.approx(results[0], rel=1e-5)


@pytest.mark.parametrize("first, later", [(0, 0.2), (0.2, 0)])
def test_a_watchdog_limit_of_0_is_off_for_its_phase_only(first, later):
    """train.hang_timeout_first=0 turns the first step's limit off (it fired at the watchdog's first tick) and
    train.hang_timeout=0 the later steps' (with the first one's on, the watchdog ran not at all); the message names
    the limit that applied."""
    from qwen2_dist.train.faults import Watchdog

    fired = []
    watchdog = Watchdog(later, first)
    watchdog._fire = lambda idle, limit, key: (fired.append(key), watchdog.stop())
    watchdog.start()
    time.sleep(0.6)
    if first:
        assert fired == ["train.hang_timeout_first"]
        return
    assert fired == []
    watchdog.beat()
    time.sleep(0.6)
    watchdog.stop()
    assert fired == ["train.hang_timeout"]


def test_a_resume_that_moves_the_schedule_says_so_and_one_on_other_data_loads_nothing(tmp_path, caplog, monkeypatch):
    """A job whose schedule gives the resumed step another learning rate warns (the rate jumps); a job on another
    data order is refused before the checkpoint is loaded, unless the train state that disagrees is damaged, which
    is reported as damage (auto-resume then falls back past it)."""
    for name in "abcdef":
        (tmp_path / name).mkdir()
    first = _trainer(tmp_path / "a", "train.steps=4", "optim.lr=1e-2")
    first.fit()
    last = checkpoint.committed_checkpoints(first.checkpointer.ckpt_root)[-1]
    caplog.set_level(logging.INFO, logger="qwen2_dist.train.trainer")
    _trainer(tmp_path / "b", "train.steps=4", "optim.lr=1e-2").restore(last)
    assert "learning-rate schedule" not in caplog.text
    _trainer(tmp_path / "c", "train.steps=8", "optim.lr=1e-2").restore(last)  # a finished cosine, extended
    assert "this job's learning-rate schedule gives step 4 lr 0.0055, where the checkpoint's run used 0.001" \
        in caplog.text
    caplog.clear()  # a checkpoint without optimizer state (an optimizer that skipped every step so far holds none)
    model_only = str(tmp_path / "model_only")
    checkpoint.write(model_only, first.model, None, {"step": 4, "tokens_seen": first.tokens_seen,
                                                    "loader": first.batches.state_dict()}, dict(first.metadata))
    _trainer(tmp_path / "f", "train.steps=8", "optim.lr=1e-2").restore(model_only)
    assert "resume: this job's learning-rate schedule" not in caplog.text  # no rate of its run to compare with

    other = _trainer(tmp_path / "d", "train.steps=8")
    other.batches.seed = 1
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: pytest.fail("the checkpoint was loaded"))
    with pytest.raises(ResumeMismatch, match="the checkpoint read random tokens of seed 0, this job's seed is 1"):
        other.restore(last)
    damaged = tmp_path / "damaged"
    shutil.copytree(last, damaged)
    state = (damaged / "train_state.json").read_text()
    assert '"seed": 0' in state
    (damaged / "train_state.json").write_text(state.replace('"seed": 0', '"seed": 1'))  # same size, other bytes
    with pytest.raises(UserError, match=r"train_state.json: checksum .* the checkpoint is damaged"):
        _trainer(tmp_path / "e", "train.steps=8").restore(str(damaged))


def test_a_stop_between_logging_steps_logs_the_steps_it_ends_with(tmp_path, monkeypatch):
    """SIGTERM at step 3 of a run logging every 4: metrics.jsonl's last record is step 3, the checkpoint's step."""
    trainer = _trainer(tmp_path, "logging.interval=4", "train.steps=8")
    result = _fit_with_sigterm_during_step(trainer, monkeypatch, 3)
    assert result.stopped_by_signal and result.step == 3 and _committed(trainer) == [3]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3] and records[0]["tokens_seen"] == 3 * _tokens_per_step(trainer)


def test_the_profile_summary_leaves_out_a_save_inside_the_profiled_steps(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "train.steps=5", "checkpoint.interval=3", "logging.profile_steps=2:5",
                       "checkpoint.save_final=false")
    step_seconds = _timed_steps(trainer, monkeypatch)
    _slow_saves(trainer, monkeypatch, 1.5)
    trainer.fit()
    summary = (tmp_path / "profile" / "rank0_summary.txt").read_text()
    ms_per_step = float(re.match(r"profiled 3 steps: ([\d.]+) ms/step", summary).group(1))
    profiled = sum(step_seconds[step] for step in (2, 3, 4))
    # Not the save's 1.5 s. (The summary rounds to 0.1 ms: steps of ~4.6 ms each came out 13.8 ms in all, 13.82.)
    assert profiled < 3 * (ms_per_step + 0.05) / 1e3 < profiled + 0.75, (summary, step_seconds)
    assert re.search(r"left out of the wall clock .*: checkpoint save at step 3 \([1-9]\.\d\d s\)$", summary, re.M)


def test_the_watchdog_gives_an_evaluation_and_a_save_each_the_whole_limit(tmp_path, monkeypatch):
    """On a clock that the stand-ins advance (1.2 s a step; after step 2 a 1.5 s evaluation and a 1.5 s save), the
    watchdog hears a beat after each of them: no wait between beats spans two (an evaluation with the save after it,
    or a save with the step after it), which its limit would then have to cover together."""
    from qwen2_dist.train.faults import Watchdog

    now, beats = [0.0], []
    monkeypatch.setattr(Watchdog, "beat", lambda self: beats.append(now[0]))

    def takes(seconds, work):
        def run(*args, **kwargs):
            now[0] += seconds
            return work(*args, **kwargs)
        return run

    trainer = _trainer(tmp_path, "train.steps=3", "eval.interval=2", "checkpoint.interval=2",
                       "checkpoint.save_final=false")
    trainer.evals = [None]  # one eval set, evaluated by the stand-in below
    monkeypatch.setattr(trainer, "train_step", takes(1.2, trainer.train_step))
    monkeypatch.setattr(trainer, "evaluate_all", takes(1.5, lambda beat: ({"eval_loss": 1.0}, "eval")))
    monkeypatch.setattr(trainer, "save", takes(1.5, trainer.save))
    monkeypatch.setattr(trainer, "wait_for_save", takes(1.0, trainer.wait_for_save))  # a commit of a background save
    assert trainer.fit().step == 3 and _committed(trainer) == [2]
    # Steps 1 and 2, the evaluation, the save (with its wait for the previous one), step 3, the evaluation at the
    # run's end, the wait for a save in flight after the last step.
    assert beats == pytest.approx([1.2, 2.4, 3.9, 6.4, 7.6, 9.1, 10.1])


@pytest.mark.parametrize("cause", ["nan", "spike"])
@pytest.mark.parametrize("optim", ["optim.fused=true", "optim.fused=false", "optim.overlap=true"])
def test_a_skipped_step_leaves_the_weights_and_the_optimizer_as_they_were(tmp_path, monkeypatch, optim, cause):
    """Each optimizer path skips its own way (fused AdamW on the device, the others on the host): a step skipped
    for a NaN loss, or for a spike with finite gradients, then a good step, ends where the good step alone does."""
    skipped = _trainer(tmp_path / "skipped", optim)
    if cause == "nan":
        monkeypatch.setenv(INJECT_NAN_ENV, "1")
    else:
        monkeypatch.setattr(skipped.guard, "verdict", lambda loss, grad_norm: torch.ones(()))
    before = {name: p.detach().clone() for name, p in skipped.model.named_parameters()}
    _, grad_norm, _ = skipped.train_step()
    assert bool(torch.isfinite(grad_norm)) == (cause == "spike")
    assert all(torch.equal(p, before[name]) for name, p in skipped.model.named_parameters())
    monkeypatch.undo()  # the NaN or the spike verdict gone: the next step is a good one
    skipped.step = 1
    skipped.train_step()

    alone = _trainer(tmp_path / "alone", optim)
    for _ in range(alone.batches.grad_accum_steps):  # the batch the skipped step read
        alone.batches.next_batch()
    alone.train_step()
    for (name, p), q in zip(skipped.model.named_parameters(), alone.model.parameters()):
        assert torch.equal(p, q), name  # AdamW's moments and step count (its bias correction) untouched


def test_a_halt_for_a_lasting_rise_of_the_loss_names_the_spike_guard(tmp_path, monkeypatch):
    """Only applied steps enter the spike window, so a loss that stays higher is skipped step after step until the
    run halts: the message says that a finite loss was skipped as a spike, and how to train on."""
    from qwen2_dist.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "inject_nan", lambda step, loss: loss * 3 if step >= 5 else loss)
    trainer = _trainer(tmp_path, "train.spike_sigma=3", "train.spike_window=4", "train.max_skipped_in_a_row=2",
                       "logging.interval=1", "train.steps=8")
    with pytest.raises(TrainingHalted, match=r"loss [0-9.]+ is finite: the spike guard skipped it .* "
                       r"train.spike_sigma=0 \(off\)") as halted:
        trainer.fit()
    assert trainer.step == 6, halted.value


@pytest.mark.parametrize("nan_steps, halted_at", [((2, 3), 3), ((2, 4), None)])
def test_the_default_policy_halts_after_max_skipped_in_a_row(tmp_path, monkeypatch, nan_steps, halted_at):
    """train.nonfinite=skip with train.max_skipped_in_a_row=2: two skipped steps in a row halt the run with a
    checkpoint; two apart do not."""
    from qwen2_dist.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "inject_nan", lambda step, loss: loss * float("nan") if step in nan_steps
                        else loss)
    trainer = _trainer(tmp_path, "train.max_skipped_in_a_row=2", "logging.interval=1", "train.steps=5")
    if halted_at is None:
        assert trainer.fit().step == 5 and trainer.guard.counts()[0] == 2
        return
    with pytest.raises(TrainingHalted, match="2 step\\(s\\) in a row skipped"):
        trainer.fit()
    assert trainer.step == halted_at and _committed(trainer) == [halted_at]


@pytest.mark.parametrize("minutes, committed", [(2, [2, 4]), (0, [])])
def test_checkpoint_interval_minutes_saves_by_the_clock(tmp_path, monkeypatch, minutes, committed):
    """Steps of 61 s on the loop's clock: checkpoint.interval_minutes=2 saves after every 2nd step, 0 never."""
    from types import SimpleNamespace

    from qwen2_dist.train import trainer as trainer_module

    trainer = _trainer(tmp_path, "train.steps=4", f"checkpoint.interval_minutes={minutes}", "checkpoint.keep_last=5",
                       "checkpoint.save_final=false")
    passed = [0.0]
    clock = SimpleNamespace(**vars(time))
    clock.monotonic = lambda: time.monotonic() + passed[0]
    monkeypatch.setattr(trainer_module, "time", clock)
    train_step = trainer.train_step

    def slow_step():
        passed[0] += 61.0
        return train_step()

    monkeypatch.setattr(trainer, "train_step", slow_step)
    assert trainer.fit().step == 4
    assert _committed(trainer) == committed


def test_the_logged_data_wait_is_the_share_of_the_window_spent_reading_batches(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "train.steps=2", "logging.interval=2", "checkpoint.save_final=false")
    read_seconds, next_batch = [], trainer.batches.next_batch

    def slow_batch():
        started = time.monotonic()
        time.sleep(0.3)
        batch = next_batch()
        read_seconds.append(time.monotonic() - started)
        return batch

    monkeypatch.setattr(trainer.batches, "next_batch", slow_batch)
    step_seconds = _timed_steps(trainer, monkeypatch)
    started = time.monotonic()
    trainer.fit()
    whole = time.monotonic() - started
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    read, stepped = sum(read_seconds), sum(step_seconds.values())
    # The window holds the steps and lies within fit(): bounds that need no slack for a loaded machine (a fixed 0.5 s
    # for the time outside the steps was exceeded twice under load, 2026-12-07).
    assert 100 * read / whole <= record["data_wait_pct"] <= 100 * read / stepped + 1, (record, read, stepped, whole)


def test_a_run_that_fails_closes_its_metrics_sinks_as_failed(tmp_path, monkeypatch):
    """W&B marked every run "Finished": the sinks were closed without an exit code, a crash or a halt included."""
    from qwen2_dist.train.metrics import MetricsSinks

    closed = []
    monkeypatch.setattr(MetricsSinks, "close", lambda self, exit_code=0: closed.append(exit_code))
    for name in ("ok", "failing"):
        os.makedirs(tmp_path / name)
    _trainer(tmp_path / "ok", "train.steps=1", "checkpoint.save_final=false").fit()
    failing = _trainer(tmp_path / "failing", "train.steps=1")

    def crash():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(failing, "train_step", crash)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        failing.fit()
    assert closed == [0, 1]


@pytest.mark.parametrize("loss", ["chunked", "plain"])
def test_z_loss_is_trained_on_and_logged_apart_from_the_cross_entropy(tmp_path, loss):
    """model.z_loss: the logged loss stays the cross-entropy (step 1: that of the same run without it), z_loss is
    the term per target token (z x the mean lse^2 of the first batch's logits, recomputed here), the term's
    gradient changes the training, and a loss taken without gradients (evaluation) is the cross-entropy alone.
    chunked: the loss in the model's forward; plain: the trainer's own, the path of tensor parallelism."""
    from qwen2_dist.data.synthetic import SyntheticBatches
    from tests.helpers import read_metrics

    runs = {}
    for name, z in (("off", "0"), ("on", "0.1")):
        (tmp_path / name).mkdir()
        runs[name] = _trainer(tmp_path / name, f"model.loss={loss}", f"model.z_loss={z}", "train.steps=3",
                              "logging.interval=1")
    on = runs["on"]
    inputs, targets, _ = SyntheticBatches(on.args.vocab_size, 16, 2, 2, seed=0).next_batch()
    with torch.no_grad():
        lse = torch.logsumexp(on.model(inputs).float(), dim=-1)
        for trainer in runs.values():  # evaluation's loss: the cross-entropy, with or without model.z_loss
            assert float(trainer._loss(inputs, None, targets)) == pytest.approx(
                float(torch.nn.functional.cross_entropy(trainer.model(inputs).float().flatten(0, 1),
                                                        targets.flatten(), reduction="sum")), rel=1e-6)
    for trainer in runs.values():
        trainer.fit()
    records = {name: read_metrics(tmp_path / name) for name in runs}
    assert [r["step"] for r in records["on"]] == [1, 2, 3]
    assert "z_loss" not in records["off"][0]
    assert records["on"][0]["loss"] == pytest.approx(records["off"][0]["loss"], rel=1e-6)
    assert records["on"][0]["z_loss"] == pytest.approx(0.1 * float((lse ** 2).mean()), rel=1e-5)
    # Its gradient was applied: it pulls the log-sum-exp down, below the run's without it.
    with torch.no_grad():
        squares = {name: float((torch.logsumexp(trainer.model(inputs).float(), dim=-1) ** 2).mean())
                   for name, trainer in runs.items()}
    assert squares["on"] < squares["off"] - 5e-3, squares


def test_with_z_loss_a_non_finite_loss_still_shows_in_the_logged_loss(tmp_path, monkeypatch):
    """The logged loss is the cross-entropy recorded apart from the z term: a loss made NaN (here by the fault
    injection, which acts on the whole loss) must still be NaN there, for the log and the guard."""
    from qwen2_dist.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "inject_nan", lambda step, loss: loss * float("nan") if step == 1 else loss)
    trainer = _trainer(tmp_path, "model.z_loss=1e-4")
    loss, _, _ = trainer.train_step()
    assert torch.isnan(loss) and trainer.guard.counts()[0] == 1
    trainer.step += 1  # as fit() counts it
    loss, _, _ = trainer.train_step()
    assert torch.isfinite(loss) and trainer.guard.counts()[0] == 1
