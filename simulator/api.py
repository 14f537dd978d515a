"""One call from specs to results: ``simulate(run, backend) -> (sim, summary)``."""

from __future__ import annotations

from semoe import Run, SpecError
from simulator.cost import Profile
from simulator.engine import Sim
from simulator.workload.training import TrainingIteration


def simulate(run: Run, backend: str = "analytic", profile: Profile | str | None = "auto", trace: bool = True):
    if run.workload.kind != "train":
        raise SpecError("Workload.kind: simulate() runs training; inference on one GPU is "
                        "simulator.workload.inference.simulate_inference (semoe simulate --kind infer)")
    sim = Sim(run.cluster, backend=backend, seed=run.workload.seed, profile=profile, trace=trace)
    summary = TrainingIteration(run, sim).run()
    return sim, summary
