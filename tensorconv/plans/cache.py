"""conv()'s own plans: bounded per kernel structure and in all, least recently used out.

A plan depends on the kernel's structure and on the input's shape. One layer fed inputs of many
sizes (variable-length sequences, images of several resolutions) makes one plan per size; a
single bound on all plans let such a model evict every other layer's plans, and each eviction
meant planning again. Here each structure keeps its own most recent shapes, so a model's layers
cannot push each other out, and the total stays bounded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["PlanCache"]


class PlanCache:
    """Plans by ``(group, rest)``: at most ``per_group`` entries per group and ``total`` in all.

    ``group`` is what a layer keeps from call to call (the registry state and the kernel's
    structure), ``rest`` the call's arguments (the input's shape, geometry, dtype ...).
    """

    def __init__(self, make: Callable[..., Any], *, per_group: int = 256, total: int = 4096) -> None:
        if per_group < 1 or total < per_group:
            raise ValueError(f"per_group={per_group}, total={total}: expected 1 <= per_group <= total")
        self._make = make
        self.per_group = per_group
        self.total = total
        self._groups: OrderedDict[Any, OrderedDict[Any, Any]] = OrderedDict()
        self._size = 0
        self.hits = 0

    def __len__(self) -> int:
        return self._size

    def get(self, group: Any, rest: tuple) -> Any:
        """The plan for ``(group, rest)``, made by ``make(*rest)`` on a miss."""
        plans = self._groups.get(group)
        if plans is not None:
            self._groups.move_to_end(group)
            plan = plans.get(rest)
            if plan is not None:
                plans.move_to_end(rest)
                self.hits += 1
                return plan
        plan = self._make(*rest)
        if plans is None:
            plans = self._groups[group] = OrderedDict()
        plans[rest] = plan
        self._size += 1
        if len(plans) > self.per_group:
            plans.popitem(last=False)
            self._size -= 1
        while self._size > self.total:  # the least recently used group gives up its oldest plan
            oldest = next(iter(self._groups))
            victims = self._groups[oldest]
            victims.popitem(last=False)
            self._size -= 1
            if not victims:
                del self._groups[oldest]
        return plan
