"""Train a few steps under one parallel layout and save what the parity tests compare.

Run as `python tests/dist/parity_worker.py LAYOUT OUT_FILE [hydra overrides...]`. It forks the layout's processes
(gloo) and each builds the job as qwen2_dist.cli.train does (compose -> validate -> mesh -> meta model ->
parallelize -> to_empty + init_weights -> optimizer -> Trainer.train_step), but reads a synthetic global batch drawn
from a seed instead of the data loader, so the test checks the parallel math alone. Rank 0 saves, with torch.save:
per-step losses and gradient norms, the full final weights, the full gradient of the embedding after one probe
backward, and the tie checks; with model.init_from_hf=DIR among the overrides, also the full weights as loaded.
"""

import os
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from qwen2_dist.cli.train import build_model_and_optimizer, compose_job
from qwen2_dist.config import BatchSchedule, validate
from qwen2_dist.data.synthetic import SyntheticBatches
from qwen2_dist.model.qwen2 import build_model, count_parameters
from qwen2_dist.parallel.mesh import all_reduce_sum, build_mesh, dp_rank_and_size, init_distributed, set_deterministic
from qwen2_dist.parallel.parallelize import loss_context
from qwen2_dist.train.optim import lr_at, set_lr
from qwen2_dist.train.tasks import Task
from qwen2_dist.train.trainer import Trainer

# name -> (processes, overrides). Each parallel layout accumulates 2 micro-batches per step, with activation
# checkpointing on; the reference is one plain process (no FSDP, no checkpointing).
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "single": (1, ["train.micro_batch_size=4"]),
    "fsdp4": (4, ["parallel.dp_shard=4", "train.micro_batch_size=1", "parallel.activation_checkpointing=full"]),
    # TP x FSDP with op-level recompute (matmul and attention outputs kept, element-wise ops recomputed).
    "tp2_fsdp2": (4, ["parallel.tp=2", "train.micro_batch_size=2", "parallel.activation_checkpointing=op"]),
    # HSDP also runs q/k/v and gate/up as fused matmuls (the reference does not), and reduce-scatters every
    # micro-batch (all-reducing over the replicas at the last): same losses and weights.
    "hsdp2x2": (4, ["parallel.dp_replicate=2", "train.micro_batch_size=1",
                    "parallel.activation_checkpointing=selective", "parallel.ac_every=2",
                    "model.fuse_projections=true", "parallel.reduce_every_micro_batch=true"]),
    # An untied head is a column-parallel linear of its own under TP.
    "single_untied": (1, ["train.micro_batch_size=4", "model.tie_word_embeddings=false"]),
    "tp2_untied": (2, ["parallel.tp=2", "train.micro_batch_size=4", "model.tie_word_embeddings=false",
                       "parallel.activation_checkpointing=full"]),
}
# lr 1e-3: in AdamW's first steps an element whose gradient is near zero moves by up to lr * noise / eps, so
# fp32 rounding differences between layouts show in the weights in proportion to lr (at 3e-3, TP reached 1.1e-4).
# grad_clip 0.3: the gradient norms are 0.53-0.55, so every step is clipped, inside the fused AdamW, whose
# gradients are sharded DTensors in the parallel layouts (AdamW is nearly blind to a uniform scale, so this checks
# that the path runs everywhere; tests/unit/test_clip.py checks the clip's effect).
COMMON = [
    "model=tiny", "model.vocab_size=1024", "data.synthetic=true", "train.seq_len=32", "train.global_batch_size=8",
    "train.steps=5", "optim.warmup_steps=0", "optim.lr=1e-3", "train.grad_clip=0.3",
    "train.device=cpu", "train.mixed_precision=fp32", "train.deterministic=true", "checkpoint.async_save=false",
]
DATA_SEED = 1234


