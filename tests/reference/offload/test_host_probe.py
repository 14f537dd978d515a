"""reference.offload.host_probe (task hB2): topology parsing, the binding cases, page-placement parsing, and the
--quick run end to end (main time series + two bound children, CPU: pinned = plain)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference.offload import host_probe as hp

REPO = Path(__file__).resolve().parents[3]


def test_cpulist_round_trip_and_errors():
    assert hp.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert hp.format_cpulist([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert hp.format_cpulist(hp.parse_cpulist("5")) == "5"
    with pytest.raises(ValueError, match="bad CPU list"):
        hp.parse_cpulist("0-a")


def test_case_name_round_trip_and_errors():
    c = hp.case_name(scope="main", tick=3, t_s="6.1", variant="pinned")
    assert c == "scope=main tick=3 t_s=6.1 variant=pinned"
    assert hp.parse_case(c) == {"scope": "main", "tick": "3", "t_s": "6.1", "variant": "pinned"}
    with pytest.raises(ValueError, match="must not contain spaces"):
        hp.case_name(scope="a b")
    with pytest.raises(ValueError, match="not key=value"):
        hp.parse_case("scope=main oops")


def test_one_per_core_keeps_the_first_thread_of_each_core():
    sib = {c: [c % 4, c % 4 + 4] for c in range(8)}  # cores (0,4) (1,5) (2,6) (3,7)
    assert hp.one_per_core(range(8), sib) == [0, 1, 2, 3]
    assert hp.one_per_core([4, 5, 2], sib) == [2, 4, 5]  # only allowed threads count
    assert hp.one_per_core([0, 1], {}) == [0, 1]  # no sibling info: every CPU is a core


def test_bind_cases_two_nodes_with_smt():
    nodes = {0: [0, 1, 2, 3, 8, 9, 10, 11], 1: [4, 5, 6, 7, 12, 13, 14, 15]}
    sib = {c: [c % 8, c % 8 + 8] for c in range(16)}
    cases = {name: (cpus, env) for name, cpus, env in hp.bind_cases(range(16), nodes, sib)}
    assert list(cases) == ["fresh", "node0", "node1", "close", "spread", "physcores", "thp"]
    assert cases["node0"][0] == nodes[0] and cases["node1"][0] == nodes[1]
    assert cases["fresh"] == (list(range(16)), {})
    assert cases["close"][1] == {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
    assert cases["spread"][1]["OMP_PROC_BIND"] == "spread"
    assert cases["physcores"][0] == list(range(8))
    assert cases["thp"][1] == {"THP_MEM_ALLOC_ENABLE": "1"}


def test_bind_cases_one_node_binds_halves_and_skips_physcores_without_smt():
    cases = hp.bind_cases([0, 1, 2, 3, 4], {0: list(range(5))}, {})
    names = [n for n, _, _ in cases]
    assert names == ["fresh", "half0", "half1", "close", "spread", "thp"]
    assert cases[1][1] == [0, 1] and cases[2][1] == [2, 3, 4]
    # a node outside the mask does not count: still one usable node -> halves
    assert [n for n, _, _ in hp.bind_cases([0, 1], {0: [0, 1], 1: [2, 3]}, {})][1:3] == ["half0", "half1"]
    with pytest.raises(ValueError, match="empty affinity"):
        hp.bind_cases([], {}, {})


def test_madvise_huge_accepts_a_fresh_tensor():
    t = torch.empty(4 << 20)  # 16 MiB, not yet touched
    if sys.platform == "linux":
        assert hp.madvise_huge(t) is True
    assert hp.madvise_huge(torch.empty(0)) is False  # no whole page


def test_page_nodes_sees_touched_and_untouched_pages():
    t = torch.ones(4 << 20)  # touched: every sampled page is on a node
    got = hp.page_nodes(t.data_ptr(), t.numel() * 4, samples=64)
    if got:  # {} where move_pages is unavailable (architecture, seccomp)
        assert sum(got.values()) == 64 and all(k >= 0 for k in got)
        u = torch.empty(4 << 20)  # fresh mmap, never touched: not present (ENOENT)
        assert hp.page_nodes(u.data_ptr(), u.numel() * 4, samples=64).get(-2, 0) >= 60


def test_vma_info_parses_maps_numa_maps_smaps():
    texts = {
        "maps": "55d000000000-55d000001000 r--p 00000000 08:01 1 /usr/bin/python\n"
                "7f0000000000-7f0040000000 rw-s 00000000 00:05 7 /dev/nvidiactl\n",
        "numa_maps": "55d000000000 default file=/usr/bin/python mapped=1 N0=1 kernelpagesize_kB=4\n"
                     "7f0000000000 bind:1 file=/dev/nvidiactl dirty=262144 N1=200000 N0=62144 kernelpagesize_kB=4\n",
        "smaps": "55d000000000-55d000001000 r--p 00000000 08:01 1 /usr/bin/python\nSize: 4 kB\nRss: 4 kB\n"
                 "AnonHugePages: 0 kB\n"
                 "7f0000000000-7f0040000000 rw-s 00000000 00:05 7 /dev/nvidiactl\nSize: 1048576 kB\n"
                 "Rss: 1048576 kB\nAnonHugePages: 2048 kB\nLocked: 1048576 kB\nVmFlags: rd wr sh\n",
    }
    info = hp.vma_info(0x7F0000100000, texts)
    assert info["path"] == "/dev/nvidiactl" and info["vma_MB"] == 1024.0 and info["policy"] == "bind:1"
    assert info["node1_pages"] == 200000 and info["node0_pages"] == 62144 and info["kernelpagesize_kB"] == 4
    assert info["Rss_kB"] == 1048576 and info["AnonHugePages_kB"] == 2048 and info["Locked_kB"] == 1048576
    assert hp.vma_info(0x1000, texts) == {}  # not mapped


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_vma_info_finds_a_live_tensor_and_counters_are_sane():
    t = torch.ones(8 << 20)  # 32 MiB, touched
    info = hp.vma_info(t.data_ptr())
    assert info["vma_MB"] >= 32 and info.get("Rss_kB", 32 << 10) >= 32 << 10
    c = hp.Counters()
    float(torch.ones(1 << 20).sum())
    got = c.take()
    if "steal_pct" in got:
        assert 0.0 <= got["steal_pct"] <= 100.0 and 0.0 <= got["busy_pct"] <= 100.0


def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "probe"
    env = dict(os.environ, PYTHONPATH=str(REPO), SEMOE_COMMIT="testcommit")
    r = subprocess.run([sys.executable, "-m", "reference.offload.host_probe", "--out", str(out), "--quick"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    facts = (out / hp.FACTS_NAME).read_text()
    for section in ("== os.sched_getaffinity(0)", "== transparent_hugepage", "== lscpu", "== numactl -H"):
        assert section in facts
    with (out / hp.CSV_NAME).open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == hp.COLUMNS and all(r["commit"] == "testcommit" for r in rows)
    parsed = [(hp.parse_case(r["case"]), r["metric"], r["value"]) for r in rows]
    main = [(c, float(v)) for c, m, v in parsed if c["scope"] == "main" and m == "adam_Mparams_per_s"]
    assert {c["variant"] for c, _ in main} == set(hp.VARIANTS_CPU)
    assert len({c["tick"] for c, _ in main}) >= 2 and all(v > 0 for _, v in main)
    assert any(c["scope"] == "main" and m == "state_read_GBps" and float(v) > 0 for c, m, v in parsed)
    # the two first binding cases ran in their own processes, with the CPU mask they were given
    aff = sorted(os.sched_getaffinity(0))
    want = hp.bind_cases(aff, hp.numa_nodes(), hp.smt_siblings())[:2]
    for name, cpus, _ in want:
        got = {m: float(v) for c, m, v in parsed if c["scope"] == "child" and c.get("bind") == name}
        assert got["affinity_cpus"] == len(cpus) and "child_rc" not in got, (name, got)
        assert got["worker_affinity_cpus"] == len(cpus)
        assert any(c["scope"] == "child" and c.get("bind") == name and m == "adam_Mparams_per_s" and float(v) > 0
                   for c, m, v in parsed)
        assert any(c["scope"] == "ref" and c.get("before") == name for c, _, _ in parsed)
    if sys.platform == "linux":  # huge-page advice taken on every buffer (state, grads, mirror) of the layout
        assert any(c["scope"] == "main" and c["variant"] == "plain_thp" and m == "madvised_buffers"
                   and float(v) == 1 + 2 * len(hp.layer_shapes(True)[1]) for c, m, v in parsed)
    # page placement of every variant at the start and the end of the main process
    alloc = {(c["when"], c["variant"], c["buf"]) for c, m, _ in parsed if c["scope"] == "alloc" and c["proc"] == "main"
             and m == "vma_MB"}
    if Path("/proc/self/maps").is_file():
        assert alloc == {(w, v, b) for w in ("start", "end") for v in hp.VARIANTS_CPU for b in ("state", "grad")}
    child_vars = {c["variant"] for c, m, _ in parsed if c["scope"] == "child" and m == "adam_Mparams_per_s"}
    assert child_vars == set(hp.CHILD_VARIANTS)
