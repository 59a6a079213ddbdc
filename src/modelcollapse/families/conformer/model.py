"""Graph-conditioned diffusion over 3D atom coordinates, with an E(3)-equivariant denoiser, in one file.

References:
1) GeoDiff, the paper's model: Xu et al. 2022, https://arxiv.org/abs/2203.02923
   (code: https://github.com/MinkaiXu/GeoDiff)
2) EGNN, the message passing: Satorras et al. 2021, https://arxiv.org/abs/2102.09844
3) EDM, EGNN as a noise predictor with zero-centre-of-mass noise: Hoogeboom et al. 2022,
   https://arxiv.org/abs/2203.17003
4) DDPM: Ho et al. 2020, https://arxiv.org/abs/2006.11239

What follows GeoDiff: the graph is given and only coordinates diffuse; the denoiser sees the bonded graph
extended to 2- and 3-hop neighbours (bond angles, torsions) plus radius edges between atoms close in space;
it is built from distances and coordinate differences only, so rotating or translating the input rotates the
predicted noise with it (and translation is removed by centring); training is ε-prediction, sampling ancestral.
Where it differs: GeoDiff predicts noise on pairwise distances and maps it to coordinates by the chain rule,
with sigmoid betas over 5000 steps and one network per edge set; here an EGNN predicts coordinate noise
directly (EDM-style), in the zero-centre-of-mass subspace, with DDPM's linear schedule by default (GeoDiff's
sigmoid one, rescaled to the chain's length, on request), and sampling may skip steps (a respaced DDPM chain).
Heavy atoms only. Like GeoDiff's, the denoiser is equivariant to reflections too, so it cannot tell
enantiomers apart: chirality is not controlled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# atom feature columns and their vocabulary sizes: element (9 common ones + other), aromatic, hybridisation
# (sp, sp2, sp3, other), formal charge (-1, 0, +1, clipped), attached hydrogens (0..3+), in a ring
ATOM_VOCAB = (10, 2, 4, 3, 4, 2)
# pair types: 0 = no graph relation (a radius edge only), 1..4 = single/double/triple/aromatic bond,
# 5 = two bonds apart (an angle), 6 = three bonds apart (a torsion)
N_PAIR_TYPES = 7


@dataclass
class NetConfig:
    hidden: int = 64  # width of node and edge features
    layers: int = 4  # EGNN layers
    radius: float = 6.0  # Å: atoms this close in the noisy input talk even without a graph relation
    n_rbf: int = 16  # Gaussian basis functions that expand each distance
    diffusion_steps: int = 1000  # T, the training chain's length
    schedule: str = "linear"  # betas: "linear" (DDPM) or "sigmoid" (GeoDiff)


@dataclass
class Batch:
    """Many molecules' heavy atoms, concatenated; `mol` says which molecule each atom belongs to."""

    atoms: torch.Tensor  # (N, len(ATOM_VOCAB)) long, atom features
    pos: torch.Tensor  # (N, 3) coordinates, Å
    mol: torch.Tensor  # (N,) long, molecule index in 0..n_mols-1
    pairs: torch.Tensor  # (2, P) long, every ordered pair (i, j), i != j, of atoms of the same molecule
    pair_type: torch.Tensor  # (P,) long, see N_PAIR_TYPES
    n_mols: int

    def to(self, device) -> Batch:
        return Batch(self.atoms.to(device), self.pos.to(device), self.mol.to(device), self.pairs.to(device),
                     self.pair_type.to(device), self.n_mols)


def segment_mean(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the rows of x that share an index: (N, C) -> (n, C). Plain torch's scatter."""
    total = x.new_zeros(n, x.shape[1]).index_add_(0, index, x)
    count = x.new_zeros(n).index_add_(0, index, x.new_ones(len(index))).clamp(min=1)
    return total / count[:, None]


def center(x: torch.Tensor, mol: torch.Tensor, n_mols: int) -> torch.Tensor:
    """Remove each molecule's centre of mass (unit masses): the zero-CoM subspace the diffusion lives in."""
    return x - segment_mean(x, mol, n_mols)[mol]


def make_betas(schedule: str, T: int) -> torch.Tensor:
    """(T,) float64 betas. Both schedules keep ᾱ from collapsing to ~0 within the last few steps (as the cosine
    schedule with its 0.999 clip does), which a respaced chain would amplify: its first jump multiplies the
    error of ε̂ by sqrt(ᾱ_next / ᾱ_T)."""
    scale = 1000 / T  # both are given for a chain length; rescaled so that other T end at about the same ᾱ_T
    if schedule == "linear":
        # DDPM's: 1e-4 -> 0.02 over 1000 steps, ᾱ_T ≈ 4e-5
        return torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64)
    # "sigmoid", GeoDiff's: sigmoid(-6 .. 6) mapped onto 1e-7 -> 2e-3 over 5000 steps, ᾱ_T ≈ 7e-3
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (2e-3 - 1e-7) * 5 * scale + 1e-7 * 5 * scale


