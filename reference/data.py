"""Training data: a byte-level text corpus (any file; default the one shipped in reference/data/), or
synthetic tokens. Batches are random crops of ``seq_len + 1`` bytes: inputs and next-byte targets.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_CORPUS = "corpus.txt"


def default_corpus_path() -> Path:
    return Path(str(resources.files("reference") / "data" / DEFAULT_CORPUS))


class ByteCorpus:
    """All bytes of a text file as a uint8 tensor; ``batch()`` draws random windows (seeded)."""

    vocab = 256

    def __init__(self, path: str | Path | None = None) -> None:
        path = Path(path) if path is not None else default_corpus_path()
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        data = path.read_bytes()
        if len(data) < 2:
            raise ValueError(f"corpus {path} is too small ({len(data)} bytes)")
        self.path = path
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def __len__(self) -> int:
        return self.data.numel()

    def batch(self, batch_size: int, seq_len: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if seq_len + 1 > len(self):
            raise ValueError(f"seq_len ({seq_len}) must be < corpus size ({len(self)} bytes)")
        starts = torch.randint(0, len(self) - seq_len - 1, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
        window = self.data[idx].long()
        return window[:, :-1], window[:, 1:]


class SyntheticTokens:
    """Uniform random tokens with a learnable rule: the target is the previous token plus one (mod V),
    so a model can lower its loss well below ln(V)."""

    def __init__(self, vocab: int) -> None:
        if vocab < 2:
            raise ValueError(f"vocab ({vocab}) must be >= 2")
        self.vocab = vocab

    def batch(self, batch_size: int, seq_len: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, self.vocab, (batch_size, seq_len), generator=gen)
        return x, (x + 1) % self.vocab
