"""HF checkpoint interop: transformers <-> runtime both ways, MXFP4, bad input, convert CLI.

The oracle is always transformers itself: its `save_pretrained` files, its `from_pretrained`
and its own MXFP4 dequantization (`convert_moe_packed_tensors`).
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from hf_reference import build_hf_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from runtime.hf import load_hf, save_hf
from runtime.hf.config import model_args_to_hf_config
from runtime.hf.convert import main as convert_main
from runtime.hf.keymap import hf_to_runtime_key, hf_to_runtime_tensor, runtime_to_hf_key
from runtime.hf.load import load_hf_into
from runtime.hf.mxfp4 import dequantize_mxfp4, dequantize_mxfp4_hf_layout, quantize_mxfp4
from runtime.hf.reader import INDEX_NAME
from runtime.hf.save import _plan_shards, parse_size
from runtime.model import GptOssModel, ModelArgs

# Expert dims are multiples of 32 so the same model also exists in MXFP4.
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=96,
                 moe_inter_dim=32, num_experts=4, top_k=2, sliding_window=4)
RUNTIME = {"compute_dtype": "float32", "attn_backend": "math"}  # exact fp32 math for comparisons


# ---------------------------------------------------------------------------- fixtures/helpers
@pytest.fixture(scope="module")
def hf_model():
    return build_hf_model(ARGS, seed=3)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_fp32")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, ARGS.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))


def _hf_from_pretrained(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                experts_implementation="eager", **kwargs).eval()


def _random_runtime_model(args: ModelArgs = ARGS, seed: int = 0) -> GptOssModel:
    """Runtime-initialized weights with non-zero biases/sinks, so every tensor matters."""
    torch.manual_seed(seed)
    model = GptOssModel(args.replace(**RUNTIME))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.copy_(torch.randn_like(p) * 0.5)
            elif "experts.mlp" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def _read_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory (index or single file)."""
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _shards(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    index = json.loads((path / INDEX_NAME).read_text())
    return {name: load_file(path / name) for name in sorted(set(index["weight_map"].values()))}


def _write_shards(path: Path, shards: dict[str, dict[str, torch.Tensor]], update_index: bool = True) -> None:
    for name, tensors in shards.items():
        save_file(tensors, path / name)
    if update_index:
        index = json.loads((path / INDEX_NAME).read_text())
        index["weight_map"] = {k: name for name, tensors in shards.items() for k in tensors}
        (path / INDEX_NAME).write_text(json.dumps(index))


def _shard_of(shards, hf_key: str) -> str:
    return next(name for name, tensors in shards.items() if hf_key in tensors)


def _write_mxfp4_checkpoint(hf_model, path: Path) -> None:
    """Like the openai/gpt-oss releases: experts as *_blocks/*_scales uint8, the rest bf16,
    two shards plus an index, quantization_config in config.json."""
    shards: dict[str, dict[str, torch.Tensor]] = {"model-00001-of-00002.safetensors": {},
                                                  "model-00002-of-00002.safetensors": {}}
    for hf_key, tensor in hf_model.state_dict().items():
        shard = shards["model-00001-of-00002.safetensors" if ".layers.0." in hf_key
                       else "model-00002-of-00002.safetensors"]
        if hf_key.endswith(("gate_up_proj", "down_proj")):
            # HF [E, in, out] -> stored [E, out, in // 32, 16]: quantized along the input dim.
            blocks, scales = quantize_mxfp4(tensor.transpose(1, 2))
            shard[f"{hf_key}_blocks"], shard[f"{hf_key}_scales"] = blocks, scales
        else:
            shard[hf_key] = tensor.to(torch.bfloat16).contiguous()
    path.mkdir(parents=True, exist_ok=True)
    for name, tensors in shards.items():
        save_file(tensors, path / name, metadata={"format": "pt"})
    weight_map = {k: name for name, tensors in shards.items() for k in tensors}
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {**model_args_to_hf_config(ARGS), "quantization_config": {"quant_method": "mxfp4"}}
    (path / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------- MXFP4 math
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_bitwise_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 6, 4, 16), dtype=torch.uint8, generator=gen)  # every nibble
    scales = torch.randint(0, 255, (3, 6, 4), dtype=torch.uint8, generator=gen)  # every exponent but NaN
    scales[0, 0, :3] = torch.tensor([0, 127, 254], dtype=torch.uint8)  # subnormal, 1, overflow
    expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, G*32, R]
    ours = dequantize_mxfp4_hf_layout(blocks, scales, dtype)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape == (3, 128, 6)
    int_type = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(ours.view(int_type), expected.view(int_type))  # bitwise, incl. -0.0 and inf
    # The runtime layout is the untransposed one.
    assert torch.equal(dequantize_mxfp4(blocks, scales, dtype), expected.transpose(1, 2))


