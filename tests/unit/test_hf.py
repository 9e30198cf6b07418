"""Hugging Face <-> native: logits match transformers, the round trip is bit-exact, bad inputs are refused."""

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

from qwen2_dist.errors import UserError  # noqa: E402
from qwen2_dist.model import hf as hf_module  # noqa: E402
from qwen2_dist.model.args import SIZES, ModelArgs  # noqa: E402
from qwen2_dist.model.hf import (  # noqa: E402
    INDEX_NAME,
    WEIGHTS_NAME,
    args_from_hf_config,
    hf_config_from_args,
    hf_to_native_name,
    hf_to_native_state_dict,
    load_hf_model,
    native_to_hf_name,
    native_to_hf_state_dict,
    read_hf_state_dict,
    write_hf,
)
from tests.helpers import record_fsyncs, save_pickle_hf  # noqa: E402

# Tied and untied, GQA ratios 1, 2 and 7, non-default rope_theta / eps; "sharded" saves with a small max_shard_size.
CONFIGS = {
    "mha_tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                     tie_word_embeddings=True),
    "gqa2_untied": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=3,
                        tie_word_embeddings=False, rope_theta=1_000_000.0, rms_norm_eps=1e-5),
    "gqa7_tied_sharded": dict(hidden_size=56, num_attention_heads=7, num_key_value_heads=1, num_hidden_layers=4,
                              tie_word_embeddings=True),
    "gqa7_untied_sharded": dict(hidden_size=56, num_attention_heads=7, num_key_value_heads=1, num_hidden_layers=2,
                                tie_word_embeddings=False, rope_theta=500_000.0),
}


def make_hf_model(name: str, seed: int = 0) -> Qwen2ForCausalLM:
    """A random tiny Qwen2ForCausalLM whose every tensor (biases and norms too) is distinct and non-trivial."""
    config = Qwen2Config(vocab_size=1000, intermediate_size=128, max_position_embeddings=256, **CONFIGS[name])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            # transformers initializes biases to zero and norms to one, which would hide a swapped mapping.
            if "norm" in param_name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    return model


def save_hf(model: Qwen2ForCausalLM, path, sharded: bool) -> str:
    model.save_pretrained(path, safe_serialization=True, max_shard_size="50KB" if sharded else "5GB")
    assert os.path.isfile(os.path.join(path, INDEX_NAME if sharded else WEIGHTS_NAME))
    return str(path)


def hf_logits(path: str, tokens: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """Logits of transformers' own Qwen2ForCausalLM loaded from path, in fp32."""
    model = Qwen2ForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, dtype=torch.float32)
    assert model.config._attn_implementation == attn_implementation
    with torch.no_grad():
        return model.eval()(tokens).logits


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name, tmp_path):
    hf_model = make_hf_model(name)
    path = save_hf(hf_model, tmp_path / "hf", sharded="sharded" in name)
    model = load_hf_model(path)
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        native = model(tokens)
        model.set_attention_backend("reference")
        reference = model(tokens)
    assert native.shape == (2, 24, 1000)
    # Logits of order one, so an absolute 1e-5 is a real test.
    assert native.std() > 0.5
    for attn in ("eager", "sdpa"):
        diff = (native - hf_logits(path, tokens, attn)).abs().max().item()
        assert diff <= 1e-5, f"{name} {attn}: max abs logit diff {diff}"
    assert (native - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["gqa2_untied", "gqa7_untied_sharded"])
def test_init_from_hf_loads_untied_weights_in_place_as_transformers_reads_them(name, tmp_path):
    """model.init_from_hf's path (load_hf_into: DCP reads each tensor into the model's own, as each rank of a
    sharded model reads its slices), with an untied lm_head as 7B and 72B have, bf16 files into fp32 weights."""
    hf_model = make_hf_model(name).to(torch.bfloat16)
    path = save_hf(hf_model, tmp_path / "hf", sharded="sharded" in name)
    from qwen2_dist.model.qwen2 import build_model

    args, _ = read_hf_state_dict(path)
    model = build_model(args, "cpu")
    hf_module.load_hf_into(model, path)
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        native = model(tokens)
    assert (native - hf_logits(path, tokens, "eager")).abs().max().item() <= 1e-5
    assert torch.equal(model.state_dict()["lm_head.weight"], hf_model.lm_head.weight.float())


