"""Float8 / MXFP8 training (torchao, runtime/model/quantize.py) and the async-TP switch
(runtime/parallel/tensor_parallel.py).

Training runs (tiny flavor: dim 64, heads 4 x 16, kv 2 x 16, experts 4 x hidden 64, so every
GEMM dimension is a multiple of 16 and 32; seq_len 32, fp32 master weights and compute,
global batch 4, 3 optimizer steps, the same seed checkpoint, quantize.emulate=true):

  reference   fp32, 1 process
  float8      tensorwise and rowwise: attention linears are Float8Linear (emulated casts,
              high-precision matmul); the output head and router stay fp32 (filter_fqns);
              the experts stay fp32 (torchao has no emulated float8 grouped GEMM: warned)
  mxfp8       attention wq/wo as MXFP8Linear and the experts' grouped GEMMs through torchao's
              emulated MXFP8 kernels (bf16 outputs); wk/wv filtered so that the TP=2 run
              below quantizes the same modules (their 16 output features per TP rank are
              less than one 32-element MX block)
  fsdp2_ag    float8 tensorwise with quantize.enable_fsdp_float8_all_gather on 2 ranks:
              FSDP all-gathers float8 weights (recorded by a hook), scales precomputed
              after each optimizer step
  tp2         float8 tensorwise under TP=2: torchao's float8 TP styles (the sequence-parallel
              all-gather of the attention input moves float8: recorded by a hook; gloo has
              no float8 all-gather, so the hook sends the float8 bytes as uint8)
  tp2_mx      mxfp8 under TP=2 (MXFP8Linear on the rank-local shards)

Tolerances, measured on this machine and why:
- Quantized vs fp32 reference: losses within 2e-3 relative per step (observed <= 1.1e-4:
  the tiny model's loss is ~ln(vocab) and moves little in 3 steps, so quantization noise
  in the logits barely shows), grad norms within 3e-2 relative (observed <= 4.1e-3: e4m3
  keeps 3 mantissa bits, ~3% relative error per element). The losses must also differ
  from the reference: the quantized path really ran.
- Distributed float8/mxfp8 vs the single-process quantized run: the same tolerances
  (observed: fsdp2_ag 1.6e-4 / 4.1e-3, each rank takes tensorwise activation scales over
  its own half batch; tp2 4.2e-5 / 1.9e-3, the scales are global (DTensor amax reductions)
  but the sharded fp32 sums round differently and float8 rounding turns those last-bit
  differences into whole e4m3 steps; tp2_mx 4.5e-5 / 5.3e-4, the emulated grouped GEMM also
  rounds each rank's partial expert sum to bf16). With the experts also filtered, mxfp8
  TP=2 vs 1 process agrees to 2e-7 / 2e-5 (not a test: it costs another run).
Everything else is in-process: which modules are converted, state dicts, token-group
padding, TP style selection, and the exact one-line refusals.
Runtime: ~48 s on a shared 2-core machine (1 seed + 4 single-process + 3 two-rank runs,
~3 s / ~9 s each, mostly process start-up and imports; the in-process tests take ~2 s).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from parallel_harness import BASE, run_distributed, run_single, seeded, summarize
from torch import nn

from runtime.model import GptOssModel
from runtime.parallel.parallelize import parallelize
from runtime.errors import ConfigError
from runtime.train.config.job import parallel_dims

# Every test here needs torchao (the async-TP ones import runtime.model.quantize's torchao
from runtime.train.config.loader import load_config
# paths too); without it the whole module is skipped with this reason, the GPU test included.
torchao = pytest.importorskip("torchao", reason="needs torchao (pip install torchao; the GPU test "
                                                "image has none: carry it as a wheel)")

STEPS = 3
EMULATE = ["--quantize.emulate=true"]
F8 = ["--quantize.mode=float8", *EMULATE]
MX = ["--quantize.mode=mxfp8", *EMULATE, "--quantize.filter_fqns=output,router,wk,wv"]
TP2 = ["--parallelism.tensor_parallel_degree=2", "--parallelism.data_parallel_shard_degree=1"]
LOSS_RTOL, GRAD_NORM_RTOL = 2e-3, 3e-2
MARKS_ENV = "QUANTIZE_TEST_MARKS"


# --------------------------------------------------------------------------- helpers

def cfg_of(*overrides: str):
    return load_config(None, ["--model.flavor=tiny", "--training.device=cpu", *overrides])


def built(*overrides: str, device: str = "cpu"):
    """parallelize()'s record of the tiny model on meta (one process, no mesh)."""
    cfg = cfg_of(*overrides)
    with torch.device("meta"):
        model = GptOssModel(cfg.model_args())
    return parallelize(model, parallel_dims(cfg, 1), cfg, torch.device(device))


