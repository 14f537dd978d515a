"""Validation of the inference workload against the H100 measurements of ``reference/inference``.

``python -m simulator.validate_infer`` reads every row of ``results/bench/infer.csv``, simulates the
same configuration (model preset and block count, GPU budget, prompt / generation length, mode, K,
batch, the engine's memory plan batch as ``reference/inference/bench.py`` makes it) on the
``h100-single`` preset (PCIe 53.5 GB/s, the profile ``results/profiles/h100_80gb_hbm3.csv``) and
writes ``results/validation/infer.csv`` (``date,mode,batch,metric,measured,predicted,error,
within_10pct,kind,note``; ``error = predicted / measured - 1``) and ``results/validation/infer.png``.

Nothing here is fitted to the measured rows: the inputs are the model spec, the cluster preset (PCIe
bandwidth, GPU), the GPU kernel profile (including its ``host_op`` row: host seconds per eager kernel,
``CostModel.host_op_s``, else HARDWARE.md's ~8 us) and the kernel counts of the reference code
(``results/profiles/op_counts_cuda.csv`` measured on the H100, ``op_counts.csv`` from the CPU for paths not
measured there; ``python -m simulator.op_counts``). Rows the simulator does not
model (logit differences, token equality, the accelerate baseline) are listed with ``kind =
not_modelled`` and no prediction.

Which rows validate the simulator: the ``status`` column (`status`): ``validated`` rows only (a
prediction made without any input from the measured rows); ``input`` (the pinned H2D bandwidth, the
preset's), ``by_definition``, ``measurement_bug`` (run 1's resident decode, cuDNN SDPA re-planning;
the issue-11 run's first int8-fused ring decode, Triton autotuning in the timed region),
``superseded_code`` (host-bound rows of runs 1-2, whose engine issued another host program than the
counted one) and ``not_modelled`` rows are listed but validate nothing. Compiled rows: CUDA-graph decode
is the eager device time plus one graph launch per step; compiled prefill is not modelled.

Quantised experts (issue 11): modes ``ring_int8`` / ``ring_fp8`` (and ``ring_K<k>_int8``,
``expert_int8``, ``resident_fp8``...) are simulated with the quantised bytes per expert and the
reference's dequantisation into a workspace (`simulator.workload.inference_quant`); metrics
``speedup_vs_*`` compare with the simulated bf16 ring of the same batch. The workspace dequantisation
and the fused quantised GEMMs take the profile's ``dequant`` / ``qgemm_fwd`` rows when it has them
(``kernels/profile.py --sweeps infer``: the reference's own ``dequantize_into`` / ``quant_mm`` calls,
`simulator.workload.inference_profile`), else the analytic pass / assumed rate.

Host time of a run, when the run measured it (inputs of that run, like its pinned H2D bandwidth): its
``host_op_us`` row (host seconds per kernel of a tiny reference forward) replaces the profile's; its engine
host probe rows (``host_prefill_ms``, ``host_decode_ms_per_step`` and the copy calls of those passes, per
mode and batch, ``host_probe_moe_blocks``: ``reference/inference/bench.py`` ``host_probe``, the engine's own
passes on a model of the same family and block count at tiny widths) give the bf16 resident, ring and
expert-aware simulations of that run their host seconds per kernel for each code path
(`simulator.workload.inference_host.HostProbe`). Probe rows are listed with status ``input``; their
``predicted`` is the per-kernel model's value (counted kernels x ``host_op_us``), so their error shows what the
probe corrects. Expert-aware rows at a batch that falls back to the ring (``B = 16``: 16 tokens x top-2 touch
~all 8 experts) predict the bench's pool statistics as the engine keeps them: no fetches, 0.

Adjacent host probes (runs from 2026-11-24 ~12:00 on; ``reference/inference/bench.py`` ``HostProber.adjacent``):
the bench probes the code path of every timed row (its mode, phase and batch; ``ring_K<k>``: the ring with K =
k) right before and right after the row's timed passes (rows ``host_adj_prefill_ms_before`` / ``_after``,
``host_adj_decode_ms_per_step_before`` / ``_after``, ``host_adj_*_copies*``, status ``input``), because the
host's speed drifts within one run (the b238b9a run's probe decode steps of one program: 18-26 ms). The rule,
fixed before the first run that has them and not to be changed after seeing its errors:

* a row whose run has an adjacent probe of the row's own (mode, phase, batch) simulates that pass with it:
  host seconds per kernel = the mean of the before and after probe pass seconds / the counted kernels of
  the probe pass (its copy calls counted, `InferenceRun.probe_pass_kernels`), one point, no median over
  batches (`with_adjacent`); the phase it times is the metric's (``decode_*``: decode, else prefill);
* the passes the row does not time and the modes it has no adjacent probe for keep the run's once-per-run
  probe (the median rule of `HostProbe.rate`); the resident simulation inside the ring's
  ``bound_prefill_tokens_per_s`` and ``prefill_frac_of_bound`` rows takes the adjacent probe of the
  ``resident`` prefill row of the same batch (whose measured compute the bench's bound uses);
* runs without adjacent probe rows keep the once-per-run rule above; quantised and compiled rows take no
  engine probe (the probe runs bf16 eager).

Repeated rows (runs from 2026-11-24 ~13:00 on, the bench's ``--repeats``: each timed row measured R times
interleaved with its adjacent probe, probe / timed / probe / ... / timed / probe; such a row has
``host_adj_*_median`` rows). The rule, fixed before the
first run that has them and not to be changed after seeing its errors:

* the row's measured value is the bench's median over its R repeats (same metric names as single-pass runs);
  its host input is the median of the R + 1 adjacent probe passes of its (mode, phase, batch)
  (``host_adj_*_median``) in place of the mean of the before and after probes; everything else as above (a
  row with R = 1 has no ``_median`` row and keeps the before / after mean, the median of its two probes);
* the spread rows (``<metric>_min`` / ``<metric>_max`` of the timed repeats, ``<phase>_repeats``) are listed
  with kind ``spread`` and no prediction (status ``not_modelled``); the median row's note gives the repeats'
  min-max and whether the prediction lies inside it; ``host_adj_*_median`` / ``_min`` / ``_max`` rows are
  adjacent probe rows (status ``input``).

Pooled count rows (runs from 2026-11-24 ~15:40 on, the bench's ``pooled_rows``: the expert-aware pool's counts
summed over the row's R passes, each a fresh engine on other prompts, so R routings). The rule, fixed before the
first run that has them and not to be changed after seeing its errors:

* ``hit_rate_pooled``, ``prefetched_used_frac_pooled`` and ``decode_GB_copied_per_step_pooled`` are predicted
  by the simulator's pool pooled the same way, over `POOL_SEEDS` (32) simulated generates with routing seeds
  0 .. 31 (ratios of sums: sum of hits / sum of lookups, sum of used / sum of prefetched, copied GB over all
  decode steps; `pooled_prediction`); 32 seeds, not R, so the prediction is the expected pooled value and the
  row's own sampling noise is the measured side's alone; the note gives that noise, one simulated pass's sd over
  the seeds / sqrt(R) (R: the row's ``pool_passes``), and how many of them the measured value lies from the
  prediction; within 10% is judged as for every other row;
* ``pool_passes`` is listed with kind ``spread`` (not simulated); nopred ``prefetched_used_frac_pooled`` is
  ``by_definition`` (0), as the single-pass row is;
* the single-pass rows of earlier runs (``hit_rate``, ``prefetched_used_frac``, ``decode_GB_copied_per_step``:
  one pass of one routing) keep their meaning and their rule (one simulated pass, the default routing seed); the
  expert-aware decode throughput rows keep theirs (one simulated pass; the measured median over the R passes,
  now R routings).

Adjacent copy probes (runs from 2026-11-24 ~16:00 on; ``reference/inference/bench.py`` ``H2DProber``): next to
each host probe slot of a copy-bound row (ring prefill and decode, ``ring_K<k>``, expert-aware decode; probe,
timed, probe, ..., timed, probe) the bench times the pinned H2D bandwidth (2 copies of 1 GiB of a block's pinned
expert buffer, CUDA events), rows ``h2d_adj_<phase>_GBps_before`` / ``_after`` (the first and the last probe) and,
with R > 1, ``_median`` / ``_min`` / ``_max`` over all R + 1 probes (status ``input``), because the machine's copies
drift within one run (41ed3d6: three ring rows at 0.85 of the bound beside a normal run-level probe). The rule, fixed
before the first run that has them and not to be changed after seeing its errors:

* a row whose (mode, batch) has copy probes of the metric's phase (``decode_*``: decode, else prefill) simulates
  that pass with the cluster's PCIe bandwidth = the MEDIAN of its R + 1 copy probes (``_median``), or with R = 1
  the MEAN of its before and after probes, instead of the ``h100-single`` preset's 53.5 GB/s (`run_h2d`,
  `_h2d_used`); this is every throughput metric of the row's own simulation (``prefill_tokens_per_s``,
  ``prefill_ms_per_block``, ``prefill_frac_of_bound``'s simulated pass, ``decode_tokens_per_s``,
  ``decode_ms_per_step``) of ring, ``ring_K<k>`` and expert-aware rows (expert-aware B = 16 runs the ring);
* the bound (``bound_prefill_tokens_per_s`` and the numerator of ``prefill_frac_of_bound``) keeps the preset's
  bandwidth (the bench's bound takes the run-level ``h2d_pinned_GBps``, within ~1% of the preset); pool counts,
  bytes and memory rows do not depend on the bandwidth; the host input follows the adjacent host rule above;
* rows without copy probes (every run before it, quantised and compiled rows) keep the preset's bandwidth;
* a copy probe row's ``predicted`` is the preset's bandwidth, so its error shows the drift of the machine's copies;
  ``--no-copy-probes`` is the what-if without them (never for the committed table).

Decode routing persistence (issue 7, from 2026-11-24 ~15:10; `simulator.workload.inference_persist`): the
expert-aware simulation draws each decode step's routing independently; whether consecutive steps of a sequence
share experts is measured on ONE run's trace, the calibration run ``PERSIST_COMMIT`` (76200c0, its traced B = 1
pass: 48 consecutive step pairs, one token's top-2 per block), as ``q`` (`routing_persistence`: each expert of a
token repeats its previous step's with probability q; matched to the mean overlap of consecutive steps). The
held-out check (``--persist``):

* the expert-aware simulations (throughput and pool rows) of runs with pooled count rows (from 41ed3d6 on, R passes
  on other prompts each) take ``InferConfig.route_persist = q``: held out, apart from their repeat 0, which decodes
  the calibration pass's prompts with the same weights (the same routing);
* runs before them decode the calibration run's prompts with the same weights (the same routing as 76200c0's
  pass), so they keep independent draws and validate nothing new about it; the calibration run's pool rows are
  noted as such.

Result (2026-11-24 ~15:30): 76200c0 gives q = 0.064 (mean overlap 0.583 +- 0.078 experts against 0.500 for
independent draws: +1.1 se); the held-out traces of 41ed3d6 and 39db250 give q = 0.016 (+0.5 se). With q the pooled
expert_nopred B1 hit rate goes from -5.7% to +10.8% (both runs) and nothing else improves (the B4 / B8 hit-rate gap
is not in consecutive steps: every B4 / B8 hit is in decode step 1, the K blocks the prefill's ring left resident,
whose step-1 expert unions are larger in the traced passes, e.g. B4 blocks 0-1: 12-13 experts in every pass vs
10.9 expected). The consecutive-step persistence is rejected on held-out data, so the committed table keeps
independent draws (q = 0, the model before); ``--persist`` repeats the check. The bench's expert-aware prompts are
the same in every run (``expert_prompt_seed``, weights seed 0), so the pooled rows of different runs re-measure
the same routings: they are not independent samples of it.

An adjacent probe row's ``predicted`` is what the once-per-run probe gives for that pass (its rate of the code
path x the pass's counted kernels), so its error shows how far the host drifted from the run-level probe.

Host syncs of the resident prefill (from 2026-11-24 ~15:00, every run): the simulations of bf16 resident rows
with an engine probe (and the resident simulation inside the ring's bound) take `InferConfig.sync_split` from
the H100 sync probe (``results/bench/infer_syncprobe``, run b57d4eb, apart from every bench run;
`simulator.workload.inference_syncprobe.sync_shares`): each of the block's 4 host syncs costs its measured share
of the block's host seconds (the run's probe's) after the device reached it, the kernels the rest. The shares are
the probe's tiny-width spans, the seconds stay the run's; nothing of infer.csv goes in. ``--no-sync-split`` is
the what-if without it (the host seconds spread evenly over the kernels), never used for the committed table.

``--host-op-us X`` is a what-if (host seconds per kernel replaced, engine probes ignored), never used for the
committed table.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from functools import cache
from pathlib import Path

import pandas as pd

from semoe import cluster_preset
from semoe.io import atomic_write_text
from semoe.presets import model_preset
from semoe.sizing import expert_params
from simulator.workload.inference_host import (
    PROBE_BLOCKS_METRIC,
    PROBE_METRICS,
    HostProbe,
)

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ROOT / "results" / "bench" / "infer.csv"
OUT_CSV = ROOT / "results" / "validation" / "infer.csv"
OUT_PNG = ROOT / "results" / "validation" / "infer.png"
THROUGHPUT = ("prefill_tokens_per_s", "decode_tokens_per_s", "block_compute_ms", "bound_prefill_tokens_per_s",
              "prefill_ms_per_block", "decode_ms_per_step")
NOT_MODELLED = ("maxabs_logit_diff_vs_resident", "tokens_equal_resident", "speedup_vs_accelerate", "compile_s")
NOT_MODELLED_PREFIXES = ("logit_", "top1_agree", "tokens_equal", "maxabs_logit")
COMPILED = ("compiled", "ring_compiled")  # torch.compile runs: a compiled step's host program is not counted


def parse_config(config: str) -> dict:
    """'mixtral-8x7b-L8 bf16 budget=10GB P=256 G=8' -> preset, layers, budget bytes, P, G (``budget=K1``:
    no budget, ring slots K given)."""
    m = re.match(r"(?P<preset>.+?)-L(?P<layers>\d+) (?P<dtype>\w+) budget=(?:(?P<budget>[\d.]+)GB|K(?P<K>\d+)) "
                 r"P=(?P<P>\d+) G=(?P<G>\d+)", config)
    if m is None:
        raise ValueError(f"validate_infer: cannot parse config {config!r}")
    return {"preset": m["preset"], "layers": int(m["layers"]), "dtype": m["dtype"],
            "budget": float(m["budget"]) * 1e9 if m["budget"] else None, "slots": int(m["K"]) if m["K"] else None,
            "P": int(m["P"]), "G": int(m["G"])}


MODE_RE = re.compile(r"^(?P<base>ring|expert_nopred|expert|resident)(?:_K(?P<K>\d+))?(?:_(?P<quant>int8|fp8))?"
                     r"(?P<fused>_fused)?$")
DIAG = ROOT / "results" / "bench" / "infer_diag"


@cache
def predict_accuracy(diag: Path = DIAG) -> float:
    """The one-block-ahead predictor's accuracy, measured in the engine diagnostic (``results/bench/infer_diag``,
    `simulator.workload.inference_diag`: H100, the bench's model at 4 blocks, not a row of infer.csv): its
    ``expert`` (predicting) and ``expert_nopred`` runs at B = 1 decode the same prompts greedily with the
    same weights, so they route identically and the predicting run's extra copied bytes are its wasted
    prefetches; accuracy = 1 - wasted / prefetched (the prefetches' bytes from its timeline). 1.0 (a
    perfect predictor) when the diagnostic is absent."""
    try:
        steps = pd.read_csv(diag / "steps.csv")
        tl = pd.read_csv(diag / "timeline.csv")
    except FileNotFoundError:
        return 1.0
    b1 = steps[steps["batch"] == 1].set_index("case")["bytes_copied"]
    pre = float(tl.loc[(tl["case"] == "expert") & (tl["phase"] == "h2d_prefetch"), "bytes"].sum())
    if "expert" not in b1 or "expert_nopred" not in b1 or pre <= 0:
        return 1.0
    wasted = max(0.0, float(b1["expert"]) - float(b1["expert_nopred"]))
    return max(0.0, 1.0 - wasted / pre)


HOST_OP_S: float | None = None  # None: CostModel.host_op_s (the profile's host_op row, else 8 us); --host-op-us
# a run's own host probe (mode "-", microseconds per kernel of the reference's eager forward, measured in the
# bench run like h2d_pinned_GBps): a model input of that run's simulations, as the PCIe bandwidth is
RUN_HOST_METRIC = "host_op_us"
# the adjacent host probes (reference/inference/bench.py HostProber.adjacent): the engine probe of a timed row's
# (mode, phase, batch) right before and right after its timed passes (rule: module doc)
ADJ_PREFIX = "host_adj_"
ADJ_METRICS = {"prefill": ("host_adj_prefill_ms", "host_adj_prefill_copies"),
               "decode": ("host_adj_decode_ms_per_step", "host_adj_decode_copies_per_step")}
ADJ_WHEN = ("before", "after")
ADJ_MEDIAN = "median"  # repeated rows: the median of all the row's adjacent probes (its host input)
# the adjacent copy probes (reference/inference/bench.py H2DProber): the pinned H2D bandwidth next to each host probe
# of a copy-bound row (rule: module doc, "Adjacent copy probes")
H2D_PREFIX = "h2d_adj_"
USE_H2D = True  # False: --no-copy-probes what-if (the preset's PCIe for every row)
H2D_METRICS = {"prefill": "h2d_adj_prefill_GBps", "decode": "h2d_adj_decode_GBps"}
# the metrics whose simulated pass takes the row's copy probes (the bound's bandwidth stays the preset's)
H2D_THROUGHPUT = ("prefill_tokens_per_s", "prefill_ms_per_block", "prefill_frac_of_bound", "decode_tokens_per_s",
                  "decode_ms_per_step")
# the spread of a repeated row (bench --repeats): min / max of its timed repeats and the repeats run
SPREAD_SUFFIXES = ("_min", "_max")
REPEATS_SUFFIX = "_repeats"
# the run's engine host probe (reference/inference/bench.py host_probe): seconds and copy calls per pass of the
# engine's own code path at tiny widths, per mode and batch; the simulations of that run's bf16 rows take
# their host seconds per kernel from it (`simulator.workload.inference_host.HostProbe`)


def parse_mode(mode: str) -> tuple[str, int | None, str | None, str]:
    """'ring_K2' -> ('ring', 2, None, 'workspace'); 'ring_int8_fused' -> ('ring', None, 'int8', 'fused')."""
    m = MODE_RE.match(mode)
    if m is None:
        return mode, None, None, "workspace"
    return m["base"], int(m["K"]) if m["K"] else None, m["quant"], "fused" if m["fused"] else "workspace"


def _model(c: dict):
    return model_preset(c["preset"]).replace(layers=c["layers"], name=f"{c['preset']}-L{c['layers']}", dtype=c["dtype"])


@cache
def _sim(config: str, mode: str, batch: int, slots: int | None, plan_batch: int, predict: bool, budget: bool = True,
         quant: str | None = None, dequant: str = "workspace", launch_s: float | None = None, probe=None,
         seed: int | None = None, sync_split: tuple = (), pcie_GBps: float | None = None, persist: float = 0.0):
    """One simulated run of a row's configuration (``seed``: the routing seed, `semoe.Workload.seed`; None: the
    default workload's; ``pcie_GBps``: the pinned H2D bandwidth in place of the preset's, a row's adjacent copy
    probes (`run_h2d`); ``persist``: the decode routing's persistence, `InferConfig.route_persist`)."""
    from semoe import Workload
    from simulator.workload.inference import InferConfig, simulate_inference

    c = parse_config(config)
    model = _model(c)
    cfg = InferConfig(mode=mode, batch=batch, prompt_len=c["P"], gen_len=c["G"],
                      gpu_budget_bytes=c["budget"] if budget else None, slots=slots if slots else c["slots"],
                      plan_batch=plan_batch, predict=predict, quant=quant, dequant=dequant,
                      predict_accuracy=predict_accuracy() if predict else 1.0,
                      launch_s=HOST_OP_S if launch_s is None else launch_s,
                      host_probe=probe if HOST_OP_S is None else None,
                      sync_split=sync_split if HOST_OP_S is None and probe is not None else (),
                      route_persist=persist)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # roofline fallbacks are listed once by `predict_all`
        wl = None if seed is None else Workload(kind="infer", seq_len=c["P"], gen_len=c["G"], seed=seed)
        _, res = simulate_inference(model, _cluster(pcie_GBps), cfg, workload=wl, trace=False)
    return model, res


