"""Planning: the contraction order of a factorized convolution, its steps and their costs.

The convolution is one einsum once each spatial mode of the input gets a tap index (see
``plans/structure.py``). opt_einsum's own FLOP count over those virtual shapes overcounts any
channel contraction done before the taps are summed (by the product of the remaining kernel
sizes), so the order is chosen by :class:`ConvPathOptimizer`, an opt_einsum ``PathOptimizer``
that runs a dynamic programme over operand subsets with the *convolution's* cost: a step that
sums taps costs ``out positions x channels involved x taps``, a channel step costs its
positions x channels, and both are priced by the backend's roofline (MACs and bytes).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import opt_einsum

from ..accelerators import registered as registered_accelerators
from .cost import MODEL_MARGIN
from .spec import ConvGeometry

__all__ = ["Step", "ConvPathOptimizer", "plan_steps", "STRATEGIES", "Decision", "decide"]

STRATEGIES = ("auto", "factorized", "reconstructed", "fused")
#: what the order search minimises: multiply-adds (the paper's count; ties broken by the cost
#: model) or the cost model's seconds (may merge spatial factors when the backend runs one
#: multi-mode depthwise conv faster than several 1-D ones, at more MACs)
OBJECTIVES = ("macs", "seconds")


@dataclass
class Step:
    """One pairwise contraction of the plan.

    ``kind``: ``weights`` (factor x factor, a plain einsum), ``pointwise`` (a 1x1 conv: sums
    channel indices only), ``scale`` (an elementwise product with a weight vector),
    ``depthwise`` (sums taps, no channel mixing), ``conv`` (sums taps and channels: a full or
    grouped conv along ``modes``), ``dense`` (the reconstructed kernel's dense convolution).
    """

    kind: str
    lhs: int
    rhs: int
    lhs_indices: tuple
    rhs_indices: tuple
    out_indices: tuple
    summed: tuple
    modes: tuple  # spatial modes convolved in this step
    out_shape: tuple
    macs: int
    nbytes: int
    seconds: float
    in_grid: tuple = ()
    out_grid: tuple = ()


class ConvPathOptimizer(opt_einsum.paths.PathOptimizer):
    """opt_einsum path optimizer for a convolution network (activation = input 0).

    Exhaustive over subsets (3^n for n operands; a CP kernel of N spatial modes has N + 3).
    """

    def __init__(self, structure, geometry: ConvGeometry, batch, itemsize, model, objective="macs"):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
        self.objective = objective
        self.structure = structure
        self.geometry = geometry
        self.batch = batch
        self.itemsize = itemsize
        self.model = model
        self.steps = None

    # -- cost of one pairwise step ----------------------------------------------------------
    def _step(self, a, b, info_a, info_b, open_s):
        sizes = self.sizes
        taps = self.tap_set
        (ind_a, act_a, grid_a) = info_a
        (ind_b, act_b, _) = info_b
        if act_b:  # keep the activation on the left
            (ind_a, act_a, grid_a), (ind_b, act_b, _) = info_b, info_a
            a, b = b, a
        if not act_a:  # weights x weights
            union = list(ind_a) + [i for i in ind_b if i not in ind_a]
            out = tuple(i for i in union if i in open_s)
            macs = math.prod(sizes[i] for i in union)
            nbytes = self.itemsize * (
                math.prod(sizes[i] for i in ind_a)
                + math.prod(sizes[i] for i in ind_b)
                + math.prod(sizes[i] for i in out)
            )
            secs = self.model.seconds(macs, nbytes)
            return dict(
                kind="weights",
                lhs=a,
                rhs=b,
                lhs_indices=ind_a,
                rhs_indices=ind_b,
                out_indices=out,
                summed=tuple(i for i in union if i not in open_s),
                modes=(),
                macs=macs,
                nbytes=nbytes,
                seconds=secs,
                grid=None,
                in_grid=(),
                out_grid=(),
            )
        # activation x weights: the weight side's taps are summed now
        tap_modes = tuple(sorted(self.tap_mode[i] for i in ind_b if i in taps))
        grid_out = list(grid_a)
        for n in tap_modes:
            grid_out[n] = self.geometry.out_spatial[n]
        grid_out = tuple(grid_out)
        ch_a = tuple(i for i in ind_a if i not in taps)
        ch_b = tuple(i for i in ind_b if i not in taps)
        union = ch_a + tuple(i for i in ch_b if i not in ch_a)
        out_ch = tuple(i for i in union if i in open_s)
        summed = tuple(i for i in union if i not in open_s)
        n_taps = math.prod(self.geometry.kernel_size[n] for n in tap_modes)
        positions = self.batch * math.prod(grid_out)
        macs = positions * math.prod(sizes[i] for i in union) * n_taps
        native = self.model.native_steps and (len(self.geometry.kernel_size) <= 3 or len(tap_modes) <= 1)
        # a native conv reads its whole input once (for a strided or wide-kernel step more than
        # its output grid); a tap loop reads one output-sized slice per tap
        in_slice = (positions if not native else self.batch * math.prod(grid_a)) * math.prod(sizes[i] for i in ch_a)
        out_elems = positions * math.prod(sizes[i] for i in out_ch)
        w_elems = math.prod(sizes[i] for i in ind_b)
        if tap_modes:
            kind = "conv" if summed or any(i not in ch_a for i in ch_b) else "depthwise"
        else:
            kind = "pointwise" if summed or any(i not in ch_a for i in ch_b) else "scale"
        # a native conv streams its input and output once; a tap loop once per tap, and a
        # channel-mixing tap twice (the GEMM copies its strided slice, then the product is
        # accumulated; priced without that copy the tap loop looked faster than it runs:
        # `tensorconv bench auto`)
        passes = 1 if native else n_taps
        per_pass = 2 if kind == "conv" and not native else 1
        nbytes = self.itemsize * (passes * per_pass * (in_slice + out_elems) + w_elems)
        secs = self.model.seconds(macs, nbytes, calls=passes, kind=kind)
        out_ind = out_ch + tuple(
            self.tap_of[n] for n in range(len(grid_a)) if self.tap_of[n] in open_s and self.tap_of[n] in ind_a
        )
        return dict(
            kind=kind,
            lhs=a,
            rhs=b,
            lhs_indices=ind_a,
            rhs_indices=ind_b,
            out_indices=out_ind,
            summed=summed + tuple(self.tap_of[n] for n in tap_modes),
            modes=tap_modes,
            macs=macs,
            nbytes=nbytes,
            seconds=secs,
            grid=grid_out,
            in_grid=grid_a,
            out_grid=grid_out,
        )

    def search(self):
        st = self.structure
        self.sizes = st.index_sizes(self.geometry.kernel_size)
        self.tap_set = set(st.taps)
        self.tap_mode = {t: n for n, t in enumerate(st.taps)}
        self.tap_of = dict(enumerate(st.taps))
        inputs = [tuple(st.act_in) + st.taps] + [op.indices for op in st.operands]
        n = len(inputs)
        output = set(st.act_out)
        full = (1 << n) - 1
        where = {}
        for pos, ind in enumerate(inputs):
            for i in ind:
                where.setdefault(i, 0)
                where[i] |= 1 << pos

        def open_indices(mask):
            rest = full & ~mask
            seen = []
            for pos in range(n):
                if mask >> pos & 1:
                    for i in inputs[pos]:
                        if i not in seen and ((where[i] & rest) or i in output):
                            seen.append(i)
            return tuple(seen)

        leaves = {
            1 << pos: (inputs[pos], pos == 0, tuple(self.geometry.in_spatial) if pos == 0 else None) for pos in range(n)
        }
        tree_key = self._tree_key()
        tree = _TREES.get(tree_key)
        if tree is not None:  # a shape of a bucket searched before: its tree, priced for this shape
            _TREES.move_to_end(tree_key)
            self.ordered = self._price_tree(tree, leaves, open_indices)
            return self.ordered
        # best[mask] = (seconds, macs, info, tree, step, objective key)
        best = {}
        for mask, info in leaves.items():
            best[mask] = (0.0, 0, info, mask.bit_length() - 1, None, None)
        masks = sorted(range(1, full + 1), key=lambda m: bin(m).count("1"))
        # a factorized plan never contracts every factor into the dense kernel (that is the
        # "reconstructed" strategy), unless that kernel mixes no channels (a depthwise kernel)
        all_weights = full & ~1
        channel_like = [i for i in open_indices(all_weights) if i not in self.tap_set]
        forbidden = all_weights if len(channel_like) > 1 else None
        for mask in masks:
            if mask in best or mask == forbidden:
                continue
            open_s = set(open_indices(mask))
            choice = None
            sub = (mask - 1) & mask
            while sub:
                other = mask ^ sub
                if sub < other or sub == forbidden or other == forbidden:
                    sub = (sub - 1) & mask
                    continue
                ca, cb = best[sub], best[other]
                step = self._step(sub, other, ca[2], cb[2], open_s)
                total = ca[0] + cb[0] + step["seconds"]
                macs = ca[1] + cb[1] + step["macs"]
                key = (macs, total) if self.objective == "macs" else (total, macs)
                if choice is None or key < choice[5]:
                    is_act = bool(mask & 1)
                    info = (step["out_indices"], is_act, step["grid"])
                    choice = (total, macs, info, (sub, other), step, key)
                sub = (sub - 1) & mask
            best[mask] = choice
        # unfold the tree into an ordered list of steps (children first)
        order = []

        def walk(mask):
            entry = best[mask]
            if isinstance(entry[3], int):
                return
            sub, other = entry[3]
            walk(sub)
            walk(other)
            order.append((mask, entry[4]))

        walk(full)
        _TREES[tree_key] = tuple((mask, best[mask][3]) for mask, _ in order)
        if len(_TREES) > _TREES_MAX:
            _TREES.popitem(last=False)
        self.ordered = order
        return order

    def _tree_key(self):
        """What the best tree depends on, with the sizes that scale the costs (batch, spatial)
        by power-of-two bucket: shapes of one bucket share the tree searched for the first."""
        g = self.geometry
        buckets = (int(self.batch).bit_length(),) + tuple(int(d).bit_length() for d in g.in_spatial)
        geometry = (g.kernel_size, g.stride, g.padding, g.dilation, g.padding_mode)
        return (self.structure, geometry, buckets, self.itemsize, self.model, self.objective)

    def _price_tree(self, tree, leaves, open_indices):
        """The steps of ``tree`` ((mask, (sub, other)) children first) with this shape's costs:
        one step per contraction instead of the search over every subset."""
        info = dict(leaves)
        order = []
        for mask, (sub, other) in tree:
            step = self._step(sub, other, info[sub], info[other], set(open_indices(mask)))
            info[mask] = (step["out_indices"], bool(mask & 1), step["grid"])
            order.append((mask, step))
        return order

    def __call__(self, inputs, output, size_dict, memory_limit=None):
        order = self.search()
        ssa_of = {1 << pos: pos for pos in range(len(self.structure.operands) + 1)}
        ssa_path = []
        next_id = len(ssa_of)
        for mask, step in order:
            ssa_path.append((ssa_of[step["lhs"]], ssa_of[step["rhs"]]))
            ssa_of[mask] = next_id
            next_id += 1
        return opt_einsum.paths.ssa_to_linear(ssa_path)


#: searched trees by :meth:`ConvPathOptimizer._tree_key`, least recently used out: a model fed
#: inputs of many sizes (variable-length sequences) searches once per size bucket, not per size
_TREES: OrderedDict = OrderedDict()
_TREES_MAX = 4096


def _letters_for(indices):
    pool = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return {i: next(pool) for i in indices}


def plan_steps(structure, geometry: ConvGeometry, batch, itemsize, model, objective="macs"):
    """Run the optimizer; returns (steps, linear path, optimizer).

    The optimizer is an opt_einsum ``PathOptimizer`` (``opt_einsum.contract_path(...,
    optimize=opt)`` gives the same path); it reads the structure itself, so it is called directly
    here: parsing the equation again for every shape cost more than pricing a known tree."""
    opt = ConvPathOptimizer(structure, geometry, batch, itemsize, model, objective)
    path = opt(None, None, None)
    sizes = structure.index_sizes(geometry.kernel_size)
    n_inputs = 1 + len(structure.operands)
    steps = []
    ids = {1 << p: p for p in range(n_inputs)}
    next_id = n_inputs
    for mask, s in opt.ordered:
        s.pop("grid")
        a, b = ids[s.pop("lhs")], ids[s.pop("rhs")]
        if s["kind"] != "weights":  # the activation's unsummed taps are virtual: keep channels only
            taps = set(structure.taps)
            s["lhs_indices"] = tuple(i for i in s["lhs_indices"] if i not in taps)
            s["out_indices"] = tuple(i for i in s["out_indices"] if i not in taps)
        out_shape = _out_shape(s, sizes, batch)
        steps.append(Step(lhs=a, rhs=b, out_shape=out_shape, **s))
        ids[mask] = next_id
        next_id += 1
    return steps, path, opt


def _out_shape(s, sizes, batch):
    if s["kind"] == "weights":
        return tuple(sizes[i] for i in s["out_indices"])
    return (batch,) + tuple(s["out_grid"]) + tuple(sizes[i] for i in s["out_indices"])


@functools.lru_cache(maxsize=1024)
def reconstruct_macs(structure):
    """MACs of contracting the kernel's factors into the dense kernel (opt_einsum's count)."""
    if structure.kind == "dense":
        return 0
    letters = _letters_for(
        [i for op in structure.operands for i in op.indices] + list(structure.act_in) + list(structure.act_out)
    )
    terms = ["".join(letters[i] for i in op.indices) for op in structure.operands]
    dense = "".join(letters[i] for i in structure.act_out + structure.act_in + structure.taps)
    try:
        _, info = opt_einsum.contract_path(
            ",".join(terms) + "->" + dense, *[op.shape for op in structure.operands], shapes=True
        )
    except ValueError:
        return 0
    return int(info.opt_cost) // 2 if int(info.opt_cost) > 1 else int(info.opt_cost)


def dense_step(structure, geometry, batch, itemsize, model):
    """The single step of a dense convolution with the (possibly reconstructed) dense kernel."""
    t = structure.out_channels
    c = structure.in_channels
    groups = structure.groups
    out = geometry.out_spatial
    positions = batch * math.prod(out)
    taps = math.prod(geometry.kernel_size)
    macs = positions * t * (c // groups) * taps
    padded = geometry.padded_spatial
    weights = t * (c // groups) * taps
    if model.native_steps and structure.n_spatial <= 3:  # one native conv call
        passes, nbytes = 1, itemsize * (batch * c * math.prod(padded) + positions * t + weights)
    else:  # the tap loop (dense_conv_by_taps): one input slice and one accumulation per tap
        passes, nbytes = taps, itemsize * (taps * positions * (c + 2 * t) + weights)
    rate = model.dense_rate(batch, c, geometry.in_spatial, groups, geometry.kernel_size)
    secs = model.seconds(macs, nbytes, calls=passes, rate=rate)
    return Step(
        kind="dense",
        lhs=0,
        rhs=1,
        lhs_indices=("s",),
        rhs_indices=("t", "s") + structure.taps,
        out_indices=("t",),
        summed=("s",) + structure.taps,
        modes=tuple(range(structure.n_spatial)),
        out_shape=(batch, t) + tuple(out),
        macs=macs,
        nbytes=nbytes,
        seconds=secs,
        in_grid=tuple(geometry.in_spatial),
        out_grid=tuple(out),
    )


@dataclass(frozen=True)
class Decision:
    """What a plan runs: the strategy, the order of its steps, the accelerators it asks in turn,
    and the estimates that chose them."""

    strategy: str
    order: str | None
    steps: tuple
    path: tuple
    accelerators: tuple
    estimates: Any  # a read-only mapping: label -> seconds
    dense_step: Step
    min_macs: int
    reconstruct_macs: int

    @property
    def seconds(self) -> float:
        """The cost model's seconds for one call of what runs."""
        if self.strategy == "dense":
            return self.dense_step.seconds
        if self.strategy == "reconstructed":
            return self.estimates["reconstructed"]
        if self.accelerators:
            first = self.accelerators[0]
            label = f"fused ({first.label or first.name})"
            if label in self.estimates:
                return self.estimates[label]
        return sum(s.seconds for s in self.steps)


