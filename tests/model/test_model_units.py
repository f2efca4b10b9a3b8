"""Model pieces against independent references: flex vs math attention, grouped vs loop
experts, YaRN vs HF's rope init, document masking, parameter counts, argument errors."""

import math

import pytest
import torch

import torch.nn.attention.flex_attention as flex_module
from runtime.model import FLAVORS, GptOssModel, ModelArgs, count_parameters
from runtime.model.attention import flex_sink_attention, math_sink_attention
from runtime.model.masks import MaskInputs
from runtime.model.masks import dense_mask as _dense_mask
from runtime.model.masks import flex_block_mask as _flex_block_mask
from runtime.model.moe import GroupedExperts, MoE, update_expert_bias
from runtime.model.rope import yarn_inv_freq


def dense_mask(seq_len, window, doc_ids, device):
    return _dense_mask(MaskInputs.full_sequence(seq_len, doc_ids, torch.device(device)), window)


def flex_block_mask(seq_len, window, doc_ids, device):
    return _flex_block_mask(MaskInputs.full_sequence(seq_len, doc_ids, torch.device(device)), window)


def _qkv(bsz=2, heads=4, kv_heads=2, seq=40, dim=16, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(bsz, heads, seq, dim, generator=g, dtype=dtype)
    k = torch.randn(bsz, kv_heads, seq, dim, generator=g, dtype=dtype)
    v = torch.randn(bsz, kv_heads, seq, dim, generator=g, dtype=dtype)
    sinks = torch.randn(heads, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v, sinks)]


def _doc_ids(bsz, seq):
    # documents of uneven lengths, different per row
    ids = torch.zeros(bsz, seq, dtype=torch.long)
    ids[0, 7:] = 1
    ids[0, 25:] = 2
    ids[1, 13:] = 1
    return ids


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("docs", [False, True])
def test_flex_forward_equals_math(window, docs):
    q, k, v, sinks = _qkv()
    doc_ids = _doc_ids(2, 40) if docs else None
    ref = math_sink_attention(q, k, v, sinks, dense_mask(40, window, doc_ids, q.device), 0.25)
    out = flex_sink_attention(q, k, v, sinks, flex_block_mask(40, window, doc_ids, q.device), 0.25)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_flex_backward_equals_math_including_sink_gradient(monkeypatch):
    """torch refuses flex backward on CPU; its eager reference path is still differentiable,
    so this test (only) lifts the device check to compare gradients, sinks included."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda *a, **k: None)
    probe = torch.randn(2, 4, 40, 16, dtype=torch.float64)
    grads = {}
    for name in ("math", "flex"):
        q, k, v, sinks = _qkv(dtype=torch.float64, grad=True)
        doc_ids = _doc_ids(2, 40)
        if name == "math":
            out = math_sink_attention(q, k, v, sinks, dense_mask(40, 8, doc_ids, q.device), 0.25)
        else:
            out = flex_sink_attention(q, k, v, sinks, flex_block_mask(40, 8, doc_ids, q.device), 0.25)
        (out * probe).sum().backward()
        grads[name] = [t.grad for t in (q, k, v, sinks)]
    for g_flex, g_math, what in zip(grads["flex"], grads["math"], "qkv+"):
        torch.testing.assert_close(g_flex, g_math, atol=1e-10, rtol=1e-8, msg=f"grad {what}")
    assert grads["flex"][3].abs().sum() > 0  # the sink is trained through the log-sum-exp


def test_sink_gradient_matches_finite_difference():
    q, k, v, sinks = _qkv(dtype=torch.float64, grad=True, seq=12)
    mask = dense_mask(12, 4, None, q.device)
    assert torch.autograd.gradcheck(
        lambda s: math_sink_attention(q.detach(), k.detach(), v.detach(), s, mask, 0.3), (sinks,))


def test_sinks_take_probability_mass():
    q, k, v, sinks = _qkv(seq=10)
    mask = dense_mask(10, None, None, q.device)
    ones = torch.ones_like(v)
    no_sink = math_sink_attention(q, k, ones, torch.full_like(sinks, -1e9), mask, 0.25)
    with_sink = math_sink_attention(q, k, ones, torch.full_like(sinks, 5.0), mask, 0.25)
    torch.testing.assert_close(no_sink, torch.ones_like(no_sink))  # rows sum to one
    assert (with_sink < 1).all()


def _experts(num_experts=4, dim=32, hidden=16):
    args = ModelArgs(dim=dim, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, vocab_size=8,
                     moe_inter_dim=hidden, num_experts=num_experts, top_k=1)
    torch.manual_seed(0)
    experts = GroupedExperts(args)
    experts.init_weights(0.5, 0.5)
    with torch.no_grad():
        experts.mlp1_bias.normal_()
        experts.mlp2_bias.normal_()
    return experts


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 10, 0], [0, 4, 0, 0], [1, 1, 1, 7]])
def test_grouped_experts_equal_loop_including_idle_experts(counts):
    experts = _experts()
    x = torch.randn(sum(counts), 32, requires_grad=True)
    counts_t = torch.tensor(counts)
    probe = torch.randn(sum(counts), 32)
    results = {}
    for impl in ("grouped", "loop"):
        experts.impl = impl
        experts.zero_grad()
        x.grad = None
        out = experts(x, counts_t)
        (out * probe).sum().backward()
        results[impl] = (out.detach(), x.grad.clone(),
                         [p.grad.clone() for p in experts.parameters()])
    torch.testing.assert_close(results["grouped"][0], results["loop"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["grouped"][1], results["loop"][1], atol=1e-5, rtol=1e-5)
    for g, l in zip(results["grouped"][2], results["loop"][2]):
        torch.testing.assert_close(g, l, atol=1e-5, rtol=1e-5)
    idle = [e for e, c in enumerate(counts) if c == 0]
    for p in experts.parameters():  # experts without tokens get exactly zero gradient
        assert p.grad[idle].abs().sum() == 0


def test_compiled_expert_math_equals_eager_in_bf16(monkeypatch):
    """GroupedExperts.compile_math (regional compile under activation checkpointing) is
    used in bf16 and gives the eager grouped path's outputs and gradients; fp32 keeps the
    eager path (torch.compile traces _grouped_mm only in bf16). aot_eager: dynamo +
    AOTAutograd without inductor's slow CPU codegen."""
    import functools

    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    counts = torch.tensor([3, 0, 5, 8])
    probe = torch.randn(16, 32, dtype=torch.bfloat16)
    results = {}
    for compiled in (False, True):
        experts = _experts().to(torch.bfloat16)
        if compiled:
            experts.compile_math()
        torch.manual_seed(1)
        x = torch.randn(16, 32, dtype=torch.bfloat16, requires_grad=True)
        out = experts(x, counts)
        (out * probe).float().sum().backward()
        results[compiled] = [out, x.grad] + [p.grad for p in experts.parameters()]
    for eager, compiled in zip(results[False], results[True]):
        torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1  # the compiled path really ran


