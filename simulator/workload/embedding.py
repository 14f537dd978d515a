"""Embedding partition over data parallelism in the simulator (SEMOE.md mechanism 6; the reference is
``reference/parallel/embedding.py``, whose docstring has the data flow and the tied-head choice).

Notation: W data-parallel ranks, T tokens per rank and micro-batch, V vocab, H hidden, h = H / W,
``b`` bytes per element of the model dtype, ``ID_BYTES`` = 8 (int64 token ids, as the reference).

:class:`EmbeddingPartitionIteration` is :class:`~simulator.workload.training.TrainingIteration` with the
token table split by columns over all W ranks when ``plan.embedding_partition`` is set:

* per micro-batch, before ``embedding_fwd``: ``embedding_ids_a2a`` (rank i sends its T ids to every
  rank j: ``M[i, j] = 8 T``) then, after the local lookup, ``embedding_vec_a2a`` (rank i returns to j
  the h columns of j's tokens: ``M[i, j] = T h b``); before ``embedding_bwd``: ``embedding_grad_a2a``
  (same matrix). All three blocking, over the DP group, with ``plan.alltoall``'s algorithm.
* the table's V H parameters leave the dense gradient all-reduce (``grad_allreduce`` shrinks by 2 V H
  bytes per step);
* tied head (choice (A) of the reference): before ``head_fwd`` a blocking ``embedding_table_allgather``
  of the V H table (2 V H bytes), kept in HBM until ``head_bwd`` ends; after it a background
  ``embedding_grad_reduce_scatter`` of the table's gradient (2 V H bytes), waited for before the
  optimizer. Same bytes as the replicated all-reduce, so the tied partition saves memory, not time;
* optimizer step: the dense Adam update covers V H / W table parameters instead of V H (ZeRO 0);
* model states: the table's 16 bytes per parameter (`semoe.sizing.STATE_BYTES`) are divided by W,
  instead of what `semoe.sizing.dense_state_bytes_per_rank` gives the replicated table (by ZeRO stage).

Analytic per-rank bytes (:func:`embedding_comm_bytes`, uniform T): partition sends
``(W-1) (8 T + 2 T h b)`` per micro-batch (+ the tied gather/scatter ``2 (W-1)/W V H b`` per step);
the replicated table's ring all-reduce sends ``2 (W-1)/W V H b`` per step. ZeRO-3 already shards the
table, so the partition is refused with it (as in the reference).
"""

from __future__ import annotations

import numpy as np

from semoe import Run
from semoe.model_spec import ModelSpec
from semoe.plan_spec import ParallelPlan
from semoe.sizing import STATE_BYTES, dense_state_bytes_per_rank, state_bytes_per_tier
from semoe.spec_base import SpecError
from simulator import collectives as C
from simulator.engine import Sim
from simulator.workload.training import TrainingIteration

ID_BYTES = 8


def table_params(m: ModelSpec) -> int:
    return m.vocab * m.hidden


def embedding_state_bytes(m: ModelSpec, plan: ParallelPlan, partition: bool | None = None) -> dict[str, float]:
    """Per-rank bytes of the token table's model states (params, grads, optimizer) on their tiers'
    classes, replicated (by ZeRO stage) or partitioned (everything / W)."""
    partition = plan.embedding_partition if partition is None else partition
    p = table_params(m)
    if partition:
        W = plan.data_parallel
        return {"params": 2.0 * p / W, "grads": 2.0 * p / W, "optimizer": 12.0 * p / W}
    return dense_state_bytes_per_rank(p, plan)


def embedding_comm_bytes(m: ModelSpec, plan: ParallelPlan, tokens_per_rank: int, micro_batches: int = 1,
                         partition: bool | None = None) -> dict[str, float]:
    """Bytes one rank sends per step for the token table (uniform tokens per rank)."""
    partition = plan.embedding_partition if partition is None else partition
    W, b, T = plan.data_parallel, m.dtype_bytes, tokens_per_rank
    table = table_params(m) * b
    ring = 2.0 * (W - 1) / W * table
    if not partition:
        return {"ids_a2a": 0.0, "vec_a2a": 0.0, "grad_a2a": 0.0, "allreduce": ring, "tied_gather_scatter": 0.0}
    h = m.hidden // W
    return {
        "ids_a2a": micro_batches * (W - 1) * ID_BYTES * T,
        "vec_a2a": micro_batches * (W - 1) * T * h * b,
        "grad_a2a": micro_batches * (W - 1) * T * h * b,
        "allreduce": 0.0,
        "tied_gather_scatter": ring if m.tied_embeddings else 0.0,
    }


