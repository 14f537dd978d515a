"""Named presets for models, clusters and plans.

Model presets follow ../shared/SEMOE.md (the paper's GPT-MoE family: 12 layers, hidden 4096, 64
heads, vocab 50304, FFN 4h, every layer MoE, one expert per GPU) and the published configs of the
other models. Cluster values come from ../shared/HARDWARE.md; each line says which row.
"""

from __future__ import annotations

from collections.abc import Callable

from semoe.cluster_spec import ClusterSpec, GPUSpec, LinkSpec
from semoe.model_spec import ModelSpec
from semoe.plan_spec import OffloadPlacement, ParallelPlan
from semoe.spec_base import SpecError

GiB = 1024**3
GB = 10**9
TB = 10**12


def _paper_gpt_moe(experts: int, name: str) -> ModelSpec:
    # SE-MoE paper, training model family (SEMOE.md "Experiment setups"):
    # P ~= 0.805B (attention) + 0.206B (embedding) + 1.611B x experts.
    return ModelSpec(
        name=name,
        layers=12,
        hidden=4096,
        heads=64,
        vocab=50304,
        max_seq=2048,
        ffn=4 * 4096,
        experts=experts,
        top_k=1,
        gate="topk",
        capacity_factor=1.0,
        activation="gelu",
        dtype="bf16",
    )


MODEL_PRESETS: dict[str, Callable[[], ModelSpec]] = {
    # seconds on a CPU: 2 blocks, both MoE, 4 experts, top-2, byte vocabulary
    "tiny": lambda: ModelSpec(
        name="tiny",
        layers=2,
        hidden=64,
        heads=4,
        vocab=256,  # byte-level corpus
        max_seq=128,
        ffn=128,
        experts=4,
        top_k=2,
        gate="topk",
        capacity_factor=None,
        activation="gelu",
        dtype="fp32",
    ),
    "paper-13.9b": lambda: _paper_gpt_moe(8, "paper-13.9b"),
    "paper-26.8b": lambda: _paper_gpt_moe(16, "paper-26.8b"),
    "paper-52.6b": lambda: _paper_gpt_moe(32, "paper-52.6b"),
    "paper-104b": lambda: _paper_gpt_moe(64, "paper-104b"),
    "paper-207b": lambda: _paper_gpt_moe(128, "paper-207b"),
    # Mixtral 8x7B (Mistral AI, 2024): 32 layers, d 4096, 32 heads / 8 KV heads, SwiGLU 14336,
    # 8 experts top-2, vocab 32000, RMSNorm, RoPE, untied; ~46.7B parameters.
    "mixtral-8x7b": lambda: ModelSpec(
        name="mixtral-8x7b",
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        vocab=32000,
        max_seq=32768,
        ffn=14336,
        experts=8,
        top_k=2,
        gate="topk",
        activation="swiglu",
        norm="rmsnorm",
        position="rope",
        tied_embeddings=False,
        dtype="bf16",
    ),
    # Fine-grained MoE (DeepSeek-MoE / Qwen-MoE style): 64 experts of width 1408, top-8, d 2048.
    "fine-grained-64e": lambda: ModelSpec(
        name="fine-grained-64e",
        layers=24,
        hidden=2048,
        heads=16,
        vocab=50304,
        max_seq=4096,
        ffn=1408,
        experts=64,
        top_k=8,
        gate="topk",
        activation="swiglu",
        norm="rmsnorm",
        position="rope",
        tied_embeddings=False,
        dtype="bf16",
    ),
    # HetuMoE's example config (SEMOE.md "HetuMoE"): switch gate, model dim 2048, expert hidden 2048.
    "hetu-switch": lambda: ModelSpec(
        name="hetu-switch",
        layers=12,
        hidden=2048,
        heads=16,
        vocab=50304,
        max_seq=1024,
        ffn=2048,
        experts=8,
        top_k=1,
        gate="switch",
        capacity_factor=1.0,
        activation="gelu",
        dtype="bf16",
    ),
}


def _a100(memory_gb: int) -> GPUSpec:
    # HARDWARE.md datasheet: A100 SXM bf16 312 TFLOP/s; HBM 1,555 GB/s (40GB) / 2,039 GB/s (80GB)
    return GPUSpec(
        name=f"A100-{memory_gb}G",
        memory_bytes=memory_gb * GB,
        bf16_tflops=312.0,
        hbm_GBps=1555.0 if memory_gb == 40 else 2039.0,
    )


def _h100() -> GPUSpec:
    # HARDWARE.md datasheet: H100 SXM 80GB, bf16 989 TFLOP/s dense, HBM3 3.35 TB/s
    return GPUSpec(name="H100-80G", memory_bytes=80 * GB, bf16_tflops=989.0, hbm_GBps=3350.0)


