"""LoRA out (issue 22, items 5 and 6): PEFT adapter folders that real PEFT loads, merged HF
checkpoints, and the base fingerprint a LoRA checkpoint records.

The oracle is PEFT itself: `get_peft_model` on a tiny transformers GptOssForCausalLM gives
the reference names and shapes, `PeftModel.from_pretrained` loads what we write, and its
logits are compared with transformers running our merged weights."""

from __future__ import annotations

import json

import pytest
import torch
from hf_reference import build_hf_model
from tolerances import assert_close_to_scale, scaled_error

from runtime.hf.adapter import (CONFIG_FILE, WEIGHTS_FILE, adapter_config, base_key, lora_keys,
                                peft_state_dict, write_adapter)
from runtime.hf.fingerprint import header_fingerprint
from runtime.hf.keymap import hf_state_dict_to_runtime, runtime_state_dict_to_hf
from runtime.model.lora import fold
from runtime.model.lora_spec import lora_scaling
from runtime.model import ModelArgs

peft = pytest.importorskip("peft")

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=96,
                 moe_inter_dim=32, num_experts=4, top_k=2, sliding_window=4)
DENSE = ("wq", "wk", "wv", "wo")


def random_adapters(args: ModelArgs, rank: int, layers=None, dense=DENSE,
                    experts=("mlp1", "mlp2"), seed: int = 0) -> dict[str, torch.Tensor]:
    """Runtime-layout LoRA tensors (A and B both non-zero so every index matters)."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"wq": (args.n_heads * args.head_dim, args.dim),
             "wk": (args.n_kv_heads * args.head_dim, args.dim),
             "wv": (args.n_kv_heads * args.head_dim, args.dim),
             "wo": (args.dim, args.n_heads * args.head_dim),
             "mlp1": (2 * args.moe_inter_dim, args.dim), "mlp2": (args.dim, args.moe_inter_dim)}
    out = {}
    for i in range(args.n_layers) if layers is None else layers:
        for name in dense:
            fan_out, fan_in = sizes[name]
            out[f"layers.{i}.attention.{name}.lora_A"] = torch.randn(rank, fan_in, generator=g)
            out[f"layers.{i}.attention.{name}.lora_B"] = torch.randn(fan_out, rank, generator=g)
        for name in experts:
            fan_out, fan_in = sizes[name]
            e = args.num_experts
            out[f"layers.{i}.moe.experts.{name}_lora_A"] = torch.randn(e, rank, fan_in, generator=g)
            out[f"layers.{i}.moe.experts.{name}_lora_B"] = torch.randn(e, fan_out, rank, generator=g)
    return {k: v * 0.1 for k, v in out.items()}


def merged_hf_state(hf_model, adapters, scale) -> dict[str, torch.Tensor]:
    """The HF model's weights with the adapters folded in (through our runtime layout)."""
    runtime = hf_state_dict_to_runtime(hf_model.state_dict())
    for key in {base_key(k) for k in adapters}:
        a, b = lora_keys(key)
        runtime[key] = fold(runtime[key], adapters[a], adapters[b], scale)
    return runtime_state_dict_to_hf(runtime)


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_model(ARGS, seed=5)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))


def _peft_reference(hf_model, config: dict):
    """get_peft_model with the LoraConfig our adapter_config.json describes."""
    import copy

    fields = {k: config[k] for k in ("r", "lora_alpha", "use_rslora", "lora_dropout",
                                     "target_modules", "target_parameters")}
    return peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(**fields))