def test_yarn_matches_hf_rope_init():
    transformers = pytest.importorskip("transformers")
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from runtime.hf.config import model_args_to_hf_config

    for args in (FLAVORS["20b"], FLAVORS["tiny"], FLAVORS["20b"].replace(rope_truncate=True)):
        hf_inv_freq, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](GptOssConfig(**model_args_to_hf_config(args)))
        inv_freq, concentration = yarn_inv_freq(args)
        torch.testing.assert_close(inv_freq, hf_inv_freq.float(), atol=0, rtol=1e-6)
        assert concentration == pytest.approx(hf_scale, rel=1e-12)
    assert yarn_inv_freq(FLAVORS["20b"])[1] == pytest.approx(0.1 * math.log(32) + 1)


def test_document_masking_equals_running_documents_separately():
    args = FLAVORS["tiny"].replace(attn_backend="math", load_balance_coeff=None)
    torch.manual_seed(0)
    model = GptOssModel(args)
    model.init_weights()
    docs = [torch.randint(0, args.vocab_size, (n,)) for n in (5, 11, 4)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    packed_logits = model(packed, positions=positions, document_ids=doc_ids)[0]
    separate = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed_logits, separate, atol=1e-5, rtol=1e-5)


def test_meta_init_then_forward_is_finite_and_deterministic():
    args = FLAVORS["tiny"]
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        with torch.device("meta"):
            model = GptOssModel(args)
        model.to_empty(device="cpu")
        model.init_weights()
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
        outs.append(model(torch.arange(12)[None] % args.vocab_size))
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32():
    args = FLAVORS["tiny"]
    torch.manual_seed(0)
    model = GptOssModel(args)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    ref = model(tokens)
    model.args = args.replace(compute_dtype="bfloat16")
    low = model(tokens)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def _count_by_formula(a: ModelArgs) -> tuple[int, int]:
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    attention = (a.dim * q + q) + 2 * (a.dim * kv + kv) + (q * a.dim + a.dim) + a.n_heads
    router = a.dim * a.num_experts + a.num_experts
    one_expert = (a.dim * 2 * a.moe_inter_dim + 2 * a.moe_inter_dim) + (a.moe_inter_dim * a.dim + a.dim)
    norms = 2 * a.dim
    embedding = head = a.vocab_size * a.dim
    total = embedding + head + a.dim + a.n_layers * (attention + router + norms + a.num_experts * one_expert)
    active = head + a.dim + a.n_layers * (attention + router + norms + a.top_k * one_expert)
    return total, active


def test_parameter_counts_of_real_flavors():
    # Active follows OpenAI's model card: top-4 experts, no embedding table (a lookup).
    expected = {"20b": (20_914_757_184, 3_608_307_264), "120b": (116_829_156_672, 5_132_849_472)}
    for flavor, counts in expected.items():
        with torch.device("meta"):
            model = GptOssModel(FLAVORS[flavor])
        assert count_parameters(model, FLAVORS[flavor]) == counts
        assert _count_by_formula(FLAVORS[flavor]) == counts


