"""The MoE-layer benchmark configurations of the kernels issue, shared by the single-GPU benchmark
(`kernels/bench/moe_layer.py`), the multi-GPU run (`paper_repro/multigpu_run.py`) and the simulator's
calibration (`simulator/calibration.py`), so that a measured row and its prediction name the same layer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoELayerConfig:
    """One MoE FFN layer: ``tokens`` routed through ``experts`` experts (top-``top_k``), ``hidden`` -> ``ffn``."""

    name: str
    experts: int
    top_k: int
    hidden: int
    ffn: int
    tokens: int  # per rank in multi-GPU runs
    gate: str = "topk"
    renormalize: bool = True  # switch (top-1) keeps the raw probability

    def flops(self, mode: str = "fwd") -> float:
        """Routed expert FLOPs (two GEMMs of 2 T k H F each); ``fwd_bwd`` is 3x the forward."""
        f = 4.0 * self.tokens * self.top_k * self.hidden * self.ffn
        return f if mode == "fwd" else 3 * f

    def label(self, dtype: str) -> str:
        return (f"{self.name} E{self.experts} k{self.top_k} H{self.hidden} F{self.ffn} T{self.tokens}/rank "
                f"{self.gate} {dtype}")


MOE_LAYER_CONFIGS: dict[str, MoELayerConfig] = {
    "mixtral_like": MoELayerConfig("mixtral_like", 8, 2, 4096, 14336, 16384),
    "hetu_switch_b32": MoELayerConfig("hetu_switch_b32", 8, 1, 2048, 2048, 32 * 1024, gate="switch",
                                      renormalize=False),
    "fine_grained": MoELayerConfig("fine_grained", 64, 8, 2048, 1408, 16384),
}
