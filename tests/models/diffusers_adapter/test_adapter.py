"""The diffusers adapter: routing (native first, the adapter as fallback or when asked), the SamplingSpec
it derives from a diffusers pipeline's __call__, the features it maps and the ones it refuses, progress
and abort between steps. Conformance with diffusers itself is in tests/models/test_conformance.py
(PixArt-Sigma, LTX-Video, AudioLDM2) and tests/cache/test_cache_conformance.py (cache_dit)."""

import json

import pytest
import torch

from diffserve import Omni, OmniDiffusionSamplingParams
from diffserve.config import OmniDiffusionConfig
from diffserve.engine.admission import InvalidRequestError
from diffserve.registry import ADAPTER_IMPORT_PATH, ModelResolutionError, resolve_model, supported_models
from diffserve.request import OmniDiffusionRequest, PromptInput
from diffserve.testing import CONFORMANCE_CASES, output_tensor


def _omni(path, **kwargs):
    return Omni(path, dtype="float32", device="cpu", disable_progress_bar=True, **kwargs)


def _resolved(path, **kwargs) -> OmniDiffusionConfig:
    config = OmniDiffusionConfig(model=path, **kwargs)
    resolve_model(config)
    return config


# -- routing -------------------------------------------------------------------------------------------


def test_native_model_is_not_routed_to_the_adapter(tiny_flux):
    config = _resolved(tiny_flux)
    assert config.resolved_backend == "native"
    assert config.pipeline_import_path == "diffserve.models.flux.pipeline_flux:FluxPipeline"


def test_unported_diffusers_pipeline_falls_back_to_the_adapter(tiny_checkpoint):
    config = _resolved(tiny_checkpoint("pixart-sigma"))
    assert config.resolved_backend == "diffusers" and config.pipeline_import_path == ADAPTER_IMPORT_PATH
    assert config.model_class_name == "PixArtSigmaPipeline"


@pytest.mark.parametrize(
    "arch, scenario_name, cfg, params",
    [
        ("flux", "true_cfg_batch2", "true_cfg", {"true_cfg_scale", "guidance_scale", "max_sequence_length"}),
        # SD3's skip-layer guidance keywords are ours too; a prompt without a negative prompt runs alone.
        ("sd3", "skip_layer_guidance_batch2", "guidance", {"skip_guidance_layers", "skip_layer_guidance_scale"}),
    ],
)
def test_backend_diffusers_serves_a_native_model_through_diffusers(tiny_checkpoint, arch, scenario_name, cfg, params):
    """A native model's checkpoint through diffusers' own pipeline equals the model's conformance reference."""
    path = tiny_checkpoint(arch)
    case = next(c for c in CONFORMANCE_CASES if c.arch == arch)
    scenario = case.scenario(scenario_name)
    prompts = [{**(p if isinstance(p, dict) else {"prompt": p}), "seed": s} for p, s in zip(scenario.prompts, scenario.seeds)]
    with _omni(path, backend="diffusers", max_batch_size=2) as omni:
        assert type(omni.engine.executor.worker.pipeline).__name__ == "DiffusersAdapterPipeline"
        spec = omni.engine.spec
        outputs = omni.generate(prompts, scenario.params)
    assert spec.cfg == cfg and params <= spec.params
    ours = torch.cat([output_tensor(out) for out in outputs])
    # Measured (fp32, CPU, 2026-11-30): flux 0.0; sd3 9.8e-7 (its prompt without a negative prompt runs as
    # a call of its own, the reference batches both).
    assert (ours - case.run_reference(path, scenario)).abs().max().item() <= 1e-4


def test_backend_native_refuses_a_pipeline_diffserve_does_not_port(tiny_checkpoint):
    with pytest.raises(ModelResolutionError, match=r"'PixArtSigmaPipeline' .* has no native diffserve pipeline "
                                                   r"\(backend='native'\)\. Native: .*FluxPipeline"):
        _resolved(tiny_checkpoint("pixart-sigma"), backend="native")


