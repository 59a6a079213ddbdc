"""Molecules and their conformers: loaders, ETKDG embedding, the disk cache, and the models' batches.

Sources (the config's `data`):
- "nci" (default): the first 5,000 NCI compounds RDKit ships (Data/NCI/first_5K.smi): about 3,100 of them have
  10-30 heavy atoms and at least two rotatable bonds;
- "egfr": the 365 EGFR ligands RDKit ships (Contrib/PBF/testData/egfr.sdf), 17-32 heavy atoms, many of them
  close analogues of each other (little variety of shape);
- a path to an .sdf or a SMILES file (.smi/.smiles/.txt: SMILES first on each line, a name may follow);
- a path to GEOM's `rdkit_folder` (Axelrod & Gómez-Bombarelli 2022) or its `drugs/` subfolder: a
  `summary_drugs.json` beside `drugs/*.pickle`, one pickle per molecule holding its CREST conformers.
With `conformers = "etkdg"` the graph comes from the file and the reference conformers from RDKit's ETKDGv3
(optionally MMFF94-minimised and RMSD-pruned); with `conformers = "file"` an SDF's own 3-D records are the
conformers (records of one molecule grouped by SMILES). GEOM's are always its own CREST conformers.

How RDKit conformers differ from GEOM's: ETKDG draws geometries from distance bounds and torsion preferences
mined from crystal structures, one independent draw per conformer, with no energy ranking; GEOM-Drugs runs
CREST (GFN2-xTB metadynamics) and keeps the low-energy conformers it finds, each with its Boltzmann weight
(the loader takes those of highest weight). ETKDG's sets are broader and include strained shapes; CREST's are
energy-ranked, more numerous for flexible molecules, and cluster around the minima.

Choices: heavy atoms only unless `hydrogens` (GeoDiff keeps hydrogens; without them the graphs are about half
the size, which is what makes the CPU presets run in minutes); the largest fragment of each record (salts
dropped); molecules with a number of heavy atoms outside [min_atoms, max_atoms], or fewer than
`min_rotatable_bonds` rotatable bonds, left out and counted; every stereocentre and stereo double bond the
record leaves unassigned is fixed to the first of RDKit's enumerated stereoisomers, so all conformers of a
molecule share one stereoisomer (ETKDG would otherwise draw a random one per conformer); duplicates (same
canonical SMILES) kept once. Molecules are ordered by a hash of their canonical SMILES, which fixes the
train/test split by molecule independently of file order and of `max_molecules` (more molecules only extend the
train set). The torsion model also gets one more ETKDG conformer per molecule (`MolGraph.local`), whose bond
lengths and angles it keeps. GEOM's pickles are unpickled: only point `data` at a GEOM download you trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import pickle
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rdkit import Chem, RDConfig, RDLogger, rdBase
from rdkit.Chem import rdDistGeom, rdForceFieldHelpers
from rdkit.Chem.EnumerateStereoisomers import EnumerateStereoisomers, StereoEnumerationOptions
from tqdm import tqdm

from modelcollapse import paths
from modelcollapse.errors import BadInput
from modelcollapse.store import atomic_write_bytes, atomic_write_json

from .model import Batch
from .torsion import TorsionBatch

log = logging.getLogger("modelcollapse.conformer")

ELEMENTS = ("H", "C", "N", "O", "F", "P", "S", "Cl", "Br", "I")  # anything else is "other"
HYBRIDISATION = (Chem.HybridizationType.SP, Chem.HybridizationType.SP2, Chem.HybridizationType.SP3)
BOND_TYPES = {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3, Chem.BondType.AROMATIC: 4}
BUNDLED = {
    "nci": Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi",
    "egfr": Path(RDConfig.RDContribDir) / "PBF" / "testData" / "egfr.sdf",
}
SMILES_SUFFIXES = (".smi", ".smiles", ".txt")
ETKDG_SEED = 42  # fixed: the real data must not change with the run's seed
LOCAL_SEED = 4242  # the torsion model's local-structure conformer: another ETKDG draw than the references
PRUNE_POOL = 4  # with RMSD pruning, embed this many times confs_per_mol and keep the first survivors
CACHE_VERSION = 2  # bump when the way molecules are read or embedded changes


# -- molecular graphs -----------------------------------------------------------------------------------------
def atom_features(mol: Chem.Mol) -> np.ndarray:
    """(N, 6) ints, the columns of model.ATOM_VOCAB."""
    rows = []
    for a in mol.GetAtoms():
        sym = a.GetSymbol()
        hyb = a.GetHybridization()
        rows.append((
            ELEMENTS.index(sym) if sym in ELEMENTS else len(ELEMENTS),
            int(a.GetIsAromatic()),
            HYBRIDISATION.index(hyb) if hyb in HYBRIDISATION else len(HYBRIDISATION),
            min(max(a.GetFormalCharge(), -1), 1) + 1,
            min(a.GetTotalNumHs(includeNeighbors=True), 3),  # the same count whether hydrogens are atoms or not
            int(a.IsInRing()),
        ))
    return np.array(rows, dtype=np.int64).reshape(-1, 6)


def pair_types(mol: Chem.Mol) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered atom pair i != j, (2, P), and its relation in the graph, (P,) (see model.N_PAIR_TYPES)."""
    n = mol.GetNumAtoms()
    hops = Chem.GetDistanceMatrix(mol)  # topological distances, in bonds
    types = np.where(hops == 2, 5, np.where(hops == 3, 6, 0))
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        types[i, j] = types[j, i] = BOND_TYPES.get(b.GetBondType(), 1)  # dative etc. count as single
    i, j = np.nonzero(~np.eye(n, dtype=bool))
    return np.stack([i, j]).astype(np.int64), types[i, j].astype(np.int64)