def _dgx_a100(nodes: int, memory_gb: int) -> ClusterSpec:
    return ClusterSpec(
        name=f"dgx-a100-{memory_gb}g",
        nodes=nodes,
        gpus_per_node=8,
        gpu=_a100(memory_gb),
        # HARDWARE.md: NVLink3 300 GB/s each way per GPU; NCCL per-hop latency 0.5-3.4 us
        nvlink=LinkSpec(bandwidth_GBps=300.0, latency_s=2e-6),
        # HARDWARE.md: PCIe Gen4 x16, ~25.6 GB/s usable
        pcie=LinkSpec(bandwidth_GBps=25.6, latency_s=5e-6),
        # HARDWARE.md: DGX A100 has 8 x 200 Gb/s HDR IB compute NICs, ~23.5-25 GB/s usable;
        # NCCL network per-hop latency 2.7-9.6 us
        nics_per_node=8,
        nic=LinkSpec(bandwidth_GBps=24.0, latency_s=5e-6),
        spine_oversubscription=1.0,
        # HARDWARE.md: up to 2 TB DRAM (the paper does not give its size; 1 TB assumed)
        host_memory_bytes=1 * TB,
        host_memory_GBps=150.0,
        # HARDWARE.md: the paper's SSD tier was Optane PMem, ~6.6 GB/s read, 2.3 GB/s write per DIMM;
        # NVMe Gen4 x4 ~7 / 3.5 GB/s. Assumed: 4 NVMe Gen4 drives of 3.84 TB.
        ssd_bytes=15 * TB,
        ssd_read_GBps=4 * 7.0,
        ssd_write_GBps=4 * 3.5,
    )


def _dgx_h100(nodes: int) -> ClusterSpec:
    return ClusterSpec(
        name="dgx-h100",
        nodes=nodes,
        gpus_per_node=8,
        gpu=_h100(),
        # HARDWARE.md: NVLink4 450 GB/s each way per GPU
        nvlink=LinkSpec(bandwidth_GBps=450.0, latency_s=2e-6),
        # HARDWARE.md: PCIe Gen5 x16 ~51-54 GB/s usable
        pcie=LinkSpec(bandwidth_GBps=52.0, latency_s=5e-6),
        # HARDWARE.md: DGX H100 8 x 400 Gb/s NDR, ~48.5-50 GB/s usable
        nics_per_node=8,
        nic=LinkSpec(bandwidth_GBps=49.0, latency_s=5e-6),
        spine_oversubscription=1.0,
        # HARDWARE.md: 2 TB DDR5
        host_memory_bytes=2 * TB,
        host_memory_GBps=250.0,
        # HARDWARE.md: NVMe Gen5 x4 up to ~14 GB/s; assumed 4 drives of 3.84 TB, write half of read
        ssd_bytes=15 * TB,
        ssd_read_GBps=4 * 14.0,
        ssd_write_GBps=4 * 7.0,
    )


def _single(gpu: GPUSpec, name: str, h2d_GBps: float) -> ClusterSpec:
    return ClusterSpec(
        name=name,
        nodes=1,
        gpus_per_node=1,
        gpu=gpu,
        nvlink=None,
        # HARDWARE.md measured: host-to-device pinned 52.8-54.3 GB/s (H100), 55.4 GB/s (H200)
        pcie=LinkSpec(bandwidth_GBps=h2d_GBps, latency_s=5e-6),
        # HARDWARE.md measured: 125 GiB host RAM, ~60 GiB free disk, disk 1.07 / 1.4 GB/s write/read
        host_memory_bytes=125 * GiB,
        host_memory_GBps=50.0,
        ssd_bytes=60 * GiB,
        ssd_read_GBps=1.4,
        ssd_write_GBps=1.07,
    )


def _h200_host(nodes: int, gpus_per_node: int) -> ClusterSpec:
    # The device tool's nvidia-h200-x2 / -x4 / -x8 machines: H200 SXM GPUs of one host joined by NVLink4
    # (`nvidia-smi topo -m` in results/multigpu/h200x2/run_info.json: NV18 between the GPUs). HARDWARE.md: NVLink4,
    # 18 links, 450 GB/s each way per GPU; per-hop latency 2 us as the other NVLink presets (NCCL's 0.5-3.4 us,
    # not measured here); pinned host-to-device 55.4 GB/s and the disk as measured on the single H200 machine;
    # host RAM of the device tool's descriptions (256 / 512 / 560 GiB). More than one node is a what-if: one
    # 400 Gb/s NDR NIC per GPU as the DGX H100 (HARDWARE.md, ~49 GB/s usable).
    base = _single(GPUSpec(name="H200-141G", memory_bytes=141 * GB, bf16_tflops=989.0, hbm_GBps=4800.0),
                   f"h200-x{gpus_per_node}", 55.4)
    return base.replace(nodes=nodes, gpus_per_node=gpus_per_node, nvlink=LinkSpec(bandwidth_GBps=450.0, latency_s=2e-6),
                        nics_per_node=gpus_per_node, nic=LinkSpec(bandwidth_GBps=49.0, latency_s=5e-6),
                        host_memory_bytes={2: 256, 4: 512, 8: 560}[gpus_per_node] * GiB)