class EmbeddingPartitionIteration(TrainingIteration):
    """A training iteration whose token table is partitioned over DP (no-op when the flag is off)."""

    def __init__(self, run: Run, sim: Sim) -> None:
        p, m = run.plan, run.model
        self.partition = bool(p.embedding_partition) and run.cluster.world_size > 1
        if self.partition:
            if p.zero_stage == 3:
                raise SpecError("ParallelPlan.embedding_partition: not combined with zero_stage 3 (ZeRO-3 shards the table)")
            if m.hidden % run.cluster.world_size:
                raise SpecError(f"ParallelPlan.embedding_partition: hidden ({m.hidden}) must be divisible by the "
                                f"data-parallel size ({run.cluster.world_size})")
        super().__init__(run, sim)
        self._tied_pending: dict[int, object] = {}
        if self.partition:
            self.embed -= table_params(m)  # no longer in the dense gradient all-reduce
            W, T, h, b = self.W, self.T, m.hidden // self.W, self.dtype_bytes
            off = 1.0 - np.eye(W)
            self.M_ids = off * ID_BYTES * T
            self.M_vec = off * T * h * b
            self.t_lookup = sim.cost.memory(2.0 * self.W * T * h * b)  # gather rows for all ranks' ids

    # ------------------------------------------------------------------ memory
    def _state_tiers(self) -> dict[str, float]:
        """The parent's static states with the table's replicated states replaced by its 1/W slice
        (before the allocation, so that the peak never sees the replicated table)."""
        tiers = dict(super()._state_tiers())
        if self.p.embedding_partition and self.c.world_size > 1:
            rep = embedding_state_bytes(self.m, self.p, partition=False)
            part = embedding_state_bytes(self.m, self.p, partition=True)
            pl = self.p.offload
            tiers[pl.dense_params] -= sum(rep[k] - part[k] for k in ("params", "grads"))
            tiers[pl.dense_optimizer] -= rep["optimizer"] - part["optimizer"]
        return tiers

    # ------------------------------------------------------------------ phases
    def _emb_a2a(self, r, mb, phase, M):
        topo, group, algo = self.sim.topo, self.ranks, self.p.alltoall
        nbytes = float(M[r].sum())
        return self.blocking(r, (phase, mb), group, lambda: C.all_to_all(topo, group, M, algo), -1, mb, phase, nbytes)

    def compute(self, r, layer, mb, phase, dur, flops=0.0):
        if not self.partition:
            yield from super().compute(r, layer, mb, phase, dur, flops)
            return
        tied = self.m.tied_embeddings
        topo, group = self.sim.topo, self.ranks
        table = 2.0 * table_params(self.m)  # fp16/bf16 working copy, as the all-reduce counts it
        if phase == "embedding_fwd":
            yield from self._emb_a2a(r, mb, "embedding_ids_a2a", self.M_ids)
            yield from super().compute(r, layer, mb, phase, self.t_lookup, flops)
            yield from self._emb_a2a(r, mb, "embedding_vec_a2a", self.M_vec)
            return
        if phase == "embedding_bwd":
            yield from self._emb_a2a(r, mb, "embedding_grad_a2a", self.M_vec)
            yield from super().compute(r, layer, mb, phase, self.t_lookup, flops)
            return
        if phase == "head_fwd" and tied:
            yield from self.blocking(r, ("emb_ag", mb), group, lambda: C.all_gather(topo, group, table),
                                     -1, mb, "embedding_table_allgather", table)
            self.sim.memory.alloc(self.env.now, r, "hbm", "gathered_table", table * (self.W - 1) / self.W)
        yield from super().compute(r, layer, mb, phase, dur, flops)
        if phase == "head_bwd" and tied:
            self.sim.memory.alloc(self.env.now, r, "hbm", "gathered_table", table)  # the table's full gradient
            ev = self.background(r, ("emb_rs", mb), group, lambda: C.reduce_scatter(topo, group, table),
                                 -1, mb, "embedding_grad_reduce_scatter", table)
            self._tied_pending.setdefault(r, []).append(ev)
            self.sim.memory.free(self.env.now, r, "hbm", "gathered_table", table * (self.W - 1) / self.W)

    def optimizer(self, r):
        """Wait for the tied table's gradient reduce-scatters, then the parent's optimizer step, with
        the dense parameter count it reads (``count_params``, looked up in ``training``'s namespace
        before its first yield) lowered by the table's ``V H (1 - 1/W)`` parameters this rank no
        longer updates. The replacement is undone before the step's time passes."""
        for ev in self._tied_pending.pop(r, []):
            yield from self.wait(r, ev, 1)
            self.sim.memory.free(self.env.now, r, "hbm", "gathered_table", 2.0 * table_params(self.m))
        if not self.partition:
            yield from super().optimizer(r)
            return
        import simulator.workload.training as tr

        orig, saved = tr.count_params, table_params(self.m) * (1.0 - 1.0 / self.W)
        if self.p.zero_stage >= 1:
            saved = 0.0  # the table's optimizer work is already split over the W ranks

        def fewer(m):
            pc = orig(m)
            return type(pc)(dense=pc.dense - saved, sparse=pc.sparse, active=pc.active)

        gen = super().optimizer(r)
        tr.count_params = fewer
        try:
            ev = next(gen)
        except StopIteration:
            return
        finally:
            tr.count_params = orig
        while True:
            val = yield ev
            try:
                ev = gen.send(val)
            except StopIteration:
                return

    def summary(self) -> dict:
        out = super().summary()
        out["embedding_partition"] = self.partition
        out["state_bytes_gpu"] = self.state_tiers["gpu"]
        return out


def simulate_embedding(run: Run, backend: str = "analytic", trace: bool = False) -> tuple[Sim, dict]:
    """Like ``simulator.api.simulate`` for training, with the embedding partition honoured."""
    sim = Sim(run.cluster, backend=backend, seed=run.workload.seed, trace=trace)
    return sim, EmbeddingPartitionIteration(run, sim).run()


__all__ = ["EmbeddingPartitionIteration", "embedding_comm_bytes", "embedding_state_bytes", "simulate_embedding",
           "table_params", "state_bytes_per_tier", "STATE_BYTES"]