def _cluster(pcie_GBps: float | None = None):
    """The ``h100-single`` preset, its PCIe bandwidth replaced by ``pcie_GBps`` when given (a row's copy probes)."""
    c = cluster_preset("h100-single")
    if pcie_GBps is None:
        return c
    if not pcie_GBps > 0:
        raise ValueError(f"validate_infer: pcie_GBps must be > 0, got {pcie_GBps}")
    return c.replace(pcie=c.pcie.replace(bandwidth_GBps=float(pcie_GBps)))


SYNC_SPLIT = True  # False: --no-sync-split what-if (the probe's host seconds spread evenly over the kernels)


@cache
def _sync_split() -> tuple:
    """The resident prefill's host-sync shares (`simulator.workload.inference_syncprobe.sync_shares`: the H100
    sync probe b57d4eb at tiny widths), () under ``--no-sync-split``."""
    from simulator.workload.inference_syncprobe import sync_shares

    return sync_shares() if SYNC_SPLIT else ()


POOL_SEEDS = 32  # routing seeds of a pooled count row's prediction (`pooled_prediction`)
# the bench's expert-aware count rows pooled over the row's repeats (reference/inference/bench.py pooled_rows)
POOLED_SUFFIX = "_pooled"
POOLED_METRICS = tuple(m + POOLED_SUFFIX for m in ("hit_rate", "prefetched_used_frac", "decode_GB_copied_per_step"))
POOL_PASSES_METRIC = "pool_passes"


