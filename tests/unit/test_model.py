"""The native Qwen2: published parameter counts, deterministic init, attention backends."""

from dataclasses import replace

import pytest
import torch

from qwen2_dist.errors import UserError
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.attention import attention, resolve_backend
from qwen2_dist.model.qwen2 import build_model, count_parameters


@pytest.mark.parametrize("name, expected", [
    ("qwen2-0.5b", 494_032_768),
    ("qwen2-1.5b", 1_543_714_304),
    ("qwen2-7b", 7_615_616_512),
    ("qwen2-72b", 72_706_203_648),
])
def test_parameter_counts_on_meta(name, expected):
    model = build_model(get_model_args(name))
    assert next(model.parameters()).is_meta
    assert count_parameters(model) == expected


def test_tied_sizes_have_no_separate_head():
    tied, untied = build_model(get_model_args("qwen2-1.5b")), build_model(get_model_args("qwen2-7b"))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert "lm_head.weight" not in tied.state_dict() and not list(tied.lm_head.parameters())
    assert "lm_head.weight" in untied.state_dict()


def _materialized(seed: int):
    model = build_model(get_model_args("tiny"))
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model


def test_init_weights_is_deterministic_and_shaped_as_specified():
    a, b, c = _materialized(0), _materialized(0), _materialized(1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if name.endswith("bias"):
            assert torch.count_nonzero(pa) == 0
        elif "norm" in name:
            assert torch.all(pa == 1)
        else:
            assert not torch.equal(pa, pc), name
    assert abs(a.embed_tokens.weight.std().item() - 0.02) < 1e-3


def test_every_init_block_of_the_largest_model_has_a_seed_of_its_own():
    """torch's CPU generator keeps a seed's low 32 bits: block seeds hashed from (seed, parameter, block) collided
    in qwen2-72b (identical 1 MiB blocks in two matrices). Numbered through the model, no two blocks share one."""
    from qwen2_dist.model.qwen2 import block_seed, init_block_rows

    model = build_model(get_model_args("qwen2-72b"))  # the meta device: shapes only
    plan = [(param, first) for kind, param, first in model.init_plan() if kind == "normal"]
    blocks = plan[-1][1] + -(-plan[-1][0].shape[0] // init_block_rows(plan[-1][0].shape))
    assert [first for _, first in plan] == sorted({first for _, first in plan})  # numbered in order, none twice
    assert blocks > 280_000
    for seed in (0, 1):
        seeds = {block_seed(seed, block) for block in range(blocks)}
        assert len(seeds) == blocks and max(seeds) < 2**32
    # A seed of the generator's 32 bits gives other values than its neighbours (not the same stream shifted).
    first, second = (torch.randn(8, generator=torch.Generator().manual_seed(block_seed(0, b))) for b in (0, 1))
    assert not torch.equal(first, second)


def test_init_weights_draws_the_same_values_into_any_dtype_and_memory_layout(monkeypatch):
    """The in-place draw (an fp32 CPU parameter) and the drawn-then-copied one (bf16 here; a GPU's or a shard's) give
    the same values, blocks of rows included (several per matrix, as small blocks make them)."""
    import qwen2_dist.model.qwen2 as qwen2

    monkeypatch.setattr(qwen2, "INIT_BLOCK_VALUES", 96)
    args = replace(get_model_args("tiny"), vocab_size=1000)
    reference = build_model(args).to_empty(device="cpu")
    reference.init_weights(5)
    model = build_model(args).to_empty(device="cpu").to(torch.bfloat16)
    drawn = model.init_weights(5)
    assert drawn == sum(p.numel() for n, p in reference.named_parameters() if "norm" not in n and "bias" not in n)
    for (name, expected), param in zip(reference.named_parameters(), model.parameters()):
        assert param.dtype == torch.bfloat16 and torch.equal(param, expected.to(torch.bfloat16)), name


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (7, 1)])
def test_sdpa_matches_reference(heads, kv_heads):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, 16, 8, generator=gen)
    k = torch.randn(2, kv_heads, 16, 8, generator=gen)
    v = torch.randn(2, kv_heads, 16, 8, generator=gen)
    diff = (attention(q, k, v, "sdpa") - attention(q, k, v, "reference")).abs().max().item()
    assert diff <= 1e-5


def test_attention_backend_choice():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("reference", "cpu") == "reference"
    with pytest.raises(UserError, match="model.attention"):
        resolve_backend("magic", "cpu")
    with pytest.raises(UserError, match="flash-attn's kernels run on CUDA devices only, and this job runs on cpu"):
        resolve_backend("flash_attn", "cpu")


