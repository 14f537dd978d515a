"""Per-phase compute times of the training workload (`simulator.workload.training.TrainingIteration`): the mixed
phases' parts (attention, gate, head) and their backward, the routed experts' GEMMs, permutes and activation per
rank, ``impl="reference"``'s activation and parameter passes (the ``REF_*`` constants of
`simulator.workload.training_constants`), the loop experts' gradient selection. A mixin: the methods read the
iteration's attributes."""

from __future__ import annotations

import numpy as np

from semoe.sizing import count_params
from simulator.workload import offload as O
from simulator.workload import routing
from simulator.workload.training_constants import (
    PHASE_CATEGORY,
    REF_BUCKET_BYTES,
    REF_CAST_BYTES,
    REF_CLIP_BYTES,
    REF_CLIP_MOE_BYTES,
    REF_DISPATCH_BWD_BYTES,
    REF_DISPATCH_BWD_CAST_BYTES,
    REF_DISPATCH_FWD_BYTES,
    REF_DISPATCH_FWD_CAST_BYTES,
    REF_EMB_GRAD_BYTES,
    REF_LOSS_BWD_BYTES,
    REF_LOSS_BWD_CAST_BYTES,
    REF_LOSS_FWD_BYTES,
    REF_LOSS_FWD_CAST_BYTES,
    REF_RANK_SCAN_S_PER_ROW,
    REF_RESIDUAL_BYTES,
    REF_RESIDUAL_CAST_BYTES,
    REF_SELECT_ACC_BYTES,
    REF_SELECT_COPY_BYTES,
    REF_SELECT_ZERO_BYTES,
    TORCH_DENSE_BWD_FACTOR,
    TORCH_EXPERT_BWD_FACTOR,
    torch_expert_gemms,
)


