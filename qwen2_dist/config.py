"""The typed schema of a job (registered in Hydra's ConfigStore) and validate(), which refuses impossible jobs early."""

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from hydra.core.config_store import ConfigStore

from qwen2_dist.errors import CheckpointNotLoadable, UserError
from qwen2_dist.fsutil import check_writable_dir, reads_in_place

SCHEDULES = ("cosine", "linear", "sqrt", "constant")
"""optim.schedule: the shape of the learning-rate decay after warmup."""


def compile_fails_with_recompute_under_tp(p: "ParallelConfig") -> bool:
    """Whether this torch cannot compile a tensor-parallel block that is recomputed whole: torch 2.12 and 2.13 fail
    with "expected all tensors_saved_with_vc_check to be Tensors, got ... DeviceMesh" (activation_checkpointing full
    or selective, tp > 1); 2.11, 2.14.0 and 2.14.1 compile it and train as eager (measured on the CPU, 2 ranks:
    2.11 and 2.13 on 2026-11-26, 2.12 and 2.14 on 2026-11-27)."""
    if p.tp <= 1 or p.activation_checkpointing not in ("full", "selective"):
        return False
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(part) for part in version("torch").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (2, 12) <= (major, minor) < (2, 14)


PG_TIMEOUT_MAX_MINUTES = 1e7
"""train.pg_timeout_minutes' largest value; Python's timedelta ends at 1.44e12 minutes."""


def inductor_options(p: "ParallelConfig") -> dict[str, Any]:
    """parallel.compile_options as torch.compile takes them: nested keys joined with dots, each one checked against
    this torch's Inductor settings (a misspelled name would otherwise fail at the first compile, on every rank, in
    a message listing hundreds of names)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = value

    walk("", dict(p.compile_options or {}))
    if not flat:
        return flat
    import torch._inductor.config as inductor_config

    known = set(inductor_config.get_config_copy())
    for name, value in flat.items():
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise UserError(f"parallel.compile_options.{name}: this torch's Inductor has no setting {name!r}{hint} "
                            "(the names are those of torch._inductor.config)")
        # Its type, checked as torch.compile checks it (a plain type only), which otherwise failed at the first
        # compile, on every rank. A boolean given as 1/0 or a quoted 'true' is taken as the boolean it names.
        expected = inductor_config.get_type(name) if hasattr(inductor_config, "get_type") else None
        if not isinstance(expected, type) or typing.get_origin(expected) is not None:
            continue
        if expected is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            flat[name] = value.lower() == "true"
        elif expected is bool and type(value) is int and value in (0, 1):
            flat[name] = bool(value)
        elif expected is float and type(value) is int:
            flat[name] = float(value)
        elif not isinstance(value, expected):
            raise UserError(f"parallel.compile_options.{name}={value!r}: this torch's Inductor takes a "
                            f"{expected.__name__} there (its default: {inductor_config.get_config_copy()[name]!r})")
    return flat


@dataclass(frozen=True)
class BatchSchedule:
    """The global batch of each optimizer step: train.batch_rampup's stages, then train.global_batch_size."""

    final: int
    stages: tuple[tuple[int, int], ...] = ()
    """(global batch, last step of the stage), the last steps increasing."""

    @classmethod
    def of(cls, t: "TrainConfig") -> "BatchSchedule":
        """The schedule of a job's train section (its stages checked with batch_stages)."""
        return cls(t.global_batch_size, batch_stages(t))

    def at(self, step: int) -> int:
        """Samples of optimizer step `step` (1 is the first)."""
        for batch, last in self.stages:
            if step <= last:
                return batch
        return self.final

    def sizes(self) -> list[int]:
        """Every global batch the run uses."""
        return sorted({self.final, *(batch for batch, _ in self.stages)})

    def describe(self) -> str:
        """The stages in words, for the log."""
        parts, first = [], 1
        for batch, last in self.stages:
            parts.append(f"{batch} for steps {first}-{last}")
            first = last + 1
        return ", ".join(parts + [f"{self.final} from step {first} on"])


def batch_stages(t: "TrainConfig") -> tuple[tuple[int, int], ...]:
    """train.batch_rampup as (batch, last step) pairs; UserError naming it and the form it takes when it is not a
    list of [BATCH, LAST_STEP] pairs of positive integers with increasing last steps before train.steps and batches
    that do not shrink, up to train.global_batch_size."""
    form = ("give it as [[BATCH, LAST_STEP], ...], e.g. 'train.batch_rampup=[[64,1000],[128,3000]]' (global batch 64 "
            "for steps 1-1000, 128 for steps 1001-3000, then train.global_batch_size)")
    stages, before = [], 0
    for stage in t.batch_rampup:
        if not (isinstance(stage, (list, tuple)) and len(stage) == 2
                and all(type(v) is int and v > 0 for v in stage)):
            raise UserError(f"train.batch_rampup={list(t.batch_rampup)}: the stage {stage} is not a pair of positive "
                            f"integers; {form}")
        batch, last = stage
        if last <= before:
            raise UserError(f"train.batch_rampup={list(t.batch_rampup)}: the stages' last steps must increase (stage "
                            f"{list(stage)} ends at step {last}, not after the one before it); {form}")
        if batch > t.global_batch_size or (stages and batch < stages[-1][0]):
            bigger, smaller = (batch, t.global_batch_size) if batch > t.global_batch_size else (stages[-1][0], batch)
            raise UserError(f"train.batch_rampup={list(t.batch_rampup)}: the global batch would shrink from {bigger} "
                            f"to {smaller}; a ramp-up grows, stage by stage, up to train.global_batch_size="
                            f"{t.global_batch_size}")
        stages.append((batch, last))
        before = last
    if stages and before >= t.steps:
        raise UserError(f"train.batch_rampup ends at step {before}, not before train.steps={t.steps}: the run would "
                        "never train on train.global_batch_size; end its last stage earlier or raise train.steps")
    return tuple(stages)


def uses_bf16(train: "TrainConfig", device_type: str) -> bool:
    """Whether a job computes in bf16 on this device type (train.mixed_precision; auto = on CUDA only)."""
    return train.mixed_precision == "bf16" or (train.mixed_precision == "auto" and device_type == "cuda")


if TYPE_CHECKING:
    from qwen2_dist.model.args import ModelArgs


@dataclass
class ModelConfig:
    name: str = "debug"
    """Size from qwen2_dist.model.args.SIZES: debug, tiny, qwen2-0.5b, qwen2-1.5b, qwen2-7b, qwen2-72b."""
    attention: str = "auto"
    """Attention backend: auto (flash-attn if importable on CUDA, in bf16; else SDPA, preferring cuDNN's kernel on
    CUDA; compiled FlexAttention for document masking on CUDA without flash-attn), flash_attn, sdpa, flex,
    reference."""
    loss: str = "auto"
    """Output projection + cross-entropy: auto (chunked, or plain under tensor parallelism), chunked (fused, never
    materializes the full logits), liger (Liger-Kernel's fused linear cross-entropy, CUDA), plain (logits, then
    cross_entropy)."""
    loss_chunk_tokens: int = 2048
    """Tokens per chunk of the chunked loss: its transient memory is about chunk x vocab x 2 bytes compiled (the bf16
    logits, overwritten by their gradient), chunk x vocab x 10 bytes eager (with two fp32 copies)."""
    z_loss: float = 0.0
    """Add z_loss x log(sum(exp(logits)))^2 of each target token to the training loss (the z-loss of PaLM, 1e-4, and
    OLMo 2, 1e-5): it keeps the output logits from drifting, a guard against late loss spikes. 0 = off. Logged apart
    as z_loss (the term per target token); loss and eval_loss stay the cross-entropy. model.loss chunked or plain
    (also under tensor parallelism), not liger."""
    kernels: str = "torch"
    """Who computes RMSNorm (and SwiGLU): torch (fused by torch.compile per block on CUDA), liger (Liger-Kernel's Triton
    kernels) or apex (NVIDIA apex's fused RMSNorm); liger and apex need CUDA, parallel.compile=false or auto, and
    parallel.tp=1."""
    fuse_projections: Any = False
    """Compute q/k/v, and gate/up, each as one matmul over the concatenated weights (parameters stay separate): true
    (both), qkv (q/k/v only), mlp (gate/up only) or false; parallel.tp=1 only. Both were slower on an H100 for
    qwen2-1.5b (42,415 tokens/s against 44,148, 2026-11-27); qkv alone (the narrow k and v matmuls made part of a
    wide one, for a copy of 2.4M weights per block and forward) is not measured yet."""
    float8: bool = False
    """Train the decoder blocks' linear layers in float8 (torchao's dynamic scaling; CUDA with compute capability
    >= 8.9, the torchao package). The output head stays in bf16. On an H100, qwen2-1.5b at seq 4096, micro-batch 4:
    49,337 tokens/s against 44,148 in bf16 (2026-11-27); its loss curve against bf16 is not measured yet."""
    init_from_hf: Optional[str] = None
    """Hugging Face Qwen2 directory (config.json + safetensors) whose weights start the run instead of init_weights."""
    init_from_checkpoint: Optional[str] = None
    """A qwen2-dist checkpoint (a committed step_N directory, of any run and layout) whose model weights start this
    run: step 0, a fresh optimizer, this job's schedule and data (continued pretraining). Once the run has
    checkpoints of its own it resumes from those."""
    hidden_size: Optional[int] = None
    """Override of the named size's field (null keeps it); the same for the fields below."""
    num_hidden_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    vocab_size: Optional[int] = None
    tie_word_embeddings: Optional[bool] = None
    max_position_embeddings: Optional[int] = None
    rope_theta: Optional[float] = None
    """E.g. 10000.0 for a checkpoint trained with that RoPE base (the Qwen2 sizes: 1e6)."""
    rms_norm_eps: Optional[float] = None
    """E.g. 1e-5 or 1e-6, as the config.json of the weights in model.init_from_hf says."""
    initializer_range: Optional[float] = None
    """Standard deviation of the initial weights (0.02)."""

    def args(self):
        """The ModelArgs of this config: the named size with the non-null overrides applied and checked."""
        from qwen2_dist.model.args import get_model_args

        fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings", "rope_theta",
                  "rms_norm_eps", "initializer_range")
        overrides = {f: getattr(self, f) for f in fields if getattr(self, f) is not None}
        return get_model_args(self.name, **overrides)


