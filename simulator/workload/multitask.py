"""Multi-task MoE training with per-task batches and an elastic device allocation (SEMOE.md mechanism 5
"Elastic MoE training"; experiment "UFO": 48 A100-80G, 6 nodes x 8).

The model is the one ``reference/multitask.py`` builds, at ViT scale: every block is
``h + attn(LN(h))`` then ``h + shared(LN(h)) + expert_t(LN(h))`` (a shared expert plus one expert per
task, samples routed by task id, as UFO's public code), a per-task head on the class token. Routing by
task id needs no all-to-all: a device holds the experts and heads of the tasks placed on it and runs
its own samples end to end. What each device holds and reduces (as ``reference.multitask.TaskSync``):

    shared params (patch embed, cls, pos, attention, norms, shared experts)  all-reduce over all devices
    expert_t (every layer) and head_t                                          all-reduce over devices of t

Notation: L layers, h hidden, f expert FFN width, N = (image/patch)^2 patches, T = N + 1 tokens per
sample, C_t classes of task t, b = 2 bytes (bf16).

Parameters (:class:`MultiTaskModel`, GELU FFNs and LayerNorms with biases):
    shared  = 3 p^2 h + h (patch conv) + h (cls) + T h (pos) + 2 h (final LN)
              + L (4 h^2 + 4 h  +  2 * 2 h  +  2 h f + f + h)        attention, 2 LNs, shared expert
    task t  = L (2 h f + f + h) + h C_t + C_t                         its expert in every layer, its head
Forward FLOPs per sample (2 per multiply-add, matmuls only, full attention as `semoe.sizing`):
    2 N 3p^2 h + L (2 T 4h^2 + 4 T^2 h + 2 * 2 T 2 h f) + 2 h C_t;  training = 3 x forward.

Time (per device and micro-batch, through ``sim.cost``, the simulator's cost model; with S samples,
S_t of task t, T_d = S T tokens): ``embed_fwd`` = matmul(S N, h, 3p^2); per layer ``attention_fwd`` =
matmul(T_d, 3h, h) + attention_core(T_d, T, h) + matmul(T_d, h, h) + memory(8 T_d h b) (exactly
`training.TrainingIteration`'s attention), ``shared_expert_fwd`` = 2 matmul(T_d, f, h),
``task_experts_fwd`` = sum_t 2 matmul(S_t T, f, h); ``heads_fwd`` = sum_t matmul(S_t, C_t, h).
Backward phases cost ``2 * cost.backward_gemm_factor`` x their forward (as the training workload).
A device's samples run in micro-batches of at most ``micro_batch_cap`` samples (gradient accumulation;
None: all at once), tasks in name order.

Step (no overlap of gradient reduction with backward, the same for every allocation): every device
computes all its micro-batches, then enters ``shared_grad_allreduce`` (2 bytes x shared params, over all
devices: it starts when the slowest device arrives), then for each of its tasks in name order whose
group has > 1 device ``task_grad_allreduce`` (2 bytes x task params, over that task's devices), then the
Adam update on the GPU (``cost.memory(32 bytes x held params)``, `training.ADAM_BYTES_PER_PARAM`).
Step time = slowest device's end: max compute + communication + optimizer.

Memory (``sim.memory``, `semoe.sizing` conventions, plain data parallelism, ZeRO stage 0): model states
16 bytes per held parameter (`semoe.sizing.STATE_BYTES`: bf16 param + grad, fp32 master, m, v) for the
shared params plus the experts and heads of the device's tasks; activations kept for backward as
`training.TrainingIteration._act_bytes` counts them (Korthikanti et al. 2022, 16-bit, flash
attention): ``15 T_d h`` per block for attention and norms plus ``tokens (3 h + 4 f)`` for each of the
two FFNs a token passes (shared and its task's expert), allocated per block in the forward and freed in
the backward of the micro-batch (patch-embedding and head activations, < 1%, are not counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from semoe.elastic import Placement, Plan, TaskSet, TaskSpec, plan_downscale, plan_upscale
from semoe.sizing import STATE_BYTES
from semoe.spec_base import Spec, SpecError
from simulator import collectives as C
from simulator.engine import Sim
from simulator.workload.training import ADAM_BYTES_PER_PARAM

GRAD_BYTES = 2  # bf16 gradients are reduced, as the training workload counts them

# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True, kw_only=True)
class MultiTaskModel(Spec):
    """A ViT-like multi-task MoE backbone: shared expert + one expert per task in every block."""

    name: str = "multitask-vit"
    hidden: int = 1536
    layers: int = 24
    heads: int = 16
    ffn: int = 6144
    image: int = 224
    patch: int = 16
    channels: int = 3
    classes: int = 1000  # per task head (the same for every task)
    tasks: tuple[str, ...] = ("a", "b")
    dtype: str = "bf16"
    dtype_bytes: int = 2

    def validate(self) -> None:
        self.require_positive("hidden", "layers", "heads", "ffn", "image", "patch", "channels", "classes",
                              "dtype_bytes")
        if self.hidden % self.heads:
            self.fail("hidden", f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.image % self.patch:
            self.fail("image", f"image ({self.image}) must be divisible by patch ({self.patch})")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            self.fail("tasks", "at least one task, names unique")

    # -- shapes
    @property
    def patches(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def tokens(self) -> int:  # patches + class token
        return self.patches + 1

    # -- parameters
    def ffn_params(self) -> int:
        h, f = self.hidden, self.ffn
        return 2 * h * f + f + h

    def shared_params(self) -> int:
        h, p, T = self.hidden, self.patch, self.tokens
        embed = self.channels * p * p * h + h + h + T * h + 2 * h
        block = (4 * h * h + 4 * h) + 2 * (2 * h) + self.ffn_params()
        return embed + self.layers * block

    def task_params(self) -> int:
        """One task's experts (all layers) and head."""
        return self.layers * self.ffn_params() + self.hidden * self.classes + self.classes

    def total_params(self) -> int:
        return self.shared_params() + len(self.tasks) * self.task_params()

    # -- FLOPs
    def forward_flops_per_sample(self) -> float:
        h, f, T, N, p = self.hidden, self.ffn, self.tokens, self.patches, self.patch
        embed = 2.0 * N * self.channels * p * p * h
        layer = 2.0 * T * 4 * h * h + 4.0 * T * T * h + 2 * (2.0 * T * 2 * h * f)
        return embed + self.layers * layer + 2.0 * h * self.classes

    def training_flops_per_sample(self) -> float:
        return 3.0 * self.forward_flops_per_sample()

    # -- activations kept for backward, one block, for ``samples`` samples
    def act_bytes_per_block(self, samples: float) -> float:
        t = samples * self.tokens
        h = self.hidden
        return 15.0 * t * h + 2 * t * (3 * h + 4 * self.ffn)


