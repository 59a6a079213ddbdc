"""The conformer family: loaders, split, cache, the torsion and Cartesian models, fitting, sampling, metrics,
the trivial baselines, the loop and the command line."""

import json
import math
import pickle

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from rdkit import Chem  # noqa: E402
from rdkit.Chem import rdDistGeom, rdMolAlign, rdMolTransforms  # noqa: E402
from scipy.special import logsumexp  # noqa: E402

from conftest import cli  # noqa: E402
from modelcollapse import config as configlib  # noqa: E402
from modelcollapse.errors import BadInput  # noqa: E402
from modelcollapse.families import DataUnavailable  # noqa: E402
from modelcollapse.families.conformer import Config, Family, baselines  # noqa: E402
from modelcollapse.families.conformer import data as D  # noqa: E402
from modelcollapse.families.conformer.metrics import (  # noqa: E402
    bonds_recovered, chirality_kept, conformer_metrics, rmsd_matrix, symmetries)
from modelcollapse.families.conformer.model import ConformerDiffusion, NetConfig  # noqa: E402
from modelcollapse.families.conformer.torsion import (  # noqa: E402
    STERIC_MARGIN, TorsionConfig, TorsionDiffusion, dihedral, rotate_torsions, score_norm, steric_score,
    wrapped_normal_score)
from modelcollapse.loop import run_experiment  # noqa: E402
from modelcollapse.store import read_metrics  # noqa: E402

# small drug-like molecules (10-15 heavy atoms), quick to embed and to denoise; caffeine and menadione are rigid
SMILES = [
    ("CC(=O)Oc1ccccc1C(=O)O", "aspirin"),
    ("CC(=O)Nc1ccc(O)cc1", "paracetamol"),
    ("CC(C)Cc1ccc(cc1)C(C)C(=O)O", "ibuprofen"),
    ("Cn1cnc2c1c(=O)n(C)c(=O)n2C", "caffeine"),
    ("OC(=O)c1ccccc1O", "salicylic-acid"),
    ("CCOC(=O)c1ccc(N)cc1", "benzocaine"),
    ("CN1CCC[C@H]1c1cccnc1", "nicotine"),
    ("CC(C)NCC(O)c1ccc(O)c(O)c1", "isoprenaline"),
    ("NC(=O)c1cccnc1", "nicotinamide"),
    ("COc1ccc(CC(C)N)cc1", "pma"),
    ("O=C(O)CCc1ccccc1", "hydrocinnamic-acid"),
    ("CC1=CC(=O)c2ccccc2C1=O", "menadione"),
]
RIGID = {"caffeine", "menadione"}
TINY = dict(min_atoms=8, max_atoms=16, min_rotatable_bonds=1, confs_per_mol=3, test_molecules=3, hidden=16,
            layers=2, train_steps=100, batch_size=8, lr=5e-3, sample_steps=8, eval_draws=2)
CARTESIAN = dict(TINY, model="cartesian", radius=4.0, diffusion_steps=100, sample_steps=10)


def source(path, **kw) -> D.Source:
    return D.Source(str(path), **{**dict(min_atoms=5, max_atoms=40, max_molecules=10, confs_per_mol=2), **kw})


@pytest.fixture(scope="module")
def smiles_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mols") / "drugs.smi"
    path.write_text("".join(f"{s} {name}\n" for s, name in SMILES))
    return path