@dataclass
class DataSource:
    path: str = "???"
    """Dataset directory written by qwen2-prepare, or its remote URL (s3://, gs://, oci://, azure://, hf://, ...)."""
    weight: float = 1.0
    """Share of the training samples drawn from this source (weights are normalized to sum to 1)."""
    name: Optional[str] = None
    """What the metrics call this source of a mixture (eval_loss/NAME; a job of one source logs eval_loss only);
    default: the last part of its path (the last two, joined by '-', where two sources' last parts are the same).
    Letters, digits, '.', '_' and '-'."""


@dataclass
class DataConfig:
    path: Optional[str] = None
    """Dataset directory written by qwen2-prepare (local path or remote URL); null (and no data.sources) = the
    embedded default corpus."""
    sources: list[DataSource] = field(default_factory=list)
    """Several datasets mixed by weight, instead of data.path: '[{path: /d/web, weight: 0.7}, {path: s3://b/code,
    weight: 0.3}]'. Each is read in epochs of its own; the mixture is exact in every block of 4096 samples."""
    cache_dir: Optional[str] = None
    """Cache for remote sources (one directory per run and node: best on a node-local disk) and where the embedded
    corpus is built; default ~/.cache/qwen2_dist."""
    cache_limit: Optional[str] = None
    """Bytes of training shards a node keeps in its cache of remote sources, e.g. 500gb or 2tib (null = no limit: a
    remote dataset is cached whole). Before each download the least recently read shards are deleted to stay under
    it (downloads running at that moment in the node's other reading processes can add one shard each); a limit
    below what the read order needs at once (each source: the shards two consecutive steps can read, two global
    batches and the shuffle blocks they overlap, more steps with num_workers, whose workers read ahead, and one per
    other reading process of the node) is refused before training. Only for remote (or read-only, copied) sources:
    local ones are read in place and never deleted."""
    shuffle: bool = True
    """Shuffle samples (deterministically, from the run seed): shards, then samples within blocks."""
    shuffle_block_size: int = 262144
    """Samples shuffled together; a rank needs the shards of the current block only. Keep >= 10 shards' samples
    (the job warns below that: a smaller block mixes few shards)."""
    document_masking: bool = False
    """Attention stays within each document of a packed sample (positions restart per document)."""
    eod_mask_loss: bool = False
    """The first token of each document, predicted from the end of the one before, counts for nothing in the loss
    (training and evaluation; Megatron-LM's --eod-mask-loss): with document_masking that prediction sees nothing of
    its document. The loss is then the mean over the counted targets of the global batch."""
    num_workers: int = 0
    """DataLoader worker processes per rank (they read ahead, 2 micro-batches each, which cache_limit must then hold
    too; 0 reads in the training process)."""
    embedded_max_tokens: int = 4_000_000
    """Tokens taken from the Python standard library sources for the embedded default corpus."""
    synthetic: bool = False
    """Train on uniformly random token ids instead of data (nothing is read or built): to measure the speed and memory
    of a layout, e.g. on a new cluster. The loss cannot fall below ln(vocab); evaluation is off."""
    new_stage: bool = False
    """A checkpoint to resume that was trained on other data (another dataset, mixture, seed, shuffle or
    train.seq_len) is continued on this job's data from its first sample, its weights, optimizer state, step,
    tokens_seen and learning-rate schedule kept, instead of refused: a new data stage in the same run (e.g. the decay
    of a warmup-stable-decay schedule on a higher-quality mixture, or a longer context). A checkpoint of this data
    resumes at its position as always, so the restarts of the stage continue it. model.init_from_checkpoint starts
    from the weights only."""

    def cache_root(self) -> str:
        """cache_dir, or its default."""
        return self.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "qwen2_dist")


@dataclass
class EvalDataset:
    path: str = "???"
    """A dataset written by qwen2-prepare (local directory or remote URL) that is evaluated, never trained on."""
    name: Optional[str] = None
    """Its name in the metrics, eval_loss/NAME; default: the last part of its path. Letters, digits, '.', '_' and
    '-'."""
    split: str = "val"
    """The split evaluated: val (its held-out samples) or train (a dataset prepared for evaluation alone, e.g. with
    qwen2-prepare val_fraction=0)."""


@dataclass
class EvalTask:
    path: str = "???"
    """A local JSONL file of multiple-choice examples, one per line: {"context": "...", "choices": ["...", "..."],
    "answer": INDEX} (llm-foundry's "query" and "gold" keys are read too). Few-shot examples go into the context."""
    name: Optional[str] = None
    """Its name in the metrics, task_acc/NAME and task_acc_norm/NAME; default: the file name without .jsonl."""
    limit: Optional[int] = None
    """Evaluate the file's first this many examples (None: all)."""
    delimiter: str = " "
    """Put between the context and each choice (lm-evaluation-harness's target_delimiter, llm-foundry's
    continuation_delimiter); '' for choices that carry their own leading space."""


@dataclass
class EvalConfig:
    interval: int = 50
    """Compute the loss on the held-out (val) split every this many steps and at the last step (train.steps);
    0 = never. Skipped, with a warning, when the data has no val split."""
    samples: int = 16
    """Held-out samples per evaluation and source, over all ranks: the first of the split's order, the same every
    time and on every layout, so evaluations compare; at most as many as the split holds (with a warning). With
    several sources (data.sources) each is evaluated on its own, logged as eval_loss/NAME, and eval_loss is their
    mean weighted as training weighs them (sources without a held-out split are left out, with a warning, and then
    there is no eval_loss); an evaluation so reads eval.samples of each source. The last micro-batches are filled
    up with rows that count for nothing."""
    datasets: list[EvalDataset] = field(default_factory=list)
    """Datasets evaluated beside the training data's held-out split, never trained on, each on the first
    eval.samples of its split and logged as eval_loss/NAME (not part of a mixture's eval_loss): '[{path: /d/wiki,
    name: wiki}, {path: s3://b/code-eval, split: train}]'. Of the model's tokenizer and train.seq_len, as the training
    data."""
    at_start: bool = False
    """Also evaluate before the first step of a run that starts at step 0 (not on a resume): the starting weights'
    eval_loss and task accuracies, logged as step 0 (the baseline of continued pretraining from model.init_from_hf
    or model.init_from_checkpoint)."""
    tasks: list[EvalTask] = field(default_factory=list)
    """Multiple-choice tasks evaluated at each evaluation (downstream accuracy during pretraining, as OLMo's and
    llm-foundry's in-loop evaluations): each choice scored by the model's log-likelihood of its tokens after the
    context (tokenized by the training data's tokenizer), logged as task_acc/NAME (the highest summed
    log-likelihood is the answer) and task_acc_norm/NAME (the highest per character of the choice):
    '[{path: /evals/hellaswag.jsonl}, {path: /evals/arc_easy.jsonl, name: arc_e, limit: 500}]'."""


