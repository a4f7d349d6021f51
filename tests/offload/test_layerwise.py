"""Layerwise offload on the toy pipeline (CPU): the prefetch schedule, blocks a cache skips, aborted
calls, regional compile, and hook removal. Moves are recorded as (action, weight set)."""

import pytest
import torch

from diffserve.offload import Offloader
from diffserve.offload.budget import estimate_device_bytes
from diffserve.offload.layerwise import resident_block_indices
from diffserve.offload.plan import plan_offload, total_bytes
from tests.offload.toy import ToyPipeline, ids

CPU = torch.device("cpu")


def _offload(pipeline, prefetch=1, resident_blocks=0):
    moves = []
    offloader = Offloader(pipeline, "layerwise", CPU, prefetch, trace=lambda action, name: moves.append((action, name)),
                          resident_blocks=resident_blocks)
    return offloader, moves


def _block_moves(moves, dit="transformer"):
    """Moves of the denoiser's blocks as (action, block index)."""
    prefix = f"{dit}.blocks."
    return [(a, int(n[len(prefix):])) for a, n in moves if n.startswith(prefix)]


def _check_residency(pipeline, offloader, prefetch):
    """Hooks (after the offloader's) that check each block is on the device when it runs, with at most
    prefetch + 1 of them there."""
    blocks = list(pipeline.transformer.blocks)
    seen = []

    def check(block, args):
        assert offloader.is_resident(block)
        resident = [i for i, b in enumerate(blocks) if offloader.is_resident(b)]
        assert len(resident) <= prefetch + 1, resident
        seen.append(blocks.index(block))

    for block in blocks:
        block.register_forward_pre_hook(check)
    return seen


def test_one_block_ahead():
    pipeline = ToyPipeline(depth=5)
    offloader, moves = _offload(pipeline, prefetch=1)
    _check_residency(pipeline, offloader, 1)
    pipeline.transformer(torch.randn(2, 8))
    assert _block_moves(moves) == [
        ("load", 0), ("wait", 0), ("load", 1),  # the call starts: block 0 ready, block 1 on its way
        ("release", 0), ("wait", 1), ("load", 2),
        ("release", 1), ("wait", 2), ("load", 3),
        ("release", 2), ("wait", 3), ("load", 4),
        ("release", 3), ("wait", 4),
        ("release", 4), ("load", 0),  # the call ends: the next call's first block is fetched
    ]
    moves.clear()
    pipeline.transformer(torch.randn(2, 8))
    assert _block_moves(moves)[:3] == [("wait", 0), ("load", 1), ("release", 0)]


@pytest.mark.parametrize("prefetch", [0, 2, 3])
def test_prefetch_depth(prefetch):
    pipeline = ToyPipeline(depth=6)
    offloader, moves = _offload(pipeline, prefetch=prefetch)
    seen = _check_residency(pipeline, offloader, prefetch)
    pipeline.transformer(torch.randn(2, 8))
    loads = [i for a, i in _block_moves(moves) if a == "load"]
    # Every block once, in call order; block i + prefetch is fetched when block i starts.
    assert loads[: 6] == list(range(6)) and loads[6:] == list(range(prefetch))
    block_moves = _block_moves(moves)
    for i in range(6 - prefetch):
        assert block_moves.index(("load", i + prefetch)) < block_moves.index(("release", i))
    assert seen == list(range(6))


def test_blocks_a_cache_skips_are_not_fetched_and_leftovers_are_released():
    pipeline = ToyPipeline(depth=6)
    offloader, moves = _offload(pipeline, prefetch=1)
    seen = _check_residency(pipeline, offloader, 1)
    pipeline.transformer.skip = {2, 3, 4}
    pipeline.transformer(torch.randn(2, 8))
    assert seen == [0, 1, 5]
    block_moves = _block_moves(moves)
    loaded = [i for a, i in block_moves if a == "load"]
    # Block 2 was prefetched while block 1 ran; 3 and 4 never are; 5 is fetched when it runs.
    assert loaded == [0, 1, 2, 5, 0]
    assert block_moves[block_moves.index(("load", 5)) - 1] == ("release", 2)
    assert [i for i, b in enumerate(pipeline.transformer.blocks) if offloader.is_resident(b)] == [0]


