"""Convolution plans: geometry (spec), contraction order (planner), execution (executor)."""

from .cost import CostModel, calibrate, cost_model_for
from .plan import ConvPlan, conv, plan_conv
from .planner import STRATEGIES, Step
from .spec import ConvGeometry, make_geometry
from .workspace import free_workspace

__all__ = [
    "ConvPlan",
    "conv",
    "plan_conv",
    "STRATEGIES",
    "Step",
    "ConvGeometry",
    "make_geometry",
    "CostModel",
    "calibrate",
    "cost_model_for",
    "free_workspace",
]