@dataclass
class TrainConfig:
    steps: int = 150
    """Optimizer steps of the whole run (a resumed run continues up to this count)."""
    stop_at: Optional[int] = None
    """Stop after this step with a checkpoint, without changing the schedule (chunked jobs, resume tests); 0 to
    train.steps."""
    seq_len: int = 128
    """Tokens per sample; must equal the sample length the shards were prepared with."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all ranks; the rest comes from gradient accumulation."""
    batch_rampup: list[Any] = field(default_factory=list)
    """A smaller global batch for the first steps, as stages [BATCH, LAST_STEP]: [[64, 1000], [128, 3000]] trains
    steps 1-1000 on global batches of 64 samples, steps 1001-3000 on 128, then on train.global_batch_size. Each
    batch a multiple of micro-batch x data-parallel ranks; the samples are read in the order of a run without it.
    Empty: none."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    device: str = "auto"
    """auto (cuda when available), cuda or cpu."""
    mixed_precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32. bf16: FSDP's bf16 weights (fp32 master copy, fp32 gradient
    reduction), or autocast in one process; parameters and optimizer state stay fp32."""
    nonfinite: str = "skip"
    """Non-finite loss or gradients: skip (skip the update, count it; stop after max_skipped_in_a_row) or halt (stop
    at the first, acted on at the next logging step)."""
    max_skipped_in_a_row: int = 5
    """Save and stop when this many consecutive steps were skipped (counted every step, acted on at the next logging
    step)."""
    spike_sigma: float = 0.0
    """Also skip a step whose loss is this many standard deviations above the last spike_window steps (0 = off; no
    step is skipped for a spike until spike_window steps were applied)."""
    spike_window: int = 128
    """Applied steps in the loss-spike window."""
    hang_timeout: float = 1800.0
    """Seconds without a completed step, checkpoint save or evaluation of one eval set or task (each has the whole
    limit) before the watchdog dumps all stacks and exits (0 = off)."""
    hang_timeout_first: float = 3600.0
    """The same limit for the first step (compilation, data download, first collectives); 0 = off for it."""
    pg_timeout_minutes: float = 30.0
    """Timeout of collective operations in the process group."""
    deterministic: bool = False
    """Use deterministic algorithms (slower on GPU)."""
    gc_interval: int = 50
    """Python's automatic garbage collection is off while training; its young generations are collected every this
    many steps, and all of them after each periodic checkpoint save and each evaluation, on every rank at the same
    step (torchtitan's gc_freq). An automatic collection pauses one rank at a step of its own, and the others wait
    for it at the next collective. What is alive when training starts is frozen out of those collections (gc.freeze)
    and thawed when it ends. The data loader's workers collect as Python does. 0: Python's automatic collection."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the decay, as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps from 0 to lr."""
    schedule: str = "cosine"
    """Shape of the decay after warmup: cosine, linear, sqrt (1 - sqrt(progress), the usual cool-down of a
    warmup-stable-decay run) or constant (no decay)."""
    decay_steps: Optional[int] = None
    """Steps the decay takes, ending at train.steps (null = every step after warmup). Fewer gives a warmup-stable-decay
    (WSD) schedule: lr holds until train.steps - decay_steps, then decays."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on biases, norms or embeddings)."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    eps: float = 1e-8
    """AdamW's epsilon, added to the root of the second moment."""
    fused: Any = "auto"
    """auto (= true: fused AdamW, on CUDA and CPU; it skips flagged steps without a host sync), true or false."""
    impl: str = "torch"
    """AdamW implementation: torch (fused AdamW, see optim.fused) or apex (apex.optimizers.FusedAdam, CUDA, when apex is
    installed)."""
    overlap: bool = False
    """Run AdamW's update on a side CUDA stream, block by block, overlapping the next step's forward (each block
    waits only for its own weights); the same update as one AdamW step. One process (no FSDP), torch's fused AdamW."""
    in_backward: bool = False
    """Update each parameter as soon as its gradient is ready in backward and free that gradient (memory-lean: the
    full set of gradients never exists). Needs one process without FSDP, train.grad_clip=0 (no global norm to clip
    by), one micro-batch per step and train.spike_sigma=0."""


@dataclass
class CheckpointConfig:
    interval: int = 50
    """Save every this many steps (0 = only at the end)."""
    interval_minutes: float = 0.0
    """Also save when this many minutes passed since the last save (0 = off)."""
    keep_last: int = 2
    """Committed checkpoints kept; older ones are deleted after a new commit (not after a halt's save, which keeps
    every earlier one to roll back to)."""
    keep_every: int = 0
    """Milestones: checkpoints of steps divisible by this are never deleted (0 = none)."""
    async_save: Any = "auto"
    """Write shards in the background; the loop blocks only to copy the state (auto = on CUDA, true, false)."""
    resume: str = "auto"
    """auto (newest committed checkpoint in run_dir/checkpoints), none, or a checkpoint directory. One of this run's
    rolls the run back to it: the newer ones move to checkpoints/abandoned-TIME/, and restarts of the same command go
    on from the newest checkpoint written since. none starts the run afresh the same way (all of its checkpoints
    move aside; restarts go on from the new start's). One from elsewhere (qwen2-convert from-hf's, another run's) is
    continued in this run_dir: its step, optimizer state, schedule and data position (model.init_from_checkpoint
    takes its weights only, for a new run); once the run has checkpoints of its own, restarts resume from those
    (and PATH may be gone by then). A rollback to one checkpoint, or none, happens once (the last one is recorded
    in checkpoints/rollback.json): the same command's restarts do not repeat it, naming another checkpoint rolls
    back again, and deleting that file repeats it."""
    save_final: bool = True
    """Save when the run reaches train.steps."""
    checksums: bool = True
    """Record a CRC32 of every file at save (computed by the rank that wrote it, in the background with async saves)
    and check them before a load, each rank reading its share of the files: a file damaged at its full size is then
    refused (auto resume falls back to the previous checkpoint) instead of loading wrong values. false: sizes only."""


@dataclass
class LoggingConfig:
    interval: int = 5
    """Log (console and metrics.jsonl) every this many steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files under run_dir/tensorboard (needs the tensorboard package)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package)."""
    wandb_project: str = "qwen2-dist"
    """W&B project."""
    wandb_mode: str = "offline"
    """W&B mode: offline (files under run_dir/wandb, no network; sync later with `wandb sync`), online or disabled."""
    profile_steps: Optional[str] = None
    """Record a torch.profiler trace of steps START to END-1 (10:12: steps 10 and 11) to
    run_dir/profile/rank{N}.json (a run resumed inside the range: the rest of it to rank{N}_from{STEP}.json)."""
    memory_snapshot_on_oom: bool = True
    """On CUDA, record allocations (with their Python stacks) and write run_dir/oom_snapshot_rank{N}.pickle when a
    step runs out of memory. Its cost per step is not measured yet; set false to rule it out."""
    norms: bool = False
    """At each logging.interval step, also log the gradient norm (before clipping) and the weight norm of each block
    and of the embedding, final norm and output head: grad_norm/layers.N, param_norm/layers.N, grad_norm/embed_tokens,
    ... (Megatron-LM's --log-params-norm, per block), to see where an instability starts. Costs a read of every
    weight and gradient and a collective per block and kind at those steps. With optim.in_backward the gradients are
    gone by then, and the weights updated: only the weight norms, after the step."""
    peak_tflops: Optional[float] = None
    """Dense bf16 peak of one GPU in TFLOP/s, the denominator of the logged MFU; null = looked up from the device
    name (H100, H200, B200, A100, MI300X, ...; a GPU not in the table logs no MFU rather than a wrong one)."""


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    """Data-parallel replicas (HSDP); parameters are replicated across this axis."""
    dp_shard: int = -1
    """Data-parallel shards (FSDP2); -1 = whatever the world size leaves."""
    tp: int = 1
    """Tensor-parallel degree (with sequence parallelism and a vocabulary-parallel loss); keep it within a node."""
    activation_checkpointing: str = "none"
    """Recompute in backward to save memory: none, full (every block), selective (every ac_every-th block) or op (in
    every block, keep the matmul and attention outputs and recompute only the cheap element-wise ops: norms, RoPE,
    SwiGLU's activation)."""
    ac_every: int = 2
    """With activation_checkpointing=selective: recompute blocks 0, k, 2k, ... for k = ac_every."""
    compile: str = "auto"
    """torch.compile each decoder block: auto (on for CUDA, off on CPU; also off with model.kernels liger or apex,
    and where this torch cannot compile recomputed blocks under tensor parallelism), true or false."""
    compile_options: dict[str, Any] = field(default_factory=dict)
    """Inductor settings for every compiled block and the compiled loss (torch.compile's `options`), added one by
    one: +parallel.compile_options.coordinate_descent_tuning=true, +parallel.compile_options.max_autotune=true.
    Names are checked against this torch's torch._inductor.config (nested keys such as triton.cudagraphs are
    written +parallel.compile_options.triton.cudagraphs=true). Empty: Inductor's defaults."""
    fp32_weight_grads: bool = False
    """Compiled blocks on CUDA: each weight gradient's matmul writes fp32 itself (a matmul with out_dtype) instead of a
    bf16 product then converted to the fp32 parameter's dtype (one process under autocast; FSDP's bf16 weights have
    bf16 gradients, where it changes nothing). About 5 GB less memory traffic a step at qwen2-1.5b by arithmetic;
    not measured yet."""
    reshard_after_forward: str = "default"
    """FSDP2 after a block's forward: default (free the gathered weights, except the root's and the last block's,
    which backward needs first), always, or never
    (keep them until backward: less communication, more memory)."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in CPU memory (FSDP2 CPUOffloadPolicy; CUDA only)."""
    reduce_every_micro_batch: bool = False
    """FSDP with gradient accumulation: reduce-scatter the gradients of every micro-batch, keeping only the sharded
    fp32 gradients between micro-batches, instead of every block's unsharded fp32 gradient until the last one
    (qwen2-estimate: 33.86 of 57.59 GiB per rank for qwen2-72b at FSDP 64 x TP 8 and 8 micro-batches). One
    reduce-scatter per micro-batch instead of per step (overlapped with backward); HSDP's all-reduce over the
    replicas still runs once per step."""


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = "runs/default"
    """Where metrics.jsonl, config.yaml, logs and checkpoints/ go; the same run_dir resumes the run."""
    seed: int = 0
    """Seed of the weight init and the data order."""


