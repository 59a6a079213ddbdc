"""The LM network, its sampler, the Hugging Face export and the LM benchmarks' quick mode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modelcollapse.families.lm.model import LM, PRESETS, LMConfig, lm_config, sample_tokens

ARCHS = ["llama2", "gpt2"]


def tiny(arch: str, **kw) -> LM:
    torch.manual_seed(0)
    c = dict(arch=arch, vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=16) | kw
    model = LM(LMConfig(**c)).eval()
    with torch.no_grad():  # norms and biases away from their init, so that a wrong mapping shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def sharp(model: LM) -> LM:
    """Matrices scaled up so next-token distributions are far from uniform: greedy has clear winners and
    its continuations wander instead of repeating one token."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20.0)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_causal_future_tokens_do_not_change_past_logits(arch):
    model = tiny(arch)
    x = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 7) % 61
    a, b = model(x)[0], model(y)[0]
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_its_gradients_equal_cross_entropy_on_the_logits(arch):
    """The chunked loss (3 chunks of rows here) against F.cross_entropy on the full logits: value and the
    gradient of every parameter, with some targets ignored."""
    model = tiny(arch, vocab_size=8192, block_size=256)  # 8 MB chunks hold 256 rows at this vocabulary
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 8192, (3, 200), generator=g)
    y = torch.randint(0, 8192, (3, 200), generator=g)
    y[0, :50] = -1
    y[2, -1] = -1
    logits, loss = model(x, y)
    assert logits is None
    loss.backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ref = F.cross_entropy(model(x)[0].view(-1, 8192), y.view(-1), ignore_index=-1)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    for k, p in model.named_parameters():
        assert torch.allclose(ours[k], p.grad, rtol=1e-4, atol=1e-7), k
    with torch.no_grad():
        assert abs(model(x, y)[1].item() - ref.item()) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_with_kv_cache_equals_full_recomputation(arch):
    model = sharp(tiny(arch, tie_embeddings=False))
    prompt = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, 20, temperature=0)
    assert out.shape == (3, 24) and torch.equal(out[:, :4], prompt)
    seq = prompt
    for _ in range(20):
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert len(set(out[:, 4:].flatten().tolist())) > 5  # not one token repeated: the check has teeth


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_with_cache_and_eos_equals_full_recomputation_with_same_uniforms(arch):
    """Sampled rows stop at EOS (and are dropped from the batch); each row's tokens still follow from the full
    forward pass on its own prefix and the uniform the generator drew for that row at that step."""
    model = tiny(arch, vocab_size=12)
    B, steps, eos = 16, 30, 3
    bos = torch.zeros(B, 1, dtype=torch.long)
    out = model.generate(bos, steps, temperature=0.8, eos_id=eos, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    u = torch.stack([torch.rand(B, generator=g) for _ in range(out.size(1) - 1)])  # (steps run, B)
    ended = 0
    for i in range(B):
        seq = bos[i : i + 1]
        for t in range(out.size(1) - 1):
            tok = sample_tokens(model(seq)[0][:, -1], u[t, i : i + 1], temperature=0.8)
            seq = torch.cat([seq, tok[:, None]], dim=1)
            if int(tok) == eos:
                break
        n = seq.size(1)
        assert torch.equal(out[i, :n], seq[0])
        assert (out[i, n:] == eos).all()  # filled with EOS after the row ended
        ended += int(seq[0, -1]) == eos
    assert ended >= B // 2  # most rows ended early, so rows were dropped from the batch on the way


def test_generate_is_deterministic_given_the_generator_and_stops_at_eos():
    model = tiny("llama2", vocab_size=12)
    bos = torch.zeros(32, 1, dtype=torch.long)
    run = lambda seed: model.generate(bos, 25, eos_id=5, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row in a.tolist():
        if 5 in row[1:]:
            first = row.index(5, 1)
            assert all(t == 5 for t in row[first:])
    # every row ended: generation stopped before the step limit
    short = tiny("llama2", vocab_size=12, tie_embeddings=False)
    with torch.no_grad():
        short.lm_head.weight.zero_()  # every logit 0: greedy takes the first token, 0, as EOS here
    assert torch.equal(short.generate(bos + 1, 25, temperature=0, eos_id=0), torch.tensor([[1, 0]] * 32))


def test_compiled_decoding_follows_each_model_and_its_current_weights():
    """On the CPU the compiled decoding step folds a model's weights into its graph: a second model, or the
    first one after an in-place update, must get a graph of its own, never the stale one."""
    first, second = sharp(tiny("llama2", tie_embeddings=False)), sharp(tiny("gpt2"))
    prompt = torch.randint(0, 61, (3, 2), generator=torch.Generator().manual_seed(3))
    greedy = lambda model, compile: model.generate(prompt, 12, temperature=0, compile=compile)
    for model in (first, second, first):
        assert torch.equal(greedy(model, True), greedy(model, False))
    before = greedy(first, True)
    with torch.no_grad():
        first.lm_head.weight.copy_(torch.randn_like(first.lm_head.weight) * 20)
    after = greedy(first, True)
    assert torch.equal(after, greedy(first, False)) and not torch.equal(after, before)


def test_generate_rejects_positions_past_block_size():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 29)


def test_inverse_cdf_sampler_frequencies_match_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.2, 1.5])
    n = 200_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    rows = logits.expand(n, -1)
    for temperature in (1.0, 0.3):
        tok = sample_tokens(rows, u, temperature=temperature)
        freq = torch.bincount(tok, minlength=8).float() / n
        p = torch.softmax(logits / temperature, dim=0)
        assert (freq - p).abs().max() < 0.005, temperature
    # temperature 0.3 sharpens: the top token's share grows, the entropy falls
    p1, p3 = torch.softmax(logits, 0), torch.softmax(logits / 0.3, 0)
    freq3 = torch.bincount(sample_tokens(rows, u, temperature=0.3), minlength=8).float() / n
    assert freq3[0] > p1[0] + 0.2
    assert -(p3 * p3.log()).sum() < -(p1 * p1.log()).sum()
    assert torch.equal(sample_tokens(rows[:5], u[:5], temperature=0), torch.zeros(5, dtype=torch.long))