def test_outputs_match_with_skipped_blocks():
    reference = ToyPipeline(depth=6)
    reference.transformer.skip = {1, 4}
    pipeline = ToyPipeline(depth=6)
    pipeline.transformer.skip = {1, 4}
    _offload(pipeline, prefetch=2)
    x = torch.randn(2, 8)
    assert torch.equal(pipeline.transformer(x), reference.transformer(x))


def test_an_aborted_call_leaves_nothing_behind():
    pipeline = ToyPipeline(depth=5)
    offloader, moves = _offload(pipeline, prefetch=1)

    def abort(block, args):
        raise RuntimeError("the request was stopped")

    handle = pipeline.transformer.blocks[2].register_forward_pre_hook(abort)
    with pytest.raises(RuntimeError, match="stopped"):
        pipeline.transformer(torch.randn(2, 8))
    resident = [i for i, b in enumerate(pipeline.transformer.blocks) if offloader.is_resident(b)]
    assert resident == [0]  # only the next call's prefetched first block
    handle.remove()
    _check_residency(pipeline, offloader, 1)
    pipeline.transformer(torch.randn(2, 8))


def test_the_first_block_is_ready_when_the_call_starts():
    """A step cache reads the first block's weights to decide, before the block itself runs."""
    pipeline = ToyPipeline(depth=4)
    offloader, _ = _offload(pipeline, prefetch=1)
    ready = []
    pipeline.transformer.register_forward_pre_hook(
        lambda module, args: ready.append(offloader.is_resident(module.blocks[0]) and module.blocks[0].linear.weight.data_ptr())
    )
    for _ in range(2):
        pipeline.transformer(torch.randn(2, 8))
    assert all(ready)