# ----------------------------------------------------------------------------- the UFO setup
# SEMOE.md "Experiment setups": UFO on 48 A100-80G (6 nodes x 8); tasks get GPUs roughly in proportion to
# their batch, e.g. 8, 4, 4, 4, 8, 2, 1 and 17 tasks with 1 GPU, about 144 samples per GPU.
UFO_GPUS = (8, 4, 4, 4, 8, 2, 1) + (1,) * 17
UFO_SAMPLES_PER_GPU = 144


def ufo_model(tasks: tuple[str, ...] | None = None) -> MultiTaskModel:
    """UFO-like config (ours; the paper gives only "12B UFO"): ViT with hidden 1536, 24 layers, 16 heads
    (head dim 96), FFN 4h, 224 x 224 images in 16 x 16 patches (197 tokens), every block a task-MoE
    block with a shared expert and one expert per task (24 tasks), 1000-class linear heads:
    0.68 B shared + 24 x 0.455 B task parameters = 11.6 B (about 12 B)."""
    return MultiTaskModel(name="ufo-like-vit-moe", tasks=tasks or ufo_task_names())


def ufo_task_names() -> tuple[str, ...]:
    return tuple(f"task{i:02d}" for i in range(len(UFO_GPUS)))


def ufo_taskset(cost_per_sample_s: float = 1.0, samples_per_gpu: int = UFO_SAMPLES_PER_GPU) -> TaskSet:
    """Per-task batches = the paper's GPUs per task x ~144 samples per GPU (our derivation): 1152, 576,
    576, 576, 1152, 288, 144 and 17 x 144; 6912 samples per step in all. Every task has the same image
    size, so the same per-sample cost."""
    return TaskSet(tasks=tuple(TaskSpec(name=n, batch_size=g * samples_per_gpu, cost_per_sample_s=cost_per_sample_s)
                               for n, g in zip(ufo_task_names(), UFO_GPUS)))


