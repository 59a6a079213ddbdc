"""Generated conformers against reference ones, as GeoDiff reports them, and their chemical sanity.

- RMSD: heavy atoms, after the optimal rotation and translation (Kabsch), minimised over the graph's
  symmetries (the atom permutations that map the graph onto itself, RDKit self-matches, at most
  MAX_SYMMETRIES): what rdMolAlign.GetBestRMS computes, vectorised over every pair at once. The symmetries
  ignore bond orders; RDKit's only make conjugated terminal groups equivalent (the same for nearly all drugs).
- COV-R: the fraction of reference conformers with a generated one within `threshold` (GeoDiff's δ = 1.25 Å
  on GEOM-Drugs); `cov_r_075` the same at 0.75 Å, the threshold torsional diffusion headlines; MAT-R: the mean
  over reference conformers of the RMSD to the closest generated one. COV-P, MAT-P and `cov_p_075` swap the
  roles (precision). Each is computed per molecule, then averaged over molecules (GeoDiff reports the mean and
  the median over molecules; the mean here).
- bond_len_dev: the mean |d_gen − d_ref| over the bonds of every generated conformer, d_ref being the bond's
  mean length over the molecule's reference conformers (Å).
- rdkit_valid_frac: the fraction of generated conformers from whose coordinates RDKit's connect-the-dots bond
  perception (rdDetermineBonds.DetermineConnectivity, OpenBabel's rule: atoms i and j are bonded iff
  0.4 Å <= d_ij <= r_i + r_j + 0.45 Å, r the covalent radii) recovers exactly the graph's bonds; that is, no
  bond is stretched apart, and no two atoms are so close that RDKit sees a bond that is not there (a clash).
  `spurious_bonds` and `missing_bonds`: the mean number per conformer of perceived bonds the graph lacks, and of
  graph bonds not perceived.
- chirality_kept_frac: the fraction of generated conformers whose tetrahedral stereocentres, assigned from
  the coordinates (RDKit's AssignStereochemistryFrom3D, CIP labels), are those the graph specifies (a
  conformer of a molecule without specified stereocentres counts as kept). A model equivariant to
  reflections cannot tell enantiomers apart and inverts about half of them.
All are computed on heavy atoms, whether or not the graphs carry hydrogens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rdkit import Chem
from rdkit.Chem import rdDetermineBonds

from .data import ConformerSet, MolGraph

COV_STRICT = 0.75  # Å, torsional diffusion's headline threshold on GEOM-Drugs
MAX_SYMMETRIES = 1000  # GetBestRMS enumerates up to 1e6; heavy-atom drug graphs rarely have over a few dozen


def symmetries(mol: Chem.Mol) -> np.ndarray:
    """(K, N): row k maps atom i to atom perm[k, i] with the same elements and connections around it (identity
    included). Bond orders are ignored, so the two oxygens of a carboxylic acid or a nitro group count as
    equivalent, as they do in RDKit's GetBestRMS (symmetrizeConjugatedTerminalGroups, its default)."""
    bare = Chem.RWMol(mol)
    for b in bare.GetBonds():
        b.SetBondType(Chem.BondType.SINGLE)
        b.SetIsAromatic(False)
    for a in bare.GetAtoms():
        a.SetIsAromatic(False)
    bare.UpdatePropertyCache(strict=False)
    matches = bare.GetSubstructMatches(bare, uniquify=False, useChirality=False, maxMatches=MAX_SYMMETRIES)
    return np.array(matches or [tuple(range(mol.GetNumAtoms()))], dtype=np.int64)


def rmsd_matrix(ref: np.ndarray, gen: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """Best RMSD between every reference (R, N, 3) and generated (G, N, 3) conformer: (R, G), Å."""
    A = ref - ref.mean(1, keepdims=True)  # (R, N, 3)
    B = gen[:, perms] - gen[:, None].mean(2, keepdims=True)  # (G, K, N, 3), each symmetry of each conformer
    H = np.einsum("rni,gknj->rgkij", A, B)  # (R, G, K, 3, 3) covariance
    s = np.linalg.svd(H, compute_uv=False)  # (R, G, K, 3), descending
    # Kabsch: the best proper rotation gains σ1 + σ2 ± σ3, minus when the best fit would be a reflection
    s[..., 2] *= np.sign(np.linalg.det(H))
    sq = (A**2).sum((1, 2))[:, None, None] + (B**2).sum((2, 3))[None] - 2 * s.sum(-1)  # (R, G, K)
    return np.sqrt(np.clip(sq.min(-1), 0.0, None) / ref.shape[1])


def coverage(rmsd: np.ndarray, threshold: float) -> dict[str, float]:
    """COV (at `threshold` and at COV_STRICT) and MAT of one molecule from its (R, G) RMSD matrix."""
    best_ref, best_gen = rmsd.min(1), rmsd.min(0)  # (R,), (G,)
    return {"cov_r": float((best_ref < threshold).mean()), "mat_r": float(best_ref.mean()),
            "cov_p": float((best_gen < threshold).mean()), "mat_p": float(best_gen.mean()),
            "cov_r_075": float((best_ref < COV_STRICT).mean()), "cov_p_075": float((best_gen < COV_STRICT).mean())}


def bond_lengths(mol: Chem.Mol, pos: np.ndarray) -> np.ndarray:
    """(C, B) length of every bond in every conformer, pos (C, N, 3)."""
    ij = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()], dtype=np.int64).reshape(-1, 2)
    return np.linalg.norm(pos[:, ij[:, 0]] - pos[:, ij[:, 1]], axis=-1)


