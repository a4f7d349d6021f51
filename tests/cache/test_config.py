"""cache_config is parsed into the backend's typed dataclass, strictly, and flows from the CLI."""

import pytest

from diffserve.cache import CacheDiTConfig, TeaCacheConfig, parse_cache_config
from diffserve.config import OmniDiffusionConfig
from diffserve.entrypoints.cli import build_parser, engine_kwargs, main


def test_backend_defaults_are_typed_configs():
    assert OmniDiffusionConfig(model="m", cache_backend="cache_dit").cache_config == CacheDiTConfig()
    assert OmniDiffusionConfig(model="m", cache_backend="tea_cache").cache_config == TeaCacheConfig()
    assert OmniDiffusionConfig(model="m").cache_config is None


def test_dict_becomes_the_backends_dataclass():
    config = OmniDiffusionConfig(
        model="m", cache_backend="cache_dit", cache_config={"Fn_compute_blocks": 2, "residual_diff_threshold": 0.12}
    ).cache_config
    assert isinstance(config, CacheDiTConfig)
    # Unset fields stay None until the backend resolves them against each transformer.
    assert (config.Fn_compute_blocks, config.residual_diff_threshold, config.max_warmup_steps) == (2, 0.12, None)
    assert config.user_set() == ("Fn_compute_blocks", "residual_diff_threshold")
    tea = parse_cache_config("tea_cache", {"rel_l1_thresh": 0.4, "coefficients": [1, 0.5]})
    assert tea == TeaCacheConfig(rel_l1_thresh=0.4, coefficients=(1.0, 0.5))


def test_unknown_key_is_named_with_the_allowed_ones():
    allowed = (
        "calibrator, cfg_truncation_step, coefficients, compute_last_step, fixed_schedule, "
        "max_continuous_cached_steps, rel_l1_thresh, reuse, taylorseer_order, warmup_steps"
    )
    with pytest.raises(TypeError, match=rf"'rel_l1_threshold'.*Allowed: {allowed}"):
        OmniDiffusionConfig(model="m", cache_backend="tea_cache", cache_config={"rel_l1_threshold": 0.2})
    # A key of the other backend is unknown too.
    with pytest.raises(TypeError, match=r"unknown cache_dit cache_config key\(s\): 'rel_l1_thresh'.*Fn_compute_blocks"):
        OmniDiffusionConfig(model="m", cache_backend="cache_dit", cache_config={"rel_l1_thresh": 0.2})


@pytest.mark.parametrize(
    "backend, values, message",
    [
        ("cache_dit", {"Fn_compute_blocks": 0}, "Fn_compute_blocks must be an integer >= 1, got 0"),
        ("cache_dit", {"Bn_compute_blocks": 1.5}, "Bn_compute_blocks must be an integer >= 0"),
        ("cache_dit", {"max_warmup_steps": True}, "max_warmup_steps must be an integer"),
        ("cache_dit", {"max_cached_steps": -2}, "max_cached_steps must be an integer >= -1"),
        ("cache_dit", {"residual_diff_threshold": "0.2"}, "residual_diff_threshold must be a finite number"),
        ("cache_dit", {"residual_diff_threshold": -0.1}, "residual_diff_threshold must be a finite number >= 0"),
        ("cache_dit", {"calibrator": "taylor"}, "calibrator must be one of none, taylorseer, foca, dmd, got 'taylor'"),
        ("cache_dit", {"taylorseer_order": 0}, "taylorseer_order must be an integer >= 1"),
        ("tea_cache", {"rel_l1_thresh": float("nan")}, "rel_l1_thresh must be a finite number"),
        ("tea_cache", {"warmup_steps": 0}, "warmup_steps must be an integer >= 1"),
        ("tea_cache", {"calibrator": "foca"}, "calibrator must be one of none, taylorseer, got 'foca'"),
        ("tea_cache", {"reuse": "hidden"}, "reuse must be one of residual, output, got 'hidden'"),
        ("tea_cache", {"compute_last_step": 0}, "compute_last_step must be true or false, got 0"),
        ("tea_cache", {"coefficients": "1,2"}, "coefficients must be a list of numbers"),
        ("tea_cache", {"coefficients": []}, "coefficients must have at least one number"),
        ("tea_cache", {"coefficients": [1, None]}, r"coefficients\[1\] must be a finite number"),
        ("tea_cache", {"fixed_schedule": 1}, "fixed_schedule must be true or false, got 1"),
        ("tea_cache", {"fixed_schedule": True}, r"fixed_schedule=true needs reuse='output' \(given explicitly\)"),
        ("tea_cache", {"cfg_truncation_step": -2}, "cfg_truncation_step must be an integer >= -1, got -2"),
        ("tea_cache", {"cfg_truncation_step": 2.0}, "cfg_truncation_step must be an integer >= -1"),
    ],
)
def test_bad_values_are_rejected_before_loading(backend, values, message):
    with pytest.raises(ValueError, match=message):
        OmniDiffusionConfig(model="m", cache_backend=backend, cache_config=values)


def test_cache_config_needs_a_backend_of_the_same_kind():
    with pytest.raises(ValueError, match="without a cache_backend"):
        OmniDiffusionConfig(model="m", cache_config={"rel_l1_thresh": 0.2})
    with pytest.raises(ValueError, match="takes a CacheDiTConfig, got a TeaCacheConfig"):
        OmniDiffusionConfig(model="m", cache_backend="cache_dit", cache_config=TeaCacheConfig())
    with pytest.raises(ValueError, match="cache_config must be a dict"):
        OmniDiffusionConfig(model="m", cache_backend="cache_dit", cache_config=[("Fn_compute_blocks", 1)])