def test_quantize_round_trips_fp4_values_and_bounds_error():
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 5, 3, 16), dtype=torch.uint8, generator=gen)
    blocks[..., 0] = 0x07  # each block holds a 6.0, so the OCP exponent choice is the stored one
    scales = torch.randint(100, 150, (2, 5, 3), dtype=torch.uint8, generator=gen)
    again = quantize_mxfp4(dequantize_mxfp4(blocks, scales))
    assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)

    x = torch.randn(4, 96, generator=gen)
    q = dequantize_mxfp4(*quantize_mxfp4(x))
    block_max = x.abs().reshape(4, 3, 32).amax(-1).repeat_interleave(32, dim=1)
    assert ((q - x).abs() <= block_max / 4).all()  # half of the widest FP4 gap (4 -> 6)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(2, 40))


# ---------------------------------------------------------------------------- transformers <-> runtime
def test_transformers_checkpoint_loads_with_identical_logits(hf_model, hf_dir, tokens):
    model = load_hf(hf_dir, model_args_overrides=RUNTIME, progress=False)
    params = dict(model.named_parameters())
    hf_state = hf_model.state_dict()
    assert len(hf_state) == len(params)  # every parameter loaded, nothing extra
    for hf_key, tensor in hf_state.items():
        key = hf_to_runtime_key(hf_key)
        assert torch.equal(params[key], hf_to_runtime_tensor(key, tensor)), key
    assert all(not layer.moe.expert_bias.any() for layer in model.layers.values())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model(input_ids=tokens).logits, atol=1e-5, rtol=0)


def test_save_hf_loads_in_transformers_with_identical_logits(tmp_path, tokens):
    model = _random_runtime_model()
    save_hf(model, tmp_path, dtype=torch.float32, max_shard_size="40KB", progress=False)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    hf = _hf_from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=tokens).logits, model(tokens), atol=1e-5, rtol=0)


def test_bf16_round_trip_is_exact(hf_model, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(src)
    model = load_hf(src, progress=False)  # fp32 master weights: bf16 -> fp32 is exact
    save_hf(model, dst, progress=False)  # bf16 by default
    before, after = _read_dir(src), _read_dir(dst)
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        assert after[key].dtype == torch.bfloat16 and torch.equal(after[key], tensor), key
    assert _hf_from_pretrained(dst).dtype == torch.bfloat16
    half = load_hf(dst, dtype=torch.bfloat16, progress=False)  # bf16 parameters, fp32 RoPE buffer
    assert half.rope.inv_freq.dtype == torch.float32
    for name, p in half.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, dict(model.named_parameters())[name].bfloat16())


@pytest.mark.parametrize("writer", ["by_hand", "save_hf"])
def test_mxfp4_checkpoint_dequantizes_like_transformers(hf_model, tmp_path, tokens, writer):
    from transformers import Mxfp4Config
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    if writer == "by_hand":
        _write_mxfp4_checkpoint(hf_model, tmp_path)
    else:
        save_hf(load_hf(_saved(hf_model, tmp_path / "dense"), progress=False), tmp_path,
                experts_format="mxfp4", progress=False)
    stored = _read_dir(tmp_path)
    assert stored["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (4, 64, 2, 16)  # [E, 2F, D/32, 16]
    assert stored["model.layers.0.mlp.experts.down_proj_scales"].dtype == torch.uint8

    model = load_hf(tmp_path, model_args_overrides=RUNTIME, progress=False)
    params = dict(model.named_parameters())
    for i in range(ARGS.n_layers):
        for proj, ours in (("gate_up_proj", "mlp1_weight"), ("down_proj", "mlp2_weight")):
            prefix = f"model.layers.{i}.mlp.experts.{proj}"
            hf_values = convert_moe_packed_tensors(stored[f"{prefix}_blocks"], stored[f"{prefix}_scales"],
                                                   dtype=torch.float32)  # HF layout [E, in, out]
            assert torch.equal(params[f"layers.{i}.moe.experts.{ours}"], hf_values.transpose(1, 2)), prefix

    # End to end: transformers' own MXFP4 load path (dequantized on CPU) gives our logits.
    hf = _hf_from_pretrained(tmp_path, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(input_ids=tokens).logits, atol=1e-5, rtol=0)


def _saved(hf_model, path: Path) -> Path:
    hf_model.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------- loading into models
def test_load_into_wrapped_model_and_pipeline_stage(hf_model, hf_dir):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    reference = load_hf(hf_dir, progress=False)
    with torch.device("meta"):
        model = GptOssModel(ARGS)
    model.layers["1"] = checkpoint_wrapper(model.layers["1"])  # names gain _checkpoint_wrapped_module
    del model.layers["0"]  # a later pipeline stage: no embeddings, no layer 0
    model.tok_embeddings = None
    model.to_empty(device="cpu")
    load_hf_into(model, hf_dir, progress=False)
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, ref[name.replace("_checkpoint_wrapped_module.", "")]), name
    torch.testing.assert_close(model.rope.inv_freq, reference.rope.inv_freq)  # buffers refilled
    with pytest.raises(ValueError, match=r"no parameter tok_embeddings.weight \(a pipeline stage\?\)"):
        save_hf(model, "/nonexistent/never-written")


