"""Shared vocabulary of the SE-MoE testbed: specs, presets, sizing formulas, trace rows, CLI.

Imports only the standard library and pyyaml (no torch), so the simulator and tools can use it alone.
"""

from semoe.cluster_spec import ClusterSpec, GPUSpec, LinkSpec
from semoe.model_spec import GATE_NAMES, ModelSpec
from semoe.plan_spec import OffloadPlacement, ParallelPlan
from semoe.presets import (
    CLUSTER_PRESETS,
    MODEL_PRESETS,
    PLAN_PRESETS,
    cluster_preset,
    load_model,
    model_preset,
    plan_preset,
)
from semoe.spec_base import Spec, SpecError
from semoe.trace import TraceRow
from semoe.workload_spec import Run, Workload

__all__ = [
    "CLUSTER_PRESETS",
    "GATE_NAMES",
    "MODEL_PRESETS",
    "PLAN_PRESETS",
    "ClusterSpec",
    "GPUSpec",
    "LinkSpec",
    "ModelSpec",
    "OffloadPlacement",
    "ParallelPlan",
    "Run",
    "Spec",
    "SpecError",
    "TraceRow",
    "Workload",
    "cluster_preset",
    "load_model",
    "model_preset",
    "plan_preset",
]
