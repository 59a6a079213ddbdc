"""The `lm` family: stories, split, tokenizer, shards, and a tiny fit -> evaluate -> sample loop."""

import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from modelcollapse.errors import BadInput
from modelcollapse.families import DataUnavailable
from modelcollapse.families.lm import Config, Family
from modelcollapse.families.lm import data as text
from modelcollapse.families.lm import train as loops
from modelcollapse.families.lm.shards import TokenSet, token_dtype, write_shard

STORIES = [f"Once upon a time, there was a {a} named {n}. {n} liked to {v}.\nThe end of story {i}." for i, (a, n, v) in
           enumerate((a, n, v) for a in ("cat", "dog", "bird", "fox") for n in ("Tom", "Sue", "Max") for v in ("run", "sing", "hop"))]
TINY = dict(  # a model and data small enough to train in a few seconds on 2 cores
    max_train_stories=120, test_stories=40, vocab_size=512, model="llama2-tiny", block_size=64, batch_size=8,
    lr=5e-3, epochs=2, max_sample_len=64, sample_batch=16, eval_samples=20, shard_tokens=1024, checkpoint_every=5,
)



# -- stories and the split --------------------------------------------------------------------------------


def test_shipped_split_is_fixed_disjoint_and_deduplicated():
    train, test = text.load_stories("shipped", None, 0.05)
    assert (train, test) == text.load_stories("shipped", None, 0.05)
    assert len(train) == 4525 and 700 < len(test) < 900  # whole stories only: the cut-off fragments are gone
    assert train[0].startswith("One day, a little girl named Lily found a needle")  # file 1 starts at a story
    assert not any(s.startswith("u don't have to be scared") for s in train)  # file 3's cut-off first fragment
    assert all("<|endoftext|>" not in s and "\n\n" not in s for s in train + test)
    assert not any("â€" in s for s in test) and any("”" in s for s in test)  # mojibake repaired
    kept = text.dedup(train, test)
    assert len(kept) == 4518  # the 7 repeated training stories (PROVENANCE.md) go, and no more
    assert len({text.dedup_key(s) for s in kept}) == len(kept)
    assert not {text.dedup_key(s) for s in kept} & {text.dedup_key(s) for s in test}


def test_dedup_drops_repeats_and_copies_of_test_stories():
    test = ["A test story.\nIt has two paragraphs about a red ball " + "x" * 200, "Another test story " + "y" * 200]
    glued = "A glued first story.\n" + test[1]  # shipped test stories may hold several stories
    train = ["Train " + "a" * 200, "Train " + "a" * 200, "  a test  story.\nIT HAS two paragraphs about a red ball " + "x" * 200,
             test[1].replace("story", "story") + " but longer", "Train " + "b" * 200]
    kept = text.dedup(train, [test[0], glued])
    assert kept == ["Train " + "a" * 200, "Train " + "b" * 200]


def test_hash_split_of_a_local_file_is_deterministic_and_order_free(tmp_path):
    stories = [f"Story number {i}. Lily had a ball {i}." for i in range(2000)]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps({"text": s}) for s in stories))
    train, test = text.load_stories(str(path), None, 0.1)
    assert not set(train) & set(test) and len(train) + len(test) == 2000
    assert 150 < len(test) < 250  # about the holdout share
    random.Random(0).shuffle(stories)
    path.write_text("\n".join(json.dumps(s) for s in stories))  # other order, bare strings
    train2, test2 = text.load_stories(str(path), None, 0.1)
    assert set(test2) == set(test) and set(train2) == set(train)