def pair_paths(mol: Chem.Mol, pairs: np.ndarray, types: np.ndarray) -> np.ndarray:
    """(P, 4): for each pair three bonds apart, the atoms of a shortest path between them (its dihedral is a
    torsion the score network sees as sin/cos); -1 rows for the other pairs."""
    paths = np.full((pairs.shape[1], 4), -1, dtype=np.int64)
    for p in np.nonzero(types == 6)[0]:
        paths[p] = Chem.GetShortestPath(mol, int(pairs[0, p]), int(pairs[1, p]))
    return paths


def contact_distances(mol: Chem.Mol, pairs: np.ndarray, types: np.ndarray) -> np.ndarray:
    """(P,) float32: for pairs three or more bonds apart (in one molecule's torsions' reach), the distance
    below which RDKit's bond perception would see a bond, r_i + r_j + 0.45 Å (a clash); 0 for closer pairs."""
    table = Chem.GetPeriodicTable()
    r = np.array([table.GetRcovalent(a.GetAtomicNum()) for a in mol.GetAtoms()])
    return np.where((types == 0) | (types == 6), r[pairs[0]] + r[pairs[1]] + 0.45, 0.0).astype(np.float32)


def heavy_degree(atom: Chem.Atom) -> int:
    return sum(n.GetAtomicNum() > 1 for n in atom.GetNeighbors())


def rotatable_torsions(mol: Chem.Mol) -> np.ndarray:
    """(K, 4) atoms a-b-c-d of each rotatable bond b-c: a single bond outside rings between heavy atoms that
    both have another heavy neighbour and neither of which is linear (in a triple bond: the torsion about it is
    undefined). a and d are the lowest-numbered heavy neighbours of b and c: any choice measures the same
    rotation, up to a constant."""
    rows = []
    for bond in mol.GetBonds():
        b, c = bond.GetBeginAtom(), bond.GetEndAtom()
        if (bond.GetBondType() != Chem.BondType.SINGLE or bond.IsInRing()
                or min(b.GetAtomicNum(), c.GetAtomicNum()) == 1 or min(heavy_degree(b), heavy_degree(c)) < 2
                or any(x.GetBondType() == Chem.BondType.TRIPLE for atom in (b, c) for x in atom.GetBonds())):
            continue
        a = min(n.GetIdx() for n in b.GetNeighbors() if n.GetIdx() != c.GetIdx() and n.GetAtomicNum() > 1)
        d = min(n.GetIdx() for n in c.GetNeighbors() if n.GetIdx() != b.GetIdx() and n.GetAtomicNum() > 1)
        rows.append((a, b.GetIdx(), c.GetIdx(), d))
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def torsion_sides(mol: Chem.Mol, torsions: np.ndarray) -> np.ndarray:
    """(K, N) int8: +1 for the atoms on c's side of rotatable bond b-c (those a change of its torsion moves),
    -1 for those on b's side."""
    n = mol.GetNumAtoms()
    neighbours = [[x.GetIdx() for x in mol.GetAtomWithIdx(i).GetNeighbors()] for i in range(n)]
    sides = -np.ones((len(torsions), n), dtype=np.int8)
    for k, (_, b, c, _) in enumerate(torsions):
        stack, seen = [c], {c}
        while stack:  # the atoms reachable from c without crossing b-c (a non-ring bond: b is not among them)
            for x in neighbours[stack.pop()]:
                if x not in seen and x != b:
                    seen.add(x)
                    stack.append(x)
        sides[k, list(seen)] = 1
    return sides


