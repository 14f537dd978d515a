"""The expert-aware decode's host slow-down at the run's widths (issue 7), from the decode probe.

The inference workload prices a pass's host time from the bench's host probe: the engine's own passes at tiny
widths, where a pass's wall time is the host's (`inference_host.HostProbe`). The decode probe
(`simulator.workload.inference_decodeprobe`, run 48b0a82 in ``results/bench/infer_decodeprobe``, apart from every
bench run) times the same expert-aware decode at the run's widths and at the tiny widths: outside the expert copies
the run's block takes ~1.5x the tiny block's time, spread over every host span of the block (its README: the
device is never what the host waits for outside the copies), growing with the block's copies. This module turns
that into a host factor per block: ``1 + a + b x copy_s`` (``copy_s``: the expert copies' seconds of the block,
bytes / the copies' bandwidth), least squares over the probe's ``expert_nopred`` batches of its plain (not
instrumented) passes: non-copy seconds per block at the run's widths = pass seconds per block - copied bytes per
block / the probe's measured copy bandwidth; over the tiny widths' pass seconds per block (their copies are tiny).

A what-if of `simulator.validate_infer` (``--after-copy``; `InferConfig.host_after_copy`), checked on the bench runs
(all held out: none of them went into the calibration) before it may become the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE_DIR = ROOT / "results" / "bench" / "infer_decodeprobe"


@dataclass(frozen=True)
class AfterCopy:
    """Host factor ``1 + a + b x copy_s`` of an expert-aware decode block; the probe points it was fitted to
    (batch, copy seconds per block, run / tiny non-copy ratio) and where they came from."""

    a: float
    b: float
    points: tuple
    source: str

    def factor(self, copy_s: float) -> float:
        return 1.0 + self.a + self.b * max(0.0, copy_s)

    def note(self) -> str:
        pts = ", ".join(f"B{b}: {1e3 * c:.1f} ms -> x{r:.2f}" for b, c, r in self.points)
        return (f"host x (1 + {self.a:.3f} + {self.b:.2f}/s x the block's copy seconds) at the run's widths, from "
                f"{self.source} ({pts})")


def calibrate(probe_dir: Path | None = None, expert_bytes: float = 352321536.0, mode: str = "expert_nopred") -> AfterCopy:
    """`AfterCopy` from the decode probe's ``decode_passes.csv`` and ``decode_timeline.csv`` (module doc);
    ``expert_bytes``: one expert's bytes in the probe's model (Mixtral-8x7B bf16)."""
    import numpy as np
    import pandas as pd

    d = Path(probe_dir or PROBE_DIR)
    passes, tl = d / "decode_passes.csv", d / "decode_timeline.csv"
    for f in (passes, tl):
        if not f.is_file():
            raise FileNotFoundError(f"after-copy calibration: {f} not found")
    p = pd.read_csv(passes)
    t = pd.read_csv(tl)
    blocks = int(t["block"].max()) + 1
    cp = t[(t["width"] == "run") & (t["resource"] == "pcie_h2d")]
    bw = float(cp["bytes"].sum() / (cp["end_s"] - cp["start_s"]).sum())
    g = p[p["mode"] == mode].groupby(["width", "batch"])[["steps", "plain_ms_per_step", "plain_experts_copied"]].mean()
    pts = []
    for B in sorted(set(g.loc["run"].index) & set(g.loc["tiny"].index)):
        run, tiny = g.loc[("run", B)], g.loc[("tiny", B)]
        copy_s = run["plain_experts_copied"] * expert_bytes / bw / (run["steps"] * blocks)
        non_copy = run["plain_ms_per_step"] / 1e3 / blocks - copy_s
        pts.append((int(B), float(copy_s), float(non_copy / (tiny["plain_ms_per_step"] / 1e3 / blocks))))
    if len(pts) < 2:
        raise ValueError(f"after-copy calibration: fewer than 2 batches of {mode} at both widths in {passes}")
    x = np.array([c for _, c, _ in pts])
    y = np.array([r - 1.0 for _, _, r in pts])
    b, a = np.polyfit(x, y, 1)
    return AfterCopy(float(max(0.0, a)), float(max(0.0, b)), tuple(pts), f"the decode probe {d.name} ({mode}, plain passes)")
