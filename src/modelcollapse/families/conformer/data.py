"""Molecules and their conformers: loaders, ETKDG embedding, the disk cache, and the model's batches.

Sources (the config's `data`):
- "egfr" (default): the 365 EGFR ligands RDKit ships (Contrib/PBF/testData/egfr.sdf), 17-32 heavy atoms;
- "nci": the first 5,000 NCI compounds RDKit ships (Data/NCI/first_5K.smi), about 4,200 in 10-40 heavy atoms;
- a path to an .sdf or a SMILES file (.smi/.smiles/.txt: SMILES first on each line, a name may follow);
- a path to GEOM's `rdkit_folder` (Axelrod & Gómez-Bombarelli 2022) or its `drugs/` subfolder: a
  `summary_drugs.json` beside `drugs/*.pickle`, one pickle per molecule holding its CREST conformers.
For the first three the graph comes from the file and the conformers from RDKit's ETKDGv3, embedded with
hydrogens and then stripped of them: these are RDKit conformers, not GEOM's CREST ensembles.

Choices: heavy atoms only (GeoDiff keeps hydrogens; without them the graphs are about half the size, which is
what makes the CPU presets run in minutes); the largest fragment of each record (salts dropped); molecules
with a number of heavy atoms outside [min_atoms, max_atoms] left out; duplicates (same canonical SMILES) kept
once. Molecules are ordered by a hash of their canonical SMILES, which fixes the train/test split by molecule
independently of file order and of `max_molecules` (more molecules only extend the train set). GEOM's
pickles are unpickled: only point `data` at a GEOM download you trust.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rdkit import Chem, RDConfig, RDLogger, rdBase
from rdkit.Chem import rdDistGeom
from tqdm import tqdm

from modelcollapse import paths
from modelcollapse.errors import BadInput
from modelcollapse.store import atomic_write_bytes, atomic_write_json

from .model import Batch

log = logging.getLogger("modelcollapse.conformer")

ELEMENTS = ("C", "N", "O", "F", "P", "S", "Cl", "Br", "I")  # anything else is "other"
HYBRIDISATION = (Chem.HybridizationType.SP, Chem.HybridizationType.SP2, Chem.HybridizationType.SP3)
BOND_TYPES = {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3, Chem.BondType.AROMATIC: 4}
BUNDLED = {
    "egfr": Path(RDConfig.RDContribDir) / "PBF" / "testData" / "egfr.sdf",
    "nci": Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi",
}
SMILES_SUFFIXES = (".smi", ".smiles", ".txt")
ETKDG_SEED = 42  # fixed: the real data must not change with the run's seed
CACHE_VERSION = 1  # bump when the way molecules are read or embedded changes


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
            min(a.GetTotalNumHs(), 3),
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


@dataclass(eq=False)
class MolGraph:
    """One molecular graph (heavy atoms) and the arrays the denoiser conditions on."""

    mol: Chem.Mol  # sanitised, hydrogens implicit, no conformers
    name: str
    smiles: str  # canonical isomeric SMILES
    key: str  # identifies graph and atom order: two graphs with one key take the same coordinates
    atoms: np.ndarray  # (N, 6)
    pairs: np.ndarray  # (2, P)
    pair_type: np.ndarray  # (P,)

    @classmethod
    def from_mol(cls, mol: Chem.Mol, name: str) -> MolGraph:
        mol = Chem.Mol(mol)
        mol.RemoveAllConformers()
        smiles = Chem.MolToSmiles(mol)
        # the canonical rank of atom 0, 1, ...: the same graph listed in another order gets another key
        order = ",".join(map(str, Chem.CanonicalRankAtoms(mol)))
        pairs, types = pair_types(mol)
        return cls(mol, name, smiles, hashlib.sha1(f"{smiles} {order}".encode()).hexdigest(), atom_features(mol),
                   pairs, types)

    @property
    def n_atoms(self) -> int:
        return len(self.atoms)


# -- datasets of conformers -----------------------------------------------------------------------------------
@dataclass
class ConformerSet:
    """Conformers (the unit the policies count) of a set of molecular graphs."""

    graphs: list[MolGraph]  # the distinct graphs
    graph_idx: np.ndarray  # (M,) the graph of each conformer
    pos: list[np.ndarray]  # M arrays (N_g, 3) float32, Å, in the graph's atom order

    def __len__(self) -> int:
        return len(self.graph_idx)

    def take(self, idx) -> ConformerSet:
        """The conformers at `idx`, with only the graphs they use (in their first-use order)."""
        used = list(dict.fromkeys(int(g) for g in self.graph_idx[idx]))
        remap = {g: k for k, g in enumerate(used)}
        return ConformerSet([self.graphs[g] for g in used], np.array([remap[int(self.graph_idx[i])] for i in idx],
                            dtype=np.int64), [self.pos[i] for i in idx])

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
    return ConformerSet(graphs, np.array(graph_idx, dtype=np.int64), pos)


def split_by_molecule(data: ConformerSet, test_molecules: int) -> tuple[ConformerSet, ConformerSet]:
    """(train, test): the first `test_molecules` graphs (in hash order) and all their conformers are test."""
    is_test = data.graph_idx < test_molecules
    return data.take(np.nonzero(~is_test)[0]), data.take(np.nonzero(is_test)[0])


def save_set(stem: Path, data: ConformerSet) -> None:
    """stem.npz (coordinates, which graph) + stem.json (graphs as MDL mol blocks, atom order kept)."""
    buf = io.BytesIO()
    np.savez(buf, graph_idx=data.graph_idx, n_atoms=np.array([len(p) for p in data.pos], dtype=np.int64),
             pos=np.concatenate(data.pos).astype(np.float32) if data.pos else np.zeros((0, 3), np.float32))
    atomic_write_bytes(stem.with_suffix(".npz"), buf.getvalue())
    atomic_write_json(stem.with_suffix(".json"), {
        "format": "modelcollapse.conformer/1",
        "graphs": [{"name": g.name, "smiles": g.smiles, "molblock": Chem.MolToMolBlock(g.mol)} for g in data.graphs],
    })


def load_set(stem: Path) -> ConformerSet:
    """Reopen what save_set wrote; BadInput if the files are missing, corrupt or disagree with each other."""
    try:
        blocks = [(g["name"], g["molblock"]) for g in json.loads(stem.with_suffix(".json").read_text())["graphs"]]
        with np.load(stem.with_suffix(".npz"), allow_pickle=False) as z:
            graph_idx, n_atoms, flat = z["graph_idx"].astype(np.int64), z["n_atoms"], z["pos"]
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
            or (graph_idx >= len(graphs)).any() or (sizes[graph_idx] != n_atoms).any()):
        raise BadInput(f"{stem}.npz does not match the graphs in {stem}.json")
    return ConformerSet(graphs, graph_idx, list(np.split(flat, np.cumsum(n_atoms)[:-1])) if len(n_atoms) else [])


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


# -- reading molecules ----------------------------------------------------------------------------------------
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


def heavy_graph(mol: Chem.Mol) -> Chem.Mol | None:
    """The largest fragment, hydrogens removed, sanitised; None if RDKit rejects it."""
    try:
        frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
        mol = Chem.RemoveHs(max(frags, key=lambda m: m.GetNumHeavyAtoms()))
        Chem.SanitizeMol(mol)
        return mol
    except (Chem.rdchem.MolSanitizeException, RuntimeError, ValueError):
        return None


def embed(mol: Chem.Mol, n: int, timeout: int) -> np.ndarray | None:
    """n ETKDGv3 conformers of `mol`, embedded with hydrogens, as heavy-atom coordinates (n, N, 3);
    None if RDKit finds fewer within `timeout` seconds."""
    molH = Chem.AddHs(mol)  # hydrogens are appended, so heavy atoms keep their indices
    params = rdDistGeom.ETKDGv3()
    params.randomSeed = ETKDG_SEED
    params.timeout = timeout
    params.numThreads = 0  # all cores; the result does not depend on the thread count
    ids = list(rdDistGeom.EmbedMultipleConfs(molH, n, params))
    if len(ids) < n:
        return None
    heavy = [a.GetIdx() for a in molH.GetAtoms() if a.GetAtomicNum() > 1]
    return np.stack([molH.GetConformer(c).GetPositions()[heavy] for c in ids]).astype(np.float32)


def split_hash(smiles: str) -> str:
    return hashlib.sha1(smiles.encode()).hexdigest()


def _embedded(path: Path, kind: str, min_atoms: int, max_atoms: int, max_molecules: int, confs_per_mol: int,
              timeout: int) -> list[tuple[MolGraph, np.ndarray]]:
    records, bad = read_records(path, kind)
    candidates, seen, rejected, out_of_range = [], set(), 0, 0
    for name, mol in records:
        mol = heavy_graph(mol)
        if mol is None:
            rejected += 1
        elif not min_atoms <= mol.GetNumAtoms() <= max_atoms:
            out_of_range += 1
        else:
            smiles = Chem.MolToSmiles(mol)
            if smiles not in seen:
                seen.add(smiles)
                candidates.append((split_hash(smiles), name, mol))
    if bad or rejected:
        log.warning("%s: skipped %d unparsable record(s) and %d that RDKit rejects", path, bad, rejected)
    if not candidates:
        raise BadInput(f"conformer data file {path}: no usable molecule ({len(records)} parsed, {bad} unparsable, "
                       f"{out_of_range} outside {min_atoms}-{max_atoms} heavy atoms)")
    out, failed = [], 0
    with tqdm(total=min(max_molecules, len(candidates)), desc="ETKDG conformers", unit="mol", disable=None) as bar:
        for _, name, mol in sorted(candidates, key=lambda c: c[0]):
            if len(out) == max_molecules:
                break
            pos = embed(mol, confs_per_mol, timeout)
            if pos is None:
                failed += 1
                continue
            out.append((MolGraph.from_mol(mol, name), pos))
            bar.update(1)
    if failed:
        log.warning("%s: %d molecule(s) not embedded within %d s, left out", path, failed, timeout)
    return out


def _geom(folder: Path, min_atoms: int, max_atoms: int, max_molecules: int,
          confs_per_mol: int) -> list[tuple[MolGraph, np.ndarray]]:
    """The `confs_per_mol` conformers of highest Boltzmann weight per GEOM molecule, among those whose
    heavy-atom graph is the molecule's (GEOM has a few that reacted during CREST: those are dropped) and whose
    atom order is that of the first one kept."""
    summary_path = folder / "summary_drugs.json"
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read {summary_path}: {e}") from None
    if not isinstance(summary, dict):
        raise BadInput(f"{summary_path}: expected a JSON object of SMILES -> summary")
    entries = sorted((split_hash(s), s, v) for s, v in summary.items() if isinstance(v, dict) and "pickle_path" in v)
    out, bad, mismatched, out_of_range = [], 0, 0, 0
    RDLogger.DisableLog("rdApp.*")
    with tqdm(total=min(max_molecules, len(entries)), desc="GEOM molecules", unit="mol", disable=None) as bar:
        for _, smiles, entry in entries:
            if len(out) == max_molecules:
                break
            target = Chem.MolFromSmiles(smiles)
            try:
                if not (folder / entry["pickle_path"]).is_file():  # missing, or a FIFO that would block for ever
                    raise OSError("not a regular file")
                with open(folder / entry["pickle_path"], "rb") as f:
                    confs = pickle.load(f)["conformers"]
                confs = sorted(confs, key=lambda c: -c.get("boltzmannweight", 0.0))
            except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError):
                bad += 1
                continue
            if target is None:
                bad += 1
                continue
            target = Chem.MolToSmiles(target, isomericSmiles=False)
            graph, pos = None, []
            for conf in confs:
                mol = heavy_graph(conf["rd_mol"]) if isinstance(conf, dict) and "rd_mol" in conf else None
                if mol is None or Chem.MolToSmiles(mol, isomericSmiles=False) != target:
                    mismatched += 1
                    continue
                graph = graph or MolGraph.from_mol(mol, smiles)
                if MolGraph.from_mol(mol, smiles).key != graph.key:
                    mismatched += 1
                    continue
                pos.append(mol.GetConformer().GetPositions())
                if len(pos) == confs_per_mol:
                    break
            if graph is None:
                continue
            if not min_atoms <= graph.n_atoms <= max_atoms:
                out_of_range += 1
                continue
            out.append((graph, np.stack(pos).astype(np.float32)))
            bar.update(1)
    RDLogger.EnableLog("rdApp.*")
    if bad or mismatched:
        log.warning("%s: skipped %d unreadable molecule(s) and %d conformer(s) whose graph or atom order differs",
                    folder, bad, mismatched)
    if not out:
        raise BadInput(f"GEOM folder {folder}: no usable molecule ({len(entries)} listed, {bad} unreadable, "
                       f"{out_of_range} outside {min_atoms}-{max_atoms} heavy atoms)")
    return out


def load_molecules(data: str, *, min_atoms: int, max_atoms: int, max_molecules: int, confs_per_mol: int,
                   embed_timeout: int, cache_dir: Path) -> ConformerSet:
    """Every usable molecule of the source (up to `max_molecules`), in split order, with its conformers.
    Cached in cache_dir by a hash of the source's bytes and every setting that changes the result."""
    path, kind = resolve_source(data)
    h = hashlib.sha256()
    h.update((path / "summary_drugs.json" if kind == "geom" else path).read_bytes())
    settings = dict(kind=kind, min_atoms=min_atoms, max_atoms=max_atoms, max_molecules=max_molecules,
                    confs_per_mol=confs_per_mol, embed_timeout=embed_timeout if kind != "geom" else None,
                    rdkit=rdBase.rdkitVersion, version=CACHE_VERSION)
    h.update(json.dumps(settings, sort_keys=True).encode())
    stem = Path(cache_dir) / "conformer" / f"{path.stem}-{h.hexdigest()[:16]}"
    if stem.with_suffix(".npz").exists() and stem.with_suffix(".json").exists():
        try:
            return load_set(stem)
        except BadInput as e:
            paths.rebuilding(stem, e)
    if kind == "geom":
        mols = _geom(path, min_atoms, max_atoms, max_molecules, confs_per_mol)
    else:
        mols = _embedded(path, kind, min_atoms, max_atoms, max_molecules, confs_per_mol, embed_timeout)
    data_set = ConformerSet([g for g, _ in mols], np.concatenate([np.full(len(p), k) for k, (_, p) in enumerate(mols)]),
                            [c for _, p in mols for c in p])
    save_set(stem, data_set)
    return data_set