def schema_keys(schema: type = JobConfig, prefix: str = "") -> list[str]:
    """Every key of the job schema, dotted ('train.seq_len'); a dict of free names (parallel.compile_options) and a
    list of records (data.sources) are one key each."""
    keys = []
    for name, kind in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(kind):
            keys += schema_keys(kind, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


# What other trainers (Hugging Face's, Megatron-LM, nanoGPT, torchtitan) call a setting, by the last part of a key:
# no spelling of ours is close to these (optim.learning_rate was offered optim.min_lr_ratio, not optim.lr).
OTHER_NAMES = {
    "learning_rate": "optim.lr", "max_lr": "optim.lr", "max_steps": "train.steps", "total_steps": "train.steps",
    "train_iters": "train.steps", "max_iters": "train.steps", "num_steps": "train.steps",
    "training_steps": "train.steps", "batch_size": "train.global_batch_size", "global_batch": "train.global_batch_size",
    "train_batch_size": "train.global_batch_size", "per_device_train_batch_size": "train.micro_batch_size",
    "micro_batch": "train.micro_batch_size", "seq_length": "train.seq_len", "max_seq_len": "train.seq_len",
    "sequence_length": "train.seq_len", "context_length": "train.seq_len", "block_size": "train.seq_len",
    "warmup": "optim.warmup_steps", "warmup_iters": "optim.warmup_steps", "lr_warmup_steps": "optim.warmup_steps",
    "save_steps": "checkpoint.interval", "save_interval": "checkpoint.interval", "output_dir": "run_dir",
    "out_dir": "run_dir", "save_dir": "run_dir", "max_grad_norm": "train.grad_clip", "clip_grad": "train.grad_clip",
    "gradient_clipping": "train.grad_clip", "grad_clip": "train.grad_clip", "tensor_parallel_size": "parallel.tp",
    "tensor_model_parallel_size": "parallel.tp", "eval_interval": "eval.interval", "log_interval": "logging.interval",
}


def did_you_mean(key: str) -> str:
    """'; did you mean X?' for the schema keys closest to a misspelled one, or ''. Another trainer's name for a
    setting comes first (OTHER_NAMES: optim.learning_rate, optim.lr), then a key of the same last part in another
    section (train.lr: optim.lr), then keys close as a whole, then keys of a close last part."""
    known = schema_keys()
    last = key.rsplit(".", 1)[-1]
    by_last: dict[str, list[str]] = {}
    for name in known:
        by_last.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    close = [OTHER_NAMES[last]] if last in OTHER_NAMES else []
    close += by_last.get(last, [])
    close += difflib.get_close_matches(key, known, n=3)
    for near in difflib.get_close_matches(last, list(by_last), n=3):
        close += by_last[near]
    close = list(dict.fromkeys(name for name in close if name != key))[:3]
    return f"; did you mean {' or '.join(close)}?" if close else ""


def check_known_keys(container: dict, schema: type = JobConfig, prefix: str = "") -> None:
    """Refuse a key the job schema does not have. Hydra adds any key given as +key=value or ++key=value, without
    checking it against the schema, and the job would then run with that setting silently ignored. container: the
    composed config as plain dicts and lists (OmegaConf.to_container)."""
    hints = typing.get_type_hints(schema)
    for key, value in container.items():
        full = f"{prefix}{key}"
        if key not in hints:
            siblings = [f"{prefix}{name}" for name in difflib.get_close_matches(key, list(hints), n=3)]
            hint = f"; did you mean {' or '.join(siblings)}?" if siblings and key not in OTHER_NAMES \
                else did_you_mean(full)
            raise UserError(f"{full}: no such setting{hint} (a +{full}=... override adds a key that nothing reads; "
                            "list the valid keys with qwen2-train --cfg job)")
        kind = hints[key]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            check_known_keys(value, kind, f"{full}.")
        elif typing.get_origin(kind) is list and isinstance(value, list):
            (item_kind,) = typing.get_args(kind)
            if dataclasses.is_dataclass(item_kind):
                for index, item in enumerate(value):
                    if isinstance(item, dict):
                        check_known_keys(item, item_kind, f"{full}[{index}].")


def register_configs() -> None:
    """Register the schema so Hydra type-checks conf/ and the command-line overrides."""
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)


def _check_parallel(p: ParallelConfig, args: "ModelArgs", t: TrainConfig, world_size: int) -> int:
    """Check the layout against the world size and the model's sizes; return the resolved dp_shard."""
    if p.dp_shard == -1:
        if world_size % (p.dp_replicate * p.tp):
            raise UserError(
                f"world size {world_size} is not divisible by parallel.dp_replicate x parallel.tp = "
                f"{p.dp_replicate * p.tp}; change the layout or the number of processes"
            )
        dp_shard = world_size // (p.dp_replicate * p.tp)
    else:
        dp_shard = p.dp_shard
        if dp_shard <= 0 or p.dp_replicate * dp_shard * p.tp != world_size:
            raise UserError(
                f"parallel.dp_replicate x dp_shard x tp = {p.dp_replicate} x {p.dp_shard} x {p.tp} does not equal "
                f"the world size {world_size}; set parallel.dp_shard=-1 to fill the rest"
            )
    # Tensor parallelism splits the heads (query heads are a multiple of the key/value heads), the MLP width and
    # the vocabulary over tp ranks, and sequence parallelism splits the sequence between blocks: all divide evenly.
    for what, size in (
        ("num_key_value_heads", args.num_key_value_heads), ("intermediate_size", args.intermediate_size),
        ("vocab_size", args.vocab_size),
    ):
        if size % p.tp:
            raise UserError(
                f"parallel.tp={p.tp}: the model's {what} {size} is not divisible by it; "
                f"use a parallel.tp that divides {size}"
            )
    if t.seq_len % p.tp:
        raise UserError(
            f"parallel.tp={p.tp}: train.seq_len={t.seq_len} is not divisible by it (sequence parallelism splits "
            f"the sequence); use a train.seq_len that is a multiple of {p.tp}"
        )
    if p.activation_checkpointing not in ("none", "full", "selective", "op"):
        raise UserError(
            f"parallel.activation_checkpointing={p.activation_checkpointing!r}: choose none, full, selective or op"
        )
    if p.ac_every < 1:
        raise UserError(f"parallel.ac_every={p.ac_every}: must be a positive integer")
    if str(p.compile).lower() not in ("auto", "true", "false"):
        raise UserError(f"parallel.compile={p.compile!r}: choose auto, true or false")
    if p.fp32_weight_grads and str(p.compile).lower() == "false":
        raise UserError("parallel.fp32_weight_grads=true rewrites the compiled blocks' backward, and "
                        "parallel.compile=false compiles none: set parallel.compile=auto (or true), or "
                        "parallel.fp32_weight_grads=false")
    if str(p.compile).lower() == "true" and compile_fails_with_recompute_under_tp(p):
        raise UserError(f"parallel.compile=true with parallel.tp={p.tp} and parallel.activation_checkpointing="
                        f"{p.activation_checkpointing}: this torch cannot compile a tensor-parallel block recomputed "
                        "whole; use parallel.activation_checkpointing=op (or none), parallel.compile=auto (which "
                        "then runs eager) or another torch (2.11 and 2.14 work)")
    inductor_options(p)
    if p.reshard_after_forward not in ("default", "always", "never"):
        raise UserError(
            f"parallel.reshard_after_forward={p.reshard_after_forward!r}: choose default, always or never"
        )
    if p.cpu_offload and (world_size == 1 or t.device == "cpu"):
        raise UserError(
            "parallel.cpu_offload=true: offloading is part of FSDP2 on CUDA, which needs several processes on GPUs; "
            "set parallel.cpu_offload=false"
        )
    return dp_shard


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
               "gib": 2**30, "tib": 2**40}


def parse_bytes(key: str, value) -> int:
    """Bytes from an integer or a size such as 500gb, 1.5TB or 64GiB (decimal kb/mb/gb/tb, binary kib/mib/gib/tib);
    UserError naming `key` otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
    size = int(float(match.group(1)) * _BYTE_UNITS[match.group(2)]) if match and match.group(2) in _BYTE_UNITS else 0
    if size < 1:
        raise UserError(f"{key}={value!r}: give a positive size in bytes or with a unit, e.g. 500gb or 2tib")
    return size


_SOURCE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _path_parts(path: str) -> list[str]:
    """The components of a source's path (a local one made absolute), metric-name safe, last one last."""
    if "://" in path:
        parts = path.split("://", 1)[1].split("/")
    else:
        parts = os.path.abspath(os.path.expanduser(path)).split(os.sep)
    return [re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in parts if part not in ("", ".", "..")] or ["source"]


def source_names(sources: list[DataSource]) -> list[str]:
    """Each source's name in the metrics: its data.sources[i].name, else the last part of its path; where two would
    be the same, the last two parts joined by '-' (/d/web/v1 and /d/code/v1: web-v1 and code-v1), and where those
    are too, _INDEX added. Raises UserError for a name given twice or with other characters."""
    given = [s.name for s in sources]
    for i, name in enumerate(given):
        if name is not None and not _SOURCE_NAME.fullmatch(name):
            raise UserError(f"data.sources[{i}].name={name!r}: use letters, digits, '.', '_' and '-' only")
        if name is not None and given.index(name) != i:
            raise UserError(f"data.sources[{given.index(name)}] and data.sources[{i}] are both named {name!r}: "
                            "give each source its own data.sources[i].name")
    parts = [_path_parts(s.path) for s in sources]
    names = [name if name is not None else p[-1] for name, p in zip(given, parts)]
    for depth in (2, None):
        clash = {name for i, name in enumerate(names) if given[i] is None and names.count(name) > 1}
        for i, name in enumerate(names):
            if name in clash and given[i] is None:
                names[i] = "-".join(parts[i][-2:]) if depth else f"{name}_{i}"
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise UserError(f"data.sources[{names.index(name)}] and data.sources[{i}] would both be named "
                            f"{name!r} in the metrics: give them data.sources[i].name")
    return names


