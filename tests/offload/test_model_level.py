"""Model-level offload on the toy pipeline (CPU): which stage is on the device when, in which order
weights are copied and waited for, and what the hooks do with inputs."""

from collections import namedtuple

import pytest
import torch

from diffserve.offload import Offloader
from diffserve.offload.hooks import move_to_device
from tests.offload.toy import ToyPipeline, ids

CPU = torch.device("cpu")
BLOCKS = [f"transformer.blocks.{i}" for i in range(3)]


def _offload(pipeline):
    moves = []
    offloader = Offloader(pipeline, "model", CPU, trace=lambda action, name: moves.append((action, name)))
    return offloader, moves


def test_stages_take_turns_in_request_order():
    pipeline = ToyPipeline(depth=3)
    offloader, moves = _offload(pipeline)
    pipeline(ids(), steps=2)
    assert moves == [
        ("load", "text_encoder"), ("wait", "text_encoder"),
        # While the encoders run, the denoiser's copy starts: what fits next to them within the largest
        # stage (the denoiser's 1536 bytes): its rest (576) and first block (320), not the second.
        ("load", "transformer"), ("load", BLOCKS[0]),
        # The denoiser: released encoders, then the rest of its blocks in call order; the compute stream
        # waits for the rest and the first block now, for the other blocks in their own hooks.
        ("release", "text_encoder"),
        *[("load", b) for b in BLOCKS[1:]],
        ("wait", "transformer"), ("wait", BLOCKS[0]), ("wait", BLOCKS[1]), ("wait", BLOCKS[2]),
        # Decoding: the VAE comes and the next request's encoders are copied during the decode (encoders
        # + VAE are smaller than the denoiser); the denoiser keeps what fits next to both (its rest: 576 of
        # the 1536 - 512 - 236 bytes left) and lets its blocks go.
        *[("release", b) for b in BLOCKS],
        ("load", "vae"), ("wait", "vae"),
        ("load", "text_encoder"),
    ]
    moves.clear()
    pipeline(ids(), steps=1)
    # The next request copies its first block while encoding, the rest of it is still there.
    assert moves[:4] == [("release", "vae"), ("wait", "text_encoder"), ("load", BLOCKS[0]), ("release", "text_encoder")]


def test_each_component_is_on_the_device_when_it_runs_and_alone():
    pipeline = ToyPipeline(depth=3, experts=2)
    offloader, moves = _offload(pipeline)
    components = {"text_encoder": pipeline.text_encoder, "transformer": pipeline.transformer,
                  "transformer_2": pipeline.transformer_2, "vae": pipeline.vae}
    ran = []

    def check(name):
        def hook(module, args):
            resident = sorted(n for n, m in components.items() if offloader.is_resident(m))
            # Wan2.2's experts one at a time; while encoding, the first expert's copy starts; while
            # decoding, the next request's encoders arrive.
            expected = {"vae": ["text_encoder", "vae"], "text_encoder": ["text_encoder", "transformer"]}
            assert resident == expected.get(name, [name]), (name, resident)
            for block in getattr(module, "blocks", []):
                assert offloader.is_resident(block)
            ran.append(name)

        return hook

    for name, module in components.items():
        target = module.decoder if name == "vae" else module  # the VAE is entered through decode()
        target.register_forward_pre_hook(check(name))
    pipeline(ids(), steps=4)
    assert ran == ["text_encoder", "transformer", "transformer", "transformer_2", "transformer_2", "vae"]


def test_a_vae_encode_during_encoding_does_not_prefetch():
    pipeline = ToyPipeline(depth=3)
    offloader, moves = _offload(pipeline)
    pipeline(ids(), steps=1, image=torch.randn(2, 3))
    vae_loads = [i for i, m in enumerate(moves) if m == ("load", "vae")]
    assert len(vae_loads) == 2  # encode, then decode after the denoiser
    first_vae, second_vae = vae_loads
    assert ("load", "text_encoder") not in moves[first_vae:second_vae]
    # The denoiser's first sets, copied while the text encoder ran, stay: they fit next to the VAE.
    assert moves.index(("load", "transformer")) < first_vae
    assert moves.count(("load", "transformer")) == 1
    assert moves[-1] == ("load", "text_encoder")


