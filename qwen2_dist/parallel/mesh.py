"""The process world (from the torchrun environment) and its DeviceMesh (dp_replicate, dp_shard, tp)."""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from qwen2_dist.errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun/Slurm-via-torchrun environment; (0, 0, 1) when absent."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device_type: str, timeout_minutes: float = 30.0) -> World:
    """Initialize the default process group when torchrun started several processes; pick this rank's device."""
    rank, local_rank, world_size = world_from_env()
    if device_type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:  # else CUDA's "invalid device ordinal", and torchrun restarts it
            raise UserError(
                f"local rank {local_rank}: this node starts {os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} "
                f"processes, but torch sees {visible} GPU(s) here (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one process per GPU: NPROC={visible} "
                f"(torchrun --nproc-per-node={visible})")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return World(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def set_deterministic() -> None:
    """Make every kernel choice reproducible (train.deterministic): same inputs, same bits, run after run."""
    # cuBLAS reads this when its first handle is created, i.e. at the first matmul: set it before any.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def build_mesh(world: World, dp_replicate: int, dp_shard: int, tp: int) -> DeviceMesh | None:
    """A mesh with named axes for a multi-process world; None for one process (no collectives at all)."""
    if world.world_size == 1:
        return None
    assert dp_replicate * dp_shard * tp == world.world_size, "validate() checks the layout before the mesh"
    mesh = init_device_mesh(
        world.device.type, (dp_replicate, dp_shard, tp), mesh_dim_names=("dp_replicate", "dp_shard", "tp")
    )
    # One flattened data-parallel axis for loss/token-count reductions and for the data loader's rank; kept on
    # the mesh because slicing a flattened axis from the root mesh is deprecated.
    mesh._qwen2_dp = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    if tp > 1:
        # Gradients sharded over both (FSDP and TP; FSDP's axis also when it has size 1) reduce to their norm over
        # both: with the pair flattened, DTensor does that in one all-reduce instead of two in sequence.
        mesh["dp_shard", "tp"]._flatten("dp_shard_tp")
    return mesh


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The flattened data-parallel axis (dp_replicate x dp_shard) of a mesh made by build_mesh."""
    return mesh._qwen2_dp


def dp_rank_and_size(mesh: DeviceMesh | None) -> tuple[int, int]:
    """This rank's index in the data-parallel group and that group's size."""
    if mesh is None:
        return 0, 1
    dp = dp_mesh(mesh)
    return dp.get_local_rank(), dp.size()


def broadcast_object(value):
    """Rank 0's value (any picklable object) on every rank (itself without a process group)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree_any(flags: list[bool]) -> list[bool]:
    """For each flag, whether it is set on any rank (one small CPU all-reduce: no device sync)."""
    if not dist.is_initialized():
        return flags
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def agree_max(values: list[float]) -> list[float]:
    """For each value, its largest over the ranks (one small CPU all-reduce: no device sync)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def all_reduce_sum(value: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Sum a tensor over the data-parallel ranks (identity for one process)."""
    if mesh is not None and dp_mesh(mesh).size() > 1:
        dist.all_reduce(value, group=dp_mesh(mesh).get_group())
    return value
