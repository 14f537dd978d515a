"""The configuration of one simulated offloaded-inference run (`simulator.workload.inference`): the mechanisms
(``MODES``) and `InferConfig`, the reference's InferConfig plus the generation sizes, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from semoe import SpecError
from simulator.workload.inference_host import HostProbe
from simulator.workload.inference_quant import check_quant

MODES = ("ring", "expert", "resident")


@dataclass(frozen=True)
class InferConfig:
    """One simulated ``semoe infer`` run (the reference's InferConfig plus the generation sizes)."""

    mode: str = "ring"
    batch: int = 1
    prompt_len: int = 256
    gen_len: int = 8
    gpu_budget_bytes: float | None = None  # None: the GPU's memory
    slots: int | None = None  # ring slots K (None: from the budget)
    fallback_frac: float = 0.95
    predict: bool = False
    # one-block-ahead predictor: the chance that each expert the predictor names for a token is one the token
    # is then routed to (1.0: perfect); a wrong guess names another expert (popularity-weighted): its prefetch
    # is wasted bandwidth and the true expert is fetched on demand (see `predict_accuracy` in validate_infer)
    predict_accuracy: float = 1.0
    launch_s: float | None = None  # host seconds per kernel (None: CostModel.host_op_s)
    plan_batch: int | None = None  # batch the engine's memory plan was made for (default: batch)
    warmup_passes: int = 1  # prefill passes before the timed one (the bench warms up once)
    quant: str | None = None  # expert weights: None (model dtype), "int8" or "fp8" (inference_quant)
    dequant: str = "workspace"  # "workspace" (the reference) or "fused" (scale in the GEMM epilogue)
    # the engine's host time per pass measured in the same bench run at tiny widths (bf16 experts): the
    # host seconds per kernel of the paths it probed (else launch_s / CostModel.host_op_s)
    host_probe: HostProbe | None = None
    # resident prefill passes: ``(segment, share)`` of the host syncs' own latency in a block's host time
    # (`inference_syncprobe.sync_shares`, the probe's tiny widths): each such sync costs share x the block's host
    # seconds after the device reached it (serial), the kernels the rest (() : spread evenly over the kernels)
    sync_split: tuple = ()
    # decode routing persistence (`inference_persist`): each of a token's top-k experts at a block repeats its
    # expert of the previous decode step with this probability, else is drawn fresh (0: independent draws, the
    # random stream consumed exactly as without it)
    route_persist: float = 0.0
    # expert-aware decode passes: the host seconds per kernel of a block x (1 + a + b x copy_s), ``(a, b)`` from the
    # decode probe (`inference_aftercopy`); copy_s: the expert copies' seconds of the block (its spans after the
    # fetch) or of the block before (its spans before the fetch); () : the probe's host rate unchanged
    host_after_copy: tuple = ()

    def __post_init__(self) -> None:
        check_quant(self.quant, self.dequant)
        if self.host_after_copy and (len(self.host_after_copy) != 2 or min(self.host_after_copy) < 0):
            raise SpecError(f"InferConfig.host_after_copy: (a, b) with a, b >= 0, got {self.host_after_copy}")
        if not 0 <= self.route_persist <= 1:
            raise SpecError(f"InferConfig.route_persist: must be in [0, 1], got {self.route_persist}")
        if any(not 0 <= sh < 1 for _, sh in self.sync_split) or sum(sh for _, sh in self.sync_split) >= 1:
            raise SpecError(f"InferConfig.sync_split: shares must be in [0, 1) and sum below 1, got {self.sync_split}")
        if self.host_probe is not None and not isinstance(self.host_probe, HostProbe):
            raise SpecError(f"InferConfig.host_probe: a HostProbe or None, got {type(self.host_probe).__name__}")
        if self.launch_s is not None and self.launch_s < 0:
            raise SpecError(f"InferConfig.launch_s: must be >= 0, got {self.launch_s}")
        if self.mode not in MODES:
            raise SpecError(f"InferConfig.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        for name in ("batch", "prompt_len", "gen_len"):
            if getattr(self, name) < 1:
                raise SpecError(f"InferConfig.{name}: {name} ({getattr(self, name)}) must be >= 1")
        if self.slots is not None and self.slots < 1:
            raise SpecError(f"InferConfig.slots: slots ({self.slots}) must be >= 1")
        if not 0 <= self.predict_accuracy <= 1:
            raise SpecError(f"InferConfig.predict_accuracy: must be in [0, 1], got {self.predict_accuracy}")
        if not 0 < self.fallback_frac <= 1:
            raise SpecError(f"InferConfig.fallback_frac: fallback_frac ({self.fallback_frac}) must be in (0, 1]")
        if self.gpu_budget_bytes is not None and self.gpu_budget_bytes <= 0:
            raise SpecError(f"InferConfig.gpu_budget_bytes: must be > 0, got {self.gpu_budget_bytes}")
