"""The package's one progress bar (rich, on stderr): training steps, sampling steps, data preparation.

    with progress_bar("train", total=steps, enabled=show, completed=start, extra=("loss {task.fields[loss]:.4g}",),
                      loss=float("nan")) as bar:
        bar.update(completed=step, loss=value)

Disabled, it renders nothing and every call is a no-op, so callers never branch on it. rich is imported only when
a bar is shown (``--help`` stays fast).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["ProgressBar", "progress_bar"]


class ProgressBar:
    """``label | bar | done/total | extra columns | elapsed | ETA``; inert when disabled."""

    def __init__(self, label: str, total: int | None, *, enabled: bool = True, completed: int = 0,
                 extra: Sequence[str] = (), eta: bool = True, **fields: Any) -> None:
        self._bar: Any = None
        self._task: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns: list[Any] = [TextColumn(f"[bold]{label}[/bold]"), BarColumn(), MofNCompleteColumn(),
                              *(TextColumn(text) for text in extra), TimeElapsedColumn()]
        if eta:
            columns += [TextColumn("ETA"), TimeRemainingColumn()]
        self._bar = Progress(*columns, console=Console(stderr=True, soft_wrap=True))
        self._task = self._bar.add_task(label, total=total, completed=completed, **fields)
        self._bar.start()

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    @property
    def completed(self) -> float:
        """Steps done so far (0 when disabled)."""
        return self._bar.tasks[0].completed if self._bar is not None else 0.0

    def update(self, *, completed: float | None = None, advance: float | None = None, total: float | None = None,
               **fields: Any) -> None:
        """Move to ``completed`` (or by ``advance``), optionally change ``total`` and the extra columns' fields."""
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, advance=advance, total=total, **fields)

    def close(self) -> None:
        """Stop rendering (the last state stays on screen)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(label: str, total: int | None, *, enabled: bool = True, completed: int = 0,
                 extra: Sequence[str] = (), eta: bool = True, **fields: Any) -> ProgressBar:
    """A started `ProgressBar` (see the module docstring); ``fields`` are the initial values of ``extra``'s
    ``{task.fields[NAME]}`` placeholders."""
    return ProgressBar(label, total, enabled=enabled, completed=completed, extra=extra, eta=eta, **fields)