def test_logit_check_catches_a_swapped_mapping(tmp_path):
    path = save_hf(make_hf_model("gqa2_untied"), tmp_path / "hf", sharded=False)
    model = load_hf_model(path)
    attn = model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight, attn.v_proj.weight = attn.v_proj.weight, attn.k_proj.weight
        tokens = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
        diff = (model(tokens) - hf_logits(path, tokens, "eager")).abs().max().item()
    assert diff > 1e-2


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 40_000])
def test_round_trip_is_exact(name, max_shard_bytes, tmp_path):
    hf_model = make_hf_model(name)
    args, native = read_hf_state_dict(save_hf(hf_model, tmp_path / "hf", sharded="sharded" in name))
    out = tmp_path / "out"
    write_hf(native, args, str(out), max_shard_bytes=max_shard_bytes)

    files = sorted(os.listdir(out))
    if max_shard_bytes < 2**20:
        index = json.loads((out / INDEX_NAME).read_text())
        shard_files = sorted(set(index["weight_map"].values()))
        assert len(shard_files) > 1 and files == sorted([INDEX_NAME, "config.json", *shard_files])
        total = 0
        for file in shard_files:
            tensors = load_file(out / file)
            assert all(index["weight_map"][k] == file for k in tensors)
            size = sum(t.nbytes for t in tensors.values())
            # Over the limit only when a single tensor is larger than it.
            assert size <= max_shard_bytes or len(tensors) == 1
            total += size
        assert index["metadata"]["total_size"] == total
        assert shard_files[0] == f"model-00001-of-{len(shard_files):05d}.safetensors"
    else:
        assert files == ["config.json", WEIGHTS_NAME]
        assert ("lm_head.weight" in load_file(out / WEIGHTS_NAME)) == (not args.tie_word_embeddings)
        # transformers refuses safetensors files whose metadata names no framework.
        with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
            assert f.metadata() == {"format": "pt"}

    reloaded, info = Qwen2ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = hf_model.state_dict()
    assert reloaded.state_dict().keys() == original.keys()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    assert reloaded.config.tie_word_embeddings == args.tie_word_embeddings
    assert args_from_hf_config(json.loads((out / "config.json").read_text())) == args


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_every_exported_file_has_the_mode_the_umask_gives(tmp_path, umask):
    """safetensors writes its files 0600: on a shared cluster nobody else could read the weights of an export whose
    config.json they can read."""
    from qwen2_dist.fsutil import process_umask

    args, native = read_hf_state_dict(save_hf(make_hf_model("gqa2_untied"), tmp_path / "hf", sharded=False))
    before = os.umask(umask)
    try:
        assert process_umask() == umask
        write_hf(native, args, str(tmp_path / "out"), max_shard_bytes=40_000)
    finally:
        os.umask(before)
    modes = {name: oct(os.stat(tmp_path / "out" / name).st_mode & 0o777) for name in os.listdir(tmp_path / "out")}
    assert sum(name.endswith(".safetensors") for name in modes) > 1
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_write_copes_with_views_and_non_contiguous_tensors(tmp_path):
    args, native = read_hf_state_dict(save_hf(make_hf_model("gqa2_untied"), tmp_path / "hf", sharded=False))
    # One tensor under two names, overlapping views of one buffer, and a transposed (non-contiguous) tensor.
    native["layers.1.input_layernorm.weight"] = native["norm.weight"]
    q_bias = native["layers.0.self_attn.q_proj.bias"]
    native["layers.0.self_attn.k_proj.bias"] = q_bias[32:].clone()
    odd = dict(native)
    odd["layers.0.self_attn.k_proj.bias"] = q_bias[32:]
    odd["layers.0.mlp.gate_proj.weight"] = native["layers.0.mlp.gate_proj.weight"].t().contiguous().t()
    assert not odd["layers.0.mlp.gate_proj.weight"].is_contiguous()
    write_hf(odd, args, str(tmp_path / "out"))
    _, back = read_hf_state_dict(str(tmp_path / "out"))
    assert back.keys() == native.keys()
    for name, tensor in native.items():
        assert torch.equal(back[name], tensor), name


def test_write_bfloat16(tmp_path):
    args, native = read_hf_state_dict(save_hf(make_hf_model("gqa2_untied"), tmp_path / "hf", sharded=False))
    write_hf(native, args, str(tmp_path / "out"), dtype=torch.bfloat16)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    written = load_file(tmp_path / "out" / WEIGHTS_NAME)
    assert written.keys() == native_to_hf_state_dict(native, args).keys()
    for name, tensor in native.items():
        assert torch.equal(written[native_to_hf_name(name)], tensor.to(torch.bfloat16)), name
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert torch.equal(reloaded.model.norm.weight, native["norm.weight"].to(torch.bfloat16))


def test_names_reads_only_requested_tensors(tmp_path):
    path = save_hf(make_hf_model("gqa7_tied_sharded"), tmp_path / "hf", sharded=True)
    _, full = read_hf_state_dict(path)
    wanted = {"layers.1.self_attn.q_proj.bias", "norm.weight"}
    weight_map = json.loads(open(os.path.join(path, INDEX_NAME)).read())["weight_map"]
    needed = {weight_map[native_to_hf_name(n)] for n in wanted}
    # Remove every shard the requested tensors do not live in: reading must not touch them.
    removed = set(weight_map.values()) - needed
    assert removed
    for file in removed:
        os.remove(os.path.join(path, file))
    args, part = read_hf_state_dict(path, names=wanted)
    assert args.num_hidden_layers == 4 and part.keys() == wanted
    for name in wanted:
        assert torch.equal(part[name], full[name])
    with pytest.raises(UserError, match="listed in model.safetensors.index.json but missing"):
        read_hf_state_dict(path)


def test_tied_file_with_lm_head_drops_it_and_untied_needs_it(tmp_path):
    hf_model = make_hf_model("mha_tied")
    path = save_hf(hf_model, tmp_path / "hf", sharded=False)
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    args, native = read_hf_state_dict(path)
    assert "lm_head.weight" not in native and len(native) == 2 * 12 + 2

    config_file = os.path.join(path, "config.json")
    config = json.loads(open(config_file).read())
    config["tie_word_embeddings"] = False
    del tensors["lm_head.weight"]
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(config_file, "w") as f:
        json.dump(config, f)
    with pytest.raises(UserError, match="missing 1 tensors: lm_head.weight; config.json has tie_word_embeddings"):
        read_hf_state_dict(path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    path = save_hf(make_hf_model("mha_tied"), tmp_path / "hf", sharded=False)
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(128, 64)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(UserError, match="missing 1 tensors: layers.1.mlp.up_proj.weight"):
        read_hf_state_dict(path)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(128, 64)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"do not belong to the architecture in config.json \(2 layers\)"):
        read_hf_state_dict(path)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"has shape \(64, 128\) but config.json implies \(128, 64\)"):
        read_hf_state_dict(path)


def test_bad_directories_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_hf_state_dict(str(tmp_path / "nope"))
    model = make_hf_model("mha_tied")
    save_pickle_hf(model, tmp_path / "bin")
    assert os.path.isfile(tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"only pickle weights.*only safetensors are read.*safe_serialization=True"):
        read_hf_state_dict(str(tmp_path / "bin"))
    os.remove(tmp_path / "bin" / "config.json")
    with pytest.raises(UserError, match="config.json: missing"):
        read_hf_state_dict(str(tmp_path / "bin"))


