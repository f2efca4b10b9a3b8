"""Our GptOssModel equals HF transformers' GptOssForCausalLM: logits and every gradient."""

import pytest
import torch

from runtime.hf.keymap import hf_to_runtime_key, hf_to_runtime_tensor
from runtime.model import ModelArgs

from hf_reference import build_hf_model, runtime_from_hf

CASES = {
    # odd layer count, sequence much longer than the window, GQA 4:1, top-2 of 4
    "odd_layers_long_seq": dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=8,
                                vocab_size=96, moe_inter_dim=16, num_experts=4, top_k=2,
                                sliding_window=4, seq_len=19),
    # MHA (no grouping), 2 experts, top-1
    "mha_top1_two_experts": dict(dim=24, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=12,
                                 vocab_size=64, moe_inter_dim=8, num_experts=2, top_k=1,
                                 sliding_window=3, seq_len=11),
    # 8 experts, top-4, GQA 2:1, aligned shapes so the grouped-mm path runs
    "eight_experts_top4": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=16,
                               vocab_size=128, moe_inter_dim=32, num_experts=8, top_k=4,
                               sliding_window=8, seq_len=24),
    # top-3 of 5, odd sizes (loop fallback for unaligned grouped mm), window 1 (self only)
    "top3_of_5_window1": dict(dim=20, n_layers=1, n_heads=6, n_kv_heads=3, head_dim=6,
                              vocab_size=50, moe_inter_dim=6, num_experts=5, top_k=3,
                              sliding_window=1, seq_len=7),
}


def _args(case: dict, **extra) -> tuple[ModelArgs, int]:
    fields = dict(case)
    seq_len = fields.pop("seq_len")
    return ModelArgs(**fields, compute_dtype="float32", attn_backend="math",
                     load_balance_coeff=None, **extra), seq_len


@pytest.mark.parametrize("moe_impl", ["grouped", "loop"])
@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_gradients_match_hf(name, moe_impl):
    args, seq_len = _args(CASES[name], moe_impl=moe_impl)
    hf = build_hf_model(args, seed=len(name))
    ours = runtime_from_hf(hf, args)
    torch.manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (2, seq_len))

    hf_logits = hf(input_ids=tokens).logits
    our_logits = ours(tokens)
    assert our_logits.shape == hf_logits.shape
    torch.testing.assert_close(our_logits, hf_logits, atol=1e-5, rtol=0)

    probe = torch.randn_like(hf_logits)  # a loss that touches every logit differently
    (hf_logits * probe).sum().backward()
    (our_logits * probe).sum().backward()
    ours_params = dict(ours.named_parameters())
    checked = 0
    for hf_name, p in hf.named_parameters():
        key = hf_to_runtime_key(hf_name)
        expected = hf_to_runtime_tensor(key, p.grad)
        got = ours_params[key].grad
        assert got is not None, f"no gradient for {key}"
        scale = max(expected.abs().max().item(), 1.0)
        torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-4,
                                   msg=lambda m, k=key: f"{k}: {m}")
        checked += 1
    assert checked == len(ours_params)  # sinks, router and every expert tensor included


def test_explicit_positions_match_hf_position_ids():
    args, seq_len = _args(CASES["eight_experts_top4"])
    hf = build_hf_model(args)
    ours = runtime_from_hf(hf, args)
    tokens = torch.randint(0, args.vocab_size, (1, seq_len))
    positions = torch.arange(seq_len)[None] + 1000  # far past the window: RoPE must be relative
    torch.testing.assert_close(ours(tokens, positions=positions),
                               hf(input_ids=tokens, position_ids=positions).logits,
                               atol=1e-5, rtol=0)