def test_repo_id_resolves_from_the_hub_cache_without_network(hf_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--acme--tiny-gpt-oss"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(hf_dir, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = load_hf("acme/tiny-gpt-oss", progress=False)
    assert model.args.num_experts == ARGS.num_experts
    with pytest.raises(FileNotFoundError, match="acme/absent: not a local directory.*allow_download=True"):
        load_hf("acme/absent", progress=False)


# ---------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    save_hf(_random_runtime_model(), path, dtype=torch.float32, max_shard_size="60KB", progress=False)
    assert len(list(path.glob("*.safetensors"))) >= 3
    return path


@pytest.fixture
def bad_dir(good_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(good_dir, path)
    return path


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_missing_shard(bad_dir):
    shards = _shards(bad_dir)
    victim = _shard_of(shards, "model.layers.1.self_attn.sinks")
    (bad_dir / victim).unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_hf(bad_dir, progress=False)
    assert victim in _one_line(err) and "for tensor model." in str(err.value)


def test_wrong_shape(bad_dir):
    shards = _shards(bad_dir)
    key = "model.layers.1.self_attn.q_proj.weight"
    name = _shard_of(shards, key)
    shards[name][key] = torch.zeros(3, 5)
    _write_shards(bad_dir, shards)
    with pytest.raises(ValueError, match=rf"{name}: tensor {key} holds .* shape \[3, 5\].*expects \[64, 64\]") as err:
        load_hf(bad_dir, progress=False)
    _one_line(err)


def test_unknown_key(bad_dir):
    shards = _shards(bad_dir)
    name = next(iter(shards))
    shards[name]["model.layers.0.mlp.shared_expert.weight"] = torch.zeros(2)
    _write_shards(bad_dir, shards)
    with pytest.raises(ValueError, match=rf"{name}: unknown tensor model.layers.0.mlp.shared_expert.weight") as err:
        load_hf(bad_dir, progress=False)
    _one_line(err)


def test_tensor_of_a_layer_the_config_does_not_have(bad_dir):
    shards = _shards(bad_dir)
    name = next(iter(shards))
    shards[name]["model.layers.2.self_attn.sinks"] = torch.zeros(4)
    _write_shards(bad_dir, shards)
    with pytest.raises(ValueError, match=r"tensor model.layers.2.self_attn.sinks does not exist .* n_layers=2"):
        load_hf(bad_dir, progress=False)


def test_missing_tensor(bad_dir):
    shards = _shards(bad_dir)
    key = "model.layers.1.mlp.experts.down_proj"
    del shards[_shard_of(shards, key)][key]
    _write_shards(bad_dir, shards)
    with pytest.raises(ValueError, match=rf"{INDEX_NAME}: missing tensor {key} \(or {key}_blocks/_scales\)") as err:
        load_hf(bad_dir, progress=False)
    _one_line(err)


def test_index_names_a_tensor_the_shard_lacks(bad_dir):
    shards = _shards(bad_dir)
    key = "model.norm.weight"
    name = _shard_of(shards, key)
    del shards[name][key]
    _write_shards(bad_dir, shards, update_index=False)
    with pytest.raises(ValueError, match=rf"{name}: tensor {key} listed in {INDEX_NAME} is not in the file"):
        load_hf(bad_dir, progress=False)


def test_mxfp4_blocks_without_scales_and_duplicates(hf_model, tmp_path):
    _write_mxfp4_checkpoint(hf_model, tmp_path)
    shards = _shards(tmp_path)
    key = "model.layers.0.mlp.experts.down_proj"
    name = _shard_of(shards, f"{key}_scales")
    scales = shards[name].pop(f"{key}_scales")
    _write_shards(tmp_path, shards)
    with pytest.raises(ValueError, match=rf"{name}: tensor {key}_blocks has no matching {key}_scales"):
        load_hf(tmp_path, progress=False)
    shards[name][f"{key}_scales"] = scales
    shards[name][key] = torch.zeros(4, 32, 64)  # the dense tensor too: ambiguous
    _write_shards(tmp_path, shards)
    with pytest.raises(ValueError, match=rf"duplicates {key} "):
        load_hf(tmp_path, progress=False)


def test_config_mismatch_raises_before_touching_the_model(good_dir):
    model = _random_runtime_model(ARGS.replace(num_experts=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"config.json: num_local_experts=4 but the model has "
                                         r"ModelArgs.num_experts=8") as err:
        load_hf_into(model, good_dir, progress=False)
    _one_line(err)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no partial load


def test_shape_error_is_not_a_partial_load(bad_dir):
    shards = _shards(bad_dir)
    key = "model.norm.weight"  # the last tensor: everything else would load first if we were sloppy
    shards[_shard_of(shards, key)][key] = torch.zeros(7)
    _write_shards(bad_dir, shards)
    model = _random_runtime_model(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=key):
        load_hf_into(model, bad_dir, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_inputs(tmp_path, good_dir):
    with pytest.raises(FileNotFoundError, match="/nonexistent/dir: no such checkpoint directory"):
        load_hf("/nonexistent/dir")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors.index.json and no \*.safetensors"):
        load_hf(tmp_path)
    no_config = tmp_path / "no_config"
    shutil.copytree(good_dir, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        load_hf(no_config, progress=False)
    load_hf_into(_random_runtime_model(), no_config, progress=False)  # shapes alone suffice here


# ---------------------------------------------------------------------------- convert CLI
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_convert_cli_round_trip(hf_dir, tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    dcp_dir, out = tmp_path / "dcp", tmp_path / "hf"
    assert convert_main(["hf-to-dcp", str(hf_dir), str(dcp_dir), "--no-progress"]) == 0
    assert convert_main(["dcp-to-hf", str(dcp_dir), str(out), "--dtype", "float32",
                         "--config-json", str(hf_dir), "--no-progress"]) == 0
    original = _read_dir(hf_dir)
    converted = _read_dir(out)
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[k], converted[k]) for k in original)

    # A full trainer checkpoint: "model" plus optimizer/state entries that must not be read.
    model = load_hf(hf_dir, progress=False)
    state = {"model": model.state_dict(), "optimizer": {"state.x": torch.ones(3)}, "train_state": {"step": 7}}
    full = tmp_path / "trainer_step7"
    dcp.save(state, checkpoint_id=str(full), no_dist=True)
    out2 = tmp_path / "hf2"
    assert convert_main(["dcp-to-hf", str(full), str(out2), "--no-progress"]) == 0  # shapes -> args
    assert "inferred from shapes" in capsys.readouterr().err
    converted = _read_dir(out2)
    assert all(torch.equal(original[k].to(torch.bfloat16), converted[k]) for k in original)
    assert json.loads((out2 / "config.json").read_text())["num_local_experts"] == ARGS.num_experts

    # Errors: one line on stderr, exit code 2.
    assert convert_main(["dcp-to-hf", str(full), str(out2)]) == 2
    assert "destination exists and is not empty" in capsys.readouterr().err
    assert convert_main(["dcp-to-hf", str(full), str(tmp_path / "x"), "--flavor", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.tok_embeddings.weight has shape [96, 64]" in err


def test_shard_size_parsing_and_plan():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("five gigs")
    sizes = {"a": 4, "b": 4, "c": 10, "d": 1}
    assert _plan_shards(list(sizes), sizes, 8) == [["a", "b"], ["c"], ["d"]]
    assert runtime_to_hf_key("layers.0.moe.experts.mlp1_weight") == "model.layers.0.mlp.experts.gate_up_proj"
