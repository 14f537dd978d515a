"""Workload and Run: what is executed, and the bundle of model, cluster, plan and workload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from semoe.cluster_spec import ClusterSpec
from semoe.model_spec import ModelSpec
from semoe.plan_spec import ParallelPlan
from semoe.spec_base import Spec


@dataclass(frozen=True, kw_only=True)
class Workload(Spec):
    """A training or inference workload. ``micro_batch`` sequences of ``seq_len`` tokens per rank."""

    kind: Literal["train", "infer"] = "train"
    micro_batch: int = 1
    seq_len: int = 1024
    micro_batches: int = 1  # gradient-accumulation steps per optimizer step
    steps: int = 10
    gen_len: int = 0  # tokens generated per sequence (inference)
    # routing for simulated runs: uniform, zipf with exponent routing_skew, lognormal with sigma
    # routing_skew (expert popularity ~ exp(N(0, sigma^2)), seeded), or a measured histogram
    routing: Literal["uniform", "zipf", "lognormal", "histogram"] = "uniform"
    routing_skew: float = 0.0
    expert_histogram: tuple[float, ...] | None = None
    seed: int = 0

    def validate(self) -> None:
        self.require_positive("micro_batch", "seq_len", "micro_batches", "steps")
        self.require_non_negative("gen_len", "routing_skew", "seed")
        if self.kind == "infer" and self.gen_len == 0 and self.steps == 0:
            self.fail("gen_len", "an inference workload needs gen_len > 0 or steps > 0")
        if self.routing == "histogram":
            if not self.expert_histogram:
                self.fail("expert_histogram", "routing 'histogram' needs expert_histogram")
            if any(v < 0 for v in self.expert_histogram) or sum(self.expert_histogram) <= 0:
                self.fail("expert_histogram", "expert_histogram must be >= 0 with a positive sum")
        elif self.expert_histogram is not None:
            self.fail("expert_histogram", f"expert_histogram is only used with routing 'histogram', not {self.routing!r}")

    @property
    def tokens_per_rank_step(self) -> int:
        return self.micro_batch * self.seq_len * self.micro_batches


@dataclass(frozen=True, kw_only=True)
class Run(Spec):
    """One run: the four specs, checked against each other."""

    name: str = "run"
    model: ModelSpec
    cluster: ClusterSpec
    plan: ParallelPlan
    workload: Workload = Workload()

    def validate(self) -> None:
        m, c, p, w = self.model, self.cluster, self.plan, self.workload
        if m.experts % p.expert_parallel:
            self.fail(
                "plan",
                f"experts ({m.experts}) must be divisible by expert_parallel ({p.expert_parallel})",
            )
        if p.world_size != c.world_size:
            self.fail(
                "plan",
                f"data_parallel ({p.data_parallel}) must equal the cluster's GPUs "
                f"(nodes {c.nodes} x gpus_per_node {c.gpus_per_node} = {c.world_size})",
            )
        if w.seq_len + w.gen_len > m.max_seq and m.position == "learned":
            self.fail(
                "workload",
                f"seq_len + gen_len ({w.seq_len + w.gen_len}) must be <= max_seq ({m.max_seq})",
            )
        if w.expert_histogram is not None and len(w.expert_histogram) != m.experts:
            self.fail(
                "workload",
                f"expert_histogram has {len(w.expert_histogram)} entries, model has {m.experts} experts",
            )