@pytest.mark.parametrize("layers, dense, experts", [
    (None, DENSE, ("mlp1", "mlp2")),       # the default targets on every layer
    ([1], ("wq", "wo"), ("mlp2",)),        # a layer subset, one expert stack (no nesting)
    ([0], (), ("mlp1",)),                  # experts only
])
def test_names_and_shapes_are_peft_own(hf_model, layers, dense, experts):
    adapters = random_adapters(ARGS, 3, layers, dense, experts)
    config = adapter_config(adapters, ARGS.n_layers, rank=3, alpha=6)
    reference = peft.get_peft_model_state_dict(_peft_reference(hf_model, config))
    ours = peft_state_dict(adapters)
    assert {k: tuple(v.shape) for k, v in ours.items()} == \
        {f"base_model.model.{k.removeprefix('base_model.model.')}": tuple(v.shape)
         for k, v in reference.items()}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_loads_the_adapter_with_the_merged_logits(hf_model, tokens, tmp_path, use_rslora):
    """PeftModel.from_pretrained(our folder) computes what transformers computes with the
    adapters folded into the weights by us: the expert layout (reshape of A, permute of B,
    nesting) and the scaling agree with PEFT's."""
    rank, alpha = 2, 5.0
    adapters = random_adapters(ARGS, rank)
    path = write_adapter(tmp_path / "adapter", adapters, ARGS.n_layers, rank=rank, alpha=alpha,
                         use_rslora=use_rslora, dtype=torch.float32)
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    import copy

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), path).eval()
    merged = copy.deepcopy(hf_model)
    merged.load_state_dict(merged_hf_state(hf_model, adapters, lora_scaling(rank, alpha, use_rslora)))
    with torch.no_grad():
        got, want = loaded(tokens).logits, merged(tokens).logits
        base = hf_model(tokens).logits
    assert_close_to_scale(got, want, 1e-5, "PEFT vs merged logits")
    assert scaled_error(base, want) > 1e-2  # negative control: the adapters change the logits


def test_a_wrong_expert_layout_is_caught(hf_model, tokens, tmp_path):
    """Negative control of the layout test: B written rank-major (the easy mistake) loads
    in PEFT without complaint but computes something else."""
    import copy

    import runtime.hf.adapter as adapter

    adapters = random_adapters(ARGS, 2, dense=())
    real = adapter._to_param_wrapper

    def wrong(which, tensor):
        if which == "B":
            return tensor.permute(1, 0, 2).reshape(tensor.shape[1], -1)  # column e * r + k
        return real(which, tensor)

    adapter._to_param_wrapper = wrong
    try:
        path = write_adapter(tmp_path / "adapter", adapters, ARGS.n_layers, rank=2, alpha=2)
    finally:
        adapter._to_param_wrapper = real
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), path).eval()
    merged = copy.deepcopy(hf_model)
    merged.load_state_dict(merged_hf_state(hf_model, adapters, lora_scaling(2, 2)))
    with torch.no_grad():
        assert scaled_error(loaded(tokens).logits, merged(tokens).logits) > 1e-3


def test_adapter_config_is_a_lora_config(tmp_path):
    adapters = random_adapters(ARGS, 2, layers=[0], dense=("wq",))
    path = write_adapter(tmp_path / "a", adapters, ARGS.n_layers, rank=2, alpha=4, dropout=0.1,
                         base_model="/ckpt/gpt-oss-20b")
    config = json.loads((path / CONFIG_FILE).read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    assert config["target_parameters"] == ["model.layers.0.mlp.experts.down_proj",
                                           "model.layers.0.mlp.experts.gate_up_proj"]
    assert config["lora_dropout"] == 0.0  # PEFT refuses dropout on parameter targets
    assert config["base_model_name_or_path"] == "/ckpt/gpt-oss-20b"
    loaded = peft.LoraConfig.from_pretrained(str(path))
    assert (loaded.r, loaded.lora_alpha) == (2, 4)


def test_rewrite_replaces_the_folder_whole(tmp_path):
    path = tmp_path / "adapter"
    write_adapter(path, random_adapters(ARGS, 2), ARGS.n_layers, rank=2, alpha=2)
    (path / "stale.txt").write_text("from an older export")
    write_adapter(path, random_adapters(ARGS, 2, seed=1), ARGS.n_layers, rank=2, alpha=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert not (path / "stale.txt").exists()


def test_fold_is_the_float64_product():
    g = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(*s, generator=g) for s in ((11, 5, 7), (11, 3, 7), (11, 5, 3)))
    got = fold(w.bfloat16(), a, b, 0.5, experts_per_chunk=4)
    want = w.bfloat16().double() + 0.5 * b.double() @ a.double()
    assert got.dtype == torch.float32
    assert_close_to_scale(got, want, 1e-6, "fold")


# ---------------------------------------------------------------------------- fingerprint
def test_fingerprint_sees_layout_not_paths(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "a")
    hf_model.save_pretrained(tmp_path / "b")
    first = header_fingerprint(tmp_path / "a")
    assert first.startswith("sha256:") and first == header_fingerprint(tmp_path / "b")
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "c")  # another dtype
    hf_model.float()
    assert header_fingerprint(tmp_path / "c") != first