@dataclass(eq=False)
class MolGraph:
    """One molecular graph and the arrays the models condition on."""

    mol: Chem.Mol  # sanitised, no conformers; hydrogens implicit unless the config keeps them as atoms
    name: str
    smiles: str  # canonical isomeric SMILES
    key: str  # identifies graph and atom order: two graphs with one key take the same coordinates
    atoms: np.ndarray  # (N, 6)
    pairs: np.ndarray  # (2, P)
    pair_type: np.ndarray  # (P,)
    paths: np.ndarray  # (P, 4), see pair_paths
    torsions: np.ndarray  # (K, 4), see rotatable_torsions
    sides: np.ndarray  # (K, N), see torsion_sides
    heavy: np.ndarray  # (H,) the heavy atoms, which the metrics compare
    contact: np.ndarray  # (P,) float32, see contact_distances
    local: np.ndarray | None = field(default=None)  # (N, 3) the torsion model's bond lengths and angles

    @classmethod
    def from_mol(cls, mol: Chem.Mol, name: str, local: np.ndarray | None = None) -> MolGraph:
        mol = Chem.Mol(mol)
        mol.RemoveAllConformers()
        smiles = Chem.MolToSmiles(mol)
        # the canonical rank of atom 0, 1, ...: the same graph listed in another order gets another key
        order = ",".join(map(str, Chem.CanonicalRankAtoms(mol)))
        pairs, types = pair_types(mol)
        torsions = rotatable_torsions(mol)
        heavy = np.array([a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() > 1], dtype=np.int64)
        return cls(mol, name, smiles, hashlib.sha1(f"{smiles} {order}".encode()).hexdigest(), atom_features(mol),
                   pairs, types, pair_paths(mol, pairs, types), torsions, torsion_sides(mol, torsions), heavy,
                   contact_distances(mol, pairs, types), None if local is None else np.asarray(local, dtype=np.float32))

    @property
    def n_atoms(self) -> int:
        return len(self.atoms)

    @property
    def heavy_mol(self) -> Chem.Mol:
        """The graph without hydrogen atoms, in the order of `heavy` (the same mol when there are none)."""
        return Chem.RemoveHs(self.mol) if len(self.heavy) < self.n_atoms else self.mol


# -- datasets of conformers -----------------------------------------------------------------------------------
@dataclass
class ConformerSet:
    """Conformers (the unit the policies count) of a set of molecular graphs."""

    graphs: list[MolGraph]  # the distinct graphs
    graph_idx: np.ndarray  # (M,) the graph of each conformer
    pos: list[np.ndarray]  # M arrays (N_g, 3) float32, Å, in the graph's atom order
    is_real: np.ndarray | None = None  # (M,) bool: which conformers are real (for `real_weight`); default all

    def __post_init__(self):
        if self.is_real is None:
            self.is_real = np.ones(len(self.graph_idx), dtype=bool)

    def __len__(self) -> int:
        return len(self.graph_idx)

    def take(self, idx) -> ConformerSet:
        """The conformers at `idx`, with only the graphs they use (in their first-use order)."""
        used = list(dict.fromkeys(int(g) for g in self.graph_idx[idx]))
        remap = {g: k for k, g in enumerate(used)}
        return ConformerSet([self.graphs[g] for g in used], np.array([remap[int(self.graph_idx[i])] for i in idx],
                            dtype=np.int64), [self.pos[i] for i in idx], self.is_real[np.asarray(idx, dtype=np.int64)])

    def conformers_of(self) -> list[list[int]]:
        """For each graph, the indices of its conformers."""
        out = [[] for _ in self.graphs]
        for i, g in enumerate(self.graph_idx):
            out[g].append(i)
        return out


def concat(sets: list[ConformerSet]) -> ConformerSet:
    graphs, index, graph_idx, pos = [], {}, [], []
    for s in sets:
        for g in s.graph_idx:
            graph = s.graphs[g]
            if graph.key not in index:
                index[graph.key] = len(graphs)
                graphs.append(graph)
            graph_idx.append(index[graph.key])
        pos.extend(s.pos)
    is_real = np.concatenate([s.is_real for s in sets]) if sets else np.zeros(0, dtype=bool)
    return ConformerSet(graphs, np.array(graph_idx, dtype=np.int64), pos, is_real)


