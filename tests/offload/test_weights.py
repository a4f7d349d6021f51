"""Weight sets: packing into host buffers, loading and releasing (CPU: between two host buffers)."""

import pytest
import torch
import torch.nn as nn

import diffserve.offload.weights as weights
from diffserve.offload.weights import ALIGN, Transfers, WeightSet


def _tensors():
    torch.manual_seed(0)
    module = nn.Module()
    module.a = nn.Parameter(torch.randn(5, 3), requires_grad=False)
    module.b = nn.Parameter(torch.randn(7).to(torch.bfloat16), requires_grad=False)
    module.register_buffer("mask", torch.tensor([True, False, True]))
    module.register_buffer("ids", torch.arange(4))
    module.register_buffer("empty", torch.zeros(0, 3))
    return module, [module.a, module.b, module.mask, module.ids, module.empty]


def test_packing_keeps_values_objects_and_alignment():
    module, tensors = _tensors()
    before = [t.clone() for t in tensors]
    ws = WeightSet("m", tensors)
    assert [id(t) for t in ws.tensors] == [id(t) for t in tensors]  # the same objects, modules untouched
    (chunk,) = ws.chunks
    for t, b in zip(tensors, before):
        assert torch.equal(t, b) and t.dtype == b.dtype
    for t, offset in chunk.items:
        assert offset % ALIGN == 0
        if t.numel():
            assert t.data_ptr() == chunk.host.data_ptr() + offset  # a view of the host buffer
    assert ws.nbytes == sum(t.numel() * t.element_size() for t in tensors)
    assert not ws.resident


def test_chunks_are_bounded_and_a_large_tensor_gets_its_own(monkeypatch):
    monkeypatch.setattr(weights, "CHUNK_BYTES", 2 * ALIGN)
    small = [torch.ones(ALIGN // 4) * i for i in range(3)]  # ALIGN bytes each (float32)
    large = torch.arange(ALIGN, dtype=torch.float32)  # 4 * ALIGN bytes
    ws = WeightSet("m", [small[0], small[1], large, small[2]])
    assert [len(c.items) for c in ws.chunks] == [2, 1, 1]
    assert [c.host.numel() for c in ws.chunks] == [2 * ALIGN, 4 * ALIGN, ALIGN]
    assert torch.equal(large, torch.arange(ALIGN, dtype=torch.float32))


def test_load_points_at_a_device_copy_and_release_back_at_the_host():
    module, tensors = _tensors()
    expected = [t.clone() for t in tensors]
    ws = WeightSet("m", tensors)
    host_ptrs = [t.data_ptr() for t in tensors]
    moves = []
    transfers = Transfers(torch.device("cpu"), trace=lambda action, name: moves.append(action))
    transfers.load(ws)
    assert ws.resident and ws.uses_device_copy()
    assert all(t.data_ptr() != p for t, p in zip(tensors, host_ptrs) if t.numel())
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected))
    transfers.load(ws)  # already there: no second copy
    transfers.release(ws)
    assert not ws.resident and [t.data_ptr() for t in tensors] == host_ptrs
    # The copy is waited for before its memory is let go, even if nothing read it.
    assert moves == ["load", "wait", "release"]
    transfers.release(ws)
    assert moves == ["load", "wait", "release"]


def test_loading_under_inference_mode_leaves_ordinary_tensors():
    module, tensors = _tensors()
    ws = WeightSet("m", tensors)
    transfers = Transfers(torch.device("cpu"))
    with torch.inference_mode():
        transfers.load(ws, wait=True)
    # The parameters stay usable (and in-place updatable) outside inference mode.
    assert not any(t.is_inference() for t in tensors)
    module.a.add_(0)
    transfers.release(ws)


@pytest.mark.gpu
def test_host_copies_are_pinned_and_loads_are_asynchronous():
    from diffserve.offload.weights import HostPinning

    device = torch.device("cuda")
    pinning = HostPinning()
    big = torch.randn(64, 1024, 1024)  # 256 MiB
    ws = WeightSet("big", [big], pinning)
    assert pinning.holds(ws.chunks[0].host)
    transfers = Transfers(device)
    transfers.load(ws)
    assert ws.event is not None  # copied on the side stream; the compute stream has not waited yet
    transfers.wait(ws)
    assert big.device.type == "cuda" and torch.equal(big.cpu(), ws.chunks[0].host.view(torch.float32).view(64, 1024, 1024))
    transfers.release(ws)
    assert big.device.type == "cpu"
    pinning.unpin_all()
