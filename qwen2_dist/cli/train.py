"""qwen2-train: the Hydra entry point; builds the job (config -> world -> mesh -> model -> data) and runs it."""

import difflib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from qwen2_dist.cli import exit_without_collecting
from qwen2_dist.config import (
    BatchSchedule, JobConfig, advisories, check_known_keys, check_saved, did_you_mean, parse_bytes, register_configs,
    uses_bf16, validate,
)
from qwen2_dist.errors import CheckpointNotLoadable, ResumeMismatch, StorageUnreadable, UserError
from qwen2_dist.fsutil import write_atomic
from qwen2_dist.train.faults import TrainingHalted

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from qwen2_dist.parallel.mesh import World

log = logging.getLogger("qwen2_dist")


def conf_dir() -> str:
    """The conf/ directory: $QWEN2_DIST_CONF; else the copy an installed package holds (qwen2_dist/conf, see
    pyproject.toml); else the source tree's, next to the package (an editable install, or a checkout on the path)."""
    path = os.environ.get("QWEN2_DIST_CONF")
    if not path:
        package = Path(__file__).resolve().parents[1]
        installed = package / "conf"
        path = str(installed if (installed / "config.yaml").is_file() else package.parent / "conf")
    if not os.path.isfile(os.path.join(path, "config.yaml")):
        raise UserError(f"{path}/config.yaml not found; set QWEN2_DIST_CONF to a conf/ directory (the source tree's "
                        "conf/, or a copy of it) or reinstall qwen2-dist")
    return path


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def write_job_config(run_dir: str, resolved: dict) -> list[str]:
    """Write the job's resolved config to run_dir/config.yaml. A start whose config differs from the last one's
    keeps that one as configs/config-UTCTIME.yaml and logs what changed (which settings a restart changed, and
    when, stays on record); returns the changes, as "key: old -> new"."""
    path = os.path.join(run_dir, "config.yaml")
    text = OmegaConf.to_yaml(resolved)
    changes = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            before_text = f.read()
        if before_text != text:
            try:
                before = OmegaConf.to_container(OmegaConf.create(before_text))
            except Exception:  # unreadable: kept aside all the same
                before = {}
            old, new = _flat(before if isinstance(before, dict) else {}), _flat(resolved)
            changes = [f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}"
                       for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
            stem = os.path.join(run_dir, "configs", f"config-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            kept, n = f"{stem}.yaml", 1
            while os.path.exists(kept):  # two starts in one second
                n += 1
                kept = f"{stem}-{n}.yaml"
            os.makedirs(os.path.dirname(kept), exist_ok=True)
            os.replace(path, kept)
            log.info("config: %d setting(s) changed since the last start (its config kept as %s): %s", len(changes),
                     kept, "; ".join(changes[:12]) + ("; ..." if len(changes) > 12 else ""))
    write_atomic(path, text)
    return changes


def setup_logging(run_dir: str, rank: int) -> None:
    """Console on rank 0 (warnings only elsewhere) and one log file per rank under run_dir/logs/."""
    path = os.path.join(run_dir, "logs", f"rank{rank}.log")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        file = logging.FileHandler(path)
    except OSError as exc:
        from qwen2_dist.train.metrics import os_error_text

        raise UserError(f"cannot write the log of rank {rank} at {exc.filename or path}: {os_error_text(exc)}; "
                        f"run_dir={run_dir} needs logs/ as a directory this user can write") from exc
    # With the date: the file is appended to across restarts and requeues, which may span days.
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    file.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [console, file]
    root.setLevel(logging.INFO)


def resolve_device(requested: str) -> str:
    """train.device resolved: auto is cuda when a GPU is visible, else cpu; cuda without one is refused."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda: no CUDA device is visible; use train.device=cpu or auto")
    return requested


def build_model_and_optimizer(job: JobConfig, world: "World", mesh: "DeviceMesh | None", device_type: str,
                              load_weights: bool = False,
                              restoring: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The job's model, parallelized over the mesh and initialized on this rank's device (when load_weights, from
    job.model.init_from_hf or init_from_checkpoint), and its optimizer. With restoring (the caller loads a
    checkpoint next) or weights to load, no random init is drawn: the parameters hold NaN until the load."""
    from qwen2_dist.model.attention import resolve_backend
    from qwen2_dist.model.hf import load_hf_into
    from qwen2_dist.model.qwen2 import build_model, count_parameters
    from qwen2_dist.parallel.parallelize import parallelize
    from qwen2_dist.train.optim import build_optimizer

    model = build_model(job.model.args(), "meta")
    bf16 = uses_bf16(job.train, device_type)
    model.set_attention_backend(resolve_backend(job.model.attention, device_type, job.data.document_masking, bf16,
                                                job.model.args().head_dim))
    model = parallelize(model, mesh, job.parallel, torch.bfloat16 if bf16 else torch.float32, device_type,
                        float8=job.model.float8, kernels=job.model.kernels)
    # FSDP's CPU offload keeps the sharded parameters on the CPU (it gathers them onto the GPU for each forward and
    # backward) and refuses, at the first forward, parameters materialized on the GPU.
    model.to_empty(device="cpu" if job.parallel.cpu_offload else world.device)
    from_hf = load_weights and job.model.init_from_hf
    from_checkpoint = load_weights and job.model.init_from_checkpoint
    if restoring or from_hf or from_checkpoint:
        model.init_placeholders()
    else:
        model.init_weights(job.seed)
    if from_hf:
        load_hf_into(model, job.model.init_from_hf)
        log.info("initialized from Hugging Face weights in %s", job.model.init_from_hf)
    elif from_checkpoint:
        from qwen2_dist.train.checkpoint import load_weights as load_checkpoint_weights

        load_checkpoint_weights(job.model.init_from_checkpoint, model, job.model.args(), job.checkpoint.checksums)
        log.info("initialized from the model weights of checkpoint %s", job.model.init_from_checkpoint)
    log.info("model %s: %s parameters", job.model.name, f"{count_parameters(model):,}")
    optimizer = build_optimizer(model, job.optim, device_type)
    return model, optimizer


# The run_dirs of the sweep points run so far in this process (qwen2-train -m runs them one after the other).
_sweep_run_dirs: set[str] = set()
# Whether check_sweep_points composed every point of this process' sweep before it started (each with its own
# run_dir, a swept run_dir=a,b included); else each point is checked as it comes (check_sweep_point).
_sweep_expanded = False


def check_sweep_point(raw_run_dir: str, run_dir: str, seen: set[str], expanded: bool = False) -> None:
    """A point of a Hydra sweep (qwen2-train -m) needs a run_dir of its own: in another point's, it would resume
    that point's checkpoints and train nothing (or continue it with other settings). expanded: check_sweep_points
    saw every point's run_dir before the sweep started (a fixed one is then a swept value, as in run_dir=a,b)."""
    fix = "give each point its own from the swept values, e.g. run_dir='runs/sweep/lr${optim.lr}'"
    if "${" not in raw_run_dir and not expanded:
        raise UserError(f"qwen2-train -m: every point of the sweep would train in run_dir={raw_run_dir}; {fix}")
    if os.path.realpath(run_dir) in seen:
        raise UserError(f"qwen2-train -m: this point's run_dir={run_dir} is an earlier point's; {fix}")
    seen.add(os.path.realpath(run_dir))


def run(cfg: DictConfig):
    """Run the training job described by a composed config; returns the TrainResult."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from qwen2_dist.parallel.mesh import broadcast_object, init_distributed, world_from_env
    from qwen2_dist.train import runlock

    job = to_job(cfg)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        check_sweep_point(str(OmegaConf.to_container(cfg, resolve=False)["run_dir"]), job.run_dir, _sweep_run_dirs,
                          _sweep_expanded)
    _, local_rank, world_size = world_from_env()
    layout = validate(job, world_size)
    check_sinks(job)  # also here, not only in the launchers' check: rank 0 opens them after the model is built
    device_type = resolve_device(job.train.device)
    world = init_distributed(device_type, job.train.pg_timeout_minutes)
    setup_logging(job.run_dir, world.rank)
    lock = runlock.acquire_on_main(job.run_dir, world.is_main)  # before anything in run_dir is cleaned or written
    if world.is_main:
        for advice in advisories(job, int(os.environ.get("LOCAL_WORLD_SIZE") or 0) or None):
            log.warning(advice)
        from qwen2_dist.train import no_restart

        no_restart.clear_earlier(job.run_dir)  # a new torchrun: an earlier one's stop does not hold for it
    try:
        # What the launchers' check reads from the job's files (check_saved), for a job started without them too
        # (qwen2-train, a torchrun of one's own): before the model is built, and before a rollback moves anything.
        problem = None
        if world.is_main:
            try:
                check_saved(job)
            except UserError as exc:
                problem = exc
        problem = broadcast_object(problem)  # every rank stops with it, none waits in a collective
        if problem is not None:
            raise problem
        if local_rank == 0:
            warn_few_cpus(0 if job.data.synthetic else job.data.num_workers)
        return _train(cfg, job, world, layout, device_type, local_rank)
    finally:
        if lock is not None:
            lock.close()


def warn_few_cpus(num_workers: int) -> None:
    """Warn when this node's trainers and their data workers have fewer CPUs than processes (available_cpus: the
    CPU affinity bounded by a cgroup quota): a Slurm task gets one CPU unless the job asks for more."""
    from qwen2_dist.data.prepare import available_cpus

    cpus = available_cpus()
    trainers = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if cpus < trainers * (1 + num_workers):
        log.warning("this node's %d trainer process(es) and their %d data worker(s) (data.num_workers=%d) share "
                    "%d CPU(s) (this process' CPU affinity and CPU quota): the steps may wait for the host. Give "
                    "the job more CPUs (under Slurm: #SBATCH --cpus-per-task=N, as a task gets one CPU unless it "
                    "asks; slurm/train.sbatch passes it on to srun) or lower data.num_workers", trainers,
                    trainers * num_workers, num_workers, cpus)


def _train(cfg: DictConfig, job: JobConfig, world: "World", layout: dict, device_type: str, local_rank: int):
    """run() once the job holds its run_dir."""
    from qwen2_dist.data.corpus import embedded_corpus
    from qwen2_dist.data.loader import TokenBatches, run_cache_key
    from qwen2_dist.data.synthetic import SyntheticBatches
    from qwen2_dist.model.hf import hf_source_fields
    from qwen2_dist.parallel.mesh import build_mesh, dp_rank_and_size, set_deterministic
    from qwen2_dist.parallel.parallelize import compile_enabled
    from qwen2_dist.train import checkpoint
    from qwen2_dist.train.tasks import load_tasks
    from qwen2_dist.train.trainer import Trainer

    resolved = OmegaConf.to_container(cfg, resolve=True)
    args = job.model.args()
    if job.train.deterministic:
        set_deterministic()
    mesh = build_mesh(world, layout["dp_replicate"], layout["dp_shard"], layout["tp"])
    dp_rank, dp_size = dp_rank_and_size(mesh)
    log.info("world %d on %s, layout %s%s", world.world_size, device_type, layout, ramp_note(job))
    if device_type == "cpu":
        from qwen2_dist.train.host_memory import keep_freed_memory

        log.info("training on the CPU: %s", keep_freed_memory())

    ckpt_root = os.path.join(job.run_dir, "checkpoints")
    candidates = checkpoint.prepare_resume(ckpt_root, job.checkpoint.resume, job.checkpoint.checksums)
    note = checkpoint.resume_note(ckpt_root, job.checkpoint.resume, candidates) if world.is_main else None
    if note:
        log.info("%s", note)
    # Where the weights started: this job's model.init_from_*, or the resumed run's (its newest readable checkpoint).
    init_from, resumed_meta = checkpoint.init_source(job.model), None
    for path in candidates:
        try:
            meta = checkpoint.read_metadata(path)
        except UserError:
            continue  # damaged: restore() below reports it and falls back
        checkpoint.check_model_args(f"checkpoint {path}", meta, args, checkpoint.other_model_fix(ckpt_root, path))
        if resumed_meta is None:
            init_from, resumed_meta = checkpoint.check_init_source(path, meta, init_from), meta
    # What the export keeps of the Hugging Face weights the run started from (model.hf.hf_source_fields).
    # The longest train.seq_len the weights have been trained at, by this job and the run or stage before it: the
    # export's context is at least that (convert._export_source).
    before = resumed_meta or {}
    if job.model.init_from_checkpoint and not candidates:
        before = checkpoint.init_checkpoint_metadata(job.model.init_from_checkpoint, args)  # refused now, not later
    if job.model.init_from_hf and not candidates:
        before = {"hf_source": hf_source_fields(job.model.init_from_hf)}
    hf_source = before.get("hf_source")
    earlier = before.get("trained_seq_len")
    trained_seq_len = max(job.train.seq_len, earlier if isinstance(earlier, int) else 0)

    data_path = job.data.path
    cache = job.data.cache_root()
    if data_path is None and not job.data.sources and not job.data.synthetic:
        if local_rank == 0:
            data_path = embedded_corpus(cache, job.train.seq_len, job.data.embedded_max_tokens)
        if dist.is_initialized():
            dist.barrier()
        if local_rank != 0:
            data_path = embedded_corpus(cache, job.train.seq_len, job.data.embedded_max_tokens)

    model, optimizer = build_model_and_optimizer(job, world, mesh, device_type,
                                                 load_weights=not candidates, restoring=bool(candidates))
    # Every rank reads by its data-parallel rank (tensor-parallel peers get the same batches); the remote cache
    # is private to the run_dir, so two runs never share (or fight over) one.
    sources = [(s.path, s.weight) for s in job.data.sources] or [(data_path, 1.0)]
    loader_args = dict(
        seq_len=job.train.seq_len, micro_batch_size=job.train.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
        seed=job.seed, shuffle=job.data.shuffle, shuffle_block_size=job.data.shuffle_block_size,
        document_masking=job.data.document_masking, eod_mask_loss=job.data.eod_mask_loss, cache_dir=cache,
        num_workers=job.data.num_workers,
        run_key=run_cache_key(job.run_dir), vocab_size=args.vocab_size,
    )
    if job.data.synthetic:
        batches = SyntheticBatches(args.vocab_size, job.train.seq_len, job.train.micro_batch_size,
                                   job.train.global_batch_size, dp_rank, dp_size, job.seed, BatchSchedule.of(job.train))
        log.info("data: random token ids (data.synthetic=true); evaluation is off")
    else:
        # The limit bounds the training shards; the held-out split (a small fraction) is cached whole.
        limit = parse_bytes("data.cache_limit", job.data.cache_limit) if job.data.cache_limit is not None else None
        batches = TokenBatches(sources, global_batch_size=job.train.global_batch_size, cache_limit=limit,
                               batch_schedule=BatchSchedule.of(job.train), **loader_args)
    # The tokenizer the data was prepared with (qwen2-prepare's tokenizer=): what qwen2-convert to-hf writes, and what
    # eval.tasks are tokenized with.
    tokenizer_name = None if job.data.synthetic else data_tokenizer(sources, loader_args)
    evals, evals_complete, tasks = [], True, []
    if job.eval.interval and not job.data.synthetic:
        evals, evals_complete = build_evals(job, sources, loader_args, dp_size)
        # Padded to train.seq_len where blocks are compiled (and on CUDA): another shape would recompile them.
        full_length = device_type == "cuda" or compile_enabled(job.parallel, device_type, job.model.kernels)
        tasks = load_tasks(job, tokenizer_name, args.vocab_size, layout["tp"], full_length, log=log)
    metadata = {
        "model": job.model.name, "model_args": args.to_dict(), "world_size": world.world_size, "layout": layout,
        "config_hash": checkpoint.config_hash(resolved), "init_from": init_from, "hf_source": hf_source,
        "trained_seq_len": trained_seq_len,
        "data_tokenizer": tokenizer_name,
    }
    trainer = Trainer(job, args, world, mesh, model, optimizer, batches, metadata,
                      evals, evals_complete, tasks)
    damaged = []
    for path in candidates:
        try:
            trainer.restore(path)
        except ResumeMismatch as exc:
            raise UserError(f"checkpoint {path}: {exc}") from None
        except CheckpointNotLoadable:
            raise  # maybe intact: neither fallen back past (its progress lost) nor set aside as damaged
        except UserError as exc:
            if os.path.realpath(path) == os.path.realpath(job.checkpoint.resume):
                raise  # the checkpoint the job names
            log.warning("checkpoint %s is damaged (%s); falling back to the previous committed one", path, exc)
            damaged.append((path, exc))
            continue
        log.info("resumed from %s at step %d", path, trainer.step)
        if world.is_main:  # every rank has loaded; none reads the damaged ones again
            for bad, _ in damaged:
                checkpoint.set_aside_damaged(bad)
        break
    else:
        if candidates:
            newest, error = damaged[0]
            raise UserError(f"no committed checkpoint under {ckpt_root} could be loaded ({len(damaged)} tried; "
                            f"the newest, {os.path.basename(newest)}: {error}). If they all fail the same way, this "
                            "job's settings may not fit them (compare with the run's config.yaml) rather than every "
                            "file being damaged; otherwise move the damaged ones away, or start afresh with "
                            "checkpoint.resume=none (which moves them to checkpoints/abandoned-*)")
    if world.is_main:  # once the job is known to run: a start refused above leaves the record as it was
        write_job_config(job.run_dir, resolved)
    try:
        result = trainer.fit()
    finally:
        batches.close()
        for ev in evals:
            ev.batches.close()
    ended = ending(result, job.train)
    log.info("%s, %s tokens seen%s", ended, f"{result.tokens_seen:,}",
             "" if result.last_loss is None else f", last loss {result.last_loss:.4f}")  # None: no step ran
    return result


def ending(result, train) -> str:
    """The run's last line, before its tokens and loss: a stop by signal or at train.stop_at is no end of the run
    ("done" said it was: a preemption at step 261 of 1,000), and says whether the stop's checkpoint was saved."""
    if result.stopped_by_signal:
        # Saved, or not (a failed save's error is above).
        resumes = "there" if result.saved_step == result.step else (
            f"step {result.saved_step}" if result.saved_step >= 0 else "the start")
        return (f"stopped by signal at step {result.step} of {train.steps} "
                + ("(saved; the next start resumes there)" if resumes == "there" else
                   f"(not saved: the next start resumes from {resumes})"))
    if result.step < train.steps:  # train.stop_at, which stops with a checkpoint (or an error)
        return (f"stopped at train.stop_at={train.stop_at}: step {result.step} of {train.steps} (saved; a start "
                "with train.stop_at raised or removed goes on from there)")
    return f"done: step {result.step}"


