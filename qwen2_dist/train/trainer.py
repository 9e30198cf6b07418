"""The training loop: batches -> forward -> loss over the global token count -> backward -> clip -> step."""

import contextlib
import dataclasses
import gc
import logging
import math
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from qwen2_dist.config import BatchSchedule, JobConfig, inductor_options, uses_bf16
from qwen2_dist.data.loader import TokenBatches
from qwen2_dist.errors import ResumeMismatch, UserError
from qwen2_dist.model.args import ModelArgs
from qwen2_dist.model.loss import IGNORE_INDEX, ZLoss, plain_z_term, resolve_loss, vocab_parallel_z_term
from qwen2_dist.parallel.mesh import World, agree_any, agree_max, all_reduce_sum, dp_rank_and_size
from qwen2_dist.parallel.parallelize import (
    compile_enabled, float8_scale_precompute, loss_context, set_gradient_sync,
)
from qwen2_dist.train import checkpoint
from qwen2_dist.train import tasks as task_rows
from qwen2_dist.train.faults import StepGuard, TrainingHalted, Watchdog, inject_hang, inject_nan
from qwen2_dist.train.metrics import (
    MetricsSinks,
    StepProfiler,
    flops_per_token,
    format_step,
    memory_gib,
    peak_flops,
    synchronize,
)
from qwen2_dist.train.optim import clip_gradients, lr_at, norms_by_block, set_lr

log = logging.getLogger(__name__)


def _plain(value):
    """An optimizer setting as a comparable value (betas come back from a checkpoint as a list or a tuple)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def found_inf_on(skip: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The skip verdict on the device of the optimizer's parameters, there when this returns.

    The fused AdamW moves found_inf to its parameters' device itself, without blocking: from a GPU to the CPU
    (parallel.cpu_offload) such a copy lands in pinned memory after the CPU kernel has read it, which may then apply
    a step that was to be skipped. On the same device this is the tensor itself (no copy, no sync)."""
    return skip if skip.device == device else skip.to(device)


@dataclass
class TrainResult:
    """How a run ended."""

    step: int
    tokens_seen: int
    last_loss: float | None
    stopped_by_signal: bool
    saved_step: int = -1  # the step of the newest checkpoint this run committed (-1: none)


@dataclass
class EvalSet:
    """Held-out samples evaluated together: the first `samples` of `batches`' one step (None: all of them; the rows
    past them pad the last micro-batches, so that the same samples are evaluated on any layout)."""

    batches: TokenBatches
    samples: int | None = None
    name: str | None = None
    """The source's name in a mixture (logged as eval_loss/NAME); None for the one source of a job."""
    weight: float = 1.0
    """The source's share of training, which weighs its loss in the mixture's eval_loss."""
    extra: bool = False
    """One of eval.datasets: evaluated only, logged as eval_loss/NAME, not part of eval_loss."""

    def counted(self) -> int:
        """How many held-out samples an evaluation counts."""
        return self.batches.global_batch_size if self.samples is None else self.samples


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (preemption); the loop saves and leaves at the end of the current step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        log.warning("received %s: saving a checkpoint after this step and stopping", signal.Signals(signum).name)