def test_loader_reads_txt_jsonl_parquet_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = [text.normalize(s) for s in STORIES[:5]]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "sep.txt").write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES[:5]) + "A cut-off fra")
    (tmp_path / "blank.txt").write_text("\n\n".join(s.replace("\n", " ") for s in STORIES[:5]) + "\n")
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps({"text": s, "id": i}) for i, s in enumerate(STORIES[:5])) + "\n\n")
    pq.write_table(pa.table({"text": STORIES[:5]}), tmp_path / "s.parquet", row_group_size=2)
    for name in ("a/sep.txt", "s.jsonl", "s.parquet"):
        assert [text.normalize(s) for s in text.read_path(str(tmp_path / name))] == want, name
    assert [text.normalize(s) for s in text.read_path(str(tmp_path / "blank.txt"))] == [s.replace("\n", " ") for s in want]
    assert len(list(text.read_path(str(tmp_path)))) == 20  # a folder: every supported file in it
    train, test = text.load_stories(str(tmp_path / "s.jsonl"), str(tmp_path / "s.parquet"), 0.05)
    assert train == want and test == want  # test_data: a test source of its own


def test_hf_source_reads_a_dataset_through_datasets(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # nothing in ~/.cache
    (tmp_path / "ds").mkdir()  # a dataset folder as the Hub holds one: a file per split, named after it
    pq.write_table(pa.table({"text": STORIES[:6]}), tmp_path / "ds" / "train.parquet")
    pq.write_table(pa.table({"text": ["A test story.\n\nIn two paragraphs."]}), tmp_path / "ds" / "validation.parquet")
    train, test = text.load_stories(f"hf:{tmp_path / 'ds'}", None, 0.05)
    assert train == [text.normalize(s) for s in STORIES[:6]] and test == ["A test story.\nIn two paragraphs."]


def test_normalize_repairs_mojibake_and_paragraphs():
    raw = "â€œHi,â€ she said.\n\n  Itâ€™s fun â€“ yes.â€\nEnd.\n"
    assert text.normalize(raw) == "“Hi,” she said.\nIt’s fun – yes.”\nEnd."


@pytest.mark.parametrize("name, body, message", [
    ("missing.txt", None, "does not exist"),
    ("bad.jsonl", "{not json\n", "is not JSON"),
    ("bad.parquet", "not parquet at all", "not a parquet file"),
    ("bad.csv", "a,b\n", "unsupported type"),
    ("bad.txt", b"\xff\xfe\x00broken", "not UTF-8"),
])
def test_bad_data_raises_bad_input(tmp_path, name, body, message):
    path = tmp_path / name
    if isinstance(body, bytes):
        path.write_bytes(body)
    elif body is not None:
        path.write_text(body)
    fam = Family(Config(data=str(path), vocab_size=300, model="llama2-tiny"), device="cpu", cache_dir=tmp_path / "cache")
    with pytest.raises(BadInput, match=message):
        fam.real_data("train", 0)


def test_empty_folder_and_unloadable_hf_dataset_raise_bad_input(tmp_path):
    with pytest.raises(BadInput, match="holds no"):
        list(text.read_path(str(tmp_path)))
    with pytest.raises(BadInput, match="cannot load Hugging Face dataset"):  # a folder: no network is asked
        list(text.read_hf(str(tmp_path / "no-such-dataset"), "train"))


# -- tokenizer ------------------------------------------------------------------------------------------


def test_tokenizer_is_cached_by_content_hash(tmp_path, monkeypatch):
    tok, path = text.train_tokenizer(STORIES, 300, tmp_path)
    assert tok.token_to_id(text.BOS) == 0 and tok.token_to_id(text.EOS) == 1 and tok.get_vocab_size() <= 300
    assert tok.decode(tok.encode(STORIES[3]).ids) == STORIES[3]
    assert tok.decode(tok.encode("Zürich ☃ 42").ids) == "Zürich ☃ 42"  # byte level: any text encodes
    from tokenizers import Tokenizer

    def no_training(*a, **k):
        raise AssertionError("a cached tokenizer was trained again")

    monkeypatch.setattr(Tokenizer, "train_from_iterator", no_training)
    tok2, path2 = text.train_tokenizer(list(STORIES), 300, tmp_path)  # same content: a cache hit
    assert path2 == path and tok2.encode(STORIES[0]).ids == tok.encode(STORIES[0]).ids
    monkeypatch.undo()
    assert text.train_tokenizer(STORIES[:-1], 300, tmp_path)[1] != path  # other content: another file
    assert text.train_tokenizer(STORIES, 280, tmp_path)[1] != path  # other vocabulary: another file


# -- shards -------------------------------------------------------------------------------------------------


def _docs(seed, n):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 70000, rng.integers(1, 30)) for _ in range(n)]


