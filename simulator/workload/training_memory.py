"""HBM / DRAM / SSD footprint of the training workload (`simulator.workload.training.TrainingIteration`): the ideal
model (model states per tier, activations after Korthikanti et al.) and, with ``impl="reference"``, what the
reference trainer allocates (`simulator.train_memory`) at the step's points. A mixin: the methods read the
iteration's attributes."""

from __future__ import annotations

import numpy as np

from semoe.sizing import state_bytes_per_tier


class TrainingMemoryMixin:
    """Memory accounting of `TrainingIteration` (see "Memory" in its module docstring)."""

    def _state_tiers(self) -> dict[str, float]:
        """Model-state bytes per tier (``gpu`` / ``cpu`` / ``ssd``) of one rank; subclasses adjust them."""
        return state_bytes_per_tier(self.m, self.p)

    def _static_memory(self) -> None:
        tiers = self._state_tiers()
        mem, t = self.sim.memory, 0.0
        self.state_tiers = tiers
        self.mem_model = None  # impl="reference": simulator.train_memory's step peak (None: the ideal model)
        self.act_freed: list[dict] = [{} for _ in range(self.W)]  # block -> saved bytes its backward released
        self.mem_note = ""
        if self.ref and self._ref_memory_setup():
            mem.alloc_all(t, "dram", "model_states", tiers["cpu"])
            mem.alloc_all(t, "ssd", "model_states", tiers["ssd"])
            return
        mem.alloc_all(t, "hbm", "model_states", tiers["gpu"])
        mem.alloc_all(t, "dram", "model_states", tiers["cpu"])
        mem.alloc_all(t, "ssd", "model_states", tiers["ssd"])
        # (reference.offload's pinned 16-bit mirror and gradient buffer of every offloaded expert are in
        # tiers["cpu"]: semoe.sizing counts them there)
        if self.p.fusion_bucket_bytes:
            mem.alloc_all(t, "hbm", "comm_buffers", 2 * self.p.fusion_bucket_bytes)

    def _ref_memory_setup(self) -> bool:
        """impl="reference": HBM as the reference trainer allocates it (`simulator.train_memory`: fp32 masters,
        gradients and AdamW moments, the offload engine's pool and accumulators, the counted saved activations,
        the loss buffers, the gradient buckets). False (the ideal model is kept, ``mem_note`` says why) for what
        that model does not cover (ZeRO stages 1-2, an uncounted code path, dense FFN blocks)."""
        from simulator.train_memory import saved_coeffs, step_peak

        rows = [float(self.tokens_in[i].max()) for i in sorted(self.a2a)]
        try:
            pk = step_peak(self.m, self.p, tokens=self.T, routed_rows=rows, micro_batches=self.w.micro_batches,
                           trainer=self.mem_trainer, optimizer=self.ref_optimizer,
                           process_group=self.grad_sync or self.W > 1)
            self.mem_coeffs = saved_coeffs(self.m)
        except (ValueError, FileNotFoundError) as e:
            self.mem_note = str(e)
            return False
        self.mem_model = pk
        P, mem = pk.parts, self.sim.memory
        mem.alloc_all(0.0, "hbm", "model_states", P["params"] + P["adam"] + P["expert_pool"])
        mem.alloc_all(0.0, "hbm", "logits", P["logits"])  # the previous step's ModelOutput
        # gradients of the previous step, alive in the forward until zero_grad (reference.train)
        self.grads_live = np.full(self.W, self.mem_trainer == "train")
        self.grads_grown = np.zeros(self.W)  # gradients created so far in this backward (blocks done)
        self.acc_bytes = np.zeros(self.W)  # the offload engine's gradient accumulators (emptied by its step)
        if self.mem_trainer == "train":
            mem.alloc_all(0.0, "hbm", "grads", P["grads"])
        return True

    def _mem_head_fwd(self, r: int, mb: int) -> None:
        """After the loss forward: the head's saved tensors, the new logits (the previous ones die when the
        forward returns), the fp32 loss copy alive inside the loss; zero_grad (reference.train) after it."""
        if self.mem_model is None:
            return
        from simulator.train_memory import head_saved_bytes

        mem, now, P = self.sim.memory, self.env.now, self.mem_model.parts
        mem.alloc(now, r, "hbm", "activations", head_saved_bytes(self.m, self.T, self.mem_coeffs))
        mem.alloc(now, r, "hbm", "logits", P["logits"] + P["loss_fwd_fp32"] + P["zero3_root"])
        mem.free(now, r, "hbm", "logits", P["loss_fwd_fp32"] + P["prev_logits"] + P["zero3_root"])
        if self.mem_trainer == "train" and mb == 0 and self.grads_live[r]:
            mem.free(now, r, "hbm", "grads", P["grads"])
            self.grads_live[r] = False

    def _mem_head_bwd(self, r: int) -> None:
        """The loss backward's fp32 [T, V] gradients beside the saved log-softmax, then the head's saved tensors
        released."""
        if self.mem_model is None:
            return
        from simulator.train_memory import head_saved_bytes

        mem, now, P = self.sim.memory, self.env.now, self.mem_model.parts
        mem.alloc(now, r, "hbm", "loss_grads", P["loss_bwd_fp32"] + P["zero3_root"])
        mem.free(now, r, "hbm", "loss_grads", P["loss_bwd_fp32"] + P["zero3_root"])
        mem.free(now, r, "hbm", "activations", head_saved_bytes(self.m, self.T, self.mem_coeffs))

    def _mem_expert_bwd(self, r: int, i: int, mb: int) -> None:
        """A MoE block's expert GEMM backward: its outputs beside its saved inputs and the gradients flowing
        (`simulator.train_memory`'s per-block ``transient``), the combine's saved rows already gone; then the
        gradients the block leaves: fp32 ones when this backward creates them, the offload engine's
        accumulators (a bf16 one in the first micro-batch, turned into fp32 in the second)."""
        if self.mem_model is None:
            return
        mem, now, P = self.sim.memory, self.env.now, self.mem_model.parts
        L = self.mem_model.layers[sorted(self.a2a).index(i)]
        nb = L["transient"] - L["combine_saved"]
        mem.alloc(now, r, "hbm", "bwd_transient", nb)
        mem.free(now, r, "hbm", "bwd_transient", nb)
        gone = L["combine_saved"] + L["expert_saved"]  # released by now (the rest when the block is done)
        mem.free(now, r, "hbm", "activations", gone)
        self.act_freed[r][i] = gone
        if not self.grads_live[r]:
            mem.alloc(now, r, "hbm", "grads", L["grad_growth"])
            self.grads_grown[r] += L["grad_growth"]
        if mb <= 1 and P["acc_layer_bf16"]:
            mem.alloc(now, r, "hbm", "expert_grad_acc", P["acc_layer_bf16"])
            self.acc_bytes[r] += P["acc_layer_bf16"]

    def _mem_backward_end(self, r: int, last: bool) -> None:
        """End of a micro-batch's backward: the gradients exist (fp32, and the engine's accumulators); after the
        last one every gradient bucket's flat copy is alive until the reduction is finished."""
        if self.mem_model is None:
            return
        mem, now, P = self.sim.memory, self.env.now, self.mem_model.parts
        if not self.grads_live[r]:  # the rest: the embedding's, the head's, the final norm's
            mem.alloc(now, r, "hbm", "grads", P["grads"] - self.grads_grown[r])
            self.grads_live[r] = True
            self.grads_grown[r] = 0.0
        if last:
            mem.alloc(now, r, "hbm", "buckets", P["buckets"])

    def _mem_optimizer(self, r: int) -> None:
        """The buckets are gone after ``finish()``, the engine's accumulators after its step (copied to the host);
        foreach AdamW's temporaries live during its step."""
        if self.mem_model is None:
            return
        mem, now, P = self.sim.memory, self.env.now, self.mem_model.parts
        mem.free(now, r, "hbm", "buckets", P["buckets"])
        mem.free(now, r, "hbm", "expert_grad_acc", self.acc_bytes[r])
        self.acc_bytes[r] = 0.0
        mem.alloc(now, r, "hbm", "adam_temp", P["adam_temp"])
        mem.free(now, r, "hbm", "adam_temp", P["adam_temp"])

    def _leaked_state_bytes(self) -> float:
        if self.mem_model is None:
            return 0.0
        from simulator.train_memory import leaked_state_bytes

        return leaked_state_bytes(self.m, self.p)

    def _act_bytes(self, r: int, i: int) -> float:
        if self.mem_model is not None:  # impl="reference": the counted saved tensors (simulator.train_mem_count)
            from simulator.train_memory import block_saved_bytes

            return block_saved_bytes(self.m, self.T, float(self.tokens_in[i][r]), self.local_experts,
                                     expert_casts=not (self.offload_experts or self.offload_opt),
                                     coeffs=self.mem_coeffs)
        h = self.m.hidden
        b = 15.0 * self.T * h
        if i in self.a2a:
            tin, tout = self.tokens_in[i][r], self.tokens_out[i][r]
            b += tin * (3 * h + 4 * self.m.ffn) + (tin + tout) * 2 * h
        elif self.m.moe_every:
            b += self.T * (3 * h + 4 * self.m.dense_ffn_width)
        return b
