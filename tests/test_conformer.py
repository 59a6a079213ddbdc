"""The conformer family: loaders, split, cache, the equivariant denoiser, fitting, sampling, metrics, the loop."""

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from rdkit import Chem
from rdkit.Chem import rdDistGeom, rdMolAlign

from modelcollapse import config as configlib
from modelcollapse.errors import BadInput
from modelcollapse.families import DataUnavailable
from modelcollapse.families.conformer import Config, Family
from modelcollapse.families.conformer import data as D
from modelcollapse.families.conformer.metrics import bonds_recovered, conformer_metrics, rmsd_matrix, symmetries
from modelcollapse.families.conformer.model import ConformerDiffusion, NetConfig
from modelcollapse.loop import run_experiment
from modelcollapse.store import read_metrics

# small drug-like molecules (10-15 heavy atoms), quick to embed and to denoise
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
TINY = dict(min_atoms=8, max_atoms=16, confs_per_mol=3, test_molecules=3, hidden=16, layers=2, radius=4.0,
            diffusion_steps=100, train_steps=30, batch_size=8, lr=3e-3, sample_steps=10, eval_draws=2)



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


# -- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    dict(min_atoms=30, max_atoms=20),
    dict(test_molecules=50, max_molecules=50),
    dict(sample_steps=2000),
    dict(hidden=33),
    dict(schedule="cosine"),
    dict(radius=0.0),
    dict(lr=0.0),
    dict(colour="blue"),
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        Config(**bad)


@pytest.mark.parametrize("scale, name", [("quick", "conformer"), ("cpu", "conformer"), ("paper", "conformer-geom")])
def test_presets_validate(scale, name):
    from modelcollapse.reproduce import CONFIGS

    cfg = configlib.load(CONFIGS / scale / f"{name}.toml")
    assert cfg.family == "conformer" and isinstance(cfg.family_config, Config)
    assert {p.name for p in cfg.policies} >= {"replace", "accumulate"}


# -- data -----------------------------------------------------------------------------------------------------
def test_smiles_loader_skips_bad_records_and_counts_them(tmp_path, caplog):
    path = tmp_path / "mixed.smi"
    path.write_text("CC(=O)Oc1ccccc1C(=O)O aspirin\nC1CC(( broken\n\nnot_a_smiles x\nCC(=O)Nc1ccc(O)cc1 paracetamol\n")
    records, bad = D.read_records(path, "smiles")
    assert [name for name, _ in records] == ["aspirin", "paracetamol"] and bad == 2
    with caplog.at_level(logging.WARNING, logger="modelcollapse.conformer"):
        data = D.load_molecules(str(path), min_atoms=5, max_atoms=40, max_molecules=10, confs_per_mol=2,
                                embed_timeout=10, cache_dir=tmp_path / "cache")
    assert len(data.graphs) == 2 and len(data) == 4
    assert "2 unparsable" in caplog.text


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
        D.load_molecules(str(path), min_atoms=5, max_atoms=40, max_molecules=10, confs_per_mol=2, embed_timeout=10,
                         cache_dir=tmp_path / "cache")


def test_missing_data_file_is_bad_input(tmp_path):
    family = Family(Config(data=str(tmp_path / "nope.sdf")), device="cpu", cache_dir=tmp_path)
    with pytest.raises(BadInput, match="not found"):
        family.real_data("train", 0)


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

    data = D.load_molecules(str(root / "drugs"), min_atoms=5, max_atoms=40, max_molecules=10, confs_per_mol=2,
                            embed_timeout=10, cache_dir=tmp_path / "cache")
    assert sorted(g.name for g in data.graphs) == sorted(s for s, _ in SMILES[:4])
    for graph, idx in zip(data.graphs, data.conformers_of()):
        got, want = [data.pos[i] for i in idx], expected[graph.name]
        assert len(got) == len(want) == 2
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-4)


def test_split_is_by_molecule_and_fixed(family):
    train, test = family.real_data("train", 0), family.real_data("test", 5)
    assert len(test.graphs) == TINY["test_molecules"]
    assert not {g.smiles for g in train.graphs} & {g.smiles for g in test.graphs}
    assert len(train) + len(test) == len(SMILES) * TINY["confs_per_mol"]
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
    with pytest.raises(AssertionError, match="embedded again"):  # another setting is another cache entry
        Family(cfg.model_copy(update=dict(confs_per_mol=2)), device="cpu", cache_dir=tmp_path).molecules()


