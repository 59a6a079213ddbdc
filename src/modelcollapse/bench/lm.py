"""The LM model against Hugging Face transformers' LlamaForCausalLM of the same shape, on the same weights and
inputs, in one process, interleaved (ours, theirs, ours, ...); `ratio` is the median of paired throughput
ratios, so a shared CPU slows both sides of a pair alike.

- lm_train: training tokens/s, the same loop on both sides (forward with loss, backward, gradient clipping
  to 1.0, fused AdamW with nanoGPT's decay groups). `equal`: the two losses on the same weights and batch.
- lm_sample: sampling tokens/s from BOS, temperature 1.0, full vocabulary, no EOS (every row runs the whole
  length), ours `LM.generate` vs `generate(do_sample=True, top_k=0)`. `equal`: greedy outputs identical.
  One more row per shape samples as the fine-tuning studies do (Shumailov et al. 2024): 64 new tokens after a
  64-token prompt (BOS and 64 random tokens), temperature 0.8, top-p 0.9, on both sides (`prompt_tokens` 64);
  `equal`: greedy continuations of the same prompts identical.

Both also report model FLOP/s as a fraction of this machine's float32 matmul peak, measured here
(`mfu_ours`, `mfu_baseline`). FLOPs per token follow nanoGPT's estimate: 6N + 12·L·d·T to train, 2N + 4·L·d·t
to sample at context t, where N counts the weights that multiply (every matrix but the embedding lookup).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from modelcollapse.bench import median_ratio, paired_times, say
from modelcollapse.families.lm.hf import to_hf
from modelcollapse.families.lm.model import LM, LMConfig

# The two shapes of the issue: the CPU preset (llama2-cpu), and a larger one (ffn = 8/3·d rounded to 16).
SHAPES = [
    dict(vocab_size=4096, n_embd=128, n_layer=4, n_head=4, ffn_hidden=512, block_size=256),
    dict(vocab_size=8192, n_embd=256, n_layer=6, n_head=8, ffn_hidden=688, block_size=512),
]


def matmul_peak(n: int = 2048, seconds: float = 2.0) -> float:
    """float32 FLOP/s of a large square torch.matmul on this machine, the best of a few timed runs."""
    say(f"measuring this machine's float32 matmul peak ({n}x{n}, {seconds:g} s), for the MFU columns")
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def matmul_params(c: LMConfig) -> int:
    """Weights used in matmuls per token: the blocks and the output head (not the embedding lookups)."""
    per_layer = 4 * c.n_embd**2 + (2 if c.arch == "gpt2" else 3) * c.n_embd * c.ffn_hidden
    return c.n_layer * per_layer + c.vocab_size * c.n_embd


def pair(c: LMConfig, seed: int = 0):
    """Our model and the transformers model with the same weights."""
    torch.manual_seed(seed)
    ours = LM(c)
    return ours, to_hf(ours)


def shape_name(c: LMConfig) -> str:
    return f"llama2 V{c.vocab_size} d{c.n_embd} L{c.n_layer} H{c.n_head} ffn{c.ffn_hidden} T{c.block_size}"


def _optimizer(model):
    """Our optimizer setup (fused AdamW, decay on matrices only), for either model."""
    return LM.configure_optimizers(model, weight_decay=0.1, learning_rate=3e-4, betas=(0.9, 0.95))


def _row(bench: str, c: LMConfig, n_tok: int, t_ours, t_base, flops_per_token: float, peak: float, **extra) -> dict:
    tps_ours, tps_base = n_tok / float(np.median(t_ours)), n_tok / float(np.median(t_base))
    return {
        "bench": bench, "ours": tps_ours, "baseline": tps_base, "unit": "tokens/s", "ratio": median_ratio(t_ours, t_base),
        **extra, "shape": shape_name(c), "mfu_ours": tps_ours * flops_per_token / peak,
        "mfu_baseline": tps_base * flops_per_token / peak, "matmul_peak_gflops": peak / 1e9, "threads": torch.get_num_threads(),
    }


def _train_steps(forward, model, opt, n: int) -> None:
    """n steps of the loop both sides share: loss, backward, clip to 1.0, AdamW."""
    for _ in range(n):
        forward().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def train_row(c: LMConfig, B: int, repeats: int, steps_per_call: int, compile: bool, peak: float) -> dict:
    ours, hf = pair(c)
    T = c.block_size
    tok = torch.randint(0, c.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
    x, y = tok[:, :T], tok[:, 1:]
    # equal: the same loss on the same weights (HF shifts labels inside, dropping the last target)
    y_hf = y.clone()
    y_hf[:, -1] = -1
    with torch.no_grad():
        loss_ours, loss_hf = float(ours(x, y_hf)[1]), float(hf(input_ids=x, labels=x).loss)
    ours.train(), hf.train()
    opt_ours, opt_hf = _optimizer(ours), _optimizer(hf)
    f_ours = torch.compile(ours) if compile else ours
    step_ours = lambda: _train_steps(lambda: f_ours(x, y)[1], ours, opt_ours, steps_per_call)
    step_hf = lambda: _train_steps(lambda: hf(input_ids=x, labels=x).loss, hf, opt_hf, steps_per_call)
    say(f"lm-train {shape_name(c)}: a first step" + (" (torch.compile compiles here, a minute or more)" if compile else ""))
    step_ours()  # an extra warm-up: compilation happens here
    t_ours, t_base = paired_times(step_ours, step_hf, repeats, what=f"lm-train {shape_name(c)}, batch {B}")
    flops = 6 * matmul_params(c) + 12 * c.n_layer * c.n_embd * T
    return _row("lm-train", c, B * T * steps_per_call, t_ours, t_base, flops, peak, equal=abs(loss_ours - loss_hf) <= 1e-4,
                loss_ours=loss_ours, loss_baseline=loss_hf, batch=B, compile=compile)


def lm_train(repeats: int = 7, quick: bool = False, compile: bool = True, tokens_per_step: int = 4096,
             steps_per_call: int = 2) -> list[dict]:
    """Training tokens/s, ours vs LlamaForCausalLM, for each shape, `tokens_per_step` tokens a step;
    `compile`: torch.compile our model (the family's `compile` flag does the same in training)."""
    shapes = SHAPES[:1] if quick else SHAPES
    if quick:
        repeats, steps_per_call, compile, tokens_per_step = 1, 1, False, 512
    peak = matmul_peak(seconds=0.2 if quick else 2.0)
    rows = []
    for s in shapes:
        torch._dynamo.reset()  # each shape compiles afresh, within dynamo's per-function cache limit
        c = LMConfig(arch="llama2", **s)
        rows.append(train_row(c, max(1, tokens_per_step // c.block_size), repeats, steps_per_call, compile, peak))
    return rows


def greedy_equal(ours: LM, hf, n_new: int, compile: bool, bos: int = 1) -> bool:
    """Whether greedy continuations of 4 rows from BOS are identical."""
    idx = torch.full((4, 1), bos)
    with torch.no_grad():
        theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new)
    return torch.equal(ours.generate(idx, n_new, temperature=0, compile=compile), theirs)


def sample_row(ours: LM, hf, B: int, n_new: int, repeats: int, compile: bool, peak: float, bos: int = 1) -> dict:
    c = ours.config
    idx = torch.full((B, 1), bos)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # HF samples from the global generator
    run_ours = lambda: ours.generate(idx, n_new, temperature=1.0, generator=gen, compile=compile)

    def run_hf():
        with torch.no_grad():
            hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                        max_new_tokens=n_new, min_new_tokens=n_new)

    t_ours, t_base = paired_times(run_ours, run_hf, repeats, what=f"lm-sample {shape_name(c)}, batch {B}, {n_new} new tokens")
    flops = 2 * matmul_params(c) + 4 * c.n_layer * c.n_embd * (1 + n_new / 2)  # attention at the mean context
    return _row("lm-sample", c, B * n_new, t_ours, t_base, flops, peak, batch=B, new_tokens=n_new, compile=compile)


def prompted_row(ours: LM, hf, B: int, P: int, n_new: int, repeats: int, compile: bool, peak: float, bos: int = 1) -> dict:
    """Continuing B prompts of BOS + P tokens by n_new tokens, temperature 0.8 and top-p 0.9 on both sides."""
    c = ours.config
    idx = torch.randint(2, c.vocab_size, (B, P + 1), generator=torch.Generator().manual_seed(2))
    idx[:, 0] = bos
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    run_ours = lambda: ours.generate(idx, n_new, temperature=0.8, top_p=0.9, generator=gen, compile=compile)

    def run_hf(**settings):
        with torch.no_grad():
            return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n_new, min_new_tokens=n_new,
                               **(settings or dict(do_sample=True, top_k=0, top_p=0.9, temperature=0.8)))

    with torch.no_grad():
        equal = torch.equal(ours.generate(idx, n_new, temperature=0, compile=compile), run_hf(do_sample=False))
    t_ours, t_base = paired_times(run_ours, run_hf, repeats, what=f"lm-sample {shape_name(c)}, batch {B}, {P}-token prompts")
    flops = 2 * matmul_params(c) + 4 * c.n_layer * c.n_embd * (P + 1 + n_new / 2)
    return _row("lm-sample", c, B * n_new, t_ours, t_base, flops, peak, batch=B, new_tokens=n_new, prompt_tokens=P, compile=compile,
                equal=equal)


def lm_sample(repeats: int = 3, quick: bool = False, batches: tuple[int, ...] = (64, 256), new_tokens: int | None = None,
              compile: bool = True) -> list[dict]:
    """Sampling tokens/s from BOS (255 new tokens, or `new_tokens`), ours vs HF generate, for each shape and
    batch size; `compile`: torch.compile our decoding step (LM.generate(compile=True))."""
    shapes = SHAPES[:1] if quick else SHAPES
    if quick:
        repeats, batches, new_tokens, compile = 1, (16,), 8, False
    peak = matmul_peak(seconds=0.2 if quick else 2.0)
    rows = []
    for s in shapes:
        torch._dynamo.reset()  # each shape compiles afresh, within dynamo's per-function cache limit
        c = LMConfig(arch="llama2", **s)
        n_new = new_tokens or min(c.block_size - 1, 255)
        ours, hf = pair(c)
        ours.eval()
        hf.generation_config.pad_token_id = 0
        equal = greedy_equal(ours, hf, min(n_new, 32), compile)
        rows += [{**sample_row(ours, hf, B, n_new, repeats, compile, peak), "equal": equal} for B in batches]
        P, n_prompted = (8, 8) if quick else (64, 64)
        rows.append(prompted_row(ours, hf, batches[0], P, n_prompted, repeats, compile, peak))
    return rows