@cache
def pooled_prediction(config: str, batch: int, predict: bool, quant: str | None = None,
                      seeds: int = POOL_SEEDS, persist: float = 0.0) -> dict:
    """metric -> (pooled value, sd of one pass's value) of the expert-aware count rows: the simulator's pool over
    ``seeds`` generates with routing seeds 0 .. seeds - 1 (the row's configuration; counts do not depend on the
    host's speed, so the default host), pooled as the bench pools its repeats (ratios of sums:
    `POOLED_METRICS`); the sd over the seeds of the single-pass values gives the sampling noise of a pooled row
    of R passes, ~ sd / sqrt(R)."""
    import numpy as np

    c = parse_config(config)
    G = c["G"]
    tot = {"hits": 0, "misses": 0, "prefetched": 0, "used": 0, "fetch": 0.0}
    per: dict = {m: [] for m in POOLED_METRICS}
    for s in range(seeds):
        _, res = _sim(config, "expert", batch, None, batch, predict, quant=quant, seed=s, persist=persist)
        pre = res.prefetched if predict else 0
        used = res.prefetch_used if predict else 0
        for k, v in (("hits", res.hits), ("misses", res.misses), ("prefetched", pre), ("used", used),
                     ("fetch", res.fetch_bytes_decode)):
            tot[k] += v
        per["hit_rate" + POOLED_SUFFIX].append(res.hit_rate)
        per["prefetched_used_frac" + POOLED_SUFFIX].append(used / pre if pre else 0.0)
        per["decode_GB_copied_per_step" + POOLED_SUFFIX].append(res.fetch_bytes_decode / max(1, G - 1) / 1e9)
    pooled = {"hit_rate" + POOLED_SUFFIX: tot["hits"] / max(1, tot["hits"] + tot["misses"]),
              "prefetched_used_frac" + POOLED_SUFFIX: tot["used"] / tot["prefetched"] if tot["prefetched"] else 0.0,
              "decode_GB_copied_per_step" + POOLED_SUFFIX: tot["fetch"] / (seeds * max(1, G - 1)) / 1e9}
    return {m: (pooled[m], float(np.std(per[m], ddof=1)) if seeds > 1 else float("nan")) for m in POOLED_METRICS}


def _timing(metric: str, res, B: int, P: int, G: int, L: int):
    """Throughput / time metrics every mode reports, from one simulated run (None: not one of them)."""
    return {"prefill_tokens_per_s": res.prefill_tokens_per_s, "decode_tokens_per_s": res.decode_tokens_per_s,
            "prefill_ms_per_block": 1e3 * res.prefill_s / L,
            "decode_ms_per_step": 1e3 * res.decode_s / max(1, G - 1)}.get(metric)


