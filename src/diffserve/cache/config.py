"""Typed step-cache configuration, one dataclass per backend, and per-model defaults.

`OmniDiffusionConfig(cache_backend=..., cache_config={...})` parses the dict into the backend's
dataclass: an unknown key is an error that names it and lists the allowed ones, and every value is
type- and range-checked here, before a model is loaded.

A tuning field the user leaves unset stays None until the backend is enabled on a pipeline; each
transformer then fills it from its own declaration (`_cache_defaults = {"cache_dit": {...},
"tea_cache": {...}}`, next to its TeaCache coefficients), else from the backend's built-in default
(`BUILTIN_DEFAULTS`). So a value the user gives always wins, and a model tuned for caching needs no
flags.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, TypeVar, Union

from diffserve.config import check_known_keys

C = TypeVar("C", bound="ModelDefaultsMixin")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


class ModelDefaultsMixin:
    """Unset (None) tuning fields, filled per transformer from the model's defaults, then built-ins."""

    # Field -> the value used when neither the user nor the model sets it.
    BUILTIN_DEFAULTS: ClassVar[dict[str, Any]]
    # The key of this backend in a transformer's `_cache_defaults`.
    BACKEND: ClassVar[str]

    def user_set(self) -> tuple[str, ...]:
        """The tuning fields given explicitly (by the user, or already resolved)."""
        return tuple(name for name in self.BUILTIN_DEFAULTS if getattr(self, name) is not None)

    def is_resolved(self) -> bool:
        return len(self.user_set()) == len(self.BUILTIN_DEFAULTS)

    def with_defaults(self: C, model_defaults: Mapping[str, Any], owner: str = "the model") -> C:
        """A copy with every unset tuning field taken from `model_defaults`, else the built-in default.

        `model_defaults` is a transformer's `_cache_defaults[BACKEND]`; `owner` names it in errors.
        """
        where = f"{owner}._cache_defaults[{self.BACKEND!r}]"
        if not isinstance(model_defaults, Mapping):
            raise ValueError(f"{where} must be a dict, got {model_defaults!r}")
        check_known_keys(where, dict(model_defaults), list(self.BUILTIN_DEFAULTS))
        try:
            type(self)(**model_defaults)  # the same checks as a user's values
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        filled = {
            name: model_defaults.get(name, builtin)
            for name, builtin in self.BUILTIN_DEFAULTS.items()
            if getattr(self, name) is None
        }
        return dataclasses.replace(self, **filled)