def test_bundled_egfr_ligands_load(tmp_path):
    data = D.load_molecules("egfr", min_atoms=10, max_atoms=40, max_molecules=3, confs_per_mol=2, embed_timeout=10,
                            cache_dir=tmp_path)
    assert len(data.graphs) == 3 and len(data) == 6
    assert all(17 <= g.n_atoms <= 32 for g in data.graphs)
    assert all(bonds_recovered(data.graphs[g].mol, p) for g, p in zip(data.graph_idx, data.pos))


def test_concat_and_subsample_count_conformers(family):
    train = family.real_data("train", 0)
    both = family.concat([train, train])
    assert family.size(both) == 2 * len(train) and len(both.graphs) == len(train.graphs)
    sub = family.subsample(both, 5, seed=3)
    assert family.size(sub) == 5 and {g.key for g in sub.graphs} <= {g.key for g in train.graphs}
    assert all(len(p) == sub.graphs[g].n_atoms for g, p in zip(sub.graph_idx, sub.pos))


# -- the denoiser ---------------------------------------------------------------------------------------------
def test_denoiser_is_rotation_and_translation_equivariant(family):
    data = family.real_data("train", 0)
    idx = np.arange(6)
    batch = D.make_batch([data.graphs[g] for g in data.graph_idx[idx]], [data.pos[i] for i in idx])
    model = ConformerDiffusion(NetConfig(hidden=32, layers=3, radius=4.0, diffusion_steps=100))
    model.init_weights(torch.Generator().manual_seed(0))
    for p in model.parameters():  # larger coordinate updates than at init, so the test has something to see
        p.data.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([3, 20, 50, 70, 90, 99])
    noise = model.noise_like(batch, g)
    eps, loss = model(batch, t, noise)
    R, shift = random_rotation(2), torch.tensor([5.0, -3.0, 11.0])
    moved = D.Batch(batch.atoms, batch.pos @ R.T + shift, batch.mol, batch.pairs, batch.pair_type, batch.n_mols)
    eps_moved, loss_moved = model(moved, t, noise @ R.T)
    assert eps.abs().max() > 0.05  # not trivially zero
    torch.testing.assert_close(eps_moved, eps @ R.T, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss_moved, loss, atol=1e-6, rtol=1e-5)
    # the prediction lives in the zero-centre-of-mass subspace, like the noise
    means = torch.zeros(batch.n_mols, 3).index_add_(0, batch.mol, eps)
    assert means.abs().max() < 1e-4


def test_fit_lowers_test_loss_and_writes_its_curve(family, fitted, tmp_path):
    test = family.real_data("test", 0)
    untrained = ConformerDiffusion(family.net_config())
    untrained.init_weights(torch.Generator().manual_seed(1))
    before, after = family.test_loss(untrained, test), family.test_loss(fitted, test)
    assert after < 0.8 * before
    assert family.test_loss(fitted, test) == after  # fixed noise: the same number every time
    assert len(fitted.loss_curve_) == TINY["train_steps"]


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


def test_sample_keeps_graphs_and_round_trips(family, fitted, tmp_path):
    train = family.real_data("train", 0)
    synthetic = family.sample(fitted, 2 * len(train) + 1, train, seed=3, workdir=tmp_path)
    assert family.size(synthetic) == 2 * len(train) + 1
    # the real training graphs, every conformer's graph twice, then one more; only the coordinates are new
    keys = [synthetic.graphs[g].key for g in synthetic.graph_idx]
    assert keys[:-1] == [train.graphs[train.graph_idx[i % len(train)]].key for i in range(2 * len(train))]
    assert keys[-1] in {g.key for g in train.graphs}
    assert not np.allclose(synthetic.pos[0], train.pos[0])
    assert (tmp_path / "synthetic.npz").exists() and (tmp_path / "synthetic.json").exists()
    back = family.load_sample(tmp_path)
    assert [back.graphs[g].key for g in back.graph_idx] == keys
    for g_back, g in zip(back.graphs, synthetic.graphs):
        np.testing.assert_array_equal(g_back.atoms, g.atoms)
        np.testing.assert_array_equal(g_back.pair_type, g.pair_type)
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


