"""Molecular conformations, the paper's §2.2: a graph-conditioned diffusion model of 3D coordinates (GeoDiff's
setting), refit every generation on conformers that earlier generations generated for the same molecules.

Data (data.py): a `ConformerSet` of heavy-atom molecular graphs with coordinates, one entry per conformer (the
unit the policies count). By default RDKit's bundled EGFR ligands, embedded by ETKDG into `confs_per_mol`
conformers each and cached in cache_dir; GEOM-Drugs from a local folder for the paper's scale. Train and test
are split by molecule. Synthetic data keeps the real training graphs and regenerates their coordinates by
sampling the previous generation's model (`like` = the real training set, its conformers cycled to `size`).

Model (model.py): an EGNN noise predictor in the zero-centre-of-mass subspace, DDPM ε-prediction.
Fitting runs `train_steps` optimizer steps whatever the dataset's size, so every policy gets the same compute
per generation (GeoDiff likewise trains for a fixed number of iterations; the paper does not say).

Metrics (metrics.py), per generation:
- `test_loss`: the ε-prediction loss (mean squared error per atom coordinate) on every real held-out
  conformer, at noise levels and with noise drawn from one fixed seed (EVAL_SEED), the same for every
  generation, policy and run seed, so the numbers compare; each of the `eval_draws` draws covers one
  stratum of the noise levels;
- `cov_r`, `mat_r`, `cov_p`, `mat_p`: GeoDiff's coverage and matching of GEN_PER_REF generated conformers per
  reference conformer of each test molecule; `bond_len_dev`, `rdkit_valid_frac`: chemical sanity.
Artefacts: samples.sdf (every generated test conformer) and samples.png (a few, next to a reference).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rdkit import Chem
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from modelcollapse.errors import BadInput
from modelcollapse.families import DataUnavailable
from modelcollapse.seeding import derive_seed, rng
from modelcollapse.store import atomic_write_bytes, atomic_write_json

from . import data as D
from .data import ConformerSet
from .metrics import conformer_metrics, render
from .model import ConformerDiffusion, NetConfig, center

PRIMARY_METRIC = "test_loss"
EVAL_SEED = 0  # test_loss's noise levels and noise come from this seed, never from the run's
GEN_PER_REF = 2  # generated conformers per reference conformer for COV/MAT, as GeoDiff
N_RENDERED = 4  # molecules drawn in samples.png


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # data
    data: str = Field("egfr", min_length=1, description='"egfr" or "nci" (molecules RDKit ships), a path to an '
                      '.sdf or SMILES file, or a GEOM-Drugs rdkit_folder')
    min_atoms: int = Field(10, ge=2, description="fewest heavy atoms a molecule may have")
    max_atoms: int = Field(40, ge=2, description="most heavy atoms a molecule may have")
    max_molecules: int = Field(120, ge=2, description="molecules used, train and test together (in a fixed order "
                               "given by a hash of their SMILES)")
    test_molecules: int = Field(20, ge=1, description="held-out molecules; all their conformers are the test set")
    confs_per_mol: int = Field(5, ge=1, description="conformers per molecule: ETKDG embeddings, or the GEOM "
                               "conformers of highest Boltzmann weight")
    embed_timeout: int = Field(10, ge=1, description="seconds RDKit may spend embedding one molecule; slower "
                               "molecules are left out")
    # model
    hidden: int = Field(64, ge=8, description="EGNN feature width (even)")
    layers: int = Field(4, ge=1, description="EGNN layers")
    radius: float = Field(6.0, gt=0.0, description="Å: atoms this close in the noisy input exchange messages "
                          "even when the graph does not relate them")
    diffusion_steps: int = Field(1000, ge=100, description="T, the length of the training diffusion chain")
    schedule: Literal["linear", "sigmoid"] = Field("linear", description="the noise schedule's betas: DDPM's "
                                                   "linear ones or GeoDiff's sigmoid ones, rescaled to "
                                                   "diffusion_steps")
    # training
    train_steps: int = Field(1500, ge=1, description="optimizer steps per generation, whatever the data's size")
    batch_size: int = Field(32, ge=1, description="conformers per optimizer step")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="peak learning rate (AdamW, warmup then cosine decay)")
    # sampling and evaluation
    sample_steps: int = Field(100, ge=1, description="denoising steps when sampling: a respaced ancestral DDPM "
                              "chain; equal to diffusion_steps for the full chain")
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
        if self.sample_steps > self.diffusion_steps:
            raise ValueError(f"sample_steps ({self.sample_steps}) must not exceed diffusion_steps "
                             f"({self.diffusion_steps})")
        if self.hidden % 2:
            raise ValueError(f"hidden must be even (sine and cosine halves of the time embedding); got {self.hidden}")
        return self


class Family:
    def __init__(self, config: Config, *, device: str, cache_dir: Path):
        self.config = config
        self.device = device
        self.cache_dir = Path(cache_dir)
        self._molecules: ConformerSet | None = None  # every usable molecule, loaded once

    # -- data ---------------------------------------------------------------------------------------------
    def molecules(self) -> ConformerSet:
        if self._molecules is None:
            c = self.config
            self._molecules = D.load_molecules(c.data, min_atoms=c.min_atoms, max_atoms=c.max_atoms,
                                               max_molecules=c.max_molecules, confs_per_mol=c.confs_per_mol,
                                               embed_timeout=c.embed_timeout, cache_dir=self.cache_dir)
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
    def net_config(self) -> NetConfig:
        c = self.config
        return NetConfig(hidden=c.hidden, layers=c.layers, radius=c.radius, diffusion_steps=c.diffusion_steps,
                         schedule=c.schedule)

    def autocast(self):
        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # the CPU stays in float32

    def lr(self, step: int) -> float:
        c = self.config
        warmup = max(1, c.train_steps // 20)
        # 1) linear warmup
        if step < warmup:
            return c.lr * (step + 1) / warmup
        # 2) cosine decay to a tenth of the peak at the last step
        progress = (step - warmup) / max(1, c.train_steps - warmup)
        return c.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    def fit(self, train: ConformerSet, seed: int, workdir: Path) -> ConformerDiffusion:
        c = self.config
        model = ConformerDiffusion(self.net_config())
        model.init_weights(torch.Generator().manual_seed(derive_seed(seed, "init")))  # on the CPU: same on any device
        model.to(self.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.0)
        noise = torch.Generator(device=self.device).manual_seed(derive_seed(seed, "noise"))
        order, queue = rng(derive_seed(seed, "batches")), np.zeros(0, dtype=np.int64)
        B = min(c.batch_size, len(train))
        losses = []
        for step in tqdm(range(c.train_steps), desc="conformer fit", disable=None):
            if len(queue) < B:  # epochs: every conformer once before any twice
                queue = np.concatenate([queue, order.permutation(len(train))])
            idx, queue = queue[:B], queue[B:]
            batch = D.make_batch([train.graphs[g] for g in train.graph_idx[idx]], [train.pos[i] for i in idx])
            for group in opt.param_groups:
                group["lr"] = self.lr(step)
            with self.autocast():
                _, loss = model(batch.to(self.device), generator=noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        model.eval()
        model.loss_curve_ = losses
        every = max(1, len(losses) // 50)
        atomic_write_json(Path(workdir) / "fit.json", {
            "train_conformers": len(train), "train_molecules": len(train.graphs), "steps": c.train_steps,
            "loss_every": every,
            "train_loss": [float(np.mean(losses[k:k + every])) for k in range(0, len(losses), every)],
        })
        return model

    def generate(self, model: ConformerDiffusion, like: ConformerSet, seed: int) -> ConformerSet:
        """`like`'s graphs, one new conformer per conformer of `like`, sampled from `model`."""
        c = self.config
        g = torch.Generator(device=self.device).manual_seed(seed)
        chunks = range(0, len(like), c.sample_batch)
        pos = []
        with tqdm(total=len(chunks) * c.sample_steps, desc="conformer sample", disable=None) as bar:
            for start in chunks:
                graphs = [like.graphs[k] for k in like.graph_idx[start:start + c.sample_batch]]
                batch = D.make_batch(graphs, [np.zeros((gr.n_atoms, 3), np.float32) for gr in graphs])
                with self.autocast():
                    x = model.sample(batch.to(self.device), c.sample_steps, g, bar).float().cpu().numpy()
                pos.extend(np.split(x, np.cumsum([gr.n_atoms for gr in graphs])[:-1]))
        return ConformerSet(like.graphs, like.graph_idx, pos)

    def sample(self, model: ConformerDiffusion, size: int, like: ConformerSet, seed: int,
               workdir: Path) -> ConformerSet:
        """New conformers for the real training graphs: one for every conformer of `like`, as many times over as
        `size` allows, and one for each of a random subset of them for the remainder (not the first ones, which
        would favour some molecules when a policy asks for fewer than |like|)."""
        rounds, rest = divmod(size, len(like))
        extra = np.sort(rng(derive_seed(seed, "like")).choice(len(like), size=rest, replace=False))
        idx = np.concatenate([np.tile(np.arange(len(like)), rounds), extra])
        synthetic = self.generate(model, like.take(idx), seed)
        D.save_set(Path(workdir) / "synthetic", synthetic)
        return synthetic

    def load_sample(self, workdir: Path) -> ConformerSet:
        return D.load_set(Path(workdir) / "synthetic")

    # -- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def test_loss(self, model: ConformerDiffusion, test: ConformerSet) -> float:
        """The ε-prediction loss on every test conformer at fixed noise levels and noise (EVAL_SEED)."""
        c = self.config
        g = torch.Generator().manual_seed(EVAL_SEED)  # drawn on the CPU: the same numbers on any device
        total, count = 0.0, 0
        for k in range(c.eval_draws):
            for start in range(0, len(test), c.sample_batch):
                idx = np.arange(start, min(start + c.sample_batch, len(test)))
                batch = D.make_batch([test.graphs[j] for j in test.graph_idx[idx]], [test.pos[i] for i in idx])
                # draw k takes its noise levels from the k-th of eval_draws equal slices of 0..T-1
                t = ((k + torch.rand(batch.n_mols, generator=g)) / c.eval_draws * c.diffusion_steps).long()
                noise = center(torch.randn(batch.pos.shape, generator=g), batch.mol, batch.n_mols)
                with self.autocast():
                    eps_hat, _ = model(batch.to(self.device), t.to(self.device), noise.to(self.device))
                total += ((eps_hat.float().cpu() - noise) ** 2).sum().item()
                count += noise.numel()
        return total / count

    def evaluate(self, model: ConformerDiffusion, test: ConformerSet, seed: int, workdir: Path) -> dict[str, float]:
        metrics = {"test_loss": self.test_loss(model, test)}
        generated = self.generate(model, test.take(np.repeat(np.arange(len(test)), GEN_PER_REF)), seed)
        metrics |= conformer_metrics(test, generated, self.config.cov_threshold)
        self.write_samples(test, generated, Path(workdir))
        return metrics

    def write_samples(self, test: ConformerSet, generated: ConformerSet, workdir: Path) -> None:
        """samples.sdf: every generated test conformer; samples.png: a few beside a reference conformer."""
        out = io.StringIO()
        with Chem.SDWriter(out) as writer:
            for g, p in zip(generated.graph_idx, generated.pos):
                graph = generated.graphs[g]
                mol = Chem.Mol(graph.mol)
                conf = Chem.Conformer(graph.n_atoms)
                for k, xyz in enumerate(p.astype(np.float64)):
                    conf.SetAtomPosition(k, xyz.tolist())
                mol.AddConformer(conf)
                mol.SetProp("_Name", graph.name)
                writer.write(mol)
        atomic_write_bytes(workdir / "samples.sdf", out.getvalue().encode())
        shown = generated.graphs[:N_RENDERED]
        ref, gen = first_conformers(test), first_conformers(generated)
        render(shown, [ref[g.key] for g in shown], [gen[g.key] for g in shown], workdir / "samples.png")

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save_model(self, model: ConformerDiffusion, workdir: Path) -> None:
        workdir = Path(workdir)
        atomic_write_bytes(workdir / "model.safetensors", save_safetensors(model.state_dict()))
        atomic_write_json(workdir / "model.json", asdict(model.config))

    def load_model(self, workdir: Path) -> ConformerDiffusion:
        workdir = Path(workdir)
        try:
            model = ConformerDiffusion(NetConfig(**json.loads((workdir / "model.json").read_text())))
            model.load_state_dict(load_safetensors((workdir / "model.safetensors").read_bytes()))
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            raise BadInput(f"cannot load the conformer model in {workdir}: {e}") from None
        return model.to(self.device).eval()


def first_conformers(data: ConformerSet) -> dict[str, np.ndarray]:
    """Graph key -> the first conformer of that graph."""
    return {g.key: data.pos[idx[0]] for g, idx in zip(data.graphs, data.conformers_of()) if idx}
