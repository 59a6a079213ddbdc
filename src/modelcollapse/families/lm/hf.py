"""Hugging Face transformers and the `lm` family, both ways: our model exported as a transformers directory
(GPT2LMHeadModel or LlamaForCausalLM), a local base directory read with its own tokenizer, GPT-2 and Llama
weights imported into our model (model.py), any other architecture run through `transformers` behind the same
interface (`HFModel`), and sampling through `transformers`' `generate` for the settings our sampler does not
do (repetition penalty, beam search).

Nothing is downloaded: every `from_pretrained` here reads a local directory (`local_files_only`).

One table of names (`NAMES`) serves both directions. Exporting changes only the layout, never the function:
our fused projections are split (Llama) or transposed (GPT-2's Conv1D stores weights as (in, out)); RoPE
already uses HF's split-halves layout (model.apply_rope), so q/k need no permutation. Importing is the
inverse, with three more cases: GPT-2's tanh GELU ("gelu_new"), grouped-query attention (each key/value head
repeated for the query heads that share it: the same function, as transformers' `repeat_kv` computes it) and
untied output heads. An architecture or setting outside those (OPT, Qwen, Llama-3's scaled RoPE, biases in
Llama, ...) runs through `transformers` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from modelcollapse.errors import BadInput
from modelcollapse.families.lm.model import LM, LMConfig, weighted_ce


@dataclass(frozen=True)
class Vocab:
    """The token ids a family's documents use. Documents are stored `bos text eos`; `bos` is the model's own
    BOS where it has one distinct from EOS, else a sentinel id past every real token (GPT-2 and OPT use one
    token for both), so a document's start is never mistaken for its end. The model reads `model_bos` there."""

    size: int  # rows of the model's token embedding
    bos: int
    eos: int
    model_bos: int

    @property
    def ids(self) -> int:
        """How many ids a stored document may hold: the model's, and the sentinel BOS past them."""
        return max(self.size, self.bos + 1)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.ids <= 2**16 else np.uint32)

    def inputs(self, x):
        """Tokens as the model reads them: the stored BOS replaced by the model's (a no-op when they agree)."""
        if self.bos == self.model_bos:
            return x
        if isinstance(x, torch.Tensor):
            return x.masked_fill(x == self.bos, self.model_bos)
        return np.where(x == self.bos, self.model_bos, x)


@dataclass
class Base:
    """A base model with its tokenizer, as `load_base` reads it."""

    model: nn.Module  # LM (imported or ours) or HFModel
    tokenizer: object  # a `tokenizers.Tokenizer`
    vocab: Vocab
    bos_token: str | None
    eos_token: str


class HFModel(nn.Module):
    """A transformers causal LM behind our model's interface: `forward(idx, targets)` returns (logits, None)
    or (None, mean cross-entropy over targets != -1), and the optimizer groups are nanoGPT's."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    @property
    def block_size(self) -> int:
        c = self.hf.config
        return int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2**31)

    def forward(self, idx, targets=None, weights=None):
        logits = self.hf(input_ids=idx, use_cache=False).logits  # (B, T, V)
        if targets is None:
            return logits, None
        if weights is not None:
            return None, weighted_ce(logits.reshape(-1, logits.size(-1)), targets, weights)
        return None, F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)

    configure_optimizers = LM.configure_optimizers

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -- exporting our model ----------------------------------------------------------------------------------------


def hf_config(config, bos_id: int | None = None, eos_id: int | None = None):
    """The transformers config of the same shape."""
    c = config
    if c.arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
            n_inner=c.ffn_hidden, activation_function="gelu_new" if c.gelu_approx == "tanh" else "gelu",  # as model.MLP
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, layer_norm_epsilon=c.norm_eps,
            tie_word_embeddings=c.tie_embeddings, bos_token_id=bos_id, eos_token_id=eos_id,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.ffn_hidden, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_head, max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        attention_dropout=c.dropout, tie_word_embeddings=c.tie_embeddings, bos_token_id=bos_id, eos_token_id=eos_id,
    )


# Our weights' names -> transformers', per architecture, for both directions ("{i}": every block). A tuple: our
# fused weight is theirs stacked along the output rows (Llama's q, k, v and gate, up). The layouts that differ
# besides are in `_conv1d` and `_repeat_kv`; RoPE needs nothing (see the module's docstring).
_GPT2_LAYERS = (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj"))
NAMES = {
    "gpt2": {
        "tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
        **{f"blocks.{{i}}.{a}.{p}": f"transformer.h.{{i}}.{b}.{p}" for a, b in _GPT2_LAYERS for p in ("weight", "bias")},
        "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias", "lm_head.weight": "lm_head.weight",
    },
    "llama2": {
        "tok_emb.weight": "model.embed_tokens.weight",
        "blocks.{i}.norm1.weight": "model.layers.{i}.input_layernorm.weight",
        "blocks.{i}.norm2.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "blocks.{i}.attn.qkv.weight": tuple(f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"),
        "blocks.{i}.attn.out.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "blocks.{i}.mlp.gate_up.weight": ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
        "blocks.{i}.mlp.proj.weight": "model.layers.{i}.mlp.down_proj.weight",
        "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight",
    },
}


def name_pairs(c: LMConfig):
    """(our name, their name or tuple of names) for every weight of a model of shape `c`."""
    for ours, theirs in NAMES[c.arch].items():
        for i in range(c.n_layer) if "{i}" in ours else [None]:
            yield ours.format(i=i), theirs.format(i=i) if isinstance(theirs, str) else tuple(t.format(i=i) for t in theirs)


def _conv1d(c: LMConfig, theirs: str, w: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D layers (the matrices inside its blocks) store (in, out) where nn.Linear stores (out, in):
    the same transpose in both directions."""
    return w.t().contiguous() if c.arch == "gpt2" and theirs.startswith("transformer.h.") and w.dim() == 2 else w