class AtomEncoder(nn.Module):
    """One embedding per feature column, summed (as OGB's AtomEncoder)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.emb = nn.ModuleList(nn.Embedding(v, hidden) for v in ATOM_VOCAB)

    def forward(self, atoms):
        return sum(emb(atoms[:, k]) for k, emb in enumerate(self.emb))  # (N, H)


class EGNNLayer(nn.Module):
    """h_i += φ_h(h_i, mean_j m_ij); x_i += mean_j (x_i − x_j)/(d_ij + 1) · φ_x(m_ij),
    m_ij = φ_e(h_i, h_j, type_ij, rbf_ij). Distances are invariant, differences rotate: the update of x is
    equivariant, that of h invariant. The (d + 1) normalisation is EDM's, for stable coordinate updates."""

    def __init__(self, config: NetConfig):
        super().__init__()
        H = config.hidden
        self.ln = nn.LayerNorm(H)
        # φ_e's first linear layer, split by input: the h_i and h_j parts run once per atom, not once per edge
        # (the same function as one Linear on the concatenation, a fraction of the flops)
        self.msg_i = nn.Linear(H, H)
        self.msg_j = nn.Linear(H, H, bias=False)
        self.msg_type = nn.Embedding(N_PAIR_TYPES, H)
        self.msg_rbf = nn.Linear(config.n_rbf, H, bias=False)
        self.msg_out = nn.Sequential(nn.SiLU(), nn.Linear(H, H), nn.SiLU())
        self.coord_out = nn.Linear(H, 1)  # φ_x: one linear layer, as m is already an MLP's output
        self.node_mlp = nn.Sequential(nn.Linear(2 * H, H), nn.SiLU(), nn.Linear(H, H))

    def forward(self, h, x, i, j, pair_type, rbf):
        # along every edge, atom i receives a message from atom j
        hn = self.ln(h)
        m = self.msg_out(self.msg_i(hn)[i] + self.msg_j(hn)[j] + self.msg_type(pair_type) + self.msg_rbf(rbf))  # (E, H)
        diff = x[i] - x[j]  # (E, 3)
        shift = diff / (diff.norm(dim=-1, keepdim=True) + 1) * self.coord_out(m).float()  # (E, 3), fp32 under autocast
        x = x + segment_mean(shift, i, len(x))
        h = h + self.node_mlp(torch.cat([hn, segment_mean(m.float(), i, len(h))], dim=-1))
        return h, x


