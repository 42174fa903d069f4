"""Progress of the model tools' long loops (one step per layer): tqdm where it is installed, a
line per step otherwise; on by default only where stderr is a terminal."""

from __future__ import annotations

import sys
import time


def steps(items, *, what: str, progress=None, name=lambda item: str(item)):
    """Yield ``items``, showing ``what``, the current item's ``name`` and an ETA on stderr.

    ``progress``: True / False, or None for "where stderr is a terminal"."""
    items = list(items)
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not progress or not items:
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield from _plain(items, what, name)
        return
    bar = tqdm(items, desc=what, unit="layer", file=sys.stderr, leave=False)
    for item in bar:
        bar.set_postfix_str(name(item), refresh=False)
        yield item


def _plain(items, what, name):
    start = time.perf_counter()
    for i, item in enumerate(items):
        done = time.perf_counter() - start
        eta = f", about {done / i * (len(items) - i):.0f} s left" if i else ""
        print(f"{what}: {i + 1}/{len(items)} {name(item)}{eta}", file=sys.stderr, flush=True)
        yield item