def data_tokenizer(sources: list[tuple[str, float]], loader_args: dict) -> str | None:
    """The tokenizer the sources' prepare summaries name (tasks.summaries_tokenizer); None for none or several."""
    from qwen2_dist.data.loader import source_summary
    from qwen2_dist.train.tasks import summaries_tokenizer

    return summaries_tokenizer([source_summary(path, loader_args["cache_dir"], loader_args["run_key"])
                                for path, _ in sources])


def build_evals(job: JobConfig, sources: list[tuple[str, float]], loader_args: dict, dp_size: int):
    """The held-out samples each evaluation reads: one eval set for the job's one source, one per source of a
    mixture (named as in the metrics), each of the first eval.samples of its val split (fewer where the split holds
    fewer, with a warning), then one per eval.datasets. Sources without a held-out split are left out with a warning.
    Returns the eval sets and whether every source has one (a mixture's eval_loss weighs all of them)."""
    from qwen2_dist.config import eval_dataset_names, source_names
    from qwen2_dist.data.loader import TokenBatches, source_summary
    from qwen2_dist.data.prepare import VAL
    from qwen2_dist.train.trainer import EvalSet

    names = source_names(job.data.sources) if len(sources) > 1 else [None]
    held = [source_summary(path, loader_args["cache_dir"], loader_args["run_key"])["splits"].get(VAL, {})
            .get("samples", 0) for path, _ in sources]
    missing = [path for (path, _), count in zip(sources, held) if not count]
    if missing:
        log.warning("eval: no held-out split in %s (prepare with a val_fraction > 0 that holds out at least one "
                    "sample); %s", ", ".join(missing),
                    ("only eval.datasets are evaluated" if job.eval.datasets else "evaluation is off")
                    if len(missing) == len(sources) else
                    "those sources are not evaluated, and there is no mixture eval_loss")
    per_micro_step = job.train.micro_batch_size * dp_size
    evals = []
    for (path, weight), name, count in zip(sources, names, held):
        if not count:
            continue
        samples = job.eval.samples
        if count < samples:
            log.warning("eval: eval.samples=%d is more than the %d held-out samples%s: evaluating %d", samples,
                        count, f" of {name} ({path})" if name else "", count)
            samples = count
        # Read in the training process: a few micro-batches now and then do not pay for worker start-up.
        batches = TokenBatches([(path, 1.0)], global_batch_size=eval_step_size(samples, per_micro_step), split=VAL,
                               **{**loader_args, "num_workers": 0})
        evals.append(EvalSet(batches, samples, name, weight))
    for dataset, name in zip(job.eval.datasets, eval_dataset_names(job.data, job.eval)):
        # The launchers' check (check_saved) refused a split without samples.
        count = source_summary(dataset.path, loader_args["cache_dir"], loader_args["run_key"])["splits"][
            dataset.split]["samples"]
        samples = min(job.eval.samples, count)
        if samples < job.eval.samples:
            log.warning("eval: eval.samples=%d is more than the %d samples of the %s split of %s (%s): evaluating %d",
                        job.eval.samples, count, dataset.split, name, dataset.path, count)
        # In the dataset's own order (no shuffle): the same samples whatever the job's seed, so that runs compare.
        batches = TokenBatches([(dataset.path, 1.0)], global_batch_size=eval_step_size(samples, per_micro_step),
                               split=dataset.split, evaluation=True,
                               **{**loader_args, "num_workers": 0, "shuffle": False})
        evals.append(EvalSet(batches, samples, name, extra=True))
    return evals, not missing