def test_flash_attn_is_chosen_only_for_a_job_that_computes_in_bf16(monkeypatch):
    """flash-attn's kernels take bf16 and fp16 only: under train.mixed_precision=fp32 on CUDA auto picks another
    backend, and asking for flash_attn is refused before launch (else the first forward fails on every rank)."""
    from qwen2_dist.model import attention as attention_module

    monkeypatch.setattr(attention_module, "flash_attn_available", lambda: True)
    monkeypatch.setattr(attention_module, "prefer_cudnn_attention", lambda: None)  # process-wide: not on the CPU
    assert resolve_backend("auto", "cuda") == "flash_attn"
    assert resolve_backend("auto", "cuda", bf16=False) == "sdpa"
    assert resolve_backend("auto", "cuda", document_masking=True, bf16=False) == "flex"
    assert resolve_backend("flash_attn", "cuda") == "flash_attn"
    with pytest.raises(UserError, match=r"computes in fp32 \(train.mixed_precision\); use model.attention=auto"):
        resolve_backend("flash_attn", "cuda", bf16=False)


def test_a_head_size_the_kernels_cannot_take_is_refused_or_passed_over(monkeypatch):
    """FlexAttention's CUDA kernels need heads of 16 dimensions or more, flash-attn 2 takes up to 256: each failed
    at the first forward, on every rank."""
    from qwen2_dist.model import attention as attention_module

    monkeypatch.setattr(attention_module, "flash_attn_available", lambda: True)
    monkeypatch.setattr(attention_module, "prefer_cudnn_attention", lambda: None)
    assert resolve_backend("auto", "cuda", document_masking=True, bf16=False, head_dim=16) == "flex"
    assert resolve_backend("auto", "cuda", document_masking=True, bf16=False, head_dim=8) == "sdpa"
    assert resolve_backend("auto", "cuda", head_dim=256) == "flash_attn"
    assert resolve_backend("auto", "cuda", head_dim=320) == "sdpa"
    with pytest.raises(UserError, match="model.attention=flex: FlexAttention's CUDA kernels take heads of 16 "
                                        "dimensions or more, and this model's have 8"):
        resolve_backend("flex", "cuda", head_dim=8)
    with pytest.raises(UserError, match="model.attention=flash_attn: flash-attn takes heads of up to 256 "
                                        "dimensions, and this model's have 320"):
        resolve_backend("flash_attn", "cuda", head_dim=320)


def test_bad_size_is_refused_naming_the_field():
    with pytest.raises(UserError, match="num_attention_heads"):
        get_model_args("tiny", num_attention_heads=5)
    with pytest.raises(UserError, match="unknown size"):
        get_model_args("qwen2-3b")


def test_tied_weight_gradient_is_the_sum_of_the_lookup_and_head_gradients():
    tied = _materialized(0)
    untied = build_model(replace(tied.args, tie_word_embeddings=False), "cpu")
    weights = tied.state_dict()
    untied.load_state_dict({**weights, "lm_head.weight": weights["embed_tokens.weight"].clone()})
    tokens = torch.arange(16).view(2, 8)
    for model in (tied, untied):
        model(tokens).logsumexp(-1).sum().backward()
    lookup, head = untied.embed_tokens.weight.grad, untied.lm_head.weight.grad
    assert lookup.abs().sum() > 0 and head.abs().sum() > 0
    torch.testing.assert_close(tied.embed_tokens.weight.grad, lookup + head)


def test_autocast_keeps_the_residual_stream_in_bf16():
    # As with FSDP's bf16 weights: one process under autocast and a sharded run compute alike, and the block
    # inputs kept for backward take half the memory. Outside autocast everything stays fp32.
    model = build_model(get_model_args("tiny"), "cpu")
    model.init_weights(0)
    seen = []
    for layer in model.layers:
        layer.register_forward_hook(lambda module, args, kwargs_or_out, *rest: seen.append(args[0].dtype))
    tokens = torch.arange(16).view(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.hidden_states(tokens)
    assert set(seen) == {torch.bfloat16} and hidden.dtype == torch.bfloat16
    seen.clear()
    assert model.hidden_states(tokens).dtype == torch.float32 and set(seen) == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_the_rotate_half_formula(dtype):
    """apply_rotary's roll and signed sin table give x cos + rotate_half(x) sin with rotate_half(x) = cat(-x2, x1),
    as transformers' Qwen2 writes it, bitwise."""
    from qwen2_dist.model.qwen2 import apply_rotary, rotary_cos_sin

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 11, 16, generator=generator).to(dtype)
    positions = torch.stack([torch.arange(11), torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2])])
    cos, sin = rotary_cos_sin(positions, 16, 1e6)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)[:, None]
    x32 = x.float()
    expected = x32 * emb.cos() + torch.cat((-x32[..., 8:], x32[..., :8]), dim=-1) * emb.sin()
    assert torch.equal(apply_rotary(x, cos, sin), expected.to(dtype))
