"""Text -> token windows: the training stream (random windows, drawn by a seeded generator
whose state a checkpoint keeps) and the held-out windows (consecutive, never trained on)."""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np

from ..errors import LLMCError

_CHUNK_CHARS = 1 << 16  # tokenized in line-aligned chunks: one multi-MB string is slow in every tokenizer


def read_text(path: str, what: str) -> str:
    """The file's text, or an LLMCError naming why it cannot be trained on."""
    p = pathlib.Path(path)
    if not p.exists():
        raise LLMCError(f"{what} {path}: no such file")
    if not p.is_file():
        raise LLMCError(f"{what} {path}: not a regular file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LLMCError(f"{what} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise LLMCError(f"{what} {path}: cannot read it ({e.strerror})") from None
    if not text.strip():
        raise LLMCError(f"{what} {path}: the file is empty")
    return text


def _chunks(text: str) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + _CHUNK_CHARS)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        out.append(text[start:end])
        start = end
    return out


def tokenize(tokenizer, text: str) -> np.ndarray:
    """All of the text's token ids, without special tokens (the teacher saw raw text)."""
    enc = tokenizer(_chunks(text), add_special_tokens=False)["input_ids"]
    return np.fromiter((t for ids in enc for t in ids), dtype=np.int64)


@dataclass
class TokenData:
    train: np.ndarray
    heldout: np.ndarray
    seq_len: int

    def heldout_windows(self, limit: int | None = None) -> np.ndarray:
        """[n, seq_len + 1] consecutive windows (inputs + the next token of each position)."""
        n = (self.heldout.size - 1) // self.seq_len
        if limit is not None:
            n = min(n, limit)
        return np.stack([self.heldout[i * self.seq_len:(i + 1) * self.seq_len + 1] for i in range(n)])


def load_data(tokenizer, data: str, heldout: str | None, seq_len: int, fraction: float) -> TokenData:
    train_ids = tokenize(tokenizer, read_text(data, "--data"))
    if heldout is not None:
        held_ids = tokenize(tokenizer, read_text(heldout, "--heldout"))
    else:
        cut = int(train_ids.size * (1 - fraction))
        train_ids, held_ids = train_ids[:cut], train_ids[cut:]
    where = "--heldout" if heldout is not None else f"the last {fraction:.0%} of --data (held out)"
    if train_ids.size < seq_len + 1:
        raise LLMCError(f"--data {data}: {train_ids.size} training tokens, fewer than one window of --seq-len "
                        f"{seq_len} + 1")
    if held_ids.size < seq_len + 1:
        raise LLMCError(f"{where}: {held_ids.size} tokens, fewer than one held-out window of --seq-len "
                        f"{seq_len} + 1")
    return TokenData(train_ids, held_ids, seq_len)


class WindowSampler:
    """Random training windows [batch, seq_len + 1]; its generator state goes into checkpoints
    so a resumed run draws the batches the uninterrupted run would have drawn."""

    def __init__(self, ids: np.ndarray, seq_len: int, batch: int, seed: int):
        self.ids, self.seq_len, self.batch = ids, seq_len, batch
        self.rng = np.random.default_rng(seed)

    def next(self) -> np.ndarray:
        starts = self.rng.integers(0, self.ids.size - self.seq_len - 1, self.batch, endpoint=True)
        return np.stack([self.ids[s:s + self.seq_len + 1] for s in starts])

    @property
    def state(self) -> dict:
        return self.rng.bit_generator.state

    @state.setter
    def state(self, value: dict) -> None:
        self.rng.bit_generator.state = value


def calibration_windows(ids: np.ndarray, seq_len: int, n: int, seed: int) -> np.ndarray:
    """n random training windows [n, seq_len + 1] for layer and width scores (a generator of
    their own: the training batches do not depend on whether calibration ran)."""
    return WindowSampler(ids, seq_len, n, seed + 1).next()