def ramp_note(job: JobConfig) -> str:
    """What a layout's grad_accum_steps (that of train.global_batch_size) leaves out under train.batch_rampup."""
    schedule = BatchSchedule.of(job.train)
    return f"; with train.batch_rampup, global batches of {schedule.describe()}" if schedule.stages else ""


def eval_step_size(samples: int, per_micro_step: int) -> int:
    """The held-out samples one evaluation reads to evaluate `samples` of them: whole micro-batches on every
    data-parallel rank (per_micro_step samples each), the rows past `samples` ignored (Trainer.evaluate)."""
    return -(-samples // per_micro_step) * per_micro_step


def compose_job(overrides: list[str]) -> JobConfig:
    """The job conf/ plus these overrides describe (Hydra's Compose API); a bad override is one UserError line."""
    return _compose(overrides)[1]


def _compose(overrides: list[str]) -> tuple[DictConfig, JobConfig]:
    """compose_job's composed config and its typed job."""
    from hydra import compose, initialize_config_dir

    register_configs()
    path = conf_dir()
    try:
        with initialize_config_dir(config_dir=path, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except Exception as exc:  # Hydra/OmegaConf raise many types; all mean "this override is wrong"
        raise UserError(f"bad override in {' '.join(overrides)!r}: {_why(exc, path)}") from None
    try:
        return cfg, to_job(cfg)
    except UserError as exc:
        raise UserError(f"bad override in {' '.join(overrides)!r}: {exc}") from None


def to_job(cfg: DictConfig) -> JobConfig:
    """The typed job of a composed config, refusing keys the schema does not have (see check_known_keys)."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    check_known_keys(raw)
    if "${now:" in str(raw.get("run_dir", "")).replace(" ", ""):
        # Each process resolves its own config, and each restart again: the time differs between them.
        raise UserError(f"run_dir={raw['run_dir']}: ${{now:...}} gives every process and every restart its own "
                        "directory, so ranks disagree and a restart starts over instead of resuming; use a fixed "
                        "name (or ${oc.env:SLURM_JOB_ID})")
    try:
        job = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:  # a ??? of conf/ left unset, e.g. data=mixture's source paths
        key = getattr(exc, "full_key", None) or "a required setting"
        override = re.sub(r"\[(\d+)\]", r".\1", key)  # data.sources[1].path -> data.sources.1.path
        raise UserError(f"{key} has no value; set it with {override}=VALUE (conf/ leaves it ??? to be given)") from None
    except Exception as exc:  # e.g. an interpolation that does not resolve
        raise UserError(_why(exc, conf_dir())) from None
    return expand_user_paths(job)


def expand_user_paths(job: JobConfig) -> JobConfig:
    """A leading ~ of a local path field made the home directory, as a shell does where the override's value is
    quoted (Hydra needs quotes for '~/...'): left as it is, run_dir=~/x would be a directory named '~' here."""
    def expand(path: str | None) -> str | None:
        return os.path.expanduser(path) if path is not None and "://" not in path else path

    job.run_dir = expand(job.run_dir)
    job.data.path, job.data.cache_dir = expand(job.data.path), expand(job.data.cache_dir)
    for item in [*job.data.sources, *job.eval.datasets, *job.eval.tasks]:
        item.path = expand(item.path)
    job.model.init_from_hf, job.model.init_from_checkpoint = (expand(job.model.init_from_hf),
                                                              expand(job.model.init_from_checkpoint))
    if job.checkpoint.resume not in ("auto", "none"):
        job.checkpoint.resume = expand(job.checkpoint.resume)
    return job


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _why(exc: Exception, path: str) -> str:
    """Hydra's complaint in one line, with what fixes it: the closest keys to a misspelled one, the options of a
    config group, the reason a value does not fit its field (Hydra puts it in the exception's cause)."""
    first = _first_line(exc)
    missing_key = re.match(r"Could not override '([^']+)'", first)
    missing_option = re.search(r"Could not find '([^'/]+)/([^']+)'", first)
    if missing_key:
        key = missing_key.group(1)
        cause = exc.__cause__
        inner = getattr(cause, "full_key", None)
        if cause is not None and inner and not (key == inner or key.startswith(f"{inner}.")):
            # The key exists; the value refused is inside it (data.sources=[{path:/a,wieght:1}]: a key of
            # DataSource misspelt, or a field's value of the wrong type): Hydra's "Could not override" alone read
            # as a setting that does not exist.
            fields = getattr(getattr(cause, "object_type", None), "__dataclass_fields__", {})
            near = difflib.get_close_matches(str(getattr(cause, "key", "")), list(fields), n=1)
            hint = f"; did you mean {near[0]}?" if near else f" (its keys: {', '.join(fields)})" if fields else ""
            return f"{first.rstrip('.')}: {_first_line(cause)}{hint}"
        if key.startswith("parallel.compile_options."):  # a dict of free names: its keys are added, not set
            return f"{first.rstrip('.')}: an Inductor setting is added with +{key}=VALUE"
        return f"{first.rstrip('.')}: no such setting{did_you_mean(key)}"
    if missing_option:
        group, option = missing_option.groups()
        options = sorted(p.stem for p in Path(path, group).glob("*.yaml"))
        if options:
            return f"{group}={option}: no such {group} in {path}/{group}; choose one of {', '.join(options)}"
    if exc.__cause__ is not None:
        return f"{first}: {_first_line(exc.__cause__)}"
    if "HydraConfig was not set" in first:
        return (f"{first}: a ${{hydra:...}} value exists only inside Hydra's run, and the job is composed and checked "
                "before it (and by the launchers before torchrun); write the value itself")
    if re.search(r"LexerNoViableAlt|mismatched input|no viable alternative|token recognition error", first):
        # Hydra's grammar did not parse the override: a character it gives a meaning (~ = [ ] { } , ' " $) in a
        # value that is meant as text.
        return (f"{first}: Hydra could not parse the override; quote a value that holds characters such as ~ = , "
                "[ ] { } as KEY='VALUE' (in a shell: \"KEY='VALUE'\")")
    return f"{first} (list the valid keys with qwen2-train --cfg job)"


def _precheck(argv: list[str]) -> JobConfig | None:
    """Compose the overrides once outside Hydra so a bad one is reported in one line (Hydra prints several). Not
    with a Hydra flag (-m, -c job, -cn NAME, --cfg ...): Hydra's own parse takes those, some with a value after
    them that is no override."""
    composed = _precheck_config(argv)
    return None if composed is None else composed[1]


def _precheck_config(argv: list[str]) -> tuple[DictConfig, JobConfig] | None:
    """_precheck's composed config and job."""
    if any(a.startswith("-") for a in argv):
        return None
    return _compose([a for a in argv if not a.startswith(("hydra.", "hydra/", "+hydra"))])


def _without_hydra(argv: list[str]) -> bool:
    """Whether a run of these arguments needs nothing of Hydra's own run but the composed config: no Hydra flag
    and no override of Hydra's settings (conf/config.yaml has Hydra write no files, configure no logging and stay in
    the working directory; a ${hydra:...} value is refused before launch either way)."""
    return not any(a.startswith("-") or a.lstrip("+~").startswith(("hydra.", "hydra/")) for a in argv)


def launch_check(argv: list[str], world_size: str) -> tuple[JobConfig | None, bool]:
    """The launchers' check of the job of these arguments for world_size processes, before torchrun starts (and
    restarts) workers on a job that cannot run: a sweep, the config and layout, the run directory's lock, the saved
    checkpoints, the machine. Prints what it found. Returns the composed job (None where Hydra's flags leave the
    composing to Hydra) and whether the run has nothing left to train; UserError when the job cannot run.
    qwen2_dist.cli.torchrun runs it in its own process (QWEN2_LAUNCH_CHECK), a launcher with another torchrun as
    `QWEN2_CHECK_ONLY=WORLD_SIZE qwen2-train ARGS`."""
    check_sweep_processes(argv, int(world_size) if world_size.isdigit() else 1)
    check_sweep_points(argv)
    conf_dir()  # a conf/ that is not there, also where Hydra's flags leave the composing to Hydra
    job = _precheck(argv)
    return job, check_only(job, world_size)


def check_only(job: JobConfig | None, world_size: str) -> bool:
    """Validate the job for world_size processes and say so (launch_check's checks of the composed job); True when
    the run has nothing left to train (printed)."""
    from qwen2_dist.train import runlock

    if job is None:
        print("config check skipped (Hydra multirun or flags)")
        return False
    try:
        processes = int(world_size)
    except ValueError:
        raise UserError(f"QWEN2_CHECK_ONLY={world_size}: give the number of processes of the job") from None
    layout = validate(job, processes)
    runlock.check_free(job.run_dir)
    notes = check_saved(job)
    complete = completed_run(job)
    if complete is not None:
        print(complete)
        return True
    device_type = check_machine(job)
    gpus = os.environ.get("QWEN2_LAUNCH_GPUS", "0")
    if gpus.isdigit() and int(gpus) > 0 and job.train.device == "auto" and device_type != "cuda":
        raise UserError(
            f"the launcher counted {gpus} GPU(s) on this node (nvidia-smi, or Slurm's GPUs of the node) and started "
            f"one process per GPU, but this torch ({torch.__version__}) sees no CUDA device "
            f"({_why_no_cuda()}): every process would train on the CPU. Install a CUDA build of torch "
            "(TORCH_SPEC=... bash launch/install.sh; see the README), or, to train on the CPU on purpose, set "
            "train.device=cpu and NPROC")
    per_node = os.environ.get("QWEN2_LAUNCH_NPROC", "")
    visible = torch.cuda.device_count() if device_type == "cuda" else 0
    if per_node.isdigit() and visible and int(per_node) > visible:  # the workers past them would fail each
        raise UserError(
            f"NPROC={per_node}: more processes than the {visible} GPU(s) torch sees on this node (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}), and the job trains on cuda, one GPU per process: "
            f"set NPROC={visible} or fewer, or leave NPROC unset for one per GPU")
    for advice in advisories(job, int(per_node) if per_node.isdigit() else None) + notes:
        print(f"warning: {advice}")
    print(f"config ok for {processes} process(es) on {device_type}: {layout}{ramp_note(job)}")
    return False


RUN_COMPLETE_EXIT = 10
"""`QWEN2_CHECK_ONLY=N qwen2-train` exits with this when the run has nothing left to train: launch/common.sh then
starts no torchrun and ends with 0."""


def completed_run(job: JobConfig) -> str | None:
    """What the launchers' check says of a run that has nothing left to train (checkpoint.resume=auto, the newest
    committed checkpoint at train.steps, or train.stop_at), or None. The job itself would load that checkpoint only
    to say "run already complete" and exit 0, after reading all of it (qwen2-72b with its AdamW state: about
    870 GB, by arithmetic), as when a finished Slurm job is submitted again, or requeued after its last save. The
    checkpoint must have every file its commit recorded, of the recorded size (os.stat, no file read), and an intact
    train state; otherwise (a truncated shard) None, and the job falls back past it as a resume does and trains the
    last steps again. Its files' checksums are not read here (that is the whole checkpoint): they are checked where
    it is read, by a resume with a larger train.steps or by qwen2-convert to-hf."""
    from qwen2_dist.train import checkpoint

    if job.checkpoint.resume != "auto":
        return None
    candidates = checkpoint.resume_candidates(os.path.join(job.run_dir, "checkpoints"), "auto")
    if not candidates:
        return None
    newest = candidates[0]
    try:
        meta = checkpoint.verify(newest, checksums=False)
    except UserError:
        return None  # damaged, gone, or not readable now: the job reports it (and falls back past damage)
    step = meta.get("step")
    last = job.train.steps if job.train.stop_at is None else min(job.train.steps, job.train.stop_at)
    if not isinstance(step, int) or step < last or not checkpoint.train_state_intact(newest, meta):
        return None
    if last == job.train.steps:
        until, more = f"train.steps={job.train.steps}", ("raise train.steps to train on (the learning-rate schedule "
                                                         "runs to train.steps)")
    else:
        until, more = f"train.stop_at={job.train.stop_at}", "raise or remove train.stop_at to train on"
    return f"run already complete: its newest checkpoint {newest} is at step {step} ({until}); nothing to launch: " \
           f"{more}; PRECHECK=0 launches anyway"


def _why_no_cuda() -> str:
    """Why torch.cuda is not available, in a few words."""
    if torch.version.cuda is None:
        return "a build without CUDA"
    try:
        count = torch.cuda.device_count()
    except Exception as exc:  # a driver that does not load
        return f"CUDA {torch.version.cuda} build; {type(exc).__name__}: {str(exc).strip()[:200]}"
    return f"CUDA {torch.version.cuda} build, {count} device(s): the driver may be older than the build needs"


def check_machine(job: JobConfig) -> str:
    """What this machine must have for the job, checked where the launchers check it (the node that starts the
    workers), not after the launch in every worker: the device, and the packages the chosen attention, kernels,
    loss, optimizer and float8 need. Returns the device type."""
    from qwen2_dist.model.attention import resolve_backend
    from qwen2_dist.model.kernels import check_available
    from qwen2_dist.model.loss import resolve_loss
    from qwen2_dist.parallel.parallelize import check_float8, check_parallel_on
    from qwen2_dist.train.optim import apex_fused_adam

    device_type = resolve_device(job.train.device)
    resolve_backend(job.model.attention, device_type, job.data.document_masking, uses_bf16(job.train, device_type),
                    job.model.args().head_dim)
    check_available(job.model.kernels, device_type)
    resolve_loss(job.model.loss, job.parallel.tp, device_type, job.model.z_loss)
    if job.optim.impl == "apex":
        apex_fused_adam(device_type)
    if job.model.float8:
        check_float8(device_type)
    check_parallel_on(job.parallel, device_type, job.model.kernels)
    check_sinks(job)
    return device_type


def check_sinks(job: JobConfig) -> None:
    """The packages of the metrics sinks the job asks for. Rank 0 opens the sinks once the model is built and
    restored: a missing package would fail there, after that work, and torchrun would restart the job for it."""
    import importlib.util

    for name in ("tensorboard", "wandb"):
        if getattr(job.logging, name) and importlib.util.find_spec(name) is None:
            raise UserError(f"logging.{name}=true needs the {name} package; pip install {name}, or set "
                            f"logging.{name}=false")


def _note_in_rank_log(text: str) -> None:
    """text as an ERROR line of this rank's log file (run_dir/logs/rankN.log), when logging is set up, and nowhere
    else: the console has it already."""
    logger = logging.getLogger("qwen2_dist")
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


STORAGE_WAIT_ENV = "QWEN2_STORAGE_RETRY_WAIT"


def storage_wait() -> float:
    """QWEN2_STORAGE_RETRY_WAIT in seconds (60 when unset); a value that is no number of seconds >= 0 is named in a
    warning and 60 is taken: the storage error it follows is what the run must report."""
    text = os.environ.get(STORAGE_WAIT_ENV, "60")
    try:
        wait = float(text)
    except ValueError:
        wait = -1.0
    if not 0 <= wait < float("inf"):
        print(f"warning: {STORAGE_WAIT_ENV}={text!r} is no number of seconds >= 0: waiting 60", file=sys.stderr)
        wait = 60.0
    return wait


def _entry(cfg: DictConfig) -> None:
    from qwen2_dist.train import no_restart
    from qwen2_dist.train.runlock import RunDirBusy, held_by_another_job

    code = 0
    try:
        result = run(cfg)
        if result.stopped_by_signal:
            code = int(os.environ.get("QWEN2_PREEMPT_EXIT_CODE", "0"))
    except (UserError, TrainingHalted) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if not isinstance(exc, RunDirBusy):  # that rank log is the other job's
            _note_in_rank_log(f"stopped: {exc}")  # the rank's log says why it ends, beside what came before
        code = 3 if isinstance(exc, TrainingHalted) else 2
        run_dir = OmegaConf.select(cfg, "run_dir", throw_on_resolution_failure=False)
        # Not recorded: another job's run_dir is not ours; storage that failed a read may give it to a restart.
        # Nor is a stop recorded while another job holds the lock (a second job started into a busy run_dir past
        # the launchers' check, refused before it could take it): that job's launcher would report it for its own
        # failure. This job's own rank 0 holding it is told apart by the torchrun run id in the lock's record.
        run_dir = os.path.expanduser(run_dir) if isinstance(run_dir, str) else None
        if run_dir is not None and not isinstance(exc, (RunDirBusy, StorageUnreadable)) \
                and not held_by_another_job(run_dir):
            # Under torchrun: a restart must not train on. In the job's run_dir as to_job makes it (a leading ~
            # expanded), where the restarts and the launchers look.
            no_restart.record(run_dir, code, str(exc))
        if isinstance(exc, StorageUnreadable) and no_restart.restarts_left():
            # torchrun restarts at once: without a pause its restarts would all meet the same outage in seconds.
            wait = storage_wait()
            print(f"storage not readable: waiting {wait:g} s ({STORAGE_WAIT_ENV}) before this worker exits, so that "
                  f"torchrun's restart ({no_restart.restarts_left()} left) reads it later", file=sys.stderr)
            time.sleep(wait)
    finally:
        multi_process = dist.is_initialized()
        if multi_process:
            dist.destroy_process_group()
    if multi_process:
        # Interpreter teardown after gloo has run sometimes aborts in a C++ destructor ("terminate called without
        # an active exception", seen on torch 2.13 CPU) after the work is done: leave without it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def check_sweep_processes(argv: list[str], processes: int) -> None:
    """A Hydra sweep (-m) runs its points one after the other in one process: with several processes (torchrun),
    each would end with the first point's process group, the rest untrained, and exit 0. UserError then."""
    if processes > 1 and any(a in ("-m", "--multirun") for a in argv):
        raise UserError(f"qwen2-train -m (a Hydra sweep) runs its points one after the other in one process, and this "
                        f"job has {processes} processes: only the first point would train. Launch one job per point "
                        "(e.g. for lr in 1e-4 3e-4; do NPROC=8 bash launch/train_single_node.sh optim.lr=$lr "
                        "run_dir=runs/lr$lr; done), or sweep with one process")


def check_sweep_points(argv: list[str]) -> None:
    """Before a Hydra sweep (qwen2-train -m) trains its first point: every point composed as Hydra's basic sweeper
    will compose it, refused as that point would be, and with a run_dir of its own. Otherwise a run_dir that names
    no swept key (run_dir=runs/s${seed} for a sweep of optim.lr) was found only at the second point, after the
    first had trained, and a bad value of a later point after the earlier ones had. Sweeps this cannot expand
    (other Hydra flags, another sweeper, glob() or interval sweeps, a run_dir that needs ${hydra:...}) are left
    to the check of each point (check_sweep_point)."""
    if not any(a in ("-m", "--multirun") for a in argv) or any(a.startswith("-") and a not in ("-m", "--multirun")
                                                               for a in argv):
        return
    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    if any(a.lstrip("+~").startswith(("hydra.", "hydra/")) or "${hydra:" in a for a in overrides):
        return  # Hydra's settings, or values resolved only inside the sweep (${hydra:job.num})
    try:
        # The expansion of Hydra's own (default) sweeper, which is not public API: a Hydra without it skips this.
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(overrides)
        points = BasicSweeper.split_arguments(parsed, None)[0]
    except Exception:  # Hydra reports a sweep it cannot parse or expand itself, in its own words
        return
    swept = {override.get_key_element() for override in parsed if override.is_sweep_override()}

    def name(point: list[str]) -> str:  # a point by its swept values, as Hydra writes them (1e-3 as 0.001)
        return " ".join(o for o in point if o.partition("=")[0] in swept)

    jobs, first_of = [], {}
    for point in points:
        try:
            job = compose_job(point)
        except UserError as exc:
            raise UserError(f"qwen2-train -m: the sweep's point {name(point)}: {exc}") from None
        run_dir = os.path.realpath(job.run_dir)
        if run_dir in first_of:
            raise UserError(f"qwen2-train -m: the sweep's points {first_of[run_dir]} and {name(point)} would both "
                            f"train in run_dir={job.run_dir}; give each point its own from the swept values, e.g. "
                            "run_dir='runs/sweep/lr${optim.lr}'")
        first_of[run_dir] = name(point)
        jobs.append((point, job))
    for point, job in jobs:
        try:
            validate(job, 1, files=False)
        except UserError as exc:
            raise UserError(f"qwen2-train -m: the sweep's point {name(point)}: {exc}") from None
    global _sweep_expanded
    _sweep_expanded = True


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_torchrun() -> None:
    """A worker of torchrun gets SIGTERM when torchrun's agent, its parent, dies: a torchrun killed by SIGKILL (kill -9,
    the out-of-memory killer) cannot stop its workers, which trained on, orphaned, to the end of the run, holding the
    run_dir (a restart was refused as another job) and the GPUs. SIGTERM has the trainers save a checkpoint and stop,
    as a preemption does. Only under torchrun (TORCHELASTIC_RUN_ID), which starts its workers from its main thread:
    the kernel sends the signal when the thread that started the process ends."""
    if not os.environ.get("TORCHELASTIC_RUN_ID") or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    if parent == 1:
        return  # started by init (no agent to outlive)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # the agent died before prctl took effect: nothing trained yet
        print("error: torchrun's agent is gone; not starting", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    """Console script qwen2-train."""
    exit_without_collecting()
    stop_with_torchrun()
    register_configs()
    try:
        if os.environ.get("QWEN2_CHECK_ONLY"):
            if launch_check(sys.argv[1:], os.environ["QWEN2_CHECK_ONLY"])[1]:
                sys.exit(RUN_COMPLETE_EXIT)
            return
        world = os.environ.get("WORLD_SIZE")
        check_sweep_processes(sys.argv[1:], int(world) if world and world.isdigit() else 1)
        check_sweep_points(sys.argv[1:])
        composed = _precheck_config(sys.argv[1:])
        job = None if composed is None else composed[1]
        path = conf_dir()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if os.environ.get("QWEN2_CHECK_ONLY"):  # the launchers' check with another torchrun: for slurm/train.sbatch
            from qwen2_dist.train import no_restart

            no_restart.record_refusal(2, str(exc))
        sys.exit(2)
    if job is not None:
        from qwen2_dist.train import no_restart

        stop = no_restart.previous_stop(job.run_dir)
        if stop is not None:
            print(f"error: {stop[1]}", file=sys.stderr)
            sys.exit(stop[0])
    if composed is not None and _without_hydra(sys.argv[1:]):
        # The job as composed above, not composed twice more by hydra.main (about 0.5 s of CPU each, in every
        # process of every launch; 2-core machine, 2026-12-07).
        _entry(composed[0])
        return
    hydra.main(version_base="1.3", config_path=path, config_name="config")(_entry)()


if __name__ == "__main__":
    main()