def test_the_launch_check_reads_the_headers_and_a_failed_load_is_one_error(tmp_path, monkeypatch):
    """model.init_from_hf's check (validate, before launch) refuses an index that puts a tensor in a file without
    it, a tensor of a shape config.json does not give, and a shard the index names that is missing; a load that
    fails even so is one UserError naming the key, not DCP's traceback on every rank."""
    from qwen2_dist.model.qwen2 import build_model

    path = save_hf(make_hf_model("gqa7_untied_sharded"), tmp_path / "hf", sharded=True)
    args, _ = read_hf_state_dict(path)
    hf_module.check_hf_matches(path, args)
    generation = os.path.join(path, "generation_config.json")
    with open(generation, "w") as f:
        f.write('{"eos_token_id": ')  # cut short
    with pytest.raises(UserError, match=r"model.init_from_hf=.*generation_config.json: not valid JSON"):
        hf_module.check_hf_matches(path, args)
    os.remove(generation)
    index_file = os.path.join(path, INDEX_NAME)
    index = json.loads(open(index_file).read())
    weight_map = index["weight_map"]
    # A tensor that shares its file with others (so that the file stays named), put by the index in another file.
    moved = next(name for name, file in weight_map.items() if list(weight_map.values()).count(file) > 1)
    elsewhere = next(f for f in sorted(set(weight_map.values())) if f != weight_map[moved])
    with open(index_file, "w") as f:
        json.dump({**index, "weight_map": {**weight_map, moved: elsewhere}}, f)
    with pytest.raises(UserError, match=rf"model.init_from_hf=.*{elsewhere}: has no tensor {moved}, which"):
        hf_module.check_hf_matches(path, args)
    with open(index_file, "w") as f:
        json.dump(index, f)

    shard = os.path.join(path, weight_map["model.norm.weight"])
    tensors = load_file(shard)
    save_file({**tensors, "model.norm.weight": torch.ones(57)}, shard, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model.norm.weight has shape \(57,\) but config.json implies \(56,\)"):
        hf_module.check_hf_matches(path, args)
    os.remove(shard)
    with pytest.raises(UserError, match="listed in model.safetensors.index.json but missing"):
        hf_module.check_hf_matches(path, args)

    monkeypatch.setattr(hf_module, "check_hf_matches", lambda *_: None)  # as if the files went after the check
    with pytest.raises(UserError, match=r"model.init_from_hf=.*: the weights cannot be loaded \(.*\); check that"):
        hf_module.load_hf_into(build_model(args, "cpu"), path)


def test_the_export_keeps_the_source_context_and_token_ids_inside_the_vocabulary():
    args = ModelArgs(**{**CONFIGS["mha_tied"], "vocab_size": 151936, "intermediate_size": 128})
    plain = hf_config_from_args(args)
    assert plain["eos_token_id"] == plain["bos_token_id"] == 151643
    source = {"max_position_embeddings": 32768, "eos_token_id": 151645, "bos_token_id": 151643,
              "generation_config": {"top_p": 0.8}}
    config = hf_config_from_args(args, source=source)
    assert (config["max_position_embeddings"], config["eos_token_id"]) == (32768, 151645)
    assert "generation_config" not in config
    small = hf_config_from_args(ModelArgs(**{**args.to_dict(), "vocab_size": 1000}), source=source)
    assert small["eos_token_id"] is None and small["bos_token_id"] is None  # not tokens of a 1000-token vocabulary


def test_an_export_keeps_the_source_context_unless_the_run_set_its_own_or_trained_longer():
    from qwen2_dist.cli.convert import _export_source

    args = SIZES["qwen2-0.5b"]
    meta = {"model": "qwen2-0.5b", "hf_source": {"max_position_embeddings": 32768, "eos_token_id": 151645}}
    assert _export_source(meta, args) == meta["hf_source"]
    longer = ModelArgs(**{**args.to_dict(), "max_position_embeddings": 262144})  # a longer-context stage
    assert _export_source(meta, longer) == {"eos_token_id": 151645}
    assert _export_source({"model": "qwen2-0.5b"}, args) is None
    # Never shorter than the longest context trained at.
    assert _export_source({**meta, "trained_seq_len": 65536}, args) == {**meta["hf_source"],
                                                                         "max_position_embeddings": 65536}
    assert _export_source({**meta, "trained_seq_len": 4096}, args) == meta["hf_source"]
    assert _export_source({"model": "qwen2-0.5b", "trained_seq_len": 4096}, args) is None
    assert _export_source({"model": "qwen2-0.5b", "trained_seq_len": 262144}, args) == {
        "max_position_embeddings": 262144}


def test_pickle_weights_of_another_shape_than_config_json_are_refused(tmp_path):
    save_pickle_hf(make_hf_model("mha_tied"), tmp_path / "bin")
    load_hf_model(str(tmp_path / "bin"), allow_pickle=True)
    config_file = tmp_path / "bin" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(UserError, match=r"down_proj.weight has shape \(64, 128\) but config.json implies \(64, 96\)"):
        load_hf_model(str(tmp_path / "bin"), allow_pickle=True)


def test_pickle_weights_in_torch_s_old_format_load_and_a_damaged_file_is_named(tmp_path):
    """torch's format before 1.6 cannot be memory-mapped: read into memory instead, the same weights; a file that
    does not unpickle is one error naming it."""
    save_pickle_hf(make_hf_model("mha_tied"), tmp_path / "bin")
    weights = tmp_path / "bin" / "pytorch_model.bin"
    expected = load_hf_model(str(tmp_path / "bin"), allow_pickle=True).state_dict()
    torch.save(torch.load(weights, weights_only=True), weights, _use_new_zipfile_serialization=False)
    loaded = load_hf_model(str(tmp_path / "bin"), allow_pickle=True).state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=rf"^{weights}: cannot be read as PyTorch weights \(\w+: .*save the model "
                                        "again with transformers' save_pretrained"):
        load_hf_model(str(tmp_path / "bin"), allow_pickle=True)


def test_a_stray_copy_of_the_tensors_beside_the_checkpoint_is_refused(tmp_path):
    """A sharded export with an old model.safetensors beside it: model.init_from_hf reads the directory as a whole
    (DCP), which would take some tensors from each; the directory is refused, naming the file. A file of other
    tensors (an adapter) is no obstacle."""
    model = make_hf_model("gqa7_untied_sharded")
    path = save_hf(model, tmp_path / "hf", sharded=True)
    save_file({"base_model.lora_A.weight": torch.zeros(2, 2)}, os.path.join(path, "adapter_model.safetensors"))
    read_hf_state_dict(path)
    stale = {k: torch.zeros_like(v) for k, v in list(model.state_dict().items())[:3]}
    save_file(stale, os.path.join(path, "old-copy.safetensors"))
    with pytest.raises(UserError, match=r"old-copy\.safetensors is not part of the checkpoint .* holds 3 of its "
                                        r"tensors .* Move it out of the directory"):
        read_hf_state_dict(path)
    os.remove(os.path.join(path, "old-copy.safetensors"))
    # Listed as the reader lists the directory: a hidden file too (glob skipped it, DCP read it), in a directory
    # whose name is no glob pattern (run[1] matched nothing, so nothing was checked), and one that the reader could
    # not read either (macOS's ._ files) is named before the launch, not after it on every rank.
    bracketed = str(tmp_path / "run[1]")
    os.rename(path, bracketed)
    read_hf_state_dict(bracketed)
    for name, content, why in ((".old.safetensors", None, "is not part of the checkpoint .* holds 3 of its tensors"),
                               ("._model.safetensors", b"\x00\x05\x16\x07" + b"\x00" * 60,
                                "is not part of the checkpoint and cannot be read")):
        stray = os.path.join(bracketed, name)
        if content is None:
            save_file(stale, stray)
        else:
            with open(stray, "wb") as f:
                f.write(content)
        with pytest.raises(UserError, match=rf"{re.escape(name)} {why}.* Move it out of the directory"):
            read_hf_state_dict(bracketed)
        os.remove(stray)


