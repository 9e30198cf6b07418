"""qwen2-train: the Hydra entry point; builds the job (config -> world -> mesh -> model -> data) and runs it."""

import logging
import os
import sys
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from qwen2_dist.config import JobConfig, register_configs, validate
from qwen2_dist.errors import UserError

log = logging.getLogger("qwen2_dist")


def conf_dir() -> str:
    """The conf/ directory: $QWEN2_DIST_CONF, else the one next to the package in the source tree."""
    path = os.environ.get("QWEN2_DIST_CONF") or str(Path(__file__).resolve().parents[2] / "conf")
    if not os.path.isfile(os.path.join(path, "config.yaml")):
        raise UserError(f"{path}/config.yaml not found; install qwen2-dist from its source tree (pip install -e .) "
                        "or set QWEN2_DIST_CONF to its conf/ directory")
    return path


def setup_logging(run_dir: str, rank: int) -> None:
    """Console on rank 0 (warnings only elsewhere) and one log file per rank under run_dir/logs/."""
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    file = logging.FileHandler(os.path.join(run_dir, "logs", f"rank{rank}.log"))
    file.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [console, file]
    root.setLevel(logging.INFO)


def _resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda: no CUDA device is visible; use train.device=cpu or auto")
    return requested


def run(cfg: DictConfig):
    """Run the training job described by a composed config; returns the TrainResult."""
    from qwen2_dist.data.corpus import embedded_corpus
    from qwen2_dist.data.loader import TokenBatches
    from qwen2_dist.model.attention import resolve_backend
    from qwen2_dist.model.hf import read_hf_state_dict
    from qwen2_dist.model.qwen2 import build_model, count_parameters
    from qwen2_dist.parallel.mesh import build_mesh, dp_rank_and_size, init_distributed, world_from_env
    from qwen2_dist.parallel.parallelize import parallelize
    from qwen2_dist.train import checkpoint
    from qwen2_dist.train.optim import build_optimizer
    from qwen2_dist.train.trainer import Trainer

    job: JobConfig = OmegaConf.to_object(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    _, local_rank, world_size = world_from_env()
    layout = validate(job, world_size)
    device_type = _resolve_device(job.train.device)
    args = job.model.args()
    world = init_distributed(device_type)
    setup_logging(job.run_dir, world.rank)
    if job.train.deterministic:
        torch.use_deterministic_algorithms(True)
    if world.is_main:
        with open(os.path.join(job.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(OmegaConf.to_yaml(resolved))
    mesh = build_mesh(world, layout["dp_replicate"], layout["dp_shard"], layout["tp"])
    dp_rank, dp_size = dp_rank_and_size(mesh)
    log.info("world %d on %s, layout %s", world.world_size, device_type, layout)

    ckpt_root = os.path.join(job.run_dir, "checkpoints")
    if world.is_main:
        checkpoint.clean_partial(ckpt_root)
    resume_path = None
    if job.checkpoint.resume == "auto":
        committed = checkpoint.committed_checkpoints(ckpt_root)
        resume_path = committed[-1] if committed else None
    elif job.checkpoint.resume != "none":
        resume_path = job.checkpoint.resume
    if resume_path is not None:
        saved_args = checkpoint.read_metadata(resume_path)["model_args"]
        if saved_args != args.to_dict():
            raise UserError(
                f"checkpoint {resume_path} holds a {checkpoint.read_metadata(resume_path).get('model')} model "
                f"whose sizes differ from model={job.model.name}; set model= to match or use another run_dir"
            )

    data_path = job.data.path
    if data_path is None:
        cache = job.data.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "qwen2_dist")
        if local_rank == 0:
            data_path = embedded_corpus(cache, job.train.seq_len, job.data.embedded_max_tokens)
        if dist.is_initialized():
            dist.barrier()
        if local_rank != 0:
            data_path = embedded_corpus(cache, job.train.seq_len, job.data.embedded_max_tokens)

    model = build_model(args, "meta")
    model.set_attention_backend(resolve_backend(job.model.attention, device_type))
    bf16 = job.train.mixed_precision == "bf16" or (job.train.mixed_precision == "auto" and device_type == "cuda")
    model = parallelize(model, mesh, torch.bfloat16 if bf16 else torch.float32)
    model.to_empty(device=world.device)
    model.init_weights(job.seed)
    if job.model.init_from_hf and resume_path is None:
        _, weights = read_hf_state_dict(job.model.init_from_hf)
        if mesh is not None:
            raise UserError("model.init_from_hf: loading Hugging Face weights into a sharded model needs one "
                            "process in this release; convert with qwen2-convert from-hf and resume from it")
        model.load_state_dict(weights, strict=True)
        log.info("initialized from Hugging Face weights in %s", job.model.init_from_hf)
    log.info("model %s: %s parameters", job.model.name, f"{count_parameters(model):,}")
    optimizer = build_optimizer(model, job.optim, device_type)
    batches = TokenBatches(
        data_path, job.train.seq_len, job.train.micro_batch_size, dp_size, job.data.shuffle, job.seed,
        cache_dir=job.data.cache_dir, num_workers=job.data.num_workers,
    )
    metadata = {
        "model": job.model.name, "model_args": args.to_dict(), "world_size": world.world_size, "layout": layout,
        "config_hash": checkpoint.config_hash(resolved),
    }
    trainer = Trainer(job, args, world, mesh, model, optimizer, batches, layout["grad_accum_steps"], metadata)
    if resume_path is not None:
        trainer.restore(resume_path)
        log.info("resumed from %s at step %d", resume_path, trainer.step)
    try:
        result = trainer.fit()
    finally:
        batches.close()
    log.info("done: step %d, %s tokens seen, last loss %s", result.step, f"{result.tokens_seen:,}", result.last_loss)
    return result


def _precheck(argv: list[str]) -> None:
    """Compose the overrides once outside Hydra so a bad one is reported in one line (Hydra prints several)."""
    from hydra import compose, initialize_config_dir

    if any(a in ("-m", "--multirun") or a.startswith("--") for a in argv):
        return
    overrides = [a for a in argv if not a.startswith(("hydra.", "hydra/", "+hydra", "-"))]
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        OmegaConf.to_object(cfg)
    except Exception as exc:  # Hydra/OmegaConf raise many types; all mean "this override is wrong"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"bad override in {' '.join(overrides)!r}: {first} (list the valid keys with "
                        "qwen2-train --cfg job)") from None


def _entry(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result.stopped_by_signal:
        sys.exit(int(os.environ.get("QWEN2_PREEMPT_EXIT_CODE", "0")))


def main() -> None:
    """Console script qwen2-train."""
    register_configs()
    try:
        _precheck(sys.argv[1:])
        path = conf_dir()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    hydra.main(version_base="1.3", config_path=path, config_name="config")(_entry)()


if __name__ == "__main__":
    main()