def _dataset_key(path: str) -> str:
    """What makes two dataset paths the same data: a URL as written; a directory however it is spelled (streaming
    refuses one local directory used twice)."""
    return path.rstrip("/") if "://" in path else os.path.realpath(path)


def _check_data(d: DataConfig, e: EvalConfig, files: bool = True) -> None:
    """Check the data sources and the evaluation sizes (files: also that the local ones exist, as directories)."""
    if d.path is not None and d.sources:
        raise UserError("data.path and data.sources are both set; use data.path for one dataset, data.sources to mix")
    if d.synthetic and (d.path is not None or d.sources or d.document_masking or d.eod_mask_loss):
        raise UserError("data.synthetic=true trains on random tokens, but data.path, data.sources, "
                        "data.document_masking or data.eod_mask_loss is set too; drop them, or set "
                        "data.synthetic=false to read the data")
    paths = [(f"data.sources[{i}].path", s.path) for i, s in enumerate(d.sources)]
    if d.path is not None:
        paths.append(("data.path", d.path))
    for name, path in paths if files else []:
        if "://" not in path and not os.path.isdir(path):
            raise UserError(
                f"{name}={path}: no such directory; write shards with qwen2-prepare input=... output=DIR"
                + (" or leave data.path unset for the embedded corpus" if name == "data.path" and not d.sources
                   else "")
            )
    # The cache holds the embedded corpus, built after the launch, and the shards of remote sources.
    remote = [f"{name}={path}" for name, path in paths if "://" in path]
    remote += [f"eval.datasets[{i}].path={s.path}" for i, s in enumerate(e.datasets) if "://" in s.path]
    if files and not d.synthetic and (remote or not paths):
        check_writable_dir(d.cache_root(), f"data.cache_dir={d.cache_root()}", "it caches "
                           + (f"the shards of {remote[0]}" if remote else "the embedded corpus (no data.path)")
                           + "; set data.cache_dir to a directory this user can write")
    seen: dict[str, int] = {}
    for i, source in enumerate(d.sources):
        if not source.weight > 0:
            raise UserError(f"data.sources[{i}].weight={source.weight}: must be positive")
        key = _dataset_key(source.path)
        if key in seen:
            raise UserError(f"data.sources[{i}].path={source.path}: the same data as data.sources[{seen[key]}]; "
                            "list each dataset once, with the sum of the weights you meant for it")
        seen[key] = i
    source_names(d.sources)
    if d.shuffle_block_size < 1 or d.num_workers < 0:
        raise UserError("data.shuffle_block_size must be >= 1 and data.num_workers >= 0")
    if d.cache_limit is not None:
        parse_bytes("data.cache_limit", d.cache_limit)
        for name, path in paths if files else []:
            if reads_in_place(path, "train"):
                raise UserError(f"data.cache_limit is set, but {name}={path} is a local directory read in place: to "
                                "stay under the limit streaming would delete its shards. Unset data.cache_limit "
                                "(it bounds the cache of remote sources)")
        if not paths:
            raise UserError("data.cache_limit is set, but no remote source is: it bounds the cache of remote sources "
                            "(data.path or data.sources with URLs such as s3://...); unset it")
    _check_eval_datasets(d, e, files)
    _check_eval_tasks(d, e, files)
    if e.interval < 0:
        raise UserError(f"eval.interval={e.interval}: must be >= 0 (0 = no evaluation)")
    if e.interval and e.samples <= 0:
        raise UserError(f"eval.samples={e.samples}: must be positive")


def eval_dataset_names(d: DataConfig, e: EvalConfig) -> list[str]:
    """The names eval.datasets are logged under (eval_loss/NAME); UserError for a name of other characters, or one
    that another eval dataset or a source of the training mixture has."""
    taken = dict.fromkeys(source_names(d.sources) if len(d.sources) > 1 else [], "a source of data.sources")
    names = []
    for i, dataset in enumerate(e.datasets):
        name = dataset.name if dataset.name is not None else _path_parts(dataset.path)[-1]
        if not _SOURCE_NAME.fullmatch(name):
            raise UserError(f"eval.datasets[{i}].name={name!r}: use letters, digits, '.', '_' and '-' only")
        if name in taken:
            raise UserError(f"eval.datasets[{i}] would be logged as eval_loss/{name}, as {taken[name]} is: give it "
                            f"another eval.datasets[{i}].name")
        taken[name] = f"eval.datasets[{i}]"
        names.append(name)
    return names


def _check_eval_datasets(d: DataConfig, e: EvalConfig, files: bool) -> None:
    """eval.datasets: a split of val or train, a local path that exists, names of their own, and data to train on
    beside (a synthetic run evaluates nothing)."""
    if e.datasets and d.synthetic:
        raise UserError("eval.datasets is set, but data.synthetic=true trains on random tokens and evaluates nothing; "
                        "drop eval.datasets or set data.synthetic=false")
    seen = {_dataset_key(path): name for name, path in ([("data.path", d.path)] if d.path is not None else [])
            + [(f"data.sources[{i}].path", s.path) for i, s in enumerate(d.sources)]}
    for i, dataset in enumerate(e.datasets):
        if dataset.split not in ("val", "train"):
            raise UserError(f"eval.datasets[{i}].split={dataset.split!r}: choose val (its held-out samples) or train")
        if files and "://" not in dataset.path and not os.path.isdir(dataset.path):
            raise UserError(f"eval.datasets[{i}].path={dataset.path}: no such directory; write shards with "
                            "qwen2-prepare input=... output=DIR")
        key = _dataset_key(dataset.path)
        if key in seen:
            raise UserError(f"eval.datasets[{i}].path={dataset.path}: the same data as {seen[key]}; a training "
                            "source's held-out split is evaluated already (eval_loss), and an eval dataset is never "
                            "trained on: list each dataset once")
        seen[key] = f"eval.datasets[{i}].path"
    eval_dataset_names(d, e)


def eval_task_names(e: EvalConfig) -> list[str]:
    """The names eval.tasks are logged under (task_acc/NAME); UserError for a name of other characters or one that
    another task has."""
    names = []
    for i, task in enumerate(e.tasks):
        base = os.path.basename(task.path)
        name = task.name if task.name is not None else (base[:-len(".jsonl")] if base.endswith(".jsonl") else base)
        if not _SOURCE_NAME.fullmatch(name):
            raise UserError(f"eval.tasks[{i}].name={name!r}: use letters, digits, '.', '_' and '-' only")
        if name in names:
            raise UserError(f"eval.tasks[{i}] would be logged as task_acc/{name}, as eval.tasks[{names.index(name)}] "
                            f"is: give it another eval.tasks[{i}].name")
        names.append(name)
    return names


def _check_eval_tasks(d: DataConfig, e: EvalConfig, files: bool) -> None:
    """eval.tasks: data whose tokenizer scores them, a positive limit, names of their own, and (files) readable files
    of examples."""
    if e.tasks and d.synthetic:
        raise UserError("eval.tasks is set, but data.synthetic=true trains on random tokens of no tokenizer and "
                        "evaluates nothing; drop eval.tasks or set data.synthetic=false")
    eval_task_names(e)
    for i, task in enumerate(e.tasks):
        if task.limit is not None and task.limit < 1:
            raise UserError(f"eval.tasks[{i}].limit={task.limit}: must be positive (unset: every example)")
        if files:
            from qwen2_dist.train.tasks import read_examples

            read_examples(task.path, f"eval.tasks[{i}].path", task.limit)


def _eval_summaries(cfg: JobConfig) -> list[tuple[str, dict]]:
    """eval.datasets' prepare summaries (remote ones downloaded into the run's cache), each checked to hold samples
    of train.seq_len in its split; UserError naming eval.datasets[i] and the fix otherwise."""
    from qwen2_dist.data.loader import run_cache_key, source_summary

    out = []
    for i, dataset in enumerate(cfg.eval.datasets):
        path, seq_len = dataset.path, cfg.train.seq_len
        try:
            summary = source_summary(path, cfg.data.cache_root(), run_cache_key(cfg.run_dir))
        except UserError as exc:
            raise UserError(f"eval.datasets[{i}].path={path}: {exc}") from None
        if summary["sample_tokens"] != seq_len + 1:
            raise UserError(f"eval.datasets[{i}].path={path}: its samples hold {summary['sample_tokens']} tokens, "
                            f"train.seq_len={seq_len} needs {seq_len + 1}; prepare it again with qwen2-prepare "
                            f"seq_len={seq_len}")
        if not summary["splits"].get(dataset.split, {}).get("samples"):
            raise UserError(f"eval.datasets[{i}]: {path} holds no sample in its {dataset.split} split; set "
                            f"eval.datasets[{i}].split={'train' if dataset.split == 'val' else 'val'}, or prepare it "
                            "again" + (" with a val_fraction that holds out samples" if dataset.split == "val" else ""))
        out.append((path, summary))
    return out


