"""The `lm` family fine-tuning pretrained models: tiny random-weight transformers models (GPT-2, Llama with
grouped-query attention and an untied head, OPT) built in a temporary folder with tokenizers of their own —
no network — imported or run through transformers, fine-tuned generation after generation from the base or
from the previous generation, prompted, with LoRA, and measured by the text-collapse metrics."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from modelcollapse import config as configlib
from modelcollapse.families.lm import Config, Family, export
from modelcollapse.families.lm import data as text
from modelcollapse.families.lm import metrics
from modelcollapse.families.lm import train as loops
from modelcollapse.families.lm.hf import HFModel, import_hf, load_hf_dir
from modelcollapse.families.lm.model import LM, LMConfig, sample_tokens
from modelcollapse.loop import run_experiment
from modelcollapse.store import read_metrics

V = 384  # the tiny tokenizers' vocabulary
SPECIALS = {  # (bos, eos) of each architecture's tokenizer: GPT-2 and OPT use one token for both
    "gpt2": ("<|endoftext|>", "<|endoftext|>"), "llama": ("<s>", "</s>"), "opt": ("</s>", "</s>"),
}
FT = dict(  # a fine-tuning config small enough for a few seconds a generation
    init="base", max_train_stories=60, test_stories=20, block_size=64, batch_size=8, lr=3e-3, warmup_frac=0.1,
    prompt_tokens=8, max_sample_len=24, sample_batch=32, eval_samples=20, shard_tokens=2048, rare_rank=200,
)


def make_base(arch: str, folder):
    """A random-weight transformers causal LM with a BPE tokenizer of its own, saved in `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, PreTrainedTokenizerFast

    bos, eos = SPECIALS[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    stories = text.load_stories("shipped", None, 0.05)[0][:300]
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=list(dict.fromkeys([bos, eos])), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stories, trainer=trainer)
    ids = dict(bos_token_id=tok.token_to_id(bos), eos_token_id=tok.token_to_id(eos))
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_positions=128, n_embd=32, n_layer=2, n_head=4, **ids)  # gelu_new, tied head
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, **ids)
    else:
        cfg = OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                        max_position_embeddings=128, pad_token_id=ids["eos_token_id"], **ids)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {arch: make_base(arch, root / arch) for arch in SPECIALS}


def family(tmp_path, **overrides) -> Family:
    return Family(Config(**{**FT, **overrides}), device="cpu", cache_dir=tmp_path / "cache")


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- importing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_a_hf_model_and_our_import_of_it_give_the_same_logits(bases, arch):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(bases[arch], dtype=torch.float32).eval()
    base = load_hf_dir(bases[arch])
    assert isinstance(base.model, HFModel if arch == "opt" else LM)  # OPT is not one of ours: it runs through transformers
    x = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(x).logits, base.model(x)[0]
    assert want.abs().max() > 0.01 and torch.allclose(got, want, atol=2e-5), (got - want).abs().max()
    if arch == "llama":  # grouped-query attention became full attention with repeated key/value heads
        assert base.model.config.n_head == 4 and not base.model.config.tie_embeddings
    if arch == "gpt2":
        assert base.model.config.gelu_approx == "tanh"


@pytest.mark.parametrize("arch, approx", [("llama2", "none"), ("gpt2", "none"), ("gpt2", "tanh")])
def test_export_then_import_is_the_identity(arch, approx):
    from modelcollapse.families.lm.hf import to_hf

    torch.manual_seed(0)
    ours = LM(LMConfig(arch=arch, vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=16, gelu_approx=approx))
    back = import_hf(to_hf(ours))
    for (k, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


def test_the_bos_is_a_sentinel_when_the_tokenizer_ends_with_it_too(bases, tmp_path):
    fam = family(tmp_path, base=str(bases["gpt2"]))
    real = fam.real_data("train", 0)
    v = fam.vocab_
    assert v.eos == v.model_bos and v.bos >= V  # stored documents start with an id no text has; the model reads its own BOS
    docs = list(real.iter_docs())
    assert all(d[0] == v.bos and d[-1] == v.eos and (d[1:-1] < V).all() for d in docs)
    x, y = next(real.batches(64, 8, seed=None))
    y = loops._targets(y, v.bos)
    assert (y == v.eos).sum() > 0 and not (y == v.bos).any()  # every EOS is a target, no BOS is
    assert not (v.inputs(x) >= V).any()


def test_a_base_that_is_not_a_local_folder_is_one_line_and_exit_2(tmp_path):
    from conftest import cli

    cfg = tmp_path / "c.toml"
    cfg.write_text('family = "lm"\npolicies = ["replace"]\niterations = 2\nseeds = 1\n[lm]\ninit = "base"\nbase = "gpt2"\n')
    out = cli("run", cfg, "--out", tmp_path / "run")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not a local directory" in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


# -- fine-tuning -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_fine_tuning_changes_the_weights_and_lowers_the_training_loss(bases, tmp_path, arch):
    fam = family(tmp_path, base=str(bases[arch]), epochs=2)
    real = fam.real_data("train", 0)
    before = state(fam.base_.model)
    loss0 = loops.test_ce(fam.base_.model, real, fam.config, fam.vocab_, "cpu")
    model = fam.fit(real, seed=1, workdir=tmp_path / "gen-1")
    loss1 = loops.test_ce(model, real, fam.config, fam.vocab_, "cpu")
    assert loss1 < loss0 - 0.5, (loss0, loss1)
    after = state(model)
    assert sum(not torch.equal(before[k], after[k]) for k in before) >= len(before) - 1  # every weight moved (an unused position row aside)
    assert all(torch.equal(v, fam.base_.model.state_dict()[k]) for k, v in before.items())  # the base is not touched
    fam.save_model(model, tmp_path / "gen-1")
    back = fam.load_model(tmp_path / "gen-1")
    x = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        assert torch.equal(back(x)[0], model(x)[0])


def test_steps_and_schedules(tmp_path):
    cfg = Config(lr=1e-3, warmup_frac=0.1, min_lr_frac=0.1, schedule="linear")
    lrs = [loops.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4 + 9e-4 / 90)
    assert np.allclose(np.diff(lrs[10:]), np.diff(lrs[10:])[0])  # a straight line down
    const = Config(lr=1e-3, warmup_frac=0.1, schedule="constant")
    assert [loops.lr_at(s, 100, const) for s in (10, 50, 99)] == [1e-3] * 3



def test_steps_sets_the_optimizer_steps_of_a_fit(bases, tmp_path, monkeypatch):
    fam = family(tmp_path, base=str(bases["llama"]), steps=7)  # more than an epoch of this set: the fit wraps around
    small = fam.real_data("train", 0).subsample(1500, seed=0)
    assert small.n_batches(64, 8) < 7
    lrs = []
    real_lr = loops.lr_at
    monkeypatch.setattr(loops, "lr_at", lambda step, total, cfg: lrs.append((step, total)) or real_lr(step, total, cfg))
    fam.fit(small, seed=1, workdir=tmp_path / "fit")
    assert lrs == [(s, 7) for s in range(7)]


def run_loop(tmp_path, name, lm, policies=("replace",), iterations=3, seeds=1):
    raw = dict(name=name, family="lm", policies=list(policies), iterations=iterations, seeds=seeds, device="cpu", lm=lm)
    return run_experiment(configlib.from_dict(raw), tmp_path / name, progress=False)


def test_init_base_starts_every_generation_from_the_base_and_previous_from_its_predecessor(bases, tmp_path, monkeypatch):
    starts = []
    real_fit = loops.fit
    monkeypatch.setattr(loops, "fit", lambda cfg, train, vocab, seed, workdir, device, start=None, real_weight=None: (
        starts.append((workdir.name, state(start))), real_fit(cfg, train, vocab, seed, workdir, device, start, real_weight))[1])
    lm = dict(FT, base=str(bases["llama"]))
    run_loop(tmp_path, "base", lm)
    base = state(load_hf_dir(bases["llama"]).model)
    assert [n for n, _ in starts] == ["gen-1", "gen-2", "gen-3"]
    for _, s in starts:
        assert all(torch.equal(s[k], base[k]) for k in base)
    starts.clear()
    out = run_loop(tmp_path, "previous", dict(lm, init="previous"))
    fam = Family(Config(**dict(lm, init="previous")), device="cpu")
    assert all(torch.equal(starts[0][1][k], base[k]) for k in base)  # generation 1 starts from the base
    for n in (2, 3):
        saved = state(fam.load_model(out / "replace" / "seed-0" / f"gen-{n - 1}"))
        assert all(torch.equal(starts[n - 1][1][k], saved[k]) for k in saved)
        assert not all(torch.equal(saved[k], base[k]) for k in base)
    # sample_ppl is measured under generation 1's model in every generation
    for n in (1, 2, 3):
        meta = json.loads((out / "replace" / "seed-0" / f"gen-{n}" / "model.json").read_text())
        assert meta["reference"] == ("." if n == 1 else "../gen-1")
        ppl = np.load(out / "replace" / "seed-0" / f"gen-{n}" / "sample_ppl.npy")
        assert len(ppl) == FT["eval_samples"] and (ppl > 1).all()
    rows = {(r["iteration"], r["metric"]): r["value"] for r in read_metrics(out)}
    assert rows[(2, "sample_ppl")] == pytest.approx(float(np.load(out / "replace" / "seed-0" / "gen-2" / "sample_ppl.npy").mean()))
    # the report draws the perplexity histograms
    from modelcollapse.report import write_report

    report = write_report([out], tmp_path / "report")
    assert (report / "previous" / "sample-ppl.png").stat().st_size > 5000  # in a folder named after the run
    assert "previous/sample-ppl.png" in (report / "index.html").read_text()


def test_sample_ppl_uses_the_reference_model(bases, tmp_path, monkeypatch):
    fam = family(tmp_path, base=str(bases["llama"]), init="previous")
    real, test = fam.real_data("train", 0), fam.real_data("test", 0)
    gen1 = fam.fit(real, seed=1, workdir=tmp_path / "gen-1")
    fam.save_model(gen1, tmp_path / "gen-1")
    gen2 = fam.fit(real, seed=2, workdir=tmp_path / "gen-2", previous=tmp_path / "gen-1")
    seen = []
    real_nll = loops.example_nll
    monkeypatch.setattr(loops, "example_nll", lambda model, *a: seen.append(model) or real_nll(model, *a))
    fam.evaluate(gen2, test, seed=3, workdir=tmp_path / "gen-2")
    x = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        assert torch.equal(seen[0](x)[0], gen1(x)[0]) and not torch.equal(seen[0](x)[0], gen2(x)[0])
    fam_base = family(tmp_path, base=str(bases["llama"]), sample_ppl_model="base")
    fam_base.evaluate(gen2, test, seed=3, workdir=tmp_path / "gen-2")
    assert seen[1] is fam_base.base_.model


# -- prompted generation -----------------------------------------------------------------------------------


def test_prompts_stay_real_and_only_continuations_are_trained_on(bases, tmp_path):
    fam = family(tmp_path, base=str(bases["llama"]))
    real = fam.real_data("train", 0)
    P = FT["prompt_tokens"]
    openings = {tuple(d[: P + 1]) for d in real.iter_docs() if len(d) >= P + 2}
    synthetic = fam.sample(fam.base_.model, 3000, real, seed=5, workdir=tmp_path / "gen")
    assert fam.size(synthetic) == 3000
    docs = list(synthetic.iter_docs())
    prompts = synthetic.prompt_lens()
    assert (prompts[:-1] == P).all() and prompts[-1] == min(P, len(docs[-1]) - 1)  # the last one may be cut
    assert all(tuple(d[: P + 1]) in openings for d in docs[:-1])  # every prompt is the opening of a real story
    assert len({tuple(d[: P + 1]) for d in docs}) > 10  # many different openings (most stories open alike)
    assert all(len(d) <= FT["max_sample_len"] for d in docs)
    # the targets a training batch holds: every continuation token (and EOS), no prompt token, no BOS
    n_targets = sum(int((loops._targets(y, fam.vocab_.bos) >= 0).sum()) for _, y in synthetic.batches(64, 8, seed=3))
    assert n_targets == sum(int((d[P + 1 :] != fam.vocab_.bos).sum()) for d in docs)  # (a random model may emit BOS's id: not a target)
    x, y = next(synthetic.batches(64, 1, seed=None))
    assert (y[0, : P] == -1).all() and (y[0, P : len(docs[0]) - 1] == docs[0][P + 1 :]).all()
    # the same seed gives the same prompts and continuations; the sample reopens with its prompts
    again = fam.sample(fam.base_.model, 3000, real, seed=5, workdir=tmp_path / "again")
    assert [d.tolist() for d in again.iter_docs()] == [d.tolist() for d in docs]
    assert (fam.load_sample(tmp_path / "gen").prompt_lens() == prompts).all()
    out = tmp_path / "eval"
    out.mkdir()
    fam.evaluate(fam.base_.model, fam.real_data("test", 0), seed=1, workdir=out)
    rows = json.loads((out / "samples.json").read_text())
    assert all(r["prompt"] and any(s.startswith(r["prompt"].strip()[:10]) for s in fam._draw_stories(0)) for r in rows)


@pytest.mark.parametrize("arch, settings", [
    ("opt", {}),  # OPT runs through transformers whatever the settings
    ("llama", {"repetition_penalty": 1.3}),  # our model, through transformers' generate for the penalty
    ("llama", {"num_beams": 3}),  # beam search: deterministic
    ("gpt2", {"min_p": 0.05, "top_k": 50}),  # our sampler
])
def test_sampling_settings_are_seeded_whichever_path_draws(bases, tmp_path, arch, settings):
    fam = family(tmp_path, base=str(bases[arch]), **settings)
    real = fam.real_data("train", 0)
    assert loops.fast_path(fam.base_.model, fam.config) == (arch != "opt" and not {"repetition_penalty", "num_beams"} & settings.keys())
    a, b, c = (list(fam.sample(fam.base_.model, 600, real, seed=s, workdir=tmp_path / name).iter_docs())
               for s, name in ((1, "a"), (1, "b"), (2, "c")))
    assert [d.tolist() for d in a] == [d.tolist() for d in b]
    assert [d.tolist() for d in a] != [d.tolist() for d in c]  # other prompts, other draws
    P = FT["prompt_tokens"]
    assert all(d[0] == fam.vocab_.bos for d in a)
    assert all(len(d) > P + 1 for d in a[:-1])


def test_min_p_keeps_the_tokens_transformers_keeps():
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    kept = MinPLogitsWarper(min_p=0.1)(None, logits / 0.7) > -math.inf
    u = torch.linspace(0, 0.999, 400)
    for row in range(6):
        got = {int(sample_tokens(logits[row : row + 1].expand(len(u), -1), u, temperature=0.7, min_p=0.1)[i]) for i in range(len(u))}
        assert got == set(torch.nonzero(kept[row]).flatten().tolist())


# -- LoRA ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_lora_trains_adapters_saves_them_and_reloads_the_same_model(bases, tmp_path, arch):
    fam = family(tmp_path, base=str(bases[arch]), lora={"r": 4, "alpha": 8}, lr=2e-2, epochs=2)
    real = fam.real_data("train", 0)
    before = state(fam.base_.model)
    loss0 = loops.test_ce(fam.base_.model, real, fam.config, fam.vocab_, "cpu")
    model = fam.fit(real, seed=1, workdir=tmp_path / "gen-1")
    assert loops.test_ce(model, real, fam.config, fam.vocab_, "cpu") < loss0 - 0.03  # (the frozen embeddings of a random base hold it back)
    after = state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("weight") for k in changed)
    assert not any("emb" in k or "norm" in k or "lm_head" in k or "layer_norm" in k for k in changed)  # only adapted layers moved
    fam.save_model(model, tmp_path / "gen-1")
    saved = {p.name for p in (tmp_path / "gen-1").rglob("*")}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= saved and "model.safetensors" not in saved  # adapters only
    back = fam.load_model(tmp_path / "gen-1")
    x = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        assert torch.equal(back(x)[0], model(x)[0])


# -- the loop: check_family, resume --------------------------------------------------------------------------


def test_check_family_passes_for_a_fine_tuning_config(bases):
    from modelcollapse.testing import check_family

    tiny = dict(FT, init="previous", base=str(bases["llama"]), max_train_stories=20, test_stories=8, eval_samples=20, sample_batch=40)
    policies = ["replace", "accumulate", {"name": "mix", "real_fraction": 0.5}]  # fits take seconds: three policies
    rows = check_family("lm", tiny, seeds=1, iterations=2, policies=policies)
    assert {r["metric"] for r in rows} >= {"test_ce", "sample_ppl", "self_bleu", "rare_word_recall"}


def test_a_resumed_fine_tuning_run_equals_an_uninterrupted_one(bases, tmp_path, monkeypatch):
    lm = dict(FT, init="previous", base=str(bases["opt"]), lora={"r": 2}, checkpoint_every=2, max_train_stories=30)
    whole = read_metrics(run_loop(tmp_path, "whole", lm, policies=("replace", "accumulate")))
    real_lr, calls = loops.lr_at, [0]

    def killed(step, total, cfg):
        calls[0] += 1
        if calls[0] == 12:
            raise KeyboardInterrupt  # mid-fit, after a checkpoint, in a later generation
        return real_lr(step, total, cfg)

    monkeypatch.setattr(loops, "lr_at", killed)
    with pytest.raises(KeyboardInterrupt):
        run_loop(tmp_path, "cut", lm, policies=("replace", "accumulate"))
    monkeypatch.setattr(loops, "lr_at", real_lr)
    assert read_metrics(run_loop(tmp_path, "cut", lm, policies=("replace", "accumulate"))) == whole


def test_the_two_stage_presets_load():
    from pathlib import Path

    folder = Path(configlib.__file__).parent / "configs" / "cpu" / "lm-finetune"
    base, finetune = (configlib.load(folder / name) for name in ("1-base.toml", "2-finetune.toml"))
    assert base.family_config.init == "scratch" and base.iterations == 1
    assert finetune.family_config.init == "base" and finetune.family_config.prompt_tokens == 64
    assert finetune.family_config.skip_train_stories == base.family_config.max_train_stories  # disjoint parts
    assert [p.label for p in finetune.policies] == ["replace", "accumulate", "mix-0.1"]


def test_the_two_stage_workflow_export_then_fine_tune(tmp_path):
    """Stage 1 pretrains a base on part A; its export is stage 2's base, fine-tuned on part B."""
    scratch = dict(max_train_stories=60, test_stories=20, vocab_size=384, model="llama2-tiny", block_size=64, batch_size=8, lr=5e-3,
                   max_sample_len=64, sample_batch=32, eval_samples=20)
    out = run_loop(tmp_path, "stage1", scratch, iterations=1)
    hf_dir = export(out / "replace" / "seed-0" / "gen-1", tmp_path / "base-hf")
    stage2 = dict(FT, base=str(hf_dir), skip_train_stories=60)
    fam = Family(Config(**stage2), device="cpu", cache_dir=tmp_path / "cache")
    part_a = Family(Config(**scratch), device="cpu", cache_dir=tmp_path / "cache")
    part_a.real_data("train", 0), fam.real_data("train", 0)
    a, b = part_a._draw_stories(0), fam._draw_stories(0)
    assert len(a) == len(b) == 60 and not set(a) & set(b)  # disjoint parts
    base = Family(Config(**scratch), device="cpu").load_model(out / "replace" / "seed-0" / "gen-1")
    assert isinstance(fam.base_.model, LM) and fam.vocab_.bos == 0 and fam.vocab_.eos == 1  # imported, with its own tokenizer
    for (k, x), y in zip(base.state_dict().items(), fam.base_.model.state_dict().values()):
        assert torch.equal(x, y), k
    rows = read_metrics(run_loop(tmp_path, "stage2", stage2, iterations=2))
    assert {r["iteration"] for r in rows} == {1, 2}
    # a gen-<n> folder of an lm run is a base as it is, without the export
    direct = Family(Config(**dict(stage2, base=str(out / "replace" / "seed-0" / "gen-1"))), device="cpu", cache_dir=tmp_path / "cache")
    direct.real_data("train", 0)
    story = fam._draw_stories(0)[0]
    assert direct.vocab_ == fam.vocab_
    assert direct.tokenizer_.encode(story, add_special_tokens=False).ids == fam.tokenizer_.encode(story, add_special_tokens=False).ids
    for (k, x), y in zip(base.state_dict().items(), direct.base_.model.state_dict().values()):
        assert torch.equal(x, y), k


def test_a_model_run_through_transformers_exports_in_its_own_architecture(bases, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = family(tmp_path, base=str(bases["opt"]))
    model = fam.fit(fam.real_data("train", 0), seed=1, workdir=tmp_path / "gen-1")
    fam.save_model(model, tmp_path / "gen-1")
    out = export(tmp_path / "gen-1", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "OPTForCausalLM" and AutoTokenizer.from_pretrained(out).eos_token == "</s>"
    x = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, model(x)[0])


# -- the text-collapse metrics on texts whose values are known --------------------------------------------------


def test_text_metrics_on_known_texts():
    assert metrics.words("Lily's cat, the CAT! 3 cats_x") == ["lily's", "cat", "the", "cat", "3", "cats", "x"]
    c = Counter({"a": 4, "b": 2, "c": 1, "d": 1})
    assert metrics.ttr(c) == 4 / 8
    assert metrics.unigram_entropy(c) == pytest.approx(-(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 2 * 0.125 * math.log(0.125)))
    assert metrics.unigram_entropy(Counter({"x": 7})) == 0.0
    zipf = Counter({f"w{r}": round(1000 / r**1.5) for r in range(1, 40)})  # counts ∝ r^-1.5
    assert metrics.zipf_exponent(zipf) == pytest.approx(1.5, abs=0.02)
    assert metrics.zipf_exponent(Counter({"a": 3})) == 0.0
    assert metrics.unigram_kl(c, c) == pytest.approx(sum(p * math.log(p / q) for p, q in zip(
        (0.5, 0.25, 0.125, 0.125), (5 / 12, 3 / 12, 2 / 12, 2 / 12))))  # real counts + 1 each
    real = Counter({"the": 10, "cat": 5, "sat": 3, "on": 2, "mat": 1, "hat": 1})
    assert metrics.rare_words(real, 3) == {"on", "mat", "hat"}
    assert metrics.rare_word_recall(Counter({"the": 1, "mat": 2}), {"on", "mat", "hat"}) == pytest.approx(1 / 3)
    same = ["the cat sat on the mat today"] * 4
    assert metrics.self_bleu(same) == pytest.approx(1.0)
    apart = ["alpha beta gamma delta", "one two three four", "red green blue black", "north south east west"]
    assert metrics.self_bleu(apart) == pytest.approx(0.0)
    out = metrics.text_metrics(same, real, {"mat"})
    assert out["rare_word_recall"] == 1.0 and out["ttr"] == pytest.approx(6 / 28)
    assert "rare_word_recall" not in metrics.text_metrics(same, real, set())


def test_the_text_metrics_do_not_depend_on_the_hash_seed():
    """Each cell of a sweep is its own process with its own string hashing: the same texts must give the same
    bits (a sum over a set's order once differed in the last bit between a Ray and a local cell)."""
    import subprocess
    import sys

    code = ("from collections import Counter; from modelcollapse.families.lm import metrics as m; "
            "real = Counter({f'w{i}': i % 7 + 1 for i in range(300)}); "
            "print(repr(m.text_metrics(['w1 w2 w3 w5 w8 w13 zz', 'w21 w34 w55 w89 w144 yy'] * 3, real, {'w89', 'w144'})))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(s)}).stdout for s in range(4)}
    assert len(outs) == 1, outs
