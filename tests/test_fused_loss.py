"""Fused, chunked output projection + cross entropy equals the plain logits path."""

import pytest
import torch
import torch.nn.functional as F

from runtime.model import FLAVORS, GptOssModel
from runtime.model.loss import IGNORE_INDEX, fused_linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_fused_matches_plain_loss_and_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 21, 32, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 32, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 21), generator=g)
    labels[0, :4] = IGNORE_INDEX
    ref = F.cross_entropy((hidden @ weight.T).flatten(0, 1), labels.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.37, (hidden, weight))
    got = fused_linear_cross_entropy(hidden, weight, labels, chunk)
    got_grads = torch.autograd.grad(got * 0.37, (hidden, weight))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_model_with_labels_returns_the_summed_loss_and_same_gradients():
    args = FLAVORS["tiny"]
    torch.manual_seed(0)
    model = GptOssModel(args)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    labels = torch.randint(0, args.vocab_size, (2, 16))
    plain = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), reduction="sum")
    plain.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = model(tokens, labels=labels, loss_chunk_size=5)
    fused.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    for n, p in model.named_parameters():
        # fp32 summation order differs (chunks): tolerance relative to the tensor's scale
        atol = 1e-5 * max(ref[n].abs().max().item(), 1e-3)
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=atol, msg=n)