@pytest.mark.parametrize("backend", ["auto", "diffusers"])
def test_unknown_pipeline_class_is_a_clear_error(tmp_path, backend):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    expected = ("has no native pipeline for it and the installed diffusers has no pipeline of that name" if backend == "auto"
                else "backend='diffusers' needs diffusers' pipeline class 'NoSuchPipeline'")
    with pytest.raises(ModelResolutionError, match=expected):
        _resolved(str(tmp_path), backend=backend)


def test_backend_setting_is_checked():
    with pytest.raises(ValueError, match="backend must be one of auto, native, diffusers, got 'torch'"):
        OmniDiffusionConfig(model="demo", backend="torch")


# -- the derived spec ----------------------------------------------------------------------------------


def test_spec_is_derived_from_the_call_signature(tiny_checkpoint):
    with _omni(tiny_checkpoint("pixart-sigma")) as omni:
        image = omni.engine.spec
    with _omni(tiny_checkpoint("ltx-video")) as omni:
        video = omni.engine.spec
    with _omni(tiny_checkpoint("audioldm2")) as omni:
        audio = omni.engine.spec
    # PixArt: guidance_scale + negative_prompt -> classic CFG; __call__'s concrete defaults (20 steps,
    # overridden by the tiny checkpoint's 4), the size from the transformer's sample size x the VAE
    # factor (overridden to 32), multiples of VAE factor 8 x patch 2.
    assert image.modality == "image" and image.cfg == "guidance" and image.images is None
    assert image.params == {"height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length"}
    assert image.defaults["guidance_scale"] == 4.5 and image.defaults["max_sequence_length"] == 300
    assert image.size_multiple == 16
    # LTX: frame_rate is our fps (default 25), num_frames in the VAE's 4-frame steps.
    assert video.modality == "video" and video.cfg == "guidance"
    assert {"num_frames", "fps"} <= video.params and video.defaults["fps"] == 25
    assert video.frames_multiple == 4 and video.size_multiple == 4
    # AudioLDM2: audio_length_in_s is our audio_end_in_s, left to diffusers by default (its sample size).
    assert audio.modality == "audio" and audio.params == {"num_inference_steps", "guidance_scale", "audio_end_in_s"}
    assert "audio_end_in_s" not in audio.defaults and audio.fixed_tokens == 32


def test_model_default_size_follows_the_transformer(tiny_checkpoint, tmp_path):
    """Without the tiny checkpoint's override, PixArt's size is its sample size (32) x VAE factor (8)."""
    import shutil

    from diffserve.models.spec import DEFAULTS_KEY

    path = shutil.copytree(tiny_checkpoint("pixart-sigma"), tmp_path / "pixart")
    index = json.loads((path / "model_index.json").read_text())
    index.pop(DEFAULTS_KEY)
    (path / "model_index.json").write_text(json.dumps(index))
    with _omni(str(path)) as omni:
        spec = omni.engine.spec
    assert spec.defaults["height"] == spec.defaults["width"] == 256 and spec.defaults["num_inference_steps"] == 20


@pytest.mark.parametrize(
    "arch, params, message",
    [
        ("pixart-sigma", {"num_frames": 5}, "num_frames=5 is not used by PixArtSigmaPipeline"),
        ("pixart-sigma", {"true_cfg_scale": 3.0}, "true_cfg_scale=3.0 is not used by PixArtSigmaPipeline"),
        ("pixart-sigma", {"height": 40}, "height=40 is not supported by PixArtSigmaPipeline: it must be a multiple of 16"),
        ("ltx-video", {"num_frames": 8}, "num_frames=8 is not supported by LTXPipeline: it must be 4k\\+1"),
        ("audioldm2", {"audio_start_in_s": 0.5}, "audio_start_in_s=0.5 is not used by AudioLDM2Pipeline"),
    ],
)
def test_parameters_the_pipeline_does_not_take_are_refused(tiny_checkpoint, arch, params, message):
    with _omni(tiny_checkpoint(arch)) as omni:
        with pytest.raises(ValueError, match=message):
            omni.generate("a fox", OmniDiffusionSamplingParams(**params))


