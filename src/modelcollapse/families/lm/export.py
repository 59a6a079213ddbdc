"""Export an LM to a Hugging Face transformers model directory (config.json + model.safetensors), so that
`AutoModelForCausalLM.from_pretrained(out_dir)` loads it: GPT2LMHeadModel for the gpt2 shape,
LlamaForCausalLM for llama2. Only the layout changes, never the function: our fused projections are split
(Llama) or transposed (GPT-2's Conv1D stores weights as (in, out)). RoPE already uses HF's split-halves
layout (model.apply_rope), so q/k need no permutation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modelcollapse.families.lm.model import LM


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


def hf_state_dict(model: LM) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names and layouts."""
    c = model.config
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    d, f = c.n_embd, c.ffn_hidden
    sd = {}
    if c.arch == "gpt2":
        t = lambda w: w.t().contiguous()  # nn.Linear (out, in) -> Conv1D (in, out)
        sd["transformer.wte.weight"] = ours["tok_emb.weight"]
        sd["transformer.wpe.weight"] = ours["pos_emb.weight"]
        for i in range(c.n_layer):
            o, h = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
                sd[h + b + ".weight"], sd[h + b + ".bias"] = ours[o + a + ".weight"], ours[o + a + ".bias"]
            for a, b in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                sd[h + b + ".weight"], sd[h + b + ".bias"] = t(ours[o + a + ".weight"]), ours[o + a + ".bias"]
        sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = ours["norm.weight"], ours["norm.bias"]
    else:
        sd["model.embed_tokens.weight"] = ours["tok_emb.weight"]
        for i in range(c.n_layer):
            o, h = f"blocks.{i}.", f"model.layers.{i}."
            q, k, v = ours[o + "attn.qkv.weight"].split(d)  # (d, d) each: rows are output channels
            gate, up = ours[o + "mlp.gate_up.weight"].split(f)
            sd.update({
                h + "input_layernorm.weight": ours[o + "norm1.weight"],
                h + "post_attention_layernorm.weight": ours[o + "norm2.weight"],
                h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k, h + "self_attn.v_proj.weight": v,
                h + "self_attn.o_proj.weight": ours[o + "attn.out.weight"],
                h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                h + "mlp.down_proj.weight": ours[o + "mlp.proj.weight"],
            })
        sd["model.norm.weight"] = ours["norm.weight"]
    sd["lm_head.weight"] = ours["lm_head.weight"]
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
