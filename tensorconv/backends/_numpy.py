"""NumPy backend: the shared array-module implementation with ``xp = numpy``."""

import numpy

from ._base import ArrayBackend


class NumpyBackend(ArrayBackend):
    name = "numpy"

    def __init__(self):
        super().__init__(numpy)

    def mul_add_(self, out, a, b):
        # multiply into a scratch array instead of allocating a fresh temporary per tap
        scratch = numpy.multiply(a, b)
        out += scratch
        return out
