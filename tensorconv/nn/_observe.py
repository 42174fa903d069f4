"""Run a model once per batch with hooks attached: how the model tools look at activations."""

from __future__ import annotations

import torch


def observe(model, hooks, batches):
    """Run ``model`` on each of ``batches`` (tuples of positional inputs) in eval mode without
    gradients, with ``hooks`` (``(module, "pre" | "post", fn)``) registered for that time; the
    hooks are removed and the training flag restored afterwards, whatever happens."""
    handles = [
        module.register_forward_pre_hook(fn) if when == "pre" else module.register_forward_hook(fn)
        for module, when, fn in hooks
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(*batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