@pytest.fixture(scope="module")
def family(smiles_file, tmp_path_factory):
    return Family(Config(data=str(smiles_file), max_molecules=len(SMILES), **TINY), device="cpu",
                  cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def fitted(family, tmp_path_factory):
    return family.fit(family.real_data("train", 0), seed=1, workdir=tmp_path_factory.mktemp("fit"))


@pytest.fixture(scope="module")
def cartesian(smiles_file, tmp_path_factory):
    return Family(Config(data=str(smiles_file), max_molecules=len(SMILES), **CARTESIAN), device="cpu",
                  cache_dir=tmp_path_factory.mktemp("cache"))


def embedded(smiles: str, n: int, seed: int = 7) -> tuple[Chem.Mol, np.ndarray]:
    """A heavy-atom graph and n ETKDG conformers of it, (n, N, 3)."""
    mol = Chem.MolFromSmiles(smiles)
    molH = Chem.AddHs(mol)
    params = rdDistGeom.ETKDGv3()
    params.randomSeed = seed
    ids = rdDistGeom.EmbedMultipleConfs(molH, n, params)
    heavy = [a.GetIdx() for a in molH.GetAtoms() if a.GetAtomicNum() > 1]
    return mol, np.stack([molH.GetConformer(c).GetPositions()[heavy] for c in ids])


def random_rotation(seed: int) -> torch.Tensor:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return torch.tensor(q, dtype=torch.float32)


def with_conformer(mol: Chem.Mol, pos: np.ndarray) -> Chem.Mol:
    out = Chem.Mol(mol)
    conf = Chem.Conformer(mol.GetNumAtoms())
    for i, xyz in enumerate(np.asarray(pos, dtype=np.float64)):
        conf.SetAtomPosition(i, xyz.tolist())
    out.AddConformer(conf, assignId=True)
    return out


# -- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    dict(min_atoms=30, max_atoms=20),
    dict(test_molecules=50, max_molecules=50),
    dict(model="cartesian", diffusion_steps=1000, sample_steps=2000),
    dict(hidden=33),
    dict(schedule="cosine"),
    dict(model="equivariant"),
    dict(sigma_min=2.0, sigma_max=1.0),
    dict(train_epochs=0),
    dict(radius=0.0),
    dict(lr=0.0),
    dict(colour="blue"),
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        Config(**bad)


@pytest.mark.parametrize("scale, name, model", [("quick", "conformer", "torsion"), ("cpu", "conformer", "torsion"),
                                                ("cpu", "conformer-cartesian", "cartesian"),
                                                ("paper", "conformer-geom", "cartesian")])
def test_presets_validate(scale, name, model):
    from modelcollapse.reproduce import CONFIGS

    cfg = configlib.load(CONFIGS / scale / f"{name}.toml")
    assert cfg.family == "conformer" and isinstance(cfg.family_config, Config)
    assert cfg.family_config.model == model
    assert {p.name for p in cfg.policies} >= {"replace", "accumulate"}


# -- data -----------------------------------------------------------------------------------------------------
def test_smiles_loader_skips_bad_records_and_counts_them(tmp_path):
    path = tmp_path / "mixed.smi"
    path.write_text("CC(=O)Oc1ccccc1C(=O)O aspirin\nC1CC(( broken\n\nnot_a_smiles x\nCC(=O)Nc1ccc(O)cc1 paracetamol\n"
                    "Cn1cnc2c1c(=O)n(C)c(=O)n2C caffeine\n")
    records, bad = D.read_records(path, "smiles")
    assert [name for name, _ in records] == ["aspirin", "paracetamol", "caffeine"] and bad == 2
    data, left_out = D.load_molecules(source(path, min_rotatable_bonds=1), tmp_path / "cache")
    assert len(data.graphs) == 2 and len(data) == 4
    assert left_out == {"unparsable": 2, "fewer than 1 rotatable bond": 1}
    # the counts come back with a cache hit
    assert D.load_molecules(source(path, min_rotatable_bonds=1), tmp_path / "cache")[1] == left_out


def test_sdf_loader_skips_a_corrupt_record(tmp_path):
    blocks = [Chem.MolToMolBlock(Chem.MolFromSmiles(s)) + "$$$$\n" for s, _ in SMILES[:2]]
    broken = blocks[0].splitlines(keepends=True)
    broken[3] = "  9 99  0  0  0  0  0  0  0  0999 V2000\n"  # claims 99 bonds it does not have
    path = tmp_path / "three.sdf"
    path.write_text(blocks[0] + "".join(broken) + blocks[1])
    records, bad = D.read_records(path, "sdf")
    assert len(records) == 2 and bad == 1


@pytest.mark.parametrize("content, suffix, message", [
    ("C1CC(( x\nnope y\n", ".smi", "no usable molecule"),
    ("C methane\nCC ethane\n", ".smi", "no usable molecule"),  # parsable, but all below min_atoms
    ("", ".sdf", "no usable molecule"),
    ("CCO\n", ".csv", "unknown format"),
])
def test_no_usable_molecule_is_bad_input(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(BadInput, match=message):
        D.load_molecules(source(path), tmp_path / "cache")


def test_missing_data_file_is_bad_input(tmp_path):
    family = Family(Config(data=str(tmp_path / "nope.sdf")), device="cpu", cache_dir=tmp_path)
    with pytest.raises(BadInput, match="not found"):
        family.real_data("train", 0)


def test_unassigned_stereo_is_fixed_once_for_every_conformer(tmp_path):
    path = tmp_path / "racemic.smi"
    path.write_text("CC(C)Cc1ccc(cc1)C(C)C(=O)O ibuprofen\n")  # one stereocentre, unassigned
    data, _ = D.load_molecules(source(path, confs_per_mol=4), tmp_path / "cache")
    graph = data.graphs[0]
    assert "@" in graph.smiles
    assert all(chirality_kept(graph.mol, p) for p in data.pos)  # ETKDG drew every conformer as that isomer


def test_sdf_with_its_own_conformers(tmp_path):
    mol, pos = embedded("CC(=O)Nc1ccc(O)cc1", 2)
    path = tmp_path / "own.sdf"
    with Chem.SDWriter(str(path)) as w:
        for p in pos:
            w.write(with_conformer(mol, p))
    data, _ = D.load_molecules(source(path, conformers="file"), tmp_path / "cache")
    assert len(data) == 2
    for got, want in zip(data.pos, pos):
        np.testing.assert_allclose(got, want, atol=1e-3)  # MDL files keep 4 decimals


def test_geom_folder_fixture(tmp_path):
    """GEOM's rdkit_folder layout: summary_drugs.json + drugs/*.pickle, conformers with Boltzmann weights."""
    root = tmp_path / "rdkit_folder"
    (root / "drugs").mkdir(parents=True)
    summary, expected = {}, {}
    for k, (smiles, _) in enumerate(SMILES[:4]):
        mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
        rdDistGeom.EmbedMultipleConfs(mol, 4, randomSeed=k)
        weights = [0.1, 0.4, 0.2, 0.3]
        confs = []
        for c, w in zip(mol.GetConformers(), weights):
            one = Chem.Mol(mol, confId=c.GetId())
            one.RemoveAllConformers()
            one.AddConformer(Chem.Conformer(c), assignId=True)
            confs.append({"rd_mol": one, "boltzmannweight": w, "geom_id": 100 * k + c.GetId()})
        if k == 1:  # a conformer that "reacted": its heavy-atom graph differs, so it is dropped
            confs[1]["rd_mol"] = Chem.AddHs(Chem.MolFromSmiles("CCCCCCCCCCCCC"))
            rdDistGeom.EmbedMolecule(confs[1]["rd_mol"], randomSeed=1)
        with open(root / "drugs" / f"mol{k}.pickle", "wb") as f:
            pickle.dump({"conformers": confs, "smiles": smiles}, f)
        summary[smiles] = {"pickle_path": f"drugs/mol{k}.pickle", "uniqueconfs": 4}
        heavy = [a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() > 1]
        # the two valid conformers of highest Boltzmann weight: ids 1 and 3, or 3 and 2 where 1 reacted
        expected[smiles] = [mol.GetConformer(c).GetPositions()[heavy] for c in ((3, 2) if k == 1 else (1, 3))]
    summary["C1=CC=CN=C1"] = {"pickle_path": "drugs/missing.pickle"}  # listed, but the file is gone
    summary["no pickle"] = {"uniqueconfs": 0}  # GEOM lists some molecules it has no conformers for
    (root / "summary_drugs.json").write_text(json.dumps(summary))

    data, left_out = D.load_molecules(source(root / "drugs"), tmp_path / "cache")
    assert sorted(g.name for g in data.graphs) == sorted(s for s, _ in SMILES[:4])
    assert left_out == {"unreadable": 1, "conformers whose graph differs": 1}
    for graph, idx in zip(data.graphs, data.conformers_of()):
        got, want = [data.pos[i] for i in idx], expected[graph.name]
        assert len(got) == len(want) == 2
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-4)


def test_split_is_by_molecule_and_fixed(family):
    train, test = family.real_data("train", 0), family.real_data("test", 5)
    assert len(test.graphs) == TINY["test_molecules"]
    assert not {g.smiles for g in train.graphs} & {g.smiles for g in test.graphs}
    # the rigid molecules are left out under the torsion model, and counted
    assert len(train) + len(test) == (len(SMILES) - len(RIGID)) * TINY["confs_per_mol"]
    assert family.left_out == {"fewer than 1 rotatable bond": len(RIGID)}
    assert [g.smiles for g in family.real_data("test", 0).graphs] == [g.smiles for g in test.graphs]
    # a larger max_molecules keeps the test molecules (the order is a hash of the SMILES, not the file's)
    smaller = Family(family.config.model_copy(update=dict(max_molecules=8)), device="cpu", cache_dir=family.cache_dir)
    assert [g.smiles for g in smaller.real_data("test", 0).graphs] == [g.smiles for g in test.graphs]
    with pytest.raises(DataUnavailable):
        family.real_data("train", 0, draw=1)


def test_cache_hit_skips_embedding(smiles_file, tmp_path, monkeypatch):
    cfg = Config(data=str(smiles_file), max_molecules=6, **TINY)
    first = Family(cfg, device="cpu", cache_dir=tmp_path).molecules()
    assert len(list((tmp_path / "conformer").glob("*.npz"))) == 1

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded again despite the cache")

    monkeypatch.setattr(D, "embed", no_embedding)
    again = Family(cfg, device="cpu", cache_dir=tmp_path).molecules()
    assert [g.key for g in again.graphs] == [g.key for g in first.graphs]
    np.testing.assert_array_equal(np.concatenate(again.pos), np.concatenate(first.pos))
    fields = ("atoms", "pairs", "pair_type", "paths", "torsions", "sides", "heavy", "contact", "local")
    for a, b in zip(first.graphs, again.graphs):  # the run that embedded computes on what later runs read
        for name in fields:
            assert getattr(a, name).dtype == getattr(b, name).dtype, name
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    with pytest.raises(AssertionError, match="embedded again"):  # another setting is another cache entry
        Family(cfg.model_copy(update=dict(confs_per_mol=2)), device="cpu", cache_dir=tmp_path).molecules()


def test_the_run_that_embeds_reads_the_set_as_later_runs_do(tmp_path):
    """The cache stores graphs as mol blocks, which can list a bond the other way round: a torsion is then
    defined from its other end. The run that embeds must use what it stored, or it alone computes other numbers."""
    path = tmp_path / "one.smi"
    path.write_text("CCN(CC)[C@@H]1CCCC/C1=N\\O oxime\n")
    first, _ = D.load_molecules(source(path, min_rotatable_bonds=1), tmp_path / "cache")
    again, _ = D.load_molecules(source(path, min_rotatable_bonds=1), tmp_path / "cache")
    np.testing.assert_array_equal(first.graphs[0].torsions, again.graphs[0].torsions)
    np.testing.assert_array_equal(first.graphs[0].sides, again.graphs[0].sides)


def test_bundled_nci_molecules_load(tmp_path):
    data, _ = D.load_molecules(D.Source("nci", min_atoms=10, max_atoms=30, max_molecules=3, confs_per_mol=2,
                                        min_rotatable_bonds=2), tmp_path)
    assert len(data.graphs) == 3 and len(data) == 6
    assert all(10 <= g.n_atoms <= 30 and len(g.torsions) >= 2 for g in data.graphs)
    assert all(bonds_recovered(data.graphs[g].mol, p) for g, p in zip(data.graph_idx, data.pos))


def test_hydrogens_as_atoms(tmp_path):
    path = tmp_path / "one.smi"
    path.write_text("CC(=O)Nc1ccc(O)cc1 paracetamol\n")
    data, _ = D.load_molecules(source(path, hydrogens=True), tmp_path)
    graph = data.graphs[0]
    assert graph.n_atoms == 20 and len(graph.heavy) == 11 and data.pos[0].shape == (20, 3)
    assert bonds_recovered(graph.mol, data.pos[0])  # hydrogens sit where their bonds say


def test_concat_and_subsample_count_conformers(family):
    train = family.real_data("train", 0)
    both = family.concat([train, train])
    assert family.size(both) == 2 * len(train) and len(both.graphs) == len(train.graphs)
    sub = family.subsample(both, 5, seed=3)
    assert family.size(sub) == 5 and {g.key for g in sub.graphs} <= {g.key for g in train.graphs}
    assert all(len(p) == sub.graphs[g].n_atoms for g, p in zip(sub.graph_idx, sub.pos))


def test_selection_scores_prefer_sound_conformers(family):
    """rdkit_valid and bond_length_dev (issue 13): the real conformers are sound; the same ones with one heavy
    atom pulled 1 Å away along its bond are not, and an input's top-fraction keeps its sound candidate."""
    from modelcollapse.selection import SelectSpec, select

    train = family.real_data("train", 0)
    broken = [p.copy() for p in train.pos]
    for g, p in zip(train.graph_idx, broken):
        graph = train.graphs[g]
        bond = graph.heavy_mol.GetBondWithIdx(0)
        i, j = (int(graph.heavy[k]) for k in (bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()))
        p[j] += (p[j] - p[i]) / np.linalg.norm(p[j] - p[i])  # the bond 1 Å longer
    candidates = family.concat([train, D.ConformerSet(train.graphs, train.graph_idx, broken)])
    valid = family.score(candidates, "rdkit_valid", None, None, 0)
    dev = family.score(candidates, "bond_length_dev", None, None, 0)
    n = len(train)
    assert (valid[:n] == 1).all() and (valid[n:] == 0).all()
    assert dev[:n].min() > -0.05 and (dev[n:] < dev[:n]).all()
    for scores in (valid, dev):
        kept, _ = select(scores[None], n, SelectSpec(name="top-fraction", score="x", oversample=2), np.zeros(1, np.uint64), per_input=True)
        assert kept[0].tolist() == list(range(n))  # each conformer's real version, not its broken copy



def test_real_weight_weights_each_conformers_loss(family, fitted, tmp_path):
    """`real_weight` (issue 13): generated conformers are marked synthetic through sample, take, concat and a
    reopened sample; a weight over real data alone changes nothing; over real conformers and junk ones (an
    untrained model's), a heavier real weight fits the real conformers better."""
    train = family.real_data("train", 0)
    untrained = TorsionDiffusion(family.net_config())
    untrained.init_weights(torch.Generator().manual_seed(1))
    junk = family.sample(untrained, len(train), train, seed=5, workdir=tmp_path)
    assert train.is_real.all() and not family.load_sample(tmp_path).is_real.any()
    both = family.concat([train, junk, junk])
    assert both.is_real.tolist() == [True] * len(train) + [False] * 2 * len(train)
    assert family.take(both, np.array([len(train), 0])).is_real.tolist() == [False, True]
    alone = family.fit(train, seed=1, workdir=None, real_weight=0.3)  # nothing to weigh: the unweighted fit
    for k, v in fitted.state_dict().items():
        torch.testing.assert_close(alone.state_dict()[k], v, rtol=0, atol=0)
    loss = {w: family.test_loss(family.fit(both, seed=1, workdir=tmp_path / str(w), real_weight=w), train) for w in (0.1, 0.9)}
    assert loss[0.9] < loss[0.1] - 0.05, loss  # measured: 0.87 against 1.04
    record = json.loads((tmp_path / "0.9" / "train.json").read_text())
    assert record["real_conformers"] == len(train) and record["real_weight"] == 0.9



@pytest.mark.parametrize("which", ["torsion", "cartesian"])
def test_molecule_weights_scale_each_molecules_loss_terms(family, cartesian, which):
    """The loss with per-molecule weights w is Σ_m w_m · (the loss with molecule m's weight 1, the others' 0),
    and with every weight 1 the unweighted loss: each molecule's terms (torsions, atoms) carry its weight."""
    fam = family if which == "torsion" else cartesian
    data = fam.real_data("train", 0)
    idx = np.arange(5)
    batch = fam.batch([data.graphs[g] for g in data.graph_idx[idx]], [data.pos[i] for i in idx])
    model = TorsionDiffusion(fam.net_config()) if which == "torsion" else ConformerDiffusion(fam.net_config())
    model.init_weights(torch.Generator().manual_seed(0))
    for p in model.parameters():  # non-zero heads
        p.data.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def loss(w=None):
        g = torch.Generator().manual_seed(3)  # the same noise levels and noise every call
        return model(batch, generator=g, mol_weight=w)[1].item()

    w = torch.tensor([0.5, 2.0, 0.0, 1.5, 1.0])
    parts = [loss(torch.eye(5)[m]) for m in range(5)]
    assert min(parts) > 0
    assert loss(w) == pytest.approx(float(w @ torch.tensor(parts)), rel=1e-5)
    assert loss(torch.ones(5)) == pytest.approx(loss(), rel=1e-6)


# -- torsions -------------------------------------------------------------------------------------------------
def test_torsions_get_and_set_round_trip_on_a_real_molecule():
    mol, pos = embedded("CC(C)Cc1ccc([C@H](C)C(=O)O)cc1", 1)  # ibuprofen: 4 rotatable bonds
    graph = D.MolGraph.from_mol(mol, "ibuprofen")
    assert len(graph.torsions) == 4
    batch = D.make_torsion_batch([graph], [pos[0]])
    x = batch.base.pos.double()
    rd = with_conformer(mol, pos[0]).GetConformer()
    phi = dihedral(x, batch.torsions)
    np.testing.assert_allclose(phi, [rdMolTransforms.GetDihedralRad(rd, *map(int, q)) for q in graph.torsions],
                               atol=1e-5)
    target = torch.tensor([0.3, -2.0, 1.0, 3.0], dtype=torch.float64)
    turned = rotate_torsions(x, batch, target - phi)
    np.testing.assert_allclose(dihedral(turned, batch.torsions), target, atol=1e-9)
    # RDKit's SetDihedralRad, one torsion at a time, gives the same conformer
    for q, value in zip(graph.torsions, target.tolist()):
        rdMolTransforms.SetDihedralRad(rd, *map(int, q), value)
    torch.testing.assert_close(turned, torch.tensor(rd.GetPositions()), atol=1e-6, rtol=0)
    # bond lengths and angles are untouched, so the graph is intact
    i, j = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()]).T
    torch.testing.assert_close((turned[i] - turned[j]).norm(dim=-1), (x[i] - x[j]).norm(dim=-1))


