"""Encoders for tests/unit/test_embed_cli.py, loaded by `fusemoe embed --encoder embed_encoders:...`
(this directory is on the subprocesses' PYTHONPATH)."""

import os
import signal

import numpy as np

from fusemoe.data.encoders import hashing_text


def counting(items: list[str]) -> np.ndarray:
    """hashing_text, logging each batch's size to $EMBED_CALLS; kills its own process (SIGKILL,
    no clean-up) on call number $EMBED_KILL_AT of this process."""
    counting.calls = getattr(counting, "calls", 0) + 1
    if os.environ.get("EMBED_KILL_AT") == str(counting.calls):
        os.kill(os.getpid(), signal.SIGKILL)
    with open(os.environ["EMBED_CALLS"], "a") as f:
        f.write(f"{len(items)}\n")
    return hashing_text(items)


def narrow(items: list[str]) -> np.ndarray:
    return hashing_text(items, width=16)


def as_torch(items: list[str]):
    import torch

    return torch.from_numpy(hashing_text(items)).to(torch.float64)


def nan_for_marked(items: list[str]) -> np.ndarray:
    """NaN in element 5 of the vector of every item containing MARK."""
    out = hashing_text(items)
    out[["MARK" in t for t in items], 5] = np.nan
    return out


def inf_after_float32(items: list[str]) -> np.ndarray:
    return np.full((len(items), 4), 1e39)  # finite float64, inf as float32


def wider_for_marked(items: list[str]) -> np.ndarray:
    """Width 16 for a batch holding an item containing MARK, else 8."""
    return hashing_text(items, width=16 if any("MARK" in t for t in items) else 8)


def one_dimensional(items: list[str]) -> np.ndarray:
    return np.zeros(len(items), dtype=np.float32)


def one_row_short(items: list[str]) -> np.ndarray:
    return hashing_text(items)[1:]


def words(items: list[str]) -> list[list[str]]:
    return [[t] for t in items]


def fails(items: list[str]) -> np.ndarray:
    raise FileNotFoundError(f"no such image: {items[0]}")


NOT_CALLABLE = 3
