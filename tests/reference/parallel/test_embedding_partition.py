"""Embedding partition over DP (reference.parallel.embedding): on 2 and 4 gloo ranks the partitioned
table gives the same outputs, gradients and 10-step losses as the replicated one (tied and untied head),
and the per-rank embedding parameter / gradient / optimizer bytes, measured on the live objects, are N x
smaller. fp64, tiny model."""

from __future__ import annotations

import pytest
import torch

from semoe.plan_spec import ParallelPlan

pytestmark = pytest.mark.distributed


def _lookup_worker(V: int = 11, H: int = 8):
    """Uneven token counts per rank (rank r has r + 2 ids): forward and backward against F.embedding."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from reference.parallel.embedding import PartitionedEmbedding
    from reference.parallel.groups import build_groups

    r, N = dist.get_rank(), dist.get_world_size()
    groups = build_groups(ParallelPlan(data_parallel=N))
    torch.manual_seed(0)
    full = torch.randn(V, H, dtype=torch.float64)
    ids = torch.randint(0, V, (r + 2,), generator=torch.Generator().manual_seed(r))
    g_out = torch.randn(r + 2, H, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + r))
    ref_w = full.clone().requires_grad_(True)
    y_ref = F.embedding(ids, ref_w)
    (y_ref * g_out).sum().backward()
    emb = PartitionedEmbedding(full, groups.dp, grad_scale=1.0)
    y = emb(ids)
    (y * g_out).sum().backward()
    # the slice's grad must equal the sum over ranks of the reference grads, my columns
    total = ref_w.grad.clone()
    dist.all_reduce(total)
    cols = emb.columns
    sparse = PartitionedEmbedding(full, groups.dp, grad_scale=1.0, sparse=True)
    (sparse(ids) * g_out).sum().backward()
    return (torch.equal(y, y_ref), torch.allclose(emb.weight_slice.grad, total[:, cols.start:cols.stop], atol=1e-12),
            sparse.weight_slice.grad.is_sparse and torch.allclose(sparse.weight_slice.grad.to_dense(),
                                                                  emb.weight_slice.grad, atol=1e-12),
            torch.equal(emb.weight.detach(), full))


def _train_worker(partition: bool, tied: bool, steps: int = 10, ep: int = 1):
    import torch.distributed as dist

    from reference.model import MoEDecoder
    from reference.parallel.embedding import embedding_state_bytes, partition_embedding
    from reference.parallel.parallelize import parallelize
    from semoe.presets import model_preset

    r, N = dist.get_rank(), dist.get_world_size()
    spec = model_preset("tiny").replace(dtype="fp64", tied_embeddings=tied)
    model = MoEDecoder(spec, seed=0).to(torch.float64)
    plan = ParallelPlan(data_parallel=N, expert_parallel=ep, embedding_partition=partition)
    model, sync = parallelize(model, plan)
    sync = partition_embedding(model, sync.groups, sync)
    assert type(model.tok_emb).__name__ == ("PartitionedEmbedding" if partition else "Embedding")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    B, S = 8, 16
    losses, first = [], {}
    data = torch.randint(0, spec.vocab, (B, S + 1), generator=gen)  # one batch, memorised: the loss falls
    for step in range(steps):
        x, y = data[:, :-1], data[:, 1:]
        per = B // N
        x, y = x[r * per:(r + 1) * per], y[r * per:(r + 1) * per]
        out = model(x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sync.finish()
        norm = sync.clip(0.5)
        if step == 0:
            first["logits"] = out.logits_BSV.detach().clone()
            first["norm"] = float(norm)
            grads = {}
            for name, p in model.named_parameters():
                if "experts" in name:
                    continue  # sharded over EP; compared by the EP tests
                g = p.grad.detach().clone()
                if name == "tok_emb.weight_slice":  # gather the columns -> the full table's gradient
                    parts = [torch.empty_like(g) for _ in range(N)]
                    dist.all_gather(parts, g)
                    name, g = "tok_emb.weight", torch.cat(parts, dim=1)
                grads[name] = g
            first["grads"] = grads
        opt.step()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / N)
    return {"losses": losses, **first, "bytes": embedding_state_bytes(model, opt)}


def _compare(pool, tied: bool, ep: int = 1):
    N = pool.world_size
    rep = pool.run(_train_worker, False, tied, ep=ep)
    part = pool.run(_train_worker, True, tied, ep=ep)
    for a, b in zip(rep, part):
        assert torch.allclose(a["logits"], b["logits"], rtol=0, atol=1e-12)
        assert abs(a["norm"] - b["norm"]) <= 1e-10 * a["norm"]
        assert a["grads"].keys() == b["grads"].keys()
        for name in a["grads"]:
            assert torch.allclose(a["grads"][name], b["grads"][name], rtol=1e-9, atol=1e-13), name
        assert len(a["losses"]) == 10 and a["losses"][-1] < a["losses"][0]
        for la, lb in zip(a["losses"], b["losses"]):
            assert abs(la - lb) <= 1e-10 * abs(la), (a["losses"], b["losses"])
        # N x less embedding state per rank, measured on the model's parameters and AdamW's state
        for kind in ("params", "grads", "optimizer"):
            assert a["bytes"][kind] > 0 and a["bytes"][kind] == N * b["bytes"][kind], (kind, a["bytes"], b["bytes"])
    return rep[0]["losses"]


def test_lookup_uneven_tokens_and_sparse_grad_2_and_4_ranks(pool2, pool4):
    for pool in (pool2, pool4):
        for ok in pool.run(_lookup_worker):
            assert all(ok), ok


def test_partition_equals_replicated_2_ranks_tied_and_untied(pool2):
    _compare(pool2, tied=True)
    _compare(pool2, tied=False)


def test_partition_equals_replicated_4_ranks_tied_with_ep(pool4):
    _compare(pool4, tied=True, ep=2)


def test_partition_needs_divisible_hidden_and_no_zero3():
    from reference.parallel.embedding import PartitionedEmbedding, partition_embedding
    from reference.parallel.groups import Group, build_groups

    with pytest.raises(ValueError, match="hidden \\(10\\) must be divisible"):
        PartitionedEmbedding(torch.zeros(4, 10), Group("dp", (0, 1, 2), 0))
    groups = build_groups(ParallelPlan(data_parallel=1, embedding_partition=True, zero_stage=3))
    with pytest.raises(ValueError, match="zero_stage 3"):
        partition_embedding(torch.nn.Module(), groups)
    # world 1: a partition over one rank is the plain embedding
    emb = PartitionedEmbedding(torch.arange(12.0).view(4, 3), build_groups(ParallelPlan()).dp)
    assert torch.equal(emb(torch.tensor([[3, 0]])), torch.tensor([[[9.0, 10, 11], [0, 1, 2]]]))


def test_tied_head_choice_by_cost():
    from reference.parallel.embedding import tied_head_comm_elements

    # SE-MoE's GPT (V 50304, H 4096) on 8 ranks with 8 x 1024 tokens each: gathering the table is ~16x cheaper
    c = tied_head_comm_elements(50304, 4096, 8, 8192)
    assert c["gather_table"] == 2 * 7 / 8 * 50304 * 4096
    assert c["column_parallel"] > 15 * c["gather_table"]
    # only with fewer tokens in the whole group than hidden columns would the column-parallel head win
    c = tied_head_comm_elements(50304, 4096, 8, 256)
    assert c["column_parallel"] < c["gather_table"]