def probe_task(vocab_size: int, seq_len: int) -> Task:
    """An eval.tasks task of 7 rows of random tokens (lengths 5 to seq_len + 1, the last 1 to 4 scored), the same in
    every layout: the rows do not fill the last micro-batch of 4 ranks or of 2 ranks of 4 rows, so padding is
    dealt out too."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    lengths = [5, 33, 12, 7, 33, 20, 9]
    tokens = [torch.randint(0, vocab_size, (n,), generator=gen).numpy() for n in lengths]
    return Task("probe", "-", tokens, np.array([1, 4, 2, 3, 1, 4, 2]), np.array([0, 0, 1, 1, 1, 2, 2]),
                np.ones(7), np.array([1, 0, 1]), length=seq_len, pad_id=0)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def probe_embedding_grad(model, mesh, batches: SyntheticBatches) -> torch.Tensor:
    """Full gradient of the embedding matrix for one backward over batch -1 (lookup and head uses together)."""
    rows = batches.global_batch(-1)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    per_rank = len(rows) // dp_size
    tokens = rows[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    total = all_reduce_sum(torch.tensor(float(targets.numel())), mesh)
    logits = model(inputs)
    with loss_context(mesh):
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        (loss / total).backward()
    grad = _full(model.embed_tokens.weight.grad).clone()
    model.zero_grad(set_to_none=True)
    return grad


def run_rank(rank: int, world_size: int, port: int, overrides: list[str], out_file: str) -> None:
    """One process of the layout: the qwen2-train build path, then the steps; rank 0 writes out_file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # several processes share two cores
    job = compose_job(overrides)
    layout = validate(job, world_size)
    world = init_distributed("cpu")
    set_deterministic()
    mesh = build_mesh(world, layout["dp_replicate"], layout["dp_shard"], layout["tp"])
    args = job.model.args()
    # Built as qwen2-train builds it; fused AdamW has no state before its first step, so the probe below leaves the
    # optimizer as the trainer would find it.
    model, optimizer = build_model_and_optimizer(job, world, mesh, "cpu", load_weights=True)
    # Weights loaded from model.init_from_hf= (an extra override): as each rank's shards hold them, gathered.
    initial = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
        if job.model.init_from_hf else None
    # The tie: one registered parameter serves the lookup and the head, after every wrapper and shard.
    vocab_rows = [name for name, p in model.named_parameters() if p.shape[0] == args.vocab_size]
    tie = {
        "head_is_embedding": model.lm_head.weight is model.embed_tokens.weight,
        "vocab_parameters": vocab_rows,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_parameters_plain": count_parameters(build_model(args, "meta")),
    }
    dp_rank, dp_size = dp_rank_and_size(mesh)
    batches = SyntheticBatches(args.vocab_size, job.train.seq_len, job.train.micro_batch_size,
                               job.train.global_batch_size, dp_rank, dp_size, seed=DATA_SEED,
                               batch_schedule=BatchSchedule.of(job.train))
    embedding_grad = probe_embedding_grad(model, mesh, batches)
    trainer = Trainer(job, args, world, mesh, model, optimizer, batches, {"model_args": args.to_dict()})
    # eval.tasks' scoring, before any step: the layouts start from the same weights (the row losses are summed
    # inside the model at tp=1, from vocabulary-parallel logits under TP).
    task_scores = trainer.task_log_likelihoods(probe_task(args.vocab_size, job.train.seq_len))
    losses, grad_norms = [], []
    for step in range(1, job.train.steps + 1):
        set_lr(optimizer, lr_at(step, job.train.steps, job.optim))
        loss, grad_norm, _ = trainer.train_step()
        losses.append(loss.item())
        grad_norms.append(grad_norm.item())
    # QWEN2_TEST_SAVE=1: a checkpoint of the last step, as the trainer writes it (run_dir/checkpoints/step_N).
    saved = None
    if os.environ.get("QWEN2_TEST_SAVE") == "1":
        trainer.step = job.train.steps  # the steps above were train_step() calls, which leave the count to fit()
        saved = trainer.save(blocking=True)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # model.float8 under FSDP: the scales the next all-gathers would cast each weight with, where one was set.
    float8_scales = {name: float(p._local_tensor._precomputed_scale) for name, p in model.named_parameters()
                     if getattr(getattr(p, "_local_tensor", None), "_precomputed_scale", None) is not None}
    if rank == 0:
        torch.save({"layout": layout, "losses": losses, "grad_norms": grad_norms, "weights": weights,
                    "embedding_grad": embedding_grad, "tie": tie, "initial": initial,
                    "task_scores": torch.from_numpy(task_scores), "float8_scales": float8_scales,
                    "checkpoint": saved}, out_file)
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    name, out_file, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    processes, overrides = LAYOUTS[name]
    run_dir = os.path.join(os.path.dirname(os.path.abspath(out_file)), f"run_{name}")
    overrides = [*COMMON, *overrides, f"run_dir={run_dir}", *extra]
    os.makedirs(run_dir, exist_ok=True)
    # fork: the children start with everything imported (a few seconds saved per process).
    mp.start_processes(run_rank, args=(processes, _free_port(), overrides, out_file), nprocs=processes,
                       start_method="fork")


if __name__ == "__main__":
    main()