def hf_state_dict(model: LM) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names and layouts."""
    c = model.config
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    sd = {}
    for name, theirs in name_pairs(c):
        if isinstance(theirs, tuple):
            sd.update(zip(theirs, ours[name].chunk(len(theirs))))  # rows are output channels
        else:
            sd[theirs] = _conv1d(c, theirs, ours[name])
    return {k: v.clone().contiguous() for k, v in sd.items()}


def to_hf(model: LM, bos_id: int | None = None, eos_id: int | None = None):
    """A transformers model (float32, CPU, eval mode) computing the same function as `model`."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(hf_config(model.config, bos_id, eos_id))
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"export mapping out of date: missing {missing}, unexpected {unexpected}")
    if model.config.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def export_hf(model: LM, out_dir, *, bos_id: int | None = None, eos_id: int | None = None) -> Path:
    """Write `model` as a transformers model directory at `out_dir`; returns it. bos_id / eos_id, when
    given, go into the config so that `generate` starts and stops documents as ours does."""
    out_dir = Path(out_dir)
    to_hf(model, bos_id, eos_id).save_pretrained(out_dir)
    return out_dir


# -- importing into our model --------------------------------------------------------------------------------


def lm_config_of(c) -> LMConfig | None:
    """Our model's shape for a transformers config, or None when ours cannot compute the same function."""
    t = getattr(c, "model_type", None)
    if t == "gpt2":
        approx = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}.get(c.activation_function)
        if approx is None or c.scale_attn_by_inverse_layer_idx or c.reorder_and_upcast_attn or not c.scale_attn_weights:
            return None
        return LMConfig(arch="gpt2", vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
                        n_embd=c.n_embd, ffn_hidden=c.n_inner or 4 * c.n_embd, norm_eps=c.layer_norm_epsilon,
                        tie_embeddings=bool(c.tie_word_embeddings), gelu_approx=approx)
    if t == "llama":
        rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(c, "rope_theta", 10000.0)}
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if (c.hidden_act != "silu" or c.attention_bias or getattr(c, "mlp_bias", False) or rope.get("rope_type", "default") != "default"
                or head_dim * c.num_attention_heads != c.hidden_size or getattr(c, "pretraining_tp", 1) != 1
                or c.num_attention_heads % (c.num_key_value_heads or c.num_attention_heads)):
            return None
        return LMConfig(arch="llama2", vocab_size=c.vocab_size, block_size=c.max_position_embeddings, n_layer=c.num_hidden_layers,
                        n_head=c.num_attention_heads, n_embd=c.hidden_size, ffn_hidden=c.intermediate_size, norm_eps=c.rms_norm_eps,
                        rope_theta=float(rope["rope_theta"]), tie_embeddings=bool(c.tie_word_embeddings))
    return None


