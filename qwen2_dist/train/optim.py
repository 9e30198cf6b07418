"""AdamW with decay on matrices only, and the learning-rate schedule: warmup, then a cosine, linear or sqrt decay,
optionally after a stable phase (warmup-stable-decay)."""

import math
import re

import torch

from qwen2_dist.config import OptimConfig
from qwen2_dist.errors import UserError


def apex_fused_adam(device_type: str):
    """apex's FusedAdam class; UserError naming optim.impl=apex where it cannot run."""
    if device_type != "cuda":
        raise UserError("optim.impl=apex runs on CUDA devices only; use optim.impl=torch")
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        raise UserError("optim.impl=apex: NVIDIA apex (with its CUDA extensions) is not importable; build it "
                        "from github.com/NVIDIA/apex or use optim.impl=torch") from None
    return FusedAdam


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str):
    """AdamW; weight decay on projection matrices, none on biases, norms and the embedding. With optim.in_backward,
    an InBackwardOptimizer (see there)."""
    if cfg.in_backward:
        if cfg.impl != "torch":
            raise UserError("optim.in_backward=true uses torch's fused AdamW; set optim.impl=torch")
        return InBackwardOptimizer(model, cfg)
    if cfg.overlap:
        return OverlappedOptimizer(model, cfg)
    # Fused (CUDA and CPU) by default: fastest, and it can skip a flagged step on the device (found_inf).
    fused = True if cfg.fused == "auto" else bool(cfg.fused)
    groups = _decay_groups(model.named_parameters(), cfg)
    if cfg.impl == "apex":
        FusedAdam = apex_fused_adam(device_type)
        # AdamW's decoupled weight decay (adam_w_mode); a flagged step is skipped on the host (no found_inf).
        return FusedAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, adam_w_mode=True)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused, foreach=None if fused else True
    )


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: to the projection matrices (and an untied head), not to biases, norms and the
    embedding."""
    return param.ndim >= 2 and "embed_tokens" not in name


def _decay_groups(named_parameters, cfg: OptimConfig) -> list[dict]:
    """AdamW's parameter groups by decays(). An empty group is left out (distributed checkpointing cannot load
    one)."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        (decay if decays(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def clip_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """The total gradient norm (before clipping, a device tensor); the gradients clipped to max_norm (0: no clip).

    With torch's fused AdamW the clip is folded into the update: the optimizer divides each gradient by its
    `grad_scale` (max(1, norm / max_norm)) inside its own kernel. clip_grad_norm_'s separate multiply reads and
    writes every fp32 gradient; the fused kernel, given a grad_scale, only adds a write of the scaled gradient: for
    1.5B parameters 6 GB less memory traffic, about 2 ms a step at an H100's 3 TB/s (estimated, not yet measured).
    Other optimizers get clip_grad_norm_'s in-place multiply. The two agree to float rounding
    (tests/unit/test_clip.py)."""
    if not getattr(optimizer, "defaults", {}).get("fused") or not isinstance(optimizer, (torch.optim.AdamW,
                                                                                        OverlappedOptimizer)):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if isinstance(optimizer, OverlappedOptimizer):
        norm = optimizer.grad_norm()  # its groups' norms were taken on its side stream during backward
    else:
        grads = [param.grad for param in model.parameters() if param.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()  # sharded gradients: reduced over the ranks once, here
    # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); dividing by its inverse is the same clip.
    optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0) if max_norm > 0 else None
    return norm


def norm_group(name: str) -> str:
    """The block a parameter belongs to for logging.norms: layers.N, or its top-level module (embed_tokens, norm,
    lm_head); wrappers' parts of the name (_orig_mod, _checkpoint_wrapped_module) left out."""
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if match:
        return f"layers.{match.group(1)}"
    return next(part for part in name.split(".") if not part.startswith("_"))