def test_negative_prompt_with_guidance_off_is_refused(tiny_checkpoint):
    with _omni(tiny_checkpoint("pixart-sigma")) as omni:
        with pytest.raises(InvalidRequestError, match="negative_prompt is not used when guidance_scale=1.0"):
            omni.engine.admit(OmniDiffusionRequest(
                prompts=[PromptInput("a fox", seed=0, negative_prompt="blurry")],
                sampling_params=OmniDiffusionSamplingParams(guidance_scale=1.0)))


# -- features ------------------------------------------------------------------------------------------

REFUSED = [
    ({"tensor_parallel_size": 2}, "tensor_parallel_size=2"),
    ({"ulysses_degree": 2}, "ulysses_degree=2"),
    ({"ring_degree": 2}, "ring_degree=2"),
    ({"cfg_parallel_size": 2}, "cfg_parallel_size=2"),
    ({"use_hsdp": True, "hsdp_shard_size": 2}, "use_hsdp=True"),
    ({"vae_patch_parallel_size": 2, "ulysses_degree": 2}, "ulysses_degree=2, vae_patch_parallel_size=2"),
    ({"cache_backend": "tea_cache"}, "cache_backend='tea_cache'"),
    ({"attention_backend": "sage_attn"}, "attention_backend='sage_attn'"),
    ({"attention_backend": "cudnn_fp8"}, "attention_backend='cudnn_fp8'"),
    ({"quantization": "fp8"}, "quantization='fp8'"),
    ({"enable_cpu_offload": True}, "enable_cpu_offload=True"),
    ({"enable_layerwise_offload": True}, "enable_layerwise_offload=True"),
]


@pytest.mark.parametrize("settings, named", REFUSED + [({"lora_modules": {"style": __file__}}, "lora_modules (style)")],
                         ids=[n.split("=")[0].split(" ")[0] for _, n in REFUSED] + ["lora_modules"])
def test_features_the_adapter_cannot_give_are_refused_at_start(tiny_checkpoint, settings, named):
    native = ", ".join(supported_models())
    with pytest.raises(ValueError) as err:
        _omni(tiny_checkpoint("pixart-sigma"), **settings)
    message = str(err.value)
    assert message.startswith(f"{named}: not available for PixArtSigmaPipeline through the diffusers adapter")
    assert f"native pipelines have these features: {native}" in message