class TrainingCostsMixin:
    """Compute-time setup of `TrainingIteration` (see its module docstring)."""

    def _phase_times(self, cm, rng, impl: str, expert_impl: str, expert_kernels, host_program, act_casts) -> None:
        """The per-phase compute times (same on every rank, except the experts) and the routing of every MoE block
        (dispatch matrices, tokens each rank's experts receive), drawn from ``rng``."""
        m, w = self.m, self.w
        T, h, dt = self.T, m.hidden, m.dtype
        kv = m.n_kv_heads * m.head_dim
        # each mixed phase's composition per call ({category: seconds}, `phase_parts`); its time is the sum
        self.parts = {
            "attention": {"dense_gemm": cm.matmul(T, h + 2 * kv, h, dt) + cm.matmul(T, h, h, dt),
                          "attention_core": cm.attention_core(T, w.seq_len, h, dt),
                          "norm_residual": cm.memory(8 * T * h * self.dtype_bytes)},
            "gate": {"dense_gemm": cm.matmul(T, m.experts, h, dt),
                     "gate_elementwise": cm.memory(4 * T * m.top_k * h * self.dtype_bytes)},
            "head": {"dense_gemm": cm.matmul(T, m.vocab, h, dt)},
        }
        self.t_attn = sum(self.parts["attention"].values())
        self.t_gate = sum(self.parts["gate"].values())
        mats = 3 if m.activation == "swiglu" else 2
        self.t_dense_ffn = mats * cm.matmul(T, m.dense_ffn_width, h, dt)
        self.t_head = self.parts["head"]["dense_gemm"]
        self.t_embed = cm.memory(2 * T * h * self.dtype_bytes)
        self.flops_attn = 2 * T * (2 * h * h + 2 * h * kv) + 4 * T * w.seq_len * h
        # ---- routing: per MoE block, dispatch matrices and tokens each rank's experts receive
        self.bpt = h * self.dtype_bytes
        self.a2a: dict[int, np.ndarray] = {}
        self.t_experts: dict[int, np.ndarray] = {}
        self.tokens_in: dict[int, np.ndarray] = {}
        self.tokens_out: dict[int, np.ndarray] = {}
        self.recv: dict[int, np.ndarray] = {}  # [W, local experts] tokens received
        self.t_expert_act: dict[int, tuple] = {}  # impl="reference": (fwd, bwd) activation pass per rank
        self.t_dispatch: dict[int, tuple] = {}  # impl="reference", torch permute: (fwd, bwd) fp32 extra passes
        self.t_experts_bwd: dict[int, np.ndarray] = {}  # expert backward GEMMs when not bwd x forward
        pop = routing.expert_popularity(m, w, rng) if m.moe_layers else None
        self.pop = pop  # the run's expert popularity (the cache's warm-up steps draw from it too)
        for i in range(m.layers):
            if not m.is_moe_layer(i):
                continue
            counts = routing.token_counts(m, w, self.W, rng, pop)
            mats_ = routing.alltoall_matrices(counts, self.EP, self.bpt)
            self.a2a[i] = mats_
            tin = (mats_.sum(axis=1) / self.bpt).reshape(-1)  # [W]
            self.tokens_in[i] = tin
            self.tokens_out[i] = counts.sum(axis=1).astype(float)
            self.recv[i] = O.received(counts, self.EP)
            ecm = self._expert_cost(cm)
            if impl == "reference" and expert_impl == "loop":  # one dense GEMM per local expert
                per_exp = {x: mats * self.local_experts * ecm.matmul(x / self.local_experts, m.ffn, h, dt)
                           for x in np.unique(tin)}
            elif impl == "reference" and expert_kernels == "torch":  # torch._grouped_mm: each projection's own curve
                pair = {x: torch_expert_gemms(ecm, x / self.local_experts, self.local_experts, h, m.ffn, mats, dt)
                        for x in np.unique(tin)}
                per_exp = {x: f for x, (f, _) in pair.items()}
                self.t_experts_bwd[i] = np.array([pair[x][1] for x in tin])
            else:
                per_exp = {x: mats * ecm.matmul(x / self.local_experts, m.ffn, h, dt, groups=self.local_experts)
                           for x in np.unique(tin)}
            self.t_experts[i] = np.array([per_exp[x] for x in tin])
            if impl == "reference" and expert_kernels == "torch" and i not in self.t_experts_bwd:  # the loop experts
                self.t_experts_bwd[i] = 2.0 * TORCH_EXPERT_BWD_FACTOR * self.t_experts[i]
            if impl == "reference" and expert_kernels != "triton":  # fp32 dispatch (REF_DISPATCH_*)
                el = self.tokens_out[i] * h  # routed rows x hidden, per rank
                cf = int(bool(host_program is not None if act_casts is None else act_casts))
                fb = REF_DISPATCH_FWD_BYTES - REF_DISPATCH_FWD_CAST_BYTES * cf
                bb = REF_DISPATCH_BWD_BYTES - REF_DISPATCH_BWD_CAST_BYTES * cf
                self.t_dispatch[i] = (np.array([cm.memory(fb * x) for x in el]),
                                      np.array([cm.memory(bb * x) for x in el]))
            if impl == "reference":  # the expert activation between the GEMMs (an HBM pass, profile's gelu rate)
                act = {x: self._expert_act_bytes(x) for x in np.unique(tin)}
                self.t_expert_act[i] = (np.array([cm.elementwise("gelu", act[x][0], dt) for x in tin]),
                                        np.array([cm.elementwise("gelu", act[x][1], dt) for x in tin]))

    def _activation_pass_times(self, cm) -> None:
        """impl="reference": the constants' activation passes (the fp32 residual stream, the loss, the tied embedding's
        gradient, the capacity ranks' scan), less the cast parts the host program's counted casts replace; with
        ``mem_passes`` the counted memory passes replace them all (the parameter passes stay)."""
        m, T, h = self.m, self.T, self.m.hidden
        cast_off = self.act_casts  # the constants' cast parts are replaced by the program's counted casts
        if self.mem_passes:  # the counted memory passes replace every activation pass of the constants
            self.parts["attention"]["norm_residual"] = 0.0
            self.parts["gate"]["gate_elementwise"] = 0.0
            self.t_attn, self.t_gate = sum(self.parts["attention"].values()), sum(self.parts["gate"].values())
            self.t_dispatch, self.t_expert_act, self.t_embed = {}, {}, 0.0
        if self.ref:
            t_res = 0.0 if self.mem_passes else cm.memory((REF_RESIDUAL_BYTES - REF_RESIDUAL_CAST_BYTES * cast_off) * T * h)
            self.parts["attention"]["norm_residual"] += t_res
            self.t_attn += t_res
            V = m.vocab
            keep = 0.0 if self.mem_passes else 1.0
            self.t_loss_fwd = keep * cm.memory((REF_LOSS_FWD_BYTES - REF_LOSS_FWD_CAST_BYTES * cast_off) * T * V)
            self.t_loss_bwd = keep * cm.memory((REF_LOSS_BWD_BYTES - REF_LOSS_BWD_CAST_BYTES * cast_off) * T * V)
            self.t_emb_grad = cm.memory(REF_EMB_GRAD_BYTES * self.embed)
        # forward only, once per MoE block (the ranks are integers: no backward)
        self.t_rank_scan = (REF_RANK_SCAN_S_PER_ROW * T * m.top_k
                            if self.ref and m.moe_layers and m.capacity_factor is not None else 0.0)

    def _param_pass_times(self, cm, grad_sync: bool) -> None:
        """impl="reference": the per-parameter passes, the 16-bit weights cast from their fp32 masters (``weight_cast``
        / ``grad_cast`` per block, the tied head in ``head_fwd`` / ``head_bwd``) and the gradient clipping."""
        m, p = self.m, self.p
        # 16-bit GEMM weights cast from their fp32 masters: the block's dense weights, its local experts
        # when they live on the GPU (offloaded experts arrive in 16 bits), the tied head once
        ex = 0 if self.offload_experts else self.expert_local_params
        self.t_cast = {i: self._cast_time(REF_CAST_BYTES * (self.dense_layer[i] + (ex if i in self.a2a else 0)))
                       for i in range(m.layers)}
        self.t_attn_head_cast = self._cast_time(REF_CAST_BYTES * self.embed)
        self.t_head += self.t_attn_head_cast
        self.parts["head"]["param_cast"] = self.t_attn_head_cast
        self.parts_bwd["head"]["param_cast"] = self.bwd * self.t_attn_head_cast
        self.t_head_bwd = sum(self.parts_bwd["head"].values())
        per_param = (REF_BUCKET_BYTES + REF_CLIP_MOE_BYTES) if grad_sync else REF_CLIP_BYTES
        self.t_clip = cm.memory(per_param * count_params(m).total / (self.W if p.zero_stage >= 2 else 1))

    def _backward_parts(self, cm, seq: int) -> None:
        """The backward of the mixed phases (attention, gate, head) per category. ``impl="ideal"``: the
        forward times ``bwd`` (2 x the calibrated ``backward_gemm_factor``), every part. ``impl="reference"``
        (cuBLAS and cuDNN, what `reference.train` runs): the dense GEMMs' dX and dW are the same cuBLAS GEMMs
        on transposed operands (``TORCH_DENSE_BWD_FACTOR`` x 2 forward, as the torch expert GEMMs: the
        calibrated factor is our Triton dgrad / wgrad's); fused attention's backward at the profile's measured
        backward / forward ratio of SDPA (`CostModel.sdpa_backward_ratio`: flash backward recomputes the
        scores, ~3.2 x the forward on the H100, not 2.6); the memory passes keep ``bwd`` x forward."""
        fac = {k: self.bwd for k in ("dense_gemm", "attention_core", "norm_residual", "gate_elementwise",
                                     "param_cast")}
        if self.ref:
            fac["dense_gemm"] = 2.0 * TORCH_DENSE_BWD_FACTOR
            ratio = cm.sdpa_backward_ratio(seq, self.m.head_dim, self.m.heads, self.m.dtype)
            if ratio is not None:
                fac["attention_core"] = ratio
        self.parts_bwd = {ph: {c: fac[c] * t for c, t in parts.items()} for ph, parts in self.parts.items()}
        self.t_attn_bwd = sum(self.parts_bwd["attention"].values())
        self.t_gate_bwd = sum(self.parts_bwd["gate"].values())
        self.t_head_bwd = sum(self.parts_bwd["head"].values())

    def phase_parts(self) -> dict[str, dict[str, float]]:
        """Each compute phase's composition as fractions per category (`PHASE_CATEGORY` for single-category
        phases; attention / gate / head forward and backward split into their parts), for a device-time
        breakdown of the trace (`simulator.train_breakdown`)."""
        out = {ph: {cat: 1.0} for ph, cat in PHASE_CATEGORY.items()}
        for ph, parts in (("attention_fwd", self.parts["attention"]), ("attention_bwd", self.parts_bwd["attention"]),
                          ("gate_fwd", self.parts["gate"]), ("gate_bwd", self.parts_bwd["gate"]),
                          ("head_fwd", self.parts["head"]), ("head_bwd", self.parts_bwd["head"])):
            tot = sum(parts.values())
            out[ph] = {c: t / tot for c, t in parts.items()} if tot > 0 else {}
        return out

    def _expert_act_bytes(self, rows: float) -> tuple[float, float]:
        """HBM bytes of the expert activation over ``rows`` routed tokens, forward and backward: gelu reads
        and writes [rows, ffn] (2 x dtype bytes per element) and its backward reads the gradient and the
        input and writes the gradient (3 x); swiglu reads two [rows, ffn] and writes one (3 x), backward
        reads three and writes two (5 x)."""
        m = self.m
        el = rows * m.ffn * self.dtype_bytes
        return (3 * el, 5 * el) if m.activation == "swiglu" else (2 * el, 3 * el)

    def _expert_cost(self, cm):
        """The cost model for the expert GEMMs: ``cm`` with its profile re-read preferring the
        ``expert_kernels`` impl's rows (``cm`` itself when None or without a profile)."""
        if self.expert_kernels is None or cm.profile is None:
            return cm
        from simulator.cost import CostModel, _load_profile

        order = (self.expert_kernels,) + tuple(k for k in ("triton", "torch") if k != self.expert_kernels)
        prof = _load_profile(cm.profile.source, order, cm.profile.loglog)
        return CostModel(cm.gpu, prof, overlap_slowdown=cm.overlap_slowdown, launch_s=cm.launch_s,
                         backward_gemm_factor=cm.backward_gemm_factor)

    def _select_time(self, r: int, i: int) -> float:
        """expert_impl="loop": the dense per-expert gradients of the stacked expert weights (``REF_SELECT_*``)."""
        u = int(self.used[i][r].sum())
        E = self.local_experts
        mats = 3 if self.m.activation == "swiglu" else 2
        pm = self.m.hidden * self.m.ffn
        per = u * (REF_SELECT_ZERO_BYTES * E + REF_SELECT_COPY_BYTES) + max(u - 1, 0) * REF_SELECT_ACC_BYTES * E
        return self.sim.cost.memory(mats * per * pm) if u else 0.0
