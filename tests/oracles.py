"""Independent reference convolutions (never the code under test)."""

import numpy as np

_NP_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def np_conv(x, w, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """Dense N-D cross-correlation with numpy's pad + sliding_window_view + einsum.

    x (B, C, *D), w (T, C/groups, *K); padding: per-mode (low, high) pairs.
    """
    n = w.ndim - 2
    stride = (stride,) * n if isinstance(stride, int) else tuple(stride)
    dilation = (dilation,) * n if isinstance(dilation, int) else tuple(dilation)
    if isinstance(padding, int):
        padding = ((padding, padding),) * n
    xp = np.pad(x, ((0, 0), (0, 0)) + tuple(tuple(p) for p in padding), mode=_NP_MODES[padding_mode])
    spans = tuple(d * (k - 1) + 1 for d, k in zip(dilation, w.shape[2:]))
    win = np.lib.stride_tricks.sliding_window_view(xp, spans, axis=tuple(range(2, 2 + n)))
    index = (
        (slice(None), slice(None))
        + tuple(slice(None, None, s) for s in stride)
        + tuple(slice(None, None, d) for d in dilation)
    )
    win = win[index]  # (B, C, *out, *K)
    t, cg = w.shape[:2]
    b = x.shape[0]
    win = win.reshape((b, groups, cg) + win.shape[2:])
    wg = w.reshape((groups, t // groups, cg) + w.shape[2:])
    letters = "mnopq"[:n]
    ks = "uvwxy"[:n]
    out = np.einsum(f"ZGc{letters}{ks},GTc{ks}->ZGT{letters}", win, wg)
    return out.reshape((b, t) + out.shape[3:])


def torch_conv(x, w, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """Dense 1-3-D convolution with torch F.pad + F.convNd (numpy in and out)."""
    import torch
    import torch.nn.functional as F

    n = w.ndim - 2
    if isinstance(padding, int):
        padding = ((padding, padding),) * n
    xt = torch.from_numpy(np.ascontiguousarray(x))
    pads = []
    for lo, hi in reversed(padding):
        pads += [lo, hi]
    mode = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}[padding_mode]
    if any(pads):
        xt = F.pad(xt, pads, mode=mode)
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return conv(xt, torch.from_numpy(np.ascontiguousarray(w)), None, stride, 0, dilation, groups).numpy()


def reference_conv(x, w, **kw):
    n = w.ndim - 2
    return torch_conv(x, w, **kw) if n <= 3 else np_conv(x, w, **kw)
