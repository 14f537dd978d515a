"""Gates of reference/moe/router.py: hand-worked routings, Routing invariants, BASE optimality, losses.

Hand-worked cases set the router weight to the identity (D == E), so the logits are the inputs; the
inputs are logs of round probabilities (plus a per-token offset, which softmax ignores) so that every
expected weight can be written as a fraction. fp64 throughout the hand-worked cases.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment, linprog

from reference.moe.router import (
    GATES,
    BaseGate,
    GShardGate,
    SigmoidBiasGate,
    SwitchGate,
    TopKGate,
    balanced_assignment,
    build_gate,
    drop_to_capacity,
    expert_capacity,
    routing_to_combine_tensor,
)
from semoe.model_spec import GATE_NAMES, ModelSpec
from semoe.sizing import router_params

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny tensors: one intra-op thread avoids spin-waiting on a shared 2-core machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_spec(gate="topk", **kw) -> ModelSpec:
    base = dict(layers=1, hidden=4, heads=1, vocab=16, ffn=4, experts=4, top_k=1, gate=gate, capacity_factor=None)
    base.update(kw)
    return ModelSpec(**base)


def identity_gate(spec: ModelSpec, **options):
    """A gate in fp64 whose logits are its inputs (router weight = identity, D == E)."""
    gate = build_gate(spec, **options).double()
    if hasattr(gate, "router"):
        with torch.no_grad():
            gate.router.weight.copy_(torch.eye(spec.experts, spec.hidden, dtype=F64))
    return gate


def logp(rows, offsets=None) -> torch.Tensor:
    """log of probabilities, plus a per-token constant (softmax is invariant to it)."""
    x = torch.tensor(rows, dtype=F64).log()
    return x if offsets is None else x + torch.tensor(offsets, dtype=F64).unsqueeze(1)


def close(a, b, tol=1e-12):
    return torch.allclose(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), rtol=0, atol=tol)


# The running example for the softmax top-k family: T = 4 tokens, E = 4 experts.
P4 = [
    [0.4, 0.3, 0.2, 0.1],  # t0: top-2 (0, 1)
    [0.5, 0.1, 0.1, 0.3],  # t1: top-2 (0, 3)
    [0.6, 0.2, 0.1, 0.1],  # t2: top-2 (0, 1)
    [0.1, 0.2, 0.3, 0.4],  # t3: top-2 (3, 2)
]
X4 = logp(P4, offsets=[0, 1, 2, 3])  # logsumexp = offsets -> z_loss = (0 + 1 + 4 + 9) / 4 = 3.5
# load_balance with k <= 2 counts first choices: f = [3/4, 0, 0, 1/4];
# P = column means = [1.6/4, 0.8/4, 0.7/4, 0.9/4] = [0.4, 0.2, 0.175, 0.225];
# E * sum f P = 4 * (0.75 * 0.4 + 0.25 * 0.225) = 1.425
LB4 = 1.425


# ------------------------------------------------------------------------------ hand-worked: topk
def test_topk_position_policy_hand_worked():
    # capacity = ceil(1.0 * 4 tokens * 2 / 4 experts) = 2.
    # Position order: 1st choices t0->e0 (slot 0), t1->e0 (slot 1), t2->e0 (rank 2: dropped), t3->e3 (0);
    # then 2nd choices: t0->e1 (0), t1->e3 (after t3's 1st choice: 1), t2->e1 (1), t3->e2 (0).
    gate = identity_gate(make_spec(top_k=2, capacity_factor=1.0, drop_policy="position", renormalize=True))
    r = gate(X4)
    r.check()
    assert r.capacity == 2
    assert r.expert_ids_TK.tolist() == [[0, 1], [0, 3], [0, 1], [3, 2]]
    assert r.kept_TK.tolist() == [[True, True], [True, True], [False, True], [True, True]]
    assert r.slots_TK.tolist() == [[0, 0], [1, 1], [-1, 1], [0, 0]]
    assert r.counts_E.tolist() == [2, 2, 1, 2]  # 8 assignments - 1 dropped
    # renormalised over kept: t0 .4/.7, .3/.7; t1 .5/.8, .3/.8; t2 only its 2nd: .2/.2; t3 .4/.7, .3/.7
    assert close(r.weights_TK, [[4 / 7, 3 / 7], [5 / 8, 3 / 8], [0, 1], [4 / 7, 3 / 7]])
    assert close(r.probs_TE, P4)
    assert close(r.aux_losses["load_balance"], LB4)
    assert close(r.aux_losses["z_loss"], 3.5)


def test_topk_probability_policy_hand_worked():
    # Expert 0 is asked by t0 (.4), t1 (.5), t2 (.6): it keeps the two highest, t2 and t1, and drops
    # t0's first choice. The others are within capacity 2. Slots number kept tokens in token order.
    gate = identity_gate(make_spec(top_k=2, capacity_factor=1.0, drop_policy="probability", renormalize=False))
    r = gate(X4)
    r.check()
    assert r.kept_TK.tolist() == [[False, True], [True, True], [True, True], [True, True]]
    assert r.slots_TK.tolist() == [[-1, 0], [0, 0], [1, 1], [1, 0]]
    assert r.counts_E.tolist() == [2, 2, 1, 2]
    assert close(r.weights_TK, [[0, 0.3], [0.5, 0.3], [0.6, 0.2], [0.4, 0.3]])  # raw probabilities


def test_topk_dropless_and_min_capacity():
    r = identity_gate(make_spec(top_k=2, capacity_factor=None))(X4)
    r.check()
    assert r.capacity is None and r.slots_TK is None and bool(r.kept_TK.all())
    assert r.counts_E.tolist() == [3, 2, 1, 2]
    # cf 0.25 -> ceil(0.25 * 4 * 2 / 4) = 1, raised to min_capacity 3: nothing is dropped
    r = identity_gate(make_spec(top_k=2, capacity_factor=0.25, min_capacity=3))(X4)
    assert r.capacity == 3 and bool(r.kept_TK.all())


# ---------------------------------------------------------------------------- hand-worked: switch
def test_switch_hand_worked_eval():
    # top-1, capacity = ceil(2.0 * 4 / 4) = 2: e0 keeps t0, t1 and drops t2; e3 keeps t3.
    # Weight = the raw softmax probability (Switch Eq. 2), also with spec.renormalize=True.
    gate = identity_gate(make_spec("switch", capacity_factor=2.0, renormalize=True)).eval()
    r = gate(X4)
    r.check()
    assert r.expert_ids_TK.tolist() == [[0], [0], [0], [3]]
    assert r.kept_TK.flatten().tolist() == [True, True, False, True]
    assert r.slots_TK.flatten().tolist() == [0, 1, -1, 0]
    assert r.counts_E.tolist() == [2, 0, 0, 1]
    assert close(r.weights_TK.flatten(), [0.4, 0.5, 0.0, 0.4])
    assert close(r.aux_losses["load_balance"], LB4)


def test_switch_jitter_multiplies_the_input_in_training():
    gate = identity_gate(make_spec("switch")).train()
    torch.manual_seed(3)
    r = gate(X4)
    torch.manual_seed(3)
    u = 1 - 1e-2 + 2e-2 * torch.rand(4, 4, dtype=F64)  # U(0.99, 1.01), drawn as the gate draws it
    assert close(r.probs_TE, (X4 * u).softmax(-1))
    assert not close(r.probs_TE, P4)


# ---------------------------------------------------------------------------- hand-worked: gshard
def test_gshard_hand_worked():
    # without random routing gshard = topk k=2 with the position policy (same numbers as above)
    r = identity_gate(make_spec("gshard", top_k=2, capacity_factor=1.0)).train()(X4)
    r.check()
    assert r.expert_ids_TK.tolist() == [[0, 1], [0, 3], [0, 1], [3, 2]]
    assert r.kept_TK.tolist() == [[True, True], [True, True], [False, True], [True, True]]
    assert close(r.weights_TK, [[4 / 7, 3 / 7], [5 / 8, 3 / 8], [0, 1], [4 / 7, 3 / 7]])


def test_gshard_random_routing_keeps_second_with_probability_2_g2():
    # p = [.6, .3, .1]: g2 = .3 / (.6 + .3) = 1/3, the 2nd expert is used with probability 2/3
    spec = make_spec("gshard", top_k=2, experts=3, hidden=3)
    gate = identity_gate(spec, random_routing=True).train()
    x = logp([[0.6, 0.3, 0.1]] * 4000)
    torch.manual_seed(0)
    r = gate(x)
    r.check()
    assert bool(r.kept_TK[:, 0].all())
    assert abs(float(r.kept_TK[:, 1].double().mean()) - 2 / 3) < 0.03  # 4 sigma = 0.03
    assert bool((r.weights_TK[~r.kept_TK[:, 1], 0] == 1).all())  # renormalised: the first alone
    assert bool(gate.eval()(x).kept_TK.all())  # never in eval


# ------------------------------------------------------------------------ hand-worked: noisy_topk
def test_noisy_topk_eval_is_softmax_over_kept_top_k():
    r = identity_gate(make_spec("noisy_topk", top_k=2, renormalize=False)).eval()(X4)
    r.check()
    assert r.expert_ids_TK.tolist() == [[0, 1], [0, 3], [0, 1], [3, 2]]
    # softmax over the kept pair = renormalised probabilities whatever spec.renormalize says
    assert close(r.weights_TK, [[4 / 7, 3 / 7], [5 / 8, 3 / 8], [6 / 8, 2 / 8], [4 / 7, 3 / 7]])


def test_noisy_topk_training_noise():
    # W_noise = 0 -> noise std = softplus(0) = ln 2; H = x + ln2 * N(0, 1) (Shazeer et al. Eq. 4)
    gate = identity_gate(make_spec("noisy_topk", top_k=2)).train()
    with torch.no_grad():
        gate.noise.weight.zero_()
    torch.manual_seed(7)
    r = gate(X4)
    torch.manual_seed(7)
    h = X4 + math.log(2) * torch.randn(4, 4, dtype=F64)
    assert close(r.probs_TE, h.softmax(-1))
    top_h, top_i = h.topk(2, dim=-1)
    assert torch.equal(r.expert_ids_TK, top_i)
    assert close(r.weights_TK, top_h.softmax(-1))


# ----------------------------------------------------------------------------- hand-worked: ktop1
X_K1 = torch.tensor([[1, 3, 4, 1], [3, 1, 1, 4], [4, 1, 1, 9]], dtype=F64).log()


def test_ktop1_hand_worked():
    # E = 4, k = 2 prototype groups {0, 1} and {2, 3}, softmax inside each group:
    # t0: [1, 3]/4 -> e1 (.75); [4, 1]/5 -> e2 (.8)
    # t1: [3, 1]/4 -> e0 (.75); [1, 4]/5 -> e3 (.8)
    # t2: [4, 1]/5 -> e0 (.8);  [1, 9]/10 -> e3 (.9)
    r = identity_gate(make_spec("ktop1", top_k=2, renormalize=True))(X_K1)
    r.check()
    assert r.expert_ids_TK.tolist() == [[1, 2], [0, 3], [0, 3]]
    assert close(r.weights_TK, [[0.75, 0.8], [0.75, 0.8], [0.8, 0.9]])  # not renormalised
    assert r.counts_E.tolist() == [2, 1, 1, 2]
    # group 0: f = [2/3, 1/3], P = [(.25 + .75 + .8)/3, (.75 + .25 + .2)/3] = [.6, .4] -> 2 * (.4 + .4/3) = 16/15
    # group 1: f = [1/3, 2/3], P = [(.8 + .2 + .1)/3, (.2 + .8 + .9)/3] -> 2 * (1.1 + 3.8) / 9 = 49/45
    # load_balance = mean = (48/45 + 49/45) / 2 = 97/90
    assert close(r.aux_losses["load_balance"], 97 / 90)


def test_ktop1_capacity():
    # capacity = ceil(0.5 * 3 * 2 / 4) = 1: e0 keeps t1 (drops t2), e3 keeps t1 (drops t2)
    r = identity_gate(make_spec("ktop1", top_k=2, capacity_factor=0.5))(X_K1)
    r.check()
    assert r.kept_TK.tolist() == [[True, True], [True, True], [False, False]]
    assert r.counts_E.tolist() == [1, 1, 1, 1]
    assert close(r.weights_TK, [[0.75, 0.8], [0.75, 0.8], [0, 0]])


# ------------------------------------------------------------------------------ hand-worked: hash
def test_hash_hand_worked():
    gate = build_gate(make_spec("hash", capacity_factor=1.0))
    assert sum(p.numel() for p in gate.parameters()) == 0
    gate.table_VK.copy_((torch.arange(16) % 4).unsqueeze(1))  # token id v -> expert v % 4
    # ids [5, 2, 7, 5] -> experts [1, 2, 3, 1]; capacity ceil(4 / 4) = 1 drops the second 5 (t3)
    r = gate(torch.randn(4, 4), torch.tensor([5, 2, 7, 5]))
    r.check()
    assert r.expert_ids_TK.flatten().tolist() == [1, 2, 3, 1]
    assert r.kept_TK.flatten().tolist() == [True, True, True, False]
    assert r.weights_TK.flatten().tolist() == [1.0, 1.0, 1.0, 0.0]
    assert r.counts_E.tolist() == [0, 1, 1, 1]
    assert r.aux_losses == {}


def test_hash_table_is_fixed_by_seed_and_distinct_for_k2():
    spec = make_spec("hash", top_k=2, vocab=1000)
    a, b, c = build_gate(spec), build_gate(spec), build_gate(spec, seed=1)
    assert torch.equal(a.table_VK, b.table_VK) and not torch.equal(a.table_VK, c.table_VK)
    assert bool((a.table_VK[:, 0] != a.table_VK[:, 1]).all())
    counts = torch.bincount(a.table_VK.flatten(), minlength=4)
    assert int(counts.min()) > 400  # 2000 assignments, ~500 each
    r = a(torch.randn(3, 4), torch.tensor([0, 1, 999]))
    assert close(r.weights_TK, torch.full((3, 2), 0.5))


def test_hash_errors():
    gate = build_gate(make_spec("hash"))
    with pytest.raises(ValueError, match="token_ids_T: the hash gate routes by token id"):
        gate(torch.randn(3, 4))
    with pytest.raises(ValueError, match="token_ids_T: ids must be in 0..15"):
        gate(torch.randn(3, 4), torch.tensor([0, 1, 16]))
    with pytest.raises(ValueError, match="token_ids_T: expected integer ids of shape"):
        gate(torch.randn(3, 4), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------ hand-worked: base
X_BASE = torch.tensor([[3, 1], [2, 0], [4, 3.5], [1, 0.5]], dtype=F64)


def test_base_hand_worked():
    # Greedy would send all four tokens to e0. Balanced (2 each): moving token t to e1 costs
    # s0 - s1 = [2, 2, 0.5, 0.5], so t2 and t3 go to e1; total 3 + 2 + 3.5 + 0.5 = 9.
    gate = identity_gate(make_spec("base", hidden=2, experts=2)).train()
    r = gate(X_BASE)
    r.check()
    assert r.expert_ids_TK.flatten().tolist() == [0, 0, 1, 1]
    assert r.counts_E.tolist() == [2, 2] and r.capacity == 2
    assert r.slots_TK.flatten().tolist() == [0, 1, 0, 1]
    assert close(r.weights_TK.flatten(), torch.tensor([3, 2, 3.5, 0.5], dtype=F64).sigmoid())
    # eval: greedy top-1, dropless
    r = gate.eval()(X_BASE)
    r.check()
    assert r.expert_ids_TK.flatten().tolist() == [0, 0, 0, 0] and r.capacity is None
    assert close(r.weights_TK.flatten(), torch.tensor([3, 2, 4, 1], dtype=F64).sigmoid())


def test_base_divisibility_error():
    gate = build_gate(make_spec("base", top_k=2)).train()
    with pytest.raises(ValueError, match=r"x_TD: .*tokens \* top_k \(3 \* 2\) must be divisible by experts \(4\)"):
        gate(torch.randn(3, 4))
    gate.eval()(torch.randn(3, 4)).check()  # greedy in eval: no divisibility needed
    with pytest.raises(ValueError, match="divisible by experts"):
        balanced_assignment(torch.randn(5, 2))


@pytest.mark.parametrize("T,E", [(2, 2), (6, 3), (8, 4), (12, 4), (16, 8), (24, 6), (32, 16), (64, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_auction_equals_linear_sum_assignment(T, E, seed):
    # k = 1: the optimum of the assignment problem tokens x (E experts * C slots)
    g = torch.Generator().manual_seed(seed + 100 * T + E)
    s = torch.randn(T, E, generator=g, dtype=F64)
    ids = balanced_assignment(s)
    C = T // E
    assert torch.bincount(ids.flatten(), minlength=E).tolist() == [C] * E
    slots = np.repeat(s.numpy(), C, axis=1)  # column e * C + c is slot c of expert e
    rows, cols = linear_sum_assignment(slots, maximize=True)
    assert float(s.gather(1, ids).sum()) == pytest.approx(slots[rows, cols].sum(), abs=1e-9)
    assert ids.flatten().tolist() == (cols // C).tolist()  # random scores: the optimum is unique


def _lp_optimum(s: np.ndarray, k: int) -> float:
    """max sum s x, sum_e x_te = k, sum_t x_te = T k / E, 0 <= x <= 1 (integral: bipartite b-matching)."""
    T, E = s.shape
    rows = [np.kron(np.eye(T)[t], np.ones(E)) for t in range(T)]
    rows += [np.kron(np.ones(T), np.eye(E)[e]) for e in range(E)]
    res = linprog(-s.reshape(-1), A_eq=np.array(rows), b_eq=[k] * T + [T * k // E] * E, bounds=(0, 1), method="highs")
    return -res.fun


@pytest.mark.parametrize("T,E,k", [(4, 2, 2), (6, 3, 2), (8, 4, 3), (10, 5, 4), (16, 8, 2), (12, 6, 5)])
def test_auction_top_k_equals_lp_optimum(T, E, k):
    s = torch.randn(T, E, generator=torch.Generator().manual_seed(T * E + k), dtype=F64)
    ids = balanced_assignment(s, k)
    srt = ids.sort(dim=1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all()), "a token got the same expert twice"
    assert torch.bincount(ids.flatten(), minlength=E).tolist() == [T * k // E] * E
    assert float(s.gather(1, ids).sum()) == pytest.approx(_lp_optimum(s.numpy(), k), abs=1e-9)
    assert bool((s.gather(1, ids)[:, :-1] >= s.gather(1, ids)[:, 1:]).all())  # rows by descending score


def test_auction_degenerate_scores():
    ids = balanced_assignment(torch.zeros(12, 3))  # all equal: any balanced assignment
    assert torch.bincount(ids.flatten(), minlength=3).tolist() == [4, 4, 4]
    assert balanced_assignment(torch.randn(5, 1)).flatten().tolist() == [0] * 5
    ints = torch.randint(0, 3, (16, 4)).double()  # many ties, integer scores
    ids = balanced_assignment(ints)
    rows, cols = linear_sum_assignment(np.repeat(ints.numpy(), 4, axis=1), maximize=True)
    assert float(ints.gather(1, ids).sum()) == np.repeat(ints.numpy(), 4, axis=1)[rows, cols].sum()


# ------------------------------------------------------------------------------- hand-worked: sam
X_SAM = logp([[0.35, 0.05, 0.25, 0.35], [0.1, 0.5, 0.3, 0.1]])


def test_sam_hand_worked():
    # groups {0, 1}, {2, 3}. t0: group sums [.4, .6] -> group 1 (although e0 ties for the best
    # expert); t1: [.6, .4] -> group 0. alignment = mean(1 - .6, 1 - .6) = .4
    spec = make_spec("sam", expert_groups=2, top_k=1, renormalize=False)
    r = identity_gate(spec)(X_SAM)
    r.check()
    assert r.expert_ids_TK.flatten().tolist() == [3, 1]
    assert close(r.weights_TK.flatten(), [0.35, 0.5])
    assert close(r.aux_losses["alignment"], 0.4)
    # load_balance: f = [0, .5, 0, .5], P = [.225, .275, .275, .225] -> 4 * (.5 * .275 + .5 * .225) = 1
    assert close(r.aux_losses["load_balance"], 1.0)
    # top-2 inside the group, renormalised: t0 (3, 2) .35/.6, .25/.6; t1 (1, 0) .5/.6, .1/.6
    r = identity_gate(spec.replace(top_k=2, renormalize=True))(X_SAM)
    assert r.expert_ids_TK.tolist() == [[3, 2], [1, 0]]
    assert close(r.weights_TK, [[7 / 12, 5 / 12], [5 / 6, 1 / 6]])


# --------------------------------------------------------------------- hand-worked: expert_choice
X_EC = logp([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])


def test_expert_choice_hand_worked():
    # C = ceil(1.0 * 4 * 1 / 2) = 2 (dropless spec -> cf 1.0). e0 takes the largest p0: t0 (.9), t1 (.8);
    # e1 the largest p1: t3 (.6), t2 (.3). K = E slots, slot e = expert e.
    gate = identity_gate(make_spec("expert_choice", hidden=2, experts=2))
    r = gate(X_EC)
    r.check()
    assert r.capacity == 2 and r.expert_ids_TK.tolist() == [[0, 1]] * 4
    assert r.kept_TK.tolist() == [[True, False], [True, False], [False, True], [False, True]]
    assert close(r.weights_TK, [[0.9, 0], [0.8, 0], [0, 0.3], [0, 0.6]])
    assert r.slots_TK.tolist() == [[0, -1], [1, -1], [-1, 0], [-1, 1]]
    assert r.counts_E.tolist() == [2, 2]
    # cf 1.5 -> C = 3: e0 takes t0, t1, t2; e1 takes t3, t2, t1 -> t1 and t2 get both experts
    r = identity_gate(make_spec("expert_choice", hidden=2, experts=2, capacity_factor=1.5))(X_EC)
    assert r.kept_TK.tolist() == [[True, False], [True, True], [True, True], [False, True]]
    assert r.counts_E.tolist() == [3, 3] and set(r.aux_losses) == {"z_loss"}


# ---------------------------------------------------------------------- hand-worked: sigmoid_bias
X_SIG = torch.tensor([[3, 1, 1 / 3, 9], [1, 9, 3, 1 / 3]], dtype=F64).log()  # sigmoid(ln a) = a / (1 + a)


def test_sigmoid_bias_hand_worked():
    # s: t0 [.75, .5, .25, .9] -> top-2 (3, 0), weights .9/1.65 = 6/11, .75/1.65 = 5/11
    #    t1 [.5, .9, .75, .25] -> top-2 (1, 2), weights 6/11, 5/11
    gate = identity_gate(make_spec("sigmoid_bias", top_k=2, renormalize=False))
    r = gate(X_SIG)
    r.check()
    assert r.expert_ids_TK.tolist() == [[3, 0], [1, 2]]
    assert close(r.weights_TK, [[6 / 11, 5 / 11], [6 / 11, 5 / 11]])
    assert close(r.probs_TE, [[0.75, 0.5, 0.25, 0.9], [0.5, 0.9, 0.75, 0.25]])
    # bias +.5 on e1 changes the selection of t0 only (biased [.75, 1.0, .25, .9] -> (1, 3)); the weights
    # use the unbiased scores: .5/1.4 = 5/14, .9/1.4 = 9/14
    gate.expert_bias.copy_(torch.tensor([0, 0.5, 0, 0]))
    r = gate(X_SIG)
    assert r.expert_ids_TK.tolist() == [[1, 3], [1, 2]]
    assert close(r.weights_TK, [[5 / 14, 9 / 14], [6 / 11, 5 / 11]])
    # update: mean count 2 -> sign(2 - [3, 1, 2, 2]) = [-1, 1, 0, 0], times rate 0.1
    gate.update_bias(torch.tensor([3, 1, 2, 2]), rate=0.1)
    assert close(gate.expert_bias, [-0.1, 0.6, 0, 0], tol=1e-7)
    assert "expert_bias" in gate.state_dict() and "expert_bias" not in dict(gate.named_parameters())


# ------------------------------------------------------------------------------- capacity helpers
def test_expert_capacity():
    assert expert_capacity(4, 4, 2, 1.0, 1) == 2
    assert expert_capacity(8, 16, 1, 0.5, 4) == 4  # ceil(0.25) = 1, min_capacity 4
    assert expert_capacity(10, 11, 1, 1.1, 1) == 1  # exact: 1.1 * 10 / 11 = 1 (floating point: 2)
    assert expert_capacity(17, 4, 2, 1.25, 1) == 11  # ceil(10.625)
    assert expert_capacity(8, 4, 1, None, 1) is None
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(8, 4, 1, 0.0, 1)


def test_drop_policy_errors():
    with pytest.raises(ValueError, match="drop_policy: must be one of position, probability, deepspeed"):
        TopKGate(make_spec(), drop_policy="random")
    ids = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="drop_policy must be one of"):
        drop_to_capacity(ids, torch.ones(2, 1), torch.ones(2, 1, dtype=torch.bool), 1, 1, "lifo")


def test_constructor_and_input_errors():
    with pytest.raises(ValueError, match="top_k: the switch gate is top-1"):
        SwitchGate(make_spec(top_k=2))
    with pytest.raises(ValueError, match="top_k: the gshard gate is top-2"):
        GShardGate(make_spec(top_k=1))
    with pytest.raises(ValueError, match=r"x_TD: expected shape \[tokens, 4\]"):
        build_gate(make_spec())(torch.randn(2, 3, 4))


def test_combine_tensor_dropless_uses_max_count():
    r = identity_gate(make_spec(top_k=2))(X4)
    comb = routing_to_combine_tensor(r)
    assert comb.shape == (4, 4, 3)  # max count: e0 is asked by 3 tokens
    assert close(comb.sum(dim=(1, 2)), r.weights_TK.sum(dim=1))


# ------------------------------------------------------------------ invariants over many shapes
def _spec_for(gate: str, E: int, k: int, cf, policy: str, renormalize: bool) -> ModelSpec:
    groups = 2 if gate == "sam" and E % 2 == 0 and k <= E // 2 else 1
    return make_spec(
        gate, hidden=8, experts=E, top_k=k, capacity_factor=cf, drop_policy=policy,
        renormalize=renormalize, expert_groups=groups, vocab=32, min_capacity=2,
    )


def _k_for(gate: str, E: int, k: int) -> int:
    if gate == "switch":
        return 1
    if gate == "gshard":
        return 2
    if gate == "ktop1":
        return max(d for d in range(1, k + 1) if E % d == 0)
    return k


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    gate=st.sampled_from(GATE_NAMES),
    E=st.sampled_from([2, 3, 4, 8, 16]),
    k=st.integers(1, 3),
    t_mult=st.integers(1, 12),
    cf=st.sampled_from([None, 0.5, 1.0, 1.25, 2.0]),
    policy=st.sampled_from(["position", "probability"]),
    renormalize=st.booleans(),
    train=st.booleans(),
    seed=st.integers(0, 3),
)
def test_routing_invariants(gate, E, k, t_mult, cf, policy, renormalize, train, seed):
    k = min(_k_for(gate, E, k), E)
    T = t_mult * E  # a multiple of E keeps BASE's T * k / E integral
    spec = _spec_for(gate, E, k, cf, policy, renormalize)
    torch.manual_seed(seed)
    g = build_gate(spec).train(train)
    x = torch.randn(T, 8)
    r = g(x, torch.randint(0, 32, (T,)))
    r.check()
    K = r.expert_ids_TK.shape[1]
    assert K == (E if gate == "expert_choice" else k)
    assert int(r.counts_E.sum()) == T * K - r.dropped
    assert r.probs_TE.shape == (T, E) and bool(torch.isfinite(r.weights_TK).all())
    assert bool((r.weights_TK >= 0).all())
    if r.capacity is not None:
        assert r.slots_TK is not None and int(r.counts_E.max()) <= r.capacity
        if gate not in ("base", "expert_choice"):
            assert r.capacity == max(2, math.ceil(cf * T * k / E))
    elif gate not in ("expert_choice",):
        assert r.dropped == 0
    if gate == "base" and train:
        assert r.counts_E.tolist() == [T * k // E] * E
    if gate == "expert_choice":
        C = min(T, max(2, math.ceil((cf or 1.0) * T * k / E)))
        assert r.counts_E.tolist() == [C] * E
    if g.renormalize:
        sums = r.weights_TK.sum(dim=1)[r.kept_TK.any(dim=1)]
        assert close(sums, torch.ones_like(sums), tol=1e-5)
    for name, loss in r.aux_losses.items():
        assert loss.dim() == 0 and bool(torch.isfinite(loss)), name


# --------------------------------------------------------------------- gradients, dtypes, params
def _grad_spec(gate: str) -> ModelSpec:
    k = {"switch": 1, "base": 1, "expert_choice": 1}.get(gate, 2)
    groups = 2 if gate == "sam" else 1
    return make_spec(gate, hidden=8, experts=4, top_k=k, capacity_factor=1.0, expert_groups=groups, renormalize=False)


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_weights_and_aux_losses_have_gradients(gate):
    torch.manual_seed(0)
    g = build_gate(_grad_spec(gate)).train()
    x = torch.randn(16, 8, requires_grad=True)
    r = g(x, torch.randint(0, 16, (16,)))
    if gate == "hash":
        assert not r.weights_TK.requires_grad and r.aux_losses == {}
        return
    coef = torch.randn_like(r.weights_TK)  # a random combination: renormalised weights sum to 1
    (gw,) = torch.autograd.grad((r.weights_TK * coef).sum(), g.router.weight, retain_graph=True)
    assert bool(torch.isfinite(gw).all()) and float(gw.abs().sum()) > 0
    assert set(r.aux_losses) >= {"z_loss"}
    for name, loss in r.aux_losses.items():
        (gl,) = torch.autograd.grad(loss, g.router.weight, retain_graph=True)
        assert bool(torch.isfinite(gl).all()) and float(gl.abs().sum()) > 0, name
    (gx,) = torch.autograd.grad((r.weights_TK * coef).sum(), x)
    assert bool(torch.isfinite(gx).all())


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_bf16_and_fp64_inputs(gate):
    spec = _grad_spec(gate)
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    tok = torch.randint(0, 16, (16,))
    g = build_gate(spec).eval()
    r32 = g(x, tok)
    r16 = copy.deepcopy(g).to(torch.bfloat16)(x.bfloat16(), tok)  # bf16 weights and input, fp32 logits
    r16.check()
    assert r16.weights_TK.dtype == torch.float32 and r16.probs_TE.dtype == torch.float32
    r64 = copy.deepcopy(g).to(torch.float64)(x.double(), tok)
    r64.check()
    assert r64.weights_TK.dtype == torch.float64
    assert torch.equal(r64.expert_ids_TK, r32.expert_ids_TK)


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_deterministic_given_the_torch_seed(gate):
    spec = _grad_spec(gate)
    torch.manual_seed(0)
    g = build_gate(spec, **({"random_routing": True} if gate == "gshard" else {})).train()
    x, tok = torch.randn(32, 8, dtype=F64), torch.randint(0, 16, (32,))
    g = g.double()
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        outs.append(g(x, tok))
    a, b = outs
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK) and torch.equal(a.kept_TK, b.kept_TK)
    assert torch.equal(a.weights_TK, b.weights_TK)


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_parameter_count_matches_sizing(gate):
    spec = _grad_spec(gate)
    g = build_gate(spec)
    assert sum(p.numel() for p in g.parameters()) == router_params(spec)
    if gate != "hash":
        assert g.router.weight.shape == (spec.experts, spec.hidden) and g.router.bias is None


def test_registry_covers_every_spec_gate():
    assert set(GATES) == set(GATE_NAMES)
    for name, cls in GATES.items():
        assert cls.name == name
    assert isinstance(build_gate(make_spec("base")), BaseGate)
    assert isinstance(build_gate(make_spec("sigmoid_bias")), SigmoidBiasGate)