def test_wrapped_normal_score_matches_a_numeric_derivative():
    x = torch.linspace(-3.1, 3.1, 13, dtype=torch.float64)
    for s in (0.05, 0.7, 3.0):
        def logp(v):
            return logsumexp(-((v + 2 * np.pi * np.arange(-10, 11)) ** 2) / (2 * s * s))
        numeric = [(logp(v + 1e-6) - logp(v - 1e-6)) / 2e-6 for v in x.numpy()]
        np.testing.assert_allclose(wrapped_normal_score(x, torch.full_like(x, s)), numeric, rtol=1e-5, atol=1e-6)
    # E[score²]: 1/σ² while the wrapping does not matter, towards 0 as the density nears uniform
    norms = score_norm(torch.tensor([0.05, 3.0]), TorsionConfig())
    assert norms[0] == pytest.approx(1 / 0.05**2, rel=1e-3) and norms[1] < 0.01


def test_the_torque_is_the_derivative_of_a_pair_energy():
    """score = Σ w_ij ∂d_ij/∂θ: for fixed weights, the torsion derivative of Σ w_ij d_ij."""
    mol, pos = embedded("CC(C)Cc1ccc([C@H](C)C(=O)O)cc1", 1)
    graph = D.MolGraph.from_mol(mol, "ibuprofen")
    batch = D.make_torsion_batch([graph], [pos[0]])
    x = batch.base.pos.double()
    i, j = batch.base.pairs
    w = torch.randn(len(i), dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def energy(delta):
        y = rotate_torsions(x, batch, delta)
        return (w * (y[i] - y[j]).norm(dim=-1)).sum()

    K = len(graph.torsions)
    numeric = torch.stack([(energy(1e-6 * e) - energy(-1e-6 * e)) / 2e-6 for e in torch.eye(K, dtype=torch.float64)])
    p, k, sign = batch.crossing
    m, f = torch.where(sign > 0, i[p], j[p]), torch.where(sign > 0, j[p], i[p])
    b, c = x[batch.torsions[k, 1]], x[batch.torsions[k, 2]]
    u = (c - b) / (c - b).norm(dim=-1, keepdim=True)
    dd = (u * torch.cross(x[f] - c, x[m] - c, dim=-1)).sum(-1) / (x[i] - x[j]).norm(dim=-1)[p]
    torque = torch.zeros(K, dtype=torch.float64).index_add_(0, k, w[p] * dd)
    torch.testing.assert_close(torque, numeric, atol=1e-6, rtol=1e-6)


def test_steric_guidance_is_the_derivative_of_its_penalty_and_removes_a_clash():
    mol, pos = embedded("CCCCCCCCCC", 1)  # decane: turning its torsions can fold the chain onto itself
    graph = D.MolGraph.from_mol(mol, "decane")
    batch = D.make_torsion_batch([graph], [pos[0]])
    x = batch.base.pos.double()
    i, j = batch.base.pairs  # every pair in both orders
    contact = batch.contact.double()

    def penalty(y):  # Σ over unordered pairs of the squared overlap
        d = (y[i] - y[j]).norm(dim=-1)
        return 0.5 * (((contact + STERIC_MARGIN - d).clamp(min=0) * (contact > 0)) ** 2).sum()

    g, K = torch.Generator().manual_seed(0), len(graph.torsions)
    folded = x
    while bonds_recovered(mol, folded.numpy()):  # random torsions until two atoms clash
        folded = rotate_torsions(x, batch, (torch.rand(K, generator=g, dtype=torch.float64) * 2 - 1) * math.pi)
    eye = torch.eye(K, dtype=torch.float64)
    numeric = torch.stack([(penalty(rotate_torsions(folded, batch, 1e-6 * e))
                            - penalty(rotate_torsions(folded, batch, -1e-6 * e))) / 2e-6 for e in eye])
    assert numeric.abs().max() > 0.1
    torch.testing.assert_close(steric_score(batch, folded), -numeric, atol=1e-5, rtol=1e-5)
    y = folded
    for _ in range(200):  # ascent on the guidance alone unfolds the chain
        y = rotate_torsions(y, batch, 0.05 * steric_score(batch, y))
    assert penalty(y) < 1e-6 and bonds_recovered(mol, y.numpy())


def test_torsion_score_is_rotation_invariant_and_flips_under_reflection(family):
    data = family.real_data("train", 0)
    idx = np.arange(5)
    batch = family.batch([data.graphs[g] for g in data.graph_idx[idx]], [data.pos[i] for i in idx])
    model = TorsionDiffusion(TorsionConfig(hidden=16, layers=2))
    model.init_weights(torch.Generator().manual_seed(0))
    for p in model.parameters():  # non-zero heads, so the test has something to see
        p.data.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sigma = torch.linspace(0.1, 2.0, batch.base.n_mols)
    score = model.score(batch, batch.base.pos, sigma)
    assert score.abs().max() > 1e-3
    R = random_rotation(3)
    torch.testing.assert_close(model.score(batch, batch.base.pos @ R.T + 4.0, sigma), score, atol=1e-4, rtol=1e-4)
    # a mirror image has every torsion negated; its score (a torque) changes sign only where the network's
    # inputs are reflection-invariant, so compare the torque part alone via zeroed Fourier coefficients
    torch.nn.init.zeros_(model.fourier[-1].weight)
    torch.nn.init.zeros_(model.fourier[-1].bias)
    torch.nn.init.zeros_(model.pair_torsion.weight)
    mirrored = batch.base.pos * torch.tensor([-1.0, 1.0, 1.0])
    torch.testing.assert_close(model.score(batch, mirrored, sigma), -model.score(batch, batch.base.pos, sigma),
                               atol=1e-4, rtol=1e-4)


# -- the Cartesian model --------------------------------------------------------------------------------------
def test_cartesian_denoiser_is_rotation_and_translation_equivariant(cartesian):
    data = cartesian.real_data("train", 0)
    idx = np.arange(6)
    batch = D.make_batch([data.graphs[g] for g in data.graph_idx[idx]], [data.pos[i] for i in idx])
    model = ConformerDiffusion(NetConfig(hidden=32, layers=3, radius=4.0, diffusion_steps=100))
    model.init_weights(torch.Generator().manual_seed(0))
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    R, shift = random_rotation(2), torch.tensor([5.0, -3.0, 11.0])
    for t in (3, 60):  # the global head joins only below global_sigma (0.5 Å), i.e. at small t
        eps = model.eps(batch, batch.pos, t)
        assert eps.abs().max() > 0.05
        torch.testing.assert_close(model.eps(batch, batch.pos @ R.T + shift, t), eps @ R.T, atol=1e-4, rtol=1e-4)
        # chain-rule sums over pairs: the prediction has zero net force on each molecule
        assert torch.zeros(batch.n_mols, 3).index_add_(0, batch.mol, eps).abs().max() < 1e-4
    g = torch.Generator().manual_seed(1)
    t, noise = torch.tensor([3, 20, 50, 70, 90, 99]), model.noise_like(batch, g)
    _, loss = model(batch, t, noise)
    moved = D.Batch(batch.atoms, batch.pos @ R.T + shift, batch.mol, batch.pairs, batch.pair_type, batch.n_mols)
    torch.testing.assert_close(model(moved, t, noise @ R.T)[1], loss, atol=1e-5, rtol=1e-5)


def test_geodiff_schedule():
    model = ConformerDiffusion(NetConfig())
    assert model.abar.shape == (5000,)
    # GeoDiff's get_beta_schedule("sigmoid", beta_start=1e-7, beta_end=2e-3, num_diffusion_timesteps=5000)
    betas = 1 / (1 + np.exp(-np.linspace(-6, 6, 5000))) * (2e-3 - 1e-7) + 1e-7
    np.testing.assert_allclose(model.abar, np.cumprod(1 - betas), rtol=1e-5)
    assert model.sigma[0].item() < 0.01 and model.sigma[-1].item() > 10  # Å


def test_cartesian_fit_lowers_test_loss_and_samples_every_step(cartesian, tmp_path):
    train, test = cartesian.real_data("train", 0), cartesian.real_data("test", 0)
    untrained = ConformerDiffusion(cartesian.net_config())
    untrained.init_weights(torch.Generator().manual_seed(1))
    assert cartesian.test_loss(untrained, train) == pytest.approx(1.0)  # zero predictions at init score 1
    model = cartesian.fit(train, seed=1, workdir=tmp_path)
    assert cartesian.test_loss(model, train) < 0.9
    every = Family(cartesian.config.model_copy(update=dict(sample_steps=100)), device="cpu",
                   cache_dir=cartesian.cache_dir)
    gen = every.generate(model, test.take(np.arange(2)), seed=0)
    assert all(np.isfinite(p).all() and p.shape == (test.graphs[test.graph_idx[k]].n_atoms, 3)
               for k, p in enumerate(gen.pos))


# -- fitting and sampling (torsion model) ---------------------------------------------------------------------
def test_fit_lowers_the_loss_and_writes_its_curve(family, fitted, tmp_path):
    # on the training molecules: seven molecules teach little about three others, but the fit must learn
    train = family.real_data("train", 0)
    untrained = TorsionDiffusion(family.net_config())
    untrained.init_weights(torch.Generator().manual_seed(1))
    assert family.test_loss(untrained, train) == pytest.approx(1.0)  # zero scores at init score exactly 1
    after = family.test_loss(fitted, train)
    assert after < 0.9
    assert family.test_loss(fitted, train) == after  # fixed noise: the same number every time
    assert len(fitted.loss_curve_) == TINY["train_steps"]


def test_train_epochs_grow_with_the_data(family, tmp_path):
    train = family.real_data("train", 0)
    by_epochs = Family(family.config.model_copy(update=dict(train_epochs=2.0)), device="cpu",
                       cache_dir=family.cache_dir)
    assert by_epochs.steps(len(train)) == math.ceil(2 * len(train) / TINY["batch_size"])
    assert by_epochs.steps(3 * len(train)) == math.ceil(6 * len(train) / TINY["batch_size"])
    assert family.steps(3 * len(train)) == family.steps(len(train)) == TINY["train_steps"]
    model = by_epochs.fit(train, seed=1, workdir=tmp_path)
    assert json.loads((tmp_path / "train.json").read_text())["steps"] == len(model.loss_curve_)


def test_fit_and_sample_are_deterministic_per_seed(family, fitted, tmp_path):
    train = family.real_data("train", 0)
    again = family.fit(train, seed=1, workdir=tmp_path)
    other = family.fit(train, seed=2, workdir=tmp_path)
    for k, v in fitted.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)
    assert any(not torch.equal(other.state_dict()[k], v) for k, v in fitted.state_dict().items())
    like = train.take(np.arange(4))
    a, b, c = (family.generate(fitted, like, s) for s in (7, 7, 8))
    np.testing.assert_array_equal(np.concatenate(a.pos), np.concatenate(b.pos))
    assert not np.allclose(np.concatenate(a.pos), np.concatenate(c.pos))