def split_by_molecule(data: ConformerSet, test_molecules: int) -> tuple[ConformerSet, ConformerSet]:
    """(train, test): the first `test_molecules` graphs (in hash order) and all their conformers are test."""
    is_test = data.graph_idx < test_molecules
    return data.take(np.nonzero(~is_test)[0]), data.take(np.nonzero(is_test)[0])


def save_set(stem: Path, data: ConformerSet, info: dict | None = None) -> None:
    """stem.npz (coordinates, which graph, local structures) + stem.json (graphs as MDL mol blocks, atom order
    kept; `info`, e.g. what the loader left out)."""
    def flat(arrays):
        return np.concatenate(arrays).astype(np.float32) if arrays else np.zeros((0, 3), np.float32)

    buf = io.BytesIO()
    np.savez(buf, graph_idx=data.graph_idx, n_atoms=np.array([len(p) for p in data.pos], dtype=np.int64),
             pos=flat(data.pos),
             local=flat([g.local if g.local is not None else np.full((g.n_atoms, 3), np.nan) for g in data.graphs]))
    atomic_write_bytes(stem.with_suffix(".npz"), buf.getvalue())
    atomic_write_json(stem.with_suffix(".json"), {
        "format": "modelcollapse.conformer/2",
        "graphs": [{"name": g.name, "smiles": g.smiles, "molblock": Chem.MolToMolBlock(g.mol)} for g in data.graphs],
        "info": info or {},
    })


def load_set(stem: Path) -> tuple[ConformerSet, dict]:
    """Reopen what save_set wrote, with its info; BadInput if the files are missing, corrupt or disagree."""
    try:
        meta = json.loads(stem.with_suffix(".json").read_text())
        blocks, info = [(g["name"], g["molblock"]) for g in meta["graphs"]], meta.get("info", {})
        with np.load(stem.with_suffix(".npz"), allow_pickle=False) as z:
            graph_idx, n_atoms, flat, local = z["graph_idx"].astype(np.int64), z["n_atoms"], z["pos"], z["local"]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise BadInput(f"cannot read conformer set {stem}.npz/.json: {e}") from None
    graphs = []
    for name, block in blocks:
        mol = Chem.MolFromMolBlock(block, removeHs=False)
        if mol is None:
            raise BadInput(f"{stem}.json: the graph of {name!r} does not parse")
        graphs.append(MolGraph.from_mol(mol, name))
    sizes = np.array([g.n_atoms for g in graphs], dtype=np.int64)
    if (len(graph_idx) != len(n_atoms) or flat.shape != (n_atoms.sum(), 3) or (graph_idx < 0).any()
            or (graph_idx >= len(graphs)).any() or (sizes[graph_idx] != n_atoms).any()
            or local.shape != (sizes.sum(), 3)):
        raise BadInput(f"{stem}.npz does not match the graphs in {stem}.json")
    for g, lp in zip(graphs, np.split(local, np.cumsum(sizes)[:-1])):
        g.local = None if np.isnan(lp).any() else lp
    pos = list(np.split(flat, np.cumsum(n_atoms)[:-1])) if len(n_atoms) else []
    return ConformerSet(graphs, graph_idx, pos), info


def make_batch(graphs: list[MolGraph], pos: list[np.ndarray]) -> Batch:
    """Concatenate molecules (one conformer each) into one Batch, offsetting atom indices."""
    sizes = np.array([g.n_atoms for g in graphs])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return Batch(
        atoms=torch.from_numpy(np.concatenate([g.atoms for g in graphs])),
        pos=torch.from_numpy(np.concatenate(pos).astype(np.float32)),
        mol=torch.from_numpy(np.repeat(np.arange(len(graphs)), sizes)),
        pairs=torch.from_numpy(np.concatenate([g.pairs + o for g, o in zip(graphs, offsets)], axis=1)),
        pair_type=torch.from_numpy(np.concatenate([g.pair_type for g in graphs])),
        n_mols=len(graphs),
    )