def check_saved(cfg: JobConfig) -> list[str]:
    """What the job would refuse only after the launch, read from its files now (the launchers' check: one line and
    exit 2 rather than a failure torchrun restarts MAX_RESTARTS times): data of another train.seq_len, remote data
    with token ids beyond the model's vocabulary (validate() checks local data; a remote source's summary is
    downloaded into the run's cache, where the job finds it), a checkpoint to resume of another model or of a run
    that started from other weights than the model.init_from_* named, a model.init_from_checkpoint of another
    model. The job runs it too, on rank 0, before it
    builds the model or rolls anything back (a start without the launchers). Not part of validate():
    qwen2-estimate plans a job whatever run_dir holds. Returns what the launchers print as warnings: a new data
    stage that data.new_stage will start."""
    args = cfg.model.args()
    from qwen2_dist.data.loader import check_seq_len, check_summaries_vocab, run_cache_key, source_summary
    from qwen2_dist.train import checkpoint

    d = cfg.data
    summaries = [(path, source_summary(path, d.cache_root(), run_cache_key(cfg.run_dir)))
                 for path in ([] if d.synthetic else _data_paths(d))]
    for path, summary in summaries:
        check_seq_len(path, summary["sample_tokens"], cfg.train.seq_len)
    evaluated = _eval_summaries(cfg) if cfg.eval.interval and not d.synthetic else []
    # Every source and eval dataset against each other (validate() compares the local ones before), and the eval
    # datasets against the embedded corpus's tokenizer where it is the training data.
    check_summaries_vocab([(path, summary) for path, summary in summaries + evaluated
                           if "://" in path or evaluated], args.vocab_size)
    if evaluated and not summaries and not d.synthetic:
        from qwen2_dist.data.tokenizer import QWEN2_VOCAB_SIZE

        for i, (path, summary) in enumerate(evaluated):
            if summary.get("vocab_size") not in (None, QWEN2_VOCAB_SIZE):
                raise UserError(f"eval.datasets[{i}].path={path}: prepared with tokenizer {summary.get('tokenizer')} "
                                f"({summary['vocab_size']} tokens), the embedded corpus trained on with the Qwen2 "
                                f"tokenizer ({QWEN2_VOCAB_SIZE}); prepare it again with qwen2-prepare tokenizer=qwen2")
    if cfg.eval.tasks and cfg.eval.interval and not d.synthetic:
        # Tokenized now as the job will (the training data's tokenizer; the embedded corpus's is Qwen2's): a choice
        # longer than train.seq_len or ids beyond the model's vocabulary are refused before launch.
        from qwen2_dist.data.corpus import TOKENIZER
        from qwen2_dist.train.tasks import load_tasks, summaries_tokenizer

        name = summaries_tokenizer([summary for _, summary in summaries]) if summaries else TOKENIZER
        load_tasks(cfg, name, args.vocab_size, cfg.parallel.tp)
    resume, ckpt_root = cfg.checkpoint.resume, os.path.join(cfg.run_dir, "checkpoints")
    if resume not in ("auto", "none") and checkpoint.in_run(ckpt_root, resume) \
            and not checkpoint.rollback_done(ckpt_root, resume):
        first = [resume]  # a rollback to come: the newer checkpoints will be moved aside
    else:
        first = checkpoint.resume_candidates(ckpt_root, resume)[:1]
    if cfg.model.init_from_checkpoint is not None and not first:
        # What the run starts from: its files at their recorded sizes, and of this model (as validate checks
        # init_from_hf's config and headers). Another model size was refused only after the launch, by every worker.
        # On one rank only (the job's check_saved runs on rank 0 while the others wait for its verdict): not the
        # collective check of every rank's share, which left rank 0 waiting for the others, and all of them hung.
        checkpoint.init_checkpoint_metadata(cfg.model.init_from_checkpoint, args, collective=False)
    for path in first:
        try:
            meta = checkpoint.read_metadata(path)
        except CheckpointNotLoadable:
            raise  # a newer format or an I/O error: the run would stop on it too
        except UserError:
            continue  # damaged or gone: the run reports it, and auto falls back
        checkpoint.check_model_args(f"checkpoint {path}", meta, args, checkpoint.other_model_fix(ckpt_root, path))
        checkpoint.check_init_source(path, meta, checkpoint.init_source(cfg.model))
        _check_resume_step(cfg, path, meta.get("step"))
        if not checkpoint.train_state_intact(path, meta):
            continue  # damaged: the job reports it and falls back past it
        problem = _resume_data_problem(cfg, checkpoint.peek_train_state(path).get("loader"), summaries)
        if problem and not d.new_stage:
            raise UserError(f"checkpoint {path}: {problem}")
        if problem:
            return [f"data.new_stage=true: checkpoint {path} was trained on other data; the job goes on from its "
                    "weights, optimizer state and step with this job's data from its first sample (its log names "
                    "what changed)"]
    return []


def _check_resume_step(cfg: JobConfig, path: str, step: Any) -> None:
    """A checkpoint.resume of another run (a starting point) at or past train.steps: the job would load it, say
    "run already complete" and exit 0, having trained nothing (usually a train.steps not raised to continue it)."""
    resume = cfg.checkpoint.resume
    if resume in ("auto", "none") or os.path.realpath(path) != os.path.realpath(resume):
        return
    from qwen2_dist.train.checkpoint import in_run

    if not in_run(os.path.join(cfg.run_dir, "checkpoints"), resume) and isinstance(step, int) \
            and step >= cfg.train.steps:
        raise UserError(f"checkpoint.resume={resume} is at step {step}, and train.steps={cfg.train.steps}: the run "
                        "would train nothing. To continue that run, raise train.steps past its step (the schedule "
                        "runs to train.steps); or resume one of its earlier checkpoints")


def _resume_data_problem(cfg: JobConfig, saved: dict | None, summaries: list[tuple[str, dict]]) -> str | None:
    """What of a checkpoint's data order (its loader state, not yet verified) the job changes, as far as the
    config and the sources' summaries tell (the loader compares the whole fingerprint after the launch, before the
    checkpoint is loaded); None when nothing visible changed."""
    from qwen2_dist.data.loader import content_identity, mixture_quotas, order_changes, order_mismatch
    from qwen2_dist.data.prepare import TRAIN

    d = cfg.data
    if not isinstance(saved, dict) or saved.get("synthetic") or d.synthetic or not isinstance(saved.get("order"), dict):
        return None
    order = saved["order"]
    now = {"seed": cfg.seed, "shuffle": d.shuffle, "shuffle_block_size": d.shuffle_block_size, "split": TRAIN,
           "seq_len": cfg.train.seq_len,
           "sources": order["sources"] if isinstance(order.get("sources"), list) else []}
    if summaries:  # the embedded corpus (no summary before the launch builds it) keeps the saved sources
        weights = [s.weight for s in d.sources] or [1.0]
        quotas = mixture_quotas([(path, weight) for (path, _), weight in zip(summaries, weights)])
        now["sources"] = [{"path": path, "weight": weight, "quota": int(quota),
                           "samples": summary["splits"].get(TRAIN, {}).get("samples"),
                           **content_identity(summary, TRAIN)}
                          for (path, summary), weight, quota in zip(summaries, weights, quotas)]
    return order_mismatch(order, now) if order_changes(order, now) else None


def _check_token_ids(d: DataConfig, e: EvalConfig, vocab_size: int) -> None:
    """The data's (and eval.datasets') token ids must lie below model.vocab_size: an id beyond it fails in the
    embedding lookup after the launch with one process, and with tensor parallelism reads another rank's rows,
    silently. Also the mixture's shares (a weight too small for any would leave its source unread)."""
    from qwen2_dist.data.loader import check_vocab, mixture_quotas
    from qwen2_dist.data.tokenizer import QWEN2_VOCAB_SIZE

    if len(d.sources) > 1:
        mixture_quotas([(s.path, s.weight) for s in d.sources])
    if d.synthetic:
        return
    evaluated = [dataset.path for dataset in e.datasets] if e.interval else []  # of the training data's tokenizer
    if _data_paths(d):
        check_vocab(_data_paths(d) + evaluated, vocab_size)
        return
    if vocab_size < QWEN2_VOCAB_SIZE:
        raise UserError(f"model.vocab_size={vocab_size}: the embedded corpus holds ids of the Qwen2 tokenizer "
                        f"({QWEN2_VOCAB_SIZE} tokens); set model.vocab_size >= {QWEN2_VOCAB_SIZE}, point data.path at "
                        "data of a smaller vocabulary, or use data.synthetic=true")
    check_vocab(evaluated, vocab_size)


def _data_paths(d: DataConfig) -> list[str]:
    """The datasets the job reads (data.sources' or data.path); none: the embedded corpus."""
    return [s.path for s in d.sources] or ([d.path] if d.path is not None else [])


def _check_finite(node: Any, path: str = "") -> None:
    """Every number of the config finite: nan passes every range check (nan <= 0 is false) and inf overflows
    later, far from the field."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _check_finite(getattr(node, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            _check_finite(item, f"{path}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise UserError(f"{path}={node}: must be a finite number")


def advisories(cfg: JobConfig, processes_per_node: int | None) -> list[str]:
    """What a valid job does that its user may not mean, one sentence each: logged by the job and printed by the
    launchers' check. processes_per_node: None when unknown."""
    c, tp, out = cfg.checkpoint, cfg.parallel.tp, []
    if not (c.interval or c.interval_minutes or c.save_final):
        out.append("checkpoint.interval=0, checkpoint.interval_minutes=0 and checkpoint.save_final=false: the run "
                   "writes no checkpoint (only a stop by signal or train.stop_at saves one), so a failure loses all "
                   "of it; set checkpoint.interval=N or checkpoint.save_final=true to keep its weights")
    for key in ("datasets", "tasks", "at_start"):
        if getattr(cfg.eval, key) and not cfg.eval.interval:
            out.append(f"eval.{key} is set, but eval.interval=0 evaluates nothing: set eval.interval=N to evaluate "
                       "them every N steps")
    if processes_per_node and processes_per_node % tp:  # tp is the mesh's innermost dimension: consecutive ranks
        out.append(f"parallel.tp={tp} does not divide the {processes_per_node} processes of a node: tensor-parallel "
                   "groups span nodes, and their collectives, several per block at every step, cross the network; "
                   f"use a parallel.tp that divides {processes_per_node} and shard the rest with FSDP "
                   "(parallel.dp_shard)")
    return out


