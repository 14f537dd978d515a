"""Spec validation: clear messages naming the field, YAML round trips, random specs never crash."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semoe import (
    CLUSTER_PRESETS,
    MODEL_PRESETS,
    PLAN_PRESETS,
    ClusterSpec,
    ModelSpec,
    ParallelPlan,
    Run,
    SpecError,
    Workload,
    cluster_preset,
    model_preset,
    plan_preset,
)

TINY = dict(layers=2, hidden=64, heads=4, vocab=256, ffn=128, experts=4, top_k=2)


def _model(**kw):
    return ModelSpec(**{**TINY, **kw})


INVALID_MODELS = [
    (dict(layers=0), r"ModelSpec.layers: layers \(0\) must be > 0"),
    (dict(hidden=-8), r"ModelSpec.hidden: hidden \(-8\) must be > 0"),
    (dict(hidden=65), r"ModelSpec.heads: hidden \(65\) must be divisible by heads \(4\)"),
    (dict(kv_heads=3), r"ModelSpec.kv_heads: heads \(4\) must be divisible by kv_heads \(3\)"),
    (dict(top_k=5), r"ModelSpec.top_k: top_k \(5\) must be <= experts \(4\)"),
    (dict(experts=0), r"ModelSpec.experts: experts \(0\) must be > 0"),
    (dict(capacity_factor=0.0), r"ModelSpec.capacity_factor: capacity_factor \(0.0\) must be > 0"),
    (dict(capacity_factor=-1), r"ModelSpec.capacity_factor: capacity_factor \(-1.0\) must be > 0"),
    (dict(gate="magic"), r"ModelSpec.gate: 'magic' is not one of 'topk'"),
    (dict(activation="relu"), r"ModelSpec.activation: 'relu' is not one of 'gelu', 'swiglu'"),
    (dict(dtype="int8"), r"ModelSpec.dtype: 'int8' is not one of"),
    (dict(layers=2.5), r"ModelSpec.layers: expected an integer, got float 2.5"),
    (dict(layers=True), r"ModelSpec.layers: expected an integer, got bool True"),
    (dict(hidden="64"), r"ModelSpec.hidden: expected an integer, got str '64'"),
    (dict(bias="yes"), r"ModelSpec.bias: expected true/false, got str 'yes'"),
    (dict(gate="switch", top_k=2), r"ModelSpec.top_k: the switch gate is top-1, got top_k \(2\)"),
    (dict(gate="gshard", top_k=1), r"ModelSpec.top_k: the gshard gate is top-2, got top_k \(1\)"),
    (dict(gate="ktop1", experts=6, top_k=4), r"ModelSpec.top_k: ktop1 needs experts \(6\) divisible by top_k \(4\)"),
    (dict(expert_groups=3), r"ModelSpec.expert_groups: experts \(4\) must be divisible by expert_groups \(3\)"),
    (dict(gate="sam", expert_groups=4), r"ModelSpec.top_k: sam picks top_k \(2\) inside one group of 1 experts"),
    (dict(moe_every=3), r"ModelSpec.moe_every: moe_every \(3\) must be <= layers \(2\)"),
    (dict(moe_every=-1), r"ModelSpec.moe_every: moe_every \(-1\) must be >= 0"),
    (dict(aux_loss_coef=float("nan")), r"ModelSpec.aux_loss_coef: expected a finite number"),
    (dict(position="rope", hidden=12, heads=4), r"ModelSpec.position: rope needs an even head dim, got 3"),
    (dict(drop_policy="random"), r"ModelSpec.drop_policy: 'random' is not one of 'position', 'probability', 'deepspeed'"),
]


@pytest.mark.parametrize("changes,message", INVALID_MODELS)
def test_invalid_model_specs_name_field_and_rule(changes, message):
    with pytest.raises(SpecError, match=message):
        _model(**changes)


def _cluster(**kw):
    return cluster_preset("dgx-a100-80g", 2).replace(**kw)


INVALID_OTHERS = [
    (lambda: _cluster(nodes=0), r"ClusterSpec.nodes: nodes \(0\) must be > 0"),
    (lambda: _cluster(spine_oversubscription=0.5), r"ClusterSpec.spine_oversubscription: .* must be >= 1"),
    (lambda: _cluster(nics_per_node=3), r"ClusterSpec.nics_per_node: gpus_per_node \(8\) must be divisible by nics_per_node \(3\)"),
    (lambda: _cluster(nics_per_node=16), r"ClusterSpec.nics_per_node: nics_per_node \(16\) must be <= gpus_per_node \(8\)"),
    (lambda: _cluster(nics_per_node=0), r"ClusterSpec.nics_per_node: 2 nodes need nics_per_node >= 1"),
    (lambda: _cluster(nvlink=None), r"ClusterSpec.nvlink: a node of 8 GPUs needs an nvlink link"),
    (lambda: ClusterSpec.from_dict({**_cluster().to_dict(), "pcie": {"bandwidth_GBps": -1}}),
     r"ClusterSpec.pcie.LinkSpec.bandwidth_GBps: bandwidth_GBps \(-1.0\) must be > 0"),
    (lambda: ParallelPlan(data_parallel=8, expert_parallel=3), r"ParallelPlan.expert_parallel: data_parallel \(8\) must be divisible by expert_parallel \(3\)"),
    (lambda: ParallelPlan(data_parallel=8, gpus_per_node=3), r"ParallelPlan.gpus_per_node: data_parallel \(8\) must be divisible by gpus_per_node \(3\)"),
    (lambda: ParallelPlan(zero_stage=4), r"ParallelPlan.zero_stage: 4 is not one of 0, 1, 2, 3"),
    (lambda: ParallelPlan(alltoall="ring"), r"ParallelPlan.alltoall: 'ring' is not one of 'flat', 'hetu', 'rail'"),
    (lambda: ParallelPlan(fusion_bucket_bytes=-1), r"ParallelPlan.fusion_bucket_bytes: fusion_bucket_bytes \(-1\) must be >= 0"),
    (lambda: ParallelPlan(cpu_cache_experts=2), r"ParallelPlan.cpu_cache_experts: a CPU expert cache needs expert states offloaded"),
    (lambda: ParallelPlan.from_dict({"offload": {"dense_params": "ssd"}}), r"ParallelPlan.offload.OffloadPlacement.dense_params: dense parameters are used every step"),
    (lambda: Workload(seq_len=0), r"Workload.seq_len: seq_len \(0\) must be > 0"),
    (lambda: Workload(routing="histogram"), r"Workload.expert_histogram: routing 'histogram' needs expert_histogram"),
    (lambda: Workload(routing="histogram", expert_histogram=[1, -1]), r"Workload.expert_histogram: expert_histogram must be >= 0"),
    (lambda: Workload(expert_histogram=[1.0, 2.0]), r"Workload.expert_histogram: expert_histogram is only used with routing 'histogram'"),
    (lambda: Run(model=_model(experts=6, top_k=1), cluster=cluster_preset("dgx-a100-80g"), plan=ParallelPlan(data_parallel=8, expert_parallel=4)),
     r"Run.plan: experts \(6\) must be divisible by expert_parallel \(4\)"),
    (lambda: Run(model=_model(), cluster=cluster_preset("dgx-a100-80g"), plan=ParallelPlan(data_parallel=16, expert_parallel=4)),
     r"Run.plan: data_parallel \(16\) must equal the cluster's GPUs \(nodes 1 x gpus_per_node 8 = 8\)"),
    (lambda: Run(model=_model(max_seq=128), cluster=cluster_preset("h100-single"), plan=ParallelPlan(), workload=Workload(seq_len=256)),
     r"Run.workload: seq_len \+ gen_len \(256\) must be <= max_seq \(128\)"),
    (lambda: cluster_preset("tpu-pod"), r"unknown cluster preset 'tpu-pod'; choose from: dgx-a100-40g"),
    (lambda: cluster_preset("dgx-h100", nodes=0), r"ClusterSpec.nodes: nodes \(0\) must be an integer >= 1"),
    (lambda: model_preset("gpt-5"), r"unknown model preset 'gpt-5'"),
    (lambda: plan_preset("megatron"), r"unknown plan preset 'megatron'"),
]


@pytest.mark.parametrize("make,message", INVALID_OTHERS)
def test_invalid_cluster_plan_workload_run(make, message):
    with pytest.raises(SpecError, match=message):
        make()


def test_specs_are_frozen_and_keyword_only():
    m = _model()
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.layers = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        ModelSpec(2, 64, 4)  # type: ignore[misc]


def test_int_is_accepted_for_float_fields_and_stored_as_float():
    m = _model(capacity_factor=1)
    assert m.capacity_factor == 1.0 and isinstance(m.capacity_factor, float)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_model_presets_round_trip_yaml(name, tmp_path):
    m = model_preset(name)
    assert ModelSpec.from_yaml(m.to_yaml()) == m
    path = tmp_path / "m.yaml"
    m.to_yaml(path)
    assert ModelSpec.from_yaml(path) == m
    assert ModelSpec.from_yaml(str(path)) == m


@pytest.mark.parametrize("name", sorted(CLUSTER_PRESETS))
def test_cluster_presets_round_trip_and_node_count(name):
    c = cluster_preset(name, 1)
    assert ClusterSpec.from_yaml(c.to_yaml()) == c
    if c.gpus_per_node > 1:
        c4 = cluster_preset(name, 4)
        assert c4.nodes == 4 and c4.world_size == 4 * c.gpus_per_node


@pytest.mark.parametrize("name", sorted(PLAN_PRESETS))
def test_plan_presets_and_run_round_trip(name):
    p = plan_preset(name, 8, 8)
    assert ParallelPlan.from_yaml(p.to_yaml()) == p
    run = Run(model=model_preset("paper-13.9b"), cluster=cluster_preset("dgx-a100-80g"), plan=p)
    assert Run.from_yaml(run.to_yaml()) == run


def test_yaml_unknown_key_missing_key_bad_yaml_missing_file(tmp_path):
    with pytest.raises(SpecError, match=r"ModelSpec: unknown key\(s\) hiden; allowed: "):
        ModelSpec.from_yaml("layers: 2\nhiden: 64\n")
    with pytest.raises(SpecError, match=r"ModelSpec: missing required key\(s\) hidden, heads"):
        ModelSpec.from_yaml("layers: 2\n")
    with pytest.raises(SpecError, match=r"ModelSpec: invalid YAML"):
        ModelSpec.from_yaml("layers: [2\n")
    with pytest.raises(SpecError, match=r"ModelSpec: expected a mapping, got list"):
        ModelSpec.from_yaml("- 1\n- 2\n")
    with pytest.raises(SpecError, match=r"ModelSpec: file not found: .*nope.yaml"):
        ModelSpec.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match=r"Run.cluster: expected a mapping for ClusterSpec, got int"):
        Run.from_dict({"model": TINY, "cluster": 3, "plan": {}})


def test_yaml_write_is_atomic_no_temp_left(tmp_path):
    _model().to_yaml(tmp_path / "a.yaml")
    assert [p.name for p in tmp_path.iterdir()] == ["a.yaml"]


def test_semoe_imports_without_torch():
    code = "import sys, semoe, semoe.sizing, semoe.trace; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------- random specs: validate or SpecError
_values = st.one_of(
    st.integers(-3, 4096),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=6),
    st.sampled_from(["topk", "switch", "gshard", "ktop1", "sam", "base", "gelu", "swiglu", "rope", "fp32"]),
    st.lists(st.integers(-1, 4), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _random_dict(cls):
    keys = [f.name for f in dataclasses.fields(cls)] + ["bogus"]
    return st.dictionaries(st.sampled_from(keys), _values, max_size=len(keys))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(sorted(MODEL_PRESETS)), changes=_random_dict(ModelSpec))
def test_random_model_specs_validate_or_raise_spec_error(base, changes):
    data = {**model_preset(base).to_dict(), **changes}
    try:
        m = ModelSpec.from_dict(data)
    except SpecError:
        return
    assert ModelSpec.from_yaml(m.to_yaml()) == m


@settings(max_examples=200, deadline=None)
@given(
    cls=st.sampled_from([ParallelPlan, Workload, ClusterSpec]),
    changes=st.data(),
)
def test_random_other_specs_validate_or_raise_spec_error(cls, changes):
    base = {ParallelPlan: ParallelPlan(), Workload: Workload(), ClusterSpec: cluster_preset("dgx-h100", 2)}[cls]
    data = {**base.to_dict(), **changes.draw(_random_dict(cls))}
    try:
        spec = cls.from_dict(data)
    except SpecError:
        return
    assert cls.from_yaml(spec.to_yaml()) == spec
