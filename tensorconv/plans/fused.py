"""The fused strategy's own runners, behind the accelerator interface
(:mod:`tensorconv.accelerators`), which ``strategy="fused"`` asks in registry order after any
compiled kernel that applies (e.g. the plane chain):

- torch: :class:`CompiledChain` hands the plan's steps, written as shifted multiply-adds and
  matrix products (no opaque convolution calls), to ``torch.compile``; inductor fuses the
  padding and the depthwise stages into loops over the (cache-resident) 1x1 outputs, and
  autograd's backward is compiled the same way. One compilation per plan (tens of seconds on
  CPU); if compiling fails the plan runs unfused, with a warning.
- any other backend: :class:`FusedRunner` runs the steps tile by tile (below). With torch ops
  it was measured slower than the unfused plan (per-op overhead on small tiles), so it serves
  NumPy, CuPy and JAX.

Neither has a cost: ``auto`` never picks them (it never waits for a compiler).

Tiles:

The unfused plan writes every intermediate (C -> R channels, then one per depthwise stage) to
memory in full; once those leave the cache the chain is memory-bound. Here the activation
steps run tile by tile over (image, rows of spatial mode 0): a tile carries the halo that the
mode-0 convolution needs, so all of its intermediates stay in cache, and only the input tile
and the output tile touch main memory. Padding along mode 0 is materialised on the input
rows of the tile (zeros, or mirrored / repeated / wrapped rows), which is exact because every
step before the mode-0 convolution acts on each row independently.

Run on torch tensors that need gradients (not the default torch path, which compiles), each
tile runs under activation checkpointing: backward recomputes the tile's intermediates
instead of keeping them, so peak memory stays at tile size.
"""

from __future__ import annotations

from ..accelerators import Accelerator
from .executor import TapProgram

__all__ = ["FusedRunner", "CompiledChain", "TorchCompileRunner", "TiledRunner", "TILE_BYTES"]

#: target size of one tile's widest intermediate: a fraction of a typical L3, so a tile's
#: intermediates stay in cache between steps; chosen by timing tile sizes on the project's CPUs
#: (the study is in the commit log)
TILE_BYTES = 8 << 20


def _source_row(r, size, mode):
    """The input row that padded row r copies (reflect / replicate / circular padding)."""
    if 0 <= r < size:
        return r
    if mode == "reflect":
        return -r if r < 0 else 2 * (size - 1) - r
    if mode == "replicate":
        return 0 if r < 0 else size - 1
    return r % size  # circular


