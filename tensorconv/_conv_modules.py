"""Which torch conv modules tensorconv can read: plain ``nn.Conv1d/2d/3d`` (and subclasses that
keep their forward). Imported by the torch-facing modules only; it imports torch lazily."""

from __future__ import annotations

__all__ = ["check_plain_conv"]


def check_plain_conv(module, who):
    """Raise ``TypeError`` unless ``module`` is an ``nn.Conv{1,2,3}d`` whose forward is torch's.

    A subclass with its own ``forward`` / ``_conv_forward`` (timm's ``Conv2dSame`` pads each input
    by an amount computed from its size) does something its attributes do not describe:
    converting it from them would silently change what it computes, so it is refused.
    """
    from torch import nn

    bases = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if not isinstance(module, bases):
        raise TypeError(f"{who} expects nn.Conv1d/2d/3d, got {type(module).__name__}")
    base = next(b for b in bases if isinstance(module, b))
    own = [name for name in ("forward", "_conv_forward") if getattr(type(module), name) is not getattr(base, name)]
    if own:
        raise TypeError(
            f"{who}: {type(module).__qualname__} subclasses nn.{base.__name__} with its own {' and '.join(own)} "
            f"(e.g. timm's Conv2dSame, which pads each input TF-style by an amount computed from its size), so its "
            f"attributes (padding={module.padding!r}) do not say what it computes; it is not converted. Replace it "
            f"with a plain nn.{base.__name__} (padding='same' where the stride is 1) first, or leave it dense"
        )
