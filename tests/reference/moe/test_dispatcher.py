"""LocalDispatcher: hand-worked permutation, inverse and count invariants, padded layout, gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.moe.dispatcher import DispatchMeta, LocalDispatcher, Pending
from reference.moe.routing import Routing


def make_routing(ids, weights, kept, num_experts, capacity=None, slots=None) -> Routing:
    ids = torch.as_tensor(ids, dtype=torch.long)
    kept = torch.as_tensor(kept, dtype=torch.bool)
    weights = torch.as_tensor(weights, dtype=torch.float64) * kept
    T = ids.shape[0]
    r = Routing(
        expert_ids_TK=ids,
        weights_TK=weights,
        kept_TK=kept,
        counts_E=torch.bincount(ids[kept], minlength=num_experts),
        probs_TE=torch.full((T, num_experts), 1.0 / num_experts, dtype=torch.float64),
        capacity=capacity,
        slots_TK=None if slots is None else torch.as_tensor(slots, dtype=torch.long),
    )
    r.check()
    return r


# Hand-worked case: T=4 tokens, K=2, E=3; token 1 loses slot 1, token 3 loses slot 0.
# flat slots t*K+k: 0:(0,0)->e2 1:(0,1)->e0 2:(1,0)->e0 3:dropped 4:(2,0)->e2 5:(2,1)->e1 6:dropped 7:(3,1)->e2
IDS = [[2, 0], [0, 1], [2, 1], [0, 2]]
KEPT = [[1, 1], [1, 0], [1, 1], [0, 1]]
WEIGHTS = [[0.6, 0.4], [1.0, 0.0], [0.7, 0.3], [0.0, 1.0]]
SLOTS = [[0, 1], [0, -1], [2, 0], [-1, 1]]  # position of each kept slot in its expert's buffer
EXPECTED_ASSIGNMENT = [1, 2, 5, 0, 4, 7]  # by expert, then token
EXPECTED_TOKENS = [0, 1, 2, 0, 2, 3]
EXPECTED_COUNTS = [2, 1, 3]


def _scale_by_expert(x_ND, counts_E):
    """A toy expert e that multiplies its rows by e + 1."""
    factor = torch.repeat_interleave(torch.arange(1, counts_E.numel() + 1, dtype=x_ND.dtype), counts_E)
    return x_ND * factor[:, None]


def test_hand_worked_dispatch_and_combine():
    routing = make_routing(IDS, WEIGHTS, KEPT, 3)
    x = torch.arange(4 * 2, dtype=torch.float64).view(4, 2)
    d = LocalDispatcher(3)
    x_ND, counts, meta = d.dispatch(x, routing)
    assert meta.assignment_N.tolist() == EXPECTED_ASSIGNMENT
    assert meta.token_N.tolist() == EXPECTED_TOKENS
    assert counts.tolist() == EXPECTED_COUNTS
    assert torch.equal(x_ND, x[EXPECTED_TOKENS])
    assert meta.weights_N.tolist() == [0.4, 1.0, 0.3, 0.6, 0.7, 1.0]
    y = d.combine(_scale_by_expert(x_ND, counts), meta)
    expected = torch.tensor([2.2, 1.0, 2.7, 3.0], dtype=torch.float64)[:, None] * x  # sum_k w * (e + 1)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-14)


def test_hand_worked_padded_layout_uses_gate_slots():
    routing = make_routing(IDS, WEIGHTS, KEPT, 3, capacity=3, slots=SLOTS)
    x = torch.arange(4 * 2, dtype=torch.float64).view(4, 2) + 1
    d = LocalDispatcher(3, layout="padded")
    x_ECD, counts, meta = d.dispatch(x, routing)
    assert x_ECD.shape == (3, 3, 2) and meta.capacity == 3
    assert meta.buffer_row_N.tolist() == [1, 0, 3, 6, 8, 7]  # e * C + slot
    zero = torch.zeros(2, dtype=torch.float64)
    rows = [x[1], x[0], zero, x[2], zero, zero, x[0], x[3], x[2]]
    assert torch.equal(x_ECD.reshape(9, 2), torch.stack(rows))
    y_ECD = x_ECD * torch.arange(1, 4, dtype=torch.float64)[:, None, None]
    y = d.combine(y_ECD, meta)
    expected = torch.tensor([2.2, 1.0, 2.7, 3.0], dtype=torch.float64)[:, None] * x
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-14)


def test_padded_without_slots_ranks_by_token_and_dropless_capacity_is_max_count():
    routing = make_routing(IDS, WEIGHTS, KEPT, 3)  # no capacity, no slots
    _, _, meta = LocalDispatcher(3, layout="padded").dispatch(torch.ones(4, 2, dtype=torch.float64), routing)
    assert meta.capacity == 3  # the largest count
    assert meta.buffer_row_N.tolist() == [0, 1, 3, 6, 7, 8]


def test_inverse_permutation_dropless_unit_weights():
    """unpermute(permute(x)) == x (K=1) and == K * x (every slot weight 1), exactly."""
    gen = torch.Generator().manual_seed(0)
    for K in (1, 3):
        T, E = 11, 5
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        routing = make_routing(ids, torch.ones(T, K), torch.ones(T, K), E)
        x = torch.randn(T, 4, dtype=torch.float64, generator=gen)
        for layout in ("contiguous", "padded"):
            d = LocalDispatcher(E, layout=layout)
            xr, counts, meta = d.dispatch(x, routing)
            assert int(counts.sum()) == T * K
            assert torch.equal(d.combine(xr, meta), K * x)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 12), K=st.integers(1, 3), E=st.integers(1, 5))
def test_invariants_random_routings(seed, T, K, E):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=gen)
    kept = torch.rand(T, K, generator=gen) < 0.7
    weights = torch.rand(T, K, generator=gen, dtype=torch.float64)
    routing = make_routing(ids, weights, kept, E)
    x = torch.randn(T, 3, dtype=torch.float64, generator=gen)
    d = LocalDispatcher(E)
    x_ND, counts, meta = d.dispatch(x, routing)
    # counts sum to T*K minus dropped and match the routing
    assert int(counts.sum()) == T * K - routing.dropped == meta.num_kept
    assert torch.equal(counts, routing.counts_E)
    # rows are sorted by expert, then by (token, slot): stable and deterministic
    expert_N = ids.reshape(-1)[meta.assignment_N]
    key = expert_N * (T * K) + meta.assignment_N
    assert bool((key[1:] > key[:-1]).all())
    assert torch.equal(expert_N, torch.repeat_interleave(torch.arange(E), counts))
    assert torch.equal(x_ND, x[meta.token_N])
    # combine equals the naive per-slot sum
    y = d.combine(_scale_by_expert(x_ND, counts), meta)
    ref = torch.zeros_like(x)
    for t in range(T):
        for k in range(K):
            if kept[t, k]:
                ref[t] += weights[t, k] * (ids[t, k] + 1) * x[t]
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    # tokens with every slot dropped contribute exactly 0
    assert bool((y[~kept.any(1)] == 0).all())
    # the padded layout gives the same result and keeps every row inside the buffer
    dp = LocalDispatcher(E, layout="padded")
    x_ECD, _, meta_p = dp.dispatch(x, routing)
    assert all(r < E * meta_p.capacity for r in meta_p.buffer_row_N.tolist())
    y_p = dp.combine(x_ECD * torch.arange(1, E + 1, dtype=x.dtype)[:, None, None], meta_p)
    torch.testing.assert_close(y_p, ref, rtol=0, atol=1e-12)


def test_capacity_mode_respects_capacity():
    gen = torch.Generator().manual_seed(1)
    T, K, E, C = 16, 2, 4, 5
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    # position policy: first choices in token order, then second choices; drop beyond C
    kept = torch.zeros(T, K, dtype=torch.bool)
    slots = torch.full((T, K), -1)
    fill = [0] * E
    for k in range(K):
        for t in range(T):
            e = int(ids[t, k])
            if fill[e] < C:
                kept[t, k], slots[t, k], fill[e] = True, fill[e], fill[e] + 1
    routing = make_routing(ids, torch.full((T, K), 0.5), kept, E, capacity=C, slots=slots)
    x = torch.randn(T, 3, dtype=torch.float64, generator=gen)
    for layout in ("contiguous", "padded"):
        xr, counts, meta = LocalDispatcher(E, layout=layout).dispatch(x, routing)
        assert int(counts.max()) <= C and int(counts.sum()) == T * K - routing.dropped
    assert xr.shape == (E, C, 3)
    # the padded buffer holds row t at its gate slot; unused rows are zero
    used = torch.zeros(E * C, dtype=torch.bool)
    used[meta.buffer_row_N] = True
    assert bool((xr.reshape(E * C, 3)[~used] == 0).all())
    for t, k in kept.nonzero().tolist():
        assert torch.equal(xr[ids[t, k], slots[t, k]], x[t])


def test_gradients_wrt_input_and_weights():
    routing0 = make_routing(IDS, WEIGHTS, KEPT, 3, capacity=3, slots=SLOTS)
    kept = routing0.kept_TK
    W = torch.randn(3, 2, 2, dtype=torch.float64)

    for layout in ("contiguous", "padded"):
        d = LocalDispatcher(3, layout=layout)

        def f(x, w, d=d):
            r = Routing(**{**routing0.__dict__, "weights_TK": w * kept})
            xr, counts, meta = d.dispatch(x, r)
            if xr.dim() == 3:
                yr = torch.bmm(xr, W)
            else:
                yr = torch.cat([c @ W[e] for e, c in enumerate(torch.split(xr, counts.tolist()))])
            return d.combine(torch.tanh(yr), meta)

        x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
        w = torch.rand(4, 2, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(f, (x, w))


def test_subclass_communicate_hooks_are_used():
    """An all-to-all dispatcher overrides only the communicate steps (and may return async handles)."""

    class Handle(Pending):
        waited = 0

        def wait(self):
            Handle.waited += 1
            return super().wait()

    class Recording(LocalDispatcher):
        def dispatch_communicate(self, x, meta):
            return Handle(x)

        def combine_communicate(self, y, meta):
            return Handle(y)

    routing = make_routing(IDS, WEIGHTS, KEPT, 3)
    x = torch.randn(4, 2, dtype=torch.float64)
    d = Recording(3)
    xr, counts, meta = d.dispatch(x, routing)
    y = d.combine(xr, meta)
    assert Handle.waited == 2
    xr0, _, meta0 = LocalDispatcher(3).dispatch(x, routing)
    assert torch.equal(y, LocalDispatcher(3).combine(xr0, meta0))
    assert isinstance(meta, DispatchMeta)
    with pytest.raises(Exception):
        meta.num_tokens = 5  # frozen


def test_bad_input_messages():
    routing = make_routing(IDS, WEIGHTS, KEPT, 3)
    d = LocalDispatcher(3)
    with pytest.raises(ValueError, match="expected x_TD with 2 dims"):
        d.dispatch(torch.zeros(1, 4, 2), routing)
    with pytest.raises(ValueError, match="does not match 5 tokens"):
        d.dispatch(torch.zeros(5, 2), routing)
    with pytest.raises(ValueError, match="routing has 3 experts, dispatcher 4"):
        LocalDispatcher(4).dispatch(torch.zeros(4, 2), routing)
    _, _, meta = d.dispatch(torch.zeros(4, 2), routing)
    with pytest.raises(ValueError, match=r"expected y of shape \(6, 2\)"):
        d.combine(torch.zeros(5, 2), meta)
    bad = make_routing(IDS, WEIGHTS, KEPT, 3, capacity=3, slots=SLOTS)
    bad = Routing(**{**bad.__dict__, "capacity": 2})
    with pytest.raises(ValueError, match="outside the capacity buffer"):
        LocalDispatcher(3, layout="padded").dispatch(torch.zeros(4, 2), bad)
    with pytest.raises(ValueError, match="layout must be one of"):
        LocalDispatcher(3, layout="ragged")
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        LocalDispatcher(0)