def build(*overrides: str, device: str = "cpu"):
    """The tiny model on meta after parallelize() (one process, no mesh)."""
    return built(*overrides, device=device).model


def close(ref: list[float], got: list[float], rtol: float) -> list[str]:
    return [f"step {i + 1}: {a!r} vs {b!r} (rel {abs(a - b) / abs(a):.1e} > {rtol:.0e})"
            for i, (a, b) in enumerate(zip(ref, got, strict=True)) if abs(a - b) > rtol * abs(a)]


def assert_close_runs(ref: dict, got: dict, what: str) -> None:
    problems = close(ref["losses"], got["losses"], LOSS_RTOL)
    problems += close(ref["grad_norms"], got["grad_norms"], GRAD_NORM_RTOL)
    assert not problems, f"{what}: {summarize(ref, got)}\n  " + "\n  ".join(problems)
    print(f"{what}: {summarize(ref, got)}")


def marks(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


# --------------------------------------------------------------------------- hooks (in ranks)

def _mark(name: str) -> None:
    directory = os.environ.get(MARKS_ENV)
    if directory:
        Path(directory, name).touch()


def record_fsdp_float8(rank: int, world_size: int) -> None:
    """Record that FSDP all-gathers float8 weights and that the trainer precomputes scales."""
    from torchao import float8
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    pre_all_gather = WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather

    @functools.wraps(pre_all_gather)  # FSDP checks the signature
    def recording_pre_all_gather(self, *args, **kwargs):
        inputs, meta = pre_all_gather(self, *args, **kwargs)
        _mark(f"fsdp-all-gather-{inputs[0].dtype}".replace("torch.", ""))
        return inputs, meta

    precompute = float8.precompute_float8_dynamic_scale_for_fsdp

    def recording_precompute(module):
        _mark("precompute-scales")
        return precompute(module)

    WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather = recording_pre_all_gather
    float8.precompute_float8_dynamic_scale_for_fsdp = recording_precompute


def gloo_float8_collectives(rank: int, world_size: int) -> None:
    """Test-only backend: gloo has no float8 dtype, so torchao's float8 all-gather (TP
    styles) sends the float8 bytes as uint8; records that it ran."""
    from torch.distributed import _functional_collectives as funcol  # noqa: F401 (registers ops)
    from torchao.float8 import float8_ops
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    c10d = torch.ops._c10d_functional

    def as_uint8(aten_op, args, kwargs=None):
        t = args[0]
        if aten_op == c10d.all_gather_into_tensor.default:
            _mark(f"tp-all-gather-{t._data.dtype}".replace("torch.", ""))
        out = aten_op(t._data.contiguous().view(torch.uint8), *args[1:], **(kwargs or {}))
        return Float8TrainingTensor(out.view(t._data.dtype), t._scale, t._orig_dtype,
                                    t._linear_mm_config, t._gemm_input_role)

    for op in (c10d.all_gather_into_tensor.default, c10d.wait_tensor.default):
        float8_ops.FLOAT8_OPS_TABLE[op] = as_uint8


# --------------------------------------------------------------------------- training runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    common = seeded(BASE, root / "seed") + ["--training.global_batch_size=4"]
    single = common + ["--training.local_batch_size=4"]
    return {
        "common": common,
        "reference": run_single(single, STEPS),
        "float8-tensorwise": run_single(single + F8, STEPS),
        "float8-rowwise": run_single(single + F8 + ["--quantize.float8_recipe=rowwise"], STEPS),
        "mxfp8": run_single(single + MX, STEPS),
    }


@pytest.mark.parametrize("name", ["float8-tensorwise", "float8-rowwise", "mxfp8"])
def test_emulated_training_stays_close_to_fp32(runs, name):
    ref, got = runs["reference"], runs[name]
    assert got["losses"] != ref["losses"], f"{name}: identical to fp32, nothing was quantized"
    assert_close_runs(ref, got, f"{name} vs fp32")


def test_fsdp_float8_all_gather(runs, tmp_path, monkeypatch):
    monkeypatch.setenv(MARKS_ENV, str(tmp_path))
    got = run_distributed(2, runs["common"] + F8 + [
        "--training.local_batch_size=2", "--quantize.enable_fsdp_float8_all_gather=true"],
        STEPS, hook=record_fsdp_float8)
    assert got["info"]["fsdp_mesh"] == (("dp_shard",), (2,))
    assert {"fsdp-all-gather-float8_e4m3fn", "precompute-scales"} <= marks(tmp_path)
    assert_close_runs(runs["float8-tensorwise"], got, "fsdp2 float8 all-gather vs 1 process")


def test_float8_tensorwise_tensor_parallel(runs, tmp_path, monkeypatch):
    monkeypatch.setenv(MARKS_ENV, str(tmp_path))
    got = run_distributed(2, runs["common"] + F8 + TP2 + ["--training.local_batch_size=4"],
                          STEPS, hook=gloo_float8_collectives)
    assert "tp-all-gather-float8_e4m3fn" in marks(tmp_path)
    assert_close_runs(runs["float8-tensorwise"], got, "tp2 float8 vs 1 process")


def test_mxfp8_tensor_parallel(runs):
    got = run_distributed(2, runs["common"] + MX + TP2 + ["--training.local_batch_size=4"], STEPS)
    assert_close_runs(runs["mxfp8"], got, "tp2 mxfp8 vs 1 process")


# --------------------------------------------------------------------------- conversion

def _types(model) -> dict[str, str]:
    return {fqn: type(m).__name__ for fqn, m in model.named_modules()
            if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_converts_linears_and_respects_filters(recipe):
    with pytest.warns(UserWarning, match="no emulated float8 grouped GEMM"):
        record = built(*F8, f"--quantize.float8_recipe={recipe}",
                       "--quantize.filter_fqns=output,router,layers.1.attention.wo")
    model = record.model
    types = _types(model)
    for layer in ("0", "1"):
        for name in ("wq", "wk", "wv", "wo"):
            want = "Linear" if (layer, name) == ("1", "wo") else "Float8Linear"
            assert types[f"layers.{layer}.attention.{name}"] == want, (layer, name)
        assert types[f"layers.{layer}.moe.router.gate"] == "Linear"
        assert type(model.layers[layer].moe.experts.mlp1_weight.data) is torch.Tensor
    assert types["output"] == "Linear"
    granularity = model.layers["0"].attention.wq.config.cast_config_input.scaling_granularity
    assert granularity.name == {"tensorwise": "TENSORWISE", "rowwise": "AXISWISE"}[recipe]
    assert record.quantize_summary["experts"] == [] and record.quantize_summary["linears"]
    assert not record.float8_precompute_scales  # no FSDP float8 all-gather asked for
    assert not hasattr(model, "quantize_summary")  # the record, not the model, says it


def test_router_and_fused_head_are_never_converted():
    # The router computes from its weight in fp32 and the fused loss reads output.weight:
    # neither goes through the module, so converting them would silently do nothing.
    with pytest.warns(UserWarning):
        types = _types(build(*F8, "--quantize.filter_fqns="))
    assert types["layers.0.moe.router.gate"] == "Linear" and types["output"] == "Linear"
    with pytest.warns(UserWarning):
        types = _types(build(*F8, "--quantize.filter_fqns=", "--training.loss_chunk_size=0"))
    assert types["output"] == "Float8Linear"


def test_mxfp8_converts_linears_and_experts():
    from torchao.prototype.moe_training.tensor import MXFP8TrainingWeightWrapperTensor

    model = build("--quantize.mode=mxfp8", *EMULATE)
    types = _types(model)
    assert types["layers.0.attention.wq"] == "MXFP8Linear" and types["output"] == "Linear"
    experts = model.layers["0"].moe.experts
    assert isinstance(experts.mlp1_weight.data, MXFP8TrainingWeightWrapperTensor)
    assert isinstance(experts.mlp2_weight.data, MXFP8TrainingWeightWrapperTensor)
    assert type(experts.mlp1_bias.data) is torch.Tensor
    # State dicts hold plain tensors under unchanged names, and loading still reaches the
    # wrapped weights (checkpoints interchangeable with unquantized runs).
    model.to_empty(device="cpu")
    model.init_weights()
    state = model.state_dict()
    reference = GptOssModel(cfg_of().model_args())
    reference.init_weights()
    plain = reference.state_dict()
    assert set(state) == set(plain)
    assert all(type(v) is torch.Tensor for v in state.values())
    model.load_state_dict(plain)
    assert torch.equal(experts.mlp1_weight.data._data, plain["layers.0.moe.experts.mlp1_weight"])
    assert torch.equal(model.layers["0"].attention.wq.weight, plain["layers.0.attention.wq.weight"])


def test_mxfp8_linear_matches_linear_within_mx_error():
    from runtime.model.quantize import MXFP8Linear

    torch.manual_seed(0)
    ref = nn.Linear(64, 32)
    lin = nn.Linear(64, 32)
    lin.load_state_dict(ref.state_dict())
    model = build("--quantize.mode=mxfp8", *EMULATE)
    MXFP8Linear.from_linear(lin, model.layers["0"].attention.wq.op_config)
    x = torch.randn(2, 16, 64, requires_grad=True)  # tokens: the wgrad K, a multiple of 32
    y, r = lin(x), ref(x)
    rel = ((y - r).norm() / r.norm()).item()
    assert 0 < rel < 0.1, rel  # e4m3 elements with shared power-of-two block scales
    y.sum().backward()
    assert lin.bias.grad is not None and torch.allclose(lin.bias.grad, torch.full((32,), 32.0))


def test_aligned_token_groups_are_exact():
    """Padding each expert's rows to a multiple of 16 (float8 grouped GEMM) changes nothing:
    values and gradients equal the unpadded grouped GEMM, empty experts included."""
    from runtime.model.args import ModelArgs
    from runtime.model.moe import GroupedExperts
    from runtime.model.quantize import _AlignedTokenGroups

    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=64,
                     moe_inter_dim=32, num_experts=4, top_k=2)
    plain, padded = GroupedExperts(args), GroupedExperts(args)
    plain.init_weights(0.1, 0.1)
    padded.load_state_dict(plain.state_dict())
    _AlignedTokenGroups.install(padded, 16)
    _AlignedTokenGroups.install(padded, 16)  # idempotent
    assert isinstance(padded.__dict__["_grouped"].grouped, type(plain._grouped))
    counts = torch.tensor([5, 0, 17, 3])
    x = torch.randn(int(counts.sum()), 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, out2 = plain(x, counts), padded(x2, counts)
    assert torch.allclose(out, out2, atol=1e-6, rtol=1e-5)
    out.square().sum().backward()
    out2.square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6, rtol=1e-5)
    for (name, p), p2 in zip(plain.named_parameters(), padded.parameters(), strict=True):
        assert torch.allclose(p.grad, p2.grad, atol=1e-5, rtol=1e-5), name


def test_tensor_parallel_styles():
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
    )
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    from runtime.model.quantize import tensor_parallel_styles

    plain = (ColwiseParallel, RowwiseParallel, PrepareModuleInput)
    float8 = (Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tw = build(*F8).layers["0"].attention
        rw = build(*F8, "--quantize.float8_recipe=rowwise").layers["0"].attention
        partly = build(*F8, "--quantize.filter_fqns=output,router,wk").layers["0"].attention
    assert tensor_parallel_styles(tw.wq, tw.wk, tw.wv, tw.wo) == float8
    assert tensor_parallel_styles(rw.wq, rw.wk, rw.wv, rw.wo) == plain
    assert tensor_parallel_styles(partly.wq, partly.wk, partly.wv, partly.wo) == plain
    assert tensor_parallel_styles(nn.Linear(16, 16)) == plain
    assert tensor_parallel_styles(None) == plain


# --------------------------------------------------------------------------- refusals

def refusal(*overrides: str, device: str = "cpu", capability=None, monkeypatch=None) -> str:
    if capability is not None:
        from runtime.model import quantize

        monkeypatch.setattr(quantize, "_capability", lambda device: capability)
    with pytest.raises(ConfigError) as info:
        build(*overrides, device=device)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_float8_without_gpu_is_refused():
    assert refusal("--quantize.mode=float8") == (
        "quantize.mode='float8' needs a CUDA GPU with compute capability >= 8.9 (this run's "
        "device is cpu); set quantize.emulate=true to emulate float8 (tests only, no speed-up)")


def test_float8_on_old_gpus_is_refused(monkeypatch):
    assert refusal("--quantize.mode=float8", device="cuda", capability=(8, 0),
                   monkeypatch=monkeypatch) == (
        "quantize.mode='float8' needs a CUDA GPU with compute capability >= 8.9 (this GPU is "
        "sm80); set quantize.emulate=true to emulate float8 (tests only, no speed-up)")
    assert refusal("--quantize.mode=float8", device="cuda", capability=(8, 9),
                   monkeypatch=monkeypatch) == (
        "quantize.mode='float8': the experts' float8 grouped GEMM needs compute capability "
        ">= 9.0 (this GPU is sm89); add 'experts' to quantize.filter_fqns to keep them in "
        "bf16, or set quantize.emulate=true")


def test_mxfp8_outside_blackwell_is_refused(monkeypatch):
    assert refusal("--quantize.mode=mxfp8") == (
        "quantize.mode='mxfp8' needs a Blackwell GPU (compute capability >= 10.0; this run's "
        "device is cpu); set quantize.emulate=true for torchao's emulated MXFP8 (tests only, "
        "slow)")
    assert refusal("--quantize.mode=mxfp8", device="cuda", capability=(9, 0),
                   monkeypatch=monkeypatch) == (
        "quantize.mode='mxfp8' needs a Blackwell GPU (compute capability >= 10.0; this GPU is "
        "sm90); set quantize.emulate=true for torchao's emulated MXFP8 (tests only, slow)")


def test_fsdp_float8_all_gather_needs_float8():
    assert refusal("--quantize.enable_fsdp_float8_all_gather=true") == (
        "quantize.enable_fsdp_float8_all_gather=true needs quantize.mode='float8' (got 'none')")


def test_missing_torchao_is_refused(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    message = refusal(*F8)
    assert message.startswith(
        "quantize.mode needs torchao (pip install 'gptoss-runtime[float8]', torchao>=0.18): ")


def test_async_tp_without_cuda_is_refused():
    assert refusal("--parallelism.enable_async_tensor_parallel=true", "--compile.enable=true") == (
        "parallelism.enable_async_tensor_parallel=true needs CUDA (this run's device is cpu): "
        "async TP is an inductor pass over CUDA symmetric memory; set it to false")


def test_async_tp_without_compile_is_refused():
    from runtime.parallel.tensor_parallel import check_async_tp

    # One owner: the config's cross-key rule; parallelize() checks only the device.
    with pytest.raises(ConfigError) as info:
        cfg_of("--parallelism.enable_async_tensor_parallel=true")
    assert "parallelism.enable_async_tensor_parallel" in str(info.value)
    assert "compile.enable" in str(info.value) and "compile.components" in str(info.value)
    cfg_of("--parallelism.enable_async_tensor_parallel=true", "--compile.enable=true")  # accepted
    cfg = cfg_of()
    cfg.parallelism.enable_async_tensor_parallel = True
    check_async_tp(cfg, torch.device("cuda"))  # CUDA: accepted
    with pytest.raises(ConfigError, match="needs CUDA"):
        check_async_tp(cfg, torch.device("cpu"))


def test_enable_async_tp_sets_the_inductor_pass(monkeypatch):
    import torch._inductor.config as inductor_config
    import torch.distributed._symmetric_memory as symm

    from runtime.parallel.tensor_parallel import enable_async_tp

    class Mesh:
        def get_group(self):
            return type("Group", (), {"group_name": "tp-group"})()

    enabled = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(symm, "enable_symm_mem_for_group", enabled.append)
    monkeypatch.setattr(inductor_config, "_micro_pipeline_tp", False)
    enable_async_tp(Mesh())
    assert inductor_config._micro_pipeline_tp is True and enabled == ["tp-group"]


# --------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                    reason="needs torchao (the GPU test image has none: carry it as a wheel)")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_on_cuda(recipe):
    """Real float8 kernels (SM89+ linears, SM90+ grouped experts): a few bf16 training steps
    of a float8 model stay within 5e-2 relative loss of the same model unquantized."""
    from runtime.train.trainer import Trainer

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("float8 grouped experts need SM90+")

    def losses(*extra: str) -> list[float]:
        cfg = load_config(None, BASE[:] + ["--training.device=cuda", "--training.steps=3",
                                           "--model.compute_dtype=bfloat16",
                                           "--training.local_batch_size=4", *extra])
        cfg.job.dump_folder = str(Path(os.environ.get("TMPDIR", "/tmp")) / "float8-gpu")
        trainer = Trainer(cfg)
        data = iter(trainer.dataloader)
        out = []
        for _ in range(3):
            trainer.step += 1
            out.append(trainer.optimizer_step(next(data))[0])
        return out, trainer

    ref, _ = losses()
    got, trainer = losses("--quantize.mode=float8", f"--quantize.float8_recipe={recipe}")
    assert trainer.parallelized[0].quantize_summary["experts"], "experts not converted"
    assert "Float8Linear" in type(trainer.model.layers["0"].attention.wq).__name__
    for a, b in zip(ref, got, strict=True):
        assert abs(a - b) <= 5e-2 * abs(a), (ref, got)