def test_fingerprint_reads_headers_only(hf_model, tmp_path, monkeypatch):
    hf_model.save_pretrained(tmp_path / "a")
    sizes = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if str(path).endswith(".safetensors"):
            real_read = f.read

            class Reader:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    f.close()

                def read(self, n=-1):
                    data = real_read(n)
                    sizes.append(len(data))
                    return data
            return Reader()
        return f

    import runtime.hf.fingerprint as fp

    monkeypatch.setattr(fp, "open", counting_open, raising=False)
    fp.header_fingerprint(tmp_path / "a")
    total = sum(p.stat().st_size for p in (tmp_path / "a").glob("*.safetensors"))
    assert sizes and sum(sizes) < total / 10


def test_fingerprint_of_garbage_is_one_line(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        header_fingerprint(tmp_path)


@pytest.mark.parametrize("extra", [("router",), ("norms",), ("embeddings", "output")])
def test_trainable_extra_round_trips_through_peft_modules_to_save(hf_model, tokens, tmp_path,
                                                                  extra):
    """lora.trainable_extra -> PEFT modules_to_save: PeftModel.from_pretrained(our folder)
    computes what transformers computes on the base with those modules replaced and the
    adapters folded in, and PEFT's own state dict of what it loaded is our file."""
    import copy

    from safetensors.torch import load_file

    from runtime.model.lora_spec import is_trainable_extra

    adapters = random_adapters(ARGS, 2)
    g = torch.Generator().manual_seed(3)
    base = hf_state_dict_to_runtime(hf_model.state_dict())
    trained = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in base.items()
               if is_trainable_extra(k, extra)}
    assert trained
    path = write_adapter(tmp_path / "adapter", {**adapters, **trained}, ARGS.n_layers, rank=2,
                         alpha=4, dtype=torch.float32)
    assert json.loads((path / CONFIG_FILE).read_text())["modules_to_save"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), path).eval()
    want_model = copy.deepcopy(hf_model)
    replaced = copy.deepcopy(hf_model)
    replaced.load_state_dict(runtime_state_dict_to_hf({**base, **trained}))
    want_model.load_state_dict(merged_hf_state(replaced, adapters, lora_scaling(2, 4)))
    with torch.no_grad():
        got, want = loaded(tokens).logits, want_model(tokens).logits
        without = copy.deepcopy(hf_model)
        without.load_state_dict(merged_hf_state(hf_model, adapters, lora_scaling(2, 4)))
        control = without(tokens).logits
    assert_close_to_scale(got, want, 1e-5, "PEFT with modules_to_save vs replaced + merged")
    assert scaled_error(control, want) > 1e-3  # negative control: the extras matter
    ours = load_file(str(path / WEIGHTS_FILE))
    again = peft.get_peft_model_state_dict(loaded)
    assert sorted(again) == sorted(ours)
    for key, value in ours.items():
        assert torch.equal(again[key], value), key
