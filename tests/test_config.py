import re

import pytest

from diffserve.config import DiffusionParallelConfig, OmniDiffusionConfig
from diffserve.request import OmniDiffusionSamplingParams, PromptInput


def test_unknown_engine_key_names_it_and_lists_allowed():
    with pytest.raises(TypeError) as err:
        OmniDiffusionConfig.from_kwargs("m", tensor_paralel_size=2, dtyp="bf16")
    msg = str(err.value)
    assert "'dtyp'" in msg and "'tensor_paralel_size'" in msg
    assert "tensor_parallel_size" in msg and "attention_backend" in msg


def test_flat_parallel_keys_build_parallel_config():
    cfg = OmniDiffusionConfig.from_kwargs("m", tensor_parallel_size=2, cfg_parallel_size=2)
    assert cfg.parallel_config.tensor_parallel_size == 2
    assert cfg.parallel_config.world_size == 4


def test_flat_keys_and_parallel_config_together_is_an_error():
    with pytest.raises(TypeError, match="not both"):
        OmniDiffusionConfig.from_kwargs("m", parallel_config=DiffusionParallelConfig(), ulysses_degree=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cfg_parallel_size": 3}, "cfg_parallel_size must be 1 or 2"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be a positive integer"),
        ({"use_hsdp": True, "tensor_parallel_size": 2}, "cannot be combined"),
        ({"use_hsdp": True, "ulysses_degree": 4, "hsdp_shard_size": 3}, r"must equal the ranks of one replica \(4\)"),
        ({"hsdp_shard_size": 2}, "only meaningful with use_hsdp"),
        ({"use_hsdp": True}, "HSDP on its own needs hsdp_shard_size"),
        ({"vae_patch_parallel_size": 3, "ulysses_degree": 4}, "must divide the ranks of one replica"),
        ({"vae_patch_parallel_size": 8, "ulysses_degree": 4}, "cannot exceed the ranks of one replica"),
        # The VAE is decoded inside one replica: replicas never communicate.
        ({"vae_patch_parallel_size": 2, "data_parallel_size": 2}, r"cannot exceed the ranks of one replica \(1\)"),
        ({"data_parallel_size": 0}, "data_parallel_size must be a positive integer"),
    ],
)
def test_parallel_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffusionParallelConfig(**kwargs)


def test_parallel_config_world_size_and_hsdp_default_shard():
    assert DiffusionParallelConfig(ulysses_degree=2, ring_degree=2, cfg_parallel_size=2).world_size == 8
    cfg = DiffusionParallelConfig(ulysses_degree=4, use_hsdp=True, hsdp_replicate_size=2)
    assert cfg.sequence_parallel_size == 4 and cfg.world_size == 4
    assert cfg.resolved_hsdp_shard_size == 2


def test_world_size_is_the_replica_ranks_times_data_parallel_replicas():
    cfg = DiffusionParallelConfig(ulysses_degree=2, data_parallel_size=4)  # DP 4 x Ulysses 2 on 8 GPUs
    assert cfg.replica_world_size == 2 and cfg.world_size == 8
    hsdp = DiffusionParallelConfig(use_hsdp=True, hsdp_shard_size=2, data_parallel_size=2)
    assert hsdp.replica_world_size == 2 and hsdp.world_size == 4 and hsdp.resolved_hsdp_shard_size == 2
    assert DiffusionParallelConfig(data_parallel_size=3).replica_world_size == 1


def test_data_parallel_refuses_one_named_gpu():
    with pytest.raises(ValueError, match="names one GPU, but data_parallel_size=2"):
        OmniDiffusionConfig.from_kwargs("m", device="cuda:1", data_parallel_size=2)


def test_standalone_hsdp_sets_the_world_size():
    assert DiffusionParallelConfig(use_hsdp=True, hsdp_shard_size=2).world_size == 2
    assert DiffusionParallelConfig(use_hsdp=True, hsdp_shard_size=2, hsdp_replicate_size=2).world_size == 4