def perceived_bonds(mol: Chem.Mol, pos: np.ndarray) -> set[tuple[int, int]]:
    """The bonds RDKit's connect-the-dots perception reads from the coordinates pos (N, 3) of mol's atoms."""
    bare = Chem.RWMol()
    for a in mol.GetAtoms():
        bare.AddAtom(Chem.Atom(a.GetAtomicNum()))
    conf = Chem.Conformer(mol.GetNumAtoms())
    for k, p in enumerate(pos.astype(np.float64)):
        conf.SetAtomPosition(k, p.tolist())
    conf.Set3D(True)
    bare.AddConformer(conf)
    rdDetermineBonds.DetermineConnectivity(bare)
    return _edges(bare)


def bonds_recovered(mol: Chem.Mol, pos: np.ndarray) -> bool:
    """Does RDKit read exactly `mol`'s bonds from the coordinates pos (N, 3) alone?"""
    return perceived_bonds(mol, pos) == _edges(mol)


def _edges(mol: Chem.Mol) -> set[tuple[int, int]]:
    return {tuple(sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))) for b in mol.GetBonds()}


def stereocentres(mol: Chem.Mol) -> list[tuple[int, str]]:
    """The graph's specified tetrahedral stereocentres as (atom, CIP label)."""
    return Chem.FindMolChiralCenters(mol, useLegacyImplementation=False)


def chirality_kept(mol: Chem.Mol, pos: np.ndarray) -> bool:
    """Do the stereocentres that the coordinates pos (N, 3) define carry the labels `mol` specifies?"""
    want = stereocentres(mol)
    if not want:
        return True
    probe = Chem.Mol(mol)
    conf = Chem.Conformer(mol.GetNumAtoms())
    for k, p in enumerate(pos.astype(np.float64)):
        conf.SetAtomPosition(k, p.tolist())
    conf.Set3D(True)
    probe.AddConformer(conf, assignId=True)
    Chem.AssignStereochemistryFrom3D(probe)
    return stereocentres(probe) == want


def conformer_metrics(ref: ConformerSet, gen: ConformerSet, threshold: float) -> dict[str, float]:
    """COV/MAT (R and P, at `threshold` and at 0.75 Å), bond_len_dev, rdkit_valid_frac, spurious_bonds,
    missing_bonds and chirality_kept_frac of `gen` against `ref`, molecule by molecule (graphs matched by key;
    every graph of `gen` must be in `ref`)."""
    refs = {g.key: [ref.pos[i] for i in idx] for g, idx in zip(ref.graphs, ref.conformers_of())}
    per_mol, dev, valid, spurious, missing, kept = [], [], [], [], [], []
    for graph, idx in zip(gen.graphs, gen.conformers_of()):
        if not idx:
            continue
        mol, heavy = graph.heavy_mol, graph.heavy
        R = np.stack(refs[graph.key]).astype(np.float64)[:, heavy]
        G = np.stack([gen.pos[i] for i in idx]).astype(np.float64)[:, heavy]
        per_mol.append(coverage(rmsd_matrix(R, G, symmetries(mol)), threshold))
        dev.append(np.abs(bond_lengths(mol, G) - bond_lengths(mol, R).mean(0)).ravel())
        bonds = _edges(mol)
        for p in G:
            seen = perceived_bonds(mol, p)
            valid.append(seen == bonds)
            spurious.append(len(seen - bonds))
            missing.append(len(bonds - seen))
            kept.append(chirality_kept(mol, p))
    out = {k: float(np.mean([m[k] for m in per_mol])) for k in per_mol[0]}
    out["bond_len_dev"] = float(np.concatenate(dev).mean())
    out["rdkit_valid_frac"] = float(np.mean(valid))
    out["spurious_bonds"] = float(np.mean(spurious))
    out["missing_bonds"] = float(np.mean(missing))
    out["chirality_kept_frac"] = float(np.mean(kept))
    return out


# CPK-like colours; anything else grey
COLOURS = {"C": "#404040", "N": "#3050f8", "O": "#ff0d0d", "F": "#90e050", "P": "#ff8000", "S": "#e0c000",
           "Cl": "#1ff01f", "Br": "#a62929", "I": "#940094"}


def render(graphs: list[MolGraph], ref_pos: list[np.ndarray], gen_pos: list[np.ndarray], path: Path) -> None:
    """One column per molecule: a reference conformer above a generated one, as 3D ball-and-stick plots."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to pick

    fig = Figure(figsize=(3.2 * len(graphs), 6.4))
    for col, (graph, rows) in enumerate(zip(graphs, zip(ref_pos, gen_pos))):
        for row, (pos, label) in enumerate(zip(rows, ("reference", "generated"))):
            ax = fig.add_subplot(2, len(graphs), row * len(graphs) + col + 1, projection="3d")
            for b in graph.mol.GetBonds():
                seg = pos[[b.GetBeginAtomIdx(), b.GetEndAtomIdx()]]
                ax.plot(seg[:, 0], seg[:, 1], seg[:, 2], color="#999999", lw=1.5)
            colours = [COLOURS.get(a.GetSymbol(), "#b0b0b0") for a in graph.mol.GetAtoms()]
            ax.scatter(pos[:, 0], pos[:, 1], pos[:, 2], c=colours, s=25, depthshade=False)
            ax.set_title(f"{graph.name[:24]}\n{label}", fontsize=8)
            ax.set_axis_off()
            centre, half = pos.mean(0), np.abs(pos - pos.mean(0)).max()
            ax.set_xlim(centre[0] - half, centre[0] + half)
            ax.set_ylim(centre[1] - half, centre[1] + half)
            ax.set_zlim(centre[2] - half, centre[2] + half)
            ax.set_box_aspect((1, 1, 1), zoom=1.4)  # equal axes, so angles look right; less empty margin
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)
