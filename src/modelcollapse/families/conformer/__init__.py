"""Molecular conformations, the paper's §2.2: a generative model of 3D conformers conditioned on the molecular
graph, refit every generation on conformers that earlier generations generated for the same molecules.

Data (data.py): a `ConformerSet` of molecular graphs with coordinates, one entry per conformer (the unit the
policies count). By default drug-like molecules from the NCI set RDKit ships (10-30 heavy atoms, at least two
rotatable bonds), embedded by ETKDGv3 into `confs_per_mol` conformers each and cached in cache_dir; GEOM-Drugs
from a local folder for the paper's scale. Train and test are split by molecule. Synthetic data keeps the real
training graphs and regenerates their coordinates by sampling the previous generation's model (`like` = the
real training set, its conformers cycled to `size`).

Models (`model`):
- "torsion" (torsion.py, the default): torsional diffusion (Jing et al. 2022). Bond lengths and angles come
  from one ETKDG conformer per molecule; only the torsions of rotatable bonds are generated, so every
  conformer is chemically sound by construction and what is learned (and what collapses) is the
  distribution over shapes.
- "cartesian" (model.py): GeoDiff (Xu et al. 2022), the paper's model: diffusion of every coordinate, denoised
  in distance space. At CPU scale it learns bond lengths poorly (see configs/cpu/conformer-cartesian.toml).
Fitting runs `train_steps` optimizer steps whatever the dataset's size (every policy gets the same compute per
generation, as GeoDiff trains for a fixed number of iterations), or, with `train_epochs`, that many passes over
the training set (a budget that grows with accumulate's data, as the language models' one epoch does).
With `real_weight` w (issue 13) each conformer's loss terms are weighted so that the real conformers carry a
share w of the loss over the training set, whatever their count.

Metrics (metrics.py), per generation:
- `test_loss`: the model's own denoising objective on every real held-out conformer, at noise levels and with
  noise drawn from one fixed seed (EVAL_SEED), the same for every generation, policy and run seed, so the
  numbers compare; each of the `eval_draws` draws covers one stratum of the noise levels. It is normalised by
  the same sum for a model that predicts zero, which therefore scores 1: for the torsion model the
  denoising score-matching loss of the torsions weighted by 1/E[score²], for the Cartesian one GeoDiff's
  weighted distance-space loss;
- `cov_r`, `mat_r`, `cov_p`, `mat_p` (and `cov_r_075`, `cov_p_075`): coverage and matching of GEN_PER_REF
  generated conformers per reference conformer of each test molecule; `bond_len_dev`, `rdkit_valid_frac`,
  `spurious_bonds`, `missing_bonds`, `chirality_kept_frac`: chemical sanity.
`baselines(config, cache_dir)` gives the same metrics for three trivial generators (fresh ETKDG conformers,
uniformly random torsions on one ETKDG conformer, that one conformer repeated), once per data set; the report
draws them beside the curves.
Artefacts: samples.sdf (every generated test conformer), samples.png (a few, next to a reference), and
train.json (the loss curve, the fit's steps and seconds, and the molecules the loader left out, by reason).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rdkit import Chem
from tqdm import tqdm

from modelcollapse.errors import BadInput
from modelcollapse.families import DataUnavailable
from modelcollapse.families.common import autocast, example_weights, load_module, save_module, warmup_cosine
from modelcollapse.seeding import derive_seed, rng
from modelcollapse.store import atomic_write_bytes, atomic_write_json

from . import data as D
from .data import ConformerSet
from .metrics import bond_lengths, bonds_recovered, conformer_metrics, render
from .model import ConformerDiffusion, NetConfig, center
from .torsion import TorsionConfig, TorsionDiffusion, rotate_torsions

PRIMARY_METRIC = "test_loss"
CLAIM = ("The paper's §2.2: a diffusion model of molecular conformations (GeoDiff in the paper) refit each "
         "iteration on conformers its predecessors generated for the same molecules. Under replace its test loss "
         "on real held-out conformers rises every iteration; under accumulate it stays nearly flat.")
METRICS = {
    "test_loss": ("the model's own denoising objective on real held-out conformers at fixed noise, divided by that "
                  "of a model predicting zero (which scores 1)", "", "lower"),
    "cov_r": ("COV-R: share of reference conformers with a generated one within 1.25 Å RMSD", "", "higher"),
    "cov_p": ("COV-P: share of generated conformers within 1.25 Å RMSD of a reference one", "", "higher"),
    "cov_r_075": ("COV-R at 0.75 Å", "", "higher"),
    "cov_p_075": ("COV-P at 0.75 Å", "", "higher"),
    "mat_r": ("MAT-R: mean over reference conformers of the RMSD to the closest generated one", "Å", "lower"),
    "mat_p": ("MAT-P: mean over generated conformers of the RMSD to the closest reference one", "Å", "lower"),
    "bond_len_dev": ("mean |generated − reference| bond length", "Å", "lower"),
    "rdkit_valid_frac": ("share of generated conformers from whose coordinates RDKit perceives exactly the graph's bonds", "", "higher"),
    "spurious_bonds": ("bonds RDKit perceives that the graph lacks, per generated conformer", "bonds", "lower"),
    "missing_bonds": ("graph bonds RDKit does not perceive, per generated conformer", "bonds", "lower"),
    "chirality_kept_frac": ("share of generated conformers whose stereocentres are those the graph specifies", "", "higher"),
}
REFERENCE = ("Paper §2.2 (GeoDiff on 40,000 GEOM-Drugs conformations, 8 iterations): replace's test loss rises "
             "every iteration, accumulate's stays nearly flat; the paper shows curves, not numbers. The presets here "
             "use ETKDG conformers of a few dozen molecules RDKit ships.")
SCORES = {
    "rdkit_valid": "1 where RDKit's bond perception reads exactly the graph's bonds from the conformer's heavy atoms "
                   "(no bond stretched apart, no clash), else 0",
    "bond_length_dev": "minus the mean |d − d_real| over the conformer's bonds, d_real the bond's mean length over the "
                       "molecule's real training conformers (Å)",
}
MIN_ITERATIONS = 5  # over the quick preset's 3 iterations accumulate's test_loss rises too; the paper runs 8
EVAL_SEED = 0  # test_loss's noise levels and noise come from this seed, never from the run's
GEN_PER_REF = 2  # generated conformers per reference conformer for COV/MAT, as GeoDiff
N_RENDERED = 4  # molecules drawn in samples.png
BASELINE_SEED = 7  # the trivial generators' draws
BASELINE_VERSION = 1  # bump when a baseline or a metric changes

log = logging.getLogger("modelcollapse.conformer")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Literal["torsion", "cartesian"] = Field("torsion", description="torsional diffusion over rotatable "
                                                   "bonds, or GeoDiff's diffusion over every coordinate")
    # data
    data: str = Field("nci", min_length=1, description='"nci" or "egfr" (molecules RDKit ships), a path to an '
                      '.sdf or SMILES file, or a GEOM-Drugs rdkit_folder')
    conformers: Literal["etkdg", "file"] = Field("etkdg", description="reference conformers: ETKDGv3 embeddings "
                                                 "of each graph, or an SDF's own 3-D records")
    min_atoms: int = Field(10, ge=2, description="fewest heavy atoms a molecule may have")
    max_atoms: int = Field(30, ge=2, description="most heavy atoms a molecule may have")
    min_rotatable_bonds: int = Field(2, ge=0, description="fewest rotatable bonds a molecule may have (the "
                                     "torsion model needs at least one)")
    max_molecules: int = Field(150, ge=2, description="molecules used, train and test together (in a fixed "
                               "order given by a hash of their SMILES)")
    test_molecules: int = Field(30, ge=1, description="held-out molecules; all their conformers are the test set")
    confs_per_mol: int = Field(4, ge=1, description="conformers per molecule: ETKDG embeddings, or the GEOM "
                               "conformers of highest Boltzmann weight")
    mmff: bool = Field(False, description="MMFF94-minimise every ETKDG conformer")
    prune_rms: float = Field(0.0, ge=0.0, description="Å: ETKDG keeps only conformers at least this far apart "
                             "(heavy-atom RMSD); 0 keeps every draw")
    hydrogens: bool = Field(False, description="hydrogens as atoms of the graphs (GeoDiff's choice); the "
                            "metrics compare heavy atoms either way")
    embed_timeout: int = Field(10, ge=1, description="seconds RDKit may spend embedding one molecule; slower "
                               "molecules are left out")
    # both models
    hidden: int = Field(64, ge=8, description="width of atom and pair features (even)")
    layers: int = Field(4, ge=1, description="message-passing layers")
    # torsion model
    sigma_min: float = Field(0.01 * math.pi, gt=0.0, description="radians, the smallest torsion noise")
    sigma_max: float = Field(math.pi, gt=0.0, description="radians, the largest torsion noise (π: nearly uniform)")
    steric_guidance: float = Field(3.0, ge=0.0, description="per Å², the strength of the sampler's fixed steric "
                                   "term, which turns torsions to keep atoms from clashing (0: none)")
    # cartesian model
    radius: float = Field(10.0, gt=0.0, description="Å: atoms this close in the noisy input are global edges")
    diffusion_steps: int = Field(5000, ge=100, description="T, the length of the training diffusion chain")
    schedule: Literal["sigmoid", "linear"] = Field("sigmoid", description="the betas: GeoDiff's sigmoid ones "
                                                   "or DDPM's linear ones, rescaled to diffusion_steps")
    global_sigma: float = Field(0.5, gt=0.0, description="Å: sampling uses the global head below this noise")
    # training
    train_steps: int = Field(1500, ge=1, description="optimizer steps per generation, whatever the data's size")
    train_epochs: float | None = Field(None, gt=0.0, description="when set, passes over the training set per "
                                       "generation instead of train_steps (a budget that grows with the data)")
    batch_size: int = Field(32, ge=1, description="conformers per optimizer step")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="peak learning rate (AdamW, warmup then cosine decay)")
    # sampling and evaluation
    sample_steps: int = Field(20, ge=1, description="steps of the sampler: of the reverse SDE (torsion), or of "
                              "a respaced DDPM chain (cartesian; equal to diffusion_steps for every step)")
    sample_batch: int = Field(256, ge=1, description="conformers denoised at once when sampling or evaluating")
    eval_draws: int = Field(4, ge=1, description="fixed noise draws per test conformer for test_loss")
    cov_threshold: float = Field(1.25, gt=0.0, description="Å, the δ of COV-R/COV-P (GeoDiff: 1.25 on "
                                 "GEOM-Drugs, 0.5 on QM9)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_atoms > self.max_atoms:
            raise ValueError(f"min_atoms ({self.min_atoms}) must not exceed max_atoms ({self.max_atoms})")
        if self.test_molecules >= self.max_molecules:
            raise ValueError(f"test_molecules ({self.test_molecules}) must be less than max_molecules "
                             f"({self.max_molecules}), or nothing is left to train on")
        if self.model == "cartesian" and self.sample_steps > self.diffusion_steps:
            raise ValueError(f"sample_steps ({self.sample_steps}) must not exceed diffusion_steps "
                             f"({self.diffusion_steps})")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be less than sigma_max ({self.sigma_max})")
        if self.hidden % 2:
            raise ValueError(f"hidden must be even (sine and cosine halves of the time embedding); got {self.hidden}")
        return self


class Family:
    keeps_inputs = True  # synthetic conformers are new coordinates for the real training graphs
    weights_real = True  # fit takes real_weight: per-conformer loss weights

    def __init__(self, config: Config, *, device: str, cache_dir: Path):
        self.config = config
        self.device = device
        self.cache_dir = Path(cache_dir)
        self._molecules: ConformerSet | None = None  # every usable molecule, loaded once
        self.left_out: dict[str, int] = {}  # molecules the loader left out, by reason
        self._real_bonds: dict[str, np.ndarray] | None = None  # each training graph's mean real bond lengths

    # -- data ---------------------------------------------------------------------------------------------
    def source(self) -> D.Source:
        c = self.config
        torsion = c.model == "torsion"
        return D.Source(c.data, c.min_atoms, c.max_atoms, c.max_molecules, c.confs_per_mol,
                        max(c.min_rotatable_bonds, int(torsion)), c.conformers, c.mmff, c.prune_rms, c.hydrogens,
                        local_structure=torsion, embed_timeout=c.embed_timeout)

    def molecules(self) -> ConformerSet:
        if self._molecules is None:
            c = self.config
            self._molecules, self.left_out = D.load_molecules(self.source(), self.cache_dir)
            if self.left_out:
                log.warning("conformer data %s: left out %s", c.data,
                            ", ".join(f"{v} {k}" for k, v in self.left_out.items()))
            if len(self._molecules.graphs) <= c.test_molecules:
                raise BadInput(f"conformer data {c.data}: only {len(self._molecules.graphs)} usable molecules, "
                               f"but test_molecules = {c.test_molecules} leaves none to train on")
        return self._molecules

    def real_data(self, split: str, seed: int, draw: int = 0) -> ConformerSet:
        """The train or test molecules with their real conformers; the split is fixed, whatever the seed."""
        if draw > 0:
            raise DataUnavailable("conformer: every real molecule is already in the train or test set")
        train, test = D.split_by_molecule(self.molecules(), self.config.test_molecules)
        return {"train": train, "test": test}[split]

    def size(self, data: ConformerSet) -> int:
        return len(data)

    def concat(self, datasets: list[ConformerSet]) -> ConformerSet:
        return D.concat(datasets)

    def subsample(self, data: ConformerSet, size: int, seed: int) -> ConformerSet:
        return data.take(rng(seed).choice(len(data), size=size, replace=False))

    # -- the model ------------------------------------------------------------------------------------------
    def net_config(self) -> TorsionConfig | NetConfig:
        c = self.config
        if c.model == "torsion":
            return TorsionConfig(hidden=c.hidden, layers=c.layers, sigma_min=c.sigma_min, sigma_max=c.sigma_max,
                                 steric_guidance=c.steric_guidance)
        return NetConfig(hidden=c.hidden, layers=c.layers, radius=c.radius, diffusion_steps=c.diffusion_steps,
                         schedule=c.schedule, global_sigma=c.global_sigma)

    def batch(self, graphs: list[D.MolGraph], pos: list[np.ndarray]):
        make = D.make_torsion_batch if self.config.model == "torsion" else D.make_batch
        return make(graphs, pos).to(self.device)

    def steps(self, n_train: int) -> int:
        """Optimizer steps for a training set of n_train conformers: train_steps, or train_epochs passes."""
        c = self.config
        if c.train_epochs is None:
            return c.train_steps
        return max(1, math.ceil(c.train_epochs * n_train / min(c.batch_size, n_train)))

    def lr(self, step: int, steps: int) -> float:
        # cosine decay to a tenth of the peak at the last step
        return warmup_cosine(step, steps, self.config.lr, max(1, steps // 20), 0.1 * self.config.lr)

    def loss_terms(self, data: ConformerSet) -> np.ndarray:
        """How many terms each conformer adds to the loss: its torsions (torsion model) or atoms (Cartesian)."""
        per_graph = [len(g.torsions) if self.config.model == "torsion" else g.n_atoms for g in data.graphs]
        return np.array(per_graph, dtype=float)[data.graph_idx]

    def fit(self, train: ConformerSet, seed: int, workdir: Path, real_weight: float | None = None) -> TorsionDiffusion | ConformerDiffusion:
        """A fresh model, trained for `steps` optimizer steps on batches of `train`. With `real_weight` w, each
        conformer's loss terms (torsions or atoms) are weighted so that the real conformers carry a share w of
        the loss over `train` and the synthetic ones 1 − w (common.example_weights: the weights average to 1
        over the terms, so the learning rate keeps its meaning)."""
        c = self.config
        weights = None if real_weight is None else torch.from_numpy(
            example_weights(train.is_real, real_weight, self.loss_terms(train))).to(self.device)
        net = self.net_config()
        model = TorsionDiffusion(net) if c.model == "torsion" else ConformerDiffusion(net)
        model.init_weights(torch.Generator().manual_seed(derive_seed(seed, "init")))  # on the CPU: same on any device
        model.to(self.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.0)
        noise = torch.Generator(device=self.device).manual_seed(derive_seed(seed, "noise"))
        order, queue = rng(derive_seed(seed, "batches")), np.zeros(0, dtype=np.int64)
        B, steps = min(c.batch_size, len(train)), self.steps(len(train))
        losses, t0 = [], time.perf_counter()
        for step in tqdm(range(steps), desc="conformer fit", disable=None):
            if len(queue) < B:  # epochs: every conformer once before any twice
                queue = np.concatenate([queue, order.permutation(len(train))])
            idx, queue = queue[:B], queue[B:]
            batch = self.batch([train.graphs[g] for g in train.graph_idx[idx]], [train.pos[i] for i in idx])
            for group in opt.param_groups:
                group["lr"] = self.lr(step, steps)
            with autocast(self.device):
                _, loss = model(batch, generator=noise, mol_weight=None if weights is None else weights[torch.from_numpy(idx)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        model.eval()
        model.loss_curve_ = losses
        every = max(1, len(losses) // 50)
        if workdir is None:
            return model
        atomic_write_json(Path(workdir) / "train.json", {
            "model": c.model, "train_conformers": len(train), "train_molecules": len(train.graphs), "steps": steps,
            "real_conformers": int(train.is_real.sum()), "real_weight": real_weight,
            "seconds": round(time.perf_counter() - t0, 3), "data_left_out": self.left_out, "loss_every": every,
            "train_loss": [float(np.mean(losses[k:k + every])) for k in range(0, len(losses), every)],
        })
        return model

    def generate(self, model, like: ConformerSet, seed: int) -> ConformerSet:
        """`like`'s graphs, one new conformer per conformer of `like`, sampled from `model` (the torsion model
        starts from each graph's local-structure conformer)."""
        c = self.config
        g = torch.Generator(device=self.device).manual_seed(seed)
        chunks = range(0, len(like), c.sample_batch)
        pos = []
        with tqdm(total=len(chunks) * c.sample_steps, desc="conformer sample", disable=None) as bar:
            for start in chunks:
                graphs = [like.graphs[k] for k in like.graph_idx[start:start + c.sample_batch]]
                start_pos = [gr.local if c.model == "torsion" else np.zeros((gr.n_atoms, 3), np.float32)
                             for gr in graphs]
                with autocast(self.device):
                    x = model.sample(self.batch(graphs, start_pos), c.sample_steps, g, bar).float().cpu().numpy()
                pos.extend(np.split(x, np.cumsum([gr.n_atoms for gr in graphs])[:-1]))
        return ConformerSet(like.graphs, like.graph_idx, pos, np.zeros(len(like), dtype=bool))

    def inputs(self, like: ConformerSet, size: int, seed: int) -> np.ndarray:
        """Which conformers of `like` `size` synthetic ones regenerate: every one, as many times over as `size`
        allows, and a random subset of them for the remainder (not the first ones, which would favour some
        molecules when a policy asks for fewer than |like|). A selection asks for its candidates' inputs here."""
        rounds, rest = divmod(size, len(like))
        extra = np.sort(rng(derive_seed(seed, "like")).choice(len(like), size=rest, replace=False))
        return np.concatenate([np.tile(np.arange(len(like)), rounds), extra])

    def sample(self, model, size: int, like: ConformerSet, seed: int, workdir: Path) -> ConformerSet:
        """New conformers for the real training graphs of `like`, at `inputs`."""
        synthetic = self.generate(model, like.take(self.inputs(like, size, seed)), seed)
        if workdir is not None:
            D.save_set(Path(workdir) / "synthetic", synthetic)
        return synthetic

    def load_sample(self, workdir: Path) -> ConformerSet:
        synthetic = D.load_set(Path(workdir) / "synthetic")[0]
        synthetic.is_real[:] = False
        return synthetic

    # -- selection ------------------------------------------------------------------------------------------
    def score(self, data: ConformerSet, name: str, model, reference, seed) -> np.ndarray:
        """A score per conformer (SCORES), on its heavy atoms as the metrics are."""
        conformers = [(data.graphs[g], data.pos[i].astype(np.float64)) for i, g in enumerate(data.graph_idx)]
        if name == "rdkit_valid":
            return np.array([float(bonds_recovered(g.heavy_mol, p[g.heavy])) for g, p in conformers])
        if self._real_bonds is None:
            real = self.real_data("train", 0)
            self._real_bonds = {g.key: bond_lengths(g.heavy_mol, np.stack([real.pos[i] for i in idx]).astype(np.float64)[:, g.heavy]).mean(0)
                                for g, idx in zip(real.graphs, real.conformers_of()) if idx}
        return np.array([-np.abs(bond_lengths(g.heavy_mol, p[None, g.heavy])[0] - self._real_bonds[g.key]).mean() for g, p in conformers])

    def take(self, data: ConformerSet, indices: np.ndarray) -> ConformerSet:
        return data.take(np.asarray(indices))

    # -- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def test_loss(self, model, test: ConformerSet) -> float:
        """The model's loss on every test conformer at fixed noise levels and noise (EVAL_SEED), divided by the
        loss of predicting zero on the same draws."""
        c = self.config
        g = torch.Generator().manual_seed(EVAL_SEED)  # drawn on the CPU: the same numbers on any device
        err, norm = 0.0, 0.0
        for k in range(c.eval_draws):
            for start in range(0, len(test), c.sample_batch):
                idx = np.arange(start, min(start + c.sample_batch, len(test)))
                batch = self.batch([test.graphs[j] for j in test.graph_idx[idx]], [test.pos[i] for i in idx])
                n = len(idx)
                # draw k takes its noise levels from the k-th of eval_draws equal slices of the range
                u = (k + torch.rand(n, generator=g)) / c.eval_draws
                with autocast(self.device):
                    if c.model == "torsion":
                        sigma = torch.exp(math.log(c.sigma_min) + u * (math.log(c.sigma_max) - math.log(c.sigma_min)))
                        delta = torch.randn(len(batch.torsions), generator=g) * sigma[batch.tor_mol.cpu()]
                        (pred, target, w), _ = model(batch, sigma.to(self.device), delta.to(self.device))
                        err += (w * (pred.float() - target) ** 2).sum().item()
                        norm += (w * target**2).sum().item()
                    else:
                        t = (u * c.diffusion_steps).long()
                        noise = center(torch.randn(batch.pos.shape, generator=g), batch.mol.cpu(), n)
                        (pl, tl, pg, tg), _ = model(batch, t.to(self.device), noise.to(self.device))
                        net = model.config
                        for pred, target, weight in ((pl, tl, net.local_weight), (pg, tg, net.global_weight)):
                            err += weight * ((pred.float() - target) ** 2).sum().item()
                            norm += weight * (target**2).sum().item()
        return err / norm

    def evaluate(self, model, test: ConformerSet, seed: int, workdir: Path) -> dict[str, float]:
        metrics = {"test_loss": self.test_loss(model, test)}
        generated = self.generate(model, test.take(np.repeat(np.arange(len(test)), GEN_PER_REF)), seed)
        metrics |= conformer_metrics(test, generated, self.config.cov_threshold)
        if workdir is not None:
            write_samples(test, generated, Path(workdir))
        return metrics

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save_model(self, model, workdir: Path) -> None:
        workdir = Path(workdir)
        kind = "torsion" if isinstance(model, TorsionDiffusion) else "cartesian"
        save_module(model, workdir / "model.safetensors")
        atomic_write_json(workdir / "model.json", {"model": kind, "config": asdict(model.config)})

    def load_model(self, workdir: Path):
        workdir = Path(workdir)
        try:
            meta = json.loads((workdir / "model.json").read_text())
            if meta["model"] == "torsion":
                model = TorsionDiffusion(TorsionConfig(**meta["config"]))
            else:
                model = ConformerDiffusion(NetConfig(**meta["config"]))
            load_module(model, workdir / "model.safetensors")
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            raise BadInput(f"cannot load the conformer model in {workdir}: {e}") from None
        return model.to(self.device).eval()


