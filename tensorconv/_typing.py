"""Names for the public API's annotations (the arrays are any supported library's)."""

from __future__ import annotations

from typing import Any, Union

#: an array of a supported library: numpy.ndarray, torch.Tensor, cupy.ndarray or jax.Array
Array = Any
#: one int for every spatial mode, or one per mode
IntOrTuple = Union[int, tuple[int, ...]]
#: an int, one per mode, (low, high) pairs per mode, "same" or "valid"
Padding = Union[int, str, tuple[Any, ...]]
#: a CP rank: an int, a fraction of the dense parameters, or "same"
Rank = Union[int, float, str]

__all__ = ["Array", "IntOrTuple", "Padding", "Rank"]
