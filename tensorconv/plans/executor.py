"""Execution: each planned step run with the backend's primitives.

The activation is kept channels-last, (B, *positions, *channel indices), so every channel
contraction is a matrix product over the last axes and every depthwise tap is a
broadcast multiply-add over contiguous channels. A step that sums taps loops over them
(K per 1-D mode), slicing the padded activation with the stride and dilation: no window
tensor is ever materialised.
"""

from __future__ import annotations

import functools
import itertools
import math

import opt_einsum

__all__ = [
    "TapProgram",
    "WeightProduct",
    "Reconstruction",
    "compile_steps",
    "dense_conv",
    "dense_conv_by_taps",
]

_POOL = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class WeightProduct:
    """One weights x weights step (folding lambda, merging factors), compiled for fixed shapes.

    A product that sums no index (an outer or elementwise product, e.g. U_K1 x U_K0 over r)
    is one broadcast multiply: it runs on every call, and an einsum dispatch costs several
    times the arithmetic of these small factors. A contraction goes through opt_einsum.
    """

    def __init__(self, lhs, rhs, out, sizes):
        letters = dict(zip(dict.fromkeys(lhs + rhs), _POOL))
        self.equation = (
            "".join(letters[i] for i in lhs)
            + ","
            + "".join(letters[i] for i in rhs)
            + "->"
            + "".join(letters[i] for i in out)
        )
        self.expr = None
        self.layout = None
        if set(lhs) | set(rhs) == set(out):
            self.layout = [self._broadcast_layout(ind, out, sizes) for ind in (lhs, rhs)]
        else:
            self.expr = opt_einsum.contract_expression(
                self.equation, tuple(sizes[i] for i in lhs), tuple(sizes[i] for i in rhs)
            )

    @staticmethod
    def _broadcast_layout(ind, out, sizes):
        perm = tuple(sorted(range(len(ind)), key=lambda j: out.index(ind[j])))
        shape = tuple(sizes[i] if i in ind else 1 for i in out)
        return (None if perm == tuple(range(len(ind))) else perm), shape

    def __call__(self, backend, a, b):
        if self.layout is None:
            return self.expr(a, b)
        return self._broadcast(backend, a, b)

    def traceable(self, backend, a, b):
        """Plain array ops only (for torch.compile)."""
        if self.layout is None:
            return backend.einsum(self.equation, a, b)
        return self._broadcast(backend, a, b)

    def _broadcast(self, backend, a, b):
        operands = []
        for x, (perm, shape) in zip((a, b), self.layout):
            if perm is not None:
                x = backend.permute(x, perm)
            operands.append(backend.reshape(x, shape))
        return operands[0] * operands[1]