def test_sample_keeps_every_graph_and_round_trips(family, fitted, tmp_path):
    train = family.real_data("train", 0)
    synthetic = family.sample(fitted, 2 * len(train) + 1, train, seed=3, workdir=tmp_path)
    assert family.size(synthetic) == 2 * len(train) + 1
    # the real training graphs, every conformer's graph twice, then one more; only the coordinates are new
    keys = [synthetic.graphs[g].key for g in synthetic.graph_idx]
    assert keys[:-1] == [train.graphs[train.graph_idx[i % len(train)]].key for i in range(2 * len(train))]
    assert keys[-1] in {g.key for g in train.graphs}
    assert not np.allclose(synthetic.pos[0], train.pos[0])
    # the torsion model keeps bond lengths and angles: every conformer has its molecule's bonds
    for g, p in zip(synthetic.graph_idx, synthetic.pos):
        graph = synthetic.graphs[g]
        i, j = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in graph.mol.GetBonds()]).T
        np.testing.assert_allclose(np.linalg.norm(p[i] - p[j], axis=-1),
                                   np.linalg.norm(graph.local[i] - graph.local[j], axis=-1), atol=1e-4)
    assert (tmp_path / "synthetic.npz").exists() and (tmp_path / "synthetic.json").exists()
    back = family.load_sample(tmp_path)
    assert [back.graphs[g].key for g in back.graph_idx] == keys
    for g_back, g in zip(back.graphs, synthetic.graphs):
        np.testing.assert_array_equal(g_back.atoms, g.atoms)
        np.testing.assert_array_equal(g_back.torsions, g.torsions)
        np.testing.assert_array_equal(g_back.local, g.local)
    np.testing.assert_array_equal(np.concatenate(back.pos), np.concatenate(synthetic.pos))
    # synthetic and real conformers of one graph concatenate as one molecule
    assert len(family.concat([train, back]).graphs) == len(train.graphs)