def predict_row(r, bmax: int, predicting_runs: frozenset = frozenset(), host_s: float | None = None,
                probe=None, adj: dict | None = None, h2d: dict | None = None,
                persist: float = 0.0) -> tuple[float, str, str]:
    """(predicted value, kind, note) for one measured row. ``predicting_runs``: dates of the runs whose
    ``expert`` mode prefetched one block ahead (the bench wrote ``prefetched_used_frac`` rows; run 1 of
    2026-11-24 predates the predictor, so its ``expert`` rows ran without it). ``host_s``: the run's own
    host seconds per kernel (its ``host_op_us`` probe row, `RUN_HOST_METRIC`), else the profile's.
    ``probe``: the run's engine host probe (`HostProbe`, its ``host_*`` rows): bf16 resident, ring and
    expert-aware rows take their host seconds per kernel from it. ``adj``: the run's adjacent probes
    (`run_adjacent`): where the row's (mode, batch) has one, it replaces ``probe`` for that pass
    (`with_adjacent`, the rule in the module doc). ``h2d``: the run's adjacent copy probes (`run_h2d`): where the
    row's (mode, phase, batch) has them, its simulated pass takes their bandwidth (`_h2d_used`). ``persist``: the
    decode routing's persistence of the expert-aware simulations (`routing_persistence`; 0: independent draws)."""
    mode, B, metric, config = r["mode"], int(r["batch"]), r["metric"], r["config"]
    c = parse_config(config)
    P, G = c["P"], c["G"]
    nan = float("nan")
    if metric in NOT_MODELLED or metric.startswith(NOT_MODELLED_PREFIXES) or metric.endswith("_vs_eager"):
        return nan, "not_modelled", "correctness / quality / baseline row (not simulated)"
    if is_spread(metric):
        return nan, "spread", "the spread of the row's timed repeats (bench --repeats), not simulated"
    if mode == "accelerate":
        return nan, "not_modelled", "accelerate cpu_offload is not simulated"
    if mode in COMPILED:
        return _predict_compiled(r, mode, B, metric, config, bmax, host_s)
    if mode == "-":
        m = _model(c)
        if metric == "expert_GB_total":
            return m.moe_layers * m.experts * expert_params(m) * m.dtype_bytes / 1e9, "size", "semoe.sizing"
        if metric == "h2d_pinned_GBps":
            return cluster_preset("h100-single").pcie.bandwidth_GBps, "input", "h100-single preset (HARDWARE.md)"
        if metric == "moe_blocks":
            return m.moe_layers, "count", "ModelSpec"
        if metric == RUN_HOST_METRIC:
            return _host_op_s() * 1e6, "input", "the profile's host_op row (this run's probe replaces it for the run)"
        if metric == PROBE_BLOCKS_METRIC:
            return m.moe_layers, "input", "the host probe's MoE blocks (the run's)"
        return nan, "not_modelled", ""
    if metric in PROBE_METRICS:
        return _predict_probe_row(r, c, probe, host_s)
    if metric.startswith(ADJ_PREFIX):
        return _predict_adjacent_row(r, c, probe, adj or {}, host_s)
    if metric.startswith(H2D_PREFIX):
        return _predict_h2d_row(r)
    pcie = _h2d_used(r, h2d)
    base, slots, quant, dequant = parse_mode(mode)
    qnote = (f"{quant} experts ({'fused GEMMs' if dequant == 'fused' else 'dequantised into a workspace'})"
             if quant else "")
    probe = probe if quant is None else None  # the probe runs bf16 experts
    res_probe = with_adjacent(probe, adj, "resident", "resident", B)  # the resident simulation's host
    probe = with_adjacent(probe, adj, mode, base, B)  # this row's own (mode, batch) pass
    if base == "resident" or (base == "ring" and metric == "block_compute_ms"):
        # ring rows' block_compute_ms: the bench times the same experts resident (K = L)
        model, res = _sim(config, "resident", B, None, bmax, False, budget=False, quant=quant, dequant=dequant,
                          launch_s=host_s, probe=res_probe, sync_split=_sync_split())
        L = model.moe_layers
        if metric == "block_compute_ms":
            return 1e3 * res.prefill_s / L, "throughput", qnote
        v = _timing(metric, res, B, P, G, L)
        return (nan, "not_modelled", "") if v is None else (v, "throughput", qnote)
    if base == "ring":
        model, res = _sim(config, "ring", B, slots, bmax, False, quant=quant, dequant=dequant, launch_s=host_s,
                          probe=probe, pcie_GBps=pcie)
        L, E, eb = model.moe_layers, model.experts, res.plan.expert_bytes
        bw = cluster_preset("h100-single").pcie.bandwidth_GBps * 1e9
        if metric in ("budget_K", "ring_K"):
            return res.plan.ring_slots, "count", "memory plan"
        v = _timing(metric, res, B, P, G, L)
        if v is not None:
            return v, "throughput", qnote
        if metric == "gpu_peak_GB":
            return res.plan.peak_hbm_bytes / 1e9, "memory", qnote
        if metric == "bytes_per_block":
            return E * eb, "bytes", qnote
        if metric == "dequant_ms_per_block" and quant:  # the dequant pass alone, as the simulator charges it
            from simulator.workload.inference_host import host_program

            n = host_program(quant, "ring", "prefill").unit("dequant_block")
            return 1e3 * _dequant_s(model, quant, n), "throughput", "one block's experts, memory-bound pass"
        if metric == "copy_ms_per_block":
            return 1e3 * E * eb / bw, "throughput", "the block's bytes over the preset's pinned H2D bandwidth"
        if metric == "bytes_copied_per_forward":
            return (L if res.plan.ring_slots < L else 0) * E * eb, "bytes", "every block once per pass when K < L"
        if metric == "decode_GB_copied_per_step":
            return res.bytes_copied_decode / max(1, G - 1) / 1e9, "bytes", qnote
        if "speedup_vs" in metric and quant:  # the quantised ring over the bf16 ring, same batch and slots
            _, bf = _sim(config, "ring", B, slots, bmax, False, launch_s=host_s)
            which = "decode" if "decode" in metric else "prefill"
            v = getattr(res, f"{which}_tokens_per_s") / getattr(bf, f"{which}_tokens_per_s")
            return v, "ratio", f"{which} tokens/s of the {quant} ring over the simulated bf16 ring"
        _, resident = _sim(config, "resident", B, None, bmax, False, budget=False, quant=quant, dequant=dequant,
                           launch_s=host_s, probe=res_probe, sync_split=_sync_split())
        bound_s = L * max(resident.prefill_s / L, E * eb / bw)
        if metric == "bound_prefill_tokens_per_s":
            return B * P / bound_s, "throughput", "issue 7's bound from simulated compute and the preset's PCIe"
        if metric == "prefill_frac_of_bound":
            return bound_s / res.prefill_s, "ratio", ""
        return nan, "not_modelled", ""
    if base in ("expert", "expert_nopred"):
        predict = base == "expert" and r["date"] in predicting_runs
        model, res = _sim(config, "expert", B, None, B, predict, quant=quant, dequant=dequant, launch_s=host_s,
                          probe=probe, pcie_GBps=pcie, persist=persist)
        v = _timing(metric, res, B, P, G, model.moe_layers)
        pooled_note = ""
        if metric in POOLED_METRICS:
            val, sd = pooled_prediction(config, B, predict, quant, persist=persist)[metric]
            v = (val, "bytes" if metric.startswith("decode_GB") else "ratio")
            pooled_note = (f"the simulated pool over {POOL_SEEDS} routing seeds, pooled as the bench pools its repeats "
                           f"(ratio of sums); one pass's sd over the seeds {sd:.3g}")
        elif v is not None and metric.startswith("decode"):
            v = (v, "throughput")
        else:
            # the bench's pool statistics: expert-aware fetches and prefetches only (a ring pass copies
            # through the ring, which they do not count)
            v = {"pool_slots": (res.plan.pool_slots, "count"),
                 "hit_rate": (res.hit_rate, "ratio"),
                 "decode_GB_copied_per_step": (res.fetch_bytes_decode / max(1, G - 1) / 1e9, "bytes"),
                 "gpu_peak_GB": (res.plan.peak_hbm_bytes / 1e9, "memory"),
                 "prefetched_used_frac": (res.prefetch_used / res.prefetched if predict and res.prefetched else 0.0,
                                          "ratio")}.get(metric)
        if v is None:
            return nan, "not_modelled", ""
        note = (f"one-block-ahead prediction at the diagnostic's measured accuracy {predict_accuracy():.3f} "
                "(results/bench/infer_diag, B = 1: wasted prefetch bytes / prefetched bytes)") if predict else ""
        if res.passes.get("expert", 0) == 0 and metric in ("decode_tokens_per_s", "decode_ms_per_step", "hit_rate",
                                                            "prefetched_used_frac", "decode_GB_copied_per_step",
                                                            *POOLED_METRICS):
            note = (f"ring fallback: {B} tokens per step are expected to touch >= {_fallback_frac():g} of the experts, so every "
                    "pass runs the ring (pool statistics stay 0; the ring's copies are not in them)")
            pooled_note = ""
        return v[0], v[1], "; ".join(x for x in (note, pooled_note, qnote) if x)
    return nan, "not_modelled", ""


def _fallback_frac() -> float:
    from simulator.workload.inference import InferConfig

    return InferConfig().fallback_frac


def _probe_run(config: str, mode: str, batch: int, probe):
    """An unrun `InferenceRun` of the probe's (``mode``, ``batch``) pass structure (the counted program,
    the fallback rule, the ring's K), for `InferenceRun.probe_pass_kernels`."""
    from simulator.engine import Sim
    from simulator.workload.inference import InferConfig, InferenceRun

    c = parse_config(config)
    base = "expert" if mode.startswith("expert") else mode
    cfg = InferConfig(mode=base, batch=batch, prompt_len=c["P"], gen_len=c["G"], predict=mode == "expert",
                      gpu_budget_bytes=c["budget"] if base != "resident" else None, slots=c["slots"], host_probe=probe)
    return InferenceRun(_model(c), cfg, Sim(cluster_preset("h100-single"), profile=None, trace=False))


def _predict_probe_row(r, c: dict, probe, host_s: float | None) -> tuple[float, str, str]:
    """A host probe row (an input of its run): ``host_*_ms`` rows are predicted as the per-kernel model would
    (the probe pass's counted kernels x the run's ``host_op_us``, else the profile's host seconds per kernel),
    so their error is what the probe corrects; copy counts are not predicted."""
    nan = float("nan")
    phase, what = PROBE_METRICS[r["metric"]]
    if what != "ms" or probe is None:
        return nan, "input", "the host probe's copy calls per pass (ring blocks or experts)"
    B = int(r["batch"])
    copies = next((cp for m, ph, b, _, cp in probe.points if m == r["mode"] and ph == phase and b == B), 0.0)
    n = _probe_run(r["config"], r["mode"], B, probe).probe_pass_kernels(phase, B, copies)
    h = host_s if host_s is not None else _host_op_s()
    return 1e3 * n * h, "input", (f"engine host probe (tiny widths, this run); predicted: {n:.0f} counted kernels x "
                                  f"{h * 1e6:.1f} us per kernel")


def _adjacent_kernels(config: str, mode: str, phase: str, B: int, probe, copies: float) -> float:
    """Counted kernels of an adjacent probe pass of row mode ``mode`` (``ring_K<k>``: the ring with K = k)."""
    base, slots, _, _ = parse_mode(mode)
    c = parse_config(config)
    cfg_mode = "expert" if base.startswith("expert") else base
    from simulator.engine import Sim
    from simulator.workload.inference import InferConfig, InferenceRun

    cfg = InferConfig(mode=cfg_mode, batch=B, prompt_len=c["P"], gen_len=c["G"], predict=base == "expert",
                      gpu_budget_bytes=c["budget"] if cfg_mode != "resident" else None, slots=slots or c["slots"],
                      host_probe=probe)
    run = InferenceRun(_model(c), cfg, Sim(cluster_preset("h100-single"), profile=None, trace=False))
    return run.probe_pass_kernels(phase, B, copies)


def is_spread(metric: str) -> bool:
    """A repeated row's spread row (``decode_tokens_per_s_min``, ``prefill_repeats``), not an adjacent probe row."""
    return metric == POOL_PASSES_METRIC or (not metric.startswith((ADJ_PREFIX, H2D_PREFIX)) and (
        metric.endswith(SPREAD_SUFFIXES) or metric.endswith(REPEATS_SUFFIX)))


_ADJ_WHEN_TEXT = {"before": "right before the timed passes", "after": "right after the timed passes",
                  "median": "the median of the probes around the timed repeats",
                  "min": "the fastest probe around the timed repeats", "max": "the slowest probe around the timed repeats"}


