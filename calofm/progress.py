"""Progress bars that TQDM_DISABLE=1 silences: an explicit `disable=False` would override the environment."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress(enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar; `enabled=False` (e.g. on non-main processes) always hides it, otherwise tqdm's env decides."""
    return tqdm(**kwargs) if enabled else tqdm(disable=True, **kwargs)