def write_samples(test: ConformerSet, generated: ConformerSet, workdir: Path) -> None:
    """samples.sdf: every generated test conformer; samples.png: a few beside a reference conformer."""
    out = io.StringIO()
    with Chem.SDWriter(out) as writer:
        for g, p in zip(generated.graph_idx, generated.pos):
            graph = generated.graphs[g]
            mol = Chem.Mol(graph.mol)
            conf = Chem.Conformer(graph.n_atoms)
            for k, xyz in enumerate(p.astype(np.float64)):
                conf.SetAtomPosition(k, xyz.tolist())
            conf.Set3D(True)
            mol.AddConformer(conf)
            mol.SetProp("_Name", graph.name)
            writer.write(mol)
    atomic_write_bytes(workdir / "samples.sdf", out.getvalue().encode())
    shown = generated.graphs[:N_RENDERED]
    ref, gen = first_conformers(test), first_conformers(generated)
    render(shown, [ref[g.key] for g in shown], [gen[g.key] for g in shown], workdir / "samples.png")


def first_conformers(data: ConformerSet) -> dict[str, np.ndarray]:
    """Graph key -> the first conformer of that graph."""
    return {g.key: data.pos[idx[0]] for g, idx in zip(data.graphs, data.conformers_of()) if idx}


# -- trivial generators -----------------------------------------------------------------------------------------
def baseline_sets(family: Family, test: ConformerSet) -> dict[str, ConformerSet]:
    """GEN_PER_REF conformers per test conformer from each trivial generator: fresh ETKDG conformers (another
    seed than the references), uniformly random torsions on one ETKDG conformer (the torsion model's starting
    point), and that one conformer repeated."""
    source = family.source()
    like = test.take(np.repeat(np.arange(len(test)), GEN_PER_REF))
    counts = np.bincount(like.graph_idx, minlength=len(like.graphs))
    fresh, local = [], []
    for graph, n in zip(like.graphs, counts):
        pos = D.embed(graph.heavy_mol, int(n), source, BASELINE_SEED)
        one = graph.local if graph.local is not None else D.embed(graph.heavy_mol, 1, source, D.LOCAL_SEED)
        if pos is None or one is None:
            raise BadInput(f"conformer baselines: RDKit cannot embed test molecule {graph.name!r} again")
        fresh.append(list(pos))
        local.append(one.reshape(graph.n_atoms, 3))
    taken = [0] * len(like.graphs)
    etkdg = []
    for g in like.graph_idx:
        etkdg.append(fresh[g][taken[g]])
        taken[g] += 1
    repeated = [local[g] for g in like.graph_idx]
    batch = D.make_torsion_batch([like.graphs[g] for g in like.graph_idx], repeated)
    turns = torch.from_numpy(rng(BASELINE_SEED).uniform(-math.pi, math.pi, len(batch.torsions)))
    turned = rotate_torsions(batch.base.pos.double(), batch, turns).float().numpy()
    random = np.split(turned, np.cumsum([like.graphs[g].n_atoms for g in like.graph_idx])[:-1])
    return {"ETKDG": ConformerSet(like.graphs, like.graph_idx, etkdg),
            "random torsions": ConformerSet(like.graphs, like.graph_idx, random),
            "one conformer": ConformerSet(like.graphs, like.graph_idx, repeated)}


def baselines(config: Config, cache_dir: Path) -> dict[str, dict[str, float]]:
    """metric -> baseline -> value: the three trivial generators of baseline_sets, scored by the metrics
    every generation reports, on the test molecules of `config`'s data. Computed once per data set and cached
    in cache_dir."""
    family = Family(config, device="cpu", cache_dir=cache_dir)
    test = family.real_data("test", 0)
    key = json.dumps([asdict(family.source()), config.test_molecules, config.cov_threshold, GEN_PER_REF,
                      BASELINE_SEED, BASELINE_VERSION, [g.key for g in test.graphs]]).encode()
    path = Path(cache_dir) / "conformer" / f"baselines-{hashlib.sha256(key).hexdigest()[:16]}.json"
    if path.exists():
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())
    scores = {name: conformer_metrics(test, gen, config.cov_threshold) for name, gen in baseline_sets(family, test).items()}
    out = {metric: {name: s[metric] for name, s in scores.items()} for metric in next(iter(scores.values()))}
    atomic_write_json(path, out)
    return out
