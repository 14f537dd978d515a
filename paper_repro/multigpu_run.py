"""Multi-GPU measurement run (issue 10): collective sweeps, expert-parallel MoE layer, DP x EP training.

One torchrun call measures everything a multi-GPU host can tell the simulator, rank 0 writing tidy CSV::

    torchrun --standalone --nproc-per-node N -m paper_repro.multigpu_run --out DIR \\
        [--quick] [--backend nccl|gloo] [--parts collectives,moe,train] [--node-sizes 2,4]

Parts (each writes ``DIR/<part>.csv``, rewritten atomically after every measurement, so a run killed
at its time limit keeps everything measured so far):

``collectives``  nccl-tests-style sweeps (NVIDIA/nccl-tests, doc/PERFORMANCE.md) with torch.distributed:
    all_reduce, all_gather, reduce_scatter, all_to_all (even splits) and all_to_all_uneven
    (``all_to_all_single`` with splits ``w[s, d] = 1 + (s + d) mod n``: every pair differs, every
    rank sends ``size`` bytes), float32, 1 KiB .. 1 GiB by factors of 2. ``size`` is nccl-tests'
    size: the all-reduce buffer, the all-gather output, the reduce-scatter input, the all-to-all send
    buffer of one rank. Warm-up, then ``iters`` back-to-back calls timed as one interval (CUDA events
    on the GPU, wall clock on the CPU), time = mean over ranks (nccl-tests' default ``-a 1``);
    ``algbw = size / time`` and ``busbw = algbw x factor``, factor ``2(n-1)/n`` for all-reduce and
    ``(n-1)/n`` for the others. Each collective's result is checked once (``check_ok``).
``moe``  the reference :class:`~reference.moe.layer.MoELayer` forward + backward with expert
    parallelism over EP = world size, and 2, 4 where they divide it, through the
    :class:`~reference.parallel.ep_dispatcher.EPDispatcher` with every all-to-all of
    :mod:`reference.comm.alltoall`: ``flat``, ``hetu_p<p>`` and ``rail_p<p>`` with the host cut into
    fake nodes of ``p`` ranks (``--node-sizes``; ``p`` must divide EP; ``rail`` with ``p = EP`` is
    exactly ``flat`` and is skipped). Configs are the kernels issue's (``kernels/bench/moe_layer.py``)
    with their token count *per rank* (weak scaling: each GPU's expert GEMMs equal the single-GPU
    benchmark at every EP; global tokens = tokens x world). Before timing, every variant's output,
    input gradient and parameter gradients are compared with ``flat`` on the same input
    (``max_rel_diff_vs_flat``, ``agree_with_flat``). Metrics: fwd+bwd time (mean/max over ranks),
    tokens/s (global tokens / slowest rank), routed TFLOP/s per rank (12 T k H F, kernels-bench
    convention), received-rows imbalance.
``train``  :func:`reference.train.train` of the paper's GPT-MoE family scaled to fit (``paper-13.9b``
    with L4 D2048 F8192 E8, the one-GPU rows of ``results/bench/train.csv``), DP = world x EP
    (default EP = world: one expert per GPU as in the paper), ZeRO-3 dense sharding and fused gradient
    buckets each on and off: tokens/s (median of steps after warm-up), MFU, peak memory per rank,
    losses (and their distance to the plain run); then a short traced run of each variant
    (:mod:`reference.parallel.trace_hooks`: every phase boundary synchronises, so its tokens/s is
    reported apart) whose per-rank phase rows go to ``train_trace.csv`` and whose per-step phase
    means go to ``train.csv``.

Files under ``--out`` (flat, at most 5, so the device tool returns them all): ``collectives.csv``,
``moe.csv``, ``train.csv`` with columns :data:`COLUMNS`; ``train_trace.csv`` (run labels + the
:mod:`semoe.trace` schema); ``run_info.json`` (versions, devices, topology, environment, what ran and
what was skipped). NVLink multicast stays off in every process: :data:`NO_MULTICAST_ENV` is set at
import, before torch loads and before any communicator exists (the device README says why).
``--quick`` uses tiny shapes and few iterations (the gloo test, a first smoke call on the GPUs).
``--print-device-command`` prints the device-tool call for a later session (results/multigpu/README.md).

The pieces, one module each (their names stay importable from here): `paper_repro.multigpu_settings` (arguments
-> `Settings`), `paper_repro.multigpu_context` (`Ctx`: rows, files, budget, timing), `paper_repro.multigpu_collectives`,
`paper_repro.multigpu_moe` and `paper_repro.multigpu_train` (the three parts); this module sets the environment,
parses the command line and runs the parts.
"""