def test_pickle_weights_are_found_in_a_directory_whose_name_is_no_glob_pattern(tmp_path):
    path = tmp_path / "run[1]"
    save_pickle_hf(make_hf_model("mha_tied"), path)
    assert load_hf_model(str(path), allow_pickle=True) is not None
    with pytest.raises(UserError, match=r"holds only pickle weights \(pytorch_model\*\.bin\)"):
        read_hf_state_dict(str(path))


def base_config() -> dict:
    return hf_config_from_args(ModelArgs(1000, 64, 2, 4, 2, 128, tie_word_embeddings=True))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model_type", "llama", 'model_type="llama"'),
        ("architectures", ["Qwen2ForSequenceClassification"], "only Qwen2ForCausalLM"),
        ("hidden_act", "gelu", 'hidden_act="gelu"'),
        ("layer_types", ["full_attention", "sliding_attention"], "layer_types="),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling="),
        ("attention_bias", False, "attention_bias=false"),
        ("mlp_bias", True, "mlp_bias=true"),
        ("attention_dropout", 0.1, "attention_dropout=0.1"),
        ("head_dim", 32, "head_dim=32.*= 16"),
        ("num_key_value_heads", 3, "not divisible by num_key_value_heads 3"),
        ("hidden_size", "64", 'hidden_size="64" has the wrong type'),
        # json reads NaN and Infinity; the model made nan logits (initializer_range=nan: a traceback in normal_).
        ("rms_norm_eps", float("nan"), "rms_norm_eps must be a positive finite number, got nan"),
        ("rms_norm_eps", float("inf"), "rms_norm_eps must be a positive finite number, got inf"),
        ("initializer_range", float("nan"), "initializer_range must be a positive finite number, got nan"),
        ("quantization", {"group_size": 64, "bits": 4}, r'quantization=\{"group_size": 64, "bits": 4\}.*unquantized'),
        ("quantization_config", {"quant_method": "awq"}, "quantization_config=.*unquantized"),
    ],
)
def test_unsupported_configs_are_refused(key, value, message):
    config = base_config()
    config[key] = value
    with pytest.raises(UserError, match=message):
        args_from_hf_config(config)


@pytest.mark.parametrize("changes", [
    {"use_sliding_window": True},  # max_window_layers is the layer count: no layer has a window
    {"use_sliding_window": True, "max_window_layers": 1},
    {"use_sliding_window": True, "max_window_layers": 0, "sliding_window": None},
    {"use_sliding_window": True, "max_window_layers": None},  # transformers' default: 28 layers with full attention
    {"use_sliding_window": True, "max_window_layers": None, "num_hidden_layers": 30},
    {"use_sliding_window": False, "max_window_layers": 0},
    {"use_sliding_window": True, "max_window_layers": 0, "layer_types": ["full_attention", "full_attention"]},
    {"hidden_act": "swish"},
])
def test_sliding_window_and_activation_are_read_as_transformers_reads_them(changes):
    """Refused exactly when transformers would give some layer a sliding window; "swish" is its other name for silu."""
    config = base_config()
    for key, value in changes.items():
        if value is None and key == "max_window_layers":
            del config[key]
        else:
            config[key] = value
    hf = Qwen2Config(**config)
    full = all(kind == "full_attention" for kind in hf.layer_types)
    x = torch.linspace(-4, 4, 9)
    torch.testing.assert_close(ACT2FN[hf.hidden_act](x), torch.nn.functional.silu(x))
    if full:
        assert args_from_hf_config(config).num_hidden_layers == config["num_hidden_layers"]
    else:
        with pytest.raises(UserError, match=r"use_sliding_window=true .*layers \d+\.\.\d+ would use a sliding window"):
            args_from_hf_config(config)


def test_config_defaults_follow_transformers():
    config = base_config()
    for key in ("rope_theta", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "rope_scaling",
                "rope_parameters"):
        del config[key]
    config["num_key_value_heads"] = None
    args = args_from_hf_config(config)
    hf = Qwen2Config(**config)
    # transformers 5 keeps theta in rope_parameters only.
    hf_theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert (args.rope_theta, args.rms_norm_eps, args.tie_word_embeddings, args.max_position_embeddings) == (
        hf_theta, hf.rms_norm_eps, hf.tie_word_embeddings, hf.max_position_embeddings,
    )
    assert args.num_key_value_heads == 4
    del config["vocab_size"]
    with pytest.raises(UserError, match="missing key 'vocab_size'"):
        args_from_hf_config(config)


def test_transformers_5_rope_parameters_are_read_and_checked():
    """transformers >= 5 writes {"rope_parameters": {"rope_type": "default", "rope_theta": ...}} and no rope_theta."""
    config = base_config()
    del config["rope_theta"], config["rope_scaling"]
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500_000.0}
    assert args_from_hf_config(config).rope_theta == 500_000.0
    config["rope_theta"] = 500_000.0  # both spellings, agreeing (what write_hf writes)
    assert args_from_hf_config(config).rope_theta == 500_000.0
    config["rope_theta"] = 10_000.0
    with pytest.raises(UserError, match=r"rope_theta=10000.0 and rope_parameters.rope_theta=500000.0 disagree"):
        args_from_hf_config(config)
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(UserError, match=r'config.json: rope_parameters.rope_type="yarn" .*only unscaled RoPE'):
        args_from_hf_config(config)


