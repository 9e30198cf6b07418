"""optim.overlap: AdamW stepped group by group (embedding, each block, the rest) is the same update as one AdamW
step, with clipping and skipped steps; its checkpoints load into the plain optimizer and back; compiled and
recomputed blocks are grouped by their wrapped names; the settings it cannot honour are refused. The side stream
itself needs CUDA (benchmarks/gpu_check.sh runs it there)."""

import pytest
import torch

from qwen2_dist.cli.train import compose_job
from qwen2_dist.config import ParallelConfig, validate
from qwen2_dist.errors import UserError
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.qwen2 import build_model
from qwen2_dist.parallel.parallelize import parallelize
from qwen2_dist.train.optim import OverlappedOptimizer
from tests.helpers import cpu_trainer


def _trainer(tmp_path, *overrides):
    return cpu_trainer(tmp_path, "train.global_batch_size=4", "optim.lr=1e-2", "train.grad_clip=0.05", *overrides)


@pytest.mark.parametrize("tied", [True, False])
def test_same_steps_as_one_adamw(tmp_path, tied):
    extra = [] if tied else ["model.tie_word_embeddings=false"]
    plain = _trainer(tmp_path / "plain", *extra)
    overlapped = _trainer(tmp_path / "overlap", "optim.overlap=true", *extra)
    assert isinstance(overlapped.optimizer, OverlappedOptimizer)
    # embedding, 2 blocks, final norm (+ the untied head)
    assert len(overlapped.optimizer.optimizers) == 2 + len(overlapped.model.layers)
    for step in range(3):
        loss_a, norm_a, _ = plain.train_step()
        loss_b, norm_b, _ = overlapped.train_step()
        assert float(norm_a) > 0.05  # the clip is active
        assert torch.equal(loss_a, loss_b) and torch.equal(norm_a, norm_b), step
    for (name, a), b in zip(plain.model.named_parameters(), overlapped.model.parameters()):
        assert torch.equal(a, b), name
    moments = {id(p): s["exp_avg_sq"] for o in overlapped.optimizer.optimizers for p, s in o.state.items()}
    for (name, a), b in zip(plain.model.named_parameters(), overlapped.model.parameters()):
        assert torch.equal(plain.optimizer.state[a]["exp_avg_sq"], moments[id(b)]), name
    # Every group takes the learning rate the trainer sets.
    lrs = {group["lr"] for group in overlapped.optimizer.param_groups}
    assert lrs == {plain.optimizer.param_groups[0]["lr"]}


def test_the_norm_is_taken_group_by_group_during_the_last_backward(tmp_path):
    """Each group's gradient norms are taken as soon as its last gradient is accumulated, in the last micro-batch's
    backward only; grad_norm() gives get_total_norm's value bit for bit, and starts the next step afresh."""
    trainer = _trainer(tmp_path, "optim.overlap=true")
    model, optimizer = trainer.model, trainer.optimizer
    tokens = torch.randint(0, model.args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    for step in range(2):
        for last in (False, True):
            optimizer.last_micro_batch(last)
            model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
            assert [norms is not None for norms in optimizer._norms] == [last] * len(optimizer.optimizers), step
        expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], foreach=True)
        assert torch.equal(optimizer.grad_norm(), expected)
        assert optimizer._norms == [None] * len(optimizer.optimizers)
        optimizer.zero_grad()
    # A group left incomplete (here: a backward of a micro-batch told it is not the last) is taken when asked for.
    optimizer.last_micro_batch(False)
    model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], foreach=True)
    assert torch.equal(optimizer.grad_norm(), expected)


def test_a_flagged_step_is_skipped_by_every_group(tmp_path):
    trainer = _trainer(tmp_path, "optim.overlap=true")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.optimizer.found_inf = torch.ones(())
    for param in trainer.model.parameters():
        param.grad = torch.ones_like(param)
    trainer.optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), before))
    trainer.optimizer.found_inf = torch.zeros(())
    trainer.optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(trainer.model.parameters(), before))