class ConformerDiffusion(nn.Module):
    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        H = config.hidden
        self.atom_encoder = AtomEncoder(H)
        self.time_mlp = nn.Sequential(nn.Linear(H, H), nn.SiLU(), nn.Linear(H, H))
        self.layers = nn.ModuleList(EGNNLayer(config) for _ in range(config.layers))
        # n_rbf Gaussians spread over 0 .. 2·radius: bonded and 2-, 3-hop pairs may lie beyond the radius
        self.register_buffer("rbf_mu", torch.linspace(0.0, 2 * config.radius, config.n_rbf), persistent=False)
        self.rbf_gamma = (config.n_rbf / (2 * config.radius)) ** 2
        betas = make_betas(config.schedule, config.diffusion_steps)
        # derived from the config, so not saved with the weights
        self.register_buffer("abar", torch.cumprod(1 - betas, 0).float(), persistent=False)  # (T,) ᾱ_t

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """A fresh draw of every weight from `generator` (the global torch seed is never used)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=1.0, generator=generator)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for layer in self.layers:
            # near-zero coordinate updates at the start, as EDM does, so early training is stable
            nn.init.xavier_uniform_(layer.coord_out.weight, gain=0.001, generator=generator)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        # sinusoidal features of t/T, as in DDPM's transformer-style position encoding
        half = self.config.hidden // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)  # (H/2,)
        angle = (t.float() / self.config.diffusion_steps * 1000.0)[:, None] * freqs  # (B, H/2)
        return self.time_mlp(torch.cat([angle.sin(), angle.cos()], dim=-1))  # (B, H)

    def denoise(self, batch: Batch, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The predicted noise ε̂(x_t, t, graph): (N, 3), centred per molecule. t: (n_mols,) long."""
        i, j = batch.pairs
        dist = (x_t[i] - x_t[j]).norm(dim=-1)  # (P,)
        # graph relations always pass messages; other pairs only within the radius (GeoDiff's global edges)
        keep = (batch.pair_type > 0) | (dist < self.config.radius)
        i, j, pair_type, dist = i[keep], j[keep], batch.pair_type[keep], dist[keep]  # (E,) each
        # edge features from the input's distances, once (SchNet's Gaussian basis); unlike EGNN, later layers
        # do not recompute them from their updated coordinates, which costs an exp per edge and layer
        rbf = torch.exp(-self.rbf_gamma * (dist[:, None] - self.rbf_mu) ** 2)  # (E, n_rbf)
        h = self.atom_encoder(batch.atoms) + self.time_embedding(t)[batch.mol]  # (N, H)
        x = x_t
        for layer in self.layers:
            h, x = layer(h, x, i, j, pair_type, rbf)
        return center(x - x_t, batch.mol, batch.n_mols)  # (N, 3)

    def noise_like(self, batch: Batch, generator: torch.Generator | None) -> torch.Tensor:
        """Standard normal noise projected to zero centre of mass per molecule."""
        eps = torch.randn(batch.pos.shape, generator=generator, device=generator.device if generator else None)
        return center(eps.to(batch.pos.device), batch.mol, batch.n_mols)  # (N, 3)

    def forward(self, batch: Batch, t=None, noise=None, generator=None):
        """The ε-prediction loss on `batch.pos` (DDPM's L_simple, mean over atoms and axes). t (n_mols,) and
        noise (N, 3) are drawn from `generator` unless given. Returns (ε̂, loss)."""
        if t is None:
            t = torch.randint(0, self.config.diffusion_steps, (batch.n_mols,), generator=generator,
                              device=generator.device if generator else None).to(batch.pos.device)
        if noise is None:
            noise = self.noise_like(batch, generator)
        x0 = center(batch.pos, batch.mol, batch.n_mols)
        abar = self.abar[t][batch.mol, None]  # (N, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        eps_hat = self.denoise(batch, x_t, t)
        return eps_hat, F.mse_loss(eps_hat.float(), noise)

    @torch.no_grad()
    def sample(self, batch: Batch, steps: int, generator: torch.Generator | None = None, progress=None):
        """New coordinates for the graphs in `batch` (its pos is ignored) by ancestral DDPM sampling over
        `steps` evenly spaced timesteps of the training chain (all T when steps == T). Returns (N, 3)."""
        T = self.config.diffusion_steps
        # steps <= T keeps the spacing >= 1, so the rounded timesteps are distinct
        ts = torch.linspace(T - 1, 0, steps).round().long().tolist()
        x = self.noise_like(batch, generator)
        for k, t in enumerate(ts):
            abar_t = self.abar[t]
            abar_prev = self.abar[ts[k + 1]] if k + 1 < len(ts) else torch.ones_like(abar_t)
            beta = 1 - abar_t / abar_prev  # the respaced chain's beta for this jump
            t_vec = torch.full((batch.n_mols,), t, dtype=torch.long, device=x.device)
            eps_hat = self.denoise(batch, x, t_vec).float()
            x = (x - beta / (1 - abar_t).sqrt() * eps_hat) / (1 - beta).sqrt()  # the posterior mean
            if k + 1 < len(ts):
                var = beta * (1 - abar_prev) / (1 - abar_t)  # the posterior variance β̃
                x = x + var.sqrt() * self.noise_like(batch, generator)
            if progress is not None:
                progress.update(1)
        return x