from __future__ import annotations

import os

# Set before torch is imported and before any process group exists, in every rank (torchrun starts each
# worker as a fresh interpreter that runs this module's top first).
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST_ENV)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from paper_repro.multigpu_collectives import (  # noqa: E402,F401
    _collective_op,
    bus_factor,
    run_collectives,
    uneven_splits,
)
from paper_repro.multigpu_context import COLUMNS, Ctx  # noqa: E402,F401
from paper_repro.multigpu_moe import _local_experts_layer, _max_rel_diff, run_moe  # noqa: E402,F401
from paper_repro.multigpu_settings import (  # noqa: E402,F401  (public names of this module)
    COLLECTIVES,
    MOE_CONFIGS,
    PARTS,
    GiB,
    KiB,
    MiB,
    MoEConfig,
    RunError,
    Settings,
    _int_list,
    make_settings,
    moe_impls,
    quick_moe,
)
from paper_repro.multigpu_train import _peak_memory, _train_one, run_train  # noqa: E402,F401

PROG = "multigpu_run"


def _environment_info(c: Ctx) -> dict:
    torch = c.torch
    env = {k: os.environ.get(k) for k in (*NO_MULTICAST_ENV, "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS")}
    mine = {"rank": c.rank, "host": socket.gethostname(), "device": c.device_name, "env": env}
    everyone: list | None = [None] * c.world if c.lead else None
    c.dist.gather_object(mine, everyone, dst=0)
    info = {"date": c.date, "commit": c.commit, "world": c.world, "backend": c.st.backend, "quick": c.st.quick,
            "argv": sys.argv, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "ranks": everyone,
            "settings": {k: (str(v) if not isinstance(v, (int, float, str, bool, type(None), tuple)) else v)
                         for k, v in vars(c.st).items()}}
    if c.cuda:
        try:
            info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception as e:  # noqa: BLE001 - informational only
            info["nccl"] = f"unknown ({e})"
        if c.lead:
            try:
                info["nvidia_smi_topo"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                                         timeout=30).stdout
            except (OSError, subprocess.SubprocessError) as e:
                info["nvidia_smi_topo"] = f"unavailable: {e}"
    return info


