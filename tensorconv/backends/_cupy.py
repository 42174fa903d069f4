"""CuPy backend: the same array-module code as NumPy with ``xp = cupy``.

Only what differs from NumPy lives here (device handling and conversion). The logic is
proved by the NumPy tests and exercised on a GPU by the CuPy tests when one is present.
"""

from ._base import ArrayBackend


class CupyBackend(ArrayBackend):
    name = "cupy"

    def __init__(self):
        import cupy

        super().__init__(cupy)

    def device(self, x):
        return x.device

    def asarray(self, data, *, dtype=None, device=None):
        if device is None:
            return self.xp.asarray(data, dtype=dtype)
        with self.xp.cuda.Device(device):
            return self.xp.asarray(data, dtype=dtype)

    def zeros(self, shape, *, like):
        with like.device:
            return self.xp.zeros(shape, dtype=like.dtype)

    def ones(self, shape, *, like):
        with like.device:
            return self.xp.ones(shape, dtype=like.dtype)

    def eye(self, n, *, like):
        with like.device:
            return self.xp.eye(n, dtype=like.dtype)

    def random_normal(self, shape, *, seed, dtype=None, device=None):
        import numpy

        host = numpy.random.default_rng(seed).standard_normal(shape)
        return self.asarray(host, dtype=self.resolve_dtype(dtype), device=device)

    def einsum(self, subscripts, *operands):
        return self.xp.einsum(subscripts, *operands)

    def to_numpy(self, x):
        return self.xp.asnumpy(x)

    def from_numpy(self, a, *, like=None, dtype=None, device=None):
        if like is not None:
            with like.device:
                return self.xp.asarray(a, dtype=like.dtype)
        return self.asarray(a, dtype=self.resolve_dtype(dtype) if dtype is not None else None, device=device)
