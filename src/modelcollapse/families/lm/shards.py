"""Token shards on disk, and the light dataset object of the `lm` family that points into them.

A shard is two .npy files: `STEM.tokens.npy`, every document's token ids back to back (uint16, or uint32 for
a vocabulary over 65,536), and `STEM.starts.npy`, the int64 offsets where documents start (n_docs + 1 of
them, the last being the token count). A document is stored as `BOS text EOS` (a sampled one that hit the
length limit has no EOS). A shard of prompted samples has a third, `STEM.prompts.npy`: per document, how many
tokens after its BOS are a real prompt, which training does not predict (only the continuation is trained on).
The starts file is written last, so a shard whose starts file exists is complete.

A `TokenSet` (the family's Data) is a tuple of parts, each a shard and the documents chosen from it (and
whether they are real stories, for a fit that weights real against synthetic ones). Its size is its token
count, BOS and EOS included. Concatenating and subsampling only build new lists of document
indices; tokens are read from disk a document at a time when batches are made, so an accumulated pool of
many generations is streamed, never held in memory whole (memory holds 8 bytes of offsets per document).
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from modelcollapse.errors import BadInput

CHUNK_DOCS = 4096  # documents whose shards are looked up at once


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _paths(stem: Path) -> tuple[Path, Path]:
    stem = Path(stem)
    return stem.with_name(stem.name + ".tokens.npy"), stem.with_name(stem.name + ".starts.npy")


def _prompts_path(stem: Path) -> Path:
    return Path(stem).with_name(Path(stem).name + ".prompts.npy")


def shard_exists(stem: Path) -> bool:
    return _paths(stem)[1].exists()


def write_shard(stem: Path, docs: Iterable[np.ndarray], dtype: np.dtype, prompts: list[int] | None = None) -> Path:
    """Write documents (1-d arrays of token ids) as a shard, streaming: the tokens go to a raw file as they
    come and are then copied behind a .npy header, so memory holds one document at a time. `prompts`: each
    document's prompt length (see the module docstring)."""
    tokens_path, starts_path = _paths(stem)
    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    raw, tmp_tokens, tmp_starts, tmp_prompts = (p.with_name(f".{p.name}.{tag}.tmp") for p in (
        tokens_path.with_suffix(".raw"), tokens_path, starts_path, _prompts_path(stem)))
    starts = [0]
    try:
        with open(raw, "wb") as f:
            for doc in docs:
                f.write(np.asarray(doc, dtype=dtype).tobytes())
                starts.append(starts[-1] + len(doc))
        with open(raw, "rb") as src, open(tmp_tokens, "wb") as f:  # a .npy header, then the raw tokens
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (starts[-1],)}
            np.lib.format.write_array_header_1_0(f, header)
            shutil.copyfileobj(src, f, 1 << 24)
        with open(tmp_starts, "wb") as f:
            np.save(f, np.asarray(starts, dtype=np.int64))
        if prompts is not None:
            assert len(prompts) == len(starts) - 1, "one prompt length per document"
            with open(tmp_prompts, "wb") as f:
                np.save(f, np.asarray(prompts, dtype=np.int32))
            os.replace(tmp_prompts, _prompts_path(stem))
        os.replace(tmp_tokens, tokens_path)
        os.replace(tmp_starts, starts_path)  # last: its presence marks the shard complete
    finally:
        for p in (raw, tmp_tokens, tmp_starts, tmp_prompts):
            p.unlink(missing_ok=True)
    return Path(stem)


def _open(stem: Path) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, starts) of a shard as memory maps: for their lengths and headers, not to read tokens from."""
    tokens_path, starts_path = _paths(stem)
    try:
        return np.load(tokens_path, mmap_mode="r"), np.load(starts_path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise BadInput(f"token shard {stem} is missing or corrupt: {e}") from None


def verify(data: "TokenSet", vocab_size: int) -> "TokenSet":
    """`data` when each of its shards is whole: document offsets that rise from 0 to the token count, and
    every token id inside the vocabulary (else the embedding lookup fails: an IndexError on the CPU, a device
    assert on CUDA). BadInput naming the shard otherwise. Reads each shard once, 16 MiB at a time."""
    for stem in dict.fromkeys(p.stem for p in data.parts):
        tokens, starts = _open(stem)
        if len(starts) == 0 or starts[0] != 0 or (np.diff(starts) < 0).any():
            raise BadInput(f"token shard {stem} is corrupt: its document offsets do not rise from 0")
        top = -1
        with open(_paths(stem)[0], "rb") as f:
            f.seek(tokens.offset)
            while chunk := f.read(1 << 24):
                top = max(top, int(np.frombuffer(chunk, tokens.dtype).max()))
        if top >= vocab_size:
            raise BadInput(f"token shard {stem} holds token id {top}, outside the vocabulary of {vocab_size} ids")
    return data


class _Reader:
    """Reads documents of one shard with pread, not through a memory map: a map's pages (and the kernel's
    fault-around neighbours) stay in the process's resident memory, which would then grow with the pool."""

    def __init__(self, stem: Path):
        tokens, starts = _open(stem)
        self.dtype, self.offset = tokens.dtype, tokens.offset
        self.starts = np.array(starts)  # in memory: 8 bytes a document
        del tokens, starts
        self.fd = os.open(_paths(stem)[0], os.O_RDONLY)

    def doc(self, d: int) -> np.ndarray:
        a, b = int(self.starts[d]), int(self.starts[d + 1])
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(self.fd, (b - a) * size, self.offset + a * size), dtype=self.dtype).astype(np.int64)

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True, eq=False)
class Part:
    stem: Path
    docs: np.ndarray | None  # indices of the chosen documents (None: all of them)
    n_docs: int
    n_tokens: int
    prompts: np.ndarray | None = None  # the chosen documents' prompt lengths (None: no prompts)
    real: bool = False  # real stories (the family's real data), not sampled ones