def decide(problem) -> Decision:
    """The plan for a :class:`~tensorconv.plans.problem.ConvProblem`.

    ``"auto"`` takes the cheapest by the cost model of the fewest-MAC order, the reconstructed
    dense conv, the model's fastest order and every ready accelerator that applies (those two
    weighed with their margins); ``"fused"`` asks every accelerator that serves it, in priority
    order."""
    st, g, batch, itemsize = problem.structure, problem.geometry, problem.batch, problem.itemsize
    model = problem.cost_model.for_itemsize(itemsize)
    dense = dense_step(st, g, batch, itemsize, model)
    if st.kind == "dense":
        return Decision("dense", None, (dense,), (), (), MappingProxyType({}), dense, dense.macs, 0)
    steps, path, _ = plan_steps(st, g, batch, itemsize, model, objective="macs")
    min_macs = sum(s.macs for s in steps if s.kind != "weights")
    rebuild = reconstruct_macs(st)
    estimates = {
        "factorized": sum(s.seconds for s in steps),
        "reconstructed": dense.seconds + model.seconds(rebuild, itemsize * math.prod(st.shape)),
    }
    chosen, order, accelerators = problem.strategy, "fewest-macs", None
    if chosen == "auto":
        # the fastest factorized order by the cost model may merge spatial factors (one
        # multi-mode depthwise conv: more MACs, fewer passes over memory)
        fast_steps, fast_path, _ = plan_steps(st, g, batch, itemsize, model, objective="seconds")
        if fast_path != path:
            estimates["factorized, fastest order"] = sum(s.seconds for s in fast_steps)
        margins = {"factorized, fastest order": MODEL_MARGIN}
        candidates = {}
        for acc in registered_accelerators():
            if acc.name in problem.ready_accelerators and acc.applies(st, g):
                secs = acc.seconds(st, g, batch, itemsize, model)
                if secs is not None:
                    label = f"fused ({acc.label or acc.name})"  # Decision.seconds reads it back
                    estimates[label], margins[label], candidates[label] = secs, acc.margin, acc
        chosen = min(estimates, key=lambda name: estimates[name] * margins.get(name, 1.0))
        accelerators = ()
        if chosen in candidates:
            # an accelerator computes the fewest-MAC order, so the plan's steps (what describe()
            # counts, and what runs where it declines a call) are that order
            accelerators = (candidates[chosen],)
            chosen = "fused"
        elif chosen == "factorized, fastest order":
            chosen, order, steps, path = "factorized", "fastest", fast_steps, fast_path
    if chosen == "fused" and accelerators is None:
        # asked for by name, fused asks every accelerator that serves it (compiled kernels, then
        # torch.compile or tiles); auto never waits for a compiler: only the one it priced, if any
        allowed = problem.allowed_accelerators
        accelerators = tuple(
            a
            for a in registered_accelerators()
            if "fused" in a.serves and a.applies(st, g) and (allowed is None or a.name in allowed)
        )
    if chosen == "reconstructed":
        return Decision(chosen, None, (dense,), (), (), MappingProxyType(estimates), dense, min_macs, rebuild)
    accelerators = accelerators if chosen == "fused" else ()
    return Decision(
        chosen, order, tuple(steps), tuple(path), accelerators, MappingProxyType(estimates), dense, min_macs, rebuild
    )