def test_whole_pipeline_output_is_unchanged_and_only_the_blocks_stream():
    reference = ToyPipeline(depth=5, experts=2)(ids(), steps=4, image=torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))
    pipeline = ToyPipeline(depth=5, experts=2)
    offloader, moves = _offload(pipeline, prefetch=1)
    out = pipeline(ids(), steps=4, image=torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(out, reference)
    names = {n for _, n in moves}
    assert names == {"text_encoder", "vae"} | {f"{d}.blocks.{i}" for d in ("transformer", "transformer_2") for i in range(5)}
    # Entering the second expert lets the first one's prefetched block go.
    first_expert_2 = moves.index(("load", "transformer_2.blocks.0"))
    assert ("release", "transformer.blocks.0") in moves[:first_expert_2]


def test_regional_compile_keeps_one_graph_and_the_output(monkeypatch):
    import torch._dynamo

    torch._dynamo.reset()
    reference = ToyPipeline(depth=4)(ids(), steps=3)
    pipeline = ToyPipeline(depth=4)
    for block in pipeline.transformer.blocks:
        block.compile(backend="eager")
    offloader, moves = _offload(pipeline, prefetch=1)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    with torch.inference_mode():
        for _ in range(2):  # weights swapped under the compiled blocks every call: no recompile
            assert torch.equal(pipeline(ids(), steps=3), reference)
    # The hooks ran eagerly between the compiled graphs: per request, each of the 3 steps fetches its 4
    # blocks (block 0 fetched at the end of the step before), plus block 0 of the first step.
    assert sum(1 for a, n in moves if a == "load" and n.startswith("transformer.blocks.")) == 2 * (1 + 3 * 4)
    torch._dynamo.reset()


def test_remove_takes_every_hook_and_wrapper_away():
    pipeline = ToyPipeline(depth=3)
    reference = ToyPipeline(depth=3)(ids())
    modules = list(pipeline.modules())
    before = {id(m): (len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules}
    offloader, moves = _offload(pipeline, prefetch=1)
    assert "decode" in pipeline.vae.__dict__  # the VAE's entry is wrapped
    pipeline(ids())
    offloader.remove()
    assert {id(m): (len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules} == before
    assert "decode" not in pipeline.vae.__dict__ and pipeline._execution_device is None
    moves.clear()
    assert torch.equal(pipeline(ids()), reference)
    assert moves == []


def test_resident_blocks_are_spread_through_the_call_order():
    assert resident_block_indices(6, 0) == []
    assert resident_block_indices(6, 2) == [1, 4]
    assert resident_block_indices(6, 3) == [1, 3, 5]
    assert resident_block_indices(57, 29) == sorted(set(resident_block_indices(57, 29))) and \
        len(resident_block_indices(57, 29)) == 29
    with pytest.raises(ValueError, match="would keep all 6 blocks of transformer on the device"):
        resident_block_indices(6, 6, "transformer")


def test_resident_blocks_stay_where_they_were_and_the_others_stream():
    reference = ToyPipeline(depth=6)
    pipeline = ToyPipeline(depth=6)
    blocks = list(pipeline.transformer.blocks)
    pointers = [b.linear.weight.data_ptr() for b in blocks]
    offloader, moves = _offload(pipeline, prefetch=1, resident_blocks=2)
    # Blocks 1 and 4 keep their weights (not packed into host buffers), the others wait on the host.
    kept = [b.linear.weight.data_ptr() == p for b, p in zip(blocks, pointers)]
    assert kept == [False, True, False, False, True, False]
    assert [m.module for m in offloader.resident_blocks["transformer"]] == [blocks[1], blocks[4]]
    assert not any(n in offloader.sets for n in ("transformer.blocks.1", "transformer.blocks.4"))
    assert offloader.streamed_bytes_per_call == {"transformer": sum(
        total_bytes(offloader.sets[f"transformer.blocks.{i}"].tensors) for i in (0, 2, 3, 5))}
    seen = []

    def check(block, args):
        assert offloader.is_resident(block)
        seen.append([i for i, b in enumerate(blocks) if offloader.is_resident(b)])

    for block in blocks:
        block.register_forward_pre_hook(check)
    x = torch.randn(2, 8)
    assert torch.equal(pipeline.transformer(x), reference.transformer(x))
    # Only the streamed blocks move, one ahead in their own order: 2 follows 0, 5 follows 3.
    assert _block_moves(moves) == [
        ("load", 0), ("wait", 0), ("load", 2),
        ("release", 0), ("wait", 2), ("load", 3),
        ("release", 2), ("wait", 3), ("load", 5),
        ("release", 3), ("wait", 5),
        ("release", 5), ("load", 0),
    ]
    # Each block on the device when it runs; 1 and 4 always are, with at most 2 streamed ones.
    assert all({1, 4} <= set(r) and len(set(r) - {1, 4}) <= 2 for r in seen)
    assert [b.linear.weight.data_ptr() for b in (blocks[1], blocks[4])] == [pointers[1], pointers[4]]


def test_resident_blocks_count_in_the_estimate():
    plan = plan_offload(ToyPipeline(depth=6, experts=2))
    block = total_bytes(plan.denoisers[0].blocks[0].tensors)  # the toy's blocks are all alike
    without = estimate_device_bytes(plan, "layerwise", prefetch=1)
    # Two denoisers, two blocks of each kept; encoders and VAE of the toy are smaller than two blocks.
    assert estimate_device_bytes(plan, "layerwise", prefetch=1, resident_blocks=2) == without + 4 * block
    with pytest.raises(ValueError, match="would keep all 6 blocks of transformer"):
        estimate_device_bytes(plan, "layerwise", resident_blocks=6)
