"""First calibration loop: predicted vs measured forward / forward+backward time of one MoE FFN layer
on one GPU (no communication), for the three benchmark configs of the kernels issue.

Prediction (`predict_moe_layer`) uses `cost.CostModel` only: router GEMM, gating and permute /
unpermute as memory-bound passes, expert FFN as grouped GEMMs (GELU: two), backward = 2 x the GEMMs
x ``backward_gemm_factor`` and the memory passes again. Measurement: `simulator/calibration_gpu.py` (torch only, runs on the GPU
machine) times the torchtitan-style layer (topk + argsort + ``torch._grouped_mm`` + index_add); once
``results/bench/moe_layer.csv`` exists, `compare` reads it instead (``impl``, ``mode``, ``metric=ms``).

First loop (2026-11-24, H100 80GB HBM3, torch 2.11, `calibration_gpu.py`, torchtitan-style eager layer),
measured vs predicted (roofline, no profile) in ms:

================ ======== ========= ======= ========== ========== =======
config           fwd meas fwd pred  ratio   f+b meas   f+b pred   ratio
================ ======== ========= ======= ========== ========== =======
mixtral_like     14.09    12.31     0.87    40.94      36.53      0.89
hetu_switch_b32  2.43     1.19      0.49    5.51       3.32       0.60
fine_grained     6.56     3.18      0.48    15.56      8.80       0.57
================ ======== ========= ======= ========== ========== =======

(before ``BACKWARD_GEMM_FACTOR``). The eager torch layer's index / argsort / index_add passes run far
below the roofline. Against the project's own kernels (``results/bench/moe_layer.csv``, impl ``ours``)
forward is within 4% for all three configs; forward+backward was 13-14% too fast until the backward
GEMM factor was calibrated on ``mixtral_like`` alone; the two held-out configs are then within 2%.

This model is the Triton layer's. The eager torch-backend layer (impl ``torch_grouped`` of the benchmark, the
reference `MoELayer` with ``backend="torch"``) issues many more kernels, several far below the roofline; it has
its own model, `simulator.torch_moe_layer` (kernels counted from the code, measured class rates, host
timeline): `compare(..., impl="torch_grouped")` uses it.
"""

from __future__ import annotations

from semoe import ClusterSpec
from semoe.moe_layer_configs import MOE_LAYER_CONFIGS, MoELayerConfig
from simulator.cost import CostModel

CONFIGS = MOE_LAYER_CONFIGS  # issue 3, kernels/bench


def predict_moe_layer(cluster: ClusterSpec, cfg: MoELayerConfig, cost: CostModel | None = None) -> dict[str, float]:
    cm = cost or CostModel(cluster.gpu)
    T, E, k, H, F = cfg.tokens, cfg.experts, cfg.top_k, cfg.hidden, cfg.ffn
    TK = T * k
    router = cm.matmul(T, E, H)
    gating = cm.memory(3 * 4 * T * E)  # fp32 logits -> softmax -> top-k
    permute = cm.memory(2 * 2 * TK * H)  # read + write the routed copies (bf16)
    experts = 2 * cm.matmul(TK / E, F, H, groups=E)
    act = cm.memory(2 * 2 * TK * F)
    combine = cm.memory(2 * 2 * TK * H + 2 * T * H)
    fwd = router + gating + permute + experts + act + combine
    bwd = 2 * cm.backward_gemm_factor * (router + experts) + gating + permute + 2 * act + combine
    return {"fwd": fwd, "fwd_bwd": fwd + bwd, "flops_fwd": 2 * 2 * TK * H * F}


def compare(
    measured_csv: str, cluster: ClusterSpec, impl: str = "ours", device_contains: str = "H100", commit: str | None = None
):
    """Rows ``config, mode, measured_ms, predicted_ms, ratio`` against ``results/bench/moe_layer.csv``
    (columns ``date,commit,device,config,impl,mode,metric,value``; the last row per key wins;
    ``commit`` keeps only the rows of one benchmark run)."""
    import pandas as pd

    df = pd.read_csv(measured_csv)
    df = df[(df["metric"] == "ms") & (df["impl"] == impl) & df["device"].astype(str).str.contains(device_contains)]
    if commit is not None:
        df = df[df["commit"].astype(str) == commit]
    out = []
    torch_cm = None
    for (config, mode), d in df.groupby(["config", "mode"]):
        if config not in CONFIGS or mode not in ("fwd", "fwd_bwd"):
            continue
        meas = float(d["value"].iloc[-1])
        if impl == "torch_grouped":  # the eager torch layer: its own model, on the GPU's profile
            from simulator.torch_moe_layer import predict_torch_layer

            torch_cm = torch_cm or CostModel.auto(cluster.gpu, impl=("torch", "triton"))
            pred = predict_torch_layer(CONFIGS[config], torch_cm, "bench")[mode] * 1e3
        else:
            pred = predict_moe_layer(cluster, CONFIGS[config])[mode] * 1e3
        out.append({"config": config, "mode": mode, "measured_ms": meas, "predicted_ms": pred, "ratio": pred / meas})
    return pd.DataFrame(out)