@dataclass
class CacheDiTConfig(ModelDefaultsMixin):
    """DBCache from the cache-dit library (`cache_backend="cache_dit"`).

    Per block list, the first `Fn_compute_blocks` blocks run every step; when the relative L1 change
    of their output residual since the last computed step is below `residual_diff_threshold`, the
    middle blocks are skipped and their cached residual is added instead (or, with a `calibrator`,
    a forecast of it from the last computed steps); the last `Bn_compute_blocks` blocks always run.

    Every field left None takes the model's default, else the built-in one (BUILTIN_DEFAULTS):
    DBCache "F1B0", the fastest setting that still decides from a computed block, without forecast.
    """

    BACKEND: ClassVar[str] = "cache_dit"
    BUILTIN_DEFAULTS: ClassVar[dict[str, Any]] = {
        "Fn_compute_blocks": 1,
        "Bn_compute_blocks": 0,
        "max_warmup_steps": 4,
        "max_cached_steps": -1,
        "max_continuous_cached_steps": 3,
        "residual_diff_threshold": 0.24,
        "calibrator": "none",
        "taylorseer_order": 1,
    }
    CALIBRATORS: ClassVar[tuple[str, ...]] = ("none", "taylorseer", "foca", "dmd")

    # Blocks at the start of each block list that always run; their residual decides the skip.
    # Fn + Bn must be below the list's block count.
    Fn_compute_blocks: int | None = None
    # Blocks at the end of each block list that always run, refining the cached approximation.
    Bn_compute_blocks: int | None = None
    # Steps at the start of each request (per transformer) that always run.
    max_warmup_steps: int | None = None
    # Most steps per request that may reuse the cache; -1: no limit.
    max_cached_steps: int | None = None
    # Most consecutive steps that may reuse the cache; -1: no limit.
    max_continuous_cached_steps: int | None = None
    # Skip while the relative L1 change is below this: higher is faster and lossier; 0 never skips.
    residual_diff_threshold: float | None = None
    # What a skipped step adds in place of the middle blocks: "none" the residual of the last computed
    # step; "taylorseer" its Taylor extrapolation from the last computed steps (TaylorSeer, Liu et al.
    # 2025, arXiv:2503.06923); "foca" a BDF2 forecast with a Heun correction (FoCa, arXiv:2508.16211);
    # "dmd" an exponential (dynamic mode decomposition) forecast. The forecasts need two or more
    # computed steps in a request before they differ from "none".
    calibrator: str | None = None
    # TaylorSeer's order (1: linear, 2: quadratic); read only with calibrator="taylorseer".
    taylorseer_order: int | None = None
    # cache-dit's separate-CFG mode counts two transformer calls per step (conditional, then
    # unconditional) and keeps a state per branch. diffserve runs both branches in one batched call
    # per step (or one branch per CFG-parallel rank), so the mode would pair the wrong calls: refused.
    enable_separate_cfg: bool = False

    def __post_init__(self) -> None:
        optional_checks = {
            "Fn_compute_blocks": lambda v: _check_int("Fn_compute_blocks", v, 1),
            "Bn_compute_blocks": lambda v: _check_int("Bn_compute_blocks", v, 0),
            "max_warmup_steps": lambda v: _check_int("max_warmup_steps", v, 0),
            "max_cached_steps": lambda v: _check_int("max_cached_steps", v, -1),
            "max_continuous_cached_steps": lambda v: _check_int("max_continuous_cached_steps", v, -1),
            "residual_diff_threshold": lambda v: _check_float("residual_diff_threshold", v),
            "calibrator": lambda v: _check_choice("calibrator", v, self.CALIBRATORS),
            "taylorseer_order": lambda v: _check_int("taylorseer_order", v, 1),
        }
        for name, check in optional_checks.items():
            if getattr(self, name) is not None:
                check(getattr(self, name))
        if self.enable_separate_cfg is not False:
            raise ValueError(
                f"enable_separate_cfg={self.enable_separate_cfg!r} does not apply to diffserve: cache-dit's "
                "separate CFG expects two transformer calls per step (conditional, then unconditional), but "
                "diffserve runs both CFG branches in one batched call per step (or one branch per CFG-parallel "
                "rank), so each step's skip decision already covers both. Allowed: false"
            )

    def strify(self) -> str:
        """Short tag for logs and benchmark tables, e.g. DBCache_F1B0_W4_M-1_MC3_R0.24 (+_T1O1 with
        TaylorSeer); unset fields show as '?' until the config is resolved against a model."""
        v = {name: "?" if getattr(self, name) is None else getattr(self, name) for name in self.BUILTIN_DEFAULTS}
        tag = (
            f"DBCache_F{v['Fn_compute_blocks']}B{v['Bn_compute_blocks']}_W{v['max_warmup_steps']}"
            f"_M{v['max_cached_steps']}_MC{v['max_continuous_cached_steps']}_R{v['residual_diff_threshold']}"
        )
        if self.calibrator == "taylorseer":
            return tag + f"_T1O{v['taylorseer_order']}"
        if self.calibrator in ("foca", "dmd"):
            return tag + f"_{self.calibrator.upper()}"
        return tag + ("_C?" if self.calibrator is None else "")


