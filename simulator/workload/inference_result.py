"""The result of one simulated offloaded-inference run (`simulator.workload.inference.InferenceRun`): the timed
prefill and decode, the memory plan, the pool's statistics and the streams' busy time, with the summary row the
CLI and the validation tables print."""

from __future__ import annotations

from dataclasses import dataclass, field

from simulator.workload.inference_memory import MemoryPlan


@dataclass
class InferenceResult:
    prefill_s: float
    decode_s: float
    batch: int
    prompt_len: int
    gen_len: int
    plan: MemoryPlan
    bytes_copied_decode: float
    hits: int
    misses: int
    passes: dict = field(default_factory=dict)
    fetch_bytes_decode: float = 0.0  # expert-aware passes' copies (misses + prefetches), ring copies excluded
    prefetched: int = 0  # experts prefetched one block ahead (whole run)
    prefetch_used: int = 0  # of them, those their block then used
    host_op_s: dict = field(default_factory=dict)  # (phase, batch) -> host seconds per kernel used
    compute_busy_s: float = 0.0
    copy_busy_s: float = 0.0
    oom: str = ""

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_len / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.batch * (self.gen_len - 1)
        return n / self.decode_s if self.decode_s > 0 and n else float("nan")

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    def summary(self) -> dict:
        p = self.plan
        steps = max(1, self.gen_len - 1)
        return {
            "step_time_s": self.prefill_s + self.decode_s,
            "tokens_per_s": self.decode_tokens_per_s,
            "prefill_s": self.prefill_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_s": self.decode_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "decode_bytes_copied_per_step": self.bytes_copied_decode / steps,
            "hit_rate": self.hit_rate,
            "ring_slots": p.ring_slots,
            "pool_slots": p.pool_slots,
            "peak_hbm_bytes": p.peak_hbm_bytes,
            "peak_dram_bytes": float(p.blocks * p.experts * p.expert_bytes),
            "peak_ssd_bytes": float(p.blocks * p.experts * p.expert_bytes),
            "oom": self.oom,
            "compute_busy_s": self.compute_busy_s,
            "copy_busy_s": self.copy_busy_s,
        }