def _predict_adjacent_row(r, c: dict, probe, adj: dict, host_s: float | None) -> tuple[float, str, str]:
    """An adjacent host probe row (an input of its run, `ADJ_METRICS`): ``*_ms*`` rows are predicted as the
    run's once-per-run probe would have it (its host seconds per kernel of that code path, the median over its
    batches, x the counted kernels of this pass), so their error shows what measuring next to the row
    changes; copy counts are not predicted."""
    nan = float("nan")
    phase, what = adjacent_metric(r["metric"])
    B, mode = int(r["batch"]), r["mode"]
    if what != "ms" or probe is None or (mode, phase, B) not in adj:
        return nan, "input", "the adjacent host probe's copy calls per pass (ring blocks or experts)"
    base = parse_mode(mode)[0]
    n = _adjacent_kernels(r["config"], mode, phase, B, probe, adj[(mode, phase, B)][1])
    run = _probe_run(r["config"], base, B, probe)  # the once-per-run probe's rate of this code path
    q = c["P"] if phase == "prefill" else 1
    mech = run._mode_of(B * q)
    rate = probe.rate(base, phase, B, lambda b, cp: run.probe_pass_kernels(phase, b, cp),
                      keep=lambda b: run._mode_of(b * q) == mech)
    if rate is None:
        return nan, "input", "adjacent host probe (no once-per-run probe of this path)"
    when = _ADJ_WHEN_TEXT.get(r["metric"].rsplit("_", 1)[1], "")
    return 1e3 * n * rate, "input", (f"adjacent host probe (tiny widths, {when}); predicted: {n:.0f} counted kernels x the run's once-per-run "
                                     f"probe, {rate * 1e6:.1f} us per kernel")


def _predict_compiled(r, mode: str, B: int, metric: str, config: str, bmax: int, host_s: float | None = None
                      ) -> tuple[float, str, str]:
    """``compiled`` (resident, `reference/inference/static.py`): decode replays one CUDA graph per step,
    so its host cost is one graph launch (``host_op_s``) per step and its device time is the eager
    step's (the same GEMMs, attention and dispatch); prefill runs inductor's fused kernels without CUDA
    graphs, whose kernel count is not counted: not modelled. ``ring_compiled``: copy-bound over PCIe in
    both phases, so the (uncounted) compiled host program stays hidden under the copies: the eager
    ring's simulation."""
    nan = float("nan")
    c = parse_config(config)
    G = c["G"]
    if mode == "compiled":
        if metric not in ("decode_tokens_per_s", "decode_ms_per_step"):
            return nan, "not_modelled", "compiled prefill: inductor's fused kernels are not counted"
        model, res = _sim(config, "resident", B, None, bmax, False, budget=False, launch_s=0.0)
        step_s = res.decode_s / max(1, G - 1) + (host_s if host_s is not None else _host_op_s())  # + one graph launch
        v = B / step_s if metric == "decode_tokens_per_s" else 1e3 * step_s
        return v, "throughput", "CUDA-graph decode: eager device time + one graph launch per step"
    model, res = _sim(config, "ring", B, None, bmax, False, launch_s=host_s)
    v = _timing(metric, res, B, c["P"], G, model.moe_layers)
    if v is None:
        return nan, "not_modelled", ""
    return v, "throughput", "copy-bound: the eager ring's simulation (compiled host program hidden under copies)"


def _dequant_s(model, quant: str, kernels: int) -> float:
    from simulator.cost import CostModel
    from simulator.workload.inference_costs import BlockCosts

    cm = CostModel.auto(cluster_preset("h100-single").gpu, impl=("torch", "triton"), loglog=True)
    return BlockCosts(model, cm, quant).dequant(model.experts, max(1, kernels))


def _host_op_s() -> float:
    if HOST_OP_S is not None:
        return HOST_OP_S
    from simulator.cost import CostModel

    return CostModel.auto(cluster_preset("h100-single").gpu, impl=("torch", "triton"), loglog=True).host_op_s


TRACES = ROOT / "results" / "bench" / "infer_trace"
POOL_METRICS = ("hit_rate", "prefetched_used_frac", "decode_GB_copied_per_step", *POOLED_METRICS)


@cache
def pool_replays(commit: str, traces: Path | None = None) -> dict:
    """(mode, batch) -> (replayed, engine) pool counters (hits, misses, prefetched, prefetch_used) of the bench
    run at ``commit`` whose expert pool calls were traced (``<traces>/*_<commit>_expert_trace.csv`` and
    ``..._expert_trace_stats.csv``: ``reference/inference/bench.py`` ``trace_pool_calls``): the simulator's pool
    (`simulator.workload.inference.replay_pool_trace`) on the routing the engine saw. Traces with a ``repeat``
    column (the bench's pooled repeats, each a fresh engine) are replayed per repeat and summed over them, as
    the pooled rows sum the engine's counters. A diagnostic of the hit-rate rows (the LRU mechanism apart from the
    routing), never a prediction's input."""
    import csv
    from collections import defaultdict

    from simulator.workload.inference import replay_pool_trace

    out: dict = {}
    for path in sorted((traces or TRACES).glob(f"*_{commit}_expert_trace.csv")):
        spath = path.with_name(path.name.replace("_expert_trace.csv", "_expert_trace_stats.csv"))
        if not spath.is_file():
            continue
        calls, shape = defaultdict(list), {}
        with path.open() as f:
            for r in csv.DictReader(f):
                k = (r["mode"], int(r["batch"]), int(r.get("repeat") or 0))
                calls[k].append((int(r["step"]), int(r["block"]), r["call"], tuple(int(e) for e in r["experts"].split())))
                shape[k] = (int(r["pool_slots"]), int(r["ring_slots"]))
        names = ("hits", "misses", "prefetched", "prefetch_used")
        with spath.open() as f:
            for s in csv.DictReader(f):
                k = (s["mode"], int(s["batch"]), int(s.get("repeat") or 0))
                engine = {m: int(s[m]) for m in names}
                blocks = [int(b) for b in s["moe_blocks"].split()]
                if k in shape:
                    rep = replay_pool_trace(calls[k], shape[k][0], int(s["experts"]), blocks, shape[k][1])
                elif sum(engine.values()) == 0:  # a pass that never called the pool (ring fallback): no trace rows
                    rep = dict.fromkeys(names, 0)
                else:
                    continue
                old = out.get(k[:2], (dict.fromkeys(names, 0), dict.fromkeys(names, 0)))
                out[k[:2]] = ({m: old[0][m] + rep[m] for m in names}, {m: old[1][m] + engine[m] for m in names})
    return out


def _replay_note(r) -> str:
    """The pool replay of a run's traced routing for an expert-aware pool row (`pool_replays`), when the trace
    is of this run (its engine counters give the row's measured hit rate); else ''."""
    if r["metric"] not in POOL_METRICS or not str(r["mode"]).startswith("expert"):
        return ""
    got = pool_replays(str(r["commit"])).get((r["mode"], int(r["batch"])))
    if got is None:
        return ""
    rep, eng = got
    look = eng["hits"] + eng["misses"]
    if look == 0 or (r["metric"] in ("hit_rate", "hit_rate" + POOLED_SUFFIX)
                     and abs(eng["hits"] / look - float(r["value"])) > 1e-4):
        return ""
    same = "equal" if rep == eng else "NOT equal"
    return (f"pool replay on this run's traced routing (results/bench/infer_trace): hits {rep['hits']}, misses "
            f"{rep['misses']}, prefetched {rep['prefetched']}, used {rep['prefetch_used']}, {same} to the engine's "
            f"({eng['hits']}, {eng['misses']}, {eng['prefetched']}, {eng['prefetch_used']}): the simulated pool is the "
            "engine's, the prediction's error is its sampled routing (uniform, independent top-k per token and step)"
            + (" and predictor" if r["mode"] == "expert" else ""))