# ----------------------------------------------------------------------------- allocations
def plan_equal(taskset: TaskSet, devices: int) -> Plan:
    """The naive allocation: every task gets ``devices // n_tasks`` devices (the first
    ``devices % n_tasks`` tasks one more), contiguous, data parallel inside the task (even split)."""
    n = len(taskset.tasks)
    if devices < n:
        raise SpecError(f"plan_equal: devices ({devices}) must be >= the number of tasks ({n})")
    q, r = divmod(devices, n)
    placements, d = [], 0
    for i, t in enumerate(taskset.tasks):
        k = q + (1 if i < r else 0)
        a, rem = divmod(t.batch_size, k)
        for j in range(k):
            s = a + (1 if j < rem else 0)
            if s:
                placements.append(Placement(d, t.name, s, s * t.cost_per_sample_s))
            d += 1
    return Plan(devices=devices, placements=tuple(placements))


def device_shards(plan: Plan) -> list[dict[str, int]]:
    """``[device] -> {task: samples}``."""
    out: list[dict[str, int]] = [{} for _ in range(plan.devices)]
    for p in plan.placements:
        out[p.device][p.task] = out[p.device].get(p.task, 0) + p.samples
    return out


def micro_batches(shard: dict[str, int], cap: int | None) -> list[dict[str, int]]:
    """Split a device's ``{task: samples}`` into micro-batches of at most ``cap`` samples, tasks in name
    order, filled contiguously (None or a cap >= the total: one micro-batch)."""
    total = sum(shard.values())
    if total == 0:
        return []
    if cap is None or cap >= total:
        return [dict(sorted(shard.items()))]
    if cap < 1:
        raise SpecError(f"micro_batch_cap ({cap}) must be >= 1")
    out: list[dict[str, int]] = [{}]
    room = cap
    for t, s in sorted(shard.items()):
        while s > 0:
            if room == 0:
                out.append({})
                room = cap
            k = min(s, room)
            out[-1][t] = out[-1].get(t, 0) + k
            s -= k
            room -= k
    return out


# ----------------------------------------------------------------------------- compute
def phase_times(model: MultiTaskModel, cost, mb: dict[str, int]) -> dict[str, float]:
    """Forward time of each phase of one micro-batch ``{task: samples}`` (one block for the per-layer
    phases), from the cost model (module docstring)."""
    h, f, T, dt, b = model.hidden, model.ffn, model.tokens, model.dtype, model.dtype_bytes
    S = sum(mb.values())
    Td = S * T
    if S == 0:
        return {"embed_fwd": 0.0, "attention_fwd": 0.0, "shared_expert_fwd": 0.0, "task_experts_fwd": 0.0,
                "heads_fwd": 0.0}
    return {
        "embed_fwd": cost.matmul(S * model.patches, h, model.channels * model.patch ** 2, dt),
        "attention_fwd": (cost.matmul(Td, 3 * h, h, dt) + cost.attention_core(Td, T, h, dt)
                          + cost.matmul(Td, h, h, dt) + cost.memory(8 * Td * h * b)),
        "shared_expert_fwd": 2 * cost.matmul(Td, f, h, dt),
        "task_experts_fwd": sum(2 * cost.matmul(s * T, f, h, dt) for s in mb.values() if s),
        "heads_fwd": sum(cost.matmul(s, model.classes, h, dt) for s in mb.values() if s),
    }


def device_compute_s(model: MultiTaskModel, cost, shard: dict[str, int], cap: int | None = None) -> float:
    """Forward + backward compute seconds of one device (no communication, no optimizer)."""
    bwd = 2.0 * cost.backward_gemm_factor
    total = 0.0
    for mb in micro_batches(shard, cap):
        t = phase_times(model, cost, mb)
        per_layer = t["attention_fwd"] + t["shared_expert_fwd"] + t["task_experts_fwd"]
        total += (1 + bwd) * (t["embed_fwd"] + t["heads_fwd"] + model.layers * per_layer)
    return total