def test_shards_round_trip_and_batches_cover_every_token_once(tmp_path):
    docs = _docs(0, 80)
    write_shard(tmp_path / "a", docs[:50], token_dtype(70000))
    write_shard(tmp_path / "b", docs[50:], token_dtype(70000))
    assert np.load(tmp_path / "a.tokens.npy").dtype == np.uint32 and token_dtype(4096) == np.uint16
    data = TokenSet.open([tmp_path / "a", tmp_path / "b"])
    assert data.n_docs == 80 and data.n_tokens == sum(map(len, docs))
    assert all((a == b).all() for a, b in zip(data.iter_docs(), docs))
    stream = np.concatenate(docs)
    for B, T in [(2, 5), (3, 16), (4, 1000)]:
        got = list(data.batches(T, B, seed=None))
        assert len(got) == data.n_batches(T, B) and all(x.shape == y.shape and x.shape[1] == T for x, y in got)
        x, y = (np.concatenate([b[i].ravel() for b in got]) for i in (0, 1))
        keep = y >= 0
        assert (x[keep] == stream[:-1]).all() and (y[keep] == stream[1:]).all()  # every target once, in order
        shuffled = list(data.batches(T, B, seed=3))
        targets = np.concatenate([b[1].ravel() for b in shuffled])
        assert sorted([shuffled[0][0][0, 0], *targets[targets >= 0]]) == sorted(stream)  # the same tokens, reordered
        for start in (1, len(got) - 1):  # resuming a pass gives the batches the full pass gives
            again = list(data.batches(T, B, seed=3, start=start))
            assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(again, shuffled[start:], strict=True))


def test_subsample_and_concat_sizes(tmp_path):
    docs = _docs(1, 200)
    write_shard(tmp_path / "a", docs[:120], token_dtype(70000))
    write_shard(tmp_path / "b", docs[120:], token_dtype(70000))
    a, b = TokenSet.open([tmp_path / "a"]), TokenSet.open([tmp_path / "b"])
    both = TokenSet.concat([a, b, a])
    assert both.n_tokens == 2 * a.n_tokens + b.n_tokens and both.n_docs == 240 + 80
    for size in (1, 500, 2000, both.n_tokens):
        sub = both.subsample(size, seed=7)
        assert size <= sub.n_tokens < size + 30  # whole documents: at most one document over
        assert sub.n_tokens == sum(len(d) for d in sub.iter_docs())
    again = both.subsample(500, seed=7)
    assert [d.tolist() for d in again.iter_docs()] == [d.tolist() for d in both.subsample(500, seed=7).iter_docs()]
    assert [d.tolist() for d in both.subsample(500, seed=8).iter_docs()] != [d.tolist() for d in again.iter_docs()]
    with pytest.raises(ValueError):
        a.subsample(a.n_tokens + 1, seed=0)


# -- config -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    dict(temperature=0.0), dict(vocab_size=100), dict(model="gpt5"), dict(block_size=64, max_sample_len=65),
    dict(test_data="x.txt"), dict(top_p=1.5), dict(top_k=9000), dict(data="hf:"), dict(holdout=1.0),
    dict(eval_samples=5), dict(n_embd=100, n_head=3), dict(n_embd=72, n_head=8), dict(unknown_key=1),
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        Config(**bad)


# -- fit, evaluate, sample ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model fit on 120 shipped stories (about 40k tokens), shared by the tests below."""
    root = tmp_path_factory.mktemp("lm")
    fam = Family(Config(**TINY), device="cpu", cache_dir=root / "cache")
    train, test = fam.real_data("train", 0), fam.real_data("test", 0)
    model = fam.fit(train, seed=1, workdir=root / "gen-1")
    return fam, model, train, test, root