def test_sampler_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.2, 1.5])
    n = 100_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(1))
    rows = logits.expand(n, -1)
    p = torch.softmax(logits, 0)
    freq = torch.bincount(sample_tokens(rows, u, top_k=3), minlength=8).float() / n
    keep = torch.tensor([0, 7, 1])
    assert set(torch.nonzero(freq).flatten().tolist()) == set(keep.tolist())
    assert (freq[keep] - p[keep] / p[keep].sum()).abs().max() < 0.006
    # top_p = 0.6: the smallest most-likely set with mass >= 0.6 is {0, 7} (p = 0.37, 0.22 -> 0.59 < 0.6) + {1}
    order = p.argsort(descending=True)
    need = int((p[order].cumsum(0) < 0.6).sum()) + 1
    freq = torch.bincount(sample_tokens(rows, u, top_p=0.6), minlength=8).float() / n
    assert set(torch.nonzero(freq).flatten().tolist()) == set(order[:need].tolist())
    kept = order[:need]
    assert (freq[kept] - p[kept] / p[kept].sum()).abs().max() < 0.006


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tie", [True, False])
def test_hugging_face_export_gives_the_same_logits(arch, tie, tmp_path):
    from transformers import AutoModelForCausalLM

    from modelcollapse.families.lm.hf import export_hf

    model = tiny(arch, tie_embeddings=tie)
    path = export_hf(model, tmp_path / "hf", bos_id=1, eos_id=2)
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if arch == "llama2" else "GPT2LMHeadModel")
    x = torch.randint(0, 61, (3, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model(x)[0] - hf(x).logits).abs().max() <= 1e-4
    assert hf.config.eos_token_id == 2


def test_preset_parameter_counts_match_the_paper_sizes():
    sizes = {"gpt2-9m": 9e6, "llama2-12m": 12e6, "llama2-42m": 42e6, "llama2-126m": 126e6}
    for name, target in sizes.items():
        with torch.device("meta"):  # shapes only, no memory or init time
            n = LM(lm_config(name, vocab_size=8192, block_size=256)).num_params()
        assert abs(n / target - 1) < 0.05, (name, n)
    for name in ("llama2-cpu", "gpt2-cpu"):
        with torch.device("meta"):
            n = LM(lm_config(name, vocab_size=4096, block_size=256)).num_params()
        assert 1e6 <= n <= 3e6, (name, n)
    assert set(PRESETS) >= {"llama2-tiny", "gpt2-tiny"}


def test_config_resolves_and_validates():
    assert LMConfig(arch="gpt2", n_embd=64).ffn_hidden == 256
    assert LMConfig(arch="llama2", n_embd=288).ffn_hidden == 768  # llama2.c's stories15M
    assert lm_config("llama2-cpu", 4096, 256).ffn_hidden == 512
    assert lm_config("llama2-cpu", 4096, 256, n_embd=96).ffn_hidden == 256  # the preset's width rule, not its 512
    with pytest.raises(ValueError, match="multiple of n_head"):
        LMConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="even head size"):
        LMConfig(arch="llama2", n_embd=12, n_head=4)
    with pytest.raises(ValueError, match="arch"):
        LMConfig(arch="mamba")
    with pytest.raises(ValueError, match="unknown model preset"):
        lm_config("gpt5", 100, 16)


def test_init_optimizer_groups_and_tied_weights():
    model = LM(lm_config("gpt2-tiny", vocab_size=500, block_size=64))
    assert model.lm_head.weight is model.tok_emb.weight
    proj = model.blocks[0].attn.out.weight.std().item()
    assert abs(proj - 0.02 / math.sqrt(4)) < 0.004 and abs(model.tok_emb.weight.std().item() - 0.02) < 0.002
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_training_steps_learn_a_repeating_sequence(arch):
    torch.manual_seed(0)
    model = LM(LMConfig(arch=arch, vocab_size=32, block_size=32, n_layer=2, n_head=2, n_embd=32))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95))
    seq = torch.arange(33).remainder(7).repeat(4, 1)  # period-7 pattern
    x, y = seq[:, :-1], seq[:, 1:]
    first = float(model(x, y)[1].detach())
    for _ in range(60):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert first > 3.0 and float(loss.detach()) < 0.3


def test_safetensors_round_trip_keeps_the_function(tmp_path):
    from safetensors.torch import load_model, save_model

    model = tiny("llama2")
    save_model(model, str(tmp_path / "m.safetensors"))
    again = LM(model.config).eval()
    load_model(again, str(tmp_path / "m.safetensors"))
    x = torch.randint(0, 61, (2, 8))
    assert torch.equal(model(x)[0], again(x)[0])


def test_benchmarks_quick_mode_report_the_expected_keys():
    from modelcollapse.bench.lm import lm_sample, lm_train

    keys = {"bench", "ours", "baseline", "unit", "ratio", "equal", "mfu_ours", "mfu_baseline", "shape", "batch"}
    for rows, name in ((lm_train(quick=True), "lm-train"), (lm_sample(quick=True), "lm-sample")):
        assert rows and all(keys <= set(r) and r["bench"] == name for r in rows)
        assert all(r["equal"] is True and r["ours"] > 0 and r["baseline"] > 0 for r in rows)