def cost_per_sample_s(model: MultiTaskModel, cost, samples: int = UFO_SAMPLES_PER_GPU) -> float:
    """The planner's per-sample cost: a device's compute time at the nominal load / samples."""
    return device_compute_s(model, cost, {model.tasks[0]: samples}) / samples


# ----------------------------------------------------------------------------- the iteration
@dataclass
class CollectiveRecord:
    phase: str
    group: tuple[int, ...]
    nbytes: float


@dataclass
class MultiTaskIteration:
    """One training step of ``model`` placed by ``plan`` on ``sim``'s cluster (first ``plan.devices``
    ranks). See the module docstring."""

    model: MultiTaskModel
    plan: Plan
    sim: Sim
    micro_batch_cap: int | None = None
    collectives: list[CollectiveRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        W = self.sim.cluster.world_size
        if self.plan.devices > W:
            raise SpecError(f"allocation needs {self.plan.devices} devices, the cluster has {W}")
        unknown = {p.task for p in self.plan.placements} - set(self.model.tasks)
        if unknown:
            raise SpecError(f"allocation places tasks the model lacks: {', '.join(sorted(unknown))}")
        self.D = self.plan.devices
        self.env = self.sim.env
        self.shards = device_shards(self.plan)
        self.task_devices = {t: self.plan.devices_of(t) for t in self.model.tasks}
        self.held_params = np.array([self.model.shared_params() + len(s) * self.model.task_params()
                                     for s in self.shards], dtype=float)
        self.compute_s = np.zeros(self.D)
        self.comm_s = np.zeros(self.D)
        self.end = np.zeros(self.D)
        for r in range(self.D):
            self.sim.memory.alloc(0.0, r, "hbm", "model_states", STATE_BYTES * self.held_params[r])

    # -- primitives
    def _compute(self, r: int, layer: int, mb: int, phase: str, dur: float, flops: float = 0.0):
        t0 = self.env.now
        yield self.env.timeout(dur)
        self.compute_s[r] += dur
        self.sim.record(r, layer, mb, phase, t0, t0 + dur, 0, flops, "compute")

    def _allreduce(self, r: int, key, phase: str, group: list[int], nbytes: float):
        topo = self.sim.topo
        g = np.asarray(group)
        if r == group[0]:
            self.collectives.append(CollectiveRecord(phase, tuple(group), nbytes))
        t0 = self.env.now
        yield self.sim.collective(key, r, len(group), lambda: C.all_reduce(topo, g, nbytes))
        self.comm_s[r] += self.env.now - t0
        self.sim.record(r, -1, -1, phase, t0, self.env.now, nbytes, 0, "comm")

    # -- one device
    def process(self, r: int):
        m, cost, mem = self.model, self.sim.cost, self.sim.memory
        bwd = 2.0 * cost.backward_gemm_factor
        shard = self.shards[r]
        for k, mb in enumerate(micro_batches(shard, self.micro_batch_cap)):
            t = phase_times(m, cost, mb)
            act = m.act_bytes_per_block(sum(mb.values()))
            yield from self._compute(r, -1, k, "embed_fwd", t["embed_fwd"])
            for i in range(m.layers):
                yield from self._compute(r, i, k, "attention_fwd", t["attention_fwd"])
                yield from self._compute(r, i, k, "shared_expert_fwd", t["shared_expert_fwd"])
                yield from self._compute(r, i, k, "task_experts_fwd", t["task_experts_fwd"])
                mem.alloc(self.env.now, r, "hbm", "activations", act)
            yield from self._compute(r, -1, k, "heads_fwd", t["heads_fwd"])
            yield from self._compute(r, -1, k, "heads_bwd", bwd * t["heads_fwd"])
            for i in reversed(range(m.layers)):
                yield from self._compute(r, i, k, "task_experts_bwd", bwd * t["task_experts_fwd"])
                yield from self._compute(r, i, k, "shared_expert_bwd", bwd * t["shared_expert_fwd"])
                yield from self._compute(r, i, k, "attention_bwd", bwd * t["attention_fwd"])
                mem.free(self.env.now, r, "hbm", "activations", act)
            yield from self._compute(r, -1, k, "embed_bwd", bwd * t["embed_fwd"])
        all_devices = list(range(self.D))
        if self.D > 1:
            yield from self._allreduce(r, ("shared_grad",), "shared_grad_allreduce", all_devices,
                                       GRAD_BYTES * m.shared_params())
        for task in sorted(shard):
            group = self.task_devices[task]
            if len(group) > 1:
                yield from self._allreduce(r, ("task_grad", task), "task_grad_allreduce", group,
                                           GRAD_BYTES * m.task_params())
        t0 = self.env.now
        dur = cost.memory(ADAM_BYTES_PER_PARAM * self.held_params[r])
        yield self.env.timeout(dur)
        self.sim.record(r, -1, -1, "optimizer", t0, t0 + dur, 0, 0, "compute")
        self.end[r] = self.env.now

    def run(self) -> dict:
        for r in range(self.D):
            self.env.process(self.process(r))
        self.env.run()
        self.sim.check_all_joined()
        return self.summary()

    def summary(self) -> dict:
        step = float(self.end.max())
        samples = sum(p.samples for p in self.plan.placements)
        peak = self.sim.memory.peak[: self.D, 0]
        mean_compute = float(self.compute_s.mean())
        flops = self.model.training_flops_per_sample() * samples
        gpu = self.sim.cluster.gpu
        return {
            "devices": self.D,
            "samples": samples,
            "step_time_s": step,
            "samples_per_s": samples / step if step > 0 else float("inf"),
            "max_compute_s": float(self.compute_s.max()),
            "mean_compute_s": mean_compute,
            "imbalance": float(self.compute_s.max()) / mean_compute if mean_compute > 0 else float("nan"),
            "comm_s": float(self.comm_s[int(self.compute_s.argmax())]),  # exposed on the slowest device
            "peak_hbm_bytes": float(peak.max()),
            "mean_hbm_bytes": float(peak.mean()),
            "peak_hbm_device": int(peak.argmax()),
            "mfu": flops / step / (self.D * gpu.bf16_tflops * 1e12) if step > 0 else 0.0,
            "oom": "; ".join(self.sim.memory.oom()),
        }


def simulate_multitask(model: MultiTaskModel, plan: Plan, cluster, micro_batch_cap: int | None = None,
                       backend: str = "analytic", trace: bool = False) -> tuple[Sim, dict]:
    """Simulate one step; the cost model is the roofline for the cluster's GPU (``profile=None``: no
    measured profile exists for the A100, `simulator.cost`)."""
    sim = Sim(cluster, backend=backend, profile=None, trace=trace)
    return sim, MultiTaskIteration(model, plan, sim, micro_batch_cap).run()


def ufo_plans(model: MultiTaskModel, cost, devices: int = 48, slowdown: float = 0.10,
              samples_per_gpu: int = UFO_SAMPLES_PER_GPU) -> dict[str, Plan]:
    """naive (equal share), planned (``plan_upscale`` on ``devices``) and downscaled (``plan_downscale``:
    fewest devices whose planned step is within ``slowdown`` of the planned one); the planner's
    per-sample cost is :func:`cost_per_sample_s` (equal for every task here)."""
    c = cost_per_sample_s(model, cost, samples_per_gpu)
    ts = ufo_taskset(c, samples_per_gpu)
    return {"naive": plan_equal(ts, devices), "planned": plan_upscale(ts, devices),
            "downscaled": plan_downscale(ts, devices, slowdown)}


def used_devices(plan: Plan) -> int:
    return len({p.device for p in plan.placements})


def trim(plan: Plan) -> Plan:
    """Drop idle devices (renumbering the used ones in order) so a plan runs on its used devices only."""
    used = sorted({p.device for p in plan.placements})
    idx = {d: i for i, d in enumerate(used)}
    return Plan(devices=len(used), placements=tuple(Placement(idx[p.device], p.task, p.samples, p.load)
                                                   for p in plan.placements))


__all__ = ["MultiTaskModel", "MultiTaskIteration", "CollectiveRecord", "plan_equal", "device_shards",
           "micro_batches", "phase_times", "device_compute_s", "cost_per_sample_s", "simulate_multitask",
           "ufo_model", "ufo_taskset", "ufo_plans", "ufo_task_names", "trim", "used_devices", "UFO_GPUS",
           "UFO_SAMPLES_PER_GPU"]
