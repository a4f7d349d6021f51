"""A tqdm progress bar over the denoise loop, plus a per-step callback for progress reporting."""

from __future__ import annotations

from typing import Any, Callable

from tqdm.auto import tqdm


class ProgressBarMixin:
    _progress_bar_config: dict[str, Any]
    # Called as callback(steps_done, total_steps) after each step (e.g. the server's job progress).
    _step_callback: Callable[[int, int], None] | None = None

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm keyword arguments; `disable=True` turns the bar off."""
        self._progress_bar_config = dict(kwargs)

    def set_step_callback(self, callback: Callable[[int, int], None] | None) -> None:
        self._step_callback = callback

    def progress_bar(self, total: int) -> "_Progress":
        config = getattr(self, "_progress_bar_config", {})
        bar = tqdm(total=total, desc="denoise", unit="step", leave=False, **config)
        return _Progress(bar, total, self._step_callback)


class _Progress:
    def __init__(self, bar: tqdm, total: int, callback: Callable[[int, int], None] | None):
        self.bar, self.total, self.callback, self.done = bar, total, callback, 0

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        if self.callback is not None:
            self.callback(self.done, self.total)