class FusedRunner:
    """Runs a factorized :class:`~tensorconv.plans.plan.ConvPlan`'s steps tile by tile."""

    def __init__(self, plan, tile_bytes=None):
        self.plan = plan
        g = plan.geometry
        steps = plan.steps
        self.act_steps = [i for i, s in enumerate(steps) if s.kind != "weights"]
        mode0 = [i for i in self.act_steps if 0 in steps[i].modes]
        if len(mode0) != 1:
            raise ValueError("fused execution needs exactly one step that convolves spatial mode 0")
        self.mode0_step = mode0[0]
        widest = max(plan.size_of(steps[i].out_indices) for i in self.act_steps)
        widest = max(widest, plan.size_of(plan.structure.act_in))
        row_elems = 1
        for d in g.out_spatial[1:]:
            row_elems *= d
        budget = tile_bytes or TILE_BYTES
        self.rows = max(1, budget // max(1, plan.itemsize * row_elems * widest))
        self.rows = min(self.rows, g.out_spatial[0])
        self._programs = {}

    def tiles(self):
        g = self.plan.geometry
        n_out = g.out_spatial[0]
        k, s, d = g.kernel_size[0], g.stride[0], g.dilation[0]
        for y0 in range(0, n_out, self.rows):
            y1 = min(n_out, y0 + self.rows)
            p0 = y0 * s
            p1 = (y1 - 1) * s + d * (k - 1) + 1
            yield y0, y1, p0, p1

    def _programs_for(self, rows_in, rows_out):
        key = (rows_in, rows_out)
        if key in self._programs:
            return self._programs[key]
        plan = self.plan
        g = plan.geometry
        st = plan.structure
        padding = ((0, 0),) + tuple(g.padding[1:])
        progs = {}
        for i in self.act_steps:
            step = plan.steps[i]
            before = i <= self.mode0_step
            grid_in = (rows_in if before else rows_out,) + tuple(step.in_grid[1:])
            grid_out = (rows_in if i < self.mode0_step else rows_out,) + tuple(step.out_grid[1:])
            taps = {t: st.taps.index(t) for t in step.rhs_indices if t in st.taps}
            progs[i] = TapProgram(
                step.lhs_indices,
                step.rhs_indices,
                step.out_indices,
                taps,
                grid_in,
                grid_out,
                1,
                plan.sizes,
                kernel_size=g.kernel_size,
                stride=g.stride,
                dilation=g.dilation,
                padding=padding,
                padding_mode=g.padding_mode,
            )
        self._programs[key] = progs
        return progs

    def _input_rows(self, backend, x, b, p0, p1):
        """Rows [p0, p1) of padded mode 0 of image b, as (1, C, rows, ...)."""
        g = self.plan.geometry
        size = g.in_spatial[0]
        lo = g.padding[0][0]
        first, last = p0 - lo, p1 - lo - 1
        image = x[b : b + 1]
        if first >= 0 and last < size:
            return image[:, :, first : last + 1]
        if g.padding_mode == "zeros":
            inner = image[:, :, max(first, 0) : min(last, size - 1) + 1]
            front, back = max(0, -first), max(0, last - size + 1)
            if inner.shape[2] == 0:
                shape = list(image.shape)
                shape[2] = p1 - p0
                return backend.zeros(tuple(shape), like=x)
            return backend.pad_axis(inner, 2, front, back, "zeros")
        rows = [_source_row(r, size, g.padding_mode) for r in range(first, last + 1)]
        return backend.take(image, rows, 2)

    def _run_tile(self, backend, progs, xt, *weights):
        plan = self.plan
        local = [plan.activation(backend, xt)] + list(weights)
        base = len(plan.structure.operands) + 1  # ids of step results start here
        for i in self.act_steps:
            step = plan.steps[i]
            local[base + i] = progs[i](backend, local[step.lhs], local[step.rhs])
        return local[-1]

    def __call__(self, backend, x, tensors):
        """``tensors``: [activation placeholder] + weight arrays, as the unfused executor holds them."""
        if x.shape[0] == 0:
            return None  # an empty batch has no tiles: the caller's unfused steps return the empty output
        plan = self.plan
        steps = plan.steps
        # weights-only steps run once, not per tile
        for step, (kind, prog) in zip(steps, plan.programs):
            if kind == "weights":
                tensors.append(prog(backend, tensors[step.lhs], tensors[step.rhs]))
            else:
                tensors.append(None)
        checkpoint = backend.runtime.tile_checkpoint(x, tensors)
        out_images = []
        for b in range(x.shape[0]):
            pieces = []
            for y0, y1, p0, p1 in self.tiles():
                progs = self._programs_for(p1 - p0, y1 - y0)
                xt = self._input_rows(backend, x, b, p0, p1)
                pieces.append(checkpoint(self._run_tile, backend, progs, xt, *tensors[1:]))
            out_images.append(pieces[0] if len(pieces) == 1 else backend.concat(pieces, 1))
        return out_images[0] if len(out_images) == 1 else backend.concat(out_images, 0)


class CompiledChain:
    """The plan's activation steps under ``torch.compile`` (see the module docstring)."""

    _warned = False

    def __init__(self, plan):
        self.plan = plan
        self._compiled = None
        self._failed = False
        self._backend = None

    def _run_chain(self, act, *weights):
        plan = self.plan
        backend = self._backend
        tensors = [act] + list(weights)
        for step, (kind, prog) in zip(plan.steps, plan.programs):
            a, b = tensors[step.lhs], tensors[step.rhs]
            tensors.append(prog.traceable(backend, a, b))
        return tensors[-1]

    def __call__(self, backend, act, weights):
        if self._failed:
            return None
        self._backend = backend
        if self._compiled is None:
            import types

            import torch

            # dynamo keeps its compiled-graph cache (and its recompile limit, 8) per code object:
            # one shared function would make every plan after the 8th run uncompiled. Each plan
            # gets its own copy of the code instead.
            eager = CompiledChain._run_chain
            code = eager.__code__.replace(co_name=f"tensorconv_fused_{id(self):x}")
            fresh = types.FunctionType(code, eager.__globals__, code.co_name, eager.__defaults__, eager.__closure__)
            self._compiled = torch.compile(types.MethodType(fresh, self), dynamic=False)
        try:
            return self._compiled(act, *weights)
        except Exception as exc:  # no C++ compiler, unsupported dynamo feature, ...
            self._failed = True
            if not CompiledChain._warned:
                import warnings

                warnings.warn(
                    f"tensorconv: torch.compile failed ({type(exc).__name__}: {exc}); the fused strategy runs unfused",
                    RuntimeWarning,
                    stacklevel=3,
                )
                CompiledChain._warned = True
            return None


class _StepsRunner(Accelerator):
    """A runner of ``strategy="fused"`` that runs the plan's own steps its way, for the
    backends it ``takes``: it applies to any plan, asked by name only (no cost: auto never
    waits for a compiler)."""

    serves = ("fused",)

    def applies(self, structure, geometry=None):
        return True

    def takes(self, backend):
        raise NotImplementedError

    def make(self, plan):
        """``run(backend, x, arrays)`` -> the last step's output (or None: unfused)."""
        raise NotImplementedError

    def runner(self, plan):
        impl = self.make(plan)

        def run(backend, x, arrays):
            if not self.takes(backend):
                return None
            out = impl(backend, x, arrays)
            return None if out is None else plan.finish(backend, out)

        return run


class TorchCompileRunner(_StepsRunner):
    """``strategy="fused"`` on torch: the plan's activation steps under ``torch.compile``."""

    name = "torch_compile"
    priority = 100
    summary = "torch.compile of the steps below"

    def takes(self, backend):
        return backend.name == "torch"

    def serves_device(self, backend_name, device_type):
        return backend_name == "torch"

    def make(self, plan):
        chain = CompiledChain(plan)
        return lambda backend, x, arrays: chain(backend, plan.activation(backend, x), list(arrays))


class TiledRunner(_StepsRunner):
    """``strategy="fused"`` on the other backends: the plan's steps in cache-sized tiles."""

    name = "tiles"
    priority = 101
    summary = "elsewhere, the steps below in cache-sized tiles"

    def takes(self, backend):
        return backend.name != "torch"  # per-op overhead on small tiles made it slower than the unfused plan there

    def serves_device(self, backend_name, device_type):
        return backend_name != "torch"

    def make(self, plan):
        tiles = FusedRunner(plan)
        return lambda backend, x, arrays: tiles(backend, x, [None] + list(arrays))