def make_torsion_batch(graphs: list[MolGraph], pos: list[np.ndarray]) -> TorsionBatch:
    """A Batch plus what the torsion model needs: each rotatable bond's atoms, which atoms it moves, and
    every (pair, torsion) whose distance that torsion changes (the pair's two atoms on opposite sides)."""
    base = make_batch(graphs, pos)
    sizes = np.array([g.n_atoms for g in graphs])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n_pairs = np.array([g.pairs.shape[1] for g in graphs])
    pair_off = np.concatenate([[0], np.cumsum(n_pairs)[:-1]])
    n_tor = np.array([len(g.torsions) for g in graphs])
    tor_off = np.concatenate([[0], np.cumsum(n_tor)[:-1]])
    moving, crossing, paths = [], [], []
    for g, o, po, to in zip(graphs, offsets, pair_off, tor_off):
        k, atom = np.nonzero(g.sides > 0)
        moving.append(np.stack([k + to, atom + o]))
        # pair p = (i, j) crosses torsion k when i and j lie on opposite sides; `sign` is +1 when i moves
        si, sj = g.sides[:, g.pairs[0]], g.sides[:, g.pairs[1]]  # (K, P)
        k, p = np.nonzero(si != sj)
        crossing.append(np.stack([p + po, k + to, si[k, p].astype(np.int64)]))
        paths.append(np.where(g.paths >= 0, g.paths + o, -1))
    return TorsionBatch(
        base=base,
        torsions=torch.from_numpy(np.concatenate([g.torsions + o for g, o in zip(graphs, offsets)])),
        tor_mol=torch.from_numpy(np.repeat(np.arange(len(graphs)), n_tor)),
        tor_round=torch.from_numpy(np.concatenate([np.arange(k) for k in n_tor]).astype(np.int64)),
        moving=torch.from_numpy(np.concatenate(moving, axis=1)),
        crossing=torch.from_numpy(np.concatenate(crossing, axis=1)),
        paths=torch.from_numpy(np.concatenate(paths)),
        contact=torch.from_numpy(np.concatenate([g.contact for g in graphs])),
    )


# -- reading molecules ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """What load_molecules reads and how: every setting that changes the result (the cache key)."""

    data: str
    min_atoms: int
    max_atoms: int
    max_molecules: int
    confs_per_mol: int
    min_rotatable_bonds: int = 0
    conformers: str = "etkdg"  # "etkdg" or "file"
    mmff: bool = False
    prune_rms: float = 0.0
    hydrogens: bool = False
    local_structure: bool = False  # embed the torsion model's local-structure conformer
    embed_timeout: int = 10


def resolve_source(data: str) -> tuple[Path, str]:
    """(path, kind) with kind one of "sdf", "smiles", "geom"; BadInput if it is missing or unknown."""
    path = BUNDLED.get(data, Path(data).expanduser())
    if path.is_dir():
        for folder in (path, path.parent):
            if (folder / "summary_drugs.json").is_file():
                return folder, "geom"
        raise BadInput(f"conformer data folder {path}: no summary_drugs.json (expected GEOM's rdkit_folder)")
    paths.regular_file(path, "conformer data file")  # before it is read: a FIFO would block for ever
    if path.suffix.lower() == ".sdf":
        return path, "sdf"
    if path.suffix.lower() in SMILES_SUFFIXES:
        return path, "smiles"
    raise BadInput(f"conformer data file {path}: unknown format (expected .sdf, {', '.join(SMILES_SUFFIXES)}, "
                   "or a GEOM rdkit_folder)")


def read_records(path: Path, kind: str) -> tuple[list[tuple[str, Chem.Mol]], int]:
    """The parsable records of an SDF or SMILES file as (name, mol), and how many were not parsable."""
    RDLogger.DisableLog("rdApp.*")  # RDKit prints every bad record; we count them instead
    try:
        records, bad = [], 0
        if kind == "sdf":
            for k, mol in enumerate(Chem.ForwardSDMolSupplier(str(path), removeHs=False)):
                if mol is None:
                    bad += 1
                else:
                    records.append((mol.GetProp("_Name") if mol.HasProp("_Name") else f"{path.stem}-{k}", mol))
        else:
            for k, line in enumerate(path.read_text(errors="replace").splitlines()):
                fields = line.split()
                if not fields or fields[0].startswith("#"):
                    continue
                mol = Chem.MolFromSmiles(fields[0])
                if mol is None:
                    bad += 1
                else:
                    records.append((fields[1] if len(fields) > 1 else f"{path.stem}-{k + 1}", mol))
    except OSError as e:
        raise BadInput(f"cannot read conformer data file {path}: {e}") from None
    finally:
        RDLogger.EnableLog("rdApp.*")
    return records, bad


def largest_fragment(mol: Chem.Mol) -> Chem.Mol | None:
    """The largest fragment, hydrogens kept as they are (with their coordinates), sanitised; None if RDKit
    rejects it."""
    try:
        frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
        mol = Chem.Mol(max(frags, key=lambda m: m.GetNumHeavyAtoms()))
        Chem.SanitizeMol(mol)
        return mol
    except (Chem.rdchem.MolSanitizeException, RuntimeError, ValueError):
        return None