def test_real_data_tokens_and_fresh_draws(trained):
    fam, _, train, test, root = trained
    assert fam.size(train) == train.n_tokens > 30_000 and train.n_docs == 120 and test.n_docs == 40
    docs = list(train.iter_docs())
    assert all(d[0] == fam.bos_ and d[-1] == fam.eos_ and (d[1:-1] > 1).all() for d in docs)
    assert fam.tokenizer_.decode(docs[0][1:-1].tolist()).startswith("One day, a little girl named Lily found a needle")
    again = Family(Config(**TINY), device="cpu", cache_dir=root / "cache")
    assert again.real_data("train", 5).parts[0].stem == train.parts[0].stem  # same stories and tokenizer: cached
    draw = fam.real_data("train", 0, draw=1)
    assert draw.n_docs == 120 and fam.tokenizer_.decode(next(draw.iter_docs())[1:-1].tolist()) != fam.tokenizer_.decode(docs[0][1:-1].tolist())
    with pytest.raises(DataUnavailable):
        fam.real_data("train", 0, draw=50)


def test_fit_learns_and_evaluate_reports_metrics_and_samples(trained):
    fam, model, _, test, root = trained
    untrained = loops.build(fam.config, 512, seed=0, device="cpu")
    ce0 = loops.test_ce(untrained, test, fam.config, fam.vocab_, "cpu")
    assert abs(ce0 - math.log(512)) < 0.3  # a fresh model is near uniform
    out = root / "eval"
    out.mkdir()
    m = fam.evaluate(model, test, seed=2, workdir=out)
    assert m["test_ce"] < math.log(512) - 1.5, m  # trained: far below uniform
    assert set(m) == {"test_ce", "distinct_1", "distinct_2", "distinct_3", "distinct_tokens", "sample_tokens", "sample_eos", "self_bleu", "ttr",
                      "unigram_entropy", "unigram_kl", "zipf_exponent", "rare_word_recall", "sample_ppl", "sample_ppl_p10", "sample_ppl_p90"}
    assert 0 < m["distinct_1"] < m["distinct_2"] <= m["distinct_3"] <= 1 and 20 < m["distinct_tokens"] <= 510
    rows = json.loads((out / "samples.json").read_text())
    assert len(rows) == 20 and all(r["text"] for r in rows)
    assert (out / "samples.txt").read_text().count("\n") >= 20
    assert fam.evaluate(model, test, seed=2, workdir=out) == m  # deterministic per seed
    assert (root / "gen-1" / loops.CHECKPOINT).exists()  # kept until the model is saved: a kill in between loses no step
    fam.save_model(model, root / "gen-1")
    assert not (root / "gen-1" / loops.CHECKPOINT).exists()  # the saved model supersedes it


def test_test_ce_counts_every_test_token_once(trained):
    fam, model, _, test, _ = trained
    want = test.n_tokens - test.n_docs  # every token but the BOS of each document
    got = sum(int((loops._targets(y, fam.bos_) >= 0).sum()) for _, y in test.batches(64, 16, seed=None))
    assert got == want
    ce_small = loops.test_ce(model, test, fam.config.model_copy(update=dict(batch_size=3)), fam.vocab_, "cpu")
    assert ce_small == pytest.approx(loops.test_ce(model, test, fam.config, fam.vocab_, "cpu"), rel=1e-5)