@pytest.mark.parametrize("rope, message", [
    # "type" is the older key for the RoPE type, which transformers still reads.
    ({"type": "yarn", "factor": 4.0}, r'rope_parameters.type="yarn" is not supported.*only unscaled RoPE'),
    ({"rope_type": "default", "rope_theta": 1e6, "factor": 4.0}, r"rope_parameters.factor=4.0 .*; remove it"),
    ({"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
     r"rope_parameters.partial_rotary_factor=0.5 .*set it to 1.0"),
    ({"full_attention": {"rope_type": "default", "rope_theta": 1e6},
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
     r"rope_parameters=.*layer types' RoPE settings differ"),
    ({"full_attention": {"rope_type": "linear", "factor": 2.0}}, r'rope_parameters.full_attention.rope_type="linear"'),
    ("default", r'rope_parameters="default" .*write it as'),
])
def test_rope_parameters_that_are_not_plain_rope_are_refused_naming_the_key(rope, message):
    config = base_config()
    del config["rope_theta"], config["rope_scaling"]
    config["rope_parameters"] = rope
    with pytest.raises(UserError, match=rf"^config.json: {message}"):
        args_from_hf_config(config)


def test_rope_parameters_per_layer_type_and_a_full_rotary_factor_are_read():
    """transformers 5's per-layer-type form, with one RoPE for every layer type, is that RoPE: its theta, not the
    default 10000 that a config.json without rope_theta would otherwise mean."""
    config = base_config()
    del config["rope_theta"], config["rope_scaling"]
    config["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    assert args_from_hf_config(config).rope_theta == 1e6
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 1.0}
    assert args_from_hf_config({**config, "partial_rotary_factor": 1.0}).rope_theta == 5e5
    # transformers rotates only this fraction of each head when the key is at the top level too.
    with pytest.raises(UserError, match=r"^config.json: partial_rotary_factor=0.5 is not supported"):
        args_from_hf_config({**config, "partial_rotary_factor": 0.5})


@pytest.mark.parametrize("size", SIZES)
def test_config_round_trip_of_published_sizes(size):
    config = hf_config_from_args(SIZES[size], "bfloat16")
    assert args_from_hf_config(config) == SIZES[size]
    hf = Qwen2Config(**config)
    assert hf.head_dim == SIZES[size].head_dim and hf.bos_token_id == hf.eos_token_id == 151643


def test_names_and_state_dicts_map_both_ways():
    assert hf_to_native_name("model.layers.3.self_attn.q_proj.bias") == "layers.3.self_attn.q_proj.bias"
    assert hf_to_native_name("lm_head.weight") == native_to_hf_name("lm_head.weight") == "lm_head.weight"
    assert native_to_hf_name("norm.weight") == "model.norm.weight"
    with pytest.raises(UserError, match="score.weight"):
        hf_to_native_name("score.weight")
    for name in ("mha_tied", "gqa2_untied"):
        hf_model = make_hf_model(name)
        args = args_from_hf_config(hf_model.config.to_dict())
        native = hf_to_native_state_dict(hf_model.state_dict(), args)
        assert ("lm_head.weight" in native) == (not args.tie_word_embeddings)
        back = native_to_hf_state_dict(native, args)
        expected = {k for k in hf_model.state_dict() if not (k == "lm_head.weight" and args.tie_word_embeddings)}
        assert back.keys() == expected


def test_an_output_named_by_a_symlink_lands_in_its_target_and_a_mount_point_is_refused(tmp_path, monkeypatch):
    """The export is written beside the output and renamed into its place: through a symlink to an empty directory
    it must land in the target (the link still pointing there, nothing left beside the link), and a mount point,
    which a rename cannot replace, is refused before anything is written."""
    args, native = read_hf_state_dict(save_hf(make_hf_model("mha_tied"), tmp_path / "hf", sharded=False))
    (tmp_path / "disk").mkdir()
    target = tmp_path / "disk" / "export"
    target.mkdir()
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "export"
    link.symlink_to(target)
    write_hf(native, args, str(link))
    assert link.is_symlink() and os.path.samefile(link, target)
    assert sorted(os.listdir(target)) == ["config.json", WEIGHTS_NAME] and os.listdir(tmp_path / "links") == ["export"]
    mount = tmp_path / "volume"
    mount.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path) == str(mount))
    with pytest.raises(UserError, match=rf"{mount}: is a mount point; .* name a new directory inside it, e.g. "
                                        rf"{mount}/model"):
        write_hf(native, args, str(mount))
    assert os.listdir(mount) == [] and sorted(os.listdir(tmp_path)) == ["disk", "hf", "links", "volume"]


