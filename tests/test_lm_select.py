"""The lm family's selection stage and real weight (issue 13): perplexity and length scores, whole stories kept
up to the token size, per-token loss weights."""

import math

import numpy as np
import pytest
import torch

from conftest import cli
from modelcollapse import config as configlib
from modelcollapse.errors import BadInput, RunFailed
from modelcollapse.families import common
from modelcollapse.families.lm import Config, Family
from modelcollapse.families.lm import train as loops
from modelcollapse.families.lm.model import weighted_ce
from modelcollapse.families.lm.shards import TokenSet, write_shard
from modelcollapse.loop import run_experiment
from modelcollapse.selection import SelectSpec, select_grouped
from modelcollapse.store import read_metrics
from test_lm_family import TINY


@pytest.fixture(scope="module")
def briefly_trained(tmp_path_factory):
    """A tiny model fit on 120 shipped stories, and candidates: the openings of 20 real test stories (up to 40
    tokens: within the context), then the same 20 with their tokens shuffled (the same tokens and lengths,
    garbled order)."""
    root = tmp_path_factory.mktemp("lmsel")
    fam = Family(Config(**TINY), device="cpu", cache_dir=root / "cache")
    model = fam.fit(fam.real_data("train", 0), seed=1, workdir=root / "gen-1")
    real = [np.append(d[:40], fam.vocab_.eos) for d in fam.real_data("test", 0).iter_docs()][:20]
    rng = np.random.default_rng(0)
    garbled = [np.concatenate([d[:1], rng.permutation(d[1:-1]), d[-1:]]) for d in real]
    write_shard(root / "candidates", real + garbled, fam.vocab_.dtype)
    return fam, model, TokenSet.open([root / "candidates"]), root


def test_perplexity_ranks_real_stories_above_garbled_ones_and_length_counts_tokens(briefly_trained):
    fam, model, candidates, _ = briefly_trained
    scores = fam.score(candidates, "perplexity", model, model, seed=0)
    assert (scores[:20] > scores[20:]).all(), scores  # each real story beats its own garbled copy
    assert scores[:20].min() > scores[20:].max()  # and every garbled one
    doc = next(candidates.iter_docs())  # the score is minus exp(mean nats per token after BOS), EOS included
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(doc[None, :-1]))
    nll = -torch.log_softmax(logits[0], -1).gather(1, torch.from_numpy(doc[1:, None])).mean()
    assert scores[0] == pytest.approx(-math.exp(float(nll)), rel=1e-5)
    lengths = fam.score(candidates, "length", model, model, seed=0)
    assert lengths.tolist() == [len(d) - 1 for d in candidates.iter_docs()]


def test_perplexity_under_a_saved_generation_and_a_refused_folder(briefly_trained, tmp_path):
    fam, model, candidates, root = briefly_trained
    fam.save_model(model, root / "saved")
    other = Family(Config(**TINY, select_model=str(root / "saved")), device="cpu", cache_dir=root / "cache")
    untrained = loops.build(fam.config, 512, seed=0, device="cpu")  # the reference argument is then not used
    assert np.allclose(other.score(candidates, "perplexity", untrained, untrained, 0), fam.score(candidates, "perplexity", model, model, 0))
    nowhere = Family(Config(**TINY, select_model=str(tmp_path / "nope")), device="cpu", cache_dir=root / "cache")
    with pytest.raises(BadInput, match="is not a gen-<n> folder of an lm run"):
        nowhere.real_data("train", 0)