def test_typed_config_passes_through():
    config = TeaCacheConfig(rel_l1_thresh=0.6)
    assert OmniDiffusionConfig(model="m", cache_backend="tea_cache", cache_config=config).cache_config is config


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_cli_flags_reach_the_engine_config(command):
    argv = [command, "a prompt"] if command == "generate" else [command, "some/model"]
    args = build_parser().parse_args(
        argv + ["--cache-backend", "cache_dit", "--cache-config", '{"Fn_compute_blocks": 2, "max_warmup_steps": 6}']
    )
    config = OmniDiffusionConfig.from_kwargs("m", **engine_kwargs(args)).cache_config
    assert config == CacheDiTConfig(Fn_compute_blocks=2, max_warmup_steps=6)


def test_cli_generate_with_tea_cache(tiny_flux, tmp_path, capsys):
    out = tmp_path / "fox.png"
    code = main([
        "generate", "a fox", "--model", tiny_flux, "--dtype", "float32", "--device", "cpu", "--height", "32",
        "--width", "32", "--steps", "4", "--max-sequence-length", "8", "--seed", "0", "-o", str(out),
        "--disable-progress-bar", "--cache-backend", "tea_cache", "--cache-config", '{"rel_l1_thresh": 1000}',
    ])
    assert code == 0 and out.exists()
    assert "wrote" in capsys.readouterr().out


def test_separate_cfg_is_refused_because_cfg_branches_run_in_one_call():
    """cache-dit's separate-CFG mode pairs alternate transformer calls as the two branches of a step;
    diffserve batches both branches into one call per step, so the mode cannot apply."""
    assert CacheDiTConfig(enable_separate_cfg=False).enable_separate_cfg is False
    with pytest.raises(ValueError, match=r"enable_separate_cfg=True does not apply to diffserve: .*one batched call"):
        OmniDiffusionConfig(model="m", cache_backend="cache_dit", cache_config={"enable_separate_cfg": True})


class _Declares:
    _cache_defaults = {"tea_cache": {"rel_l1_thresh": 0.05, "warmup_steps": 3},
                       "cache_dit": {"residual_diff_threshold": 0.3, "calibrator": "taylorseer"}}


def test_unset_fields_take_the_models_defaults_then_the_builtin_ones_and_user_values_win():
    from diffserve.cache.config import resolve_for

    tea = resolve_for(TeaCacheConfig(), _Declares())
    assert (tea.rel_l1_thresh, tea.warmup_steps, tea.coefficients) == (0.05, 3, None)
    assert resolve_for(TeaCacheConfig(rel_l1_thresh=0.5), _Declares()).rel_l1_thresh == 0.5
    dit = resolve_for(CacheDiTConfig(max_warmup_steps=2), _Declares())
    assert dit == CacheDiTConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2, max_cached_steps=-1,
                                 max_continuous_cached_steps=3, residual_diff_threshold=0.3, calibrator="taylorseer",
                                 taylorseer_order=1)
    assert dit.is_resolved() and dit.strify() == "DBCache_F1B0_W2_M-1_MC3_R0.3_T1O1"
    # A model without a declaration gets the built-in defaults.
    assert resolve_for(TeaCacheConfig(), object()) == TeaCacheConfig(
        rel_l1_thresh=0.1, warmup_steps=1, max_continuous_cached_steps=-1, calibrator="none", taylorseer_order=1,
        reuse="residual", compute_last_step=True,
    )


def test_a_models_declared_defaults_are_checked_like_user_values():
    from diffserve.cache.config import resolve_for

    class Typo:
        _cache_defaults = {"tea_cache": {"rel_l1_threshold": 0.1}}

    class BadValue:
        _cache_defaults = {"cache_dit": {"Fn_compute_blocks": 0}}

    class UnknownBackend:
        _cache_defaults = {"teacache": {}}

    with pytest.raises(TypeError, match=r"unknown Typo._cache_defaults\['tea_cache'\] key\(s\): 'rel_l1_threshold'"):
        resolve_for(TeaCacheConfig(), Typo())
    with pytest.raises(ValueError, match=r"BadValue._cache_defaults\['cache_dit'\]: Fn_compute_blocks must be"):
        resolve_for(CacheDiTConfig(), BadValue())
    with pytest.raises(TypeError, match=r"unknown UnknownBackend._cache_defaults backend key\(s\): 'teacache'"):
        resolve_for(TeaCacheConfig(), UnknownBackend())


@pytest.mark.parametrize(
    "engine, message",
    [
        ({"batching": "step"}, "cfg_truncation_step cannot be used with batching='step'"),
        ({"parallel_config": {"cfg_parallel_size": 2}}, "cfg_truncation_step cannot be used with cfg_parallel_size=2"),
    ],
)
def test_cfg_truncation_is_refused_where_a_call_cannot_follow_one_step(engine, message):
    truncated = {"cfg_truncation_step": 8}
    OmniDiffusionConfig(model="m", cache_backend="tea_cache", cache_config=truncated)
    OmniDiffusionConfig(model="m", cache_backend="tea_cache", **engine)
    with pytest.raises(ValueError, match=message):
        OmniDiffusionConfig(model="m", cache_backend="tea_cache", cache_config=truncated, **engine)