def device_command(kind: str, commit: str, quick: bool = False) -> dict:
    """The device-tool ``run`` call that performs this measurement on ``kind`` (one torchrun, < 10 min)."""
    flags = " --quick --time-budget-s 240" if quick else " --time-budget-s 530"
    env = " ".join(f"{k}={v}" for k, v in NO_MULTICAST_ENV.items())
    cmd = (f"export {env} PYTHONUNBUFFERED=1 SEMOE_COMMIT={commit}; set -o pipefail; "
           "N=$(python3 -c 'import torch; print(torch.cuda.device_count())'); "
           f"timeout -k 10 {280 if quick else 575} python3 -m torch.distributed.run --standalone --nproc-per-node $N "
           f"-m paper_repro.multigpu_run --out $OUT --backend nccl{flags} 2>&1 | tee $OUT/log.txt")
    return {"kind": kind, "timeout_s": 300 if quick else 600, "command": cmd}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"torchrun --nproc-per-node N -m paper_repro.{PROG}",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for the CSVs (flat; at most 5 files)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few sizes and iterations")
    p.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo (CPU tensors)")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--collectives", default=",".join(COLLECTIVES))
    p.add_argument("--min-bytes", type=int, default=1 * KiB)
    p.add_argument("--max-bytes", type=int, default=1 * GiB)
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 5 collectives, 3 moe)")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 20 collectives, 10 moe)")
    p.add_argument("--moe-configs", default=",".join(MOE_CONFIGS))
    p.add_argument("--moe-tokens", type=int, default=None, help="tokens per rank (default: the config's)")
    p.add_argument("--node-sizes", default="2,4", help="fake node sizes for hetu/rail")
    p.add_argument("--train-layers", type=int, default=4)
    p.add_argument("--train-experts", type=int, default=8)
    p.add_argument("--train-ep", type=int, default=None, help="expert-parallel size (default: world)")
    p.add_argument("--train-a2a", default="flat", choices=("flat", "hetu", "rail"))
    p.add_argument("--train-gpus-per-node", type=int, default=None, help="ZeRO-3 node size (default: the host)")
    p.add_argument("--train-batch-per-rank", type=int, default=8, help="sequences per rank and step")
    p.add_argument("--train-seq", type=int, default=1024)
    p.add_argument("--train-steps", type=int, default=None, help="timed run steps (default 12; quick 3)")
    p.add_argument("--trace-steps", type=int, default=None, help="traced run steps (default 4; quick 2; 0: none)")
    p.add_argument("--bucket-bytes", type=int, default=25 * MiB, help="fused bucket size of the 'on' runs")
    p.add_argument("--time-budget-s", type=float, default=float("inf"),
                   help="skip what would start after this many seconds (collectively decided)")
    p.add_argument("--pg-timeout-s", type=int, default=300)
    p.add_argument("--print-device-command", metavar="KIND", nargs="?", const="nvidia-h200-x8", default=None,
                   help="print the device-tool call for KIND (default nvidia-h200-x8) and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.print_device_command:
        from reference.parallel.bench import git_commit

        for quick in (True, False):
            print(json.dumps(device_command(a.print_device_command, git_commit(), quick)))
        return 0
    if a.out is None:
        print(f"{PROG}: error: --out DIR is required", file=sys.stderr)
        return 2
    if "RANK" not in os.environ:  # plain `python -m`: a one-process job
        from reference.parallel.spawn import free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    import torch

    if a.backend is None:
        a.backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        st = make_settings(a, world)
        if st.backend == "nccl":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if have < local:
                raise RunError(f"--backend nccl needs one CUDA GPU per local rank: {local} ranks, {have} GPUs "
                               "(use --backend gloo on the CPU)")
    except RunError as e:
        if rank == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bad spec value: one line
        if rank == 0:
            print(f"{PROG}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        st.out.mkdir(parents=True, exist_ok=True)
    import datetime

    import torch.distributed as dist

    if st.backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        threads = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        torch.set_num_threads(min(16, threads))  # torchrun's OMP_NUM_THREADS=1 makes CPU-side init slow
    dist.init_process_group(st.backend, timeout=datetime.timedelta(seconds=st.pg_timeout_s))
    c = Ctx(st)
    try:
        c.info = _environment_info(c)
        c.log(f"{PROG}: world {c.world}, backend {st.backend}, device {c.device_name}, parts {','.join(st.parts)}"
              f"{', quick' if st.quick else ''}; writing {st.out}")
        c.write_info("running")
        for part in st.parts:
            t = time.perf_counter()
            c.log(f"--- {part}")
            {"collectives": run_collectives, "moe": run_moe, "train": run_train}[part](c)
            c.flush(part)
            c.part_s[part] = round(time.perf_counter() - t, 2)
            c.write_info(f"running (done: {','.join(c.part_s)})")
        c.write_info("complete")
        c.log(f"done in {time.perf_counter() - c.t0:.1f} s; skipped: {c.skipped or 'nothing'}")
    except BaseException as e:
        for part in PARTS:
            c.flush(part)
        c.flush_traces()
        c.info["error"] = f"rank {c.rank}: {type(e).__name__}: {e}"
        c.write_info("failed")
        raise
    finally:
        from reference.parallel.groups import _PG_CACHE

        _PG_CACHE.clear()
        gc.collect()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
