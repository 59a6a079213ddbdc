"""Causal language models pretrained from scratch on TinyStories: the paper's §2.1 (Table 2).

Generation 1 trains a fresh GPT-2- or Llama-2-shaped transformer (model.py) for one epoch on real stories;
each later generation trains a fresh one on stories sampled from the previous model (temperature 1.0, or 0.3
in the ablation), as the policy says. The metric is `test_ce`, nats per token on real held-out stories.

- Data (data.py): the TinyStories excerpt shipped in the package by default, the full dataset through
  Hugging Face `datasets`, or local .txt/.jsonl/.parquet files. The split is fixed (it does not depend on the
  seed), so every seed and generation is measured on the same test tokens.
- Tokenizer: a byte-level BPE with BOS/EOS, fit once on the real training stories and shared by every
  generation and seed (cached in cache_dir by the stories' content hash).
- Datasets (shards.py) are token shards on disk; `size` counts tokens (BOS and EOS included), so a synthetic
  set "the size of the real one" holds as many tokens as the real training set.
- Each generation's folder holds model.safetensors + model.json + tokenizer.json (the model), samples.txt and
  samples.json (20 stories sampled by evaluate), and sample/ (the synthetic set for the next generation).
- Data-parallel: under torchrun or `--nproc N` each generation trains with DistributedDataParallel and its
  synthetic set is sampled in shards across the ranks (train.py); the diversity samples are rank 0's.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modelcollapse import distributed, paths
from modelcollapse.errors import BadInput
from modelcollapse.families import DataUnavailable, common
from modelcollapse.families.lm import data as text
from modelcollapse.families.lm import train as loops
from modelcollapse.families.lm.shards import TokenSet, shard_exists, token_dtype, verify, write_shard
from modelcollapse.store import atomic_write_bytes, atomic_write_json

PRIMARY_METRIC = "test_ce"
SAVED_SAMPLES = 20


class Config(BaseModel):
    """The `[lm]` table. Defaults are a CPU-sized run on the shipped stories."""

    model_config = ConfigDict(extra="forbid")
    # data
    data: str = Field("shipped", min_length=1, description='"shipped", "hf:roneneldan/TinyStories", or a local .txt/.jsonl/.parquet file or folder')
    test_data: str | None = Field(None, min_length=1, description="a separate test source (hf: or path); default: the source's own test split")
    holdout: float = Field(0.05, gt=0.0, lt=1.0, description="share of stories held out for test when the source has no test split")
    max_train_stories: int | None = Field(None, ge=1, description="use only the first N real training stories (None: all)")
    test_stories: int | None = Field(None, ge=1, description="use only the first N test stories (None: all)")
    tokenizer_stories: int | None = Field(200_000, ge=1, description="fit the BPE on the first N training stories (None: all)")
    vocab_size: int = Field(4096, ge=258, le=2**20, description="BPE vocabulary size, BOS and EOS included")
    # model
    model: str = Field("llama2-cpu", description="a shape preset of model.py: gpt2-9m, llama2-12m, llama2-42m, llama2-126m, ...")
    n_layer: int | None = Field(None, ge=1, description="override the preset's layer count")
    n_head: int | None = Field(None, ge=1, description="override the preset's head count")
    n_embd: int | None = Field(None, ge=8, description="override the preset's width")
    ffn_hidden: int | None = Field(None, ge=1, description="override the preset's MLP hidden width")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout (one epoch of pretraining needs none)")
    block_size: int = Field(256, ge=8, le=8192, description="context length in tokens")
    # training
    batch_size: int = Field(32, ge=1, description="sequences per optimizer step (also the evaluation batch)")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="peak learning rate of AdamW")
    warmup_frac: float = Field(0.02, ge=0.0, le=0.5, description="share of the steps spent in linear warm-up")
    min_lr_frac: float = Field(0.1, ge=0.0, le=1.0, description="cosine decay ends at this fraction of lr")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay on matrices")
    grad_clip: float = Field(1.0, ge=0.0, description="clip the gradient norm to this (0: no clipping)")
    epochs: int = Field(1, ge=1, description="passes over each generation's training set (the paper: 1)")
    checkpoint_every: int = Field(1000, ge=1, description="steps between mid-training checkpoints")
    compile: bool = Field(False, description="torch.compile the model for training and the decoding step for sampling")
    # sampling and evaluation
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="sampling temperature (the paper: 1.0, or 0.3)")
    top_k: int | None = Field(None, ge=1, description="sample from the k most likely tokens only (None: all)")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling mass (None: the full distribution)")
    max_sample_len: int = Field(256, ge=2, description="longest sampled document in tokens, BOS included")
    sample_batch: int = Field(64, ge=1, description="documents sampled together")
    shard_tokens: int = Field(2**22, ge=256, description="tokens per synthetic shard (the unit a resumed sampling keeps)")
    eval_samples: int = Field(100, ge=SAVED_SAMPLES, description="stories sampled by evaluate for the diversity metrics")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v):
        from modelcollapse.families.lm.model import PRESETS

        if v not in PRESETS:
            raise ValueError(f"unknown model preset; choose one of {', '.join(PRESETS)}")
        return v

    @field_validator("data", "test_data")
    @classmethod
    def _source(cls, v):
        if v is not None and v.startswith("hf:") and len(v) == 3:
            raise ValueError('"hf:" needs a dataset name, e.g. "hf:roneneldan/TinyStories"')
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.data == "shipped" and self.test_data is not None:
            raise ValueError("test_data cannot be used with data = \"shipped\", which has its own test split")
        if self.max_sample_len > self.block_size:
            raise ValueError(f"max_sample_len ({self.max_sample_len}) cannot exceed block_size ({self.block_size})")
        if self.top_k is not None and self.top_k > self.vocab_size:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed vocab_size ({self.vocab_size})")
        from modelcollapse.families.lm.model import lm_config

        lm_config(self.model, self.vocab_size, self.block_size, **self.shape_overrides())  # ValueError on a bad shape
        return self

    def shape_overrides(self) -> dict:
        """The model fields set here, to apply over the preset's shape."""
        fields = ("n_layer", "n_head", "n_embd", "ffn_hidden")
        return {k: getattr(self, k) for k in fields if getattr(self, k) is not None} | {"dropout": self.dropout}


