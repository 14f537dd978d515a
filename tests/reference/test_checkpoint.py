"""Checkpoints in one process: atomic write, manifest, a corrupt or truncated shard named in the error.
(Resume, resharding and the killed-rank restart run on gloo ranks: tests/reference/parallel/test_checkpoint_distributed.py.)"""

from __future__ import annotations

import pytest
import torch

from reference.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint


def _spec(dtype="fp64"):
    from semoe.presets import model_preset

    return model_preset("tiny").replace(dtype=dtype)


def test_corrupt_or_truncated_shard_is_named(tmp_path):
    from reference.model import MoEDecoder

    model = MoEDecoder(_spec(), seed=0).to(torch.float64)
    opt = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path, 3, model, opt, extra={"next_step": 3})
    assert latest_checkpoint(tmp_path) == path and not list(tmp_path.glob(".*tmp*"))
    assert verify_checkpoint(path)["step"] == 3
    shard = path / "rank_00000.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint shard .*rank_00000\.pt is corrupt: sha256"):
        load_checkpoint(path, model)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match=r"rank_00000\.pt is truncated or corrupt"):
        load_checkpoint(path, model)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        latest_checkpoint(tmp_path)