def heavy_graph(mol: Chem.Mol) -> Chem.Mol | None:
    """The largest fragment, hydrogens removed, sanitised; None if RDKit rejects it."""
    frag = largest_fragment(mol)
    try:
        return None if frag is None else Chem.RemoveHs(frag)
    except (Chem.rdchem.MolSanitizeException, RuntimeError, ValueError):
        return None


def assign_stereo(mol: Chem.Mol) -> Chem.Mol:
    """`mol` with every unassigned stereocentre and stereo double bond fixed: the first stereoisomer RDKit
    enumerates (deterministic), so that every conformer of the molecule is one stereoisomer."""
    options = StereoEnumerationOptions(onlyUnassigned=True, unique=True)
    return next(iter(EnumerateStereoisomers(mol, options=options)), mol)


def graph_mol(heavy: Chem.Mol, hydrogens: bool) -> Chem.Mol:
    """The graph the models see: the heavy-atom graph, with hydrogens appended as atoms when asked."""
    return Chem.AddHs(heavy) if hydrogens else heavy


def embed(mol: Chem.Mol, n: int, source: Source, seed: int) -> np.ndarray | None:
    """n ETKDGv3 conformers of the heavy-atom graph `mol`, embedded with hydrogens (MMFF94-minimised and
    RMSD-pruned when the source says so), as (n, N, 3) in graph_mol's order; None if RDKit finds fewer
    within the timeout, or MMFF has no parameters for the molecule."""
    molH = Chem.AddHs(mol)  # hydrogens are appended, so heavy atoms keep their indices
    with quiet_rdkit():
        return _embed(molH, n, source, seed)


def _embed(molH: Chem.Mol, n: int, source: Source, seed: int) -> np.ndarray | None:
    params = rdDistGeom.ETKDGv3()
    params.randomSeed = seed
    params.timeout = source.embed_timeout
    params.numThreads = 0  # all cores; the result does not depend on the thread count
    if source.prune_rms > 0:
        params.pruneRmsThresh = source.prune_rms  # heavy atoms, symmetry-aware, before any minimisation
    ids = list(rdDistGeom.EmbedMultipleConfs(molH, n * (PRUNE_POOL if source.prune_rms > 0 else 1), params))[:n]
    if len(ids) < n:
        return None
    if source.mmff:
        if not rdForceFieldHelpers.MMFFHasAllMoleculeParams(molH):
            return None
        rdForceFieldHelpers.MMFFOptimizeMoleculeConfs(molH, numThreads=0, maxIters=2000)
    keep = list(range(molH.GetNumAtoms())) if source.hydrogens else [a.GetIdx() for a in molH.GetAtoms()
                                                                    if a.GetAtomicNum() > 1]
    return np.stack([molH.GetConformer(c).GetPositions()[keep] for c in ids]).astype(np.float32)


@contextlib.contextmanager
def quiet_rdkit():
    """RDKit's own messages off (it prints a line per odd atom type while embedding); we count failures."""
    RDLogger.DisableLog("rdApp.*")
    try:
        yield
    finally:
        RDLogger.EnableLog("rdApp.*")


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def split_hash(smiles: str) -> str:
    return hashlib.sha1(smiles.encode()).hexdigest()


def without_hydrogens(mol: Chem.Mol) -> tuple[Chem.Mol, list[int]]:
    """`mol` with its hydrogen atoms deleted (not sanitised), and the indices in `mol` of the atoms kept."""
    kept = [a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() > 1]
    bare = Chem.RWMol(mol)
    for i in sorted(set(range(mol.GetNumAtoms())) - set(kept), reverse=True):
        bare.RemoveAtom(i)
    return bare.GetMol(), kept


def coordinates_in(graph: Chem.Mol, record: Chem.Mol) -> np.ndarray | None:
    """The 3-D coordinates of `record` (a conformer of the same molecule, hydrogens as its file has them) in
    `graph`'s atom order, (N, 3); None if `record` is not that graph. Heavy atoms are matched as a subgraph
    (the identity first, when the record lists them in the graph's order), each hydrogen of the graph then
    takes a hydrogen of its heavy atom's counterpart."""
    core, heavy_g = without_hydrogens(graph)
    rcore, heavy_r = without_hydrogens(record)
    matches = rcore.GetSubstructMatches(core, uniquify=False, useChirality=False, maxMatches=1000)
    if not matches or len(heavy_g) != len(heavy_r):
        return None
    identity = tuple(range(len(heavy_g)))
    match = identity if identity in matches else matches[0]
    mapping = {heavy_g[i]: heavy_r[m] for i, m in enumerate(match)}
    free = {r: [x.GetIdx() for x in record.GetAtomWithIdx(r).GetNeighbors() if x.GetAtomicNum() == 1]
            for r in heavy_r}
    for a in graph.GetAtoms():
        if a.GetAtomicNum() == 1:
            parent = mapping[a.GetNeighbors()[0].GetIdx()]
            if not free[parent]:
                return None
            mapping[a.GetIdx()] = free[parent].pop(0)
    return record.GetConformer().GetPositions()[[mapping[i] for i in range(graph.GetNumAtoms())]].astype(np.float32)


