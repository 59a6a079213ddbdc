"""What the families share, in one place: where caches live, bf16 autocast on CUDA, the warm-up + cosine
learning rate, per-example loss weights for `real_weight`, and saving a torch module atomically as
safetensors."""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    """Caches every run may share (tokenizers, token shards, judging classifiers, embedded molecules):
    $MODELCOLLAPSE_CACHE, else ~/.cache/modelcollapse."""
    return Path(os.environ.get("MODELCOLLAPSE_CACHE", Path.home() / ".cache" / "modelcollapse"))


def autocast(device: str):
    """bf16 autocast on CUDA; plain float32 on the CPU (bf16 matmuls are ~20x slower there)."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else contextlib.nullcontext()


def warmup_cosine(step: int, total: int, lr: float, warmup: int, min_lr: float) -> float:
    """The learning rate of step `step` of `total`."""
    # 1) linear warm-up from lr/warmup to lr
    if step < warmup:
        return lr * (step + 1) / warmup
    # 2) cosine decay from lr to min_lr over the remaining steps
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (lr - min_lr)


def example_weights(is_real: np.ndarray, real_weight: float | None, terms: np.ndarray | None = None) -> np.ndarray:
    """Per-example loss weights giving the real examples a share `real_weight` of the total loss, whatever
    their count. `terms`: how many loss terms each example adds (an LM story: its predicted tokens; default
    1 each). The weights average to 1 over the terms, so the learning rate keeps its meaning; all 1 without a
    weight, or where a set holds only real or only synthetic examples."""
    terms = np.ones(len(is_real)) if terms is None else np.asarray(terms, dtype=float)
    n, n_real = terms.sum(), terms[is_real].sum()
    if real_weight is None or n_real in (0, n):
        return np.ones(len(is_real), dtype=np.float32)
    return np.where(is_real, n * real_weight / n_real, n * (1 - real_weight) / (n - n_real)).astype(np.float32)


def save_module(module, path: Path) -> None:
    """The module's weights as safetensors at `path`, written to a temporary name and renamed (tied weights,
    such as an LM's embedding and output, are stored once)."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_model(module, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_module(module, path: Path, device: str = "cpu"):
    """Load the weights `save_module` wrote into `module` (strictly: every parameter, no stranger)."""
    from safetensors.torch import load_model

    load_model(module, str(path), device=device)
    return module