def validate(cfg: JobConfig, world_size: int, files: bool = True) -> dict[str, int]:
    """Refuse impossible jobs before any tensor is allocated; return the resolved layout and accumulation steps.
    files=False (qwen2-estimate, on a machine without the job's data or checkpoints) leaves out what reads the
    file system: the data's directories and token ids, and the checkpoint and weights the job starts from."""
    if world_size < 1:
        raise UserError(f"{world_size} processes: a job needs at least one (NPROC, or torchrun's --nproc-per-node)")
    _check_finite(cfg)
    # These take auto (or qkv/mlp) besides a boolean, so a quoted 'true' (from YAML or shell quoting) stays the
    # string, and 1 or 0 the integer; each taken as the boolean it names, as parallel.compile takes either and a
    # boolean setting (optim.overlap=1) takes 1 and 0. Left as 0, optim.fused=0 passed `is False` checks as on.
    for section, key in ((cfg.optim, "fused"), (cfg.checkpoint, "async_save"), (cfg.model, "fuse_projections")):
        value = getattr(section, key)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            setattr(section, key, value.lower() == "true")
        elif type(value) is int and value in (0, 1):
            setattr(section, key, bool(value))
    if cfg.seed < 0:
        raise UserError(f"seed={cfg.seed}: must be a non-negative integer (it seeds the weights and the data order)")
    if not str(cfg.run_dir).strip():
        raise UserError("run_dir is empty; name the run's directory, e.g. run_dir=runs/exp1")
    args = cfg.model.args()
    t, p, o = cfg.train, cfg.parallel, cfg.optim
    for name, value in (
        ("train.steps", t.steps), ("train.seq_len", t.seq_len), ("train.micro_batch_size", t.micro_batch_size),
        ("train.global_batch_size", t.global_batch_size), ("logging.interval", cfg.logging.interval),
        ("parallel.dp_replicate", p.dp_replicate), ("parallel.tp", p.tp),
    ):
        if value <= 0:
            raise UserError(f"{name}={value}: must be a positive integer")
    if o.lr <= 0:
        raise UserError(f"optim.lr={o.lr}: the learning rate must be positive")
    if not 0 <= o.min_lr_ratio <= 1:
        raise UserError(f"optim.min_lr_ratio={o.min_lr_ratio}: must lie in [0, 1]")
    # AdamW would refuse these only when it is built, after the launch, in a traceback on every rank.
    for name, value in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0 <= value < 1:
            raise UserError(f"{name}={value}: must lie in [0, 1) (e.g. optim.beta1=0.9 optim.beta2=0.95)")
    if o.eps <= 0 or o.weight_decay < 0:
        raise UserError(f"optim.eps={o.eps}, optim.weight_decay={o.weight_decay}: need eps > 0 and weight_decay "
                        ">= 0 (0 turns decay off)")
    if o.warmup_steps < 0 or o.warmup_steps > t.steps:
        raise UserError(f"optim.warmup_steps={o.warmup_steps}: must lie in [0, train.steps={t.steps}]")
    if o.schedule not in SCHEDULES:
        raise UserError(f"optim.schedule={o.schedule!r}: choose {', '.join(SCHEDULES)}")
    if o.decay_steps is not None:
        if o.schedule == "constant":
            raise UserError(f"optim.decay_steps={o.decay_steps} with optim.schedule=constant, which never decays: "
                            "set optim.decay_steps=null or pick cosine, linear or sqrt")
        if not 0 < o.decay_steps <= t.steps - o.warmup_steps:
            raise UserError(f"optim.decay_steps={o.decay_steps}: must lie in [1, train.steps - optim.warmup_steps = "
                            f"{t.steps - o.warmup_steps}] (the decay ends at train.steps and starts after warmup)")
    if t.stop_at is not None and not 0 <= t.stop_at <= t.steps:
        raise UserError(f"train.stop_at={t.stop_at}: must lie in [0, train.steps={t.steps}] (0 saves the initial "
                        "weights and stops; the run ends at train.steps anyway)")
    if t.nonfinite not in ("skip", "halt"):
        raise UserError(f"train.nonfinite={t.nonfinite!r}: choose skip or halt")
    if t.max_skipped_in_a_row < 1 or t.spike_sigma < 0 or t.spike_window < 2:
        raise UserError(
            f"train.max_skipped_in_a_row={t.max_skipped_in_a_row}, spike_sigma={t.spike_sigma}, spike_window="
            f"{t.spike_window}: need max_skipped_in_a_row >= 1, spike_sigma >= 0, spike_window >= 2"
        )
    if t.hang_timeout < 0 or t.hang_timeout_first < 0 or t.pg_timeout_minutes <= 0:
        raise UserError("train.hang_timeout and train.hang_timeout_first must be >= 0 (0 = off) and "
                        "train.pg_timeout_minutes > 0")
    if t.pg_timeout_minutes > PG_TIMEOUT_MAX_MINUTES:  # a timedelta of more overflows where the group is made
        raise UserError(f"train.pg_timeout_minutes={t.pg_timeout_minutes:g}: at most {PG_TIMEOUT_MAX_MINUTES:g} "
                        "(about 19 years); a collective that waits longer has hung (train.hang_timeout watches "
                        "for that)")
    if t.grad_clip < 0:
        raise UserError(f"train.grad_clip={t.grad_clip}: must be >= 0 (0 turns clipping off)")
    if t.gc_interval < 0:
        raise UserError(f"train.gc_interval={t.gc_interval}: must be >= 0 (0: Python's automatic garbage collection)")
    lg = cfg.logging
    if lg.wandb_mode not in ("offline", "online", "disabled"):
        raise UserError(f"logging.wandb_mode={lg.wandb_mode!r}: choose offline, online or disabled")
    if lg.peak_tflops is not None and not lg.peak_tflops > 0:
        raise UserError(f"logging.peak_tflops={lg.peak_tflops}: must be positive (or null to look it up)")
    if lg.profile_steps is not None:
        start, _, end = str(lg.profile_steps).partition(":")
        if not (re.fullmatch(r"[0-9]+", start) and re.fullmatch(r"[0-9]+", end) and 0 < int(start) < int(end)):
            raise UserError(f"logging.profile_steps={lg.profile_steps!r}: use START:END with 0 < START < END, "
                            "e.g. 10:12")
        if int(end) > cfg.train.steps + 1:
            raise UserError(f"logging.profile_steps={lg.profile_steps!r} ends after the run's last step "
                            f"(train.steps={cfg.train.steps}; END is the first step not profiled): use an END <= "
                            f"{cfg.train.steps + 1}")
    c = cfg.checkpoint
    if c.interval < 0 or c.keep_last < 1 or c.keep_every < 0 or c.interval_minutes < 0:
        raise UserError(
            f"checkpoint: interval={c.interval}, keep_last={c.keep_last}, keep_every={c.keep_every}, "
            f"interval_minutes={c.interval_minutes}; need interval >= 0, keep_last >= 1, keep_every >= 0, "
            "interval_minutes >= 0"
        )
    # By type: a float 1.0 == True would pass `in (True, False)` (the integers 1 and 0 are booleans by now).
    if not (c.async_save == "auto" or isinstance(c.async_save, bool)):
        raise UserError(f"checkpoint.async_save={c.async_save!r}: choose auto, true or false")
    if c.keep_every and c.interval and c.keep_every % c.interval:
        raise UserError(f"checkpoint.keep_every={c.keep_every} is not a multiple of checkpoint.interval={c.interval}: "
                        f"only steps divisible by both (every {math.lcm(c.keep_every, c.interval)}) would be kept; "
                        f"use a multiple of {c.interval}")
    if t.seq_len > args.max_position_embeddings:
        raise UserError(
            f"train.seq_len={t.seq_len} exceeds the {args.max_position_embeddings} positions of "
            f"model={cfg.model.name}; lower train.seq_len"
        )
    if t.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"train.device={t.device!r}: choose auto, cpu or cuda")
    if t.mixed_precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"train.mixed_precision={t.mixed_precision!r}: choose auto, bf16 or fp32")
    if not (o.fused == "auto" or isinstance(o.fused, bool)):
        raise UserError(f"optim.fused={o.fused!r}: choose auto, true or false")
    m = cfg.model
    from qwen2_dist.model.attention import BACKENDS
    from qwen2_dist.model.loss import LOSSES, liger_z_loss_error

    if m.attention not in BACKENDS:
        raise UserError(f"model.attention={m.attention!r}: choose one of {', '.join(BACKENDS)}")
    if m.loss not in LOSSES:
        raise UserError(f"model.loss={m.loss!r}: choose one of {', '.join(LOSSES)}")
    if m.loss in ("chunked", "liger") and p.tp > 1:
        raise UserError(f"model.loss={m.loss} cannot read vocabulary-sharded logits (parallel.tp={p.tp}); use "
                        "model.loss=auto or plain with tensor parallelism")
    if not 0 <= m.z_loss < 1:
        raise UserError(f"model.z_loss={m.z_loss:g}: must be a number from 0 (off) to below 1, e.g. 1e-4 or 1e-5")
    if m.z_loss and m.loss == "liger":
        raise liger_z_loss_error(m.z_loss)
    from qwen2_dist.model.kernels import FUSE_PROJECTIONS, KERNELS

    if m.kernels not in KERNELS:
        raise UserError(f"model.kernels={m.kernels!r}: choose one of {', '.join(KERNELS)}")
    if m.kernels != "torch" and str(p.compile).lower() == "true":
        raise UserError(f"model.kernels={m.kernels} with parallel.compile=true: the compiled blocks fuse these ops "
                        "themselves; use model.kernels=torch, or parallel.compile=false")
    if m.kernels != "torch" and p.tp > 1:
        # Under TP the norms see sequence-sharded DTensors, which the Triton and CUDA kernels cannot take.
        raise UserError(f"model.kernels={m.kernels} needs parallel.tp=1 (got {p.tp}): its kernels take plain tensors, "
                        "not tensor parallelism's sharded activations; use model.kernels=torch")
    if not isinstance(m.fuse_projections, (bool, str)) or m.fuse_projections not in FUSE_PROJECTIONS:
        raise UserError(f"model.fuse_projections={m.fuse_projections!r}: choose false, true (q/k/v and gate/up), qkv "
                        "or mlp")
    if m.fuse_projections and p.tp > 1:
        raise UserError(f"model.fuse_projections={str(m.fuse_projections).lower()} needs parallel.tp=1 (tensor "
                        "parallelism shards q/k/v and gate/up separately); set model.fuse_projections=false")
    if m.float8 and (p.tp > 1 or m.fuse_projections):
        raise UserError("model.float8=true works with parallel.tp=1 and model.fuse_projections=false (the fused "
                        "projections bypass the float8 linears); change one of them")
    # What each of these needs that the job does not give, and only that (a list of every condition with its value
    # read as if a satisfied one, "one process (got 1)", were the problem).
    fused_adamw = [(o.impl != "torch", f"optim.impl=torch (got {o.impl})"),
                   (o.fused is False, "optim.fused=auto or true (got false)")]
    unmet = [need for failing, need in [
        (world_size > 1, f"one process (got {world_size}; under FSDP each rank updates only its shard)"),
        (o.in_backward, "optim.in_backward=false"), *fused_adamw] if failing]
    if o.overlap and unmet:
        raise UserError("optim.overlap=true steps torch's fused AdamW on a side stream of one process: it needs "
                        + "; ".join(unmet) + " (or set optim.overlap=false)")
    unmet = [need for failing, need in [
        (world_size > 1, f"one process (got {world_size})"),
        (t.grad_clip > 0, f"train.grad_clip=0 (got {t.grad_clip:g}: no gradient norm exists before the update)"),
        (t.spike_sigma > 0, f"train.spike_sigma=0 (got {t.spike_sigma:g})"),
        (t.global_batch_size != t.micro_batch_size, "train.global_batch_size = train.micro_batch_size, one "
         f"micro-batch a step (got {t.global_batch_size} and {t.micro_batch_size})"),
        (bool(t.batch_rampup), f"no train.batch_rampup (got {list(t.batch_rampup)})"), *fused_adamw] if failing]
    if o.in_backward and unmet:
        raise UserError("optim.in_backward=true updates each parameter during backward with torch's fused AdamW, so "
                        "it needs " + "; ".join(unmet) + " (or set optim.in_backward=false)")
    if o.impl not in ("torch", "apex"):
        raise UserError(f"optim.impl={o.impl!r}: choose torch or apex")
    if o.impl == "apex" and world_size > 1:
        # FusedAdam hands the parameters' and gradients' storage to its CUDA kernels; FSDP's and TP's parameters
        # are DTensors, whose local shards it would have to be given instead.
        raise UserError(f"optim.impl=apex runs in one process only (got {world_size}): apex's FusedAdam cannot "
                        "update FSDP's or TP's sharded (DTensor) parameters; use optim.impl=torch, whose fused AdamW "
                        "does")
    if o.impl == "apex" and o.fused != "auto":
        raise UserError(f"optim.fused={o.fused} chooses torch's AdamW kernel; apex's FusedAdam (optim.impl=apex) is "
                        "always fused: leave optim.fused=auto, or set optim.impl=torch")
    if m.loss_chunk_tokens < 1:
        raise UserError(f"model.loss_chunk_tokens={m.loss_chunk_tokens}: must be a positive number of tokens, "
                        "e.g. 2048")
    dp_shard = _check_parallel(p, args, t, world_size)
    dp = p.dp_replicate * dp_shard
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise UserError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size x "
            f"data-parallel size = {t.micro_batch_size} x {dp}; pick a global batch that is a multiple of "
            f"{t.micro_batch_size * dp}"
        )
    uneven = [batch for batch, _ in batch_stages(t) if batch % (t.micro_batch_size * dp)]
    if uneven:
        raise UserError(
            f"train.batch_rampup={list(t.batch_rampup)}: the global batch {uneven[0]} is not divisible by "
            f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}; make each stage's batch a "
            f"multiple of {t.micro_batch_size * dp}"
        )
    # Meant as a keyword, read as a path: with checkpoints of its own the run would resume the newest without a word
    # (a path of another run is not read once the run has its own), where "None" meant to start afresh.
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and resume.strip().lower() in ("auto", "none", "null", "latest", "last"):
        raise UserError(f"checkpoint.resume={resume}: the keywords are auto (resume the newest checkpoint of the run) "
                        "and none (start afresh), in lower case; a checkpoint is named by its path")
    if files:
        check_writable_dir(cfg.run_dir, f"run_dir={cfg.run_dir}", "give the run a directory this user can write")
        _check_start(cfg, args)
    _check_data(cfg.data, cfg.eval, files)
    if files:
        _check_token_ids(cfg.data, cfg.eval, args.vocab_size)
    elif len(cfg.data.sources) > 1:
        from qwen2_dist.data.loader import mixture_quotas

        mixture_quotas([(s.path, s.weight) for s in cfg.data.sources])
    # The embedded corpus (no data.path): built after the launch, on every node; too few tokens would fail there.
    least = 2 * (cfg.train.seq_len + 1)  # one training sample, with room for the held-out share and the tail
    if not (cfg.data.synthetic or _data_paths(cfg.data)) and cfg.data.embedded_max_tokens < least:
        raise UserError(f"data.embedded_max_tokens={cfg.data.embedded_max_tokens}: the embedded corpus needs at least "
                        f"{least} tokens at train.seq_len={cfg.train.seq_len}; raise it (default 4000000)")
    return {
        "dp_replicate": p.dp_replicate, "dp_shard": dp_shard, "tp": p.tp,
        "grad_accum_steps": t.global_batch_size // (t.micro_batch_size * dp),
    }


