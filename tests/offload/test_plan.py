"""Which weights offload moves: from declared components, from fallback names, resident modules and
shared tensors."""

from typing import ClassVar

import pytest
import torch
import torch.nn as nn

from diffserve.offload import Offloader
from diffserve.offload.plan import module_tensors, plan_offload
from diffserve.testing import load_pipeline
from tests.offload.toy import ToyDiT, ToyEncoder, ToyPipeline, ToyVAE


def _ids(tensors):
    return {id(t) for t in tensors}


def test_declared_components_of_flux(tiny_flux):
    pipeline = load_pipeline(tiny_flux)
    plan = plan_offload(pipeline)
    assert list(plan.encoders) == ["text_encoder", "text_encoder_2"]
    assert list(plan.vaes) == ["vae"]
    (dit,) = plan.denoisers
    t = pipeline.transformer
    # Call order: the double-stream blocks, then the single-stream ones.
    expected = [f"transformer.transformer_blocks.{i}" for i in range(len(t.transformer_blocks))]
    expected += [f"transformer.single_transformer_blocks.{i}" for i in range(len(t.single_transformer_blocks))]
    assert [b.name for b in dit.blocks] == expected
    assert _ids(dit.blocks[0].tensors) == _ids(module_tensors(t.transformer_blocks[0]))
    # The rest of the denoiser: its embedders, final norm and projection, no block tensor.
    assert _ids(dit.rest) == _ids(module_tensors(t)) - {id(x) for b in dit.blocks for x in b.tensors}
    assert _ids(dit.rest) >= _ids(module_tensors(t.x_embedder))
    assert plan.resident == []  # everything in a FLUX pipeline belongs to a component


def test_two_experts_are_two_denoisers(tiny_checkpoint):
    pipeline = load_pipeline(tiny_checkpoint("wan2.2-t2v"))
    plan = plan_offload(pipeline)
    assert [d.path for d in plan.denoisers] == ["transformer", "transformer_2"]
    assert all(d.blocks and d.blocks[0].name.startswith(f"{d.path}.blocks.") for d in plan.denoisers)
    assert list(plan.encoders) == ["text_encoder"]


class Undeclared(nn.Module):
    """No SupportsComponentDiscovery: the well-known attribute names are used."""

    def __init__(self):
        super().__init__()
        self.transformer = ToyDiT(3)
        self.text_encoder = ToyEncoder()
        self.image_encoder = ToyEncoder()
        self.vae = ToyVAE()
        self.extra = nn.Linear(2, 2)


def test_fallback_names_find_the_usual_components():
    pipeline = Undeclared()
    plan = plan_offload(pipeline)
    assert list(plan.encoders) == ["text_encoder", "image_encoder"]
    assert list(plan.vaes) == ["vae"]
    assert [d.path for d in plan.denoisers] == ["transformer"]
    assert [b.name for b in plan.denoisers[0].blocks] == [f"transformer.blocks.{i}" for i in range(3)]
    # What no component covers stays on the device.
    assert _ids(plan.resident) == _ids(module_tensors(pipeline.extra))


class WithResident(ToyPipeline):
    _resident_modules: ClassVar[list[str]] = ["transformer.proj_in", "transformer.blocks.1"]


def test_resident_modules_never_move():
    pipeline = WithResident()
    plan = plan_offload(pipeline)
    resident = _ids(module_tensors(pipeline.transformer.proj_in)) | _ids(module_tensors(pipeline.transformer.blocks[1]))
    assert _ids(plan.resident) == resident
    (dit,) = plan.denoisers
    assert not resident & _ids(dit.rest)
    assert dit.blocks[1].tensors == []  # the block is still in the call order, with nothing to stream


def test_a_tensor_two_components_share_stays_on_the_device():
    pipeline = ToyPipeline()
    pipeline.transformer.tied = pipeline.text_encoder.embed  # the encoder's embedding inside the denoiser too
    shared = pipeline.text_encoder.embed.weight
    plan = plan_offload(pipeline)
    assert id(shared) in _ids(plan.resident)
    assert id(shared) not in _ids(plan.encoders["text_encoder"])
    assert id(shared) not in _ids(plan.denoisers[0].rest)


def test_a_declared_module_that_is_missing_is_an_error():
    class Broken(ToyPipeline):
        _encoder_modules: ClassVar[list[str]] = ["text_encoder", "text_encoder_3"]

    with pytest.raises(AttributeError, match="declares encoder module 'text_encoder_3' but has none"):
        plan_offload(Broken())


class BlocklessDiT(ToyDiT):
    _repeated_blocks: ClassVar[list[str]] = []


def test_layerwise_offload_needs_block_lists_and_model_level_does_not():
    pipeline = ToyPipeline()
    pipeline.transformer.__class__ = BlocklessDiT
    with pytest.raises(ValueError, match=r"enable_layerwise_offload needs the block lists of "
                                         r"ToyPipeline.transformer \(BlocklessDiT\): declare _repeated_blocks"):
        Offloader(pipeline, "layerwise", torch.device("cpu"))
    Offloader(pipeline, "model", torch.device("cpu")).remove()


def test_a_pipeline_without_denoisers_is_refused():
    pipeline = ToyPipeline()
    pipeline._dit_modules = []
    with pytest.raises(ValueError, match="ToyPipeline declares no denoiser modules"):
        Offloader(pipeline, "model", torch.device("cpu"))