class TapProgram:
    """One activation x weight step, compiled for fixed shapes.

    Parameters
    ----------
    ch_a, w_ind, out_ch : tuples of index names (activation channels, weight indices,
        output channels). Weight indices named in ``tap_axes`` are the taps summed here.
    tap_axes : dict  weight index name -> spatial mode
    grid_in, grid_out : positions per spatial mode before / after the step
    kernel_size, stride, dilation, padding, padding_mode : the convolution's geometry
    sizes : dict index name -> size
    """

    def __init__(
        self,
        ch_a,
        w_ind,
        out_ch,
        tap_axes,
        grid_in,
        grid_out,
        batch,
        sizes,
        *,
        kernel_size,
        stride,
        dilation,
        padding,
        padding_mode,
    ):
        n = len(grid_in)
        self.n = n
        self.modes = tuple(sorted(tap_axes.values()))
        self.pads = {1 + m: padding[m] for m in self.modes if padding[m] != (0, 0)}
        self.padding_mode = padding_mode
        w_ch = tuple(i for i in w_ind if i not in tap_axes)
        ndim_a = 1 + n + len(ch_a)
        # one (activation slice, weight index) pair per tap combination
        tap_ranges = [range(kernel_size[m]) for m in self.modes]
        self.taps = []
        for combo in itertools.product(*tap_ranges):
            a_index = [slice(None)] * ndim_a
            tap_of_mode = dict(zip(self.modes, combo))
            for m, k in tap_of_mode.items():
                start = k * dilation[m]
                a_index[1 + m] = slice(start, start + (grid_out[m] - 1) * stride[m] + 1, stride[m])
            w_index = tuple(tap_of_mode[tap_axes[i]] if i in tap_axes else slice(None) for i in w_ind)
            self.taps.append((tuple(a_index), w_index))
        self._runs = {}
        self.native = self._native_spec(
            ch_a, w_ind, w_ch, out_ch, tap_axes, sizes, kernel_size, stride, dilation, padding
        )
        self.broadcast = set(w_ch) <= set(ch_a) and tuple(out_ch) == tuple(ch_a)
        if self.broadcast:
            # weight channels permuted into the activation's order, then shaped to broadcast
            order = [i for i in ch_a if i in w_ch]
            self.w_perm = tuple(w_ch.index(i) for i in order)
            if self.w_perm == tuple(range(len(w_ch))):
                self.w_perm = None
            self.w_bshape = (1,) * (1 + n) + tuple(sizes[i] if i in w_ch else 1 for i in ch_a)
        else:
            letters = dict(
                zip(
                    ("batch",) + tuple(f"y{m}" for m in range(n)) + tuple(dict.fromkeys(ch_a + w_ch + tuple(out_ch))),
                    _POOL,
                )
            )
            pos = letters["batch"] + "".join(letters[f"y{m}"] for m in range(n))
            eq = (
                pos
                + "".join(letters[i] for i in ch_a)
                + ","
                + "".join(letters[i] for i in w_ch)
                + "->"
                + pos
                + "".join(letters[i] for i in out_ch)
            )
            a_shape = (batch,) + tuple(grid_out) + tuple(sizes[i] for i in ch_a)
            w_shape = tuple(sizes[i] for i in w_ch)
            self.eq = eq
            self.expr = opt_einsum.contract_expression(eq, a_shape, w_shape)

    def _native_spec(self, ch_a, w_ind, w_ch, out_ch, tap_axes, sizes, kernel_size, stride, dilation, padding):
        """How to run this step as one grouped convolution on channels-last data, if it is one.

        Activation channels must be (shared, summed) and the output (shared, new): then the
        weight permuted to (shared, new, summed, taps) and flattened is a grouped conv weight
        with groups = prod(shared).
        """
        shared = tuple(i for i in ch_a if i in w_ch and i in out_ch)
        summed = tuple(i for i in ch_a if i in w_ch and i not in out_ch)
        new = tuple(i for i in w_ch if i not in ch_a)
        if tuple(ch_a) != shared + summed or tuple(out_ch) != shared + new:
            return None
        if not new and not summed and not self.modes:
            return None  # a plain scale: the broadcast path is cheaper than a 1x1 depthwise conv
        tap_letters = sorted(tap_axes, key=tap_axes.get)
        order = [w_ind.index(i) for i in shared + new + summed + tuple(tap_letters)]
        groups = 1
        for i in shared:
            groups *= sizes[i]
        n_new = 1
        for i in new:
            n_new *= sizes[i]
        n_sum = 1
        for i in summed:
            n_sum *= sizes[i]
        ks = tuple(kernel_size[m] if m in self.modes else 1 for m in range(self.n))
        padding_native = tuple(padding[m] if m in self.modes else (0, 0) for m in range(self.n))
        return dict(
            order=order,
            shape=(groups * n_new, n_sum) + ks,
            groups=groups,
            flat_in=len(ch_a) != 1,
            out_sizes=tuple(sizes[i] for i in out_ch) if len(out_ch) != 1 else None,
            stride=tuple(stride[m] if m in self.modes else 1 for m in range(self.n)),
            dilation=tuple(dilation[m] if m in self.modes else 1 for m in range(self.n)),
            padding=padding_native,
        )

    def traceable(self, backend, act, weight):
        """The same step with plain array ops only (no opt_einsum, no in-place, no native conv):
        what a tracing compiler (torch.compile) can see through and fuse."""
        return self._tap_loop(backend, act, weight, traced=True)

    def __call__(self, backend, act, weight, native=True, out=None):
        """The step's output; where it runs as a native conv, written into the flat buffer
        ``out`` if one is given (see :mod:`tensorconv.plans.workspace`)."""
        convs = backend.native
        if native and self.native is not None and convs.exists:
            itemsize, device = backend.itemsize(act), backend.device(act)
            if convs.available(itemsize, device):
                spec = self.native
                # the channel count spelled out: a -1 cannot be inferred for an empty batch
                x = (
                    backend.reshape(act, tuple(act.shape[: 1 + self.n]) + (spec["shape"][1] * spec["groups"],))
                    if spec["flat_in"]
                    else act
                )
                run = self._native_run(backend, tuple(x.shape), itemsize, device)
                if run is not None:
                    y = run(x, backend.reshape(backend.permute(weight, spec["order"]), spec["shape"]), out)
                    if spec["out_sizes"] is not None:
                        y = backend.reshape(y, tuple(y.shape[: 1 + self.n]) + spec["out_sizes"])
                    return y
        return self._tap_loop(backend, act, weight, traced=False)

    def _native_run(self, backend, act_shape, itemsize, device):
        """The backend's prepared native conv for this step (decided once per backend, shape,
        dtype size and device)."""
        key = (backend.name, act_shape, itemsize, device)
        if key not in self._runs:
            spec = self.native
            self._runs[key] = backend.native.channels_last(
                act_shape,
                spec["shape"],
                stride=spec["stride"],
                dilation=spec["dilation"],
                padding=spec["padding"],
                padding_mode=self.padding_mode,
                groups=spec["groups"],
                itemsize=itemsize,
                device=device,
            )
        return self._runs[key]

    def _tap_loop(self, backend, act, weight, traced):
        """Sum over the taps of (shifted activation slice) x (weight at that tap).

        Untraced, the sum accumulates in place and contractions use the compiled opt_einsum
        expression; traced, every op is out of place and a plain einsum."""
        if self.pads:
            act = backend.pad(act, self.pads, self.padding_mode)
        out = None
        for a_index, w_index in self.taps:
            a, w = act[a_index], weight[w_index]
            if self.broadcast:
                if self.w_perm is not None:
                    w = backend.permute(w, self.w_perm)
                w = backend.reshape(w, self.w_bshape)
                if out is None:
                    out = a * w
                else:
                    out = out + a * w if traced else backend.mul_add_(out, a, w)
                continue
            term = backend.einsum(self.eq, a, w) if traced else self.expr(a, w)
            if out is None:
                out = term
            else:
                out = out + term if traced else backend.add_(out, term)
        return out