def test_write_refuses_non_empty_dir_and_failures_leave_nothing(tmp_path, monkeypatch):
    args, native = read_hf_state_dict(save_hf(make_hf_model("mha_tied"), tmp_path / "hf", sharded=False))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(UserError, match="exists and is not an empty directory.*overwrite=True"):
        write_hf(native, args, str(out))
    write_hf(native, args, str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", WEIGHTS_NAME]

    broken = dict(native)
    del broken["norm.weight"]
    with pytest.raises(UserError, match="missing 1 tensors: norm.weight"):
        write_hf(broken, args, str(tmp_path / "new"))

    # A failure after the first shard is written (disk full, say) must leave neither out_dir nor a temp dir.
    real_save_file = hf_module.save_file
    calls = []

    def failing_save_file(tensors, file, **kwargs):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save_file(tensors, file, **kwargs)

    monkeypatch.setattr(hf_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        write_hf(native, args, str(tmp_path / "new"), max_shard_bytes=40_000)
    assert len(calls) == 2
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]


@pytest.fixture(scope="module")
def qwen2_tokenizer_dir(tmp_path_factory) -> str:
    """The embedded Qwen2 vocabulary as Hugging Face tokenizer files (a few seconds to write: once per module)."""
    from qwen2_dist.data.tokenizer import save_qwen2_hf_tokenizer

    path = str(tmp_path_factory.mktemp("qwen2_tokenizer"))
    save_qwen2_hf_tokenizer(path)
    return path


def save_word_tokenizer(path) -> None:
    """A small tokenizer of its own (words w0..w99, <s>, </s>), unlike Qwen2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>") \
        .save_pretrained(path)


def test_the_export_writes_the_tokenizer_the_data_was_prepared_with(tmp_path, caplog, monkeypatch):
    from qwen2_dist.cli.convert import export_tokenizer

    monkeypatch.setattr(hf_module, "load_export_tokenizer", lambda spec, vocab_size: f"loaded {spec}")
    source = tmp_path / "hf_source"
    source.mkdir()
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    rows = 151936
    assert export_tokenizer("auto", {"data_tokenizer": "qwen2", "hf_source": {"path": str(no_tokenizer)}},
                            rows) == "loaded qwen2"
    assert export_tokenizer("auto", {"data_tokenizer": str(source)}, rows) == f"loaded {source}"
    assert export_tokenizer("auto", {"data_tokenizer": "Qwen/Qwen2-0.5B"}, rows) == "loaded Qwen/Qwen2-0.5B"  # hub id
    # A tokenizer directory gone since: the weights' source's, else none, with a warning.
    assert export_tokenizer("auto", {"data_tokenizer": "/moved/tok"}, rows) is None
    assert "prepared with /moved/tok, which is not a directory here" in caplog.text
    assert export_tokenizer("auto", {"hf_source": {"path": str(no_tokenizer)}}, rows) is None  # a checkpoint before
    assert "no tokenizer written" in caplog.text and "--tokenizer qwen2" in caplog.text
    (source / "tokenizer.json").write_text("{}")
    assert export_tokenizer("auto", {"hf_source": {"path": str(source)}}, rows) == f"loaded {source}"
    assert export_tokenizer("auto", {"data_tokenizer": "/moved/tok", "hf_source": {"path": str(source)}},
                            rows) == f"loaded {source}"
    assert export_tokenizer("none", {"data_tokenizer": "qwen2"}, rows) is None
    assert export_tokenizer(str(tmp_path), {"data_tokenizer": "qwen2"}, rows) == f"loaded {tmp_path}"


def test_auto_writes_the_source_tokenizer_with_its_chat_template_when_it_encodes_as_the_data_s_qwen2(
        tmp_path, caplog, qwen2_tokenizer_dir):
    """A run started from Qwen2.5(-Instruct) weights on data prepared with tokenizer=qwen2: the export carries the
    source's tokenizer (same ids for the Qwen2 vocabulary, plus its chat template and extra special tokens); a
    source tokenizer that encodes otherwise is not written, with a warning that says what is lost."""
    import logging
    import shutil

    from transformers import AutoTokenizer

    from qwen2_dist.cli.convert import export_tokenizer
    from qwen2_dist.model.hf import write_tokenizer

    caplog.set_level(logging.INFO, logger="qwen2_dist")
    source = tmp_path / "qwen2.5-instruct"
    shutil.copytree(qwen2_tokenizer_dir, source)
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    qwen25 = AutoTokenizer.from_pretrained(source)
    qwen25.add_tokens(["<|object_ref_start|>", "<|fim_prefix|>"], special_tokens=True)  # transformers 4 and 5
    qwen25.chat_template = template
    qwen25.save_pretrained(source)
    rows = 151936
    chosen = export_tokenizer("auto", {"data_tokenizer": "qwen2", "hf_source": {"path": str(source)}}, rows)
    assert f"tokenizer: the one of {source}" in caplog.text and "encodes text as qwen2" in caplog.text
    write_tokenizer(chosen, str(tmp_path / "out"), rows)
    written = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert written.chat_template == template and written.convert_tokens_to_ids("<|fim_prefix|>") == 151647

    caplog.clear()
    save_word_tokenizer(tmp_path / "words")
    meta = {"data_tokenizer": "qwen2", "hf_source": {"path": str(tmp_path / "words")}}
    assert export_tokenizer("auto", meta, rows) == "qwen2"
    assert (f"tokenizer: qwen2, which the training data was prepared with, not the one of {tmp_path / 'words'}"
            in caplog.text and "it encodes 'Hello, world!" in caplog.text and "chat template" in caplog.text)
    # The same text, other special tokens: Qwen2's <|im_end|> is not where qwen2 has it.
    config_file = source / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if "added_tokens_decoder" in config:  # transformers 5 writes the added tokens to tokenizer.json only
        config["added_tokens_decoder"]["151645"]["content"] = "<|im_stop|>"
    tokens = json.loads((source / "tokenizer.json").read_text())
    for token in tokens["added_tokens"]:
        token["content"] = token["content"].replace("<|im_end|>", "<|im_stop|>")
    (source / "tokenizer.json").write_text(json.dumps(tokens))
    config_file.write_text(json.dumps(config))
    caplog.clear()
    assert export_tokenizer("auto", {"data_tokenizer": "qwen2", "hf_source": {"path": str(source)}}, rows) == "qwen2"
    assert "its <|im_end|> is id" in caplog.text


def test_an_export_gives_config_json_the_token_ids_of_the_tokenizer_written_beside_it(tmp_path):
    """A run from scratch on data prepared with a tokenizer of its own ends each document with that tokenizer's
    separator: config.json (and the generation config transformers derives from it) must stop there, not at Qwen2's
    <|endoftext|> id, an untrained row of this model; the weights a run started from keep their own ids."""
    from transformers import AutoConfig, GenerationConfig

    from qwen2_dist.data.tokenizer import load_tokenizer
    from qwen2_dist.model.args import get_model_args
    from qwen2_dist.model.hf import native_shapes, write_hf_from

    save_word_tokenizer(tmp_path / "tok")
    assert load_tokenizer(str(tmp_path / "tok")).eos_id == 2  # what qwen2-prepare ended each document with
    small, qwen2 = get_model_args("tiny", vocab_size=128), get_model_args("tiny")
    for name, args, tokenizer, source, expected in (
            ("own", small, str(tmp_path / "tok"), None, (1, 2)),
            ("started", small, str(tmp_path / "tok"), {"bos_token_id": 5, "eos_token_id": 7}, (5, 7)),
            ("qwen2", qwen2, "qwen2", None, (151643, 151643))):
        shapes = native_shapes(args)
        write_hf_from(lambda names: {n: torch.zeros(shapes[n]) for n in names}, args, str(tmp_path / name),
                      1 << 30, torch.float32, source=source, tokenizer=tokenizer)
        config = AutoConfig.from_pretrained(tmp_path / name)
        assert (config.bos_token_id, config.eos_token_id) == expected, name
        assert GenerationConfig.from_model_config(config).eos_token_id == expected[1], name


def test_a_tokenizer_the_model_cannot_hold_or_load_is_refused_before_the_weights_are_read(tmp_path):
    from qwen2_dist.model.hf import write_tokenizer

    with pytest.raises(UserError, match="--tokenizer qwen2: its 151646 tokens do not fit the model's vocab_size"):
        write_tokenizer("qwen2", str(tmp_path), 1000)
    with pytest.raises(UserError, match=r"--tokenizer /no/such/dir: could not load a Hugging Face tokenizer"):
        write_tokenizer("/no/such/dir", str(tmp_path), 151936)


def test_an_export_warns_of_unfinished_exports_left_beside_it_and_syncs_its_files(tmp_path, caplog, monkeypatch):
    from qwen2_dist.model.args import get_model_args
    from qwen2_dist.model.hf import native_shapes, write_hf_from

    args = get_model_args("tiny")
    shapes = native_shapes(args)
    (tmp_path / ".out.tmp-deadbeef").mkdir()  # a killed export's
    synced = record_fsyncs(monkeypatch)
    write_hf_from(lambda names: {n: torch.zeros(shapes[n]) for n in names}, args, str(tmp_path / "out"), 1 << 30,
                  torch.bfloat16)
    assert "1 unfinished export(s)" in caplog.text and ".out.tmp-deadbeef" in caplog.text
    written = sorted(os.listdir(tmp_path / "out"))
    assert set(synced) >= set(written), (written, synced)


def test_a_pickle_checkpoint_without_config_json_is_a_clear_error(tmp_path):
    from qwen2_dist.model.hf import load_hf_model

    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="config.json: missing; a Hugging Face checkpoint directory needs"):
        load_hf_model(str(tmp_path), allow_pickle=True)


def test_weights_of_a_named_size_name_it_as_the_fix(tmp_path, monkeypatch):
    import dataclasses

    from qwen2_dist.model import args as args_module
    from qwen2_dist.model.args import get_model_args

    from omegaconf import OmegaConf

    path = save_hf(make_hf_model("gqa2_untied"), tmp_path / "hf", sharded=False)
    with pytest.raises(UserError, match=r"\(config.json vs job: vocab_size 1000 vs 151936, hidden_size 64 vs 32, .*"
                                        r"\); set the model.\* overrides that match it: model.vocab_size=1000 ") as err:
        hf_module.check_hf_matches(path, get_model_args("tiny"))
    # The overrides given, parsed as the command line parses them, make a job that matches.
    overrides = str(err.value).split("that match it: ")[1].split()
    hf_module.check_hf_matches(path, get_model_args("tiny", **OmegaConf.from_dotlist(overrides).model))
    # As if these were a published size's weights, of an Instruct model (whose context changes no weight).
    args, _ = read_hf_state_dict(path)
    monkeypatch.setitem(args_module.SIZES, "qwen2-small", dataclasses.replace(args, max_position_embeddings=131072))
    with pytest.raises(UserError, match=r"config.json differs from the model being trained \(.*\); set "
                                        r"model=qwen2-small$"):
        hf_module.check_hf_matches(path, get_model_args("tiny"))


@pytest.mark.parametrize("name", ["gqa2_untied", "gqa7_untied_sharded"])
def test_from_hf_writes_the_files_tensors_as_they_are_and_a_load_gives_the_same_model(name, tmp_path):
    """qwen2-convert from-hf writes the weights from views of the mapped files in their own dtype (no fp32 copy of
    the model in memory: for 72B about 290 GB), and a load converts them to the fp32 parameters exactly."""
    import torch.distributed.checkpoint as dcp

    from qwen2_dist.cli.convert import from_hf
    from qwen2_dist.model.qwen2 import build_model
    from qwen2_dist.train import checkpoint

    path = save_hf(make_hf_model(name).to(torch.bfloat16), tmp_path / "hf", sharded="sharded" in name)
    out = from_hf(path, str(tmp_path / "converted"))
    stored = dcp.FileSystemReader(out).read_metadata().state_dict_metadata
    assert {meta.properties.dtype for key, meta in stored.items() if key.startswith("model.")} == {torch.bfloat16}
    args, source = read_hf_state_dict(path)
    model = build_model(args, "cpu")
    checkpoint.load(out, model, None)
    loaded = model.state_dict()
    assert set(loaded) == set(source) and all(torch.equal(loaded[k], source[k].float()) for k in source)
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(tokens) - hf_logits(path, tokens, "eager")).abs().max().item() <= 1e-5


def test_mapped_tensors_are_views_of_the_files_not_copies(tmp_path, monkeypatch):
    import ctypes

    path = save_hf(make_hf_model("gqa7_untied_sharded").to(torch.bfloat16), tmp_path / "hf", sharded=True)
    opened = []
    real = hf_module._MappedSafetensors

    def recording(file):
        opened.append(real(file))
        return opened[-1]

    monkeypatch.setattr(hf_module, "_MappedSafetensors", recording)
    _, mapped = read_hf_state_dict(path, mapped=True)
    _, copied = read_hf_state_dict(path)
    spans = [(ctypes.addressof(ctypes.c_char.from_buffer(m.map)), len(m.map)) for m in opened]
    assert len(spans) == len({f for f in os.listdir(path) if f.endswith(".safetensors")}) > 1
    for name, tensor in mapped.items():
        assert any(base <= tensor.data_ptr() < base + size for base, size in spans), name
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, copied[name])


def test_a_mapped_tensor_of_an_integer_dtype_is_refused_naming_its_file(tmp_path):
    path = save_hf(make_hf_model("mha_tied"), tmp_path / "hf", sharded=False)
    file = os.path.join(path, WEIGHTS_NAME)
    tensors = load_file(file)
    save_file({**tensors, "model.norm.weight": torch.ones(64, dtype=torch.int32)}, file, metadata={"format": "pt"})
    with pytest.raises(UserError, match=rf"^{file}: model.norm.weight has dtype I32; only floating-point weights"):
        read_hf_state_dict(path, mapped=True)


def make_checkpoint(tmp_path) -> tuple[str, dict]:
    """A committed checkpoint converted from random tiny bf16 HF weights (qwen2-convert from-hf), and the weights."""
    from qwen2_dist.cli.convert import from_hf

    model = make_hf_model("gqa2_untied").to(torch.bfloat16)
    path = save_hf(model, tmp_path / "hf", sharded=False)
    return from_hf(path, str(tmp_path / "ckpt")), load_file(os.path.join(path, WEIGHTS_NAME))


def test_the_export_defaults_to_bfloat16_both_dtype_keys_say_so_and_float32_stays_exact(tmp_path):
    """The published Qwen2 weights are bf16, and vLLM's --dtype auto serves a config that says float32 in fp16,
    where Qwen2 can overflow: the export writes bf16 unless told otherwise, and config.json says so under both keys
    (torch_dtype: transformers < 4.56 and tools reading the file; dtype: later transformers, which then warns of
    nothing)."""
    import io
    import logging

    from transformers import AutoConfig

    from qwen2_dist.cli.convert import main as convert_main

    ckpt, source = make_checkpoint(tmp_path)
    for flags, dtype in (([], torch.bfloat16), (["--dtype", "float32"], torch.float32)):
        out = tmp_path / f"out_{dtype}"
        assert convert_main(["to-hf", ckpt, str(out), "--no-checksums", *flags]) == 0
        config = json.loads((out / "config.json").read_text())
        name = str(dtype).removeprefix("torch.")
        assert config["torch_dtype"] == config["dtype"] == name
        written = load_file(out / WEIGHTS_NAME)
        assert written.keys() == source.keys()
        assert all(t.dtype == dtype and torch.equal(t, source[k].to(dtype)) for k, t in written.items())
    messages = io.StringIO()
    handler = logging.StreamHandler(messages)
    logging.getLogger("transformers").addHandler(handler)
    try:
        assert AutoConfig.from_pretrained(tmp_path / "out_torch.bfloat16").dtype == torch.bfloat16
        Qwen2ForCausalLM.from_pretrained(tmp_path / "out_torch.bfloat16", dtype="auto")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert "deprecated" not in messages.getvalue()


def test_the_export_loads_the_tokenizer_before_it_checks_the_checkpoint_s_files(tmp_path, monkeypatch):
    """Checking every file's checksum reads the whole checkpoint (about a TB for 72B with its optimizer state): a
    tokenizer that cannot be written must fail before, in seconds."""
    from qwen2_dist.cli.convert import to_hf
    from qwen2_dist.train import checkpoint

    ckpt, _ = make_checkpoint(tmp_path)

    def verify(*_):
        raise AssertionError("the checkpoint's files were checked before the tokenizer was loaded")

    monkeypatch.setattr(checkpoint, "verify", verify)
    with pytest.raises(UserError, match=rf"--tokenizer {tmp_path}/typo: could not load a Hugging Face tokenizer"):
        to_hf(ckpt, str(tmp_path / "out"), tokenizer=str(tmp_path / "typo"))
    with pytest.raises(UserError, match="--tokenizer qwen2: its 151646 tokens do not fit the model's vocab_size 1000"):
        to_hf(ckpt, str(tmp_path / "out"), tokenizer="qwen2")
    assert not (tmp_path / "out").exists()


def test_an_export_never_replaces_what_another_wrote_at_its_path_meanwhile(tmp_path):
    """Two exports to one path: each checked that it was free when it started; the one that finishes second must
    neither delete the first one's output nor its own, and say where its own is."""
    from qwen2_dist.model.args import get_model_args
    from qwen2_dist.model.hf import native_shapes, write_hf_from

    args = get_model_args("tiny", vocab_size=128)
    shapes = native_shapes(args)
    out = tmp_path / "out"

    def fetch(names):
        if not out.exists():  # the other export finishes while this one is writing
            out.mkdir()
            (out / "config.json").write_text("the other export's")
        return {n: torch.ones(shapes[n]) for n in names}

    with pytest.raises(UserError, match=rf"^{out}: was written by something else .* this output is complete in "
                                        rf"{tmp_path}/\.out\.tmp-\w+: check {out}") as err:
        write_hf_from(fetch, args, str(out), 1 << 30, torch.bfloat16)
    assert os.listdir(out) == ["config.json"] and (out / "config.json").read_text() == "the other export's"
    kept = str(err.value).split("this output is complete in ")[1].split(":")[0]
    assert sorted(os.listdir(kept)) == ["config.json", WEIGHTS_NAME]
    assert args_from_hf_config(json.loads(open(os.path.join(kept, "config.json")).read())) == args


# The published Qwen2 base configs (shared/notes/qwen2-facts.md: the model cards and config.json files), typed in
# here rather than taken from model.args.SIZES, so that a wrong value there fails: hidden, layers, heads, kv heads,
# intermediate, vocabulary rows, tied, rms_norm_eps, and the model card's non-embedding parameters (billions).
PUBLISHED = {
    "qwen2-0.5b": (896, 24, 14, 2, 4864, 151936, True, 1e-6, 0.35),
    "qwen2-1.5b": (1536, 28, 12, 2, 8960, 151936, True, 1e-6, 1.3),
    "qwen2-7b": (3584, 28, 28, 4, 18944, 152064, False, 1e-6, None),
    "qwen2-72b": (8192, 80, 64, 8, 29568, 152064, False, 1e-5, None),
}


@pytest.mark.parametrize("size", PUBLISHED)
def test_the_exported_config_of_each_size_is_the_published_one(size):
    from qwen2_dist.model.qwen2 import build_model

    hidden, layers, heads, kv_heads, inter, vocab, tied, eps, card_params = PUBLISHED[size]
    config = hf_config_from_args(SIZES[size], "bfloat16")
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"],
            config["tie_word_embeddings"], config["rms_norm_eps"]) == (hidden, layers, heads, kv_heads, inter, vocab,
                                                                       tied, eps)
    assert (config["rope_theta"], config["max_position_embeddings"], config["hidden_act"]) == (1e6, 131072, "silu")
    assert (config["bos_token_id"], config["eos_token_id"], config["use_sliding_window"]) == (151643, 151643, False)
    if card_params is not None:  # the model card rounds: 0.35B, 1.3B
        model = build_model(SIZES[size], "meta")
        non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
        assert abs(non_embedding / 1e9 - card_params) < 0.05, non_embedding
