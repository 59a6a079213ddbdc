"""GeoDiff: graph-conditioned diffusion over 3D atom coordinates, denoised in distance space, in one file.

References:
1) GeoDiff, the paper's model: Xu et al. 2022, https://arxiv.org/abs/2203.02923
   (code: https://github.com/MinkaiXu/GeoDiff, configs/drugs_default.yml, models/epsnet/dualenc.py)
2) DDPM: Ho et al. 2020, https://arxiv.org/abs/2006.11239
3) SchNet's Gaussian distance expansion: Schütt et al. 2017, https://arxiv.org/abs/1706.08566

What follows GeoDiff: the graph is given and only coordinates diffuse, with GeoDiff's sigmoid β schedule
(1e-7 → 2e-3 over T = 5000 steps). The noise is matched in distance space: for the noised conformer
x̃ = x0 + σ_t ε (σ_t² = (1 − ᾱ_t)/ᾱ_t, GeoDiff's scaling), every edge predicts the denoising direction of its
length, (d0 − d̃)/σ_t, and the predictions are mapped to coordinates by the chain rule,
Σ_j (x̃_i − x̃_j)/d̃_ij · s_ij, which rotates with the input (equivariant) and sums to zero over a molecule.
Two heads: a local one on the bonded graph extended to 3 hops (bonds, angles, torsions) and a global one on
the other atom pairs within `radius` Å of each other in the noised input; the loss weighs the local head 5 and
the global one 2, as GeoDiff's code does. Sampling is ancestral DDPM, every step of the chain when
sample_steps = diffusion_steps (or a respaced chain of fewer), with the global head used only once σ_t < 0.5 Å.
Where it differs: one invariant message-passing trunk (over all the edges) feeds both heads, where GeoDiff
runs a SchNet and a GIN encoder; the trunk is told the time step; hydrogens are optional (data.py).
Like GeoDiff's, the model sees distances only, so it is equivariant to reflections too and cannot tell
enantiomers apart: chirality is not controlled (the metrics measure it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

# atom feature columns and their vocabulary sizes: element (H + 9 common ones + other), aromatic, hybridisation
# (sp, sp2, sp3, other), formal charge (-1, 0, +1, clipped), attached hydrogens (0..3+), in a ring
ATOM_VOCAB = (11, 2, 4, 3, 4, 2)
# pair types: 0 = no graph relation (a radius edge only), 1..4 = single/double/triple/aromatic bond,
# 5 = two bonds apart (an angle), 6 = three bonds apart (a torsion)
N_PAIR_TYPES = 7


@torch.no_grad()
def init_modules(model: nn.Module, generator: torch.Generator) -> None:
    """Every Linear, Embedding and LayerNorm of `model` drawn afresh from `generator` (never the global seed)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=1.0, generator=generator)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@dataclass
class NetConfig:
    hidden: int = 64  # width of atom and edge features
    layers: int = 4  # message-passing layers
    radius: float = 10.0  # Å: GeoDiff's cutoff for global edges on GEOM-Drugs
    n_rbf: int = 32  # Gaussian basis functions that expand each distance
    diffusion_steps: int = 5000  # T, the training chain's length (GeoDiff's)
    schedule: str = "sigmoid"  # betas: "sigmoid" (GeoDiff) or "linear" (DDPM)
    local_weight: float = 5.0  # GeoDiff's loss weights: local (≤ 3 hops) and global (radius) heads
    global_weight: float = 2.0
    global_sigma: float = 0.5  # Å: sampling uses the global head only below this noise level


@dataclass
class Batch:
    """Many molecules' atoms, concatenated; `mol` says which molecule each atom belongs to."""

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
    """Remove each molecule's centre of mass (unit masses)."""
    return x - segment_mean(x, mol, n_mols)[mol]


def make_betas(schedule: str, T: int) -> torch.Tensor:
    """(T,) float64 betas: GeoDiff's sigmoid ones (sigmoid(−6 .. 6) mapped onto 1e-7 .. 2e-3; ᾱ_T ≈ 7e-3 at
    T = 5000) or DDPM's linear ones (1e-4 .. 0.02 over 1000 steps, ᾱ_T ≈ 4e-5). Both are rescaled by 5000/T
    and 1000/T so that a shorter chain ends at about the same ᾱ_T."""
    if schedule == "linear":
        scale = 1000 / T
        return torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64)
    scale = 5000 / T
    return (torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (2e-3 - 1e-7) + 1e-7) * scale