def test_checkpoints_pass_between_the_plain_and_the_overlapped_optimizer(tmp_path):
    plain = _trainer(tmp_path / "a")
    for _ in range(2):
        plain.train_step()
    plain.step = 2
    path = plain.save(blocking=True)
    overlapped = _trainer(tmp_path / "b", "optim.overlap=true")
    overlapped.restore(path)
    names = dict(zip(map(id, overlapped.model.parameters()), (n for n, _ in overlapped.model.named_parameters())))
    loaded = {names[id(p)]: s for o in overlapped.optimizer.optimizers for p, s in o.state.items()}
    for name, param in plain.model.named_parameters():
        assert torch.equal(plain.optimizer.state[param]["exp_avg"], loaded[name]["exp_avg"]), name
    # ... and both go on alike.
    for _ in range(2):
        loss_a, _, _ = plain.train_step()
        loss_b, _, _ = overlapped.train_step()
        assert torch.equal(loss_a, loss_b)
    overlapped.step = 4
    path = overlapped.save(blocking=True)
    back = _trainer(tmp_path / "c")
    back.restore(path)
    assert all(torch.equal(a, b) for a, b in zip(back.model.parameters(), overlapped.model.parameters()))
    assert torch.equal(back.train_step()[0], overlapped.train_step()[0])


@pytest.mark.parametrize("compiled", ["true", "false"])
@pytest.mark.parametrize("checkpointing", ["none", "full", "selective", "op"])
def test_compiled_and_recomputed_blocks_are_grouped_and_hooked(checkpointing, compiled):
    """The wrappers of parallelize (torch.compile, checkpoint_wrapper) prefix the blocks' parameter names; each
    block is still one group, and the hook that waits for it sits on the module the model calls. Recomputed blocks
    not compiled (the CPU's default) failed with a KeyError: a checkpoint wrapper's named_parameters() drops its
    prefix."""
    from qwen2_dist.config import OptimConfig

    cfg = ParallelConfig(activation_checkpointing=checkpointing, compile=compiled)
    model = parallelize(build_model(get_model_args("tiny"), "meta"), None, cfg, device_type="cpu")
    model.to_empty(device="cpu")
    optimizer = OverlappedOptimizer(model, OptimConfig())
    blocks = optimizer.optimizers[1:-1]
    assert len(blocks) == len(model.layers)
    for block, layer in zip(blocks, model.layers):
        assert {id(p) for g in block.param_groups for p in g["params"]} == {id(p) for p in layer.parameters()}
        assert len(layer._forward_pre_hooks) == 1
    assert len(model.embed_tokens._forward_pre_hooks) == 1 and len(model.norm._forward_pre_hooks) == 1


@pytest.mark.parametrize("overrides, world_size, needs", [
    (["optim.overlap=true"], 2, "one process (got 2; under FSDP each rank updates only its shard)"),
    (["optim.overlap=true", "optim.in_backward=true", "train.grad_clip=0"], 1, "optim.in_backward=false"),
    (["optim.overlap=true", "optim.impl=apex"], 1, "optim.impl=torch (got apex)"),
    (["optim.overlap=true", "optim.fused=false"], 2, "one process (got 2; under FSDP each rank updates only its "
                                                     "shard); optim.fused=auto or true (got false)"),
])
def test_refused_where_it_cannot_hold(overrides, world_size, needs):
    """Naming what the job lacks, only that."""
    with pytest.raises(UserError) as refused:
        validate(compose_job(overrides), world_size)
    assert str(refused.value) == ("optim.overlap=true steps torch's fused AdamW on a side stream of one process: it "
                                  f"needs {needs} (or set optim.overlap=false)")