CLUSTER_PRESETS: dict[str, Callable[[int], ClusterSpec]] = {
    "dgx-a100-80g": lambda nodes: _dgx_a100(nodes, 80),
    "dgx-a100-40g": lambda nodes: _dgx_a100(nodes, 40),
    "dgx-h100": _dgx_h100,
    # HARDWARE.md measured on the GPU machine: bf16 matmul ~750-779 TFLOP/s, HBM read 3.1 TB/s (H100)
    "h100-single": lambda nodes: _single(
        GPUSpec(name="H100-80G-PCIe5", memory_bytes=80 * GB, bf16_tflops=989.0, hbm_GBps=3350.0),
        "h100-single",
        53.5,
    ),
    # HARDWARE.md: H200 141GB, bf16 989 TFLOP/s, HBM3e 4.8 TB/s
    "h200-single": lambda nodes: _single(
        GPUSpec(name="H200-141G", memory_bytes=141 * GB, bf16_tflops=989.0, hbm_GBps=4800.0),
        "h200-single",
        55.4,
    ),
    # one host of 2 / 4 / 8 H200 on NVLink (the device tool's nvidia-h200-x2 / -x4 / -x8), see _h200_host
    "h200-x2": lambda nodes: _h200_host(nodes, 2),
    "h200-x4": lambda nodes: _h200_host(nodes, 4),
    "h200-x8": lambda nodes: _h200_host(nodes, 8),
}

PLAN_PRESETS: dict[str, Callable[[int, int], ParallelPlan]] = {
    # DeepSpeed-MoE as the paper ran it (SEMOE.md "What the baselines do"): flat all-to-all, ZeRO-3 for
    # dense states, no expert offload, no fused gradient buckets assumed. ZeRO-3's own parameter
    # prefetch is on, as in DeepSpeed's defaults (stage3_prefetch_bucket_size = 5e7 elements: the
    # next module's parameters are gathered ahead), so prefetch_depth = 1; there is no expert
    # offload for it to apply to.
    "deepspeed": lambda dp, ep: ParallelPlan(
        name="deepspeed",
        data_parallel=dp,
        expert_parallel=ep,
        alltoall="flat",
        zero_stage=3,
        fusion_bucket_bytes=0,
        prefetch_depth=1,
    ),
    # SE-MoE: rail-aligned hierarchical all-to-all, fused buckets, ZeRO-3 dense sharding, expert
    # states in a CPU cache backed by SSD with 2D prefetch one layer ahead.
    "semoe": lambda dp, ep: ParallelPlan(
        name="semoe",
        data_parallel=dp,
        expert_parallel=ep,
        alltoall="rail" if dp > 1 else "flat",
        zero_stage=3,
        fusion_bucket_bytes=32 * 1024 * 1024,
        offload=OffloadPlacement(expert_params="cpu", expert_optimizer="ssd"),
        prefetch_depth=1,
        cpu_cache_experts=1,
    ),
}


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise SpecError(f"unknown {kind} preset {name!r}; choose from: {', '.join(sorted(table))}")
    return table[name]


def model_preset(name: str) -> ModelSpec:
    return _lookup(MODEL_PRESETS, "model", name)()


def cluster_preset(name: str, nodes: int = 1) -> ClusterSpec:
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise SpecError(f"ClusterSpec.nodes: nodes ({nodes!r}) must be an integer >= 1")
    return _lookup(CLUSTER_PRESETS, "cluster", name)(nodes)


def plan_preset(name: str, data_parallel: int = 1, expert_parallel: int = 1) -> ParallelPlan:
    return _lookup(PLAN_PRESETS, "plan", name)(data_parallel, expert_parallel)


def load_model(name_or_file: str) -> ModelSpec:
    """A model preset by name, or a ModelSpec YAML file."""
    if name_or_file in MODEL_PRESETS:
        return model_preset(name_or_file)
    if name_or_file.endswith((".yaml", ".yml")):
        return ModelSpec.from_yaml(name_or_file)
    raise SpecError(
        f"unknown model {name_or_file!r}: not a preset ({', '.join(sorted(MODEL_PRESETS))}) "
        "nor a .yaml file"
    )