class AtomEncoder(nn.Module):
    """One embedding per feature column, summed (as OGB's AtomEncoder)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.emb = nn.ModuleList(nn.Embedding(v, hidden) for v in ATOM_VOCAB)

    def forward(self, atoms):
        return sum(emb(atoms[:, k]) for k, emb in enumerate(self.emb))  # (N, H)


class MessageLayer(nn.Module):
    """h_i += φ_h(h_i, mean_j m_ij), m_ij = φ_e(h_i, h_j, e_ij): invariant message passing over edges."""

    def __init__(self, hidden: int):
        super().__init__()
        H = hidden
        self.ln = nn.LayerNorm(H)
        # φ_e's first linear layer, split by input: the h_i and h_j parts run once per atom, not once per edge
        # (the same function as one Linear on the concatenation, a fraction of the flops)
        self.msg_i = nn.Linear(H, H)
        self.msg_j = nn.Linear(H, H, bias=False)
        self.msg_out = nn.Sequential(nn.SiLU(), nn.Linear(H, H), nn.SiLU())
        self.node_mlp = nn.Sequential(nn.Linear(2 * H, H), nn.SiLU(), nn.Linear(H, H))

    def forward(self, h, i, j, e):
        hn = self.ln(h)
        m = self.msg_out(self.msg_i(hn)[i] + self.msg_j(hn)[j] + e)  # (E, H)
        return h + self.node_mlp(torch.cat([hn, segment_mean(m, i, len(h))], dim=-1))


class PairHead(nn.Module):
    """One scalar per edge from its atoms' features (symmetric in i and j) and its own."""

    def __init__(self, hidden: int):
        super().__init__()
        self.atom = nn.Linear(hidden, hidden)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden // 2), nn.SiLU(), nn.Linear(hidden // 2, 1))

    def forward(self, h, i, j, e):
        a = self.atom(h)
        return self.out(a[i] + a[j] + e).squeeze(-1)  # (E,)