def test_save_and_load_model(trained, tmp_path):
    fam, model, _, _, _ = trained
    fam.save_model(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", "model.json", "tokenizer.json"}
    back = fam.load_model(tmp_path)
    x = torch.randint(0, 512, (2, 64))
    assert torch.equal(back(x)[0], model(x)[0])
    (tmp_path / "model.json").write_text("{")
    with pytest.raises(BadInput, match="model.json"):
        fam.load_model(tmp_path)


def test_sample_size_determinism_and_resume(trained, tmp_path, monkeypatch):
    fam, model, train, _, _ = trained
    size = 3000  # 3 shards of 1024, 1024 and 952 tokens
    data = fam.sample(model, size, train, seed=4, workdir=tmp_path / "a")
    assert fam.size(data) == size and len(data.parts) == 3
    assert all(d[0] == fam.bos_ for d in data.iter_docs())
    reopened = fam.load_sample(tmp_path / "a")
    assert [d.tolist() for d in reopened.iter_docs()] == [d.tolist() for d in data.iter_docs()]
    other = fam.sample(model, size, train, seed=4, workdir=tmp_path / "b")
    assert [d.tolist() for d in other.iter_docs()] == [d.tolist() for d in data.iter_docs()]  # same seed, same tokens
    assert [d.tolist() for d in fam.sample(model, size, train, seed=5, workdir=tmp_path / "c").iter_docs()] != [
        d.tolist() for d in data.iter_docs()]
    # a killed sampling phase: shard 1 is lost; the others are kept, not redone
    folder = tmp_path / "b" / "sample"
    (folder / "shard-00001.starts.npy").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-0000[02]*")}
    calls = []
    real_generate = loops.generate_docs
    monkeypatch.setattr(loops, "generate_docs", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    with pytest.raises(BadInput, match="incomplete"):
        fam.load_sample(tmp_path / "b")
    resumed = fam.sample(model, size, train, seed=4, workdir=tmp_path / "b")
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-0000[02]*")} == kept
    assert 0 < len(calls) <= 1024 // fam.config.sample_batch + 1  # only shard 1 was sampled
    assert [d.tolist() for d in resumed.iter_docs()] == [d.tolist() for d in data.iter_docs()]


def test_fit_is_deterministic_and_resumes_mid_training(trained, tmp_path, monkeypatch):
    fam, model, train, _, _ = trained
    small = train.subsample(8000, seed=0)  # 2 epochs of 16 steps of 8 x 64 tokens
    ref = fam.fit(small, seed=3, workdir=tmp_path / "ref")
    real_lr = loops.lr_at

    def killed_at_22(step, total, cfg):
        if step == 22:
            raise KeyboardInterrupt  # the run is killed in its second epoch, after the checkpoint of step 20
        return real_lr(step, total, cfg)

    assert small.n_batches(64, 8) == 16
    monkeypatch.setattr(loops, "lr_at", killed_at_22)
    with pytest.raises(KeyboardInterrupt):
        fam.fit(small, seed=3, workdir=tmp_path / "run")
    assert (tmp_path / "run" / loops.CHECKPOINT).exists()
    monkeypatch.setattr(loops, "lr_at", real_lr)
    resumed = fam.fit(small, seed=3, workdir=tmp_path / "run")
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    other = fam.fit(small, seed=4, workdir=tmp_path / "other")
    assert not torch.equal(next(other.parameters()), next(ref.parameters()))


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = Config(lr=1e-3, warmup_frac=0.1, min_lr_frac=0.1)
    lrs = [loops.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_quick_lm_run_through_the_loop(tmp_path, monkeypatch):
    from modelcollapse import config as configlib
    from modelcollapse.loop import run_experiment
    from modelcollapse.store import read_metrics

    monkeypatch.setenv("MODELCOLLAPSE_CACHE", str(tmp_path / "cache"))
    raw = dict(name="lm-loop", family="lm", policies=["replace", "accumulate"], iterations=2, seeds=1, device="cpu",
               lm=dict(TINY, max_train_stories=40, test_stories=10))
    out = run_experiment(configlib.from_dict(raw), tmp_path / "run", progress=False)
    rows = read_metrics(out)
    ce = {(r["policy"], r["iteration"]): r["value"] for r in rows if r["metric"] == "test_ce"}
    assert set(ce) == {(p, n) for p in ("replace", "accumulate") for n in (1, 2)}
    assert ce[("replace", 1)] == ce[("accumulate", 1)]  # generation 1 is one fit, shared by both policies
    real_tokens = Family(configlib.from_dict(raw).family_config, device="cpu", cache_dir=tmp_path / "cache").real_data("train", 0).n_tokens
    for policy in ("replace", "accumulate"):
        gen1 = out / policy / "seed-0" / "gen-1"
        assert (gen1 / "model.safetensors").exists() and (gen1 / "samples.txt").exists()
        assert TokenSet.open(sorted({p.with_name(p.name.split(".")[0]) for p in (gen1 / "sample").glob("shard-*.npy")})).n_tokens == real_tokens
    rerun = run_experiment(configlib.from_dict(raw), tmp_path / "run", progress=False)  # finished: nothing redone
    assert read_metrics(rerun) == rows

    # any generation exports to transformers, with its tokenizer, and computes the same logits
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import cli
    from modelcollapse.families.lm import export

    gen2 = out / "accumulate" / "seed-0" / "gen-2"
    hf_dir = export(gen2, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([[0] + tok("Once upon a time there was a cat.")["input_ids"]])
    ours = Family(configlib.from_dict(raw).family_config, device="cpu").load_model(gen2)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids)[0], atol=1e-4)
    bad = cli("export", out / "accumulate", "--out", tmp_path / "nowhere")
    assert bad.returncode == 2 and "not a generation folder" in bad.stderr

    # an --out that exists (a file, a folder with files) or a generation without its tokenizer: one line, exit 2,
    # nothing written; an empty folder is filled
    (tmp_path / "taken.txt").write_text("keep")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine").write_text("keep")
    (tmp_path / "empty").mkdir()
    shutil.copytree(out, tmp_path / "copy")
    (tmp_path / "copy" / "accumulate" / "seed-0" / "gen-2" / "tokenizer.json").unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    for gen, target, needle in ((gen2, tmp_path / "taken.txt", "exists and is not a directory"),
                                (gen2, tmp_path / "full", "is a directory that is not empty"),
                                (tmp_path / "copy" / "accumulate" / "seed-0" / "gen-2", tmp_path / "new", "holds no tokenizer.json")):
        r = cli("export", gen, "--out", target)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no half export, no staging folder left
    assert (tmp_path / "taken.txt").read_text() == "keep" and [p.name for p in (tmp_path / "full").iterdir()] == ["mine"]
    r = cli("export", gen2, "--out", tmp_path / "empty")
    assert r.returncode == 0 and r.stdout == f"exported: {tmp_path / 'empty'}\n", r.stderr
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "empty") is not None


# -- damaged caches and inputs (issue 12) ----------------------------------------------------------------------


def _story_files(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("\n".join(json.dumps({"text": s}) for s in STORIES[:30]))
    test.write_text("\n".join(json.dumps({"text": s}) for s in STORIES[30:]))
    return Config(data=str(train), test_data=str(test), vocab_size=300, model="llama2-tiny")


def _oov(stem):
    """The shard's tokens, same length, every id 299 + 1 = outside a 300-token vocabulary."""
    path = stem.with_name(stem.name + ".tokens.npy")
    np.save(path, np.full(len(np.load(path)), 300, np.load(path).dtype))


@pytest.mark.parametrize("damage", ["tokenizer cut short", "tokenizer garbage", "tokens cut short", "offsets garbage",
                                    "ids outside the vocabulary"])
def test_a_damaged_cache_is_rebuilt_with_one_line_of_warning(tmp_path, caplog, damage):
    cfg = _story_files(tmp_path)
    cache = tmp_path / "cache"
    fam = Family(cfg, device="cpu", cache_dir=cache)
    docs = [d.tolist() for d in fam.real_data("train", 0).iter_docs()]
    tokenizer = next((cache / "lm" / "tokenizers").glob("*.json"))
    stem = fam.real_data("train", 0).parts[0].stem
    if damage == "tokenizer cut short":
        tokenizer.write_bytes(tokenizer.read_bytes()[:1000])
    elif damage == "tokenizer garbage":
        tokenizer.write_bytes(b"\x00garbage" * 100)
    elif damage == "tokens cut short":
        tokens = stem.with_name(stem.name + ".tokens.npy")
        tokens.write_bytes(tokens.read_bytes()[:300])
    elif damage == "offsets garbage":
        starts = stem.with_name(stem.name + ".starts.npy")
        np.save(starts, np.load(starts)[::-1].copy())
    else:
        _oov(stem)
    caplog.set_level("WARNING", logger="modelcollapse")
    again = Family(cfg, device="cpu", cache_dir=cache)
    assert [d.tolist() for d in again.real_data("train", 0).iter_docs()] == docs
    warnings = [r.getMessage() for r in caplog.records if r.name == "modelcollapse"]
    assert len(warnings) == 1 and warnings[0].startswith("rebuilding the cache ") and "\n" not in warnings[0]
    assert str(tokenizer if "tokenizer" in damage else stem) in warnings[0]
    caplog.clear()
    Family(cfg, device="cpu", cache_dir=cache).real_data("train", 0)  # rebuilt for good
    assert not caplog.records


def test_sampled_shards_with_ids_outside_the_vocabulary_are_named(trained, tmp_path):
    fam, model, train, _, _ = trained
    fam.sample(model, 1500, train, seed=4, workdir=tmp_path)
    bad = tmp_path / "sample" / "shard-00001"
    path = bad.with_name(bad.name + ".tokens.npy")
    tokens = np.load(path)
    tokens[7] = fam.config.vocab_size + 3
    np.save(path, tokens)
    with pytest.raises(BadInput, match=f"token shard {bad} holds token id {fam.config.vocab_size + 3}, outside the vocabulary of 512 ids"):
        fam.load_sample(tmp_path)


@pytest.mark.parametrize("kind", ["fifo", "fifo in a folder", "/dev/zero", "link to /dev/zero"])
def test_data_that_is_not_a_regular_file_is_refused_before_it_is_read(tmp_path, kind):
    from blocking import within

    if kind == "/dev/zero":
        path = "/dev/zero"
    elif kind == "link to /dev/zero":
        path = tmp_path / "zero.txt"
        path.symlink_to("/dev/zero")
    else:
        folder = tmp_path / "data" if kind == "fifo in a folder" else tmp_path
        folder.mkdir(exist_ok=True)
        (folder / "a.txt").write_text("Once upon a time.") if kind == "fifo in a folder" else None
        os.mkfifo(folder / "stories.txt")
        path = folder if kind == "fifo in a folder" else folder / "stories.txt"
    fam = Family(Config(data=str(path), vocab_size=300, model="llama2-tiny"), device="cpu", cache_dir=tmp_path / "cache")
    with within(20), pytest.raises(BadInput, match="data file is not a regular file"):
        fam.real_data("train", 0)
    assert not (tmp_path / "cache").exists()


def test_an_hf_dataset_that_cannot_be_reached_fails_in_one_line_at_once(tmp_path, monkeypatch):
    """Offline (here: a Hub address where nothing listens, on any machine) and not in the local cache: one
    line, not half a minute of retries and a dozen lines of them."""
    from conftest import cli

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_DATASETS_CACHE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "hf"\nfamily = "lm"\npolicies = ["replace"]\niterations = 1\nseeds = 1\ndevice = "cpu"\n'
                   '[lm]\ndata = "hf:roneneldan/TinyStories"\nmodel = "llama2-tiny"\nvocab_size = 300\n')
    r = cli("run", cfg, "--out", tmp_path / "out", timeout=60)
    assert r.returncode == 2 and r.stderr == ("error: cannot load Hugging Face dataset 'roneneldan/TinyStories' split "
                                              "'train': offline, and it is not in the local Hugging Face cache\n"), r.stderr
    assert not (tmp_path / "out").exists()