@dataclass
class TeaCacheConfig(ModelDefaultsMixin):
    """TeaCache (`cache_backend="tea_cache"`), diffserve's own implementation.

    Each step, the relative L1 change of the first block's timestep-modulated input is rescaled by a
    per-model polynomial and accumulated; while the sum stays below `rel_l1_thresh`, every transformer
    block is skipped and the residual they added on the last computed step is reused (or, with
    `reuse="output"`, the whole transformer's output). The first `warmup_steps` steps and, unless
    `compute_last_step` is false, the last step of a request always run.

    `rel_l1_thresh` and `warmup_steps` left None take the model's defaults, else the built-in ones.
    `fixed_schedule` and `cfg_truncation_step` are plain settings: no model declares them.
    """

    BACKEND: ClassVar[str] = "tea_cache"
    # Every calibrated model declares its own threshold, so the built-in one serves uncalibrated models
    # (no coefficients: the raw relative change decides). On the demo model's raw signal, 0.2 skipped
    # 11 of 20 steps with the worst image at 26.7 dB, 0.1 skipped 5-6 at 31.1 dB (docs/cache.md).
    BUILTIN_DEFAULTS: ClassVar[dict[str, Any]] = {
        "rel_l1_thresh": 0.1,
        "warmup_steps": 1,
        "max_continuous_cached_steps": -1,
        "calibrator": "none",
        "taylorseer_order": 1,
        "reuse": "residual",
        "compute_last_step": True,
    }
    CALIBRATORS: ClassVar[tuple[str, ...]] = ("none", "taylorseer")
    REUSES: ClassVar[tuple[str, ...]] = ("residual", "output")

    # Skip while the accumulated rescaled change is below this: higher is faster and lossier; 0 never
    # skips. Its scale depends on the model's coefficients, hence the per-model defaults.
    rel_l1_thresh: float | None = None
    # Steps at the start of each request that always run (TeaCache's "ret_steps"; at least the first,
    # which has nothing to compare with).
    warmup_steps: int | None = None
    # Most consecutive skipped steps (-1: no limit): a long run reuses one residual for too long, and
    # a short cap gives the forecast (calibrator) evenly spaced computed steps to extrapolate from.
    max_continuous_cached_steps: int | None = None
    # What a skipped step adds in place of the blocks: "none" the residual of the last computed step;
    # "taylorseer" its Taylor extrapolation in the step index from the last computed steps (TaylorSeer,
    # Liu et al. 2025, arXiv:2503.06923), of order `taylorseer_order` (read only with "taylorseer").
    calibrator: str | None = None
    taylorseer_order: int | None = None
    # What a skipped step reuses: "residual" adds what the blocks added on the last computed step to
    # this step's hidden states (TeaCache); "output" returns the transformer's output of the last
    # computed step (the predicted noise or velocity) and runs nothing after the first block's input.
    # On the demo model a reused residual, meeting a less noisy input, leaves noise in the image after
    # long runs of skips; the reused output does not (docs/cache.md). The calibrator forecasts either.
    reuse: str | None = None
    # False lets the last step reuse too: with reuse="output" the demo model's fastest setting at
    # >= 30 dB skips it and computes a middle step instead (docs/cache.md).
    compute_last_step: bool | None = None
    # Rescale polynomial, highest power first. None: the coefficients the transformer declares
    # (`_teacache_coefficients`), fitted for that model.
    coefficients: tuple[float, ...] | None = None
    # True: skip every step that warmup_steps, max_continuous_cached_steps and compute_last_step allow,
    # without the signal (rel_l1_thresh is not read). A skipped step then runs nothing of the
    # transformer, not even its embeddings, which the signal needs: on the demo model those cost 5% of
    # a computed step, 7% of what is left once 12 of 20 steps are skipped. Needs
    # reuse="output" (a reused residual needs the step's own hidden states).
    fixed_schedule: bool = False
    # From this step on, a pipeline with classifier-free guidance runs the conditional branch alone and
    # uses it unguided (guidance scale 1): half the transformer work of a computed step. Late steps add
    # detail that guidance barely steers; the guidance then changes direction from step to step, so
    # reusing an early step's guidance there costs more than dropping it (docs/cache.md). -1: never.
    cfg_truncation_step: int = -1

    def __post_init__(self) -> None:
        _check_bool("fixed_schedule", self.fixed_schedule)
        if self.fixed_schedule and self.reuse != "output":
            raise ValueError(f"fixed_schedule=true needs reuse='output' (given explicitly), got reuse={self.reuse!r}")
        _check_int("cfg_truncation_step", self.cfg_truncation_step, -1)
        if self.rel_l1_thresh is not None:
            _check_float("rel_l1_thresh", self.rel_l1_thresh)
        if self.warmup_steps is not None:
            _check_int("warmup_steps", self.warmup_steps, 1)
        if self.max_continuous_cached_steps is not None:
            _check_int("max_continuous_cached_steps", self.max_continuous_cached_steps, -1)
        if self.calibrator is not None:
            _check_choice("calibrator", self.calibrator, self.CALIBRATORS)
        if self.taylorseer_order is not None:
            _check_int("taylorseer_order", self.taylorseer_order, 1)
        if self.reuse is not None:
            _check_choice("reuse", self.reuse, self.REUSES)
        if self.compute_last_step is not None:
            _check_bool("compute_last_step", self.compute_last_step)
        if self.coefficients is not None:
            self.coefficients = _checked_coefficients(self.coefficients)

    def strify(self) -> str:
        threshold = "?" if self.rel_l1_thresh is None else self.rel_l1_thresh
        warmup = "?" if self.warmup_steps is None else self.warmup_steps
        tag = f"TeaCache_T{threshold}_W{warmup}"
        if self.max_continuous_cached_steps not in (None, -1):
            tag += f"_MC{self.max_continuous_cached_steps}"
        if self.calibrator == "taylorseer":
            tag += f"_T1O{'?' if self.taylorseer_order is None else self.taylorseer_order}"
        if self.reuse == "output":
            tag += "_OUT"
        if self.compute_last_step is False:
            tag += "_NL"
        if self.fixed_schedule:
            tag += "_FIXED"
        if self.cfg_truncation_step >= 0:
            tag += f"_CT{self.cfg_truncation_step}"
        return tag + ("_custom" if self.coefficients is not None else "")


