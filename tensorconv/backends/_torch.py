"""PyTorch backend (CPU and CUDA). Keeps each tensor's device and dtype; autograd flows
through every primitive because each one is a torch op."""

from ._base import FLOAT_ITEMSIZES, ArrayBackend
from ._torch_native import TorchConvs
from ._torch_runtime import TorchRuntime

_DTYPES = tuple(FLOAT_ITEMSIZES)
_F_PAD_MODES = {"reflect": "reflect", "replicate": "replicate", "circular": "circular"}


class TorchBackend(ArrayBackend):
    name = "torch"

    def __init__(self):
        import torch
        import torch.nn.functional as F

        super().__init__(torch)
        self.F = F
        self.native = TorchConvs(self)
        self.runtime = TorchRuntime(self)

    def array_types(self):
        return (self.xp.Tensor, self.xp.nn.Parameter)

    def device(self, x):
        return x.device

    def dtype_name(self, x):
        return str(x.dtype).replace("torch.", "")

    def itemsize(self, x):
        return x.element_size()

    def resolve_dtype(self, dtype):
        torch = self.xp
        if dtype is None:
            return torch.float64
        if isinstance(dtype, torch.dtype):
            return dtype
        name = str(getattr(dtype, "name", dtype)).replace("torch.", "")
        if name not in _DTYPES:
            raise TypeError(f"dtype={dtype!r} is not a floating torch dtype; expected one of {sorted(_DTYPES)}")
        return getattr(torch, name)

    def asarray(self, data, *, dtype=None, device=None):
        return self.xp.as_tensor(data, dtype=self.resolve_dtype(dtype) if dtype is not None else None, device=device)

    def empty(self, shape, *, like):
        # a normal tensor even inside torch.inference_mode: a buffer kept from call to call is
        # written in place outside it too, which an inference tensor refuses
        with self.xp.inference_mode(False):
            return self.xp.empty(shape, dtype=like.dtype, device=like.device)

    def zeros(self, shape, *, like):
        return self.xp.zeros(shape, dtype=like.dtype, device=like.device)

    def ones(self, shape, *, like):
        return self.xp.ones(shape, dtype=like.dtype, device=like.device)

    def eye(self, n, *, like):
        return self.xp.eye(n, dtype=like.dtype, device=like.device)

    def astype(self, x, dtype):
        return x.to(self.resolve_dtype(dtype))

    def random_normal(self, shape, *, seed, dtype=None, device=None):
        torch = self.xp
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(int(seed))
        else:
            gen.seed()
        out = torch.randn(shape, generator=gen, dtype=torch.float64)
        return out.to(device=device, dtype=self.resolve_dtype(dtype))

    def is_floating(self, x):
        return x.is_floating_point()

    def is_inexact(self, x):
        return x.is_floating_point() or x.is_complex()

    def all_finite(self, x):
        return bool(self.xp.isfinite(x.detach()).all())

    def to_numpy(self, x):
        return x.detach().cpu().numpy()

    def from_numpy(self, a, *, like=None, dtype=None, device=None):
        out = self.xp.from_numpy(a) if hasattr(a, "__array__") else self.xp.as_tensor(a)
        if like is not None:
            return out.to(device=like.device, dtype=like.dtype)
        return out.to(device=device, dtype=self.resolve_dtype(dtype) if dtype is not None else out.dtype)

    def flip(self, x, axis):
        return self.xp.flip(x, dims=(axis,))

    def permute(self, x, axes):
        return x.permute(*axes)

    def moveaxis(self, x, source, destination):
        # movedim, not torch.moveaxis: only movedim has a batching rule (torch.func.vmap)
        return x.movedim(source, destination)

    def concat(self, arrays, axis):
        return self.xp.cat(arrays, dim=axis)

    def contiguous(self, x):
        return x.contiguous()

    def take(self, x, indices, axis):
        return x.index_select(axis, self.xp.as_tensor(indices, device=x.device))

    def einsum(self, subscripts, *operands):
        return self.xp.einsum(subscripts, *operands)

    def tensordot(self, a, b, axes):
        return self.xp.tensordot(a, b, dims=axes)

    def add_(self, out, term):
        # in-place is safe for autograd here: `out` was produced by an op that does not save
        # its own output for backward (einsum / mul); it avoids one allocation per tap
        return out.add_(term)

    def mul_add_(self, out, a, b):
        return out.addcmul_(a, b)

    def pad(self, x, pads, mode="zeros"):
        pads = {axis % x.ndim: p for axis, p in pads.items() if p != (0, 0)}
        if mode != "zeros" and pads and 3 <= x.ndim <= 5 and min(pads) >= 2:
            # the trailing (spatial) axes of a channels-first tensor: torch's own reflect / replicate /
            # circular pad, one op that a tracer records for any input size (the generic concatenation
            # reads the size, which a trace would freeze)
            flat = [p for axis in range(x.ndim - 1, 1, -1) for p in pads.get(axis, (0, 0))]
            return self.F.pad(x, flat, mode=_F_PAD_MODES[mode])
        return super().pad(x, pads, mode)

    def pad_axis(self, x, axis, low, high, mode):
        # torch's own constant pad is one kernel instead of a concatenation
        if mode == "zeros" and (low or high):
            pads = [0, 0] * (x.ndim - 1 - axis % x.ndim) + [low, high]
            return self.F.pad(x, pads)
        return super().pad_axis(x, axis, low, high, mode)