def test_vae_tiling_uses_the_vaes_own(tiny_checkpoint):
    """vae_use_tiling turns on the diffusers VAE's own tiled decode: the output equals diffusers called
    after vae.enable_tiling() (PixArt decodes its 256x256 resolution bin, 8x8 tiles of the tiny VAE's
    32 pixels), and differs from the untiled decode."""
    from diffusers import PixArtSigmaPipeline

    path = tiny_checkpoint("pixart-sigma")
    sp = OmniDiffusionSamplingParams(height=32, width=32, num_inference_steps=2, seed=0, output_type="pt")
    with _omni(path, vae_use_tiling=True) as omni:
        tiled = omni.generate("a fox", sp)[0].images
    pipe = PixArtSigmaPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    untiled = pipe("a fox", height=32, width=32, num_inference_steps=2, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    pipe.vae.enable_tiling()
    reference = pipe("a fox", height=32, width=32, num_inference_steps=2, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    assert (tiled - reference).abs().max().item() <= 1e-6  # measured 0.0
    assert (tiled - untiled).abs().max().item() > 1e-3


def test_vae_slicing_uses_the_vaes_own(tiny_checkpoint):
    with _omni(tiny_checkpoint("pixart-sigma"), vae_use_slicing=True) as omni:
        assert omni.engine.executor.worker.pipeline.vae.use_slicing


PERMISSIVE_CACHE_DIT = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 1,
                        "max_continuous_cached_steps": -1, "residual_diff_threshold": 0.9}


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_cache_dit_through_the_adapter_uses_cache_dits_own_block_adapter(tiny_checkpoint, arch):
    """diffusers' FLUX (cache-dit merges its two block lists into one) and SD3 through the adapter cache
    steps. FLUX takes the calibrator asked for (TaylorSeer, which with 1 warm-up step forecasts nothing
    yet); SD3, whose last block returns no encoder stream, refuses one at start.
    Measured (2026-11-30, 4 steps): flux 3 cached steps, rel. L2 0.021; sd3 3, 0.015."""
    path = tiny_checkpoint(arch)
    sp = OmniDiffusionSamplingParams(num_inference_steps=4, seed=0, output_type="pt")
    with _omni(path, backend="diffusers") as omni:
        expected = omni.generate("a fox", sp)[0].images
    config = {**PERMISSIVE_CACHE_DIT, "calibrator": "taylorseer"}
    if arch == "sd3":
        with pytest.raises(ValueError, match="calibrator='taylorseer' cannot be used with the diffusers adapter's "
                                             "SD3Transformer2DModel"):
            _omni(path, backend="diffusers", cache_backend="cache_dit", cache_config=config)
        config = PERMISSIVE_CACHE_DIT
    with _omni(path, backend="diffusers", cache_backend="cache_dit", cache_config=config) as omni:
        out = omni.generate("a fox", sp)[0]
        transformer = omni.engine.executor.worker.pipeline.diffusers_pipeline.transformer
        context = transformer._context_manager.get_context(transformer._context_names[0])
        assert context.calibrator_config is None if arch == "sd3" else (
            context.calibrator_config.calibrator_type == "taylorseer")
        if arch == "sd3":  # as for the native SD3, skip-layer guidance's extra call defeats a step cache
            with pytest.raises(ValueError, match="skip_guidance_layers cannot be used here: skip-layer guidance"):
                omni.generate("a fox", OmniDiffusionSamplingParams(skip_guidance_layers=(1,), guidance_scale=5.0))
    assert out.metrics["cache_backend"] == "cache_dit" and out.metrics["cached_steps"] > 0
    assert 0 < ((out.images - expected).norm() / expected.norm()).item() <= 0.2


def test_regional_compile_finds_the_diffusers_models_repeated_blocks(tiny_checkpoint):
    """The engine compiles `_repeated_blocks` of every denoiser on CUDA; LTX declares its blocks, PixArt
    none (its blocks run eagerly)."""
    from diffserve.compile import compile_repeated_blocks
    from diffserve.testing import load_pipeline

    assert compile_repeated_blocks(load_pipeline(tiny_checkpoint("ltx-video")).transformer) == 2
    assert compile_repeated_blocks(load_pipeline(tiny_checkpoint("pixart-sigma")).transformer) == 0


def test_flash_attn_needs_diffusers_attention_dispatcher(tiny_checkpoint, monkeypatch):
    """flash_attn (where the engine picks it) maps to diffusers' "flash" on dispatcher-based models; a model
    with older attention processors is refused rather than silently left on sdpa."""
    import diffserve.layers.attention as attention
    from diffserve.layers.attention.backends.flash_attn import FlashAttnBackend
    from diffusers import LTXVideoTransformer3DModel

    monkeypatch.setattr(attention, "select_attention_backend", lambda *args: FlashAttnBackend)
    chosen = []
    monkeypatch.setattr(LTXVideoTransformer3DModel, "set_attention_backend", lambda self, name: chosen.append(name))
    with _omni(tiny_checkpoint("ltx-video"), attention_backend="flash_attn"):
        pass
    assert chosen == ["flash"]
    with pytest.raises(ValueError, match="PixArtTransformer2DModel \\(transformer\\) does not run its attention "
                                         "through diffusers' attention dispatcher"):
        _omni(tiny_checkpoint("pixart-sigma"), attention_backend="flash_attn")


# -- progress and abort --------------------------------------------------------------------------------


def _request(omni, prompts, **params):
    sp = OmniDiffusionSamplingParams(seed=0, **params)
    return omni.engine.admit(OmniDiffusionRequest(prompts=[PromptInput.from_user(p, sp) for p in prompts],
                                                  sampling_params=sp))


def _count_denoiser_calls(omni) -> list[int]:
    count = [0]
    omni.engine.executor.worker.pipeline.transformer.register_forward_pre_hook(
        lambda *_: count.__setitem__(0, count[0] + 1))
    return count


# PixArt reports steps through diffusers' legacy `callback`, LTX through `callback_on_step_end`.
@pytest.mark.parametrize("arch", ["pixart-sigma", "ltx-video"])
def test_progress_follows_the_diffusers_steps(tiny_checkpoint, arch):
    with _omni(tiny_checkpoint(arch)) as omni:
        seen = []
        omni.engine.run_batch([_request(omni, ["a fox"], num_inference_steps=3)], lambda d, t: seen.append((d, t)))
        # Two diffusers calls (LTX takes negative prompts for all prompts or none): one count over both.
        mixed = [{"prompt": "a fox", "negative_prompt": "blurry"}, "a car"]
        seen_mixed = []
        omni.engine.run_batch([_request(omni, mixed, num_inference_steps=2)], lambda d, t: seen_mixed.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    calls = 1 if arch == "pixart-sigma" else 2  # PixArt fills a missing negative prompt with ""
    assert seen_mixed == [(i, 2 * calls) for i in range(1, 2 * calls + 1)]


@pytest.mark.parametrize("arch", ["pixart-sigma", "ltx-video"])
def test_abort_stops_diffusers_between_steps(tiny_checkpoint, arch):
    with _omni(tiny_checkpoint(arch)) as omni:
        calls = _count_denoiser_calls(omni)
        out = omni.engine.run_batch([_request(omni, ["a fox"], num_inference_steps=5)],
                                    lambda done, total: omni.engine.executor.request_abort())[0]
        assert out.error_type == "aborted" and calls[0] == 1  # stopped after the first step (CFG batched)
        # The engine keeps serving.
        after = omni.engine.run_batch([_request(omni, ["a fox"], num_inference_steps=2)])[0]
    assert after.ok and calls[0] == 3


def test_stage_metrics(tiny_checkpoint):
    with _omni(tiny_checkpoint("pixart-sigma")) as omni:
        out = omni.generate({"prompt": "a fox", "seed": 1}, OmniDiffusionSamplingParams(num_inference_steps=2))[0]
    m = out.metrics
    assert 0 < m["encode_denoise_s"] and 0 < m["decode_s"]
    assert m["encode_denoise_s"] + m["decode_s"] == pytest.approx(m["diffusers_call_s"])
    assert m["num_inference_steps"] == 2 and out.images[0].size == (32, 32)


def test_emulated_outputs_per_prompt(tiny_checkpoint):
    """Without a num_*_per_prompt keyword, each prompt is repeated once per output, with its generator."""
    from diffserve.models.diffusers_adapter.call_plan import call_kwargs
    from diffserve.testing import load_pipeline, pipeline_request

    pipeline = load_pipeline(tiny_checkpoint("pixart-sigma"))
    req = pipeline_request(pipeline, [{"prompt": "a", "seed": 1, "negative_prompt": "x"}, {"prompt": "b", "seed": 2}],
                           OmniDiffusionSamplingParams(num_outputs_per_prompt=2))
    import dataclasses

    plan = dataclasses.replace(pipeline.plan, outputs_per_prompt=None)
    kwargs = call_kwargs(plan, req, [0, 1])
    assert kwargs["prompt"] == ["a", "a", "b", "b"] and kwargs["negative_prompt"] == ["x", "x", "", ""]
    gens = kwargs["generator"]
    assert len(gens) == 4 and gens[0] is gens[1] and gens[2] is gens[3] and gens[0] is not gens[2]
    assert "num_images_per_prompt" not in kwargs


def test_cuda_graphs_are_refused_through_the_adapter(monkeypatch):
    from diffserve.config import OmniDiffusionConfig
    from diffserve.models.diffusers_adapter.features import refused_settings

    monkeypatch.setattr(OmniDiffusionConfig, "_check_cuda_graphs", lambda self: None)  # no GPU needed to ask
    assert "cuda_graphs=True" in refused_settings(OmniDiffusionConfig(model="m", cuda_graphs=True))
