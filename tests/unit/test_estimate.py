"""qwen2-estimate: the real sharding plan at 512 ranks in seconds, the trainer's refusals, the activation formula."""

import re
import time

import pytest
import torch
import torch.nn.functional as F

from qwen2_dist.cli.estimate import GIB, activation_bytes, estimate, main, micro_batches_text
from qwen2_dist.cli.train import compose_job
from qwen2_dist.config import validate
from qwen2_dist.errors import UserError
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.qwen2 import build_model, rotary_cos_sin

QWEN2_72B = 72_706_203_648


def test_72b_on_512_ranks_is_planned_in_seconds(capsys):
    started = time.monotonic()
    main(["model=qwen2-72b", "world_size=512", "parallel.tp=8", "train.seq_len=4096", "train.micro_batch_size=1",
          "train.global_batch_size=512", "eval.samples=64", "gpu_mem_gib=80"])
    assert time.monotonic() - started < 60
    out = capsys.readouterr().out
    assert "dp_replicate 1 x dp_shard 64 x tp 8" in out and "fake process group of 512 ranks" in out
    stored = int(out.split("rank 0 stores ")[1].split(" parameters")[0].replace(",", ""))
    # Norms are replicated over tp, and FSDP pads each shard: a little over an even 1/512 share.
    assert QWEN2_72B / 512 <= stored <= 1.01 * QWEN2_72B / 512
    params_line = next(line for line in out.splitlines() if line.strip().startswith("parameters (fp32)"))
    assert float(params_line.split()[-1]) == pytest.approx(4 * stored / GIB, abs=0.01)
    assert "fits in 80 GiB" in out