def explain(r, probed: bool = False, adjacent: tuple | None = None, pcie: float | None = None) -> str:
    """Why a throughput row misses 10% (mechanisms the simulator leaves out; see NOTES.md). ``probed``: the
    row's host time came from its run's engine probe; ``adjacent``: (before, after) ms of the adjacent probe the
    row's simulation took its host from; ``pcie``: the GB/s of the row's copy probes its simulation took."""
    mode, metric, date = r["mode"], r["metric"], r["date"]
    host = "the run's engine probe's seconds per kernel of this path" if probed else _host_note()
    if adjacent is not None and len(adjacent) > 2:
        host = ("the seconds per kernel of this path probed around the row's repeats (median "
                f"{adjacent[2]:.1f} ms per probe pass, {adjacent[3]:.1f}-{adjacent[4]:.1f})")
    elif adjacent is not None:
        host = ("the seconds per kernel of this path probed right before and after the row "
                f"({adjacent[0]:.1f} / {adjacent[1]:.1f} ms per probe pass)")
    if _autotune_bug(r):
        return ("first ring decode of the run: Triton autotuned the int8 dequant GEMM for the decode M bucket "
                "inside the timed generate (3 configs x 2 shapes; B = 8 reused the bucket and matches)")
    if mode == "resident" and metric == "decode_tokens_per_s":
        if date.startswith(RUN1_DATE):
            return "run 1: cuDNN SDPA rebuilt a plan per decode step (~205 ms/step, NOTES.md); fixed in run 2"
        if adjacent is not None:
            return (f"host-bound: the counted kernels per step x {host} plus the device's tails at the host syncs; "
                    "the timed steps ran at another host speed than the probe passes around them")
        if probed:
            return (f"host-bound: the counted kernels per step x {host} (the probe's step time at tiny widths, "
                    "median over its batches) plus the device's tails at the host syncs; the run's resident steps "
                    "(21.6-23.0 ms at B = 1-16) ran faster than every probed decode step of the same program "
                    "(22.8-25.6 ms)")
        return (f"host-bound: the counted kernels per step (results/profiles/op_counts.csv) x {host}; the reference "
                "measured ~26 ms/step (NOTES.md), i.e. ~35 us per kernel in this code path")
    if mode == "resident" and metric in ("prefill_tokens_per_s", "block_compute_ms"):
        split = ("each sync's latency (the sync probe's share) serial" if _sync_split()
                 else "sync latencies spread evenly")
        return (f"compute + host: ~70 counted kernels per block x {host} ({split}) and 4 host syncs per block; "
                "expert GEMMs at the profile's grouped_gemm_fwd_routed rows (64-2048 rows per expert), started "
                "after the dispatch lead's host time (5 kernels); every other kernel at its price + 2.44 us "
                "(inference_costs.KERNEL_DEVICE_S, results/bench/infer_diag); with the sync split B >= 4 lean 3-7% "
                "slow (the split adds ~0.2 ms of serial sync latency per block at every batch; the sync probe's B = 8 "
                "chain is slower still, so the rest of the block is priced slow there); the same batch's block time "
                "varies 2.3-3.6 ms (B = 1) across runs")
    if mode.startswith("expert") and metric == "decode_tokens_per_s":
        return ("copies and host work serialised per block (the remap's bincount sync waits for the copy; "
                "a prefetched block's compute waits for its prefetch, which starts after the previous block's "
                f"compute); ~75 counted kernels per block x {host}; measured minus copy time (bytes / the run's "
                "pinned H2D) is 1.5-2.6 ms per block above the probe's host time, unexplained "
                "(simulator/workload/inference_diag.py measures per-expert copies and the engine's timeline)"
                + ("; the predictor is modelled as perfect (the reference's wasted 1-8% of prefetched bytes and "
                   "its mispredicted experts, fetched serially, are not)" if mode == "expert" else ""))
    if metric in ("block_compute_ms", "dequant_ms_per_block") and parse_mode(mode)[2]:
        quant, path = parse_mode(mode)[2], parse_mode(mode)[3]
        ip = _infer_profile()
        if path == "fused":
            if any(r["op"] == "qgemm_fwd" and r["dtype"] == quant for r in ip.rows):
                return "fused quantised GEMMs at the profile's qgemm_fwd rate (equal groups; uneven routing not applied)"
            return ("fused quantised GEMMs (int8 Triton dequant GEMM, fp8 _scaled_grouped_mm with per-row activation "
                    "quantisation): no qgemm_fwd row in the profile yet (kernels/profile.py --sweeps infer), so the "
                    "bf16 rate (int8) / datasheet fp8 ratio is assumed; copy-bound ring rows are unaffected")
        if any(r["op"] == "dequant" and r["dtype"] == quant for r in ip.rows):
            return "workspace dequant at the profile's dequant rows (the reference's dequantize_into call)"
        return ("workspace dequant: the reference's dequantize_into is copy_ from the k-major (transposed) 1-byte view "
                "into the bf16 workspace, a strided copy, then mul_ by the scales (~7 bytes per weight); no dequant "
                "row in the profile yet (kernels/profile.py --sweeps infer), so one contiguous memory-bound pass "
                "(3 bytes per weight) is charged; copy-bound ring rows are unaffected")
    if metric == "bound_prefill_tokens_per_s":
        return "bound uses the simulated resident compute; see resident prefill"
    if parse_mode(mode)[0] == "ring" and metric in ("prefill_tokens_per_s", "prefill_frac_of_bound", "prefill_ms_per_block"):
        if pcie is not None:
            return (f"copy-bound: every block's experts over PCIe at the {pcie:.2f} GB/s of the row's own copy probes, "
                    "the host hidden under the copies; a miss is a copy path the 1 GiB probe copies do not see (the "
                    "ring's per-block copies on the engine's copy stream beside its compute)")
        return ("copy-bound: every block's experts over PCIe at the preset's 53.5 GB/s (~0.42 s a pass of 8 blocks), "
                "the host hidden under the copies; a miss is a slow stretch of the machine's copies (the 41ed3d6 run: "
                "ring_K4, ring B1 and B2, one pass each within ~6 s, at 0.50 s a pass against 0.42-0.45 s for its "
                "other ring passes and every ring pass of 76200c0)")
    return ""


def _infer_profile():
    from simulator.cost import CostModel
    from simulator.workload.inference_profile import InferProfile

    return InferProfile.of(CostModel.auto(cluster_preset("h100-single").gpu, impl=("torch", "triton"), loglog=True))


def _host_note() -> str:
    if HOST_OP_S is not None:
        return f"{HOST_OP_S * 1e6:.1f} us per kernel (--host-op-us what-if)"
    from simulator.cost import CostModel

    cm = CostModel.auto(cluster_preset("h100-single").gpu, impl=("torch", "triton"), loglog=True)
    src = "the profile's host_op row" if cm.profile is not None and cm.profile.host_op else "HARDWARE.md's 8 us"
    return f"{cm.host_op_s * 1e6:.1f} us per kernel ({src})"


def predict_all(measured: pd.DataFrame) -> pd.DataFrame:
    rows = []
    # the bench plans the engine's memory for the largest batch of its run
    bmax_run = measured.groupby("date")["batch"].max().to_dict()
    predicting = frozenset(measured.loc[measured["metric"].isin(["prefetched_used_frac",
                                                                 "prefetched_used_frac" + POOLED_SUFFIX]), "date"])
    probe = measured[(measured["mode"] == "-") & (measured["metric"] == RUN_HOST_METRIC)]
    host_run = {d: float(v) * 1e-6 for d, v in zip(probe["date"], probe["value"])} if HOST_OP_S is None else {}
    engine_probe = run_probes(measured)
    adjacent = run_adjacent(measured)
    h2d_runs = run_h2d(measured)
    pooled_runs = frozenset(measured.loc[measured["metric"] == POOL_PASSES_METRIC, "date"])
    pers = routing_persistence() if PERSIST else None
    for _, r in measured.iterrows():
        pr = engine_probe.get(r["date"])
        adj = adjacent.get(r["date"])
        h2d = h2d_runs.get(r["date"])
        q = _persist_for(r, pers, pooled_runs)
        pred, kind, note = predict_row(r, int(bmax_run[r["date"]]), predicting, host_run.get(r["date"]), pr, adj,
                                       h2d, q)
        bw = _h2d_used(r, h2d) if kind == "throughput" else None
        if bw is not None:
            note = "; ".join(x for x in (note, _h2d_note(measured, r, bw)) if x)
        if pers is not None and q > 0 and kind != "spread":
            note = "; ".join(x for x in (note, f"decode routing: {pers.note()}, held out") if x)
        elif pers is not None and _calibration_row(r, kind):
            cal = "the routing-persistence calibration run (its B = 1 trace); its own rows keep independent draws"
            note = "; ".join(x for x in (note, cal) if x)
        used = _adjacent_used(r, adj) if pr is not None else None
        adj_ms = _adjacent_ms(measured, r, used) if kind == "throughput" else None
        if kind == "throughput" and used and adj_ms and len(adj_ms) > 2:
            src = (f"host: the engine probe of this row's {used} pass interleaved with its repeats (median of the "
                   "probes; tiny widths)")
            note = "; ".join(x for x in (note, src) if x)
        elif kind == "throughput" and used:
            src = f"host: the engine probe of this row's {used} pass measured right before and after it (mean; tiny widths)"
            note = "; ".join(x for x in (note, src) if x)
        elif kind == "throughput" and pr is not None and _probed(r):
            note = "; ".join(x for x in (note, "host: this run's engine probe of the code path (tiny widths)") if x)
        elif r["date"] in host_run and kind == "throughput":
            note = "; ".join(x for x in (note, f"host {host_run[r['date']] * 1e6:.1f} us/kernel: this run's probe") if x)
        meas = float(r["value"])
        if not math.isnan(pred) and meas == 0:
            err = 0.0 if pred == 0 else float("inf")
        else:
            err = pred / meas - 1 if not math.isnan(pred) else float("nan")
        within = bool(abs(err) <= 0.10) if not math.isnan(err) else None
        if within is False and kind == "throughput":
            note = "; ".join(x for x in (note, explain(r, pr is not None and _probed(r), adj_ms, bw)) if x)
        if kind != "spread":
            note = "; ".join(x for x in (spread_note(measured, r, pred), note) if x)
        if r["metric"] in POOLED_METRICS and not math.isnan(pred):
            note = "; ".join(x for x in (note, pooled_noise_note(
                measured, r, pred, parse_mode(r["mode"])[0] == "expert" and r["date"] in predicting, q)) if x)
        if "commit" in r:
            note = "; ".join(x for x in (note, _replay_note(r)) if x)
        rows.append({"date": r["date"], "mode": r["mode"], "batch": int(r["batch"]), "metric": r["metric"], "measured": meas,
                         "predicted": pred, "error": err, "within_10pct": within, "kind": kind, "status": status(r, kind, pred),
                         "note": note})
    return pd.DataFrame(rows)


def _h2d_note(measured: pd.DataFrame, r, bw: float) -> str:
    """Where a row's PCIe bandwidth came from (its copy probes, `_h2d_used`)."""
    phase = "decode" if r["metric"].startswith("decode") else "prefill"
    v = _row_values(measured, r)
    m = H2D_METRICS[phase]
    if f"{m}_{ADJ_MEDIAN}" in v:
        return (f"PCIe: {bw:.2f} GB/s, the median of this row's {phase} copy probes interleaved with its repeats "
                f"({v.get(m + '_min', float('nan')):.2f}-{v.get(m + '_max', float('nan')):.2f})")
    return (f"PCIe: {bw:.2f} GB/s, the mean of this row's {phase} copy probes right before and after it "
            f"({v.get(m + '_before', float('nan')):.2f} / {v.get(m + '_after', float('nan')):.2f})")


# routing persistence of the expert-aware decode (`simulator.workload.inference_persist`): measured on ONE run's
# traced B = 1 routing (the calibration run), applied to the expert-aware simulations of the runs with pooled count
# rows (from 41ed3d6 on: R passes on other prompts each); earlier runs decode the calibration run's prompts with
# the same weights (the same routing), so they keep independent draws (rule: module doc)
PERSIST_COMMIT = "76200c0"
PERSIST = False  # True: --persist (the held-out check of the calibrated persistence; rejected, module doc)