def _checked_coefficients(values: Any) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"coefficients must be a list of numbers, got {values!r}")
    coefficients = tuple(values)
    if not coefficients:
        raise ValueError("coefficients must have at least one number")
    for i, c in enumerate(coefficients):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise ValueError(f"coefficients[{i}] must be a finite number, got {c!r}")
    return tuple(float(c) for c in coefficients)


CacheConfig = Union[CacheDiTConfig, TeaCacheConfig]

CACHE_CONFIG_CLASSES: dict[str, type] = {"cache_dit": CacheDiTConfig, "tea_cache": TeaCacheConfig}


def model_cache_defaults(transformer: Any, backend: str) -> Mapping[str, Any]:
    """What a transformer declares for `backend` in `_cache_defaults` (instance attribute or property:
    a model family whose sizes need different settings computes it from its config); {} if nothing."""
    declared = getattr(transformer, "_cache_defaults", None) or {}
    name = type(transformer).__name__
    if not isinstance(declared, Mapping):
        raise ValueError(f"{name}._cache_defaults must be a dict keyed by backend, got {declared!r}")
    check_known_keys(f"{name}._cache_defaults backend", dict(declared), list(CACHE_CONFIG_CLASSES))
    return declared.get(backend, {})


def resolve_for(config: C, transformer: Any) -> C:
    """`config` with its unset fields filled from `transformer`'s declared defaults, then built-ins."""
    return config.with_defaults(model_cache_defaults(transformer, config.BACKEND), type(transformer).__name__)


def parse_cache_config(backend: str | None, values: dict[str, Any] | CacheConfig | None) -> CacheConfig | None:
    """The typed config for `backend` from a dict (or an already typed config); None without a backend."""
    if backend is None:
        if values:
            raise ValueError(f"cache_config {values!r} was given without a cache_backend (cache_dit or tea_cache)")
        return None
    if backend not in CACHE_CONFIG_CLASSES:
        raise ValueError(f"cache_backend must be one of {', '.join(CACHE_CONFIG_CLASSES)}, got {backend!r}")
    cls = CACHE_CONFIG_CLASSES[backend]
    if values is None:
        return cls()
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        if not isinstance(values, cls):
            raise ValueError(f"cache_backend={backend!r} takes a {cls.__name__}, got a {type(values).__name__}")
        return values
    if not isinstance(values, dict):
        raise ValueError(f"cache_config must be a dict, got {type(values).__name__}")
    check_known_keys(f"{backend} cache_config", values, [f.name for f in dataclasses.fields(cls)])
    return cls(**values)