def _check_start(cfg: JobConfig, args) -> None:
    """The checkpoint or weights the job starts from: existing, committed, of this model."""
    # A checkpoint the job names must be a committed one: a run directory, its checkpoints/ or a save cut short
    # would otherwise fail in every process after the launch.
    from qwen2_dist.train.checkpoint import in_run, require_committed, resume_candidates, rollback_done

    resume, ckpt_root = cfg.checkpoint.resume, os.path.join(cfg.run_dir, "checkpoints")
    # A run with checkpoints of its own resumes them: what started it (checkpoint.resume=PATH of another run,
    # model.init_from_*) is not read again, and may be gone by now (scratch cleaned, the other run's retention)
    # without its restarts and requeues being refused for it.
    first = resume_candidates(ckpt_root, resume)[:1]
    resumes_own = bool(first) and in_run(ckpt_root, first[0])
    # After a rollback to it, PATH may be gone (retention): restarts go on from the run's newer checkpoints.
    if resume not in ("auto", "none") and not rollback_done(ckpt_root, resume):
        if not (resumes_own and not in_run(ckpt_root, resume)):
            if not os.path.isdir(resume):
                raise UserError(f"checkpoint.resume={resume}: no such checkpoint directory; use auto, none or an "
                                "existing path")
            require_committed(resume, "checkpoint.resume")
        init = [key for key in ("init_from_hf", "init_from_checkpoint") if getattr(cfg.model, key) is not None]
        if init:
            raise UserError(f"checkpoint.resume={resume} and model.{init[0]} are both set: the run starts from the "
                            f"checkpoint's weights, and model.{init[0]} would be ignored; drop one")
    if cfg.model.init_from_checkpoint is not None and cfg.model.init_from_hf is not None:
        raise UserError("model.init_from_hf and model.init_from_checkpoint are both set: pick the one whose weights "
                        "start the run")
    if not resumes_own:
        if cfg.model.init_from_hf is not None and not os.path.isdir(cfg.model.init_from_hf):
            raise UserError(f"model.init_from_hf={cfg.model.init_from_hf}: no such directory")
        if cfg.model.init_from_checkpoint is not None:
            if not os.path.isdir(cfg.model.init_from_checkpoint):
                raise UserError(f"model.init_from_checkpoint={cfg.model.init_from_checkpoint}: no such directory")
            require_committed(cfg.model.init_from_checkpoint, "model.init_from_checkpoint")
        if cfg.model.init_from_hf is not None:
            from qwen2_dist.model.hf import check_hf_matches

            check_hf_matches(cfg.model.init_from_hf, args)  # config.json and the weight files' headers