def norms_by_block(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """logging.norms: grad_norm/GROUP and param_norm/GROUP (norm_group) as scalars, the gradients as they are now
    (before clipping); sharded (DTensor) norms reduced over the ranks, one collective per group and kind."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        groups.setdefault(norm_group(name), []).append(param)
    norms = {}
    for group, params in groups.items():
        grads = [param.grad for param in params if param.grad is not None]
        for kind, tensors in (("grad_norm", grads), ("param_norm", [param.detach() for param in params])):
            if tensors:
                norm = torch.nn.utils.get_total_norm(tensors, foreach=True)
                norms[f"{kind}/{group}"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return norms


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup to lr; then lr held until the decay's
    optim.decay_steps (default: all that is left) ending at total_steps; the decay goes from lr to
    min_lr_ratio * lr along optim.schedule (cosine, linear, sqrt = 1 - sqrt(progress); constant: none)."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = cfg.decay_steps or max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - (total_steps - decay_steps), 0) / decay_steps, 1.0)
    if cfg.schedule == "cosine":
        left = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.schedule == "linear":
        left = 1.0 - progress
    elif cfg.schedule == "sqrt":
        left = 1.0 - math.sqrt(progress)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")  # validate() refuses it first
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * left)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class InBackwardOptimizer:
    """AdamW applied to each parameter as soon as its gradient is complete in backward, which then frees it
    (optim.in_backward): the gradients of the whole model never exist at once, which saves 4 bytes per parameter
    at the end of backward (6.2 GB at Qwen2-1.5B with fp32 weights). The price: no clipping by the global gradient
    norm (it is known only when every parameter has been updated) and no gradient accumulation (each micro-batch
    would update). A non-finite loss skips every parameter's update (set before backward with skip_if); a
    non-finite gradient skips that parameter's. One process without FSDP only (FSDP2 assigns reduced gradients
    outside autograd, where no hook sees them).

    It stands in for the optimizer where the trainer and the checkpoints use one: param_groups (the learning rate),
    step() and zero_grad() (no-ops: the work is done in backward), and `optimizers` (one fused AdamW per parameter,
    which distributed checkpointing saves and loads like one optimizer's state, under the parameters' names).
    """

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig):
        self.optimizers = []
        self._norm_sq: torch.Tensor | None = None
        self._skip: torch.Tensor | None = None
        self.defaults = {"fused": False, "in_backward": True}  # a flagged step cannot be taken back
        for name, param in model.named_parameters():
            decay = cfg.weight_decay if decays(name, param) else 0.0
            optimizer = torch.optim.AdamW([param], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                          weight_decay=decay, fused=True)
            self.optimizers.append(optimizer)
            param.register_post_accumulate_grad_hook(self._hook(optimizer))

    def _hook(self, optimizer: torch.optim.Optimizer):
        def step_now(param: torch.Tensor) -> None:
            grad = param.grad
            square = grad.detach().float().pow(2).sum()
            self._norm_sq = square if self._norm_sq is None else self._norm_sq + square
            # Decided on the device (no host sync): the loss's verdict, or this gradient's own non-finite values.
            skip = ~torch.isfinite(square)
            if self._skip is not None:
                skip = skip | self._skip
            optimizer.found_inf = skip.float()
            optimizer.step()
            param.grad = None

        return step_now

    def skip_if(self, flag: torch.Tensor) -> None:
        """Before backward: skip every update of this step where flag (a bool device tensor) is set."""
        self._skip = flag.detach()

    def grad_norm(self) -> torch.Tensor:
        """After backward: the global gradient norm of the step (for logging), and reset for the next one."""
        norm = self._norm_sq.sqrt() if self._norm_sq is not None else torch.zeros(())
        self._norm_sq, self._skip = None, None
        return norm

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        """Nothing left to do: every parameter was updated in backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: each gradient was freed after its update."""


class OverlappedOptimizer:
    """AdamW whose update runs on a side CUDA stream, block by block in the order of the forward pass, while the next
    step's forward already runs (optim.overlap): each decoder block waits only for its own weights.

    The update of all parameters is memory-bound (fused AdamW reads and writes weights, gradients and both moments: 32
    bytes per fp32 parameter, about 49 GB and 16 ms a step for Qwen2-1.5B on an H100), and the forward's matmuls are
    compute-bound, so the two can share the GPU. Everything that decides the step stays before it, on the main
    stream: the global gradient norm, the clip (grad_scale) and the skip verdict (found_inf) are computed first and
    passed to every group's update, so the result is that of one AdamW step: one fused AdamW per group of parameters
    (the embedding; each decoder block; the final norm and an untied head), stepped in that order with the same decay
    groups. Forward pre-hooks make the main stream wait for a group's update before its first use (embedding, each
    block, the final norm); wait() makes it wait for all of them (checkpoint.py calls it before reading the state).

    The global gradient norm is taken there too, group by group, while backward still runs: as soon as a group's
    last gradient is accumulated (a post-accumulate-grad hook), the side stream computes that group's per-tensor
    norms (torch._foreach_norm: a read of 4 bytes per fp32 gradient, 6.2 GB for Qwen2-1.5B, ~2 ms an H100 would
    otherwise spend between backward and the update, by arithmetic; not measured). grad_norm() waits for them and
    stacks them in parameter order: the value get_total_norm gives, bit for bit. With gradient accumulation only
    the last micro-batch's backward counts (last_micro_batch() says which is which).

    On the CPU (no streams) the groups are stepped one after the other, which is what the tests compare against one
    AdamW. One process only (FSDP gathers the weights on streams of its own).
    """

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig):
        self.defaults = {"fused": True, "overlap": True}
        self.grad_scale: torch.Tensor | None = None
        self.found_inf: torch.Tensor | None = None
        device = next(model.parameters()).device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        named = dict(model.named_parameters())  # a tied head is the embedding's parameter: listed once
        layers = list(getattr(model, "layers", []))
        # Names as model.named_parameters() gives them (compiled blocks and checkpoint wrappers add their prefixes),
        # found by parameter: a checkpoint wrapper's own named_parameters() leaves its prefix out (without a compile
        # around it, as on the CPU, the names were not the model's: a KeyError).
        name_of = {id(param): name for name, param in named.items()}
        layer_names = [[name_of[id(param)] for param in layer.parameters()] for layer in layers]
        embedding = [name for name in named if name.startswith("embed_tokens.")]
        used = set(embedding).union(*layer_names)
        rest = [name for name in named if name not in used]  # the final norm, an untied head
        # (group of parameter names, the module whose forward first reads them)
        plan = [(embedding, getattr(model, "embed_tokens", None))]
        plan += list(zip(layer_names, layers))
        plan.append((rest, getattr(model, "norm", None)))
        self.optimizers: list[torch.optim.AdamW] = []
        self._events: list = []
        for names, module in plan:
            if not names:
                continue
            optimizer = torch.optim.AdamW(_decay_groups([(name, named[name]) for name in names], cfg), lr=cfg.lr,
                                          betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
            self.optimizers.append(optimizer)
            self._events.append(None)
            if module is not None:
                module.register_forward_pre_hook(self._waiter(len(self.optimizers) - 1))
        covered = sum(len(g["params"]) for o in self.optimizers for g in o.param_groups)
        assert covered == len(named), f"{covered} of {len(named)} parameters in the overlapped optimizer"
        # Each group's trained parameters in model.parameters() order (which the groups follow), for its norms.
        self._norm_params = [[named[name] for name in names if named[name].requires_grad] for names, _ in plan
                             if names]
        self._norms: list = [None] * len(self._norm_params)
        self._left = [len(params) for params in self._norm_params]
        self._counting = True
        for index, params in enumerate(self._norm_params):
            for param in params:
                param.register_post_accumulate_grad_hook(self._norm_taker(index))

    def _norm_taker(self, index: int):
        def take_norms(param: torch.Tensor) -> None:
            if not self._counting:
                return
            self._left[index] -= 1
            if self._left[index]:
                return
            self._left[index] = len(self._norm_params[index])  # the next backward (accumulating) counts again
            grads = [p.grad for p in self._norm_params[index]]
            if self.stream is None:
                self._norms[index] = torch._foreach_norm(grads)
                return
            main = torch.cuda.current_stream(self.stream.device)
            self.stream.wait_stream(main)  # after the accumulation of every gradient of the group
            with torch.cuda.stream(self.stream):
                norms = torch._foreach_norm(grads)
            for norm in norms:
                norm.record_stream(main)  # made on the side stream, read on the main one
            self._norms[index] = norms

        return take_norms

    def last_micro_batch(self, last: bool) -> None:
        """Before each backward: whether it is the last of the step (only that one's gradients are final; without
        this call every backward takes the norms, and the last one's stand)."""
        self._counting = last
        self._left = [len(params) for params in self._norm_params]
        self._norms = [None] * len(self._norm_params)

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients (after the last backward of the step): the groups' norms taken during
        backward, and any group not complete then (a parameter without a gradient) taken now."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        norms = []
        for index, params in enumerate(self._norm_params):
            if self._norms[index] is None:
                grads = [p.grad for p in params if p.grad is not None]
                self._norms[index] = torch._foreach_norm(grads) if grads else []
            norms.extend(self._norms[index])
        self.last_micro_batch(True)  # ready for the next step
        if not norms:
            return torch.zeros((), device=self.stream.device if self.stream is not None else "cpu")
        return torch.linalg.vector_norm(torch.stack(norms))

    def _waiter(self, index: int):
        def wait_for_update(module, args) -> None:
            event = self._events[index]
            if event is not None:
                torch.cuda.current_stream(self.stream.device).wait_event(event)
                self._events[index] = None

        return wait_for_update

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        """Update every group (on the side stream when there is one), with this step's grad_scale and found_inf."""
        for optimizer in self.optimizers:
            optimizer.grad_scale, optimizer.found_inf = self.grad_scale, self.found_inf
        if self.stream is None:
            for optimizer in self.optimizers:
                optimizer.step()
            return
        main = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(main)  # the gradients, the clip and the verdict are made on the main stream
        with torch.cuda.stream(self.stream):
            for index, optimizer in enumerate(self.optimizers):
                optimizer.step()
                self._events[index] = self.stream.record_event()
        # Made on the main stream, read on the side one: their memory must not go to main-stream tensors (the next
        # step's activations) before the side stream is done with them.
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.record_stream(self.stream)
        for tensor in (self.grad_scale, self.found_inf):
            if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                tensor.record_stream(self.stream)

    def wait(self) -> None:
        """Make the current stream wait for every update in flight (before the weights or moments are read)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            self._events = [None] * len(self._events)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)
