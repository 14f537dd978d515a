"""The MoE-layer part of the multi-GPU run (`paper_repro.multigpu_run`): the reference `MoELayer` forward +
backward with expert parallelism through `EPDispatcher`, every all-to-all variant (`moe_impls`) first checked
against ``flat`` on the same input, then timed.
"""

from __future__ import annotations

import math

from paper_repro.multigpu_context import Ctx
from paper_repro.multigpu_settings import MoEConfig, moe_impls


def _local_experts_layer(c: Ctx, cfg: MoEConfig, local: range, dtype):
    """A :class:`MoELayer` of ``cfg`` whose routed experts are only ``local``, initialised on the device
    (a full layer is drawn on the CPU in fp64: seconds per GiB, too slow for the big configs)."""
    import torch

    from reference.moe.dispatcher import LocalDispatcher
    from reference.moe.experts import GroupedExperts
    from reference.moe.layer import MoELayer
    from semoe.model_spec import ModelSpec

    class DeviceInitExperts(GroupedExperts):
        @torch.no_grad()
        def reset_parameters(self, seed=None):
            g = torch.Generator(device=self.w1_EDF.device).manual_seed(self.seed if seed is None else seed)
            out_std = self.init_std / math.sqrt(2 * self.num_layers)
            for p, std in ((self.w1_EDF, self.init_std), (self.w3_EDF, self.init_std), (self.w2_EFD, out_std)):
                if p is not None:
                    p.normal_(0.0, std, generator=g)

    class Layer(MoELayer):
        def _build_backend(self, backend, experts_impl, grouped_impl, layout, seed):
            s = self.spec
            experts = DeviceInitExperts(len(local), s.hidden, s.ffn, activation=s.activation, num_layers=1,
                                        seed=seed + local.start, dtype=dtype, device=c.dev)
            return LocalDispatcher(s.experts, layout="contiguous"), experts

    spec = ModelSpec(name=cfg.name, layers=1, hidden=cfg.hidden, heads=1, vocab=256, ffn=cfg.ffn,
                     experts=cfg.experts, top_k=cfg.top_k, gate=cfg.gate, capacity_factor=None,
                     renormalize=cfg.renormalize, activation="gelu", dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    return Layer(spec, seed=0, dtype=dtype, device=c.dev, backend="torch")  # EPDispatcher: the torch path


def _max_rel_diff(c: Ctx, a: dict, b: dict) -> float:
    worst = 0.0
    for k in b:
        ref, got = b[k].float(), a[k].float()
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        diff = float((got - ref).abs().max()) if ref.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return c.all_max(worst)


def run_moe(c: Ctx) -> None:
    import torch

    from reference.comm.alltoall import AllToAll
    from reference.parallel.ep_dispatcher import EPDispatcher
    from reference.parallel.groups import build_groups
    from semoe.plan_spec import ParallelPlan

    st, W = c.st, c.world
    dtype = torch.bfloat16 if c.cuda else torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    dname = "bf16" if dtype == torch.bfloat16 else "fp32"
    for cfg in st.moe_configs:
        for G in st.moe_eps:
            if cfg.experts % G:
                continue
            config = f"{cfg.label(dname)} ep{G}"
            if c.over_budget(f"moe {config}", need_s=20.0):
                continue
            plan = lambda p, alg: ParallelPlan(data_parallel=W, expert_parallel=G, gpus_per_node=p, alltoall=alg)  # noqa: E731
            g_flat = build_groups(plan(W, "flat"))
            layer = _local_experts_layer(c, cfg, g_flat.local_experts(cfg.experts), dtype)
            gen = torch.Generator(device=c.dev).manual_seed(1000 + c.rank)
            x = torch.randn(cfg.tokens, cfg.hidden, generator=gen, device=c.dev, dtype=dtype).requires_grad_(True)
            dy = torch.randn(cfg.tokens, cfg.hidden, generator=gen, device=c.dev, dtype=dtype)
            impls = [(label, alg, g_flat if p is None else build_groups(plan(p, alg)))
                     for label, alg, p in moe_impls(G, st.node_sizes)]

            def step(stats: dict | None = None):
                x.grad = None
                layer.zero_grad(set_to_none=True)
                y, aux = layer(x)
                y.backward(dy)
                if stats is not None:
                    stats["y"] = y.detach().clone()
                    stats["counts"] = aux["tokens_per_expert"].detach().clone()
                return y

            # equality: every variant against flat, same input, same gate noise, before any timing
            ref = None
            for label, alg, groups in impls:
                layer.dispatcher = EPDispatcher(cfg.experts, AllToAll.from_groups(alg, groups))
                torch.manual_seed(7 + c.rank)
                stats: dict = {}
                step(stats)
                got = {"y": stats["y"], "x.grad": x.grad.clone()}
                got.update({f"{k}.grad": p.grad.clone() for k, p in layer.named_parameters() if p.grad is not None})
                if ref is None:
                    ref = got
                    counts = stats["counts"].to(torch.int64)
                    if G > 1:
                        c.dist.all_reduce(counts, group=g_flat.ep.pg)
                    L = cfg.experts // G
                    recv = c.gather_floats([float(counts[g_flat.ep.rank * L:(g_flat.ep.rank + 1) * L].sum())])[:, 0]
                    c.add("moe", config, "flat", "recv_rows_max_over_mean", float(recv.max() / recv.mean()),
                          tokens=cfg.tokens)
                    continue
                rel = _max_rel_diff(c, got, ref)
                c.add("moe", config, label, "max_rel_diff_vs_flat", rel, tokens=cfg.tokens)
                c.add("moe", config, label, "agree_with_flat", int(rel <= tol), tokens=cfg.tokens)
                if rel > tol:
                    c.log(f"WARNING: {config} {label} differs from flat: max relative difference {rel:.3g}")
                del got
            del ref
            c.free()
            for label, alg, groups in impls:
                if c.over_budget(f"moe {config} {label}", need_s=10.0):
                    continue
                layer.dispatcher = EPDispatcher(cfg.experts, AllToAll.from_groups(alg, groups))
                t = c.gather_floats([c.time_loop(step, st.moe_warmup, st.moe_iters)])[:, 0]
                mean, tmax = float(t.mean()), float(t.max())
                tps = cfg.tokens * W / tmax
                for metric, v in (("fwd_bwd_ms", mean * 1e3), ("fwd_bwd_ms_max", tmax * 1e3), ("tokens_per_s", tps),
                                  ("tflops_per_rank", cfg.flops("fwd_bwd") / mean / 1e12)):
                    c.add("moe", config, label, metric, v, tokens=cfg.tokens)
                c.flush("moe")
                c.log(f"moe {config:60s} {label:8s} {mean * 1e3:9.2f} ms  {tps:12,.0f} tokens/s")
            c.flush("moe")
            layer = x = dy = impls = None  # freed before the next config (`del` of names `step` closes over)
            c.free()