def eq_transform(s: torch.Tensor, x: torch.Tensor, i: torch.Tensor, j: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Edge scalars s (E,) -> atom vectors (N, 3): Σ_j ∂d_ij/∂x_i · s_ij, the chain rule from distances to
    coordinates (GeoDiff's eq_transform; every unordered pair appears in both orders)."""
    return x.new_zeros(x.shape).index_add_(0, i, (x[i] - x[j]) / d[:, None] * s[:, None])


class ConformerDiffusion(nn.Module):
    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        H = config.hidden
        self.atom_encoder = AtomEncoder(H)
        self.time_mlp = nn.Sequential(nn.Linear(H, H), nn.SiLU(), nn.Linear(H, H))
        self.pair_type = nn.Embedding(N_PAIR_TYPES, H)
        self.pair_rbf = nn.Linear(config.n_rbf, H, bias=False)
        self.layers = nn.ModuleList(MessageLayer(H) for _ in range(config.layers))
        self.local_head = PairHead(H)
        self.global_head = PairHead(H)
        # n_rbf Gaussians spread over 0 .. 2·radius: bonded and 2-, 3-hop pairs may lie beyond the radius
        self.register_buffer("rbf_mu", torch.linspace(0.0, 2 * config.radius, config.n_rbf), persistent=False)
        self.rbf_gamma = (config.n_rbf / (2 * config.radius)) ** 2
        abar = torch.cumprod(1 - make_betas(config.schedule, config.diffusion_steps), 0)
        # derived from the config, so not saved with the weights
        self.register_buffer("abar", abar.float(), persistent=False)  # (T,) ᾱ_t
        self.register_buffer("sigma", ((1 - abar) / abar).sqrt().float(), persistent=False)  # (T,) σ_t, Å

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """A fresh draw of every weight from `generator` (the global torch seed is never used)."""
        init_modules(self, generator)
        for head in (self.local_head, self.global_head):
            nn.init.zeros_(head.out[-1].weight)  # every prediction 0 at the start: the loss starts where zero's is

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        # sinusoidal features of t/T, as in DDPM's transformer-style position encoding
        half = self.config.hidden // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)  # (H/2,)
        angle = (t.float() / self.config.diffusion_steps * 1000.0)[:, None] * freqs  # (B, H/2)
        return self.time_mlp(torch.cat([angle.sin(), angle.cos()], dim=-1))  # (B, H)

    def edge_scores(self, batch: Batch, x: torch.Tensor, t: torch.Tensor):
        """The edges of the noised conformer x (N, 3) (GeoDiff's scaling x0 + σ_t ε) at steps t (n_mols,):
        (i, j, d, is_local, s), s each edge's predicted denoising direction of its length."""
        i, j = batch.pairs
        dist = (x[i] - x[j]).norm(dim=-1)  # (P,)
        # graph relations (≤ 3 hops) are local edges; other pairs are global edges within the radius
        is_local = batch.pair_type > 0
        keep = is_local | (dist < self.config.radius)
        i, j, pair_type, dist, is_local = i[keep], j[keep], batch.pair_type[keep], dist[keep], is_local[keep]
        rbf = torch.exp(-self.rbf_gamma * (dist[:, None] - self.rbf_mu) ** 2)  # (E, n_rbf)
        e = self.pair_type(pair_type) + self.pair_rbf(rbf)  # (E, H)
        h = self.atom_encoder(batch.atoms) + self.time_embedding(t)[batch.mol]  # (N, H)
        for layer in self.layers:
            h = layer(h, i, j, e)
        s = torch.where(is_local, self.local_head(h, i, j, e), self.global_head(h, i, j, e))
        return i, j, dist.clamp(min=1e-2), is_local, s

    def forward(self, batch: Batch, t=None, noise=None, generator=None, mol_weight=None):
        """GeoDiff's loss on `batch.pos`: the distance-space denoising directions, mapped to atoms, local
        head weighted 5 and global head 2, summed over axes, mean over atoms (each atom's term weighted by its
        molecule's `mol_weight` (n_mols,) when given: `real_weight`). t (n_mols,) and noise (N, 3) are drawn
        from `generator` unless given. Returns ((pred_local, target_local, pred_global, target_global), each
        (N, 3)), loss)."""
        if t is None:
            t = torch.randint(0, self.config.diffusion_steps, (batch.n_mols,), generator=generator,
                              device=generator.device if generator else None).to(batch.pos.device)
        if noise is None:
            noise = self.noise_like(batch, generator)
        x0 = center(batch.pos, batch.mol, batch.n_mols)
        sigma = self.sigma[t][batch.mol, None]  # (N, 1)
        x = x0 + sigma * noise
        i, j, d, is_local, s = self.edge_scores(batch, x, t)
        target = ((x0[i] - x0[j]).norm(dim=-1) - d) / sigma[i, 0]  # (E,) GeoDiff's d_target
        out = []
        for mask in (is_local, ~is_local):
            out += [eq_transform(s[mask], x, i[mask], j[mask], d[mask]),
                    eq_transform(target[mask], x, i[mask], j[mask], d[mask])]
        c = self.config
        per_atom = (c.local_weight * ((out[0] - out[1]) ** 2).sum(-1) + c.global_weight * ((out[2] - out[3]) ** 2).sum(-1))
        if mol_weight is not None:
            per_atom = per_atom * mol_weight[batch.mol]
        return tuple(out), per_atom.mean()

    def noise_like(self, batch: Batch, generator: torch.Generator | None) -> torch.Tensor:
        """Standard normal noise projected to zero centre of mass per molecule."""
        eps = torch.randn(batch.pos.shape, generator=generator, device=generator.device if generator else None)
        return center(eps.to(batch.pos.device), batch.mol, batch.n_mols)  # (N, 3)

    def eps(self, batch: Batch, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The predicted noise ε̂ at the DDPM state x_t = sqrt(ᾱ_t)(x0 + σ_t ε), step t: −(local + global)
        denoising directions (the global ones only once σ_t < global_sigma). (N, 3)."""
        t_vec = torch.full((batch.n_mols,), t, dtype=torch.long, device=x_t.device)
        x = x_t / self.abar[t].sqrt()
        i, j, d, is_local, s = self.edge_scores(batch, x, t_vec)
        use = is_local | (self.sigma[t] < self.config.global_sigma)
        return -eq_transform(s[use], x, i[use], j[use], d[use])

    @torch.no_grad()
    def sample(self, batch: Batch, steps: int, generator: torch.Generator | None = None, progress=None):
        """New coordinates for the graphs in `batch` (its pos is ignored) by ancestral DDPM sampling over
        `steps` evenly spaced timesteps of the training chain (every step when steps == T). Returns (N, 3)."""
        T = self.config.diffusion_steps
        # steps <= T keeps the spacing >= 1, so the rounded timesteps are distinct
        ts = torch.linspace(T - 1, 0, steps).round().long().tolist()
        x = self.noise_like(batch, generator)
        for k, t in enumerate(ts):
            abar_t = self.abar[t]
            abar_prev = self.abar[ts[k + 1]] if k + 1 < len(ts) else torch.ones_like(abar_t)
            beta = 1 - abar_t / abar_prev  # the respaced chain's beta for this jump
            eps_hat = self.eps(batch, x, t).float()
            x = (x - beta / (1 - abar_t).sqrt() * eps_hat) / (1 - beta).sqrt()  # the posterior mean
            if k + 1 < len(ts):
                var = beta * (1 - abar_prev) / (1 - abar_t)  # the posterior variance β̃
                x = x + var.sqrt() * self.noise_like(batch, generator)
            if progress is not None:
                progress.update(1)
        return x  # the last jump goes to ᾱ = 1: x0 itself
