"""Causal transformer language models of two shapes, in one file, nanoGPT-style.

- GPT-2 (Radford et al. 2019): learned positions, LayerNorm, GELU MLP, biases.
- Llama-2 (Touvron et al. 2023): RoPE, RMSNorm, SwiGLU MLP, no biases.

Everything else is shared: fused q/k/v projection, causal scaled-dot-product attention, pre-norm residual
blocks, (tied) token embedding and output head, nanoGPT's init and optimizer groups. Two parts are there for
speed on a small CPU: the training loss is computed in row chunks with its gradients (ChunkedCrossEntropy),
and `LM.generate` samples a batch of documents with a preallocated KV cache and an inverse-CDF sampler
(`sample_tokens`), optionally torch.compiled. References:
1) nanoGPT, Karpathy: https://github.com/karpathy/nanoGPT/blob/master/model.py
2) llama2.c, Karpathy (the Llama-2 shapes trained on TinyStories): https://github.com/karpathy/llama2.c
3) Hugging Face transformers' GPT2LMHeadModel and LlamaForCausalLM, whose layouts hf.py maps onto.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LMConfig:
    arch: Literal["gpt2", "llama2"] = "llama2"
    vocab_size: int = 4096
    block_size: int = 256  # longest context; GPT-2 learns one position embedding per slot
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    ffn_hidden: int | None = None  # MLP width; None: 4*n_embd (GPT-2) or Llama's 8/3*n_embd rounded up to 32
    dropout: float = 0.0
    rope_theta: float = 10000.0  # Llama-2's RoPE base
    norm_eps: float = 1e-5
    # Output head = token embedding, as in GPT-2 and llama2.c's TinyStories models: at these sizes an ~8k x d
    # matrix is a large share of the parameters, and tying it keeps the preset sizes near the paper's.
    tie_embeddings: bool = True
    gelu_approx: Literal["none", "tanh"] = "none"  # GPT-2's MLP: exact GELU (nanoGPT), or the tanh form ("gelu_new") of OpenAI's GPT-2

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama2"):
            raise ValueError(f"arch must be 'gpt2' or 'llama2', not {self.arch!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, not {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.arch == "llama2" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head size; n_embd / n_head = {self.n_embd // self.n_head}")
        if self.gelu_approx not in ("none", "tanh"):
            raise ValueError(f"gelu_approx must be 'none' or 'tanh', not {self.gelu_approx!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.n_embd if self.arch == "gpt2" else 32 * math.ceil(8 * self.n_embd / 3 / 32)
        elif self.ffn_hidden < 1:
            raise ValueError(f"ffn_hidden must be positive, not {self.ffn_hidden}")


# Named shapes. The paper (Gerstgrasser et al. 2024, §2.1) names only sizes: GPT-2 9M and Llama-2 12M, 42M,
# 126M, with an ~8k vocabulary; the shapes are ours, chosen to land on those sizes. Parameter counts with
# vocab 8192, block 256, tied embeddings (LM.num_params, every parameter counted once):
#   gpt2-9m      d 256, 9 layers, 8 heads, ffn 1024            9.27M
#   llama2-12m   d 320, 8 layers, 8 heads, ffn 864             12.54M
#   llama2-42m   d 512, 12 layers, 8 heads, ffn 1376 (llama2.c's stories42M width)   42.15M
#   llama2-126m  d 768, 17 layers, 12 heads, ffn 2048 (llama2.c's stories110M width) 126.64M
# CPU shapes, with vocab 4096 (the family's default): llama2-cpu (= the lm-train benchmark's first shape)
# 1.57M, gpt2-cpu 1.35M; llama2-tiny 0.37M, gpt2-tiny 0.38M for tests and quick runs.
PRESETS: dict[str, dict] = {
    "gpt2-9m": dict(arch="gpt2", n_embd=256, n_layer=9, n_head=8),
    "llama2-12m": dict(arch="llama2", n_embd=320, n_layer=8, n_head=8),
    "llama2-42m": dict(arch="llama2", n_embd=512, n_layer=12, n_head=8),
    "llama2-126m": dict(arch="llama2", n_embd=768, n_layer=17, n_head=12),
    "llama2-cpu": dict(arch="llama2", n_embd=128, n_layer=4, n_head=4, ffn_hidden=512),
    "gpt2-cpu": dict(arch="gpt2", n_embd=128, n_layer=4, n_head=4),
    "llama2-tiny": dict(arch="llama2", n_embd=64, n_layer=2, n_head=4),
    "gpt2-tiny": dict(arch="gpt2", n_embd=64, n_layer=2, n_head=4),
}


def lm_config(preset: str, vocab_size: int, block_size: int, **overrides) -> LMConfig:
    """The named shape with the data's vocabulary and context, and any field overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    shape = dict(PRESETS[preset])
    if "n_embd" in overrides and "ffn_hidden" not in overrides:
        shape.pop("ffn_hidden", None)  # a preset's explicit MLP width belongs to its width
    return LMConfig(**{**shape, "vocab_size": vocab_size, "block_size": block_size, **overrides})


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def norm(config: LMConfig) -> nn.Module:
    if config.arch == "gpt2":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps)
    return RMSNorm(config.n_embd, config.norm_eps)