def test_expert_bias_moves_load_towards_balance():
    args = FLAVORS["tiny"].replace(num_experts=4, top_k=1, load_balance_coeff=0.1)
    moe = MoE(args)
    moe.init_weights(0.02, 0.02)
    with torch.no_grad():
        moe.router.gate.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))  # expert 0 hogs everything
    x = torch.randn(1, 64, args.dim)
    moe(x)
    assert moe.tokens_per_expert.tolist()[0] == 64
    update_expert_bias(moe)
    assert moe.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])
    assert moe.tokens_per_expert.sum() == 0


def test_aux_loss_adds_router_gradient_without_changing_output():
    args = FLAVORS["tiny"]
    torch.manual_seed(0)
    plain = MoE(args)
    plain.init_weights(0.02, 0.02)
    with_aux = MoE(args.replace(aux_loss_coeff=0.5))
    with_aux.load_state_dict(plain.state_dict())
    x = torch.randn(2, 8, args.dim)
    out_plain, out_aux = plain(x), with_aux(x)
    torch.testing.assert_close(out_plain, out_aux, atol=0, rtol=0)
    out_plain.sum().backward()
    out_aux.sum().backward()
    assert with_aux.last_aux_loss is not None
    assert not torch.allclose(plain.router.gate.weight.grad, with_aux.router.gate.weight.grad)


@pytest.mark.parametrize("change, field", [
    (dict(n_heads=6, n_kv_heads=4), "n_kv_heads"),
    (dict(top_k=9, num_experts=8), "top_k"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(dim=-1), "dim"),
    (dict(head_dim=7), "head_dim"),
    (dict(attn_backend="sdpa"), "attn_backend"),
    (dict(moe_impl="magic"), "moe_impl"),
    (dict(layer_types=("full_attention",)), "layer_types"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_bad_model_args_name_the_field(change, field):
    with pytest.raises(ValueError, match=rf"ModelArgs\.{field}"):
        FLAVORS["tiny"].replace(**change)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rel(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).norm() / ref.norm())


def flex_vs_math_errors(device, dtype, window, docs, seq=256, dim=64):
    """Flex (the model's flex_sink_attention: compiled on CUDA, eager on CPU) against the math
    backend in float64 on the CPU, forward + backward, masks from one MaskInputs each.
    Returns ||flex - ref|| / ||ref|| for out, dq, dk, dv and the sink gradient."""
    g = torch.Generator().manual_seed(0)
    q, k, v, sinks = (t.detach() for t in _qkv(seq=seq, dim=dim))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    probe = torch.randn(q.shape, generator=g).to(dtype)
    doc_ids = torch.zeros(2, seq, dtype=torch.long)
    if docs:
        doc_ids[:, seq // 3:] = 1
        doc_ids[0, seq // 2 + 5:] = 2
    doc_ids = doc_ids if docs else None
    cpu, dev = torch.device("cpu"), torch.device(device)

    def run(attend, mask, tensors):
        leaves = [t.detach().requires_grad_() for t in tensors[:4]]
        out = attend(*leaves, mask, dim ** -0.5)
        out.backward(tensors[4].to(out.dtype))
        return [out] + [t.grad for t in leaves]

    ref = run(math_sink_attention, _dense_mask(MaskInputs.full_sequence(seq, doc_ids, cpu), window),
              [t.double() for t in (q, k, v, sinks, probe)])
    inputs = MaskInputs.full_sequence(seq, doc_ids.to(dev) if docs else None, dev)
    got = run(flex_sink_attention, _flex_block_mask(inputs, window), [t.to(dev) for t in (q, k, v, sinks, probe)])
    return {name: _rel(a, b) for name, a, b in zip(("out", "dq", "dk", "dv", "dsinks"), got, ref)}


@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("docs", [False, True])
def test_flex_vs_math_errors_on_cpu(monkeypatch, window, docs):
    """The GPU test's code path on the CPU (eager flex; torch's CPU backward refusal lifted)."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda *a, **k: None)
    errors = flex_vs_math_errors("cpu", torch.float32, window, docs, seq=128, dim=16)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_compiled_flex_backward_equals_math_on_gpu(window, docs, dtype, tol):
    errors = flex_vs_math_errors("cuda", dtype, window, docs)
    assert max(errors.values()) < tol, errors


@pytest.mark.gpu
@requires_cuda
def test_full_model_flex_bf16_on_gpu_tracks_fp32_math():
    args = FLAVORS["tiny"]
    torch.manual_seed(0)
    model = GptOssModel(args).cuda()
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 256), device="cuda")
    model.args = args.replace(attn_backend="math", compute_dtype="float32")
    ref = model(tokens)
    model.args = args.replace(attn_backend="flex", compute_dtype="bfloat16")
    out = model(tokens)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
