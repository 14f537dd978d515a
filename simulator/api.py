"""One call from specs to results: ``simulate(run, backend) -> (sim, summary)``."""

from __future__ import annotations

from semoe import Run, SpecError
from simulator.cost import Profile
from simulator.engine import Sim
from simulator.workload.training import TrainingIteration


def simulate(run: Run, backend: str = "analytic", profile: Profile | None = None, trace: bool = True):
    if run.workload.kind != "train":
        raise SpecError("Workload.kind: only 'train' is simulated so far (inference is not implemented yet)")
    sim = Sim(run.cluster, backend=backend, seed=run.workload.seed, profile=profile, trace=trace)
    summary = TrainingIteration(run, sim).run()
    return sim, summary