def test_parallel_config_from_dict_rejects_unknown():
    with pytest.raises(TypeError, match="'tp'"):
        DiffusionParallelConfig.from_dict({"tp": 2})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "float8"}, "dtype 'float8' is not supported"),
        ({"device": "tpu"}, "device must be"),
        ({"cache_backend": "magic"}, "cache_backend must be one of"),
        ({"max_batch_size": 0}, "max_batch_size must be a positive integer"),
        ({"enable_cpu_offload": "yes"}, "enable_cpu_offload must be a bool"),
        ({"enable_layerwise_offload": True, "layerwise_prefetch": -1}, "layerwise_prefetch must be an integer >= 0"),
        ({"layerwise_prefetch": 2}, "layerwise_prefetch is only meaningful with enable_layerwise_offload"),
        ({"max_gpu_memory": 0}, "max_gpu_memory must be a positive number of GiB"),
        ({"enable_cpu_offload": True, "parallel_config": {"use_hsdp": True, "hsdp_shard_size": 2}},
         "CPU offload cannot be combined with use_hsdp"),
        ({"cuda_graphs": 1}, "cuda_graphs must be a bool"),
        ({"cuda_graphs": True, "device": "cpu"}, "cuda_graphs needs a CUDA device, the engine would run on cpu"),
    ],
)
def test_engine_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OmniDiffusionConfig(model="m", **kwargs)


def test_auto_dtype_is_fp32_on_cpu():
    import torch

    assert OmniDiffusionConfig(model="m", device="cpu").torch_dtype == torch.float32
    assert OmniDiffusionConfig(model="m", device="cpu", dtype="bf16").torch_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 0}, "height must be > 0"),
        ({"width": "512"}, "width must be an integer"),
        ({"num_inference_steps": -1}, "num_inference_steps must be > 0"),
        ({"guidance_scale": "high"}, "guidance_scale must be a number"),
        ({"seed": -1}, "seed must be an integer"),
        ({"seed": 2**64}, "seed must be an integer"),
        ({"output_type": "jpeg"}, "output_type must be one of"),
        ({"num_outputs_per_prompt": 0}, "num_outputs_per_prompt must be > 0"),
        ({"true_cfg_scale": -2}, "true_cfg_scale must be >= 0"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OmniDiffusionSamplingParams(**kwargs)


def test_sampling_params_from_dict_rejects_unknown_key():
    with pytest.raises(TypeError, match="'stepz'"):
        OmniDiffusionSamplingParams.from_dict({"stepz": 3})


def test_prompt_input_accepts_str_and_dict_and_draws_a_seed():
    params = OmniDiffusionSamplingParams()
    p = PromptInput.from_user("a fox", params)
    assert p.prompt == "a fox" and isinstance(p.seed, int) and p.negative_prompt is None
    q = PromptInput.from_user({"prompt": "a fox", "negative_prompt": "blur", "seed": 5}, params)
    assert (q.seed, q.negative_prompt) == (5, "blur")


@pytest.mark.parametrize(
    "prompt, error, message",
    [
        (42, ValueError, "must be a string or a dict"),
        ({"text": "x"}, TypeError, "'text'"),
        ({"prompt": 3}, ValueError, "'prompt' must be a string"),
        ({"prompt": "x", "negative_prompt": 1}, ValueError, "'negative_prompt' must be a string"),
    ],
)
def test_prompt_input_rejects_bad_prompts(prompt, error, message):
    with pytest.raises(error, match=message):
        PromptInput.from_user(prompt, OmniDiffusionSamplingParams())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cache_backend": "tea_cache", "enable_cpu_offload": True},
         r"cuda_graphs cannot be combined with cache_backend, enable_cpu_offload \(a recorded graph"),
        ({"batching": "step"}, "cuda_graphs cannot be combined with batching='step'"),
        ({"parallel_config": {"tensor_parallel_size": 2}}, "cuda_graphs cannot be combined with a parallel replica"),
        ({"lora_modules": {"style": __file__}}, "cuda_graphs cannot be combined with lora_modules"),
    ],
)
def test_cuda_graphs_refuse_features_that_change_the_work_per_call(monkeypatch, kwargs, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    with pytest.raises(ValueError, match=message):
        OmniDiffusionConfig(model="m", cuda_graphs=True, **kwargs)


@pytest.mark.parametrize("config, message", [
    ({"unquantized_steps": -1}, "unquantized_steps must be a whole number of steps"),
    ({"unquantized_steps": 2.5, "quantization": "fp8"}, "unquantized_steps must be a whole number of steps"),
    ({"unquantized_steps": 4}, "unquantized_steps=4 needs quantization='fp8'"),
    ({"unquantized_steps": 4, "quantization": "fp8", "enable_cpu_offload": True},
     "unquantized_steps cannot be combined with enable_cpu_offload"),
    ({"unquantized_steps": 4, "quantization": "fp8", "use_hsdp": True, "hsdp_shard_size": 2},
     "unquantized_steps cannot be combined with use_hsdp"),
])
def test_unquantized_steps_are_checked(config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        OmniDiffusionConfig.from_kwargs("demo", device="cpu", **config)