def test_a_vae_encode_lets_the_denoisers_first_sets_go_when_they_do_not_fit_next_to_it():
    reference = ToyPipeline(depth=3)(ids(), steps=1, image=torch.ones(2, 3))
    pipeline = ToyPipeline(depth=3)
    pipeline.vae.register_buffer("padding", torch.zeros(200))  # 1036 bytes with the rest of the VAE
    offloader, moves = _offload(pipeline)
    assert torch.equal(pipeline(ids(), steps=1, image=torch.ones(2, 3)), reference)
    # The rest and first block (896 bytes) came while the text encoder ran, went for the VAE (896 + 1036
    # > 1536, the largest stage), and came again for the denoiser.
    first_vae = moves.index(("load", "vae"))
    released = [name for action, name in moves[:first_vae] if action == "release"]
    assert released == ["text_encoder", "transformer", BLOCKS[0]]
    assert moves.count(("load", "transformer")) == 2


def test_no_prefetch_when_encoders_and_vae_outgrow_the_largest_stage():
    pipeline = ToyPipeline(depth=1)
    pipeline.text_encoder.embed = torch.nn.Embedding(4096, 8).requires_grad_(False)  # larger than the denoiser
    offloader, moves = _offload(pipeline)
    pipeline(ids(), steps=1)
    assert moves[-2:] == [("load", "vae"), ("wait", "vae")]


def test_outputs_match_and_the_pipeline_computes_on_the_execution_device():
    reference = ToyPipeline(depth=3, experts=2)(ids(), steps=4, image=torch.ones(2, 3))
    pipeline = ToyPipeline(depth=3, experts=2)
    offloader, _ = _offload(pipeline)
    assert pipeline._execution_device == CPU and pipeline.device == CPU
    assert torch.equal(pipeline(ids(), steps=4, image=torch.ones(2, 3)), reference)
    offloader.remove()
    assert pipeline._execution_device is None


def test_inputs_on_another_device_are_moved():
    Pair = namedtuple("Pair", "a b")
    value = (torch.ones(2), [torch.zeros(1), {"x": torch.ones(3), "n": 4}], Pair(torch.ones(1), "s"))
    moved = move_to_device(value, torch.device("meta"))
    assert moved[0].is_meta and moved[1][0].is_meta and moved[1][1]["x"].is_meta and moved[1][1]["n"] == 4
    assert isinstance(moved[2], Pair) and moved[2].a.is_meta and moved[2].b == "s"
    # Nothing to move: the very same containers, which a callee may fill in place.
    cache = [torch.ones(1), None]
    args = (cache, {"idx": [0]})
    same = move_to_device(args, torch.device("cpu"))
    assert same is args and same[0] is cache


def _record_runs(pipeline, moves, dits=("transformer",)):
    """Each block of the denoisers adds ("run", its name) to `moves` as it starts, after the offloader's
    own hooks (which are prepended)."""
    for dit in dits:
        for i, block in enumerate(getattr(pipeline, dit).blocks):
            block.register_forward_pre_hook(lambda m, args, name=f"{dit}.blocks.{i}": moves.append(("run", name)))