def check_data_parallel(config: Config, world: int) -> None:
    """Data-parallel training splits each batch of `batch_size` sequences evenly over the `world` ranks."""
    if config.batch_size % world:
        raise BadInput(f"The 'batch_size' parameter of lm must be a multiple of the number of processes ({world}), "
                       f"so that every rank takes an equal share of each batch. Got {config.batch_size} instead.")


class Family:
    """The `lm` family (see the module docstring). Fitted state: `tokenizer_`, `bos_`, `eos_`."""

    def __init__(self, config: Config, *, device: str = "cpu", cache_dir: Path | None = None):
        self.config = config
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else common.cache_dir()
        self._stories: list[str] | None = None  # the deduplicated real training stories, every draw's
        self._sets: dict[str, TokenSet] = {}

    # -- real data ---------------------------------------------------------------------------------------
    def _ready(self) -> None:
        if self._stories is None:
            self._prepare()

    def _prepare(self) -> None:
        """Read, split and deduplicate the stories, fit the tokenizer, write the real shards (all cached)."""
        c = self.config
        train, test = text.load_stories(c.data, c.test_data, c.holdout)
        test = test[: c.test_stories]
        train = text.dedup(train, test)
        if not train or not test:
            raise BadInput(f"data {c.data!r} gave {len(train)} training and {len(test)} test stories; both must be non-empty")
        self._stories = train
        first = self._draw_stories(0)
        self.tokenizer_, self.tokenizer_path_ = text.train_tokenizer(first[: c.tokenizer_stories], c.vocab_size, self.cache_dir)
        self.bos_, self.eos_ = self.tokenizer_.token_to_id(text.BOS), self.tokenizer_.token_to_id(text.EOS)
        self._sets["test"] = self._tokenize(test)
        self._sets["train-0"] = self._tokenize(first)

    def _draw_stories(self, draw: int) -> list[str]:
        n = self.config.max_train_stories
        if n is None:
            if draw:
                raise DataUnavailable("lm: every real training story is in the first draw; set max_train_stories to leave some for fresh draws")
            return self._stories
        chunk = self._stories[draw * n : (draw + 1) * n]
        if draw and len(chunk) < n:
            raise DataUnavailable(f"lm: real training draw {draw} needs {n} stories; only {len(self._stories)} exist")
        return chunk

    def _tokenize(self, stories: list[str]) -> TokenSet:
        """The stories as one shard `BOS text EOS` per story, cached by content and tokenizer (and written
        again when the cached one is damaged)."""
        stem = self.cache_dir / "lm" / "shards" / text.digest(stories, self.tokenizer_path_.name)
        if shard_exists(stem):
            try:
                return verify(TokenSet.open([stem]), self.config.vocab_size)
            except BadInput as e:
                paths.rebuilding(stem, e)
        write_shard(stem, self._encode(stories), token_dtype(self.config.vocab_size))
        return TokenSet.open([stem])

    def _encode(self, stories: list[str]):
        for i in range(0, len(stories), 10_000):
            for enc in self.tokenizer_.encode_batch(stories[i : i + 10_000]):
                yield np.asarray([self.bos_, *enc.ids, self.eos_], dtype=np.int64)

    def real_data(self, split: str, seed: int, draw: int = 0) -> TokenSet:
        """The real train or test tokens. The split is fixed: `seed` does not change it. Draw k >= 1 is the
        next `max_train_stories` stories after draw k - 1's."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        self._ready()
        key = "test" if split == "test" else f"train-{draw}"
        if key not in self._sets:
            self._sets[key] = self._tokenize(self._draw_stories(draw))
        return self._sets[key]

    def size(self, data: TokenSet) -> int:
        return data.n_tokens

    def concat(self, datasets: list[TokenSet]) -> TokenSet:
        return TokenSet.concat(datasets)

    def subsample(self, data: TokenSet, size: int, seed: int) -> TokenSet:
        return data.subsample(size, seed)

    # -- the model ---------------------------------------------------------------------------------------
    def fit(self, train: TokenSet, seed: int, workdir: Path):
        self._ready()
        return loops.fit(self.config, train, self.config.vocab_size, self.bos_, seed, Path(workdir), self.device)

    def evaluate(self, model, test: TokenSet, seed: int, workdir: Path) -> dict[str, float]:
        self._ready()
        metrics = {PRIMARY_METRIC: loops.test_ce(model, test, self.config, self.bos_, self.device)}
        if distributed.is_writer():  # a few stories: rank 0 samples them, writes them and tells the others
            docs = loops.eval_samples(model, self.config, self.bos_, self.eos_, seed, self.device)
            metrics.update(loops.diversity(docs, self.bos_, self.eos_))
            self._write_samples(docs[:SAVED_SAMPLES], Path(workdir))
        return distributed.broadcast(metrics)

    def _write_samples(self, docs: list[np.ndarray], workdir: Path) -> None:
        rows = [
            dict(text=self.tokenizer_.decode([int(t) for t in d if t not in (self.bos_, self.eos_)]), tokens=len(d) - 1, eos=bool(d[-1] == self.eos_))
            for d in docs
        ]
        atomic_write_json(workdir / "samples.json", rows)
        body = "".join(f"{r['text']}\n{text.SEPARATOR if r['eos'] else '[cut at max_sample_len]'}\n" for r in rows)
        atomic_write_bytes(workdir / "samples.txt", body.encode())

    def sample(self, model, size: int, like: TokenSet, seed: int, workdir: Path) -> TokenSet:
        self._ready()
        c = self.config
        return loops.sample_shards(model, size, c, c.vocab_size, self.bos_, self.eos_, seed, Path(workdir) / "sample", self.device)

    def load_sample(self, workdir: Path) -> TokenSet:
        return verify(loops.load_shards(Path(workdir) / "sample"), self.config.vocab_size)

    def save_model(self, model, workdir: Path) -> None:
        """model.safetensors, model.json (the shape, to rebuild it) and the tokenizer beside them."""
        workdir = Path(workdir)
        common.save_module(model, workdir / "model.safetensors")
        atomic_write_json(workdir / "model.json", dict(config=dataclasses.asdict(model.config), tokenizer="tokenizer.json"))
        self._ready()
        shutil.copyfile(self.tokenizer_path_, workdir / "tokenizer.json")
        if distributed.is_writer():
            (workdir / loops.CHECKPOINT).unlink(missing_ok=True)  # the saved model supersedes the fit's checkpoint

    def load_model(self, workdir: Path):
        from modelcollapse.families.lm.model import LM, LMConfig

        workdir = Path(workdir)
        try:
            shape = LMConfig(**json.loads((workdir / "model.json").read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInput(f"cannot read the model config {workdir / 'model.json'}: {e}") from None
        return common.load_module(LM(shape), workdir / "model.safetensors").to(self.device).eval()


def export(gen_dir: Path, out_dir: Path) -> Path:
    """Write generation `gen_dir`'s model as a Hugging Face transformers directory (GPT2LMHeadModel or
    LlamaForCausalLM, with its tokenizer as a PreTrainedTokenizerFast) that `from_pretrained` loads."""
    from transformers import PreTrainedTokenizerFast

    from modelcollapse.families.lm.export import export_hf

    gen_dir = Path(gen_dir)
    for name in ("model.safetensors", "model.json", "tokenizer.json"):  # all there before anything is written
        if not (gen_dir / name).is_file():
            raise BadInput(f"{gen_dir} holds no {name}; give a finished gen-<n> folder of an lm run")
    model = Family(Config.model_construct(), device="cpu").load_model(gen_dir)
    out = export_hf(model, out_dir, bos_id=0, eos_id=1)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(gen_dir / "tokenizer.json"), bos_token=text.BOS, eos_token=text.EOS)
    tokenizer.save_pretrained(out)
    return out