@functools.lru_cache(maxsize=256)
def _dense_program(x_shape, w_shape, stride, dilation, groups):
    batch, c = x_shape[0], x_shape[1]
    n = len(x_shape) - 2
    t = w_shape[0]
    taps = {f"k{m}": m for m in range(n)}
    grid_in = tuple(x_shape[2:])
    kernel_size = tuple(w_shape[2:])
    grid_out = tuple((d - dl * (k - 1) - 1) // s + 1 for d, k, s, dl in zip(grid_in, kernel_size, stride, dilation))
    if groups == 1:
        ch_a, w_ind, out_ch = ("s",), ("t", "s") + tuple(taps), ("t",)
        sizes = {"s": c, "t": t}
    else:
        ch_a, w_ind, out_ch = ("g", "s"), ("g", "t", "s") + tuple(taps), ("g", "t")
        sizes = {"g": groups, "s": c // groups, "t": t // groups}
    program = TapProgram(
        ch_a,
        w_ind,
        out_ch,
        taps,
        grid_in,
        grid_out,
        batch,
        sizes,
        kernel_size=kernel_size,
        stride=stride,
        dilation=dilation,
        padding=((0, 0),) * n,
        padding_mode="zeros",
    )
    return program, sizes, grid_out


def dense_conv_by_taps(backend, x, weight, *, stride, dilation, groups=1):
    """Valid dense N-D cross-correlation for any N: x (B, C, *D), weight (T, C/groups, *K)."""
    x_shape = tuple(int(s) for s in x.shape)
    w_shape = tuple(int(s) for s in weight.shape)
    program, sizes, grid_out = _dense_program(x_shape, w_shape, tuple(stride), tuple(dilation), groups)
    act = backend.moveaxis(x, 1, -1)
    if groups > 1:
        act = backend.reshape(act, tuple(act.shape[:-1]) + (groups, sizes["s"]))
        weight = backend.reshape(weight, (groups, sizes["t"]) + tuple(weight.shape[1:]))
    out = program(backend, act, weight)
    out = backend.reshape(out, (x_shape[0],) + tuple(grid_out) + (w_shape[0],))
    return backend.moveaxis(out, -1, 1)


def dense_conv(backend, x, weight, *, stride, dilation, groups=1, padding=None, padding_mode="zeros"):
    """Dense N-D cross-correlation, channels first: the backend's own conv where it has one,
    else a loop over the kernel's taps, each a matrix product over channels (no im2col buffer)."""
    out = backend.native.dense(
        x, weight, stride=stride, dilation=dilation, groups=groups, padding=padding, padding_mode=padding_mode
    )
    if out is not None:
        return out
    if padding is not None:
        x = backend.pad(x, {2 + m: p for m, p in enumerate(padding) if p != (0, 0)}, padding_mode)
    return dense_conv_by_taps(backend, x, weight, stride=tuple(stride), dilation=tuple(dilation), groups=groups)


def compile_steps(structure, geometry, steps, batch, sizes):
    """One program per step: ``("weights", WeightProduct)`` or ``("act", TapProgram)``."""
    g, st = geometry, structure
    programs = []
    for step in steps:
        if step.kind == "weights":
            programs.append(("weights", WeightProduct(step.lhs_indices, step.rhs_indices, step.out_indices, sizes)))
            continue
        taps = {i: st.taps.index(i) for i in step.rhs_indices if i in st.taps}
        prog = TapProgram(
            step.lhs_indices,
            step.rhs_indices,
            step.out_indices,
            taps,
            step.in_grid,
            step.out_grid,
            batch,
            sizes,
            kernel_size=g.kernel_size,
            stride=g.stride,
            dilation=g.dilation,
            padding=g.padding,
            padding_mode=g.padding_mode,
        )
        programs.append(("act", prog))
    return tuple(programs)


class Reconstruction:
    """The dense kernel rebuilt from a factorized kernel's arrays, as ``(T, C/groups, *K)``:
    an opt_einsum expression over the structure's operands. ``groups``: the channel indices
    the kernel keeps shared between input and output (a Tucker kernel's groups)."""

    def __init__(self, structure, sizes):
        st = structure
        shared = [i for i in st.act_out if i in st.act_in]
        self.groups = math.prod(sizes[i] for i in shared)
        dense_ind = tuple(st.act_out) + tuple(i for i in st.act_in if i not in shared) + tuple(st.taps)
        letters = dict(zip(dict.fromkeys([i for op in st.operands for i in op.indices] + list(dense_ind)), _POOL))
        eq = (
            ",".join("".join(letters[i] for i in op.indices) for op in st.operands)
            + "->"
            + "".join(letters[i] for i in dense_ind)
        )
        self._expression = opt_einsum.contract_expression(eq, *[op.shape for op in st.operands])
        self.shape = (st.out_channels, st.in_channels // self.groups) + tuple(sizes[t] for t in st.taps)

    def __call__(self, backend, arrays):
        return backend.reshape(self._expression(*arrays), self.shape)