@cache
def routing_persistence(traces: Path | None = None, commit: str = PERSIST_COMMIT):
    """The calibration run's routing persistence (`inference_persist.Persistence`) from its expert trace; None
    when the trace is absent."""
    from simulator.workload.inference_persist import routing_persistence as estimate

    path = (traces or TRACES) / f"2026-11-24_{commit}_expert_trace.csv"
    if not path.is_file():
        return None
    m = model_preset("mixtral-8x7b")
    return estimate(path, m.experts, m.top_k)


def _persist_for(r, pers, pooled_runs: frozenset) -> float:
    """The decode routing persistence a row's expert-aware simulation takes: the calibration's ``q`` for runs with
    pooled rows (held out), else 0."""
    if pers is None or r["date"] not in pooled_runs or str(r.get("commit", "")) == PERSIST_COMMIT:
        return 0.0
    return pers.q if parse_mode(r["mode"])[0] in ("expert", "expert_nopred") else 0.0


def _calibration_row(r, kind: str) -> bool:
    return (str(r.get("commit", "")) == PERSIST_COMMIT and str(r["mode"]).startswith("expert")
            and r["metric"] in POOL_METRICS and kind != "spread")


RUN1_DATE = "2026-11-24T04:05"  # bench run 1: cuDNN SDPA rebuilt a plan per decode step (NOTES.md)
# issue-11 run at 344a526: the first ring decode (B = 1) of ring_int8_fused autotuned the Triton
# dequant GEMM for the decode M bucket inside the timed generate (bench.py now warms decode up first)
AUTOTUNE_RUN_DATE = "2026-11-24T06:34"


def _autotune_bug(r) -> bool:
    return (str(r["date"]).startswith(AUTOTUNE_RUN_DATE) and r["mode"] == "ring_int8_fused" and int(r["batch"]) == 1
            and r["metric"].startswith("decode"))


def status(r, kind: str, pred: float) -> str:
    """Which rows validate the simulator (``STATUSES``): ``validated`` rows are predictions made without
    any input from the row (nor from any other measured row of infer.csv but its run's ``input`` rows);
    ``input`` rows measured a model input (the pinned H2D bandwidth is the preset's; a run's ``host_op_us``
    and engine host probe rows are its host inputs); ``by_definition`` rows are 0 / 1 by
    construction; ``measurement_bug`` rows measured a defect of the bench that was fixed later;
    ``not_modelled`` rows have no prediction."""
    if kind == "input":
        return "input"
    if kind == "not_modelled" or math.isnan(pred):
        return "not_modelled"
    base = parse_mode(r["mode"])[0]
    if r["metric"] in ("prefetched_used_frac", "prefetched_used_frac" + POOLED_SUFFIX) and base != "expert":
        return "by_definition"
    if _autotune_bug(r):
        return "measurement_bug"
    if (str(r["date"]) < COUNTED_CODE_DATE and base in ("resident", "expert", "expert_nopred")
            and not (base == "resident" and r["metric"] == "decode_tokens_per_s" and str(r["date"]).startswith(RUN1_DATE))):
        return "superseded_code"
    if base == "resident" and r["metric"] == "decode_tokens_per_s" and str(r["date"]).startswith(RUN1_DATE):
        return "measurement_bug"
    return "validated"


STATUSES = ("validated", "input", "by_definition", "measurement_bug", "superseded_code", "not_modelled")
# runs before this date ran an engine whose host program is not the counted one (NOTES.md: ~750 kernels
# per resident decode step then; the CUDA-counted program of the current code issues 572): their
# host-bound rows (resident, expert-aware) are listed as ``superseded_code``; their ring rows are
# copy-bound (the host program is hidden under the copies) and stay ``validated``
COUNTED_CODE_DATE = "2026-11-24T06:34"


def run_probes(measured: pd.DataFrame) -> dict:
    """date -> the run's engine host probe (`HostProbe` from its ``host_*`` rows); none under ``--host-op-us``."""
    from simulator.workload.inference_host import HostProbe

    if HOST_OP_S is not None:
        return {}
    keep = measured[measured["metric"].isin(list(PROBE_METRICS) + [PROBE_BLOCKS_METRIC])]
    out = {}
    for date, g in keep.groupby("date"):
        p = HostProbe.from_rows(zip(g["mode"], g["batch"], g["metric"], g["value"]))
        if p is not None:
            out[date] = p
    return out


def adjacent_metric(metric: str) -> tuple[str, str]:
    """``host_adj_decode_ms_per_step_before`` -> ("decode", "ms"); ``host_adj_prefill_copies`` -> ("prefill",
    "copies")."""
    phase = "prefill" if metric.startswith(ADJ_PREFIX + "prefill") else "decode"
    return phase, "copies" if "_copies" in metric else "ms"


def run_adjacent(measured: pd.DataFrame) -> dict:
    """date -> {(row mode, phase, batch): (seconds, copies)}: the run's adjacent host probes (bench
    ``HostProber.around``), seconds the median of the probes around a repeated row's timed repeats
    (``host_adj_*_median``), else the mean of the probe right before and right after the row's timed passes
    (the rule in the module doc); none under ``--host-op-us``."""
    if HOST_OP_S is not None:
        return {}
    keep = measured[measured["metric"].str.startswith(ADJ_PREFIX)]
    out: dict = {}
    for (date, mode, batch), g in keep.groupby(["date", "mode", "batch"]):
        vals = dict(zip(g["metric"], g["value"].astype(float)))
        for phase, (ms_metric, cp_metric) in ADJ_METRICS.items():
            med = vals.get(f"{ms_metric}_{ADJ_MEDIAN}")
            ms = [med] if med is not None else [vals[f"{ms_metric}_{w}"] for w in ADJ_WHEN if f"{ms_metric}_{w}" in vals]
            if ms and all(v > 0 for v in ms):
                out.setdefault(date, {})[(mode, phase, int(batch))] = (1e-3 * sum(ms) / len(ms), vals.get(cp_metric, 0.0))
    return out


def with_adjacent(probe, adj: dict | None, key: str, probe_mode: str, batch: int):
    """``probe`` (the run's `HostProbe`) with its ``probe_mode`` points of each phase that row mode ``key`` has
    an adjacent probe for at ``batch`` replaced by that one point (so `HostProbe.rate` is its rate alone);
    ``probe`` itself where there is none (older runs, quantised rows: ``probe`` None)."""
    if probe is None or not adj:
        return probe
    got = {ph: adj[(key, ph, batch)] for ph in ("prefill", "decode") if (key, ph, batch) in adj}
    if not got:
        return probe
    pts = tuple(p for p in probe.points if not (p[0] == probe_mode and p[1] in got))
    pts += tuple((probe_mode, ph, batch, sec, cp) for ph, (sec, cp) in sorted(got.items()))
    return HostProbe(probe.blocks, pts)


def run_h2d(measured: pd.DataFrame) -> dict:
    """date -> {(row mode, phase, batch): GB/s}: the run's adjacent copy probes (bench ``H2DProber``), the median of
    a repeated row's R + 1 probes (``h2d_adj_<phase>_GBps_median``), else the mean of its before and after probes
    (the rule in the module doc); none under ``--no-copy-probes``."""
    if not USE_H2D:
        return {}
    keep = measured[measured["metric"].str.startswith(H2D_PREFIX)]
    out: dict = {}
    for (date, mode, batch), g in keep.groupby(["date", "mode", "batch"]):
        vals = dict(zip(g["metric"], g["value"].astype(float)))
        for phase, m in H2D_METRICS.items():
            med = vals.get(f"{m}_{ADJ_MEDIAN}")
            v = [med] if med is not None else [vals[f"{m}_{w}"] for w in ADJ_WHEN if f"{m}_{w}" in vals]
            if v and all(x > 0 for x in v):
                out.setdefault(date, {})[(mode, phase, int(batch))] = sum(v) / len(v)
    return out


def _h2d_used(r, h2d: dict | None) -> float | None:
    """The PCIe GB/s a row's own simulation takes from its copy probes (`run_h2d`; None: the preset's)."""
    if not h2d or r["metric"] not in H2D_THROUGHPUT:
        return None
    base, _, quant, _ = parse_mode(r["mode"])
    if quant is not None or base not in ("ring", "expert", "expert_nopred"):
        return None
    phase = "decode" if r["metric"].startswith("decode") else "prefill"
    return h2d.get((r["mode"], phase, int(r["batch"])))


def _predict_h2d_row(r) -> tuple[float, str, str]:
    """An adjacent copy probe row (an input of its run): predicted as the preset's bandwidth, so its error shows the
    drift of the machine's copies from it."""
    bw = cluster_preset("h100-single").pcie.bandwidth_GBps
    when = r["metric"].rsplit("_", 1)[-1]
    return bw, "input", (f"pinned H2D copy probe next to the row's timed passes ({_ADJ_WHEN_TEXT.get(when, when)}); "
                         "predicted: the h100-single preset's bandwidth")


def _row_values(measured: pd.DataFrame, r) -> dict:
    """metric -> value of the rows of ``r``'s run, mode and batch."""
    g = measured[(measured["date"] == r["date"]) & (measured["mode"] == r["mode"]) & (measured["batch"] == r["batch"])]
    return dict(zip(g["metric"], g["value"].astype(float)))