def _repeat_kv(sd: dict[str, torch.Tensor], shape: LMConfig) -> None:
    """Grouped-query attention as ours computes it, in place: each key/value head repeated for the query heads
    that share it (the same function, as transformers' `repeat_kv` computes it)."""
    hs = shape.n_embd // shape.n_head
    for key in [k for k in sd if k.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight"))]:
        w = sd[key]  # (n_kv_head * hs, d)
        rep = shape.n_head // (w.size(0) // hs)  # query heads per key/value head
        sd[key] = w.view(-1, hs, shape.n_embd).repeat_interleave(rep, dim=0).reshape(-1, shape.n_embd)  # (d, d)


def our_state_dict(hf, shape: LMConfig) -> dict[str, torch.Tensor]:
    """A transformers GPT-2 or Llama model's weights under our names and layouts (hf_state_dict's inverse)."""
    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    sd.setdefault("lm_head.weight", sd[NAMES[shape.arch]["tok_emb.weight"]])  # a tied head
    _repeat_kv(sd, shape)
    return {name: torch.cat([sd[t] for t in theirs]) if isinstance(theirs, tuple) else _conv1d(shape, theirs, sd[theirs])
            for name, theirs in name_pairs(shape)}


def import_hf(hf, dropout: float = 0.0) -> LM | None:
    """Our model computing the same function as the transformers model `hf`, or None for an architecture ours
    does not implement."""
    shape = lm_config_of(hf.config)
    if shape is None:
        return None
    shape.dropout = dropout
    model = LM(shape)
    model.load_state_dict(our_state_dict(hf, shape), strict=True)
    return model


# -- reading a base --------------------------------------------------------------------------------------------


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for a missing or unreadable tokenizer
        raise BadInput(f"lm.base: cannot read a tokenizer from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not getattr(tok, "is_fast", False):
        raise BadInput(f"lm.base: {path} has only a slow tokenizer; save it as a fast one (tokenizer.json) first")
    if tok.eos_token_id is None:
        raise BadInput(f"lm.base: the tokenizer of {path} has no EOS token, which ends every document")
    return tok


def vocab_for(model_rows: int, tokenizer, bos: int | None, eos: int) -> Vocab:
    """Distinct BOS and EOS ids for the stored documents (see Vocab); the model reads its own BOS, or EOS
    where it has none (as transformers' `generate` starts GPT-2)."""
    if bos is not None and bos != eos:
        return Vocab(model_rows, bos, eos, bos)
    sentinel = max(model_rows, tokenizer.get_vocab_size(with_added_tokens=True))
    return Vocab(model_rows, sentinel, eos, eos if bos is None else bos)


def load_hf_dir(path: Path, dropout: float = 0.0) -> Base:
    """A transformers model directory: imported into our model when it is a GPT-2 or Llama, else run through
    transformers; its tokenizer in either case."""
    from transformers import AutoModelForCausalLM

    tok = _load_tokenizer(path)
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    except Exception as e:
        raise BadInput(f"lm.base: cannot load a causal LM from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    model = import_hf(hf, dropout)
    if model is None:
        model = HFModel(hf)
    model.eval()
    rows = hf.get_input_embeddings().weight.size(0)
    return Base(model, tok.backend_tokenizer, vocab_for(rows, tok.backend_tokenizer, tok.bos_token_id, tok.eos_token_id),
                tok.bos_token, tok.eos_token)


def save_hf_dir(model: HFModel, base: Base, out: Path) -> None:
    """A transformers-run model and its tokenizer, as `save_pretrained` writes them."""
    from transformers import PreTrainedTokenizerFast

    model.hf.save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=base.tokenizer, bos_token=base.bos_token, eos_token=base.eos_token).save_pretrained(out)


# -- sampling through transformers -----------------------------------------------------------------------------


def hf_model_of(model) -> nn.Module:
    """The transformers model computing `model`'s function (ours exported; kept on the model until its
    weights change, as LM._compiled_step keeps its graph)."""
    if isinstance(model, HFModel):
        return model.hf
    versions = tuple(p._version for p in model.parameters())
    if getattr(model, "_hf_versions", None) != versions:
        model._hf, model._hf_versions = to_hf(model).to(next(model.parameters()).device), versions
    return model._hf


@torch.no_grad()
def hf_generate(model, idx, max_new_tokens: int, cfg, eos: int, seed: int):
    """Continue every row of idx (B, T0) by up to max_new_tokens tokens with transformers' `generate` and the
    sampling settings of `cfg` (num_beams > 1: beam search, deterministic); rows that ended are filled with
    eos. Sampling draws from torch's global generator, seeded with `seed` inside a fork of it."""
    from transformers import GenerationConfig

    hf = hf_model_of(model)
    beams = cfg.num_beams > 1
    gen = GenerationConfig(
        do_sample=not beams, num_beams=cfg.num_beams, max_new_tokens=max_new_tokens, temperature=None if beams else cfg.temperature,
        top_k=None if beams else (cfg.top_k or 0), top_p=None if beams else cfg.top_p, min_p=None if beams else cfg.min_p,
        repetition_penalty=cfg.repetition_penalty, eos_token_id=eos, pad_token_id=eos, bos_token_id=None,
    )
    device = idx.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = hf.generate(input_ids=idx, attention_mask=torch.ones_like(idx), generation_config=gen)
    return out


def check_context(model, block_size: int, where: str) -> None:
    """A base whose context is shorter than the configured block_size cannot be trained on its rows."""
    context = model.config.block_size if isinstance(model, LM) else model.block_size
    if block_size > context:
        raise BadInput(f"The 'block_size' parameter of lm ({block_size}) exceeds the context of {where} ({context} tokens); lower it")

