"""The collectives part of the multi-GPU run (`paper_repro.multigpu_run`): nccl-tests-style sweeps of
all-reduce, all-gather, reduce-scatter and all-to-all (even and `uneven_splits`) with torch.distributed, each
checked once, timed by `Ctx.time_loop`, reported as time, algorithm and bus bandwidth (`bus_factor`).
"""

from __future__ import annotations

from paper_repro.multigpu_context import Ctx
from paper_repro.multigpu_settings import MiB


def bus_factor(collective: str, n: int) -> float:
    """nccl-tests' bus-bandwidth factor: all-reduce 2(n-1)/n, all-gather / reduce-scatter / all-to-all (n-1)/n."""
    return (2.0 if collective == "all_reduce" else 1.0) * (n - 1) / n


def uneven_splits(n: int, elems: int) -> list[list[int]]:
    """``splits[s][d]`` elements rank s sends to rank d: proportional to ``1 + (s + d) mod n`` (every pair
    differs, every row and column has the same weights), each row summing to exactly ``elems``."""
    W = n * (n + 1) // 2
    out = []
    for s in range(n):
        row = [elems * (1 + (s + d) % n) // W for d in range(n)]
        row[s] += elems - sum(row)
        out.append(row)
    return out



def _collective_op(c: Ctx, name: str, size: int):
    """(fn, actual size in bytes, check) for one collective of nominal ``size`` bytes (float32)."""
    torch, dist, n, r = c.torch, c.dist, c.world, c.rank
    ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    f32 = dict(dtype=torch.float32, device=c.dev)
    if name == "all_reduce":
        count = size // 4
        if count < 1:
            return None
        buf = torch.full((count,), float(r + 1), **f32)
        return (lambda: dist.all_reduce(buf)), count * 4, None
    per = size // (4 * n)
    if per < 1:
        return None
    if name == "all_gather":
        inp, out = torch.full((per,), float(r), **f32), torch.empty(per * n, **f32)

        def check():
            ag(out, inp)
            return bool((out.view(n, per) == torch.arange(n, **f32).view(n, 1)).all())

        return (lambda: ag(out, inp)), per * n * 4, check
    if name == "reduce_scatter":
        inp, out = torch.full((per * n,), float(r + 1), **f32), torch.empty(per, **f32)

        def check():
            rs(out, inp)
            return bool((out == n * (n + 1) / 2).all())

        return (lambda: rs(out, inp)), per * n * 4, check
    if name == "all_to_all":
        inp, out = torch.empty(per * n, **f32), torch.empty(per * n, **f32)
        inp.view(n, per).copy_((r * n + torch.arange(n, **f32)).view(n, 1))

        def check():
            dist.all_to_all_single(out, inp)
            return bool((out.view(n, per) == (torch.arange(n, **f32) * n + r).view(n, 1)).all())

        return (lambda: dist.all_to_all_single(out, inp)), per * n * 4, check
    if name == "all_to_all_uneven":
        S = uneven_splits(n, per * n)
        send, recv = S[r], [S[s][r] for s in range(n)]
        inp, out = torch.empty(sum(send), **f32), torch.empty(sum(recv), **f32)
        inp.copy_(torch.repeat_interleave(r * n + torch.arange(n, **f32), torch.tensor(send, device=c.dev)))

        def check():
            dist.all_to_all_single(out, inp, recv, send)
            want = torch.repeat_interleave(torch.arange(n, **f32) * n + r, torch.tensor(recv, device=c.dev))
            return bool((out == want).all())

        return (lambda: dist.all_to_all_single(out, inp, recv, send)), per * n * 4, check
    raise ValueError(name)


def run_collectives(c: Ctx) -> None:
    st, n = c.st, c.world
    for name in st.collectives:
        checked = False
        for size in st.sizes:
            if c.over_budget(f"collectives {name} {size} B and larger", need_s=5.0 if size >= 256 * MiB else 1.0):
                break
            op = _collective_op(c, name, size)
            if op is None:
                continue
            fn, nbytes, check = op
            if not checked:
                if name == "all_reduce":  # in place: check on a fresh buffer of the first size
                    buf = c.torch.full((nbytes // 4,), float(c.rank + 1), dtype=c.torch.float32, device=c.dev)
                    c.dist.all_reduce(buf)
                    ok = bool((buf == n * (n + 1) / 2).all())
                else:
                    ok = check()
                ok = c.all_max(0.0 if ok else 1.0) == 0.0
                c.add("collectives", name, st.backend, "check_ok", int(ok), size_bytes=nbytes)
                checked = True
                if not ok:
                    c.log(f"WARNING: {name} gave a wrong result at {nbytes} B")
            iters = st.coll_iters if nbytes <= 256 * MiB else max(5, st.coll_iters // 2)
            t = c.gather_floats([c.time_loop(fn, st.coll_warmup, iters)])[:, 0]
            mean, tmax = float(t.mean()), float(t.max())
            algbw = nbytes / mean / 1e9
            busbw = algbw * bus_factor(name, n)
            for metric, v in (("time_us", mean * 1e6), ("time_us_max", tmax * 1e6), ("algbw_GBps", algbw),
                              ("busbw_GBps", busbw), ("iters", iters)):
                c.add("collectives", name, st.backend, metric, float(v) if metric != "iters" else v, size_bytes=nbytes)
            c.flush("collectives")
            c.log(f"{name:18s} {nbytes:>12d} B  {mean * 1e6:10.1f} us  algbw {algbw:8.2f} GB/s  busbw {busbw:8.2f} GB/s")
            del fn, op
        c.free()
