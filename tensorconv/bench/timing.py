"""Timing: medians of interleaved runs (``tensorconv._timing``, shared with the compression
planner), and a progress line."""

from __future__ import annotations

import sys

from .._timing import _sync, measure, measure_many  # noqa: F401  (the suites import them from here)


class _Progress:
    def __init__(self, total, label):
        self.total, self.done, self.label = total, 0, label
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False)
            except ImportError:
                pass

    def step(self, what):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what[:40])
            self.bar.update(1)
        else:
            print(f"[{self.label} {self.done}/{self.total}] {what}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
