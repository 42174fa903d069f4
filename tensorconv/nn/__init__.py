"""PyTorch modules (imported on first use: ``import tensorconv`` does not import torch)."""

from .batchnorm import fold_batchnorm, recalibrate_batchnorm
from .compress import factorize, summarize
from .compression import CompressionPlan, plan_compression
from .distillation import distillation_loss
from .hocp import HOCPBlock
from .layers import KruskalConv, TuckerConv, cp_rank_for, tucker_rank_for
from .lowrank import LowRankConv, LowRankLinear
from .resnet import HOCPResNet, TensorRegression, hocp_resnet18
from .training import factorized_layers, lasso, prune, transduct

__all__ = [
    "KruskalConv",
    "TuckerConv",
    "HOCPBlock",
    "transduct",
    "lasso",
    "prune",
    "factorized_layers",
    "cp_rank_for",
    "tucker_rank_for",
    "hocp_resnet18",
    "HOCPResNet",
    "TensorRegression",
    "factorize",
    "summarize",
    "plan_compression",
    "CompressionPlan",
    "LowRankConv",
    "LowRankLinear",
    "distillation_loss",
    "fold_batchnorm",
    "recalibrate_batchnorm",
]