def test_save_and_load_model(family, fitted, tmp_path):
    family.save_model(fitted, tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "model.json").exists()
    loaded = family.load_model(tmp_path)
    test = family.real_data("test", 0)
    assert family.test_loss(loaded, test) == family.test_loss(fitted, test)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(BadInput, match="cannot load"):
        family.load_model(tmp_path)


# -- metrics --------------------------------------------------------------------------------------------------
def test_rmsd_matches_rdkit_get_best_rms():
    mol, pos = embedded("CC(C)Cc1ccc(cc1)C(C)C(=O)O", 3)  # ibuprofen: symmetric isopropyl and ring flips
    ours = rmsd_matrix(pos[:1], pos[1:], symmetries(mol))[0]
    for k in (1, 2):
        a, b = Chem.Mol(mol), Chem.Mol(mol)
        for m, p in ((a, pos[0]), (b, pos[k])):
            conf = Chem.Conformer(mol.GetNumAtoms())
            for i, xyz in enumerate(p):
                conf.SetAtomPosition(i, xyz.tolist())
            m.AddConformer(conf)
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
    assert m["cov_r"] == 1.0 and m["cov_p"] == 1.0
    assert m["mat_r"] == pytest.approx(0.0, abs=1e-3) and m["mat_p"] == pytest.approx(0.0, abs=1e-3)
    assert m["rdkit_valid_frac"] == 1.0
    assert 0.0 <= m["bond_len_dev"] < 0.05  # ETKDG's bond lengths barely vary between conformers


def test_validity_catches_stretched_bonds_and_clashes():
    mol, pos = embedded("CC(=O)Nc1ccc(O)cc1", 1)
    assert bonds_recovered(mol, pos[0])
    stretched = pos[0].copy()
    stretched[0] += 3.0 * (pos[0][0] - pos[0][1]) / np.linalg.norm(pos[0][0] - pos[0][1])
    assert not bonds_recovered(mol, stretched)
    clash = pos[0].copy()
    clash[0] = clash[5] + 0.3  # atoms 0 and 5 are not bonded
    assert not bonds_recovered(mol, clash)


def test_evaluate_reports_metrics_and_writes_samples(family, fitted, tmp_path):
    test = family.real_data("test", 0)
    metrics = family.evaluate(fitted, test, seed=4, workdir=tmp_path)
    assert set(metrics) == {"test_loss", "cov_r", "mat_r", "cov_p", "mat_p", "bond_len_dev", "rdkit_valid_frac"}
    assert all(np.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["cov_r"] <= 1.0 and metrics["mat_r"] > 0.0
    assert metrics["test_loss"] == family.test_loss(fitted, test)
    assert (tmp_path / "samples.png").stat().st_size > 1000
    records = [m for m in Chem.SDMolSupplier(str(tmp_path / "samples.sdf"))]
    assert len(records) == 2 * len(test) and all(m is not None for m in records)


# -- the loop -------------------------------------------------------------------------------------------------
def test_tiny_run_through_the_loop(smiles_file, tmp_path):
    cfg = configlib.from_dict({
        "name": "conformer-tiny", "family": "conformer", "policies": ["replace", "accumulate"], "iterations": 2,
        "seeds": 1, "device": "cpu",
        "conformer": dict(TINY, data=str(smiles_file), max_molecules=len(SMILES), train_steps=10),
    })
    out = run_experiment(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(out)
    losses = {(r["policy"], r["iteration"]): r["value"] for r in rows if r["metric"] == "test_loss"}
    assert set(losses) == {(p, n) for p in ("replace", "accumulate") for n in (1, 2)}
    assert losses[("replace", 1)] == losses[("accumulate", 1)]  # generation 1 is one shared fit on real data
    gen = out / "replace" / "seed-0"
    assert (gen / "gen-1" / "synthetic.npz").exists() and (gen / "gen-2" / "samples.png").exists()
    assert (gen / "gen-2" / "model.safetensors").exists()


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
