"""Progress bars for long work: tqdm on stderr with an ETA, all switched off at once by ``fastedit -q``.

Library code asks `bar(...)` for a bar instead of building tqdm itself, so one switch (`set_enabled`, or
``$FASTEDIT_PROGRESS=0``) hides every bar; a caller's own ``progress=False`` still hides its bar.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable, Iterator, Sized
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
PROGRESS_ENV = "FASTEDIT_PROGRESS"
_enabled: bool | None = None


def set_enabled(enabled: bool) -> None:
    """Show (True) or hide (False) every fastedit progress bar in this process, and make hidden the default of
    any other tqdm bar that does not choose for itself (tqdm reads $TQDM_DISABLE only when it is imported, which
    has happened by the time the CLI parses -q, so the default is set on tqdm's constructor instead)."""
    global _enabled
    _enabled = enabled
    import tqdm.std

    init = tqdm.std.tqdm.__dict__.get("__init__")
    if isinstance(init, functools.partialmethod):  # tqdm >= 4.66 wraps __init__ to apply $TQDM_* defaults
        init.keywords["disable"] = not enabled


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get(PROGRESS_ENV, "1") not in ("0", "false", "no")


def bar(*, total: float | None = None, desc: str = "", unit: str = "it", show: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar on stderr (hidden when progress is off or ``show`` is False); use as a context manager."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not (show and enabled()), leave=False, **kwargs)


def track(items: Iterable[T], *, desc: str = "", unit: str = "it", show: bool = True, total: int | None = None
          ) -> Iterator[T]:  # fmt: skip
    """Iterate ``items`` with a bar (its length is the total when it has one)."""
    n = total if total is not None else (len(items) if isinstance(items, Sized) else None)
    with bar(total=n, desc=desc, unit=unit, show=show) as b:
        for item in items:
            yield item
            b.update(1)


@contextlib.contextmanager
def phases(desc: str, names: list[str], show: bool = True) -> Iterator[Any]:
    """A bar over named phases of one slow step without finer progress (e.g. GGUF conversion): ``step(name)``
    advances it and shows the phase now running, with the elapsed time."""
    with bar(total=len(names), desc=desc, unit="phase", show=show) as b:
        b.set_postfix_str(names[0])

        def step(name: str | None = None) -> None:
            b.update(1)
            if name:
                b.set_postfix_str(name)

        yield step