def test_the_first_call_streams_each_block_waits_for_its_own_copy_only():
    pipeline = ToyPipeline(depth=4)
    offloader, moves = _offload(pipeline)
    _record_runs(pipeline, moves)
    pipeline.text_encoder(ids())
    x = torch.randn(2, 8)
    pipeline.transformer(x)
    blocks = [f"transformer.blocks.{i}" for i in range(4)]
    assert moves == [
        ("load", "text_encoder"), ("wait", "text_encoder"),
        # Every copy is issued before the first call runs, in call order (on a GPU: queued on the side
        # stream), the first ones while the encoders run (the rest, 576 bytes, and two blocks of 320
        # fit next to their 512 within the denoiser's 1856) ...
        ("load", "transformer"), ("load", blocks[0]), ("load", blocks[1]),
        ("release", "text_encoder"),
        ("load", blocks[2]), ("load", blocks[3]),
        # ... and the compute waits for the rest and the first block (a step cache reads its weights
        # before it runs), then for each other block just before it runs: block i computes while
        # blocks after it are still being copied.
        ("wait", "transformer"), ("wait", blocks[0]), ("run", blocks[0]),
        ("wait", blocks[1]), ("run", blocks[1]),
        ("wait", blocks[2]), ("run", blocks[2]),
        ("wait", blocks[3]), ("run", blocks[3]),
    ]
    # The blocks stay: later calls copy nothing and wait for nothing.
    moves.clear()
    for _ in range(2):
        pipeline.transformer(x)
    assert moves == [("run", b) for b in blocks] * 2
    assert all(offloader.is_resident(b) for b in pipeline.transformer.blocks)


def test_a_block_a_cache_skips_in_the_first_call_waits_when_it_first_runs():
    pipeline = ToyPipeline(depth=4)
    offloader, moves = _offload(pipeline)
    _record_runs(pipeline, moves)
    x = torch.randn(2, 8)
    pipeline.transformer.skip = {1, 2}
    pipeline.transformer(x)
    pipeline.transformer.skip = set()
    moves.clear()
    pipeline.transformer(x)
    blocks = [f"transformer.blocks.{i}" for i in range(4)]
    assert moves == [("run", blocks[0]), ("wait", blocks[1]), ("run", blocks[1]),
                     ("wait", blocks[2]), ("run", blocks[2]), ("run", blocks[3])]


def test_each_expert_streams_on_its_first_call_and_goes_at_the_decode():
    pipeline = ToyPipeline(depth=3, experts=2)
    offloader, moves = _offload(pipeline)
    _record_runs(pipeline, moves, dits=("transformer", "transformer_2"))
    pipeline(ids(), steps=4)
    for dit, other in (("transformer", "transformer_2"), ("transformer_2", "vae")):
        blocks = [f"{dit}.blocks.{i}" for i in range(3)]
        first = moves.index(("load", dit))
        calls = moves[first : moves.index(("release", dit))]
        # One copy of each block per request, each waited for once, just before the block first runs.
        assert [m for m in calls if m[0] == "load"] == [("load", dit), *[("load", b) for b in blocks]]
        assert [m for m in calls if m[0] == "wait"] == [("wait", dit), *[("wait", b) for b in blocks]]
        for b in blocks[1:]:
            assert calls[calls.index(("wait", b)) + 1] == ("run", b)
        assert calls.count(("run", blocks[0])) == 2  # two steps per expert, the second copying nothing


# -- what the first denoiser keeps between requests ----------------------------------------------------

# Two toys (the largest stage is the denoiser): encoders (512 bytes) and VAE (236) leave most of a deep
# denoiser's 3136 bytes free, so the decode keeps its rest and blocks 0-4 (2176 of the 2388 left); a
# padded VAE (836) leaves 188 bytes next to the encoders, less than any set: nothing is kept.
ROOMY = {"depth": 8, "vae_padding": 0, "kept": 6}
FULL = {"depth": 3, "vae_padding": 150, "kept": 0}


def _toy(depth, vae_padding, **_):
    pipeline = ToyPipeline(depth=depth)
    if vae_padding:
        pipeline.vae.register_buffer("padding", torch.zeros(vae_padding))
    return pipeline


def _offload_within_budget(pipeline):
    """Model-level offload whose every copy checks that the weights on the device, the new ones with them,
    stay within the largest stage: the budget holds at every moment, not only at stage entries."""
    moves = []

    def trace(action, name):
        moves.append((action, name))
        if action == "load":
            held = sum(ws.nbytes for ws in offloader.sets.values() if ws.resident or ws.name == name)
            assert held <= offloader.components._largest_stage_bytes(), (name, moves)

    offloader = Offloader(pipeline, "model", CPU, trace=trace)
    return offloader, moves


