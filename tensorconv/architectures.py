"""Efficient blocks as factorized kernels (paper sec. 3.1-3.4, figs. 2-5), both ways.

A *block* is a list of :class:`ConvLayer` (ordinary convolutions run one after another);
a *kernel form* is a dense array, a :class:`KruskalKernel` or a :class:`TuckerKernel`. For
each derivation, ``<name>_to_kernel(block)`` and ``kernel_to_<name>(kernel, ...)`` convert,
and :data:`tensorconv.derivations.DERIVATIONS` bundles a random instance of each for
``tensorconv verify``.

Only the linear parts are covered: BatchNorm in training mode and ReLU are not linear and
break the equivalence; eval-mode BatchNorm is an affine map per channel and is folded into
the convolution before it (see :func:`from_torch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .backends import get_backend
from .kernels import KruskalKernel, TuckerKernel
from .plans.executor import dense_conv
from .plans.plan import conv
from .plans.spec import make_geometry, normalize_int_tuple, normalize_padding

__all__ = [
    "ConvLayer",
    "run_block",
    "from_torch",
    "TorchBlockMatch",
    "pointwise_to_matrix",
    "matrix_to_pointwise",
    "kruskal_to_block",
    "block_to_kruskal",
    "tucker_to_block",
    "block_to_tucker",
    "mobilenet_v1_to_kernel",
    "kernel_to_mobilenet_v1",
    "mobilenet_v2_to_kernel",
    "kernel_to_mobilenet_v2",
    "xception_to_kernel",
    "kernel_to_xception",
    "r2plus1d_to_kernel",
    "kernel_to_r2plus1d",
]


@dataclass
class ConvLayer:
    """One ordinary convolution of a block: weight (T, C/groups, *K) and its geometry.

    ``stride`` / ``dilation`` are per-mode tuples, ``padding`` per-mode (low, high) pairs
    (``None`` means no padding).
    """

    weight: object
    groups: int = 1
    stride: tuple | None = None
    padding: tuple | None = None
    dilation: tuple | None = None
    padding_mode: str = "zeros"

    @property
    def n_spatial(self):
        return self.weight.ndim - 2

    @property
    def n_params(self):
        n = 1
        for s in self.weight.shape:
            n *= int(s)
        return n

    def geometry(self, in_spatial):
        return make_geometry(
            in_spatial,
            tuple(self.weight.shape[2:]),
            stride=self.stride or 1,
            padding=self.padding if self.padding is not None else 0,
            dilation=self.dilation or 1,
            padding_mode=self.padding_mode,
        )

    def macs(self, in_shape):
        g = self.geometry(in_shape[2:])
        n = 1
        for s in g.out_spatial:
            n *= s
        return in_shape[0] * n * self.n_params, (in_shape[0], int(self.weight.shape[0])) + tuple(g.out_spatial)


def run_block(x, layers):
    """Run the block's convolutions in sequence with the backend's dense convolution."""
    backend = get_backend(x, *[layer.weight for layer in layers])
    for layer in layers:
        g = layer.geometry(tuple(x.shape[2:]))
        x = dense_conv(
            backend,
            x,
            layer.weight,
            stride=g.stride,
            dilation=g.dilation,
            groups=layer.groups,
            padding=g.padding,
            padding_mode=g.padding_mode,
        )
    return x


def block_macs(layers, in_shape):
    total = 0
    shape = tuple(in_shape)
    for layer in layers:
        macs, shape = layer.macs(shape)
        total += macs
    return total


def _one_mode(value, n, mode, default):
    """Per-mode geometry with only ``mode`` kept (others default)."""
    out = [default] * n
    out[mode] = value[mode]
    return tuple(out)


def _geom(kernel_size, stride, padding, dilation):
    """Per-mode stride, (low, high) padding and dilation, validated as for any convolution."""
    n = len(kernel_size)
    stride = normalize_int_tuple(stride, n, "stride", minimum=1)
    dilation = normalize_int_tuple(dilation, n, "dilation", minimum=1)
    return stride, normalize_padding(padding, kernel_size, stride, dilation), dilation


def _ones_shape(n, mode=None, k=None):
    return tuple(k if m == mode else 1 for m in range(n))


def _b(x):
    return get_backend(x)


# -- 1. 1x1 conv == n-mode product over channels (sec. 3.1) ---------------------------------------------------
def pointwise_to_matrix(weight):
    """A 1x1 conv weight (T, C, 1, ..) as the matrix of its channel (mode-1) product."""
    if any(int(k) != 1 for k in weight.shape[2:]):
        raise ValueError(f"a pointwise conv has kernel size 1 in every mode, got weight shape {tuple(weight.shape)}")
    return _b(weight).reshape(weight, tuple(weight.shape[:2]))


def matrix_to_pointwise(matrix, n_spatial):
    return _b(matrix).reshape(matrix, tuple(matrix.shape) + (1,) * n_spatial)


# -- 2. CP conv == 1x1 -> depthwise 1-D per mode -> lambda -> 1x1 (fig. 2, eq. 6) ----------------------------
def kruskal_to_block(kernel: KruskalKernel, *, stride=1, padding=0, dilation=1, padding_mode="zeros"):
    """1x1 (C->R), one depthwise 1-D conv per spatial mode (with that mode's geometry), 1x1 (R->T).

    lambda is folded into the last 1x1. Needs one factor per mode (see MobileNet for merged ones).
    """
    if not kernel.is_default_modes:
        raise ValueError(f"kruskal_to_block needs one factor per mode; got modes={kernel.modes}")
    b = kernel.backend
    n = kernel.n_spatial
    r = kernel.rank
    stride, padding, dilation = _geom(kernel.kernel_size, stride, padding, dilation)
    u_t, u_c = kernel.factors[0], kernel.factors[1]
    eye = b.eye(r, like=kernel.weights)
    u_t = eye if u_t is None else u_t
    u_c = eye if u_c is None else u_c
    layers = [ConvLayer(matrix_to_pointwise(b.moveaxis(u_c, 0, 1), n))]
    for m in range(n):
        f = kernel.factors[2 + m] if kernel.factors[2 + m] is not None else eye
        w = b.reshape(b.moveaxis(f, 0, 1), (r, 1) + _ones_shape(n, m, int(f.shape[0])))
        layers.append(
            ConvLayer(
                w,
                groups=r,
                stride=_one_mode(stride, n, m, 1),
                padding=_one_mode(padding, n, m, (0, 0)),
                dilation=_one_mode(dilation, n, m, 1),
                padding_mode=padding_mode,
            )
        )
    layers.append(ConvLayer(matrix_to_pointwise(u_t * kernel.weights, n)))
    return layers


def block_to_kruskal(layers):
    """Inverse of :func:`kruskal_to_block` (lambda = ones)."""
    n = layers[0].n_spatial
    if len(layers) != n + 2:
        raise ValueError(
            f"a CP block of {n} spatial dims has {n + 2} layers (1x1, {n} depthwise, 1x1), got {len(layers)}"
        )
    b = _b(layers[0].weight)
    u_c = b.moveaxis(pointwise_to_matrix(layers[0].weight), 0, 1)
    r = int(u_c.shape[1])
    factors = [pointwise_to_matrix(layers[-1].weight), u_c]
    for m, layer in enumerate(layers[1:-1]):
        if layer.groups != r or int(layer.weight.shape[0]) != r:
            raise ValueError(
                f"layer {1 + m} must be a depthwise conv over {r} channels, got weight "
                f"{tuple(layer.weight.shape)} with groups={layer.groups}"
            )
        k = int(layer.weight.shape[2 + m])
        factors.append(b.moveaxis(b.reshape(layer.weight, (r, k)), 0, 1))
    return KruskalKernel(b.ones((r,), like=u_c), factors)


# -- 3./6. Tucker conv == ResNet bottleneck; groups > 1 == ResNeXt (eq. 4, fig. 3, sec. 3.4) -------------------
def tucker_to_block(kernel: TuckerKernel, *, stride=1, padding=0, dilation=1, padding_mode="zeros"):
    """1x1 (C->R_in), grouped core conv (R_in->R_out, groups) with the geometry, 1x1 (R_out->T).

    Spatial factors are absorbed into the core first (the paper's H = G x_2 U_H x_3 U_W).
    """
    b = kernel.backend
    n = kernel.n_spatial
    stride, padding, dilation = _geom(kernel.kernel_size, stride, padding, dilation)
    core = kernel.core
    for j, f in enumerate(kernel.factors[2:]):
        if f is not None:
            core = b.moveaxis(b.tensordot(core, f, axes=([2 + j], [1])), -1, 2 + j)
    r_out, r_in = kernel.rank[:2]
    layers = []
    g = kernel.groups
    block_t, block_c = kernel.block_diagonal  # block-diagonal channel factors are grouped 1x1 convs
    if kernel.factors[1] is not None:
        u_c = kernel.factors[1]
        if block_c:  # (C, R_in / g) by blocks -> grouped weight (R_in, C / g)
            cg, ig = int(u_c.shape[0]) // g, int(u_c.shape[1])
            w = b.reshape(b.permute(b.reshape(u_c, (g, cg, ig)), (0, 2, 1)), (g * ig, cg))
        else:
            w = b.moveaxis(u_c, 0, 1)
        layers.append(ConvLayer(matrix_to_pointwise(w, n), groups=g if block_c else 1))
    layers.append(
        ConvLayer(core, groups=g, stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode)
    )
    if kernel.factors[0] is not None:  # block-diagonal (T, R_out / g) is already the grouped weight
        layers.append(ConvLayer(matrix_to_pointwise(kernel.factors[0], n), groups=g if block_t else 1))
    return layers


def block_to_tucker(layers):
    """[1x1, (grouped) conv, 1x1] -> TuckerKernel(groups=the middle conv's groups)."""
    if len(layers) != 3:
        raise ValueError(f"a bottleneck block has 3 layers (1x1, conv, 1x1), got {len(layers)}")
    first, mid, last = layers
    u_c = _b(first.weight).moveaxis(pointwise_to_matrix(first.weight), 0, 1)
    u_t = pointwise_to_matrix(last.weight)
    return TuckerKernel(mid.weight, [u_t, u_c], groups=mid.groups)


# -- 4. MobileNet v1: depthwise KxK -> 1x1 == CP, R = C, no input factor, merged spatial factor (fig. 4) ------
def _depthwise_to_factor(weight):
    b = _b(weight)
    r = int(weight.shape[0])
    if int(weight.shape[1]) != 1:
        raise ValueError(f"a depthwise weight has shape (R, 1, *K), got {tuple(weight.shape)}")
    return b.moveaxis(b.reshape(weight, (r,) + tuple(weight.shape[2:])), 0, -1)  # (*K, R)


def _factor_to_depthwise(factor):
    b = _b(factor)
    r = int(factor.shape[-1])
    return b.reshape(b.moveaxis(factor, -1, 0), (r, 1) + tuple(factor.shape[:-1]))


def _merged_modes(n):
    return [(0,), (1,), tuple(range(2, 2 + n))]


def mobilenet_v1_to_kernel(depthwise, pointwise):
    """(depthwise (C, 1, *K), pointwise (T, C, 1..)) -> KruskalKernel(R=C, U_C=identity, merged U_S)."""
    spatial = _depthwise_to_factor(depthwise)
    u_t = pointwise_to_matrix(pointwise)
    return KruskalKernel(None, [u_t, None, spatial], modes=_merged_modes(depthwise.ndim - 2))


def kernel_to_mobilenet_v1(kernel: KruskalKernel, *, stride=1, padding=0, dilation=1, padding_mode="zeros"):
    n = kernel.n_spatial
    if kernel.modes != _merged_modes(n) or kernel.factors[1] is not None:
        raise ValueError(
            f"MobileNet v1 is a CP kernel with an identity input factor and one merged spatial factor; "
            f"got modes={kernel.modes} with input factor {'present' if kernel.factors[1] is not None else 'None'}"
        )
    b = kernel.backend
    stride, padding, dilation = _geom(kernel.kernel_size, stride, padding, dilation)
    u_t = kernel.factors[0] if kernel.factors[0] is not None else b.eye(kernel.rank, like=kernel.weights)
    return [
        ConvLayer(
            _factor_to_depthwise(kernel.factors[2]),
            groups=kernel.rank,
            stride=stride,
            padding=padding,
            dilation=dilation,
            padding_mode=padding_mode,
        ),
        ConvLayer(matrix_to_pointwise(u_t * kernel.weights, n)),
    ]


# -- 5. MobileNet v2 (linear part): 1x1 expand -> depthwise KxK -> 1x1 project == CP, merged U_S (eq. 5) -----
def mobilenet_v2_to_kernel(expand, depthwise, project):
    b = _b(expand)
    u_c = b.moveaxis(pointwise_to_matrix(expand), 0, 1)
    return KruskalKernel(
        None, [pointwise_to_matrix(project), u_c, _depthwise_to_factor(depthwise)], modes=_merged_modes(expand.ndim - 2)
    )


def kernel_to_mobilenet_v2(kernel: KruskalKernel, *, stride=1, padding=0, dilation=1, padding_mode="zeros"):
    n = kernel.n_spatial
    if kernel.modes != _merged_modes(n) or kernel.factors[0] is None or kernel.factors[1] is None:
        raise ValueError(
            f"MobileNet v2 is a CP kernel with output and input factors and one merged spatial factor; "
            f"got modes={kernel.modes}"
        )
    b = kernel.backend
    stride, padding, dilation = _geom(kernel.kernel_size, stride, padding, dilation)
    return [
        ConvLayer(matrix_to_pointwise(b.moveaxis(kernel.factors[1], 0, 1), n)),
        ConvLayer(
            _factor_to_depthwise(kernel.factors[2]),
            groups=kernel.rank,
            stride=stride,
            padding=padding,
            dilation=dilation,
            padding_mode=padding_mode,
        ),
        ConvLayer(matrix_to_pointwise(kernel.factors[0] * kernel.weights, n)),
    ]


# -- 7. Xception: 1x1 -> depthwise KxK, no final 1x1 == CP with identity output factor ------------------------
def xception_to_kernel(pointwise, depthwise):
    b = _b(pointwise)
    u_c = b.moveaxis(pointwise_to_matrix(pointwise), 0, 1)
    return KruskalKernel(None, [None, u_c, _depthwise_to_factor(depthwise)], modes=_merged_modes(pointwise.ndim - 2))


def kernel_to_xception(kernel: KruskalKernel, *, stride=1, padding=0, dilation=1, padding_mode="zeros"):
    n = kernel.n_spatial
    if kernel.modes != _merged_modes(n) or kernel.factors[0] is not None or kernel.factors[1] is None:
        raise ValueError(
            f"Xception is a CP kernel with an identity output factor and one merged spatial factor; "
            f"got modes={kernel.modes}"
        )
    b = kernel.backend
    stride, padding, dilation = _geom(kernel.kernel_size, stride, padding, dilation)
    spatial = kernel.factors[2] * kernel.weights
    return [
        ConvLayer(matrix_to_pointwise(b.moveaxis(kernel.factors[1], 0, 1), n)),
        ConvLayer(
            _factor_to_depthwise(spatial),
            groups=kernel.rank,
            stride=stride,
            padding=padding,
            dilation=dilation,
            padding_mode=padding_mode,
        ),
    ]


# -- 8. (2+1)D: spatial (1,K,K) C->M then temporal (K_t,1,1) M->T == CP of rank M over {T,K_t}, {C,K,K} ----------
def r2plus1d_to_kernel(spatial, temporal):
    b = _b(spatial)
    m = int(spatial.shape[0])
    if int(spatial.shape[2]) != 1 or any(int(k) != 1 for k in temporal.shape[3:]):
        raise ValueError(
            f"(2+1)D needs a spatial weight (M, C, 1, *K) and a temporal weight (T, M, K_t, 1, ..); got "
            f"{tuple(spatial.shape)} and {tuple(temporal.shape)}"
        )
    n = spatial.ndim - 2
    a = b.moveaxis(b.reshape(temporal, tuple(temporal.shape[:3])), 1, -1)  # (T, K_t, M)
    s = b.moveaxis(b.reshape(spatial, (m, int(spatial.shape[1])) + tuple(spatial.shape[3:])), 0, -1)  # (C, *K, M)
    return KruskalKernel(None, [a, s], modes=[(0, 2), (1,) + tuple(range(3, 2 + n))])


def kernel_to_r2plus1d(kernel: KruskalKernel, *, stride=1, padding=0, dilation=1, padding_mode="zeros"):
    n = kernel.n_spatial
    if kernel.modes != [(0, 2), (1,) + tuple(range(3, 2 + n))]:
        raise ValueError(f"(2+1)D is a CP kernel with modes [(0, 2), (1, 3, ...)]; got modes={kernel.modes}")
    b = kernel.backend
    stride, padding, dilation = _geom(kernel.kernel_size, stride, padding, dilation)
    a, s = kernel.factors
    m = kernel.rank
    temporal = b.reshape(
        b.moveaxis(a * kernel.weights, -1, 1), tuple(a.shape[:1]) + (m, int(a.shape[1])) + (1,) * (n - 1)
    )
    spatial = b.reshape(b.moveaxis(s, -1, 0), (m, int(s.shape[0]), 1) + tuple(s.shape[1:-1]))
    return [
        ConvLayer(
            spatial,
            stride=(1,) + stride[1:],
            padding=((0, 0),) + padding[1:],
            dilation=(1,) + dilation[1:],
            padding_mode=padding_mode,
        ),
        ConvLayer(
            temporal,
            stride=stride[:1] + (1,) * (n - 1),
            padding=padding[:1] + ((0, 0),) * (n - 1),
            dilation=dilation[:1] + (1,) * (n - 1),
            padding_mode=padding_mode,
        ),
    ]


# -- from_torch ------------------------------------------------------------------------------------------------
@dataclass
class TorchBlockMatch:
    """What :func:`from_torch` found: the kernel form, the derivation, and how to run it."""

    kernel: object
    derivation: str
    conv_kwargs: dict = field(default_factory=dict)
    bias: object = None

    def __call__(self, x, **kw):
        out = conv(x, self.kernel, **{**self.conv_kwargs, **kw})
        if self.bias is not None:
            out = out + self.bias.reshape((1, -1) + (1,) * (out.ndim - 2))
        return out


def _torch_layers(module):
    import torch.nn as tnn

    convs = (tnn.Conv1d, tnn.Conv2d, tnn.Conv3d)
    children = list(module) if isinstance(module, tnn.Sequential) else list(module.children())
    layers = []
    for idx, child in enumerate(children):
        name = f"layer {idx} ({type(child).__name__})"
        if isinstance(child, tnn.Sequential):
            layers += _torch_layers(child)
        elif isinstance(child, convs):
            from ._conv_modules import check_plain_conv

            check_plain_conv(child, f"from_torch, {name}")
            padding = normalize_padding(
                child.padding, tuple(child.kernel_size), tuple(child.stride), tuple(child.dilation)
            )
            layers.append(
                [
                    child.weight.detach(),
                    child.bias.detach() if child.bias is not None else None,
                    ConvLayer(
                        None, child.groups, tuple(child.stride), padding, tuple(child.dilation), child.padding_mode
                    ),
                    name,
                ]
            )
        elif isinstance(child, (tnn.BatchNorm1d, tnn.BatchNorm2d, tnn.BatchNorm3d)):
            if child.training:
                raise ValueError(f"{name}: BatchNorm in training mode is not a fixed linear map; call .eval() first")
            if not layers:
                raise ValueError(f"{name}: BatchNorm must follow a convolution to be folded")
            w, bias, layer, _ = layers[-1]
            scale = (
                child.weight.detach() / (child.running_var + child.eps).sqrt()
                if child.affine
                else 1 / (child.running_var + child.eps).sqrt()
            )
            shift = (child.bias.detach() if child.affine else 0) - child.running_mean * scale
            w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
            bias = shift if bias is None else bias * scale + shift
            layers[-1][:2] = [w, bias]
        elif isinstance(child, tnn.Identity):
            continue
        else:
            raise ValueError(
                f"{name} breaks linearity: only ConvNd, eval-mode BatchNorm and Identity can be "
                f"expressed as one factorized kernel"
            )
    return layers


def from_torch(module):
    """Match a torch block (``nn.Sequential`` of ConvNd, optionally with eval BatchNorm) to a kernel form.

    Returns a :class:`TorchBlockMatch` (kernel, derivation, conv kwargs, output bias).
    """
    raw = _torch_layers(module)
    if not raw:
        raise ValueError("the module holds no convolution")
    for i, (w, bias, layer, name) in enumerate(raw):
        layer.weight = w
        if bias is not None and i != len(raw) - 1 and bool((bias != 0).any()):
            raise ValueError(
                f"{name} has a bias (or a folded BatchNorm shift) before the last layer: the block is "
                f"affine, not linear, and its padded borders differ from any single kernel"
            )
    layers = [r[2] for r in raw]
    for i in range(1, len(layers)):
        prev, cur = layers[i - 1], layers[i]
        if int(prev.weight.shape[0]) != int(cur.weight.shape[1]) * cur.groups:
            raise ValueError(
                f"shapes do not chain: {raw[i - 1][3]} outputs {int(prev.weight.shape[0])} channels but "
                f"{raw[i][3]} expects {int(cur.weight.shape[1]) * cur.groups}"
            )
        if prev.n_spatial != cur.n_spatial:
            raise ValueError(f"{raw[i][3]} has {cur.n_spatial} spatial dims but {raw[i - 1][3]} has {prev.n_spatial}")
    bias = raw[-1][1]

    def is_pointwise(layer):
        return layer.groups == 1 and all(int(k) == 1 for k in layer.weight.shape[2:]) and _trivial(layer)

    def is_depthwise(layer):
        return layer.groups == int(layer.weight.shape[0]) and int(layer.weight.shape[1]) == 1

    def kwargs(layer):
        return dict(
            stride=layer.stride, padding=layer.padding, dilation=layer.dilation, padding_mode=layer.padding_mode
        )

    kinds = [("P" if is_pointwise(m) else "D" if is_depthwise(m) else "C") for m in layers]
    pattern = "".join(kinds)
    if pattern == "PDP":
        return TorchBlockMatch(
            mobilenet_v2_to_kernel(*[m.weight for m in layers]), "mobilenet_v2", kwargs(layers[1]), bias
        )
    if pattern == "DP":
        return TorchBlockMatch(
            mobilenet_v1_to_kernel(layers[0].weight, layers[1].weight), "mobilenet_v1", kwargs(layers[0]), bias
        )
    if pattern == "PD":
        return TorchBlockMatch(
            xception_to_kernel(layers[0].weight, layers[1].weight), "xception", kwargs(layers[0 + 1]), bias
        )
    if pattern == "PCP":
        kernel = block_to_tucker(layers)
        return TorchBlockMatch(kernel, "resnext" if layers[1].groups > 1 else "tucker", kwargs(layers[1]), bias)
    if len(layers) == 1:
        return TorchBlockMatch(
            layers[0].weight,
            "pointwise" if pattern == "P" else "dense",
            dict(kwargs(layers[0]), groups=layers[0].groups),
            bias,
        )
    raise ValueError(
        f"no derivation matches this block: layer kinds {pattern} (P = 1x1, D = depthwise, C = other); "
        f"supported: PDP (MobileNet v2), DP (MobileNet v1), PD (Xception), PCP (Tucker / ResNeXt)"
    )


def _trivial(layer):
    n = layer.n_spatial
    return all(s == 1 for s in (layer.stride or (1,) * n)) and all(
        p == (0, 0) for p in (layer.padding or ((0, 0),) * n)
    )