def apply_rope(x, cos, sin):
    """Rotate channel pairs (i, i + hs/2) of x (B, T, nh, hs) by position; cos, sin: (T, 1, hs). This
    split-halves layout is Hugging Face Llama's, so exported q/k weights need no permutation."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # bf16 under CUDA autocast; the angles are kept in float32
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """One layer's keys and values, preallocated at (B, nh, max_len, hs) and written by position, so a
    decoding step writes one slot instead of growing the cache with torch.cat."""

    def __init__(self, B: int, n_head: int, max_len: int, hs: int, dtype, device):
        self.k = torch.empty(B, n_head, max_len, hs, dtype=dtype, device=device)
        self.v = torch.empty(B, n_head, max_len, hs, dtype=dtype, device=device)

    def update(self, k, v, pos: int):
        """Write k, v (B, nh, T, hs) at positions pos .. pos + T - 1; return every key and value up to there
        (views, no copy)."""
        T = k.size(2)
        self.k[:, :, pos : pos + T] = k
        self.v[:, :, pos : pos + T] = v
        return self.k[:, :, : pos + T], self.v[:, :, : pos + T]

    def keep(self, rows, length: int):
        """Drop the batch rows not in `rows` (finished documents), copying only the first `length` slots."""
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty(len(rows), *old.shape[1:])
            new[:, :, :length] = old[rows, :, :length]
            setattr(self, name, new)


class Attention(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        bias = config.arch == "gpt2"
        self.n_head, self.hs = config.n_head, config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=bias)  # one matmul for q, k and v
        self.out = nn.Linear(config.n_embd, config.n_embd, bias=bias)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache: KVCache | None = None, pos: int = 0):
        B, T, C = x.size()
        nh = self.n_head
        qkv = self.qkv(x).view(B, T, 3 * nh, self.hs)
        qk = qkv[:, :, : 2 * nh] if rope is None else apply_rope(qkv[:, :, : 2 * nh], *rope)  # q, k rotated together
        q, k = qk.transpose(1, 2).split(nh, dim=1)  # (B, nh, T, hs) each
        v = qkv[:, :, 2 * nh :].transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            assert T == 1 or pos == 0, "only a prompt at position 0 is written several tokens at a time"
            k, v = cache.update(k, v, pos)  # (B, nh, L, hs): every key so far
        if cache is not None and T == 1:
            # one query per row attends to the whole cache: two batched matmuls beat the flash kernel on a
            # strided view of the preallocated cache
            att = torch.matmul(q * self.hs**-0.5, k.transpose(-2, -1))  # (B, nh, 1, L)
            y = torch.matmul(att.softmax(dim=-1), v)  # (B, nh, 1, hs)
        else:
            # training, or a prompt written at position 0 of the cache: queries and keys are the same T positions
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_drop(self.out(y))


class MLP(nn.Module):
    """GPT-2's: Linear, GELU (exact as nanoGPT, or OpenAI GPT-2's tanh form; export names either), Linear."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.ffn_hidden)
        self.proj = nn.Linear(config.ffn_hidden, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.approximate = config.gelu_approx

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class SwiGLU(nn.Module):
    """Llama's: down(silu(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.n_embd, 2 * config.ffn_hidden, bias=False)
        self.proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.drop(self.proj(F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.norm1 = norm(config)
        self.attn = Attention(config)
        self.norm2 = norm(config)
        self.mlp = MLP(config) if config.arch == "gpt2" else SwiGLU(config)

    def forward(self, x, rope=None, cache=None, pos: int = 0):
        x = x + self.attn(self.norm1(x), rope, cache, pos)
        return x + self.mlp(self.norm2(x))


@torch.no_grad()
def sample_tokens(logits, u, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None):
    """One token per row of logits (B, V) by inverse-CDF sampling: the first token whose cumulative
    probability exceeds u * (the kept mass), u (B,) uniform in [0, 1). torch.multinomial does the same job
    on one CPU thread; this is a softmax, a cumsum and a searchsorted, and a row's token is a deterministic
    function of its u. temperature 0 is greedy; top_k / top_p / min_p keep the k most likely tokens / the
    smallest set of most likely tokens holding top_p of the probability / the tokens at least min_p times as
    likely as the most likely one, after the temperature, as Hugging Face does (each keeps a prefix of the
    tokens sorted by probability, so together they keep the shortest of those prefixes)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    ids = None
    if top_k is not None:
        logits, ids = logits.topk(min(top_k, logits.size(-1)), dim=-1)  # sorted, most likely first
    elif top_p is not None or min_p is not None:
        logits, ids = logits.sort(dim=-1, descending=True)
    if temperature != 1.0:
        logits = logits / temperature
    cdf = torch.softmax(logits.float(), dim=-1)
    probs = cdf.clone() if min_p is not None else None
    cdf.cumsum_(dim=-1)  # (B, V')
    last = cdf.size(-1) - 1
    if top_p is None and min_p is None:
        mass = cdf[:, last:]  # ~1, but exactly the sum the cdf reached
    else:
        cut = cdf.new_full((cdf.size(0), 1), last, dtype=torch.long)
        if top_p is not None:
            cut = torch.searchsorted(cdf, cdf.new_full((cdf.size(0), 1), top_p)).clamp_(max=last)  # first index reaching top_p
        if min_p is not None:
            cut = torch.minimum(cut, (probs >= min_p * probs[:, :1]).sum(dim=-1, keepdim=True) - 1)  # the last token kept
        mass = cdf.gather(1, cut)
    tok = torch.searchsorted(cdf, u[:, None].to(cdf.dtype) * mass, right=True).clamp_(max=last)  # (B, 1)
    return (tok if ids is None else ids.gather(1, tok)).squeeze(1)


def weighted_ce(logits, targets, weights):
    """Mean over the targets (-1: ignored) of each one's cross-entropy times its weight; logits (N, V)."""
    terms = F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=-1, reduction="none")
    return (terms * weights.reshape(-1)).sum() / (targets != -1).sum()


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the output head's logits x @ w.T (x (N, C), w (V, C)) against targets (N,)
    (-1: ignored), each row's term times its weight (N,) when given (the mean still over the targets' count),
    a chunk of rows at a time, with both gradients formed in the same pass: softmax - one-hot,
    folded straight into grad_x and grad_w. On the CPU every fresh (N, V) buffer (logits, log-softmax, their
    gradients: 64 MB each at N = 4096, V = 4096) comes from the OS page by page, ~15 ms apiece; these 8 MB
    chunks are reused instead (~10% of a small model's training step)."""

    @staticmethod
    def forward(ctx, x, w, targets, weights=None):
        valid = targets != -1
        n = valid.sum()
        valid = valid if weights is None else valid * weights  # each row's factor: 0 (ignored), 1, or its weight
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(w) if need_w else None
        total = x.new_zeros(())
        chunk = max(1, 2**21 // w.size(0))  # rows whose logits fill 8 MB
        for i in range(0, x.size(0), chunk):
            xc, vc = x[i : i + chunk], valid[i : i + chunk]
            tc = targets[i : i + chunk].clamp(min=0)[:, None]  # (n, 1); ignored rows point at token 0, weight 0
            logits = xc @ w.t()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            total += ((lse - logits.gather(1, tc).squeeze(1)) * vc).sum()
            if need_x or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                g.scatter_add_(1, tc, torch.full_like(tc, -1, dtype=g.dtype))  # minus the one-hot target
                g.mul_((vc / n)[:, None])  # d(mean loss) / d(logits); ignored rows get 0
                if need_x:
                    torch.mm(g, w, out=grad_x[i : i + chunk])
                if need_w:
                    grad_w.addmm_(g.t(), xc)
        ctx.save_for_backward(grad_x, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_w = ctx.saved_tensors
        return (None if grad_x is None else grad_x * grad), (None if grad_w is None else grad_w * grad), None, None


class LM(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = nn.Embedding(c.block_size, c.n_embd) if c.arch == "gpt2" else None
        if c.arch == "llama2":
            # RoPE angles for every position, in the split-halves layout: (block_size, 1, hs), not saved
            hs = c.n_embd // c.n_head
            inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
            angles = torch.outer(torch.arange(c.block_size, dtype=torch.float32), inv_freq).repeat(1, 2)[:, None, :]
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = norm(c)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # nanoGPT's init: N(0, 0.02) weights, zero biases, and the two projections that write into the residual
        # stream scaled by 1/sqrt(2 * n_layer) (GPT-2 paper), so the residual's variance does not grow with depth
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Every parameter, a tied embedding/head counted once."""
        return sum(p.numel() for p in self.parameters())

    def _trunk(self, idx, pos: int = 0, caches: list[KVCache] | None = None):
        """The final-norm hidden states (B, T, C) of tokens idx (B, T) at positions pos .. pos + T - 1."""
        T = idx.size(1)
        if pos + T > self.config.block_size:
            raise ValueError(f"positions up to {pos + T} exceed block_size {self.config.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(pos, pos + T, device=idx.device))
        else:
            rope = (self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, None if caches is None else caches[i], pos)
        return self.norm(x)

    def forward(self, idx, targets=None, weights=None):
        """(logits (B, T, V), None) for tokens idx (B, T). With targets (B, T), already shifted (targets[:, t]
        is the token after idx[:, t]; -1: not a target): (None, mean cross-entropy in nats over the targets),
        the logits never materialised whole; with weights (B, T), each target's term times its weight."""
        x = self._trunk(idx)  # (B, T, C)
        if targets is None:
            return self.lm_head(x), None
        x, targets = x.view(-1, x.size(-1)), targets.reshape(-1)  # shifted by the caller: no sliced copies
        if x.device.type == "cpu":
            return None, ChunkedCrossEntropy.apply(x, self.lm_head.weight, targets, None if weights is None else weights.reshape(-1))
        if weights is None:
            return None, F.cross_entropy(self.lm_head(x), targets, ignore_index=-1)  # CUDA's caching allocator reuses
        return None, weighted_ce(self.lm_head(x), targets, weights)

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float]):
        """AdamW decaying only the matrices (weights, embeddings), not norms or biases, as nanoGPT does;
        the fused implementation (one kernel over all tensors, on the CPU as on CUDA)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)

    def _next_tokens(self, x, pos: int, caches: list[KVCache], u, temperature: float, top_k, top_p, min_p=None):
        """One decoding step: tokens x (B, T) at positions pos.., their keys and values cached; the next token
        of every row, sampled with uniforms u (B,)."""
        h = self._trunk(x, pos, caches)[:, -1]  # (B, C): only the last position is sampled from
        return sample_tokens(self.lm_head(h), u, temperature, top_k, top_p, min_p)

    def _compiled_step(self):
        """`_next_tokens`, torch.compiled. On the CPU with freezing: the weights are folded into the graph as
        constants and the linears run as oneDNN kernels on weights packed once (~1.6x faster decoding than MKL
        matmuls that repack the weights at every call), so the graph belongs to this model and these weights:
        it is kept on the model and rebuilt when any parameter was changed in place (its version moved), the
        graphs of earlier models dropped first (so a loop of many generations stays within dynamo's recompile
        limit and does not pile up their compiled code). Elsewhere one graph serves every model, the weights
        being its inputs."""
        if self.lm_head.weight.device.type != "cpu":
            return torch.compile(self._next_tokens, dynamic=True)
        versions = tuple(p._version for p in self.parameters())
        if getattr(self, "_step_versions", None) != versions:
            torch._dynamo.reset_code(LM._next_tokens.__code__)
            # fullgraph: no graph break, so no frame outside this graph freezes weights it cannot see change;
            # graphs are specialised on the first step, a batch of one row and the sampling settings: room for many
            compiled = torch.compile(self._next_tokens, dynamic=True, fullgraph=True, recompile_limit=64)

            def frozen(*args):
                # dynamo reads the global flag when it traces (a recompile may come at any call), not compile's options
                with torch._inductor.config.patch(freezing=True):
                    return compiled(*args)

            self._step, self._step_versions = frozen, versions
        return self._step

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, generator: torch.Generator | None = None,
                 compile: bool = False, min_p: float | None = None):
        """Continue every row of idx (B, T0) (e.g. a column of BOS) by up to max_new_tokens sampled tokens,
        batched, with a KV cache preallocated for T0 + max_new_tokens positions.

        Returns a (B, T0 + steps) LongTensor: the prompt, then each row's tokens; a row that sampled eos_id
        is filled with eos_id after it, and steps stops early when every row has. Rows that finished are
        dropped from the batch once they are a quarter of it, so long documents do not keep short ones
        computing. Every step draws one uniform per original row from `generator`, whether the row is still
        running or not, so a row's tokens depend only on the generator's seed and its own history.
        compile: torch.compile the decoding step (`_compiled_step`: a graph for every step and batch size;
        worth it for long sampling runs, ~1 min to compile on a small CPU)."""
        B, T0 = idx.size()
        L = T0 + max_new_tokens
        if L > self.config.block_size:
            raise ValueError(f"prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceed block_size {self.config.block_size}")
        c, dev = self.config, idx.device
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else self.lm_head.weight.dtype
        caches = [KVCache(B, c.n_head, L, c.n_embd // c.n_head, dtype, dev) for _ in self.blocks]
        step = self._compiled_step() if compile else self._next_tokens
        out = idx.new_full((B, L), 0 if eos_id is None else eos_id)
        out[:, :T0] = idx
        rows = torch.arange(B, device=dev)  # the rows of `out` the running batch holds
        ended = torch.zeros(B, dtype=torch.bool, device=dev)  # per running row: sampled eos_id
        x, pos, steps = idx, 0, 0
        for t in range(max_new_tokens):
            u = torch.rand(B, device=dev, generator=generator)
            nxt = step(x, pos, caches, u[rows], temperature, top_k, top_p, min_p)  # (b,)
            out[rows, T0 + t] = nxt
            pos, steps, x = pos + x.size(1), t + 1, nxt[:, None]
            if eos_id is None:
                continue
            ended |= nxt == eos_id
            n_ended = int(ended.sum())
            if n_ended == len(rows):
                break
            if 4 * n_ended >= len(rows):
                keep = (~ended).nonzero().squeeze(1)
                rows, x, ended = rows[keep], x[keep], ended[keep]
                for cache in caches:
                    cache.keep(keep, pos)
        out = out[:, : T0 + steps]
        if eos_id is not None:  # a dropped-late row may have sampled past its EOS: cut it there
            after = (out[:, T0:] == eos_id).cumsum(dim=1) > 0
            out[:, T0:][after] = eos_id
        return out
