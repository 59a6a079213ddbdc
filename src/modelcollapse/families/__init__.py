"""Model families: a model class together with its data.

A family lives in one module (or package) `modelcollapse.families.<name>`; the loop imports the module that
the config's `family` names and finds two names in it, as big_vision's `train.py` finds `Model` in
`models.<name>`:

- `Config`: a pydantic model (extra="forbid") for the config's `[<name>]` table. Every option of the family
  and its default lives here and is validated here, once; the rest of the family trusts what it gets.
- `Family`: built as `Family(config, device=..., cache_dir=...)`, with the methods of `FamilyProtocol` below.

Datasets are opaque to the loop and the policies: they only ask the family for `size`, `concat` and
`subsample`. Seeds come in with every call (scikit-learn's `random_state` habit), each derived by the loop
from (seed, policy, generation, purpose), so that a generation's result does not depend on the order in which
chains run or on whether the run was resumed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from modelcollapse.errors import BadInput

Data = Any
Model = Any


class DataUnavailable(BadInput):
    """The family cannot provide what was asked (e.g. fresh real data beyond what it ships)."""


class FamilyProtocol(Protocol):
    def real_data(self, split: str, seed: int, draw: int = 0) -> Data:
        """Real data: split "train" or "test". `draw` > 0 asks for the draw-th further, independent real
        training set (the `fresh` policy); raise DataUnavailable if the family has no more."""

    def size(self, data: Data) -> int:
        """How many examples `data` holds, in the unit the policies count (rows, documents, images)."""

    def concat(self, datasets: list[Data]) -> Data: ...

    def subsample(self, data: Data, size: int, seed: int) -> Data:
        """`size` examples drawn without replacement."""

    def fit(self, train: Data, seed: int, workdir: Path) -> Model:
        """A freshly initialised model fit on `train`. May checkpoint into `workdir` and resume from there."""

    def evaluate(self, model: Model, test: Data, seed: int, workdir: Path) -> dict[str, float]:
        """Named metrics on real held-out data; may write artefacts a reader opens (samples.png, samples.txt)."""

    def sample(self, model: Model, size: int, like: Data, seed: int, workdir: Path) -> Data:
        """`size` synthetic examples from `model`, written under `workdir`. `like` is the real training set,
        for families whose synthetic data keeps the real inputs (linreg keeps X, conformer keeps graphs)."""

    def load_sample(self, workdir: Path) -> Data:
        """Reopen what `sample` wrote in `workdir` (used when a run resumes)."""

    def save_model(self, model: Model, workdir: Path) -> None: ...

    def load_model(self, workdir: Path) -> Model: ...