def test_checkpoints_pass_to_the_in_backward_optimizer_and_back(tmp_path):
    """Format 2 keys the optimizer state by parameter name: optim.in_backward's one AdamW per parameter loads a
    plain AdamW's checkpoint, and the other way round."""
    import torch.nn.functional as F

    from qwen2_dist.config import OptimConfig
    from qwen2_dist.train import checkpoint
    from qwen2_dist.train.optim import build_optimizer

    def model():
        m = build_model(get_model_args("tiny"), "cpu")
        m.init_weights(0)
        return m

    plain = model()
    plain_opt = build_optimizer(plain, OptimConfig(), "cpu")
    batch = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(plain(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
    plain_opt.step()
    checkpoint.write(str(tmp_path / "a"), plain, plain_opt, {"step": 1}, {"step": 1})
    lean = model()
    lean_opt = build_optimizer(lean, OptimConfig(in_backward=True), "cpu")
    checkpoint.load(str(tmp_path / "a"), lean, lean_opt)
    moments = {id(p): o.state[p]["exp_avg"] for o in lean_opt.optimizers for p in o.param_groups[0]["params"]}
    for (name, a), b in zip(plain.named_parameters(), lean.parameters()):
        assert torch.equal(plain_opt.state[a]["exp_avg"], moments[id(b)]), name
    checkpoint.write(str(tmp_path / "b"), lean, lean_opt, {"step": 1}, {"step": 1})
    back = model()
    back_opt = build_optimizer(back, OptimConfig(), "cpu")
    checkpoint.load(str(tmp_path / "b"), back, back_opt)
    for (name, a), b in zip(plain.named_parameters(), back.parameters()):
        assert torch.equal(plain_opt.state[a]["exp_avg_sq"], back_opt.state[b]["exp_avg_sq"]), name


def test_a_checkpoint_of_format_1_still_loads(tmp_path, monkeypatch):
    """Checkpoints written before format 2 (optimizer parameter groups by position) still resume, into an optimizer
    grouped the same way."""
    from qwen2_dist.train import checkpoint

    old = _trainer(tmp_path / "old")
    old.train_step()
    old.step = 1
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "FORMAT_VERSION", 1)
        path = old.save(blocking=True)
    assert checkpoint.read_metadata(path)["format"] == 1
    new = _trainer(tmp_path / "new")
    new.restore(path)
    assert torch.equal(old.train_step()[0], new.train_step()[0])


def test_each_module_waits_for_its_own_update_just_before_it_runs(monkeypatch):
    """The hook plumbing, with the CUDA stream and events stood in for: the embedding, every (compiled) block and the
    final norm make the current stream wait for their own group's event right before their forward, once."""
    from qwen2_dist.config import OptimConfig

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: real_compile(module, backend="eager"))
    model = parallelize(build_model(get_model_args("tiny"), "meta"), None, ParallelConfig(compile="true"),
                        device_type="cpu")
    model.to_empty(device="cpu")
    model.init_weights(0)
    optimizer = OverlappedOptimizer(model, OptimConfig())
    log = []

    class Current:
        def wait_event(self, event):
            log.append(f"wait {event}")

        def wait_stream(self, stream):
            log.append("wait side stream")

    class Side:
        device = "cuda:0"

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Current())
    optimizer.stream = Side()
    optimizer._events = [f"event{i}" for i in range(len(optimizer._events))]
    names = ["embed_tokens", *(f"layer{i}" for i in range(len(model.layers))), "norm"]
    for name, module in zip(names, [model.embed_tokens, *model.layers, model.norm]):
        module.register_forward_pre_hook(lambda module, args, name=name: log.append(f"run {name}"))
    tokens = torch.randint(0, 1000, (1, 8))
    model(tokens)
    assert log == [line for i, name in enumerate(names) for line in (f"wait event{i}", f"run {name}")]
    log.clear()
    model(tokens)  # each event is waited for once
    assert log == [f"run {name}" for name in names]
    optimizer.wait()
    assert log[-1] == "wait side stream"


def test_a_checkpoint_waits_for_the_update_in_flight(tmp_path, monkeypatch):
    """Whatever writes a checkpoint (the trainer's saves, qwen2-convert, tests) reads the weights and moments only
    after the side stream's update: checkpoint's state gathering calls the optimizer's wait()."""
    from qwen2_dist.train import checkpoint

    trainer = _trainer(tmp_path, "optim.overlap=true")
    trainer.train_step()
    calls = []
    trainer.optimizer.wait = lambda: calls.append("wait")
    get_state_dict = checkpoint.get_state_dict

    def reads_state(*args, **kwargs):
        calls.append("read")
        return get_state_dict(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "get_state_dict", reads_state)
    trainer.step = 1
    trainer.save(blocking=True)
    assert calls == ["wait", "read"]