def test_top_fraction_keeps_the_lowest_perplexity_stories_up_to_the_token_size(briefly_trained):
    fam, model, candidates, _ = briefly_trained
    scores = fam.score(candidates, "perplexity", model, model, seed=0)
    sizes = candidates.doc_lengths()
    real_tokens = int(sizes[:20].sum())
    kept, m = select_grouped(scores, sizes, real_tokens, SelectSpec(name="top-fraction", score="perplexity", oversample=2), 0)
    assert kept.tolist() == list(range(20))  # exactly the real stories: the 20 best, whose tokens reach the size
    kept, m = select_grouped(scores, sizes, real_tokens // 2, SelectSpec(name="top-fraction", score="perplexity", oversample=2), 0)
    assert real_tokens // 2 <= sizes[kept].sum() < real_tokens // 2 + sizes.max()  # whole stories, one at most over
    rejected = np.setdiff1d(np.arange(40), kept)
    assert scores[kept].min() >= scores[rejected].max()  # the best ones
    assert m["select_kept_frac"][0] == len(kept) / 40 and m["select_score_kept"][0] == pytest.approx(scores[kept].mean())


def test_grouped_threshold_and_k_choice_state_a_shortfall():
    scores, sizes = np.array([3.0, 1.0, 2.0, 0.0]), np.array([10, 50, 10, 50])
    with pytest.raises(RunFailed, match=r"threshold kept 20 of the 30 units needed \(min_score = 2: 2 of 4 candidates pass"):
        select_grouped(scores, sizes, 30, SelectSpec(name="threshold", score="x", min_score=2.0), 0)
    kept, m = select_grouped(scores, sizes, 30, SelectSpec(name="threshold", score="x", min_score=2.0, allow_short=True), 0)
    assert kept.tolist() == [0, 2] and m["select_kept_frac"][0] == 0.5
    spec = SelectSpec(name="k-choice", score="x", k=2, temperature=1e-3)  # each pair's better one, nearly surely
    kept, _ = select_grouped(scores, sizes, 20, spec, 0)
    assert kept.tolist() == [0, 2]
    with pytest.raises(RunFailed, match="k-choice kept 20 of the 30 units needed"):
        select_grouped(scores, sizes, 30, spec, 0)


def test_a_selecting_run_keeps_stories_records_it_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELCOLLAPSE_CACHE", str(tmp_path / "cache"))
    policy = {"name": "replace", "select": {"name": "top-fraction", "score": "perplexity", "oversample": 2}}
    raw = dict(name="lm-sel", family="lm", policies=[policy], iterations=2, seeds=1, device="cpu",
               lm=dict(TINY, max_train_stories=40, test_stories=10))
    out = run_experiment(configlib.from_dict(raw), tmp_path / "run", progress=False)
    rows = read_metrics(out)
    m = {r["metric"]: r["value"] for r in rows if r["iteration"] == 1}
    assert 0.3 < m["select_kept_frac"] < 0.7 and m["select_score_kept"] > m["select_score_rejected"]
    gen1 = out / "replace+top-fraction-perplexity-x2" / "seed-0" / "gen-1"
    fam = Family(configlib.from_dict(raw).family_config, device="cpu", cache_dir=tmp_path / "cache")
    real_tokens = fam.real_data("train", 0).n_tokens
    drawn = fam.load_sample(gen1)
    assert drawn.n_tokens == 2 * real_tokens  # the candidates
    kept = np.load(gen1 / "selected.npy")
    assert real_tokens <= drawn.doc_lengths()[kept].sum() < real_tokens + TINY["max_sample_len"]
    assert read_metrics(run_experiment(configlib.from_dict(raw), tmp_path / "run", progress=False)) == rows


def test_real_weight_reaches_every_target_and_the_loss(briefly_trained):
    fam, model, candidates, _ = briefly_trained
    real = fam.real_data("train", 0)
    train = TokenSet.concat([real.subsample(3000, seed=0), candidates])  # real, then "synthetic" stories
    assert train.real_docs().tolist() == [True] * (train.n_docs - 40) + [False] * 40
    weights = common.example_weights(train.real_docs(), 0.25, train.n_targets())
    total = real_share = count = 0.0
    for x, y, w in train.batches(64, 8, seed=3, weights=weights):
        y = loops._targets(y, fam.vocab_.bos)
        total, count = total + w[y >= 0].sum(), count + (y >= 0).sum()
        real_share += w[(y >= 0) & (w == weights[0])].sum()
    assert count == train.n_targets().sum() and total == pytest.approx(count, rel=1e-5)  # mean 1 over the targets
    assert real_share / total == pytest.approx(0.25, rel=1e-5)  # the real stories' share of the loss

    x, y, w = next(train.batches(64, 8, seed=3, weights=weights))
    y = loops._targets(y, fam.vocab_.bos)
    x, y, w = (torch.from_numpy(a) for a in (x, y, w))
    model.zero_grad()
    _, loss = model(x, y, w)  # the CPU's chunked cross-entropy, weighted
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, _ = model(x)
    want = (torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1, reduction="none")
            * w.reshape(-1)).sum() / (y >= 0).sum()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert weighted_ce(logits.reshape(-1, logits.size(-1)), y, w).item() == pytest.approx(want.item(), rel=1e-5)  # CUDA's and transformers' path
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, model.parameters()))
    model.zero_grad()


def test_a_heavier_real_weight_fits_the_real_stories_better(briefly_trained, tmp_path):
    """Real stories and garbled copies of stories: the more of the loss the real ones carry, the lower the
    test cross-entropy on real text."""
    _, _, candidates, root = briefly_trained
    fam = Family(Config(**TINY, steps=40), device="cpu", cache_dir=root / "cache")  # the same tokens, cached
    garbled = candidates.take(np.arange(20, 40))
    train = TokenSet.concat([fam.real_data("train", 0).subsample(4000, seed=0)] + [garbled] * 4)
    test = fam.real_data("test", 0)
    ce = {w: loops.test_ce(fam.fit(train, seed=1, workdir=tmp_path / str(w), real_weight=w), test, fam.config, fam.vocab_, "cpu")
          for w in (0.1, 0.9)}
    assert ce[0.9] < ce[0.1] - 0.1, ce


@pytest.mark.parametrize("extra,message", [
    ('[select]\nname = "top-fraction"\nscore = "oracle"\n', "the lm family provides no score 'oracle'; it has perplexity, length"),
    ('[lm]\nselect_model = "base"\n', 'select_model = "base" needs a base'),
])
def test_bad_lm_selection_is_one_line_exit_2(tmp_path, extra, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text('family = "lm"\npolicies = ["replace"]\niterations = 2\nseeds = 1\n' + extra)
    r = cli("run", cfg, "--out", tmp_path / "run")
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists()
