"""Factorized convolution kernels: :class:`KruskalKernel` (CP) and :class:`TuckerKernel`.

A kernel has shape (T, C, K_0, ..., K_{N-1}) — output channels, input channels, then one
kernel size per spatial mode — as the weight of ``torch.nn.ConvNd``. The objects hold
backend arrays (numpy, torch or cupy) and never convert them behind the user's back.
"""

from __future__ import annotations

from ..backends import backend_for_name, on_load
from ._base import check_decomposition_keywords
from .kruskal import KruskalKernel
from .tucker import TuckerKernel

__all__ = ["KruskalKernel", "TuckerKernel", "check_decomposition_keywords"]


def _register_jax_pytrees(_jax_backend):
    """Kernels become JAX pytrees: ``jax.grad`` of a loss wrt a kernel returns a kernel of
    gradients, and kernels pass through ``jax.jit`` / ``jax.vmap`` as arguments.

    Unflattening skips the constructor: JAX rebuilds trees with placeholder leaves (None,
    sentinels) where no array exists, so the static metadata travels as aux data."""
    from jax import tree_util

    from ..backends import _backend_of_type

    def own_backend(children, name):
        """The backend of the leaves where they are arrays (a tree_map may change the library),
        else the one the kernel had: JAX unflattens with placeholders (None, sentinels) too."""
        for leaf in tree_util.tree_leaves(children):
            found = _backend_of_type(type(leaf))
            if found is not None:
                return found
        return backend_for_name(name)

    def kruskal_flatten(k):
        return (k.weights, k.factors), (tuple(k.modes), k.shape, k.rank, k.backend.name)

    def kruskal_unflatten(aux, children):
        k = object.__new__(KruskalKernel)
        modes, k.shape, k.rank, name = aux
        k.backend = own_backend(children, name)
        k.weights, factors = children
        k.factors = list(factors)
        k.modes = list(modes)
        return k

    def tucker_flatten(k):
        return (k.core, k.factors), (k.groups, k.shape, k.block_diagonal, k.backend.name)

    def tucker_unflatten(aux, children):
        k = object.__new__(TuckerKernel)
        k.groups, k.shape, k.block_diagonal, name = aux
        k.backend = own_backend(children, name)
        k.core, factors = children
        k.factors = list(factors)
        return k

    tree_util.register_pytree_node(KruskalKernel, kruskal_flatten, kruskal_unflatten)
    tree_util.register_pytree_node(TuckerKernel, tucker_flatten, tucker_unflatten)


on_load("jax", _register_jax_pytrees)
