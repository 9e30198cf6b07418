"""The Qwen2 decoder in plain PyTorch: no parallelism inside, built on the meta device, then init_weights()."""

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from qwen2_dist.model import kernels
from qwen2_dist.model.args import ModelArgs
from qwen2_dist.model.attention import DocumentMask, attention, document_mask
from qwen2_dist.model.loss import TiedEmbedding, TiedGradient, ZLoss, linear_cross_entropy


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled in the input dtype (as transformers' Qwen2RMSNorm; its output
    stays in the input dtype also when the weight is fp32 under autocast, as under FSDP's bf16 weights)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernels = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels != "torch":
            return kernels.rms_norm(self.kernels, x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * x.to(dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables in fp32 for integer positions of shape (batch, seq), rotate-half layout, as apply_rotary
    takes them: the sin table's first half negated (rotate-half's sign, folded in once per forward)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    sin = freqs.sin()
    return torch.cat((freqs, freqs), dim=-1).cos()[:, None], torch.cat((-sin, sin), dim=-1)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, heads, seq, head_dim) by the position angles, in fp32: x cos + rotate_half(x) sin, with
    rotate_half(x) = (-x2, x1) for the halves x1, x2 written as the roll (x2, x1) times the signed sin of
    rotary_cos_sin. A roll is an index shift that torch.compile fuses into the one element-wise kernel on every
    device; a cat of the halves is fused on CUDA, but on the CPU Inductor wrote the rotated fp32 copy of q and k and
    read it back, in forward and in backward (seen in its generated code). The same values as the cat, bitwise
    (tests/unit/test_model.py)."""
    dtype = x.dtype
    x = x.float()
    return (x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin).to(dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with bias on q/k/v only."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.num_attention_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(args.hidden_size, args.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(args.hidden_size, args.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(args.num_attention_heads * self.head_dim, args.hidden_size, bias=False)
        self.backend = "sdpa"
        self.fused = False  # q/k/v as one matmul (see Qwen2.set_kernels)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: DocumentMask | None = None
    ) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        # view(..., -1, head_dim) rather than a fixed head count: under tensor parallelism each rank holds a slice.
        if self.fused:
            q, k, v = kernels.fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(q, k, v, self.backend, mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward, no bias."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.fused = False  # gate/up as one matmul
        self.kernels = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = kernels.fused_linear(x, (self.gate_proj, self.up_proj))
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.kernels == "liger":
            return self.down_proj(kernels.liger_swiglu(gate, up))
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: DocumentMask | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask=mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Embedding):
    """nn.Embedding whose lookup can hand its gradient to the chunked loss's gradient of the same, tied, matrix
    (loss.TiedGradient) instead of making a dense one of its own."""

    def forward(self, tokens: torch.Tensor, tie: TiedGradient | None = None) -> torch.Tensor:
        if tie is None:
            return super().forward(tokens)
        return TiedEmbedding.apply(tokens, self.weight, tie)


class TiedHead(nn.Module):
    """The output head of a tied model: logits from the embedding matrix itself, with no parameter of its own.

    The embedding is held outside the module tree, so state-dict keys and the parameter count are those of the
    embedding alone, and whatever replaces embed_tokens.weight (a TP or FSDP shard) is the head's weight too.
    """

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = (embedding,)  # a tuple: not registered as a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


class Qwen2(nn.Module):
    """Qwen2 causal language model. When tied, lm_head is a TiedHead over the embedding (one parameter, one key)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attention_backend = "sdpa"
        self.loss_impl, self.loss_chunk_tokens, self.loss_compiled = "plain", 2048, False
        self.loss_compile_options: tuple = ()
        self.loss_masked = False
        self.z_loss = ZLoss()
        if args.tie_word_embeddings:
            self.lm_head = TiedHead(self.embed_tokens)
        else:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def set_attention_backend(self, backend: str) -> None:
        """Use a resolved attention backend (see attention.resolve_backend) in every layer."""
        self.attention_backend = backend
        for layer in self.layers:
            layer.self_attn.backend = backend

    def set_kernels(
        self, kernels_name: str = "torch", fuse_projections: bool | str = False, device_type: str = "cuda"
    ) -> None:
        """model.kernels (torch, liger, apex: who computes RMSNorm, and with liger SwiGLU) and
        model.fuse_projections (true: q/k/v and gate/up each as one matmul over the concatenated weights; qkv or mlp:
        only those; the parameters stay separate, so checkpoints and Hugging Face conversion do not change). Call
        before the first forward."""
        kernels.check_available(kernels_name, device_type)
        if fuse_projections not in kernels.FUSE_PROJECTIONS:
            raise ValueError(f"fuse_projections={fuse_projections!r}: one of {kernels.FUSE_PROJECTIONS}")
        for module in self.modules():
            if isinstance(module, (RMSNorm, MLP)):
                module.kernels = kernels_name
            if isinstance(module, Attention):
                module.fused = fuse_projections in (True, "qkv")
            if isinstance(module, MLP):
                module.fused = fuse_projections in (True, "mlp")

    def set_loss(self, impl: str, chunk_tokens: int = 2048, compiled: bool = False,
                 compile_options: dict | None = None, masked: bool = False, z_loss: float = 0.0) -> None:
        """How forward(targets=...) computes the loss: a resolved model.loss (see loss.resolve_loss); compiled with
        these Inductor settings (parallel.compile_options); masked: training targets may hold loss.IGNORE_INDEX;
        z_loss: model.z_loss, added in training (self.z_loss holds the last loss's parts for the log)."""
        self.loss_impl, self.loss_chunk_tokens, self.loss_compiled = impl, chunk_tokens, compiled
        self.loss_compile_options = tuple(sorted((compile_options or {}).items()))
        self.loss_masked = masked
        self.z_loss.coefficient = float(z_loss)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> int:
        """Deterministic initialization: normal(0, initializer_range) matrices, zero biases, unit norms. The values
        depend on neither the device nor how a parameter is sharded, and a rank draws only the row blocks its shards
        hold (init_block_rows); returns how many values this process drew. They are drawn by the CPU, whose normal_
        may round the last bits otherwise on hosts of other vector instructions (ATen's CPU capability: an ARM
        host against an x86 one), so a job of mixed hosts should start from a checkpoint."""
        std = self.args.initializer_range
        # One buffer for every block instead of a fresh tensor per draw, whose new pages cost time to fault in.
        scratch = torch.empty(max(init_block_rows(p.shape) * _row_numel(p.shape) for p in self.parameters()))
        drawn = 0
        for kind, param, first_block in self.init_plan():
            if kind == "zero":
                param.zero_()
            elif kind == "one":
                param.fill_(1.0)
            else:
                drawn += _init_normal(param, std, seed, first_block, scratch)
        return drawn

    def init_plan(self) -> list[tuple[str, nn.Parameter, int]]:
        """(kind, parameter, number of its first init block) for every parameter, in registration order: "zero"
        (biases), "one" (norms) or "normal" (the matrices), whose blocks are numbered through the model from 0, from
        global shapes alone, so that every block of a model has a seed of its own (block_seed) in every layout."""
        # Told apart by module, not by name: parallelize's wrappers (torch.compile, checkpoint_wrapper) prefix names.
        norms = {id(module.weight) for module in self.modules() if isinstance(module, RMSNorm)}
        plan, blocks = [], 0
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                plan.append(("zero", param, blocks))
            elif id(param) in norms:
                plan.append(("one", param, blocks))
            else:
                plan.append(("normal", param, blocks))
                blocks += -(-param.shape[0] // init_block_rows(param.shape))
        return plan

    @torch.no_grad()
    def init_placeholders(self) -> None:
        """Every parameter set to NaN: what the model holds when its weights are about to be loaded (a resumed
        checkpoint, Hugging Face weights). Those loads are strict, so no NaN survives them; a parameter that no load
        reached could never pass for a trained one. It replaces init_weights(), whose draws would all be
        overwritten, for seconds on every restart (benchmarks/init_bench.py on the 2-core CPU machine: qwen2-1.5b
        in one process 8.6 s; qwen2-7b, a rank of 8, 9.0 s)."""
        for param in self.parameters():
            param.fill_(float("nan"))

    def output_weight(self) -> torch.Tensor:
        """The (vocab, hidden) matrix that turns hidden states into logits."""
        return self.lm_head.weight

    def hidden_states(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, mask_documents: bool = False,
        tie: TiedGradient | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (batch, seq, hidden) for token ids (batch, seq); see forward(). tie: the
        embedding's gradient goes there (loss.TiedGradient)."""
        if positions is None:
            assert not mask_documents, "document masking needs positions that restart at each document"
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        cos, sin = rotary_cos_sin(positions, self.args.head_dim, self.args.rope_theta)
        # Built once per forward, shared by every layer (FlexAttention needs a block mask even when causal).
        mask = None
        if mask_documents:
            mask = document_mask(positions, self.attention_backend)
        elif self.attention_backend == "flex":
            # Causal only: positions that restart without mask_documents attend across documents, as in SDPA.
            causal = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
            mask = document_mask(causal, "flex")
        x = self.embed_tokens(tokens, tie=tie)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # The residual stream in the autocast dtype (bf16), as it is with FSDP's bf16 weights: one process and
            # many then compute alike, and the activations kept for backward take half the memory.
            x = x.to(torch.get_autocast_dtype(device_type))
        for layer in self.layers:
            # The mask as a keyword: tensor-parallel input hooks convert positional inputs only.
            x = layer(x, cos, sin, mask=mask)
        return self.norm(x)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask_documents: bool = False,
        targets: torch.Tensor | None = None,
        per_row: bool = False,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab) for token ids (batch, seq); with targets (batch, seq), the summed cross-entropy
        instead (fp32 scalar; with per_row, without gradients: each row's, (batch,)), computed by the loss set with
        set_loss -- inside forward, so that under FSDP the output weight is still gathered and the full logits need
        never exist. positions (batch, seq) default to
        0..seq-1; with mask_documents, each 0 in positions starts a document and attention never crosses into
        another."""
        weight = self.output_weight()
        tie = None
        if (targets is not None and self.loss_impl == "chunked" and isinstance(self.lm_head, TiedHead)
                and torch.is_grad_enabled() and weight.requires_grad and not isinstance(weight, DTensor)):
            # One matrix, one gradient: the chunked loss's, into which the lookup adds its rows (loss.TiedGradient).
            tie = TiedGradient()
        hidden = self.hidden_states(tokens, positions, mask_documents, tie=tie)
        if targets is None:
            return self.lm_head(hidden)
        return linear_cross_entropy(hidden, weight, targets, self.loss_impl, self.loss_chunk_tokens,
                                    self.loss_compiled, self.loss_compile_options, tie=tie, masked=self.loss_masked,
                                    z=self.z_loss if self.z_loss.coefficient else None, per_row=per_row)


def build_model(args: ModelArgs, device: str | torch.device = "meta") -> Qwen2:
    """Build the model without allocating (meta device by default); materialize with to_empty + init_weights."""
    with torch.device(device):
        return Qwen2(args)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters())


# Values per block of rows that init_weights draws from a generator of its own (1 MiB of fp32).
INIT_BLOCK_VALUES = 1 << 18


def _row_numel(shape: torch.Size) -> int:
    """Values in one row (index of dim 0) of a tensor of this shape."""
    return math.prod(shape[1:])


def init_block_rows(shape: torch.Size) -> int:
    """How many rows (along dim 0) of a parameter of this global shape one init block holds: at least one."""
    return max(1, INIT_BLOCK_VALUES // max(_row_numel(shape), 1))


def block_seed(seed: int, block: int) -> int:
    """The 32-bit seed of a model's init block number `block` (Qwen2.init_plan): torch's CPU generator (mt19937)
    keeps only the low 32 bits of a seed, so seeds hashed per block collide (qwen2-72b's 285,344 blocks: about a
    dozen pairs of identical blocks). The block number, offset by a hash of the seed, goes through murmur3's
    finalizer, a bijection of 32-bit integers: distinct blocks of one model (fewer than 2^32) get distinct seeds."""
    base = int.from_bytes(hashlib.blake2b(f"qwen2-init/{seed}".encode(), digest_size=4).digest(), "little")
    x = (base + block) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _block_generator(seed: int, block: int) -> torch.Generator:
    """The CPU generator of one init block (numbered through the model)."""
    return torch.Generator(device="cpu").manual_seed(block_seed(seed, block))


def _global_indices(param: DTensor) -> list[torch.Tensor]:
    """For each dim of a DTensor parameter, the global indices (CPU int64) of what its local shard holds along that
    dim, in the local order: the arange of the dim distributed as the parameter is along it (Shard / _StridedShard
    of that dim; a placement of another dim, or Replicate, takes every index of it)."""
    indices = []
    for dim, size in enumerate(param.shape):
        placements = []
        for placement in param.placements:
            if isinstance(placement, _StridedShard) and placement.dim == dim:
                placements.append(_StridedShard(0, split_factor=placement.split_factor))
            elif isinstance(placement, Shard) and placement.dim == dim:
                placements.append(Shard(0))
            else:
                placements.append(Replicate())
        whole = torch.arange(size, device=param.device_mesh.device_type)
        indices.append(distribute_tensor(whole, param.device_mesh, placements, src_data_rank=None).to_local().cpu())
    local_shape = tuple(param.to_local().shape)
    if tuple(len(i) for i in indices) != local_shape:
        raise RuntimeError(f"init: the shard indices {[len(i) for i in indices]} of a parameter placed "
                           f"{param.placements} do not cover its local shape {local_shape}")
    return indices


def _init_normal(param: torch.Tensor, std: float, seed: int, first_block: int, scratch: torch.Tensor) -> int:
    """Fill param (plain or DTensor, one dim at least) with normal(0, std) values: its global rows in blocks of
    init_block_rows, each block drawn whole in fp32 on the CPU from its own generator (_block_generator), so that
    the values depend on neither device, dtype nor sharding; a DTensor's rank draws the blocks its shard has rows
    in. Returns the values drawn."""
    shape = param.shape
    rows = init_block_rows(shape)
    row_numel = _row_numel(shape)
    if not isinstance(param, DTensor):
        # Drawn in place where the parameter is an fp32 CPU tensor (the same values as into the scratch buffer,
        # without a copy: qwen2-1.5b 8.6 s, not 12.6), else copied row block by row block (a GPU's, a bf16 one).
        in_place = param.device.type == "cpu" and param.dtype == torch.float32 and param.is_contiguous()
        drawn = 0
        for block, start in enumerate(range(0, shape[0], rows)):
            count = min(rows, shape[0] - start)
            value = param[start:start + count] if in_place else scratch[:count * row_numel].view(count, *shape[1:])
            value.normal_(0.0, std, generator=_block_generator(seed, first_block + block))
            if not in_place:
                param[start:start + count].copy_(value)
            drawn += value.numel()
        return drawn
    indices, local = _global_indices(param), param.to_local()
    row_index = indices[0]
    # The local rows in global order, cut at block starts: each block's positions without a pass over all rows.
    order = torch.argsort(row_index, stable=True)
    sorted_rows = row_index[order]
    drawn = 0
    # Copied block by block into the local shard: under FSDP's CPU offload the shard is on the CPU, else on the GPU.
    for block in torch.unique(sorted_rows // rows).tolist():
        start = block * rows
        count = min(rows, shape[0] - start)
        low, high = torch.searchsorted(sorted_rows, torch.tensor([start, start + count])).tolist()
        positions = order[low:high]
        value = scratch[:count * row_numel].view(count, *shape[1:])
        value.normal_(0.0, std, generator=_block_generator(seed, first_block + block))
        drawn += value.numel()
        picked = value[row_index[positions] - start]
        for dim in range(1, param.ndim):
            if len(indices[dim]) != shape[dim]:
                picked = picked.index_select(dim, indices[dim])
        picked = picked.to(local.device, local.dtype)
        first = int(positions[0])
        if bool((positions.diff() == 1).all()):
            # Consecutive rows of the shard: every layout tested (Shard and _StridedShard rows keep global order).
            # A plain copy_, which a weight wrapped in a tensor subclass (float8's FSDP all-gather) takes as before.
            local[first:first + len(positions)].copy_(picked)
        else:
            local[positions.to(local.device)] = picked
    return drawn