def _watch_entries(pipeline, offloader):
    """(entry, names of the sets on the device, their bytes) as each component starts, after the offloader's
    hooks (which are prepended) made its stage active."""
    seen = []
    entries = {"text_encoder": pipeline.text_encoder, "vae.encode": pipeline.vae.encoder,
               "transformer": pipeline.transformer, "vae.decode": pipeline.vae.decoder}
    for entry, module in entries.items():
        def hook(m, args, entry=entry):
            held = [ws for ws in offloader.sets.values() if ws.resident]
            seen.append((entry, {ws.name for ws in held}, sum(ws.nbytes for ws in held)))

        module.register_forward_pre_hook(hook)
    return seen


def _denoiser_sets(toy):
    return ["transformer", *[f"transformer.blocks.{i}" for i in range(toy["depth"])]]


@pytest.mark.parametrize("toy", [ROOMY, FULL], ids=["roomy", "full"])
def test_back_to_back_requests_copy_only_what_the_decode_let_go(toy):
    reference = _toy(**toy)(ids(), steps=2)
    pipeline = _toy(**toy)
    offloader, moves = _offload_within_budget(pipeline)
    seen = _watch_entries(pipeline, offloader)
    pipeline(ids(), steps=2)
    dit_sets = _denoiser_sets(toy)
    kept = set(dit_sets[: toy["kept"]])
    # The decode holds the VAE, the next request's encoders and the first sets of the denoiser.
    assert seen[-1][:2] == ("vae.decode", {"vae", "text_encoder"} | kept)
    moves.clear()
    seen.clear()
    assert torch.equal(pipeline(ids(), steps=2), reference)
    # The kept prefix is still there while the next request encodes, and is never copied again.
    assert seen[0][0] == "text_encoder" and kept <= seen[0][1]
    assert [moves.count(("load", name)) for name in dit_sets] == [name not in kept for name in dit_sets]


@pytest.mark.parametrize("toy", [ROOMY, FULL], ids=["roomy", "full"])
def test_weights_on_the_device_stay_within_the_largest_stage(toy):
    pipeline = _toy(**toy)
    offloader, moves = _offload_within_budget(pipeline)  # checks every copy
    seen = _watch_entries(pipeline, offloader)
    pipeline(ids(), steps=2)
    pipeline(ids(), steps=2, image=torch.ones(2, 3))  # with a VAE encode between the encoders and denoiser
    largest = offloader.components._largest_stage_bytes()
    assert [entry for entry, _, _ in seen] == ["text_encoder", *["transformer"] * 2, "vae.decode"] + [
        "text_encoder", "vae.encode", *["transformer"] * 2, "vae.decode"]
    assert all(held <= largest for _, _, held in seen), seen
    # The VAE encode keeps what fits next to it: all the roomy denoiser had copied during the encode (its
    # rest and 6 blocks), the full one's rest (576 of 1536 - 836 bytes) without its first block.
    dit_sets = _denoiser_sets(toy)
    encode_held = seen[5][1] & set(dit_sets)
    assert encode_held == set(dit_sets[: 7 if toy is ROOMY else 1])


def test_two_experts_the_first_is_copied_again_and_the_second_goes_whole():
    reference = ToyPipeline(depth=3, experts=2)(ids(), steps=4)
    pipeline = ToyPipeline(depth=3, experts=2)
    offloader, moves = _offload_within_budget(pipeline)
    pipeline(ids(), steps=4)
    # The second expert (as large as the first) let the first go; the decode lets the second go.
    assert not any(offloader.is_resident(m) for m in (pipeline.transformer, pipeline.transformer_2))
    moves.clear()
    assert torch.equal(pipeline(ids(), steps=4), reference)
    expert_sets = [f"{dit}{part}" for dit in ("transformer", "transformer_2")
                   for part in ("", *[f".blocks.{i}" for i in range(3)])]
    assert [moves.count(("load", name)) for name in expert_sets] == [1] * len(expert_sets)