class Trainer:
    """Owns the loop; everything it needs is built beforehand (see qwen2_dist.cli.train)."""

    def __init__(
        self,
        cfg: JobConfig,
        args: ModelArgs,
        world: World,
        mesh: DeviceMesh | None,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: TokenBatches,
        metadata: dict,
        evals: list[EvalSet] | tuple = (),
        evals_complete: bool = True,
        tasks: list[task_rows.Task] | tuple = (),
    ):
        self.cfg, self.args, self.world, self.mesh = cfg, args, world, mesh
        self.model, self.optimizer, self.batches = model, optimizer, batches
        self.evals = list(evals)
        # Every source of the job has a held-out split: a mixture's eval_loss weighs all of them.
        self.evals_complete = evals_complete
        self.tasks = list(tasks)  # eval.tasks, scored at each evaluation
        self.metadata = metadata
        self.checkpointer = checkpoint.Checkpointer(
            os.path.join(cfg.run_dir, "checkpoints"), cfg.checkpoint.keep_last, cfg.checkpoint.keep_every,
            async_save=cfg.checkpoint.async_save is True
            or (cfg.checkpoint.async_save == "auto" and world.device.type == "cuda"),
            checksums=cfg.checkpoint.checksums, timeout_minutes=cfg.train.pg_timeout_minutes,
        )
        self.guard = StepGuard(world.device, cfg.train.spike_sigma, cfg.train.spike_window)
        # The fused AdamW skips a flagged step on the device; the others need the verdict on the host.
        self.device_skip = bool(optimizer.defaults.get("fused"))
        first = optimizer.param_groups[0]["params"][0]
        self.params_device = (first.to_local() if isinstance(first, DTensor) else first).device  # cpu_offload: CPU
        self.in_backward = bool(optimizer.defaults.get("in_backward"))
        # model.float8 under FSDP: the next all-gathers' float8 scales, all taken after each step in one all-reduce.
        self.float8_scales = float8_scale_precompute(model)
        self.step = 0
        self.saved_step = -1  # the step of the newest committed checkpoint of this run's state (-1: none yet)
        self.resumed = False  # restored from a checkpoint of this run's own (not another run's, as a starting point)
        self.saving_step: int | None = None  # the step of a save still being written in the background
        self.tokens_seen = 0
        _, self.dp_size = dp_rank_and_size(mesh)
        self.flops_per_token = flops_per_token(args, cfg.train.seq_len)
        self.peak_flops = peak_flops(world.device, cfg.logging.peak_tflops and cfg.logging.peak_tflops * 1e12)
        tp = mesh["tp"].size() if mesh is not None else 1
        # The loss inside the model's forward (model.loss chunked or liger), or logits out and the loss here.
        loss_impl = resolve_loss(cfg.model.loss, tp, world.device.type, cfg.model.z_loss)
        self.loss_in_model = loss_impl != "plain"
        compiled = compile_enabled(cfg.parallel, world.device.type, cfg.model.kernels)
        model.set_loss(loss_impl, cfg.model.loss_chunk_tokens, compiled, inductor_options(cfg.parallel),
                       masked=cfg.data.eod_mask_loss, z_loss=cfg.model.z_loss)
        # model.z_loss: the parts of the last training loss (cross-entropy, the z term), recorded where it is made.
        self.z = model.z_loss if self.loss_in_model else ZLoss(cfg.model.z_loss)
        self.last_z_loss: torch.Tensor | None = None  # the last step's z term per target token (device scalar)
        self.norms_due = False  # logging.norms: take them in the next train_step (a logging step)
        self.last_norms: dict[str, torch.Tensor] | None = None
        model.set_kernels(cfg.model.kernels, cfg.model.fuse_projections, world.device.type)
        # One process computes in bf16 under autocast; FSDP does it with its bf16 weights.
        use_autocast = mesh is None and uses_bf16(cfg.train, world.device.type)
        self.autocast = (
            torch.autocast(world.device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
        )

    def restore(self, path: str) -> None:
        """Continue from a committed checkpoint: weights, optimizer, step, tokens and data position. The optimizer's
        settings are this job's (loading its state also loads the saved ones: weight_decay, betas, eps, and fused
        or foreach, which the step relies on; the learning rate is set every step anyway): a resumed job that
        changes them trains with the new ones, as it says."""
        other_data = self._check_data_position(path)
        self.resumed = checkpoint.in_run(os.path.join(self.cfg.run_dir, "checkpoints"), path)
        settings = [{key: value for key, value in group.items() if key != "params"}
                    for group in self.optimizer.param_groups]
        state = checkpoint.load(path, self.model, self.optimizer, self.cfg.checkpoint.checksums)
        if "optim" in checkpoint.read_metadata(path)["contents"]:  # else the rate it ran at is not in it
            self._warn_if_the_schedule_moved(state.get("step", 0))
        changed = set()
        for group, wanted in zip(self.optimizer.param_groups, settings):
            for key, value in wanted.items():
                if key not in ("lr", "initial_lr") and _plain(group.get(key)) != _plain(value):
                    changed.add(f"{key} {group.get(key)} -> {value}")
                group[key] = value
        if changed:
            log.info("resume: the optimizer takes this job's settings, not the checkpoint's: %s",
                     ", ".join(sorted(changed)))
        self.step = state.get("step", 0)
        self.saved_step = self.step
        self.tokens_seen = state.get("tokens_seen", 0)
        self.guard.load_state_dict(state.get("guard", {}))
        if other_data is not None:
            self.batches.start_stage(self.step)
            self.guard.forget_losses()
            if self.world.is_main or other_data:  # a rank that found what changed says it, in its own log
                log.warning("data.new_stage=true: checkpoint %s (step %d) was trained on other data (%s); its "
                            "weights, optimizer, step and schedule go on with this job's data from its first sample "
                            "(the spike guard's loss window starts anew)", path, self.step,
                            other_data or "another rank's log says what changed")
        elif "loader" in state:
            self.batches.load_state_dict(state["loader"], self.step)

    def _check_data_position(self, path: str) -> str | None:
        """ResumeMismatch, before the checkpoint's weights and optimizer state are read, when its data position
        cannot continue on this job's data (another order, other sources); with data.new_stage, what changed
        instead ('' where another rank found it; None: the position continues). The ranks agree first; a checkpoint
        that disagrees is verified before, so that a damaged file is reported as damage (and auto-resume falls back
        past it) rather than as changed data."""
        loader_state = checkpoint.peek_train_state(path).get("loader")
        problem = self.batches.state_problem(loader_state) if isinstance(loader_state, dict) else None
        change = self.batches.data_change(loader_state) if problem else ""
        if agree_any([problem is not None])[0]:  # every rank reads the same file: the same message, but for I/O
            checkpoint.verify(path, self.cfg.checkpoint.checksums)
            # Not for a position of an older loader (change None), which may be of this very data.
            if self.cfg.data.new_stage and not agree_any([change is None])[0]:
                return change
            raise ResumeMismatch(problem or "another rank found that the checkpoint's data position does not fit "
                                 "this job's data; its log says how")
        return None

    def _warn_if_the_schedule_moved(self, step: int) -> None:
        """A WARNING when this job's schedule (train.steps, optim.lr, warmup, decay, schedule) gives the resumed step
        another learning rate than the one the checkpoint's run used there: the rate jumps at the next step."""
        if step <= 0:
            return
        used = float(self.optimizer.param_groups[0]["lr"])
        now = lr_at(step, self.cfg.train.steps, self.cfg.optim)
        if not math.isclose(used, now, rel_tol=1e-4, abs_tol=1e-12):
            log.warning("resume: this job's learning-rate schedule gives step %d lr %.3g, where the checkpoint's run "
                        "used %.3g; the next step trains at %.3g (train.steps, optim.lr, optim.warmup_steps, "
                        "optim.decay_steps or optim.schedule changed; with the WSD schedule, extend train.steps "
                        "before the decay starts)", step, now, used,
                        lr_at(step + 1, self.cfg.train.steps, self.cfg.optim))

    def save(self, blocking: bool = False, retain: bool = True) -> str | None:
        """Save a checkpoint of the current step (committed now, or in the background when async); retain=False
        deletes none of the older ones."""
        train_state = {"step": self.step, "tokens_seen": self.tokens_seen, "loader": self.batches.state_dict(),
                       "guard": self.guard.state_dict()}
        meta = dict(self.metadata, tokens_seen=self.tokens_seen)
        self.wait_for_save()  # the previous background save first (Checkpointer.save would, without telling us)
        path = self.checkpointer.save(self.step, self.model, self.optimizer, train_state, meta, blocking=blocking,
                                      retain=retain)
        if path is not None and self.checkpointer.pending_done() is None:
            self.saved_step = self.step  # committed
        elif path is not None:
            self.saving_step = self.step  # committed by wait_for_save(), if the background write succeeds
        return path

    def wait_for_save(self) -> bool:
        """Commit a background save (collective); saved_step follows only when it committed. False if it failed."""
        committed = self.checkpointer.wait()
        if committed and self.saving_step is not None:
            self.saved_step = self.saving_step
        self.saving_step = None
        return committed

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step (of the batches' next global batch, train.batch_rampup's size at this step); returns
        (loss, grad norm) as device tensors and the seconds spent on data."""
        inject_hang(self.step + 1, self.world.rank)
        data_started = time.monotonic()
        tokens_in_step = self.batches.global_batch_size * self.cfg.train.seq_len
        micro_batches = [self.batches.next_batch() for _ in range(self.batches.grad_accum_steps)]
        data_seconds = time.monotonic() - data_started
        device = self.world.device
        # Normalize by the number of counted targets of the whole global batch, so the result is the same whatever
        # the layout and accumulation split. Without data.eod_mask_loss every sample holds seq_len of them (packed,
        # none ignored): a constant, so no collective and no host-to-device copy each step. With it, each rank
        # counts its targets on the host, where the batches still are, and the ranks sum the counts on the device
        # before the first backward (no wait for the GPU; a step of nothing but ignored targets has loss 0).
        if self.cfg.data.eod_mask_loss:
            counted = sum(int((b.targets != IGNORE_INDEX).sum()) for b in micro_batches)
            global_tokens = all_reduce_sum(self._to_device(torch.tensor(float(counted))), self.mesh).clamp_min(1.0)
        else:
            global_tokens = float(tokens_in_step)
            assert sum(b.targets.numel() for b in micro_batches) * self.dp_size == global_tokens, "samples of seq_len"
        loss_sum = torch.zeros((), device=device)
        z_sum = torch.zeros((), device=device) if self.z.coefficient else None
        for index, (inputs, targets, positions) in enumerate(micro_batches):
            set_gradient_sync(self.model, index == len(micro_batches) - 1, self.cfg.parallel.reduce_every_micro_batch)
            if hasattr(self.optimizer, "last_micro_batch"):  # optim.overlap takes the norm during the last backward
                self.optimizer.last_micro_batch(index == len(micro_batches) - 1)
            targets = self._to_device(targets)
            with loss_context(self.mesh):  # vocabulary-parallel cross-entropy (and its backward) when tp > 1
                loss = self._loss(inputs, positions, targets)
                loss = inject_nan(self.step + 1, loss)
                if self.in_backward:
                    self.optimizer.skip_if(~torch.isfinite(loss))
                (loss / global_tokens).backward()
            if z_sum is not None:
                # The log's loss is the cross-entropy, the z term logged apart; plus the objective less itself (0
                # when finite), so that a non-finite loss (a fault, or one injected) still shows there and to the
                # guard.
                objective, term = loss.detach(), self.z.term
                loss = self.z.cross_entropy + (objective - objective)
                z_sum += term.full_tensor() if isinstance(term, DTensor) else term
            loss_sum += loss.detach().full_tensor() if isinstance(loss, DTensor) else loss.detach()
        # logging.norms: before the clip (clip_grad_norm_ scales the gradients in place)
        self.last_norms = norms_by_block(self.model) if self.norms_due else None
        if self.in_backward:
            grad_norm = self.optimizer.grad_norm()  # the updates are done; nothing to clip or step
        else:
            grad_norm = clip_gradients(self.model, self.optimizer, self.cfg.train.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        if z_sum is None:
            loss = all_reduce_sum(loss_sum, self.mesh) / global_tokens
        else:  # one collective for both
            loss, self.last_z_loss = all_reduce_sum(torch.stack([loss_sum, z_sum]), self.mesh) / global_tokens
        skip = self.guard.verdict(loss, grad_norm)  # identical on every rank: loss and norm are global
        if self.device_skip:
            self.optimizer.found_inf = found_inf_on(skip, self.params_device)
            self.optimizer.step()
        elif not self.in_backward and not skip.item():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.float8_scales is not None:  # after a skipped update too: the same weights, the same scales
            self.float8_scales()
        return loss, grad_norm, data_seconds

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch tensor on the training device. From pinned memory on CUDA: a copy from pageable memory makes the
        host wait until the GPU has finished its queue, so the next step's kernels could not be queued ahead."""
        if self.world.device.type == "cuda" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.world.device, non_blocking=True)

    def _loss(self, inputs: torch.Tensor, positions: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of one micro-batch (targets on the device); positions (restarting per document)
        switch document masking on."""
        if positions is not None:
            positions = self._to_device(positions)
        inputs = self._to_device(inputs)
        with self.autocast:
            if self.loss_in_model:
                return self.model(inputs, positions, mask_documents=positions is not None, targets=targets)
            logits = self.model(inputs, positions, mask_documents=positions is not None)
        logits, targets = logits.float().flatten(0, 1), targets.flatten()
        loss = F.cross_entropy(logits, targets, reduction="sum")
        if not (self.z.coefficient and torch.is_grad_enabled() and logits.requires_grad):  # evaluation: cross-entropy
            return loss
        z_term = vocab_parallel_z_term if isinstance(logits, DTensor) else plain_z_term
        term = z_term(logits, targets, self.z.coefficient)
        self.z.record(loss, term)
        return loss + term

    @torch.no_grad()
    def evaluate(self, batches: TokenBatches, samples: int | None = None) -> float:
        """Mean loss per target token over the first `samples` held-out samples of `batches`' one step (None: all
        of it): the same samples at every evaluation, and on every layout (the rows past them, which fill the last
        micro-batches, have their targets ignored)."""
        batches.seek(0)
        device = self.world.device
        evaluated = batches.global_batch_size if samples is None else samples
        loss_sum = torch.zeros((), device=device)
        num_tokens = 0
        for micro in range(batches.grad_accum_steps):
            inputs, targets, positions = batches.next_batch()
            padding = torch.from_numpy(batches.rows_in_step(micro) >= evaluated)
            if padding.any():  # every rank runs every micro-batch: the collectives of FSDP and TP need them all
                targets = targets.masked_fill(padding[:, None], IGNORE_INDEX)
            with loss_context(self.mesh):
                loss = self._loss(inputs, positions, self._to_device(targets))
            loss_sum += loss.full_tensor() if isinstance(loss, DTensor) else loss
            num_tokens += int((targets != IGNORE_INDEX).sum())  # padding rows, and first tokens with eod_mask_loss
        global_tokens = all_reduce_sum(torch.tensor(float(num_tokens), device=device), self.mesh)
        return (all_reduce_sum(loss_sum, self.mesh) / global_tokens).item()

    def _row_losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each row's summed cross-entropy (micro_batch_size,) of one micro-batch, without gradients. Under
        data.document_masking each row is one document, passed as training passes documents (the same attention
        path, and the same compiled graph)."""
        inputs, targets = self._to_device(inputs), self._to_device(targets)
        masked = self.cfg.data.document_masking
        positions = torch.arange(inputs.shape[1], device=inputs.device).expand(len(inputs), -1) if masked else None
        with loss_context(self.mesh), self.autocast:
            if self.loss_in_model:
                return self.model(inputs, positions, mask_documents=masked, targets=targets, per_row=True)
            logits = self.model(inputs, positions, mask_documents=masked)
            losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        if isinstance(losses, DTensor):  # vocabulary-parallel: each token's loss, replicated
            losses = losses.full_tensor()
        return losses.view(len(inputs), -1).sum(-1)

    @torch.no_grad()
    def task_log_likelihoods(self, task: task_rows.Task) -> np.ndarray:
        """Each row's log-likelihood of its choice, for one of eval.tasks (on every rank): the rows dealt out over
        the data-parallel ranks (a tensor-parallel group scores the same rows), then summed over them."""
        dp_rank, dp_size = dp_rank_and_size(self.mesh)
        micro_batch_size = self.cfg.train.micro_batch_size
        scores = torch.zeros(len(task.tokens), dtype=torch.float64, device=self.world.device)
        for micro in range(task_rows.micro_batches(task, micro_batch_size, dp_size)):
            rows = task_rows.rows_of(task, micro, micro_batch_size, dp_rank, dp_size)
            losses = self._row_losses(*task_rows.batch(task, rows))
            real = [slot for slot, row in enumerate(rows) if row >= 0]
            if real:  # every rank runs every micro-batch, padding too: FSDP's and TP's collectives need them all
                scores[[rows[slot] for slot in real]] = -losses[real].double()
        return all_reduce_sum(scores, self.mesh).cpu().numpy()

    def evaluate_all(self, beat=lambda: None) -> tuple[dict, str]:
        """Every eval set's loss as metrics (eval_loss for one source; eval_loss/NAME per source of a mixture, and
        eval_loss their mean weighted by the training shares when every source has a held-out split; eval_loss/NAME
        for each of eval.datasets; task_acc/NAME and task_acc_norm/NAME for each of eval.tasks), and the log line's
        text. beat: called after each eval set and task (the hang watchdog's limit is for each). The CPU random
        generator is left as it was: each eval set's DataLoader draws its base seed from it, so the state a
        checkpoint saves (and whatever draws from it next) depended on whether and how often evaluation ran."""
        with torch.random.fork_rng(devices=[]):
            return self._evaluate_all(beat)

    def _evaluate_all(self, beat) -> tuple[dict, str]:
        trained = [ev for ev in self.evals if not ev.extra]
        losses = {}
        for ev in self.evals:
            losses[ev.name] = self.evaluate(ev.batches, ev.samples)
            beat()
        record, parts = {}, []
        if len(trained) == 1 and trained[0].name is None:
            record["eval_loss"] = losses[None]
            parts.append(f"eval_loss {losses[None]:.4f} on {trained[0].counted()} held-out samples")
        else:
            if trained and self.evals_complete:
                total = sum(ev.weight for ev in trained)
                record["eval_loss"] = sum(ev.weight / total * losses[ev.name] for ev in trained)
                parts.append(f"eval_loss {record['eval_loss']:.4f} (weighted as in training) |")
            if trained:
                parts.append(", ".join(f"{ev.name} {losses[ev.name]:.4f} on {ev.counted()}" for ev in trained)
                             + " held-out samples")
        extras = [ev for ev in self.evals if ev.extra]
        for ev in self.evals:
            if ev.name is not None:
                record[f"eval_loss/{ev.name}"] = losses[ev.name]
        if extras:
            parts.append(("| " if parts else "") + "eval.datasets: " + ", ".join(
                f"{ev.name} {losses[ev.name]:.4f} on {ev.counted()}" for ev in extras) + " samples")
        scored = []
        for task in self.tasks:
            acc, acc_norm = task_rows.accuracies(task, self.task_log_likelihoods(task))
            beat()
            record[f"task_acc/{task.name}"], record[f"task_acc_norm/{task.name}"] = acc, acc_norm
            scored.append(f"{task.name} acc {acc:.4f} acc_norm {acc_norm:.4f} on {task.examples}")
        if scored:
            parts.append(("| " if parts else "") + "eval.tasks: " + ", ".join(scored) + " examples")
        return record, " ".join(parts)

    def fit(self) -> TrainResult:
        """Train from the current step up to train.steps, logging, checkpointing and honouring preemption."""
        cfg = self.cfg
        lg = cfg.logging
        # eval.at_start: a run starting at step 0 logs step 0's evaluation (a record of it from an earlier start, which
        # trained no step that was kept, moves aside with the others). Not on a resume, also not of a checkpoint of
        # this run at step 0 (train.stop_at=0); a start from another run's checkpoint at step 0 (checkpoint.resume=
        # of what qwen2-convert from-hf wrote) is the start of this one: evaluated (it was skipped, unsaid).
        start_eval = cfg.eval.at_start and self.step == 0 and not self.resumed and bool(self.evals or self.tasks)
        writer = MetricsSinks(cfg.run_dir, self.world.is_main, lg.tensorboard, lg.wandb, lg.wandb_project,
                              lg.wandb_mode, config=dataclasses.asdict(cfg), from_step=self.step,
                              logs_start=start_eval)
        profiler = StepProfiler(lg.profile_steps, cfg.run_dir, self.world.rank, self.world.device)
        if lg.profile_steps and self.world.is_main and profiler.start < self.step + 1 <= cfg.train.steps:
            if self.step + 1 < profiler.end:
                log.info("logging.profile_steps=%s: the run starts at step %d, inside the range: steps %d-%d are "
                         "traced (the first of them builds and warms up again)", lg.profile_steps, self.step + 1,
                         self.step + 1, profiler.end - 1)
            else:
                log.warning("logging.profile_steps=%s: the run starts at step %d, past the range: nothing is traced; "
                            "set a range of later steps to profile this run", lg.profile_steps, self.step + 1)
        record_oom = lg.memory_snapshot_on_oom and self.world.device.type == "cuda"
        if record_oom:
            # Python stacks only: the C++ ones (torch's default, stacks="all") cost an unwind at every allocation.
            torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
        stop = StopFlag()
        last_loss, stopped = None, False
        window_started, window_tokens, window_data = time.monotonic(), 0, 0.0
        last_save = time.monotonic()
        watchdog = Watchdog(cfg.train.hang_timeout, cfg.train.hang_timeout_first,
                            os.path.join(cfg.run_dir, "logs", f"rank{self.world.rank}.log")).start()
        if self.step >= cfg.train.steps:
            log.info("run already complete: step %d of train.steps=%d", self.step, cfg.train.steps)
        exit_code = 1  # a crash, a halt or an interrupt marks the W&B run failed; a stop by signal returns: 0
        gc_interval = cfg.train.gc_interval
        # train.gc_interval: every rank collects at the same steps, none at a step of its own (a gc the caller
        # switched off stays off).
        gc_paused = bool(gc_interval) and gc.isenabled()
        freezes = gc_paused and gc.get_freeze_count() == 0  # objects the caller froze stay its to thaw
        try:
            if gc_paused:
                gc.disable()
                gc.collect()  # what building the job left, once
            if freezes:
                # What is alive now (the imported modules, the model, the data's objects) is left out of every
                # later collection: the full ones after saves and evaluations visit what training allocated, not a
                # heap of millions of objects (0.25 s each for a tiny model's run on a 2-core CPU, 2026-12-07).
                gc.freeze()
            window_started = time.monotonic()  # the collection above is not training time
            if start_eval:
                eval_record, eval_text = self.evaluate_all(beat=watchdog.beat)
                writer.write({"step": 0, **eval_record, "time": time.time()})
                if self.world.is_main:
                    log.info("step 0 (eval.at_start) | %s", eval_text)
                watchdog.rearm_first()  # step 1 still compiles and allocates: train.hang_timeout_first is its limit
                window_started = last_save = time.monotonic()  # evaluation is neither training nor save time
            last_step = cfg.train.steps if cfg.train.stop_at is None else min(cfg.train.steps, cfg.train.stop_at)
            last_samples = None
            while self.step < last_step:
                lr = lr_at(self.step + 1, cfg.train.steps, cfg.optim)
                set_lr(self.optimizer, lr)
                step_samples = self.batches.global_batch_size  # train.batch_rampup's, at this step
                if self.world.is_main and cfg.train.batch_rampup and step_samples != last_samples:
                    log.info("step %d: global batch %d samples (train.batch_rampup: %s)", self.step + 1, step_samples,
                             BatchSchedule.of(cfg.train).describe())
                last_samples = step_samples
                profiler.before_step(self.step + 1)
                self.norms_due = lg.norms and ((self.step + 1) % lg.interval == 0 or self.step + 1 == last_step)
                try:
                    loss, grad_norm, data_seconds = self.train_step()
                except torch.OutOfMemoryError:
                    if record_oom:
                        path = os.path.join(cfg.run_dir, f"oom_snapshot_rank{self.world.rank}.pickle")
                        torch.cuda.memory._dump_snapshot(path)
                        log.error("out of memory at step %d: allocation history written to %s (open it at "
                                  "https://pytorch.org/memory_viz)", self.step + 1, path)
                    raise
                # Writing a trace is not training: out of the window's time, as a save is.
                window_started += profiler.after_step(self.step + 1)
                watchdog.beat()
                self.step += 1
                self.tokens_seen += step_samples * cfg.train.seq_len
                window_tokens += step_samples * cfg.train.seq_len
                window_data += data_seconds
                if gc_paused and self.step % gc_interval == 0:
                    gc.collect(1)
                # Every eval.interval steps and at the end of the run (not at a train.stop_at before it).
                eval_due = bool(self.evals or self.tasks) and (
                    self.step % cfg.eval.interval == 0 or self.step == cfg.train.steps)
                minutes = cfg.checkpoint.interval_minutes
                write_pending = self.checkpointer.pending_done() is False
                stop_now, time_due, still_writing = agree_any([
                    stop.requested, bool(minutes) and time.monotonic() - last_save >= 60 * minutes, write_pending,
                ])
                # A stop logs the steps since the last logged one: the run's record ends where its checkpoint does.
                if self.step % cfg.logging.interval == 0 or self.step == last_step or eval_due or stop_now:
                    # The host runs ahead of the GPU: the window ends when the work queued so far is done.
                    synchronize(self.world.device)
                    elapsed = time.monotonic() - window_started
                    last_loss = loss.item()
                    skipped, in_a_row = self.guard.counts()  # the longest run since the last logged step
                    tokens_per_sec = window_tokens / elapsed
                    record = {
                        "step": self.step,
                        "loss": last_loss,
                        "lr": lr,
                        "grad_norm": grad_norm.item(),
                        "tokens_per_sec": tokens_per_sec,
                        "tokens_seen": self.tokens_seen,
                        "mfu": (tokens_per_sec / self.world.world_size * self.flops_per_token / self.peak_flops)
                        if self.peak_flops else None,
                        "mem_gib": agree_max([memory_gib(self.world.device)])[0],  # the rank nearest its limit
                        "data_wait_pct": 100.0 * window_data / elapsed,
                        "skipped_steps": skipped,
                        "time": time.time(),
                    }
                    if self.last_z_loss is not None:
                        record["z_loss"] = self.last_z_loss.item()
                    if self.last_norms is not None:  # one copy to the host (CPU-offloaded weights' norms moved)
                        values = torch.stack([norm.to(self.world.device) for norm in self.last_norms.values()])
                        record.update(zip(self.last_norms, values.tolist()))
                        self.last_norms = None
                    if eval_due:  # after the window's clock stopped: evaluation time is not training time
                        eval_started = time.monotonic()
                        eval_record, eval_text = self.evaluate_all(beat=watchdog.beat)
                        if gc_paused:  # the oldest generation too, at a step every rank evaluates
                            gc.collect()
                        record.update(eval_record)
                        profiler.leave_out(f"evaluation at step {self.step}", time.monotonic() - eval_started)
                        watchdog.beat()  # the limit is for each step, evaluation and save, not for their sum
                    writer.write(record)
                    if self.world.is_main:
                        log.info(format_step(record))
                        if eval_due:
                            log.info("step %d | %s", self.step, eval_text)
                    window_started, window_tokens, window_data = time.monotonic(), 0, 0.0
                    limit = 1 if cfg.train.nonfinite == "halt" else cfg.train.max_skipped_in_a_row
                    if in_a_row >= limit:
                        spike_note = self.guard.spike_note(last_loss, record["grad_norm"])
                        self.guard.forget_streak()
                        # Without retention: the checkpoints before the bad stretch are the ones to roll back to.
                        self.save(blocking=True, retain=False)
                        raise TrainingHalted(
                            f"step {self.step}: {in_a_row} step(s) in a row skipped for a non-finite or spiking "
                            f"loss/gradient (train.nonfinite={cfg.train.nonfinite}, train.max_skipped_in_a_row="
                            f"{cfg.train.max_skipped_in_a_row}); saved {self.saved_step}. Lower optim.lr or "
                            "roll back to an earlier checkpoint with checkpoint.resume=PATH (the newer ones are "
                            "moved to checkpoints/abandoned-*; to one the run was rolled back to before, delete "
                            f"checkpoints/rollback.json first).{spike_note}"
                        )
                if self.checkpointer.pending_done() is not None and not still_writing:
                    synchronize(self.world.device)  # as for a save: the queued training work is the window's
                    commit_started = time.monotonic()
                    self.wait_for_save()  # the commit: a collective (retention's deletes go on in the background)
                    watchdog.beat()  # the limit is for each step, evaluation and save, not for their sum
                    committed = time.monotonic()
                    window_started += committed - commit_started
                    profiler.leave_out(f"checkpoint commit at step {self.step}", committed - commit_started)
                if stop_now:
                    profiler.close(self.step)  # the trace ends with the last step, before the save
                    watchdog.beat()
                    self.save(blocking=True)  # (commits one in flight first)
                    if self.saved_step != self.step:  # the stop goes on (a requeue resumes the older checkpoint)
                        log.error("stop: the checkpoint of step %d could not be written (the error is above); the "
                                  "next start resumes from %s", self.step,
                                  f"step {self.saved_step}" if self.saved_step >= 0 else "the start")
                    stopped = True
                    break
                interval = cfg.checkpoint.interval
                if (interval and self.step % interval == 0) or time_due:
                    synchronize(self.world.device)  # the queued training work is the window's, not the save's
                    save_started = time.monotonic()
                    self.save()
                    if gc_paused:  # objects promoted to the oldest generation, which gc.collect(1) never visits
                        gc.collect()
                    last_save = time.monotonic()
                    window_started += last_save - save_started  # the save's time is not the window's training time
                    profiler.leave_out(f"checkpoint save at step {self.step}", last_save - save_started)
                    watchdog.beat()
            profiler.close(self.step)  # a trace ending past the last step ends with it, before the saves below
            # Commit a background save still in flight, before deciding whether the last step has a checkpoint (a
            # failed background save of it is written again, blocking). Not on an exception: the commit is
            # collective, and a failed rank would never join it; the uncommitted shards are cleaned at the next start.
            self.wait_for_save()
            watchdog.beat()
            # train.stop_at stops with a checkpoint whatever checkpoint.save_final says.
            if (cfg.checkpoint.save_final or self.step < cfg.train.steps) and not stopped and \
                    self.saved_step != self.step:
                self.save(blocking=True)
                if self.saved_step != self.step:  # "done" and exit 0 would hide that the run's end is not saved
                    raise UserError(
                        f"the checkpoint of step {self.step}, where this job ends, could not be written (the storage "
                        f"error is logged above): the training since "
                        f"{f'step {self.saved_step}' if self.saved_step >= 0 else 'the start'} is not saved. Fix "
                        "the storage (space, permissions, quota) and run the same command again: it resumes from "
                        "the newest committed checkpoint")
            exit_code = 0
        finally:
            if freezes:
                gc.unfreeze()
            if gc_paused:
                gc.enable()
            watchdog.stop()
            profiler.close(self.step)
            writer.close(exit_code)
            checkpoint.wait_for_deletes()
        return TrainResult(self.step, self.tokens_seen, last_loss, stopped, self.saved_step)