@pytest.mark.parametrize("overrides, world_size", [
    (["model=qwen2-72b", "parallel.tp=8", "train.micro_batch_size=1"], 512),  # global batch 8 < 64 replicas
    (["model=qwen2-7b", "parallel.tp=8", "train.micro_batch_size=1"], 8),  # 4 key/value heads
    (["parallel.dp_shard=3"], 4),
])
def test_impossible_jobs_are_refused_with_the_trainers_message(overrides, world_size, capsys):
    with pytest.raises(UserError) as trainer:
        validate(compose_job(overrides), world_size)
    with pytest.raises(SystemExit) as exit_info:
        main([*overrides, f"world_size={world_size}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {trainer.value}"


def test_the_estimate_needs_none_of_the_jobs_files(tmp_path, capsys):
    """Estimated on a login node or a laptop, a job names data and weights of the cluster: the trainer would refuse
    them there, the memory estimate does not read them."""
    missing = tmp_path / "on-the-cluster"
    overrides = ["model=qwen2-7b", f"data.path={missing}", f"model.init_from_hf={missing}", "model.vocab_size=152064",
                 "train.micro_batch_size=1", "train.global_batch_size=8"]
    with pytest.raises(UserError, match="no such"):
        validate(compose_job(overrides), 8)
    main([*overrides, "world_size=8"])
    assert "fits in 80 GiB" in capsys.readouterr().out


def test_float8_says_its_activations_are_not_modelled(capsys):
    main(["model=qwen2-1.5b", "train.seq_len=4096", "train.micro_batch_size=4", "train.global_batch_size=4",
          "model.float8=true"])
    assert "model.float8=true: activations are counted as in bf16, which overstates them" in capsys.readouterr().out
    main(["model=qwen2-1.5b", "train.seq_len=4096", "train.micro_batch_size=4", "train.global_batch_size=4"])
    assert "float8" not in capsys.readouterr().out


def test_bad_arguments_are_one_line(capsys):
    for argv in (["world_size=many"], ["train.no_such_key=1"], ["gpu_mem_gib=0"], ["gpu_mem_gib=nan"],
                 ["gpu_mem_gib=inf"]):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err


def test_recompute_and_tensor_parallelism_shrink_activations():
    def activations(*overrides: str, world_size: int = 8) -> float:
        job = compose_job(["model=qwen2-7b", "train.seq_len=4096", "train.micro_batch_size=1", *overrides])
        _, lines = estimate(job, world_size)
        return lines["activations (decoder blocks)"]

    none, selective, op, full = (activations(f"parallel.activation_checkpointing={mode}")
                                 for mode in ("none", "selective", "op", "full"))
    assert none > selective > full and none > op > full
    assert activations("parallel.tp=2") < none
    assert activations("parallel.tp=4") < activations("parallel.tp=2")


def _saved_bytes(fn, exclude) -> tuple[int, object]:
    """Bytes of the distinct tensors autograd saves while fn runs, besides parameters and `exclude`."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_formula_matches_what_autograd_saves_byte_for_byte(dtype):
    """Every term of the formula, checked exactly: only the two documented CPU differences are allowed for."""
    args = get_model_args("debug")
    model = build_model(args, "cpu").to(dtype)
    model.init_weights(0)
    batch, seq = 2, 48  # batch x seq differs from every model width, so no two terms can stand in for each other
    h = args.hidden_size
    bytes_ = 4 if dtype == torch.float32 else 2
    formula = activation_bytes(args, batch, seq, tp=1, compute=bytes_, residual=bytes_)
    x = torch.randn(batch, seq, h, dtype=dtype, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.arange(seq).expand(batch, -1), args.head_dim, args.rope_theta)
    params = list(model.parameters())
    block, _ = _saved_bytes(lambda: model.layers[0](x, cos, sin), [x, cos, sin, *params])
    if dtype == torch.float32:
        # In fp32 each norm's output is itself the next matmul's input (the cast is a no-op): one tensor, which the
        # formula, written for bf16, counts twice.
        expected = formula["block"] - 2 * 4 * batch * seq * h
    else:
        # CPU SDPA returns its output in the layout o_proj reads, so o's input is no copy of it (flash/cuDNN: a copy).
        expected = formula["block"] - 2 * batch * seq * h
    assert block == expected
    tokens = torch.randint(0, args.vocab_size, (batch, seq))

    def head():
        logits = model.lm_head(model.norm(x))
        F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="sum")
        return logits

    saved, logits = _saved_bytes(head, [x, *params])
    held = saved + logits.numel() * logits.element_size()  # the trainer holds the logits until backward
    gradient = 4 * batch * seq * args.vocab_size  # fp32 gradient of the log-probabilities, made in backward
    not_in_formula = 8 * batch * seq + 4  # the int64 targets and the loss
    doubled = 4 * batch * seq * h if dtype == torch.float32 else 0  # the norm output is the head input, as above
    assert held + gradient == formula["head"] - doubled + not_in_formula


def test_compiled_block_formula_matches_what_the_compiled_block_saves():
    """torch.compile's partitioner recomputes the norms and SiLU in backward: the formula of a compiled block (the
    CUDA default) is checked byte for byte against a compiled block under autocast, as one process trains."""
    args = get_model_args("debug")
    model = build_model(args, "cpu")
    model.init_weights(0)
    batch, seq = 2, 48
    formula = activation_bytes(args, batch, seq, tp=1, compute=2, residual=2)
    x = torch.randn(batch, seq, args.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.arange(seq).expand(batch, -1), args.head_dim, args.rope_theta)
    layer = model.layers[0]
    compiled = torch.compile(layer)

    def forward():
        with torch.autocast("cpu", torch.bfloat16):
            return compiled(x, cos, sin)

    forward()  # compiles; the hooks then see the compiled function's saves
    saved, _ = _saved_bytes(forward, [cos, sin, *model.parameters()])
    weight_copies = sum(2 * p.numel() for p in layer.parameters() if p.dim() == 2)  # autocast's bf16 casts
    assert saved - weight_copies == formula["compiled_block"]
    assert formula["compiled_block"] < formula["block"]


def test_the_fp32_weight_gradient_pass_is_estimated_as_the_job_without_it():
    """parallel.fp32_weight_grads (an Inductor pass of the compiled blocks) changes no tensor size; the plan, which
    builds the model uncompiled, refused it (the GPU check's estimate step failed at that variant's row)."""
    from qwen2_dist.cli.estimate import estimate
    from qwen2_dist.cli.train import compose_job

    base = ["model=qwen2-1.5b", "train.seq_len=4096", "train.micro_batch_size=4", "train.global_batch_size=4",
            "parallel.compile=true"]
    with_pass, _ = estimate(compose_job([*base, "parallel.fp32_weight_grads=true"]), 1)
    assert with_pass["peak"] == estimate(compose_job(base), 1)[0]["peak"]


def test_estimate_vs_measured_goes_on_past_a_row_it_cannot_estimate(tmp_path, capsys):
    import json

    from benchmarks import estimate_vs_measured

    good = ["model=tiny", "train.seq_len=128", "train.micro_batch_size=2", "train.global_batch_size=2"]
    rows = [{"name": "ours", "status": "ok", "micro_batch": 2, "peak_mem_gib": 1.0, "overrides": [*good, "x.y=1"]},
            {"name": "ours", "status": "ok", "micro_batch": 2, "peak_mem_gib": 1.0, "overrides": good}]
    (tmp_path / "r.json").write_text(json.dumps({"memory": "cuda", "ours_overrides": [], "rows": rows}))
    assert estimate_vs_measured.main([str(tmp_path / "r.json")]) == 2
    out, err = capsys.readouterr()
    assert "x.y=1" in err and out.count("== ") == 1 and "r.json" in out.splitlines()[-1]


def test_gradients_kept_across_micro_batches_are_estimated(capsys):
    """One process keeps every fp32 gradient while the next micro-batch runs forward; FSDP keeps every block's
    unsharded one until the last micro-batch, unless parallel.reduce_every_micro_batch reduces them each time."""
    def peak(world_size: int, *overrides: str):
        info, lines = estimate(compose_job(["model=qwen2-1.5b", "train.seq_len=4096", "train.micro_batch_size=1",
                                            *overrides]), world_size)
        return info["peak"], lines, info["plan"]

    one, lines_one, plan = peak(1, "train.global_batch_size=1")
    two, lines_two, _ = peak(1, "train.global_batch_size=2")
    assert "gradients kept across micro-batches (fp32)" not in lines_one
    assert two - one == lines_two["gradients kept across micro-batches (fp32)"] == 4 * plan.sharded
    # Under a batch ramp-up, the last (largest) batch sets it; the report gives the range.
    ramped = compose_job(["model=qwen2-1.5b", "train.micro_batch_size=1", "train.global_batch_size=8",
                          "train.batch_rampup=[[2,5],[4,9]]"])
    assert micro_batches_text(ramped, validate(ramped, 2)) == "1 to 4 micro-batches"
    kept, lines_kept, plan = peak(8, "train.global_batch_size=16")
    reduced, lines_reduced, _ = peak(8, "train.global_batch_size=16", "parallel.reduce_every_micro_batch=true")
    layers = get_model_args("qwen2-1.5b").num_hidden_layers
    assert lines_kept["gradients kept across micro-batches (fp32)"] == 4 * (plan.gathered_root +
                                                                             layers * plan.gathered_block)
    assert lines_reduced["gradients kept across micro-batches (fp32)"] == 4 * plan.sharded
    assert kept - reduced == 4 * (plan.gathered_root + layers * plan.gathered_block) - 4 * plan.sharded


@pytest.mark.parametrize("loss", ["chunked", "plain"])
def test_the_roots_fsdp_gradients_are_counted_where_torchs_memory_tracker_sees_them(loss):
    """Under FSDP the root's gradients (embedding, final norm, head) are reduced at the end of backward, where they
    are cast into the fp32 reduce-scatter input beside themselves. Torch's FSDPMemTracker, on a fake process group
    of 4 ranks (this process is rank 0), must see as the blocks' backward starts (the last block's pre-backward,
    every activation still held) the head's gradient made by the plain loss (the estimate counts it with the
    loss's activations), and none with the chunked loss (which holds the one it made in forward, an activation,
    until its own backward hands it on); and, as the root reduces, its unsharded bf16 gradients, then their fp32
    reduce-scatter input: the estimate's line, byte for byte."""
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPModState, _FSDPRefType
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from qwen2_dist.cli.train import build_model_and_optimizer
    from qwen2_dist.parallel.mesh import World, build_mesh

    world_size = 4
    job = compose_job(["model=debug", "model.vocab_size=4096", "train.seq_len=16", "train.micro_batch_size=1",
                       f"train.global_batch_size={world_size}", "train.mixed_precision=bf16", "parallel.compile=false",
                       f"model.loss={loss}", "model.loss_chunk_tokens=16"])
    args = job.model.args()
    info, lines = estimate(job, world_size)
    plan = info["plan"]
    layout = validate(job, world_size, files=False)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        world = World(rank=0, local_rank=0, world_size=world_size, device=torch.device("cpu"))
        mesh = build_mesh(world, layout["dp_replicate"], layout["dp_shard"], layout["tp"])
        model, optimizer = build_model_and_optimizer(job, world, mesh, "cpu")
        model.set_loss(loss, job.model.loss_chunk_tokens)
        tokens = torch.randint(0, args.vocab_size, (1, 16))
        tracker = FSDPMemTracker(model, optimizer)
        with tracker:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss_value = model(tokens, targets=tokens)
            loss_value.backward()
        root, last_block = (tracker.memory_tracking[m].snapshots for m in (model, model.layers[-1]))
    finally:
        dist.destroy_process_group()

    def seen(snapshots, state, kind):
        return max(snapshot[torch.device("cpu")][kind] for snapshot in snapshots[state])

    # As the blocks' backward starts, what the tracker files as temporary besides the gradients of the last block's
    # output (bf16, 16 tokens) and of the final norm's weight: the plain loss's head gradient, nothing else.
    at_blocks = (seen(last_block, _FSDPModState.BEF_PRE_BW, _FSDPRefType.TEMP) - 2 * 16 * args.hidden_size
                 - 2 * args.hidden_size)
    head = activation_bytes(args, 1, 16, 1, 2, 2)["head"]
    if loss == "plain":
        assert at_blocks == 2 * args.vocab_size * args.hidden_size
        assert lines["activations (final norm, plain loss)"] == head + at_blocks
    else:
        assert at_blocks == 0
    assert lines["a block's unsharded gradient in flight"] == (2 + 4) * plan.gathered_block
    # As the root reduces: its bf16 gradients, then their fp32 reduce-scatter input.
    unsharded = seen(root, _FSDPModState.BEF_POST_BW, _FSDPRefType.UNSHARDED_GRAD)
    reduce_input = seen(root, _FSDPModState.AFT_POST_BW, _FSDPRefType.REDUCE_SCATTER)
    assert (unsharded, reduce_input) == (2 * plan.gathered_root, 4 * plan.gathered_root)
    assert lines["root's gradients + their fp32 reduce input"] == unsharded + reduce_input
    held = sum(lines[key] for key in ("parameters (fp32)", "optimizer state (AdamW m, v fp32)",
                                      "gathered weights (root + blocks)", "a block's unsharded gradient in flight"))
    assert info["peak"] >= held + lines["gradients (fp32, end of backward)"] + unsharded + reduce_input


def test_the_report_names_the_compute_mode_and_aligns_its_gib_column(capsys):
    """An fp32 job read "fp32 compute (one process, autocast)"; a label past 46 characters pushed its number out of
    the column."""
    main(["model=qwen2-0.5b", "train.mixed_precision=fp32"])
    assert "fp32 compute (one process)," in capsys.readouterr().out
    main(["model=qwen2-0.5b"])
    out = capsys.readouterr().out
    assert "bf16 compute (one process, autocast)," in out
    rows = [line for line in out.splitlines() if re.fullmatch(r"  \S.*\s\d+\.\d\d", line)]
    assert any("bf16 weight copies" in line for line in rows) and len(rows) >= 8, out
    assert len({len(line) for line in rows}) == 1, rows