def _adjacent_ms(measured: pd.DataFrame, r, phase: str | None) -> tuple | None:
    """(before, after) ms of the adjacent probe of row ``r``'s ``phase``, then (median, min, max) when the row was
    repeated (None: no adjacent probe used)."""
    if not phase:
        return None
    ms = ADJ_METRICS[phase][0]
    v = _row_values(measured, r)
    out = tuple(v.get(f"{ms}_{w}", float("nan")) for w in ADJ_WHEN)
    if f"{ms}_{ADJ_MEDIAN}" in v:
        out += tuple(v.get(f"{ms}_{w}", float("nan")) for w in (ADJ_MEDIAN, "min", "max"))
    return out


def spread_note(measured: pd.DataFrame, r, pred: float) -> str:
    """A repeated row's repeats and spread (its ``_min`` / ``_max`` rows) and whether ``pred`` lies in it; ''
    for a single-pass row."""
    v = _row_values(measured, r)
    lo, hi = v.get(f"{r['metric']}_min"), v.get(f"{r['metric']}_max")
    if lo is None or hi is None:
        return ""
    phase = "decode" if r["metric"].startswith("decode") else "prefill"
    n = v.get(f"{phase}{REPEATS_SUFFIX}")
    reps = f"median of {n:.0f} repeats" if n is not None else "median of the repeats"
    inside = "" if math.isnan(pred) else (", prediction inside it" if lo <= pred <= hi else ", prediction outside it")
    return f"{reps}: min {lo:.4g}, max {hi:.4g} ({(hi - lo) / float(r['value']):.1%} of the median{inside})"


def pooled_noise_note(measured: pd.DataFrame, r, pred: float, predict: bool, persist: float = 0.0) -> str:
    """A pooled count row's sampling noise: its R passes (row ``pool_passes``), the sd of an R-pass pool ~ one
    simulated pass's sd over the routing seeds / sqrt(R) (`pooled_prediction`), and how many of those the
    measured value lies from the prediction ('' without a ``pool_passes`` row or a spread)."""
    n = _row_values(measured, r).get(POOL_PASSES_METRIC)
    if not n or parse_mode(r["mode"])[2] is not None:
        return ""
    _, sd = pooled_prediction(r["config"], int(r["batch"]), predict, persist=persist)[r["metric"]]
    if not sd > 0:
        return ""
    sd_r = sd / math.sqrt(n)
    rel = f" ({sd_r / pred:.1%} of the prediction)" if pred else ""
    passes = f"{n:.0f} measured pass" + ("es" if n != 1 else "")
    return (f"pooled over {passes} (other prompts each): sampling sd ~ {sd_r:.3g}{rel}, measured "
            f"{abs(float(r['value']) - pred) / sd_r:.1f} sd away")


def _adjacent_used(r, adj: dict | None) -> str | None:
    """The phase whose adjacent probe a throughput row's own simulation uses (None: none)."""
    if not adj:
        return None
    base, _, quant, _ = parse_mode(r["mode"])
    if quant is not None or base not in ("resident", "ring", "expert", "expert_nopred"):
        return None
    phase = "decode" if r["metric"].startswith("decode") else "prefill"
    return phase if (r["mode"], phase, int(r["batch"])) in adj else None


def _probed(r) -> bool:
    """Rows whose simulation takes its host time from the run's engine probe (bf16 engine modes)."""
    base, _, quant, _ = parse_mode(r["mode"])
    return quant is None and base in ("resident", "ring", "expert", "expert_nopred") and r["metric"] not in PROBE_METRICS


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from simulator.report import _save_png

    d = df[(df["kind"] == "throughput") & df["metric"].isin(["prefill_tokens_per_s", "decode_tokens_per_s"])]
    modes = sorted(d["mode"].unique())
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(modes)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric in zip(axes, ["prefill_tokens_per_s", "decode_tokens_per_s"]):
        dd = d[d["metric"] == metric]
        lo = min(dd["measured"].min(), dd["predicted"].min()) * 0.7
        hi = max(dd["measured"].max(), dd["predicted"].max()) * 1.4
        x = np.geomspace(lo, hi, 50)
        ax.fill_between(x, 0.9 * x, 1.1 * x, color="0.85", label="±10%", zorder=0)
        ax.plot(x, x, "k-", lw=0.8, zorder=1)
        for mode, g in dd.groupby("mode"):
            ax.scatter(g["measured"], g["predicted"], label=mode, s=20, color=colors[mode], zorder=3,
                       marker="o" if mode.startswith(("ring", "resident")) else "^")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured (H100, results/bench/infer.csv)")
        ax.set_ylabel("simulated")
        ax.set_title(metric.replace("_", " "))
        ax.legend(fontsize=7)
    fig.suptitle("inference workload: simulated vs measured tokens/s (mixtral-8x7b-L8, 10 GB budget)")
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_png(fig, path)
    plt.close(fig)


def table(df: pd.DataFrame) -> pd.DataFrame:
    """Validated throughput rows per (mode, metric): rows, within 10%, median and max |error|."""
    t = df[(df["kind"] == "throughput") & (df["status"] == "validated")]
    t = t.assign(ok=t["within_10pct"].astype(bool), abs_err=t["error"].abs())
    return t.groupby(["mode", "metric"]).agg(rows=("ok", "size"), within_10pct=("ok", "sum"),
                                             median_abs_err=("abs_err", "median"), max_abs_err=("abs_err", "max")).round(3)


def summarise(df: pd.DataFrame) -> str:
    t = df[df["kind"] == "throughput"]
    v = t[t["status"] == "validated"] if "status" in t else t
    probed = sorted(df.loc[df["metric"].isin(list(PROBE_METRICS)), "date"].unique())
    lines = [f"host time: {_host_note()}; engine host probe (bf16 rows of its run): "
             + (", ".join(probed) if probed and HOST_OP_S is None else "none"),
             (f"throughput rows within 10%: {int(t['within_10pct'].sum())} / {len(t)} "
             f"(validated rows: {int(v['within_10pct'].sum())} / {len(v)})")]
    for kind in ("memory", "count", "ratio", "bytes", "size"):
        k = df[df["kind"] == kind]
        if len(k):
            lines.append(f"{kind} rows within 10%: {int(k['within_10pct'].sum())} / {len(k)}")
    lines.append(f"not modelled: {int((df['kind'] == 'not_modelled').sum())} rows")
    val = df[(df["status"] == "validated") & df["within_10pct"].notna()] if "status" in df else df.iloc[:0]
    for date in sorted(val["date"].unique())[-3:]:  # the latest runs
        g = val[val["date"] == date]
        gt = g[g["kind"] == "throughput"]
        lines.append(f"run {date}: validated rows within 10%: {int(g['within_10pct'].astype(bool).sum())} / {len(g)} "
                     f"(throughput {int(gt['within_10pct'].astype(bool).sum())} / {len(gt)})")
    rep = t[t["note"].fillna("").str.contains("repeats: min")]
    if len(rep):
        lines.append(f"repeated throughput rows (median of the repeats): {len(rep)}, prediction inside the repeats' "
                     f"min-max: {int(rep['note'].str.contains('prediction inside it').sum())}; spread rows: "
                     f"{int((df['kind'] == 'spread').sum())}")
    lines.append("validated throughput rows per mode / metric (error = predicted / measured - 1):")
    lines.append(table(df).to_string())
    worst = t.reindex(t["error"].abs().sort_values(ascending=False).index).head(8)
    lines.append("worst throughput rows:\n" + worst[["date", "mode", "batch", "metric", "measured", "predicted", "error"]].to_string(index=False))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measured", type=Path, default=MEASURED)
    ap.add_argument("--out", type=Path, default=OUT_CSV)
    ap.add_argument("--png", type=Path, default=OUT_PNG)
    ap.add_argument("--host-op-us", type=float, default=None,
                    help="what-if: host us per kernel instead of CostModel.host_op_s (never for the committed table)")
    ap.add_argument("--no-sync-split", action="store_true",
                    help="what-if: the resident prefill's host-sync latency spread evenly over the kernels (the "
                         "model before the sync probe; never for the committed table)")
    ap.add_argument("--persist", action="store_true",
                    help="held-out check: the expert-aware decode routing of runs with pooled rows persists with the q "
                         "of 76200c0's trace (rejected: module doc; never for the committed table)")
    ap.add_argument("--no-copy-probes", action="store_true",
                    help="what-if: the preset's PCIe bandwidth for every row, the copy probes ignored (never for the "
                         "committed table)")
    a = ap.parse_args(argv)
    global HOST_OP_S, SYNC_SPLIT, PERSIST, USE_H2D
    if a.no_copy_probes:
        USE_H2D = False
        print("what-if: copy probes ignored (the preset's PCIe bandwidth)")
    if a.persist:
        PERSIST = True
        print("held-out check: decode routing persistence from 76200c0's trace (runs with pooled rows)")
    if a.no_sync_split:
        SYNC_SPLIT = False
        _sync_split.cache_clear()
        _sim.cache_clear()
        print("what-if: no host-sync split (the probe's seconds spread evenly over the kernels)")
    if a.host_op_us is not None:
        if a.host_op_us < 0:
            print("validate_infer: --host-op-us must be >= 0", file=sys.stderr)
            return 2
        HOST_OP_S = a.host_op_us * 1e-6
        _sim.cache_clear()
        print(f"what-if: {a.host_op_us} us per host kernel (not CostModel.host_op_s)")
    if not a.measured.is_file():
        print(f"validate_infer: measured file not found: {a.measured}", file=sys.stderr)
        return 2
    df = predict_all(pd.read_csv(a.measured, dtype={"commit": str}))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, df.to_csv(index=False, float_format="%.6g"))
    plot(df, a.png)
    print(summarise(df))
    print(f"wrote {a.out} and {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
