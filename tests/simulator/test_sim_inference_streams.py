"""The inference workload's modules: a simulated CUDA stream (`inference_streams.Stream`) runs its items in order,
each after its wait events and no earlier than its issue end; `simulator.workload.inference` re-exports the names
other modules import from it, as the objects of the modules that define them."""

from __future__ import annotations

import simpy

from simulator.workload import (
    inference,
    inference_config,
    inference_costs,
    inference_memory,
    inference_pass,
    inference_pool,
    inference_result,
    inference_streams,
)


def test_stream_order_waits_and_issue_end():
    env = simpy.Environment()
    rows = []
    s = inference_streams.Stream(env, "compute", lambda *row: rows.append(row))
    gate = env.event()

    def open_gate():
        yield env.timeout(2.0)
        gate.succeed()

    env.process(open_gate())
    s.submit(1.0, "a", 0)
    s.submit(0.5, "b", 1, waits=(gate, None), min_end=3.0)  # waits for the gate, ends no earlier than 3
    last = s.submit(0.25, "c", 2, nbytes=8.0)
    assert s.last is last
    env.run()
    assert rows == [(0, "a", 0.0, 1.0, 0.0, "compute"), (1, "b", 2.0, 3.0, 0.0, "compute"),
                    (2, "c", 3.0, 3.25, 8.0, "compute")]
    assert s.busy == 1.0 + 1.0 + 0.25  # b holds the stream from its start to its issue end
    assert last.processed


def test_inference_reexports_the_defining_modules_objects():
    homes = {
        inference_config: ("MODES", "InferConfig"),
        inference_pool: ("ExpertCache", "replay_pool_trace", "expected_distinct_experts", "sample_topk", "mispredict"),
        inference_result: ("InferenceResult",),
        inference_costs: ("TORCH_PERMUTE_GBPS", "BlockCosts", "FixedCosts"),
        inference_memory: ("MemoryPlan", "activation_estimate_bytes", "kv_cache_bytes", "plan_memory"),
    }
    for mod, names in homes.items():
        for name in names:
            assert getattr(inference, name) is getattr(mod, name), name
    run = inference.InferenceRun
    assert issubclass(run, inference_pass.InferencePassMixin) and issubclass(run, inference_streams.InferenceStreamsMixin)
    assert run.probe_pass_kernels is inference_pass.InferencePassMixin.probe_pass_kernels
    assert callable(inference.simulate_inference)
