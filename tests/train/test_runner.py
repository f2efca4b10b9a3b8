"""The runner contract as code: both runners conform to runtime.train.runner.Runner (the
pipeline runner's instances are checked in tests/parallel/test_parallel_pp.py)."""

import inspect

import pytest
import torch
from torch import nn

from runtime.parallel.pipeline import PipelineParallel
from runtime.train.runner import LocalRunner, Runner

pytestmark = pytest.mark.quick

METHODS = ("forward_backward", "eval_loss_sum", "share_loss", "clip_grad_norm_")


@pytest.mark.parametrize("cls", [LocalRunner, PipelineParallel])
def test_runner_methods_take_the_protocols_arguments(cls):
    for name in METHODS:
        want = inspect.signature(getattr(Runner, name)).parameters
        got = inspect.signature(getattr(cls, name)).parameters
        assert list(got) == list(want), f"{cls.__name__}.{name}{list(got)}"
        assert [p.default for p in got.values()] == [p.default for p in want.values()]


def test_a_local_runner_is_a_runner_and_a_partial_one_is_not():
    runner = LocalRunner(nn.Linear(2, 2), torch.device("cpu"))
    assert isinstance(runner, Runner)

    class NoShareLoss:  # negative control: one call of the contract missing
        model_parts, model, microbatches = [], None, 1
        forward_backward = eval_loss_sum = clip_grad_norm_ = LocalRunner.forward_backward

    assert not isinstance(NoShareLoss(), Runner)
