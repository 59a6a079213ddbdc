"""The vae family: loaders, a real fit, sampling, checkpoints, and the classifier-based sample metrics."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from conftest import cli
from modelcollapse import config as configlib
from modelcollapse.errors import BadInput
from modelcollapse.families import DataUnavailable
from modelcollapse.families.vae import VAE, Config, Family, metrics
from modelcollapse.loop import run_experiment
from modelcollapse.store import read_metrics

TINY = dict(dataset="digits", channels=[16, 32], latent_dim=8, epochs=20, batch_size=64, lr=3e-3, classifier_steps=300)



@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def digits(cache):
    return Family(Config(**TINY), device="cpu", cache_dir=cache)


@pytest.fixture(scope="module")
def fitted(digits, tmp_path_factory):
    return digits.fit(digits.real_data("train"), seed=0, workdir=tmp_path_factory.mktemp("fit"))


# -- loaders --------------------------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_uint8(digits):
    train, test = digits.real_data("train"), digits.real_data("test")
    assert train.x.shape == (1437, 1, 8, 8) and test.x.shape == (360, 1, 8, 8)
    assert train.x.dtype == np.uint8 and train.x.max() == 255
    # stratified: every class keeps its share (±1 image) in the test split
    assert np.all(np.abs(np.bincount(test.y) - np.bincount(train.y) / 4) <= 1.5)
    again = Family(Config(**TINY), device="cpu", cache_dir=digits.cache_dir).real_data("test", seed=7)
    assert np.array_equal(again.x, test.x) and np.array_equal(again.y, test.y)  # the seed does not move it


def test_mnist5k_is_the_bundled_digits(tmp_path):
    fam = Family(Config(), device="cpu", cache_dir=tmp_path)
    train, test = fam.real_data("train"), fam.real_data("test")
    assert train.x.shape == (4000, 1, 28, 28) and test.x.shape == (1000, 1, 28, 28)
    assert list(np.bincount(train.y)) == [400] * 10 and list(np.bincount(test.y)) == [100] * 10
    assert 0.05 < (train.x > 127).mean() < 0.3  # ink on a dark background, as MNIST is
    with pytest.raises(DataUnavailable):  # all 4000 training images are in use: no fresh real set
        fam.real_data("train", draw=1)


def write_idx(path, array, magic, compress):
    raw = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def fake_fashion(folder, n_train=30, n_test=10, compress=True):
    folder.mkdir(exist_ok=True)
    g = np.random.default_rng(0)
    ext = ".gz" if compress else ""
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte{ext}", g.integers(0, 256, (n, 28, 28), dtype=np.uint8), 0x0803, compress)
        write_idx(folder / f"{stem}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8), 0x0801, compress)
    return folder


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder_loads_and_serves_fresh_blocks(tmp_path, compress):
    folder = fake_fashion(tmp_path / "fm", compress=compress)
    fam = Family(Config(dataset="fashion-mnist", data_dir=str(folder), n_train=12), device="cpu", cache_dir=tmp_path)
    train, test = fam.real_data("train"), fam.real_data("test")
    assert train.x.shape == (12, 1, 28, 28) and test.x.shape == (10, 1, 28, 28)
    assert sorted(test.y) == list(range(10))
    block1 = fam.real_data("train", draw=1)  # the fresh policy's next real set: disjoint from the first
    assert len(block1) == 12 and not {im.tobytes() for im in block1.x} & {im.tobytes() for im in train.x}
    with pytest.raises(DataUnavailable):
        fam.real_data("train", draw=2)  # 30 images hold two blocks of 12, not three


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: (d / "t10k-labels-idx1-ubyte.gz").unlink(), "missing IDX file t10k-labels-idx1-ubyte"),
        (lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all"), "cannot read IDX file"),
        (lambda d: write_idx(d / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8), 0x0801, True), "bad magic"),
        (lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(gzip.decompress((d / "train-images-idx3-ubyte.gz").read_bytes())[:-5])), "truncated"),
        (lambda d: write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8), 0x0801, True), "30 images but 29 labels"),
    ],
)  # fmt: skip
def test_malformed_idx_is_bad_input(tmp_path, break_it, message):
    folder = fake_fashion(tmp_path / "fm")
    break_it(folder)
    fam = Family(Config(dataset="fashion-mnist", data_dir=str(folder)), device="cpu", cache_dir=tmp_path)
    with pytest.raises(BadInput, match=message):
        fam.real_data("train")


def test_missing_idx_folder_is_bad_input(tmp_path):
    fam = Family(Config(dataset="mnist", data_dir=str(tmp_path / "nowhere")), device="cpu", cache_dir=tmp_path)
    with pytest.raises(BadInput, match="folder not found"):
        fam.real_data("train")


ATTRS = ["Eyeglasses", "Smiling", "Male"]


def fake_celeba(folder, n=12):
    (folder / "img_align_celeba").mkdir(parents=True)
    g = np.random.default_rng(0)
    rows, parts = [], []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        photo = np.zeros((218, 178, 3), np.uint8)
        photo[..., i % 3] = 40 + 15 * i  # a plain colour each, so crop and resize can be checked
        photo[:30] = 255  # a white band at the top, outside the centred 140 px crop
        Image.fromarray(photo).save(folder / "img_align_celeba" / name, quality=95)
        rows.append(name + " " + " ".join(g.choice(["1", "-1"], size=len(ATTRS))))
        parts.append(f"{name} {[0, 0, 0, 1, 2, 0][i % 6]}")
    (folder / "list_attr_celeba.txt").write_text(f"{n}\n{' '.join(ATTRS)}\n" + "\n".join(rows) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return folder


def test_celeba_folder_loads_crops_and_caches(tmp_path):
    folder = fake_celeba(tmp_path / "celeba")
    cfg = Config(dataset="celeba", data_dir=str(folder), image_size=16, channels=[8, 16])
    fam = Family(cfg, device="cpu", cache_dir=tmp_path / "cache")
    assert fam.source.names == tuple(ATTRS) and fam.source.multilabel
    train, test = fam.real_data("train"), fam.real_data("test")
    assert train.x.shape == (8, 3, 16, 16) and test.x.shape == (2, 3, 16, 16)  # partitions 0 and 2
    assert train.y.shape == (8, 3) and set(np.unique(train.y)) <= {0, 1}
    assert train.x.max() < 230  # the white band was cropped away
    assert len(list((tmp_path / "cache").glob("vae-celeba-16px-*.npy"))) == 2
    (folder / "img_align_celeba" / "000001.jpg").unlink()  # the cache key reads every image's size...
    again = Family(cfg, device="cpu", cache_dir=tmp_path / "cache")
    with pytest.raises(BadInput, match="CelebA image not found"):  # ...so a missing image is noticed, cache or not
        again.real_data("train")


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: (d / "list_eval_partition.txt").unlink(), "has no list_eval_partition.txt"),
        (lambda d: (d / "list_attr_celeba.txt").write_text("1\nA B\n000001.jpg 1\n"), "line 3: expected a file name and 2"),
        (lambda d: (d / "list_eval_partition.txt").write_text("000001.jpg 7\n"), "partition 0, 1 or 2"),
        (lambda d: (d / "img_align_celeba" / "000002.jpg").write_bytes(b"not a jpeg"), "cannot read CelebA image"),
    ],
)  # fmt: skip
def test_malformed_celeba_is_bad_input(tmp_path, break_it, message):
    folder = fake_celeba(tmp_path / "celeba")
    break_it(folder)
    with pytest.raises(BadInput, match=message):
        Family(Config(dataset="celeba", data_dir=str(folder), image_size=16), device="cpu", cache_dir=tmp_path).real_data("train")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(channels=[8, 16, 32]), "divisible by 8; mnist5k images are 28 px"),
        (dict(dataset="celeba"), "needs data_dir"),
        (dict(sigma=0.1), "only to decoder = 'gaussian'"),
        (dict(eval_samples=10, pr_k=10), "pr_k"),
        (dict(epochs=0), "greater than or equal to 1"),
        (dict(decoder="poisson"), "bernoulli"),
        (dict(epoch=3), "Extra inputs"),
    ],
)
def test_config_rejects_impossible_settings(fields, message):
    with pytest.raises(ValidationError, match=message):
        Config(**fields)


# -- fit, sample, checkpoints -----------------------------------------------------------------------------


def test_fit_drives_test_nelbo_well_below_an_untrained_model(digits, fitted):
    test = digits.real_data("test")
    untrained = VAE(digits.model_config()).init_weights(torch.Generator().manual_seed(0)).eval()
    before = np.mean(np.add(*digits.nelbo(untrained, test)))
    after = np.mean(np.add(*digits.nelbo(fitted, test)))
    assert after < 0.7 * before, (before, after)  # ~44 → ~25 nats per 8×8 image
    assert abs(fitted.train_nelbo_ - after) < 0.2 * after  # and not by overfitting the training set


def test_samples_are_uint8_images_that_round_trip(digits, fitted, tmp_path):
    train = digits.real_data("train")
    s = digits.sample(fitted, 100, like=train, seed=3, workdir=tmp_path)
    assert s.x.shape == (100, 1, 8, 8) and s.x.dtype == np.uint8 and s.y is None
    assert s.x.std() > 10  # not blank: digits have strokes
    assert np.array_equal(digits.load_sample(tmp_path).x, s.x)
    mixed = digits.concat([train, s])
    assert digits.size(mixed) == 1537 and mixed.y is None  # synthetic images carry no labels
    sub = digits.subsample(mixed, 50, seed=1)
    assert digits.size(sub) == 50 and np.array_equal(sub.x, digits.subsample(mixed, 50, seed=1).x)


def test_load_sample_rejects_a_corrupt_file(digits, tmp_path):
    (tmp_path / "samples.npy").write_bytes(b"garbage")
    with pytest.raises(BadInput, match="samples.npy"):
        digits.load_sample(tmp_path)


def test_fit_and_sample_are_deterministic_per_seed(tmp_path):
    fam = Family(Config(**{**TINY, "epochs": 2}), device="cpu", cache_dir=tmp_path)
    train = fam.real_data("train")[:300]
    a, b, c = (fam.fit(train, seed=s, workdir=tmp_path) for s in (5, 5, 6))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.state_dict()["decoder.from_latent.weight"], c.state_dict()["decoder.from_latent.weight"])
    assert np.array_equal(fam.generate(a, 20, seed=1), fam.generate(b, 20, seed=1))
    assert not np.array_equal(fam.generate(a, 20, seed=1), fam.generate(a, 20, seed=2))


def test_saved_model_reloads_identically(digits, fitted, tmp_path):
    digits.save_model(fitted, tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "model.json").is_file()
    loaded = digits.load_model(tmp_path)
    test = digits.real_data("test")
    assert np.array_equal(np.add(*digits.nelbo(loaded, test)), np.add(*digits.nelbo(fitted, test)))
    assert loaded.train_nelbo_ == fitted.train_nelbo_


def test_gaussian_decoder_learns_its_sigma(tmp_path):
    fam = Family(Config(**{**TINY, "epochs": 5, "decoder": "gaussian"}), device="cpu", cache_dir=tmp_path)
    model = fam.fit(fam.real_data("train"), seed=0, workdir=tmp_path)
    sigma = model.sigma().item()
    assert 0.05 < sigma < 0.5  # from 1 at init towards the reconstruction error's scale
    rec, kl = fam.nelbo(model, fam.real_data("test"))
    assert np.isfinite(rec).all() and rec.mean() < 0  # a density on [0, 1]^64 may go below 0 nats
    fixed = Family(Config(**{**TINY, "epochs": 1, "decoder": "gaussian", "sigma": 0.2}), device="cpu", cache_dir=tmp_path)
    assert fixed.fit(fixed.real_data("train"), seed=0, workdir=tmp_path).sigma().item() == pytest.approx(0.2)


# -- evaluation and the classifier's metrics ---------------------------------------------------------


def test_evaluate_reports_every_metric_and_writes_the_grid(digits, fitted, tmp_path):
    out = digits.evaluate(fitted, digits.real_data("test"), seed=1, workdir=tmp_path)
    for name in ("test_nelbo", "test_bpd", "test_recon", "test_kl", "train_nelbo", "class_entropy",
                 "rarest_class_freq", "fd_classifier", "precision", "recall", "classifier_acc"):  # fmt: skip
        assert math.isfinite(out[name]), name
    assert out["test_bpd"] == pytest.approx(out["test_nelbo"] / (64 * math.log(2)))
    assert out["test_nelbo"] == pytest.approx(out["test_recon"] + out["test_kl"])
    assert sum(out[f"class_freq_{k}"] for k in range(10)) == pytest.approx(1.0)
    assert out["classifier_acc"] > 0.9
    assert out["class_entropy"] > 1.5  # a VAE fit on real digits draws many classes
    with Image.open(tmp_path / "samples.png") as im:
        assert im.size == (8 * 34 + 2, 8 * 34 + 2)  # 8×8 tiles of 8 px scaled ×4, 2 px apart
    again = digits.evaluate(fitted, digits.real_data("test"), seed=1, workdir=tmp_path)
    assert again == out  # the same seed, the same numbers


def test_classifier_metrics_tell_real_from_a_single_mode(digits):
    clf = digits.classifier()
    train, test = digits.real_data("train"), digits.real_data("test")
    names = digits.source.names
    real_vs_real = metrics.sample_metrics(clf, test, train.x[:360], False, names, k=3)
    assert real_vs_real["class_entropy"] == pytest.approx(math.log(10), abs=0.05)
    assert real_vs_real["precision"] > 0.8 and real_vs_real["recall"] > 0.8
    sevens = train.x[train.y == 7]
    one_mode = metrics.sample_metrics(clf, test, sevens, False, names, k=3)
    assert one_mode["class_entropy"] < 0.1 and one_mode["rarest_class_freq"] == 0.0
    assert one_mode["class_freq_7"] > 0.95 and one_mode["recall"] < 0.3
    assert one_mode["fd_classifier"] > 3 * real_vs_real["fd_classifier"]


def test_noise_is_far_from_real_digits(tmp_path):
    # on 28×28 MNIST: at 8×8 a patch of uniform noise looks like a blurred "8" to the classifier
    fam = Family(Config(classifier_steps=100), device="cpu", cache_dir=tmp_path)
    train, test = fam.real_data("train"), fam.real_data("test")
    names = fam.source.names
    real_vs_real = metrics.sample_metrics(fam.classifier(), test, train.x[:1000], False, names, k=3)
    noise = np.random.default_rng(0).integers(0, 256, size=test.x.shape, dtype=np.uint8)
    vs_noise = metrics.sample_metrics(fam.classifier(), test, noise, False, names, k=3)
    assert real_vs_real["precision"] > 0.8 and real_vs_real["recall"] > 0.8
    assert vs_noise["precision"] < 0.05 and vs_noise["recall"] < 0.05
    assert vs_noise["fd_classifier"] > 100 * real_vs_real["fd_classifier"]


def test_classifier_is_cached_by_data_and_reused(digits):
    files = list(digits.cache_dir.glob("vae-classifier-*.safetensors"))
    assert len(files) == 1  # trained once for this module's digits
    fresh = Family(Config(**TINY), device="cpu", cache_dir=digits.cache_dir)
    x = digits.real_data("test").x[:50]
    f_old, _ = metrics.embed(digits.classifier(), x, False)
    f_new, _ = metrics.embed(fresh.classifier(), x, False)  # loaded from the cache, not retrained
    assert np.array_equal(f_old, f_new)
    assert len(list(digits.cache_dir.glob("vae-classifier-*.safetensors"))) == 1


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    g = np.random.default_rng(0)
    a = g.standard_normal((20000, 3))
    b = 2.0 * g.standard_normal((20000, 3)) + 1.0  # Σb = 4I, μb = 1: FD = 3·1 + 3·(1 + 4 − 2·2) = 6
    assert metrics.frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)


def test_celeba_attributes_are_judged_as_multilabel(tmp_path):
    folder = fake_celeba(tmp_path / "celeba")
    cfg = Config(dataset="celeba", data_dir=str(folder), image_size=16, channels=[8, 16], epochs=2,
                 eval_samples=10, pr_k=1, classifier_steps=5, decoder="gaussian")  # fmt: skip
    fam = Family(cfg, device="cpu", cache_dir=tmp_path / "cache")
    model = fam.fit(fam.real_data("train"), seed=0, workdir=tmp_path)
    out = fam.evaluate(model, fam.real_data("test"), seed=0, workdir=tmp_path)
    assert {f"attr_freq_{a}" for a in ATTRS} <= out.keys()
    assert 0.0 <= out["class_entropy"] <= math.log(2)  # mean binary entropy over attributes
    assert out["test_bpd"] == pytest.approx(out["test_nelbo"] / (3 * 16 * 16 * math.log(2)) + 8)
    assert (tmp_path / "samples.png").is_file()


# -- through the loop -------------------------------------------------------------------------------------


def test_tiny_run_through_the_loop(tmp_path):
    raw = {"name": "vae-tiny", "family": "vae", "policies": ["replace", "accumulate"], "iterations": 2, "seeds": 1,
           "device": "cpu", "vae": {**TINY, "n_train": 200, "n_test": 100, "epochs": 3, "eval_samples": 100,
                                    "classifier_steps": 30}}  # fmt: skip
    out = run_experiment(configlib.from_dict(raw), tmp_path / "run", progress=False)
    rows = read_metrics(out)
    assert {(r["policy"], r["iteration"]) for r in rows if r["metric"] == "test_nelbo"} == {
        ("replace", 1), ("replace", 2), ("accumulate", 1), ("accumulate", 2)}
    gen1 = out / "replace" / "seed-0" / "gen-1"
    assert (gen1 / "samples.png").is_file() and (gen1 / "model.safetensors").is_file()
    assert np.load(gen1 / "samples.npy").shape == (200, 1, 8, 8)  # generation 2's training set
    value = {(r["policy"], r["iteration"], r["metric"]): r["value"] for r in rows}
    assert value["replace", 1, "test_nelbo"] == value["accumulate", 1, "test_nelbo"]  # generation 1 is shared
    assert value["replace", 2, "test_nelbo"] != value["accumulate", 2, "test_nelbo"]


@pytest.mark.parametrize("broken", ["missing", "malformed"])
def test_cli_names_a_bad_idx_folder_in_one_line_and_exits_2(tmp_path, broken):
    folder = tmp_path / "fm"
    if broken == "malformed":
        fake_fashion(folder)
        (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 5))
    cfg = tmp_path / "vae.toml"
    cfg.write_text(f'family = "vae"\npolicies = ["replace"]\niterations = 2\nseeds = 1\n'
                   f'[vae]\ndataset = "fashion-mnist"\ndata_dir = "{folder}"\n')  # fmt: skip
    r = cli("run", cfg, "--out", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert str(folder) in r.stderr and ("not found" if broken == "missing" else "t10k-images") in r.stderr
    assert not (tmp_path / "out").exists()  # nothing written


# -- damaged caches and inputs (issue 12) ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"garbage" * 50])
def test_a_damaged_classifier_cache_is_retrained_with_one_line_of_warning(digits, tmp_path, caplog, damage):
    import shutil

    digits.classifier()  # trained and cached
    cache = tmp_path / "cache"
    shutil.copytree(digits.cache_dir, cache)
    (saved,) = cache.glob("vae-classifier-*.safetensors")
    saved.write_bytes(damage(saved.read_bytes()))
    caplog.set_level("WARNING", logger="modelcollapse")
    fresh = Family(Config(**TINY), device="cpu", cache_dir=cache)
    x = digits.real_data("test").x[:50]
    assert np.array_equal(metrics.embed(fresh.classifier(), x, False)[0], metrics.embed(digits.classifier(), x, False)[0])
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "modelcollapse"]
    assert warning.startswith(f"rebuilding the cache {saved}: it does not load") and "\n" not in warning
    caplog.clear()
    Family(Config(**TINY), device="cpu", cache_dir=cache).classifier()  # retrained once, then loaded
    assert not caplog.records


def test_a_damaged_celeba_cache_is_rebuilt(tmp_path, caplog):
    folder = fake_celeba(tmp_path / "celeba")
    cfg = Config(dataset="celeba", data_dir=str(folder), image_size=16, channels=[8, 16])
    x = Family(cfg, device="cpu", cache_dir=tmp_path / "cache").real_data("train").x
    for cached in (tmp_path / "cache").glob("vae-celeba-16px-*.npy"):
        cached.write_bytes(cached.read_bytes()[:100])
    caplog.set_level("WARNING", logger="modelcollapse")
    assert np.array_equal(Family(cfg, device="cpu", cache_dir=tmp_path / "cache").real_data("train").x, x)
    assert len(caplog.records) == 1 and "rebuilding the cache" in caplog.records[0].getMessage()


def test_data_files_that_are_not_regular_files_are_refused_before_they_are_read(tmp_path):
    import os

    from blocking import within

    folder = fake_fashion(tmp_path / "fm", compress=False)
    (folder / "train-images-idx3-ubyte").unlink()
    os.mkfifo(folder / "train-images-idx3-ubyte")
    fam = Family(Config(dataset="fashion-mnist", data_dir=str(folder)), device="cpu", cache_dir=tmp_path)
    with within(20), pytest.raises(BadInput, match="IDX file is not a regular file: .*train-images-idx3-ubyte"):
        fam.real_data("train")
    celeba = fake_celeba(tmp_path / "celeba")
    (celeba / "list_eval_partition.txt").unlink()
    os.mkfifo(celeba / "list_eval_partition.txt")
    with within(20), pytest.raises(BadInput, match="CelebA file is not a regular file: .*list_eval_partition.txt"):
        Family(Config(dataset="celeba", data_dir=str(celeba), image_size=16, channels=[8, 16]), device="cpu", cache_dir=tmp_path)