def _candidates(path: Path, kind: str, source: Source, counts: Counter) -> list[tuple[str, Chem.Mol, list]]:
    """(name, heavy-atom graph with its stereo fixed, the records of that molecule) per distinct usable
    molecule, in split order."""
    records, counts["unparsable"] = read_records(path, kind)
    by_smiles: dict[str, tuple[str, Chem.Mol, list]] = {}
    for name, mol in records:
        frag = largest_fragment(mol)
        heavy = heavy_graph(mol)
        if heavy is None:
            counts["rejected by RDKit"] += 1
            continue
        if not source.min_atoms <= heavy.GetNumAtoms() <= source.max_atoms:
            counts[f"outside {source.min_atoms}-{source.max_atoms} heavy atoms"] += 1
            continue
        if source.conformers == "file":
            if not mol.GetNumConformers() or not mol.GetConformer().Is3D():
                raise BadInput(f"conformer data file {path}: record {name!r} has no 3-D coordinates "
                               "(conformers = \"file\" reads them from the file)")
            Chem.AssignStereochemistryFrom3D(heavy)  # the record's own stereoisomer
        else:
            heavy = assign_stereo(heavy)
        smiles = Chem.MolToSmiles(heavy)
        if smiles not in by_smiles:
            by_smiles[smiles] = (name, heavy, [])
        elif source.conformers == "etkdg":
            counts["duplicates"] += 1
        by_smiles[smiles][2].append(frag)
    return [by_smiles[s] for s in sorted(by_smiles, key=split_hash)]


def _read(path: Path, kind: str, source: Source, counts: Counter) -> list[tuple[MolGraph, np.ndarray]]:
    """Every usable molecule of an SDF or SMILES file with its conformers, up to max_molecules."""
    if source.conformers == "file" and kind == "smiles":
        raise BadInput(f"conformer data file {path}: SMILES have no 3-D coordinates (conformers = \"file\" needs "
                       "an SDF of 3-D records)")
    candidates = _candidates(path, kind, source, counts)
    out = []
    with tqdm(total=min(source.max_molecules, len(candidates)), desc="conformers", unit="mol", disable=None) as bar:
        for name, heavy, frags in candidates:
            if len(out) == source.max_molecules:
                break
            mol = graph_mol(heavy, source.hydrogens)
            if len(rotatable_torsions(mol)) < source.min_rotatable_bonds:
                counts[f"fewer than {plural(source.min_rotatable_bonds, 'rotatable bond')}"] += 1
                continue
            if source.conformers == "file":
                pos = [p for p in (coordinates_in(mol, f) for f in frags) if p is not None][:source.confs_per_mol]
                pos = np.stack(pos) if len(pos) == source.confs_per_mol else None
                if pos is None:
                    counts[f"fewer than {plural(source.confs_per_mol, 'conformer')} in the file"] += 1
                    continue
            else:
                pos = embed(heavy, source.confs_per_mol, source, ETKDG_SEED)
            local = embed(heavy, 1, source, LOCAL_SEED) if source.local_structure else None
            if pos is None or (source.local_structure and local is None):
                counts["not embedded (ETKDG timeout or no MMFF parameters)"] += 1
                continue
            out.append((MolGraph.from_mol(mol, name, None if local is None else local[0]), pos))
            bar.update(1)
    return out


