"""Network backends behind one narrow interface (`base.Network`): analytic alpha-beta and max-min flow."""

from simulator.network.analytic import AnalyticNetwork
from simulator.network.base import Network
from simulator.network.flow import FlowNetwork

BACKENDS = {"analytic": AnalyticNetwork, "flow": FlowNetwork}


def make_network(name: str, env, topo) -> Network:
    if name not in BACKENDS:
        from semoe import SpecError

        raise SpecError(f"backend: unknown network backend {name!r}; choose from: {', '.join(BACKENDS)}")
    return BACKENDS[name](env, topo)


__all__ = ["AnalyticNetwork", "BACKENDS", "FlowNetwork", "Network", "make_network"]
