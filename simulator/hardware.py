"""Hardware constants of the simulator that `semoe.ClusterSpec` does not carry: NCCL-style protocols and
the achievable fraction of each link's raw bandwidth.

Mechanism (no constant here is fitted to the all-reduce numbers the simulator is validated against):

* **Protocols** (NCCL 2.10 ``src/graph/tuning.cc``): each collective call picks the protocol that is
  fastest for its size, as NCCL's tuner does. A protocol has a base latency paid once per call
  (kernel launch + setup), a per-hop latency paid on every step of the algorithm, and a payload
  efficiency (bytes of data per byte on the wire):

  ======== ============ ===================== ==========================================
  protocol base (ring)  per-hop (x link lat)  payload efficiency
  ======== ============ ===================== ==========================================
  LL       6.6 us       0.6/3.4 = 0.18        0.5   (4-byte flag per 4 bytes of data)
  LL128    14.0 us      1.25/3.4 = 0.37       120/128 (8-byte flag per 128-byte line)
  Simple   8.4 us       1.0                   1.0   (flag per 512 KiB step)
  ======== ============ ===================== ==========================================

  The per-hop latency of a link is ``LinkSpec.latency_s`` of the cluster (Simple protocol); LL and
  LL128 scale it by NCCL's NVLink hop-latency ratios (0.6, 1.25, 3.4 us). The size-dependent
  efficiency curve of a collective therefore is ``bytes / (min_p base_p + steps*hop_p + wire/(B*eta_p))``
  divided by the link bandwidth: small messages are latency-bound (LL wins), large ones approach
  ``B`` (Simple wins).

* **NVLink achievable bandwidth** ``B``: raw per-GPU NVLink bandwidth (``ClusterSpec.nvlink``) times
  the achievable fraction measured on H100 point-to-point (HARDWARE.md: ~380 GB/s one way of 450 GB/s
  = 0.844; NVLink3 and NVLink4 use the same packet format), and for Ampere at most NCCL's own model
  cap of 235 GB/s bus bandwidth (NCCL 2.10 tuning model, quoted in HARDWARE.md: ``if (compCap ==
  80) busBw = min(busBw, 235)``). The 8 x A100 all-reduce figures of HARDWARE.md (202 / 229 GB/s)
  are *predicted* from these, not used.
* NIC and PCIe values in the presets are already "usable" bandwidths: efficiency 1.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9

NVLINK_ACHIEVABLE_FRACTION = 380.0 / 450.0  # HARDWARE.md: H100 NVLink p2p ~380 GB/s one way of 450
# NCCL tuning-model bus bandwidth caps per GPU family (NCCL 2.10 tuning.cc, HARDWARE.md)
NCCL_BUSBW_CAP_GBps: dict[str, float] = {"A100": 235.0}


@dataclass(frozen=True, slots=True)
class Protocol:
    name: str
    base_latency_s: float  # once per collective call
    hop_latency_scale: float  # x link latency, per algorithm step
    efficiency: float  # payload bytes per wire byte


LL = Protocol("LL", 6.6e-6, 0.6 / 3.4, 0.5)
LL128 = Protocol("LL128", 14.0e-6, 1.25 / 3.4, 120.0 / 128.0)
SIMPLE = Protocol("Simple", 8.4e-6, 1.0, 1.0)
PROTOCOLS: tuple[Protocol, ...] = (LL, LL128, SIMPLE)
P2P = Protocol("p2p", 0.0, 1.0, 1.0)  # a bare send: only the link latency


def nvlink_effective_GBps(raw_GBps: float, gpu_name: str) -> float:
    """Achievable per-GPU NVLink bandwidth each way (see module docstring)."""
    bw = raw_GBps * NVLINK_ACHIEVABLE_FRACTION
    for family, cap in NCCL_BUSBW_CAP_GBps.items():
        if gpu_name.upper().startswith(family):
            bw = min(bw, cap)
    return bw