def _geom(folder: Path, source: Source, counts: Counter) -> list[tuple[MolGraph, np.ndarray]]:
    """The `confs_per_mol` conformers of highest Boltzmann weight per GEOM molecule, among those whose
    graph is the molecule's (GEOM has a few that reacted during CREST: those are dropped), in the atom order of
    the first one kept, whose 3-D stereocentres become the graph's."""
    summary_path = folder / "summary_drugs.json"
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read {summary_path}: {e}") from None
    if not isinstance(summary, dict):
        raise BadInput(f"{summary_path}: expected a JSON object of SMILES -> summary")
    entries = sorted((split_hash(s), s, v) for s, v in summary.items() if isinstance(v, dict) and "pickle_path" in v)
    out = []
    RDLogger.DisableLog("rdApp.*")
    with tqdm(total=min(source.max_molecules, len(entries)), desc="GEOM molecules", unit="mol", disable=None) as bar:
        for _, smiles, entry in entries:
            if len(out) == source.max_molecules:
                break
            target = Chem.MolFromSmiles(smiles)
            try:
                if not (folder / entry["pickle_path"]).is_file():  # missing, or a FIFO that would block for ever
                    raise OSError("not a regular file")
                with open(folder / entry["pickle_path"], "rb") as f:
                    confs = pickle.load(f)["conformers"]
                confs = sorted(confs, key=lambda c: -c.get("boltzmannweight", 0.0))
            except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError):
                counts["unreadable"] += 1
                continue
            if target is None:
                counts["unreadable"] += 1
                continue
            target = Chem.MolToSmiles(target, isomericSmiles=False)
            graph, pos = None, []
            for conf in confs:
                rd_mol = conf.get("rd_mol") if isinstance(conf, dict) else None
                heavy = heavy_graph(rd_mol) if rd_mol is not None else None
                if heavy is None or not rd_mol.GetNumConformers() or not rd_mol.GetConformer().Is3D():
                    counts["conformers without a 3-D molecule"] += 1
                    continue
                if Chem.MolToSmiles(heavy, isomericSmiles=False) != target:
                    counts["conformers whose graph differs"] += 1
                    continue
                if graph is None:
                    Chem.AssignStereochemistryFrom3D(heavy)  # the first conformer's stereoisomer is the graph's
                    graph = MolGraph.from_mol(graph_mol(heavy, source.hydrogens), smiles)
                xyz = coordinates_in(graph.mol, rd_mol)
                if xyz is None:
                    counts["conformers whose graph differs"] += 1
                    continue
                pos.append(xyz)
                if len(pos) == source.confs_per_mol:
                    break
            if graph is None:
                continue
            if not source.min_atoms <= len(graph.heavy) <= source.max_atoms:
                counts[f"outside {source.min_atoms}-{source.max_atoms} heavy atoms"] += 1
                continue
            if len(graph.torsions) < source.min_rotatable_bonds:
                counts[f"fewer than {plural(source.min_rotatable_bonds, 'rotatable bond')}"] += 1
                continue
            if source.local_structure:
                local = embed(Chem.RemoveHs(graph.mol), 1, source, LOCAL_SEED)
                if local is None:
                    counts["not embedded (ETKDG timeout or no MMFF parameters)"] += 1
                    continue
                graph.local = local[0]
            out.append((graph, np.stack(pos).astype(np.float32)))
            bar.update(1)
    RDLogger.EnableLog("rdApp.*")
    return out


def load_molecules(source: Source, cache_dir: Path) -> tuple[ConformerSet, dict[str, int]]:
    """Every usable molecule of the source (up to `max_molecules`), in split order, with its conformers, and
    how many molecules were left out, by reason. Cached in cache_dir by a hash of the source's bytes and every
    setting that changes the result."""
    path, kind = resolve_source(source.data)
    h = hashlib.sha256()
    h.update((path / "summary_drugs.json" if kind == "geom" else path).read_bytes())
    settings = dict(asdict(source), data=None, kind=kind, rdkit=rdBase.rdkitVersion, version=CACHE_VERSION)
    h.update(json.dumps(settings, sort_keys=True).encode())
    stem = Path(cache_dir) / "conformer" / f"{path.stem}-{h.hexdigest()[:16]}"
    if stem.with_suffix(".npz").exists() and stem.with_suffix(".json").exists():
        try:
            data_set, info = load_set(stem)
            return data_set, info.get("left_out", {})
        except BadInput as e:
            paths.rebuilding(stem, e)
    counts: Counter = Counter()
    mols = _geom(path, source, counts) if kind == "geom" else _read(path, kind, source, counts)
    left_out = {k: v for k, v in counts.items() if v}
    if not mols:
        rotatable = " (the torsion model needs a molecule with a rotatable bond)" if source.min_rotatable_bonds else ""
        shown = ", ".join(f"{v} {k}" for k, v in left_out.items()) or "none found"
        raise BadInput(f"conformer data {source.data}: no usable molecule{rotatable}; left out: {shown}")
    data_set = ConformerSet([g for g, _ in mols], np.concatenate([np.full(len(p), k) for k, (_, p) in enumerate(mols)]),
                            [c for _, p in mols for c in p])
    save_set(stem, data_set, {"left_out": left_out})
    data_set, _ = load_set(stem)  # as every later run reads it (float32, graphs from mol blocks): the same numbers
    return data_set, left_out
