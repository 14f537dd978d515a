import torch

from reference.op_count import count_ops


def test_counts_kernels_views_and_syncs():
    x = torch.randn(4, 4)

    def f(x):
        y = x + 1  # kernel
        z = y.view(16)  # view
        w = torch.relu(z)  # kernel
        return float(w.sum())  # sum kernel + item (sync)

    out, c = count_ops(f, x)
    assert out == float(torch.relu((x + 1).view(16)).sum())
    assert c.by_name["aten.add"] == 1 and c.by_name["aten.relu"] == 1 and c.by_name["aten.sum"] == 1
    assert c.views == 1
    assert c.syncs == 1  # aten._local_scalar_dense
    assert c.kernels == 4


def test_counts_a_module_forward_and_add():
    lin = torch.nn.Linear(8, 8)
    _, a = count_ops(lin, torch.randn(2, 8))
    _, b = count_ops(lin, torch.randn(2, 8))
    assert a.kernels >= 1 and (a + b).kernels == 2 * a.kernels