def test_a_small_sample_draws_from_every_part_of_like(family, fitted, tmp_path):
    train = family.real_data("train", 0)
    half = family.sample(fitted, len(train) // 2, train, seed=5, workdir=tmp_path)
    assert family.size(half) == len(train) // 2
    # a random half of the conformers, not the first half (which would leave the last molecules out)
    first_half = {train.graphs[g].key for g in train.graph_idx[: len(train) // 2]}
    assert {g.key for g in half.graphs} - first_half


def test_a_selection_draws_its_candidates_for_the_conformers_sample_would_regenerate(family, fitted):
    """A selection for fewer conformers than the real set (mix, fresh) regenerates the same random subset of
    them as a plain sample, k candidates each, not the first ones; for more (replace-grown) every one and then
    the subset again."""
    from modelcollapse.selection import SelectSpec, synthesize

    train = family.real_data("train", 0)
    spec = SelectSpec(name="top-fraction", score="rdkit_valid", oversample=2)
    for size in (len(train) // 2, len(train) + 3):
        kept, metrics = synthesize(family, fitted, size, train, 5, 6, None, spec, fitted)
        plain = family.sample(fitted, size, train, seed=5, workdir=None)
        assert [kept.graphs[g].key for g in kept.graph_idx] == [plain.graphs[g].key for g in plain.graph_idx]
        assert metrics["select_kept_frac"] == 0.5 and not kept.is_real.any()


def test_corrupt_sample_files_are_bad_input(family, tmp_path):
    train = family.real_data("train", 0)
    D.save_set(tmp_path / "synthetic", train)
    assert len(family.load_sample(tmp_path)) == len(train)
    with np.load(tmp_path / "synthetic.npz") as z:
        arrays = dict(z)
    np.savez(tmp_path / "synthetic.npz", **dict(arrays, pos=arrays["pos"][:-1]))  # one atom short
    with pytest.raises(BadInput, match="does not match"):
        family.load_sample(tmp_path)
    (tmp_path / "synthetic.json").write_text("{}")
    with pytest.raises(BadInput, match="cannot read"):
        family.load_sample(tmp_path)


def test_save_and_load_model(family, fitted, cartesian, tmp_path):
    family.save_model(fitted, tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "model.json").exists()
    loaded = family.load_model(tmp_path)
    test = family.real_data("test", 0)
    assert family.test_loss(loaded, test) == family.test_loss(fitted, test)
    model = ConformerDiffusion(cartesian.net_config())
    cartesian.save_model(model, tmp_path / "c")
    assert isinstance(cartesian.load_model(tmp_path / "c"), ConformerDiffusion)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(BadInput, match="cannot load"):
        family.load_model(tmp_path)


# -- metrics --------------------------------------------------------------------------------------------------
def test_rmsd_matches_rdkit_get_best_rms():
    mol, pos = embedded("CC(C)Cc1ccc(cc1)C(C)C(=O)O", 3)  # ibuprofen: symmetric isopropyl and ring flips
    ours = rmsd_matrix(pos[:1], pos[1:], symmetries(mol))[0]
    for k in (1, 2):
        a, b = with_conformer(mol, pos[0]), with_conformer(mol, pos[k])
        assert ours[k - 1] == pytest.approx(rdMolAlign.GetBestRMS(b, a), abs=1e-4)
    assert symmetries(mol).shape[0] > 1


def test_rmsd_ignores_rotation_translation_and_symmetric_relabelling():
    mol, pos = embedded("CC(C)Cc1ccc(cc1)C(C)C(=O)O", 2)
    perms = symmetries(mol)
    R = random_rotation(5).numpy().astype(np.float64)
    moved = pos[1] @ R.T + np.array([3.0, 1.0, -8.0])
    relabelled = moved[np.argsort(perms[-1])]  # the same conformer with symmetric atoms swapped
    base = rmsd_matrix(pos[:1], pos[1:], perms)[0, 0]
    assert base > 0.05
    np.testing.assert_allclose(rmsd_matrix(pos[:1], np.stack([moved, relabelled]), perms)[0], [base, base], atol=1e-6)
    assert rmsd_matrix(pos[:1], pos[:1], perms)[0, 0] == pytest.approx(0.0, abs=1e-6)


def test_coverage_of_the_reference_against_itself(family):
    test = family.real_data("test", 0)
    m = conformer_metrics(test, test, threshold=1.25)
    assert m["cov_r"] == m["cov_p"] == m["cov_r_075"] == m["cov_p_075"] == 1.0
    assert m["mat_r"] == pytest.approx(0.0, abs=1e-3) and m["mat_p"] == pytest.approx(0.0, abs=1e-3)
    assert m["rdkit_valid_frac"] == 1.0 and m["spurious_bonds"] == m["missing_bonds"] == 0.0
    assert m["chirality_kept_frac"] == 1.0
    assert 0.0 <= m["bond_len_dev"] < 0.05  # ETKDG's bond lengths barely vary between conformers


def test_validity_of_etkdg_conformers_and_of_noised_ones():
    mols = [embedded(s, 4) for s, _ in SMILES]
    assert all(bonds_recovered(mol, p) for mol, pos in mols for p in pos)  # ETKDG's: every one valid
    noise = np.random.default_rng(0)
    noised = [bonds_recovered(mol, p + noise.normal(0.0, 0.3, p.shape)) for mol, pos in mols for p in pos]
    assert np.mean(noised) < 0.1  # 0.3 Å of noise per coordinate: few survive


def test_validity_catches_stretched_bonds_and_clashes():
    mol, pos = embedded("CC(=O)Nc1ccc(O)cc1", 1)
    assert bonds_recovered(mol, pos[0])
    stretched = pos[0].copy()
    stretched[0] += 3.0 * (pos[0][0] - pos[0][1]) / np.linalg.norm(pos[0][0] - pos[0][1])
    clash = pos[0].copy()
    clash[0] = clash[5] + 0.3  # atoms 0 and 5 are not bonded
    test = D.ConformerSet([D.MolGraph.from_mol(mol, "p")], np.zeros(1, dtype=np.int64), [pos[0]])
    for bad, (spurious, missing) in ((stretched, (0, 1)), (clash, (1, 1))):
        assert not bonds_recovered(mol, bad)
        m = conformer_metrics(test, D.ConformerSet(test.graphs, np.zeros(1, dtype=np.int64), [bad]), 1.25)
        assert m["rdkit_valid_frac"] == 0.0 and (m["spurious_bonds"], m["missing_bonds"]) >= (spurious, missing)


def test_chirality_of_a_molecule_and_its_mirror_image():
    mol, pos = embedded("C[C@H](N)C(=O)O", 2)  # L-alanine
    assert all(chirality_kept(mol, p) for p in pos)
    assert not any(chirality_kept(mol, p * np.array([-1.0, 1.0, 1.0])) for p in pos)
    flat, fpos = embedded("CC(=O)Nc1ccc(O)cc1", 1)  # no stereocentre: kept whatever the coordinates
    assert chirality_kept(flat, fpos[0] * np.array([-1.0, 1.0, 1.0]))


def test_evaluate_reports_metrics_and_writes_samples(family, fitted, tmp_path):
    test = family.real_data("test", 0)
    metrics = family.evaluate(fitted, test, seed=4, workdir=tmp_path)
    assert set(metrics) == {"test_loss", "cov_r", "mat_r", "cov_p", "mat_p", "cov_r_075", "cov_p_075", "bond_len_dev",
                            "rdkit_valid_frac", "spurious_bonds", "missing_bonds", "chirality_kept_frac"}
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["bond_len_dev"] < 0.05 and metrics["missing_bonds"] == 0.0  # bonds come from ETKDG
    assert metrics["chirality_kept_frac"] == 1.0  # turning torsions never inverts a stereocentre
    assert metrics["test_loss"] == family.test_loss(fitted, test)
    assert (tmp_path / "samples.png").stat().st_size > 1000
    records = [m for m in Chem.SDMolSupplier(str(tmp_path / "samples.sdf"))]
    assert len(records) == 2 * len(test) and all(m is not None and m.GetConformer().Is3D() for m in records)


def test_baselines_are_computed_once_and_drawn(family, monkeypatch):
    values = baselines(family.config, family.cache_dir)
    assert values["rdkit_valid_frac"]["ETKDG"] == 1.0 and values["rdkit_valid_frac"]["one conformer"] == 1.0
    assert values["mat_r"]["ETKDG"] < values["mat_r"]["one conformer"]
    assert set(values["cov_r_075"]) == {"ETKDG", "random torsions", "one conformer"}
    monkeypatch.setattr("modelcollapse.families.conformer.baseline_sets", None)  # a second call reads the cache
    assert baselines(family.config, family.cache_dir) == values

    from modelcollapse import report

    run = type("Run", (), {"family": "conformer", "config": {"conformer": family.config.model_dump()}})()
    monkeypatch.setattr("modelcollapse.families.common.cache_dir", lambda: family.cache_dir)
    fig, ax = plt.subplots()
    report.draw_baselines(ax, run, "cov_r_075")
    assert sorted(line.get_label() for line in ax.get_lines()) == ["ETKDG", "one conformer", "random torsions"]
    plt.close(fig)


# -- the loop and the command line ----------------------------------------------------------------------------
def test_tiny_run_through_the_loop(smiles_file, tmp_path):
    cfg = configlib.from_dict({
        "name": "conformer-tiny", "family": "conformer", "iterations": 2,
        "policies": ["replace", "accumulate", {"name": "mix", "real_fraction": 0.5, "real_weight": 0.8}],
        "seeds": 1, "device": "cpu",
        "conformer": dict(TINY, data=str(smiles_file), max_molecules=len(SMILES), train_steps=10),
    })
    out = run_experiment(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(out)
    losses = {(r["policy"], r["iteration"]): r["value"] for r in rows if r["metric"] == "test_loss"}
    assert set(losses) == {(p, n) for p in ("replace", "accumulate", "mix-0.5+w0.8") for n in (1, 2)}
    assert losses[("replace", 1)] == losses[("accumulate", 1)]  # generation 1 is one shared fit on real data
    gen = out / "replace" / "seed-0"
    assert (gen / "gen-1" / "synthetic.npz").exists() and (gen / "gen-2" / "samples.png").exists()
    assert (gen / "gen-2" / "model.safetensors").exists()
    fit = json.loads((gen / "gen-2" / "train.json").read_text())
    assert fit["data_left_out"] == {"fewer than 1 rotatable bond": len(RIGID)}  # counted in every generation
    weighted = json.loads((out / "mix-0.5+w0.8" / "seed-0" / "gen-2" / "train.json").read_text())
    assert weighted["real_weight"] == 0.8 and 0 < weighted["real_conformers"] < weighted["train_conformers"]


@pytest.mark.parametrize("case", ["rigid", "model", "no 3-D"])
def test_bad_input_through_the_cli(tmp_path, case):
    conformer = dict(TINY, max_molecules=4, test_molecules=1)
    if case == "rigid":
        (tmp_path / "rigid.smi").write_text("Cn1cnc2c1c(=O)n(C)c(=O)n2C caffeine\nCC1=CC(=O)c2ccccc2C1=O menadione\n")
        conformer["data"], want = str(tmp_path / "rigid.smi"), "rotatable bond"
    elif case == "model":
        conformer["model"], want = "equivariant", "model"
    else:
        with Chem.SDWriter(str(tmp_path / "flat.sdf")) as w:  # 2-D records, as from a drawing program
            for s, _ in SMILES[:3]:
                w.write(Chem.MolFromSmiles(s))
        conformer.update(data=str(tmp_path / "flat.sdf"), conformers="file")
        want = "no 3-D coordinates"
    lines = [f"{k} = {json.dumps(v)}" for k, v in conformer.items()]
    (tmp_path / "c.toml").write_text('name = "bad"\nfamily = "conformer"\npolicies = ["replace"]\niterations = 1\n'
                                     'seeds = 1\ndevice = "cpu"\n[conformer]\n' + "\n".join(lines) + "\n")
    result = cli("run", tmp_path / "c.toml", "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and want in result.stderr
    assert not (tmp_path / "out").exists()


# -- damaged caches and inputs (issue 12) ----------------------------------------------------------------------


@pytest.mark.parametrize("part", [".npz", ".json"])
def test_a_damaged_molecule_cache_is_rebuilt_with_one_line_of_warning(smiles_file, tmp_path, caplog, part):
    cfg = Config(data=str(smiles_file), max_molecules=6, **TINY)
    first = Family(cfg, device="cpu", cache_dir=tmp_path).molecules()
    (entry,) = (tmp_path / "conformer").glob(f"*{part}")
    entry.write_bytes(entry.read_bytes()[: len(entry.read_bytes()) // 2])
    caplog.set_level("WARNING", logger="modelcollapse")
    again = Family(cfg, device="cpu", cache_dir=tmp_path).molecules()
    assert [g.key for g in again.graphs] == [g.key for g in first.graphs]
    np.testing.assert_array_equal(np.concatenate(again.pos), np.concatenate(first.pos))
    warnings = [r.getMessage() for r in caplog.records if r.name == "modelcollapse"]
    assert len(warnings) == 1 and warnings[0].startswith("rebuilding the cache ") and "\n" not in warnings[0]


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_data_that_is_not_a_regular_file_is_refused_before_it_is_read(tmp_path, kind):
    import os

    from blocking import within

    path = "/dev/zero" if kind == "/dev/zero" else tmp_path / "drugs.smi"
    if kind == "fifo":
        os.mkfifo(path)
    fam = Family(Config(data=str(path), **TINY), device="cpu", cache_dir=tmp_path / "cache")
    with within(20), pytest.raises(BadInput, match=f"conformer data file is not a regular file: {path}"):
        fam.real_data("train", 0)