def open_part(stem: Path, docs: np.ndarray | None = None, real: bool = False) -> Part:
    tokens, starts = _open(stem)
    if len(starts) < 1 or starts[-1] != len(tokens):
        raise BadInput(f"token shard {stem} is corrupt: its offsets do not match its {len(tokens)} tokens")
    prompts = None
    if _prompts_path(stem).exists():
        try:
            prompts = np.load(_prompts_path(stem))
        except (OSError, ValueError) as e:
            raise BadInput(f"token shard {stem} has a corrupt prompts file: {e}") from None
        if len(prompts) != len(starts) - 1:
            raise BadInput(f"token shard {stem} is corrupt: {len(prompts)} prompt lengths for {len(starts) - 1} documents")
    if docs is None:
        return Part(Path(stem), None, len(starts) - 1, int(starts[-1]), prompts, real)
    lengths = np.diff(starts)[docs]
    docs = np.asarray(docs, dtype=np.int64)
    return Part(Path(stem), docs, len(docs), int(lengths.sum()), None if prompts is None else prompts[docs], real)


class TokenSet:
    """Documents in token shards: the `lm` family's dataset. Its size is its token count."""

    def __init__(self, parts: Iterable[Part]):
        self.parts = tuple(p for p in parts if p.n_docs)
        self.n_tokens = sum(p.n_tokens for p in self.parts)
        self.n_docs = sum(p.n_docs for p in self.parts)

    @classmethod
    def open(cls, stems: Iterable[Path], real: bool = False) -> "TokenSet":
        return cls(open_part(s, real=real) for s in stems)

    def __repr__(self) -> str:
        return f"TokenSet({self.n_docs} documents, {self.n_tokens} tokens, {len(self.parts)} parts)"

    @staticmethod
    def concat(sets: Iterable["TokenSet"]) -> "TokenSet":
        return TokenSet(p for s in sets for p in s.parts)

    def doc_lengths(self) -> np.ndarray:
        """(n_docs,) token count of every document, in order."""
        out = []
        for p in self.parts:
            lengths = np.diff(_open(p.stem)[1])
            out.append(lengths if p.docs is None else lengths[p.docs])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def real_docs(self) -> np.ndarray:
        """(n_docs,) whether each document is a real story, in order."""
        return np.concatenate([np.full(p.n_docs, p.real) for p in self.parts]) if self.parts else np.zeros(0, bool)

    def n_targets(self) -> np.ndarray:
        """(n_docs,) the tokens of each document that a fit predicts: all after its BOS and its prompt."""
        prompts = self.prompt_lens()
        return self.doc_lengths() - 1 - (0 if prompts is None else prompts)

    def prompt_lens(self) -> np.ndarray | None:
        """(n_docs,) every document's prompt length, in order; None when no document has a prompt."""
        if all(p.prompts is None for p in self.parts):
            return None
        return np.concatenate([np.zeros(p.n_docs, np.int32) if p.prompts is None else p.prompts for p in self.parts])

    def subsample(self, size: int, seed: int) -> "TokenSet":
        """Documents in a random order (seeded) until they hold at least `size` tokens: the size reached is
        `size` plus less than one document."""
        if size > self.n_tokens:
            raise ValueError(f"cannot subsample {size} tokens from {self.n_tokens}")
        order = np.random.default_rng(seed).permutation(self.n_docs)
        take = int(np.searchsorted(np.cumsum(self.doc_lengths()[order]), size)) + 1 if size > 0 else 0
        return self.take(np.sort(order[:take]))

    def take(self, indices: np.ndarray) -> "TokenSet":
        """The documents at `indices` (into this set), in that order."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        first = np.cumsum([0] + [p.n_docs for p in self.parts])
        part_of = np.searchsorted(first, indices, side="right") - 1
        runs = np.flatnonzero(np.diff(part_of)) + 1  # a new part wherever the part changes along `indices`
        parts = []
        for run in np.split(np.arange(len(indices)), runs):
            if len(run):
                i = int(part_of[run[0]])
                p, local = self.parts[i], indices[run] - first[i]
                parts.append(open_part(p.stem, local if p.docs is None else p.docs[local], p.real))
        return TokenSet(parts)

    def iter_docs(self, order: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Every document's tokens (int64), in `order` (indices into this set) or in stored order."""
        first = np.cumsum([0] + [p.n_docs for p in self.parts])
        order = np.arange(self.n_docs) if order is None else order
        readers: dict[int, _Reader] = {}
        try:
            for c in range(0, len(order), CHUNK_DOCS):
                chunk = order[c : c + CHUNK_DOCS]
                part_of = np.searchsorted(first, chunk, side="right") - 1
                for g, i in zip(chunk.tolist(), part_of.tolist()):
                    p = self.parts[i]
                    if i not in readers:
                        readers[i] = _Reader(p.stem)
                    yield readers[i].doc(g - first[i] if p.docs is None else p.docs[g - first[i]])
        finally:
            for r in readers.values():
                r.close()

    def n_batches(self, block_size: int, batch_size: int) -> int:
        """Batches in one pass of `batches`: rows of T targets each, over a stream of n_tokens tokens."""
        rows = -(-max(self.n_tokens - 1, 0) // block_size)
        return -(-rows // batch_size)

    def batches(self, block_size: int, batch_size: int, seed: int | None, start: int = 0,
                weights: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, ...]]:
        """One pass over the documents, packed back to back into (x, y) batches of shape (B, T), with
        y = x shifted by one, so that every token but the first is a target exactly once. Documents are
        shuffled by `seed` (None: stored order). The last batch is padded: x with 0, y with -1 (ignored).
        `start` skips that many batches (resuming a pass), reading only the documents after them. A prompted
        document's prompt tokens are not targets (y = -1 there). With `weights` (one per document, in stored
        order) each batch is (x, y, w): w (B, T) float32, the weight of the document each target is in."""
        B, T = batch_size, block_size
        order = np.arange(self.n_docs) if seed is None else np.random.default_rng(seed).permutation(self.n_docs)
        skip = start * B * T  # tokens of the stream before the first batch wanted
        if skip:
            ends = np.cumsum(self.doc_lengths()[order])
            k = int(np.searchsorted(ends, skip, side="right"))  # the first document not wholly skipped
            offset = skip - (int(ends[k - 1]) if k else 0)
            order = order[k:]
        else:
            offset = 0
        prompts = self.prompt_lens()
        prompts = None if prompts is None else prompts[order]
        weights = None if weights is None else np.asarray(weights, dtype=np.float32)[order]
        buf = np.zeros(B * T + 1, dtype=np.int64)
        target = None if prompts is None else np.ones(B * T + 1, dtype=bool)  # False: a prompt token, not predicted
        wbuf = None if weights is None else np.zeros(B * T + 1, dtype=np.float32)  # each token's document's weight

        def targets(y, keep):
            if keep is not None:
                y[~keep] = -1
            return y

        def batch(x, y, w):
            return (x, y) if w is None else (x, y, w)

        fill = 0
        for i, doc in enumerate(self.iter_docs(order)):
            keep = None if prompts is None else np.arange(len(doc)) > prompts[i]  # BOS and prompt: given, not predicted
            doc = doc[offset:]
            keep = None if keep is None else keep[offset:]
            offset = 0
            while len(doc):
                n = min(len(doc), len(buf) - fill)
                buf[fill : fill + n] = doc[:n]
                if keep is not None:
                    target[fill : fill + n] = keep[:n]
                    keep = keep[n:]
                if wbuf is not None:
                    wbuf[fill : fill + n] = weights[i]
                fill += n
                doc = doc[n:]
                if fill == len(buf):
                    yield batch(buf[:-1].reshape(B, T).copy(),
                                targets(buf[1:].copy(), None if target is None else target[1:]).reshape(B, T),
                                None if wbuf is None else wbuf[1:].reshape(B, T).copy())
                    buf[0] = buf[-1]  # the last target is the next batch's first input
                    if wbuf is not None:
                        wbuf[0] = wbuf[-1]
                    fill = 1
        if fill > 1:
            rows = -(-(fill - 1) // T)
            x = np.zeros(rows * T, np.int64)
            y = np.full(rows * T, -1, np.int64)
            x[: fill - 1] = buf[: fill - 1]
            y[: fill - 1] = targets(buf[1:fill].copy(), None if target is None else target[1:fill])
            w = None
            if wbuf is not None:
                w = np.zeros(rows * T, np.float32)
                w[: fill - 1] = wbuf[1:fill]
            yield batch(x.reshape(rows, T), y.reshape(rows, T), None if w is None else w.reshape(rows, T))
