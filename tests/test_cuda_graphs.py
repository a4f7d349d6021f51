"""CUDA graphs for a denoiser's forward: what a recorded graph is valid for, and replays equal to eager."""

import logging

import pytest
import torch

from diffserve.cuda_graphs import signature, use_cuda_graphs


def test_signature_tells_inputs_apart_by_layout_and_non_tensor_values():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert signature((a,), {"t": 1.0}) == signature((b,), {"t": 1.0})  # values of tensors do not matter
    assert signature((a,), {"t": 1.0}) != signature((a,), {"t": 2.0})
    assert signature((a,), {}) != signature((torch.zeros(3, 3),), {})
    assert signature((a,), {}) != signature((a.t(),), {})  # strides
    assert signature((a,), {}) != signature((a.double(),), {})


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 64)

    def forward(self, x, scale=1.0, extra=None):
        y = torch.nn.functional.gelu(self.linear(x)) * scale
        return (y, y.sum(dim=-1)) if extra is None else (y + extra["bias"], None)


@pytest.mark.gpu
def test_replays_equal_eager_across_values_shapes_and_arguments():
    torch.manual_seed(0)
    model = _Block().cuda()
    eager = _Block().cuda()
    eager.load_state_dict(model.state_dict())
    runner = use_cuda_graphs(model)
    calls = [((torch.randn(4, 64, device="cuda"),), {}) for _ in range(3)]
    calls += [((torch.randn(8, 64, device="cuda"),), {"scale": 0.5}) for _ in range(3)]
    calls += [((torch.randn(4, 64, device="cuda"),), {"extra": {"bias": torch.randn(64, device="cuda")}}) for _ in range(3)]
    kept = []
    with torch.no_grad():
        for args, kwargs in calls:
            out, expected = model(*args, **kwargs), eager(*args, **kwargs)
            kept.append((out, expected))
    for out, expected in kept:  # earlier outputs are not overwritten by later replays
        for o, e in zip(out, expected):
            if e is None:
                assert o is None
            else:
                torch.testing.assert_close(o, e)
    assert len(runner.graphs) == 3  # one per signature, recorded at its second call


class _HostRead(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.sum().item() > 0 else x  # a host read: cannot be recorded


@pytest.mark.gpu
def test_a_forward_that_cannot_be_recorded_runs_eagerly_with_one_warning(caplog):
    model = _HostRead()
    runner = use_cuda_graphs(model)
    with caplog.at_level(logging.WARNING, logger="diffserve"):
        outs = [model(torch.full((4,), float(i), device="cuda")) for i in range(1, 5)]
    for i, out in enumerate(outs, start=1):
        torch.testing.assert_close(out, torch.full((4,), 2.0 * i, device="cuda"))
    assert caplog.text.count("cannot be recorded as a CUDA graph") == 1 and not runner.graphs
