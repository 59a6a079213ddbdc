"""Causal language models on TinyStories: pretrained from scratch as in the paper's §2.1 (Table 2), or
fine-tuned from a pretrained base as most follow-up work does (Shumailov et al. 2024; Bertrand et al. 2024).

Generation 1 trains a model for one epoch on real stories; each later generation trains one on stories sampled
from the previous model (temperature 1.0, or 0.3 in the ablation), as the policy says. Where each generation
starts is `init`: "scratch" (a fresh GPT-2- or Llama-2-shaped transformer, model.py: the paper), "base" (the
same pretrained `base` every generation: Shumailov et al.) or "previous" (the previous generation's weights:
iterative fine-tuning; generation 1 starts from `base`, or from scratch without one). The metric is
`test_ce`, nats per token on real held-out stories, beside the text-collapse metrics (metrics.py) and
`sample_ppl`: each sampled story's perplexity under the generation-1 model (or the base).

- Data (data.py): the TinyStories excerpt shipped in the package by default, the full dataset through
  Hugging Face `datasets`, or local .txt/.jsonl/.parquet files. The split is fixed (it does not depend on the
  seed), so every seed and generation is measured on the same test tokens. `skip_train_stories` leaves out
  the first training stories (those a base was pretrained on), so base and fine-tuning data are disjoint.
- Tokenizer: a byte-level BPE with BOS/EOS, fit once on the real training stories and shared by every
  generation and seed (cached in cache_dir by the stories' content hash) — or, with a `base`, the base's own.
- A base (hf.py) is a local Hugging Face causal-LM folder (GPT-2 and Llama imported into our model; any other
  architecture run through transformers) or a gen-<n> folder of an earlier lm run. Nothing is downloaded.
- Datasets (shards.py) are token shards on disk; `size` counts tokens (BOS and EOS included), so a synthetic
  set "the size of the real one" holds as many tokens as the real training set. With `prompt_tokens` P, each
  synthetic story continues the first P tokens of a real training story: the prompt is real and not trained
  on, the continuation is the synthetic text.
- Each generation's folder holds model.json (what the model is: its shape, tokens, and the folder of the
  model its samples' perplexity is measured under) with model.safetensors (ours), hf/ (a model run through
  transformers) or adapter/ (LoRA adapters, lora.py), tokenizer.json, samples.txt and samples.json (20
  stories sampled by evaluate), sample_ppl.npy (every evaluated story's perplexity), and sample/ (the
  synthetic set for the next generation).
- Selection and weighting (selection.py): SCORES are `perplexity` (under generation 1's model, the base or a
  saved generation: `select_model`) and `length`; a selection keeps whole stories (`take`, `example_sizes`)
  up to the synthetic size in tokens. `real_weight` weights each predicted token's loss (train.fit), so the
  real stories carry that share of it.
- Data-parallel: under torchrun or `--nproc N` each generation trains with DistributedDataParallel and its
  synthetic set is sampled in shards across the ranks (train.py); the diversity samples are rank 0's.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from modelcollapse import distributed, paths
from modelcollapse.errors import BadInput
from modelcollapse.families import DataUnavailable, common
from modelcollapse.families.lm import data as text
from modelcollapse.families.lm import train as loops
from modelcollapse.families.lm import figures
from modelcollapse.families.lm.hf import Base, HFModel, Vocab
from modelcollapse.families.lm.shards import CHUNK_DOCS, TokenSet, shard_exists, verify, write_shard
from modelcollapse.store import atomic_write_bytes, atomic_write_json

PRIMARY_METRIC = "test_ce"
report_figures = figures.report_figures  # the report's hook
CLAIM = ("The paper's §2.1: a causal transformer pretrained from scratch each iteration on stories its predecessor "
         "sampled. Under replace its cross-entropy on real held-out stories rises every iteration; under "
         "accumulate it stays at or below iteration 1's.")
METRICS = {
    "test_ce": ("mean cross-entropy on real held-out stories (log of the vocabulary size is a uniform guess)", "nats/token", "lower"),
    "distinct_tokens": ("distinct token ids in the stories sampled for evaluation", "tokens", "higher"),
    "distinct_*": ("distinct n-grams / all n-grams in the stories sampled for evaluation (n = 1, 2, 3)", "", "higher"),
    "sample_tokens": ("mean length of a sampled story", "tokens", "the real stories' length"),
    "sample_eos": ("share of sampled stories that ended by EOS, not by the length limit", "", "higher"),
    "sample_ppl": ("mean perplexity of the sampled stories under generation 1's model (or the base)", "", "the real stories' (collapse moves it: down in Shumailov et al., up in the CPU fine-tuning study here)"),
    "sample_ppl_p10": ("10th percentile of the sampled stories' perplexity (see sample_ppl)", "", ""),
    "sample_ppl_p90": ("90th percentile of the sampled stories' perplexity (see sample_ppl)", "", ""),
    "self_bleu": ("mean BLEU-4 of each sampled story against the others (Self-BLEU): how much they repeat each other", "", "lower"),
    "ttr": ("type-token ratio: distinct words / words over the sampled stories", "", "higher"),
    "unigram_entropy": ("entropy of the sampled stories' word frequencies", "nats", "higher"),
    "unigram_kl": ("KL(sampled ‖ real) of word frequencies", "nats", "lower"),
    "zipf_exponent": ("s of a Zipf fit f(r) ∝ r^(−s) to the sampled stories' word counts", "", "the real text's"),
    "rare_word_recall": ("share of the real text's rare words (past rank rare_rank) that the samples use", "", "higher"),
}
REFERENCE = ("Paper Table 2 (test cross-entropy on TinyStories, nats/token; full-size data and models): GPT-2 9M at "
             "temperature 1.0: 1.82 at t=1; at t=4 accumulate 1.74, replace 2.39 (2.91 at t=10), replace grown to "
             "accumulate's size 2.18. At temperature 0.3: accumulate 1.75, replace 5.82 (9.85 at t=10). Llama-2 "
             "12M / 42M / 126M: t=1 2.06 / 1.90 / 1.71; t=4 accumulate 1.94 / 1.76 / 1.59, replace 2.72 / 2.52 / 2.23.")
MIN_ITERATIONS = 4  # Table 2 compares iteration 4 with iteration 1
SCORES = {
    "perplexity": "minus the story's perplexity (exp of its mean nats per sampled token, EOS included) under the "
                  "reference model lm.select_model: generation 1's (default: trained on real stories), the base, "
                  "or a saved generation; low-perplexity filtering (Gambetta et al. 2024, Feng et al. 2024) keeps "
                  "the highest scores. A story with no sampled token scores minus the vocabulary size (a uniform guess)",
    "length": "the story's sampled tokens (after its BOS and prompt, EOS included)",
}
SAVED_SAMPLES = 20


class LoRA(BaseModel):
    """`lm.lora`: low-rank adapters (peft) trained in place of the full weights."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="rank of the adapters")
    alpha: float = Field(16.0, gt=0.0, description="scale: the update is (alpha / r)·B·A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    target_modules: list[str] | None = Field(None, min_length=1, description="layer names to adapt (None: every linear layer of our "
                                             "blocks, or peft's choice for a model run through transformers)")
class Config(BaseModel):
    """The `[lm]` table. Defaults are a CPU-sized run on the shipped stories."""

    model_config = ConfigDict(extra="forbid")
    # data
    data: str = Field("shipped", min_length=1, description='"shipped", "hf:roneneldan/TinyStories", or a local .txt/.jsonl/.parquet file or folder')
    test_data: str | None = Field(None, min_length=1, description="a separate test source (hf: or path); default: the source's own test split")
    holdout: float = Field(0.05, gt=0.0, lt=1.0, description="share of stories held out for test when the source has no test split")
    skip_train_stories: int = Field(0, ge=0, description="leave out the first N real training stories (e.g. those the base was pretrained on)")
    max_train_stories: int | None = Field(None, ge=1, description="use only the first N real training stories (None: all)")
    test_stories: int | None = Field(None, ge=1, description="use only the first N test stories (None: all)")
    tokenizer_stories: int | None = Field(200_000, ge=1, description="fit the BPE on the first N training stories (None: all)")
    vocab_size: int = Field(4096, ge=258, le=2**20, description="BPE vocabulary size, BOS and EOS included (a base brings its own)")
    # model
    model: str = Field("llama2-cpu", description="a shape preset of model.py: gpt2-9m, llama2-12m, llama2-42m, llama2-126m, ...")
    n_layer: int | None = Field(None, ge=1, description="override the preset's layer count")
    n_head: int | None = Field(None, ge=1, description="override the preset's head count")
    n_embd: int | None = Field(None, ge=8, description="override the preset's width")
    ffn_hidden: int | None = Field(None, ge=1, description="override the preset's MLP hidden width")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout (one epoch of pretraining needs none)")
    block_size: int = Field(256, ge=8, le=8192, description="context length in tokens")
    # where each generation starts
    init: Literal["scratch", "base", "previous"] = Field("scratch", description='"scratch" (a fresh model: the paper), "base" (the '
                                                        'same base every generation), "previous" (the previous generation\'s weights)')
    base: str | None = Field(None, min_length=1, description="a local Hugging Face causal-LM folder or a gen-<n> folder of an lm run")
    lora: LoRA | None = Field(None, description="train LoRA adapters (peft) instead of every weight, e.g. {r = 8, alpha = 16}")
    # training
    batch_size: int = Field(32, ge=1, description="sequences per optimizer step (also the evaluation batch)")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="peak learning rate of AdamW")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after the warm-up, to min_lr_frac·lr")
    warmup_frac: float = Field(0.02, ge=0.0, le=0.5, description="share of the steps spent in linear warm-up")
    min_lr_frac: float = Field(0.1, ge=0.0, le=1.0, description="cosine decay ends at this fraction of lr")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay on matrices")
    grad_clip: float = Field(1.0, ge=0.0, description="clip the gradient norm to this (0: no clipping)")
    epochs: int = Field(1, ge=1, description="passes over each generation's training set (the paper: 1)")
    steps: int | None = Field(None, ge=1, description="optimizer steps per generation instead of `epochs` passes")
    checkpoint_every: int = Field(1000, ge=1, description="steps between mid-training checkpoints")
    compile: bool = Field(False, description="torch.compile the model for training and the decoding step for sampling")
    # sampling and evaluation
    prompt_tokens: int = Field(0, ge=0, description="continue the first P tokens of a real training story (0: sample from BOS)")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="sampling temperature (the paper: 1.0, or 0.3)")
    top_k: int | None = Field(None, ge=1, description="sample from the k most likely tokens only (None: all)")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling mass (None: the full distribution)")
    min_p: float | None = Field(None, gt=0.0, le=1.0, description="keep tokens at least min_p times as likely as the most likely (None: all)")
    repetition_penalty: float = Field(1.0, gt=0.0, description="CTRL's penalty on tokens already in the text (1: none; through transformers)")
    num_beams: int = Field(1, ge=1, description="beam search with this many beams, deterministic (1: sampling; through transformers)")
    max_sample_len: int = Field(256, ge=2, description="longest sampled document in tokens, BOS (and prompt) included")
    sample_batch: int = Field(64, ge=1, description="documents sampled together")
    shard_tokens: int = Field(2**22, ge=256, description="tokens per synthetic shard (the unit a resumed sampling keeps)")
    eval_samples: int = Field(100, ge=SAVED_SAMPLES, description="stories sampled by evaluate for the diversity metrics")
    sample_ppl_model: Literal["first", "base"] = Field("first", description="the model sample_ppl is measured under: generation 1's, or the base")
    select_model: str = Field("first", min_length=1, description='the model a selection\'s "perplexity" score is measured under: '
                              '"first" (generation 1\'s), "base", or a gen-<n> folder of an lm run with the same tokenizer')
    rare_rank: int = Field(1000, ge=1, description="rare_word_recall: the real text's words past this frequency rank are rare")

    # Keys added after runs existed: left out of the dump while at their defaults, so the config hash (and the
    # plans saved in checkpoints and samples) of a run made before them is unchanged and it still resumes.
    LATER: ClassVar[tuple[str, ...]] = ("skip_train_stories", "init", "base", "lora", "schedule", "steps", "prompt_tokens", "min_p", "repetition_penalty",
             "num_beams", "sample_ppl_model", "rare_rank", "select_model")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        out = handler(self)
        for k in self.LATER:
            if k in out and getattr(self, k) == type(self).model_fields[k].default:
                del out[k]
        return out

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
        if self.prompt_tokens + 2 > self.max_sample_len:
            raise ValueError(f"prompt_tokens ({self.prompt_tokens}) leaves no room to continue within max_sample_len ({self.max_sample_len}): "
                             "a document is its BOS, the prompt and at least one sampled token")
        if self.init == "base" and self.base is None:
            raise ValueError('init = "base" needs a base (lm.base = a local model folder)')
        if self.base is not None and self.init == "scratch":
            raise ValueError('a base is fine-tuned: set init = "base" or "previous" (init = "scratch" trains a fresh model)')
        if self.lora is not None and self.base is None:
            raise ValueError("LoRA adapts a pretrained base: set lm.base")
        if self.sample_ppl_model == "base" and self.base is None:
            raise ValueError('sample_ppl_model = "base" needs a base')
        if self.select_model == "base" and self.base is None:
            raise ValueError('select_model = "base" needs a base')
        if self.num_beams > 1 and (self.temperature != 1.0 or self.top_k or self.top_p or self.min_p):
            raise ValueError("beam search (num_beams > 1) is deterministic: leave temperature, top_k, top_p and min_p at their defaults")
        if self.base is None:
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
    """The `lm` family (see the module docstring). Fitted state: `tokenizer_`, `vocab_` (and its `bos_`,
    `eos_`), `base_` (the base model, when there is one)."""

    grouped = True  # sizes count tokens; subsample keeps whole documents; a selection keeps whole stories
    weights_real = True  # fit takes real_weight: per-token loss weights

    def __init__(self, config: Config, *, device: str = "cpu", cache_dir: Path | None = None):
        self.config = config
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else common.cache_dir()
        self._stories: list[str] | None = None  # the deduplicated real training stories, every draw's
        self._sets: dict[str, TokenSet] = {}
        self._references: dict[Path, object] = {}  # the model sample_ppl is measured under, by folder (the last one)
        self._real_words = None  # (word counts, rare words) of the real training stories
        self.base_: Base | None = None
        self.select_model_ = None  # a saved generation that select_model names, once read

    # -- real data ---------------------------------------------------------------------------------------
    def _ready(self) -> None:
        if self._stories is None:
            self._prepare()

    def _prepare(self) -> None:
        """Read, split and deduplicate the stories, fit the tokenizer (or read the base's), write the real
        shards (all cached)."""
        c = self.config
        train, test = text.load_stories(c.data, c.test_data, c.holdout)
        test = test[: c.test_stories]
        train = text.dedup(train, test)[c.skip_train_stories :]
        if not train or not test:
            raise BadInput(f"data {c.data!r} gave {len(train)} training and {len(test)} test stories; both must be non-empty")
        if c.base is not None:
            self.base_ = read_base(c.base, c.dropout, self.device)
            self._check_base(self.base_)
            self.tokenizer_ = self.base_.tokenizer
            self.tokenizer_path_ = self._cache_tokenizer(self.tokenizer_)
            self.vocab_ = self.base_.vocab
        else:
            self.tokenizer_, self.tokenizer_path_ = text.train_tokenizer(self._draw_stories(0, train)[: c.tokenizer_stories], c.vocab_size, self.cache_dir)
            bos, eos = self.tokenizer_.token_to_id(text.BOS), self.tokenizer_.token_to_id(text.EOS)
            self.vocab_ = Vocab(c.vocab_size, bos, eos, bos)
        self.bos_, self.eos_ = self.vocab_.bos, self.vocab_.eos
        self._stories = train
        self._sets["test"] = self._tokenize(test)
        self._sets["train-0"] = self._tokenize(self._draw_stories(0))
        if c.select_model not in ("first", "base"):
            self.select_model_ = self._read_select_model(c.select_model)

    def _read_select_model(self, folder: str):
        """The saved generation `select_model` names: its tokenizer must be this run's (the ids must mean the
        same words), so its perplexities are of the same stories."""
        path = Path(folder).expanduser()
        if not (path / "model.json").is_file():
            raise BadInput(f"lm.select_model: {folder!r} is not a gen-<n> folder of an lm run (no model.json); "
                           f'give one, or "first" or "base"')
        saved = read_base(str(path), 0.0, self.device)
        if saved.tokenizer.to_str() != self.tokenizer_.to_str():
            raise BadInput(f"lm.select_model: {folder!r} has another tokenizer than this run's; its perplexities "
                           f"would score other token ids")
        return saved.model

    def _check_base(self, base: Base) -> None:
        from modelcollapse.families.lm.hf import check_context

        c = self.config
        check_context(base.model, c.block_size, f"the base {c.base}")
        if c.top_k is not None and c.top_k > base.vocab.size:
            raise BadInput(f"The 'top_k' parameter of lm ({c.top_k}) exceeds the base's vocabulary ({base.vocab.size} tokens)")

    def _cache_tokenizer(self, tokenizer) -> Path:
        """The base's tokenizer as a JSON file in the cache, named by its content (token shards are cached by
        that name)."""
        body = tokenizer.to_str()
        path = self.cache_dir / "lm" / "tokenizers" / f"base-{text.digest([body])}.json"
        if not path.exists():
            atomic_write_bytes(path, body.encode())
        return path

    def _draw_stories(self, draw: int, stories: list[str] | None = None) -> list[str]:
        stories = self._stories if stories is None else stories
        n = self.config.max_train_stories
        if n is None:
            if draw:
                raise DataUnavailable("lm: every real training story is in the first draw; set max_train_stories to leave some for fresh draws")
            return stories
        chunk = stories[draw * n : (draw + 1) * n]
        if draw and len(chunk) < n:
            raise DataUnavailable(f"lm: real training draw {draw} needs {n} stories; only {len(stories)} exist")
        return chunk

    def _tokenize(self, stories: list[str]) -> TokenSet:
        """The stories as one shard `BOS text EOS` per story, cached by content and tokenizer (and written
        again when the cached one is damaged)."""
        stem = self.cache_dir / "lm" / "shards" / text.digest(stories, self.tokenizer_path_.name)
        if shard_exists(stem):
            try:
                return verify(TokenSet.open([stem], real=True), self.vocab_.ids)
            except BadInput as e:
                paths.rebuilding(stem, e)
        write_shard(stem, self._encode(stories), self.vocab_.dtype)
        return TokenSet.open([stem], real=True)

    def _encode(self, stories: list[str]):
        bos, eos = self.vocab_.bos, self.vocab_.eos
        for i in range(0, len(stories), 10_000):
            for enc in self.tokenizer_.encode_batch(stories[i : i + 10_000], add_special_tokens=False):  # ours add BOS and EOS
                yield np.asarray([bos, *enc.ids, eos], dtype=np.int64)

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

    def take(self, data: TokenSet, indices: np.ndarray) -> TokenSet:
        return data.take(indices)

    def example_sizes(self, data: TokenSet) -> np.ndarray:
        return data.doc_lengths()

    def size(self, data: TokenSet) -> int:
        return data.n_tokens

    def concat(self, datasets: list[TokenSet]) -> TokenSet:
        return TokenSet.concat(datasets)

    def subsample(self, data: TokenSet, size: int, seed: int) -> TokenSet:
        return data.subsample(size, seed)

    # -- the model ---------------------------------------------------------------------------------------
    def fit(self, train: TokenSet, seed: int, workdir: Path, previous: Path | None = None, real_weight: float | None = None):
        """A model fit on `train`, starting where `init` says; `previous` is the previous generation's folder
        (None in generation 1), which init = "previous" continues from. With `real_weight` w the real
        stories' tokens carry a share w of the loss (train.fit)."""
        self._ready()
        c = self.config
        start = None
        if c.init == "previous" and previous is not None:
            start = self.load_model(previous)
        elif c.init != "scratch":
            start = self.base_.model
        model = loops.fit(c, train, self.vocab_, seed, Path(workdir), self.device, start, real_weight)
        model.reference_ = None if previous is None else reference_of(Path(previous))
        return model

    def evaluate(self, model, test: TokenSet, seed: int, workdir: Path) -> dict[str, float]:
        self._ready()
        c = self.config
        metrics = {PRIMARY_METRIC: loops.test_ce(model, test, c, self.vocab_, self.device)}
        if distributed.is_writer():  # a few stories: rank 0 samples them, writes them and tells the others
            real = self.real_data("train", seed)
            docs = loops.eval_samples(model, c, self.vocab_, seed, self.device, real)
            P = c.prompt_tokens
            continuations = [d[P + 1 :] for d in docs] if P else docs
            metrics.update(loops.diversity(continuations, self.vocab_.bos, self.vocab_.eos))
            metrics.update(self._text_metrics(continuations))
            ppl = np.exp(loops.example_nll(self._reference(model), docs, P, c, self.vocab_, self.device))
            metrics.update(sample_ppl=float(ppl.mean()), sample_ppl_p10=float(np.percentile(ppl, 10)), sample_ppl_p90=float(np.percentile(ppl, 90)))
            buf = io.BytesIO()
            np.save(buf, ppl)
            atomic_write_bytes(Path(workdir) / "sample_ppl.npy", buf.getvalue())
            self._write_samples(docs[:SAVED_SAMPLES], Path(workdir))
        return distributed.broadcast(metrics)

    def _decode(self, ids) -> str:
        return self.tokenizer_.decode([int(t) for t in ids if t not in (self.vocab_.bos, self.vocab_.eos)])

    def _text_metrics(self, continuations: list[np.ndarray]) -> dict[str, float]:
        from modelcollapse.families.lm import metrics

        if self._real_words is None:
            counts = metrics.word_counts(self._draw_stories(0))
            self._real_words = counts, metrics.rare_words(counts, self.config.rare_rank)
        return metrics.text_metrics([self._decode(d) for d in continuations], *self._real_words)

    def _reference(self, model):
        """The model sample_ppl is measured under: the base, or generation 1's (the model itself in generation 1)."""
        if self.config.sample_ppl_model == "base":
            return self.base_.model
        folder = getattr(model, "reference_", None)
        if folder is None:
            return model
        if folder not in self._references:
            self._references = {folder: self.load_model(folder)}
        return self._references[folder]

    # -- selection ----------------------------------------------------------------------------------------
    def score(self, data: TokenSet, name: str, model, reference, seed) -> np.ndarray:
        """A score per story of `data` (SCORES): `length`, or `perplexity` under the model `select_model`
        names (`reference` is generation 1's: the model itself while generation 1 samples)."""
        self._ready()
        targets = data.n_targets()
        if name == "length":
            return targets.astype(float)
        c = self.config
        if c.select_model == "first":
            scorer = reference
        else:
            scorer = self.base_.model if c.select_model == "base" else self.select_model_
        nll = np.full(data.n_docs, np.log(self.vocab_.size))  # no sampled token: scored as a uniform guess
        order = np.argsort(data.doc_lengths(), kind="stable")  # similar lengths batched together: little padding
        order = order[targets[order] > 0]
        prompts = data.prompt_lens()
        for i in range(0, len(order), CHUNK_DOCS):
            chunk = order[i : i + CHUNK_DOCS]
            docs = list(data.iter_docs(chunk))
            nll[chunk] = loops.example_nll(scorer, docs, 0 if prompts is None else prompts[chunk], c, self.vocab_, self.device)
        return -np.exp(nll)

    def _write_samples(self, docs: list[np.ndarray], workdir: Path) -> None:
        P = self.config.prompt_tokens
        rows = []
        for d in docs:
            row = dict(text=self._decode(d[P + 1 :] if P else d), tokens=len(d) - 1, eos=bool(d[-1] == self.vocab_.eos))
            rows.append(dict(prompt=self._decode(d[: P + 1]), **row) if P else row)
        atomic_write_json(workdir / "samples.json", rows)
        end = lambda r: text.SEPARATOR if r["eos"] else "[cut at max_sample_len]"
        if P:
            body = "".join(f"[prompt] {r['prompt']}\n[continuation] {r['text']}\n{end(r)}\n" for r in rows)
        else:
            body = "".join(f"{r['text']}\n{end(r)}\n" for r in rows)
        atomic_write_bytes(workdir / "samples.txt", body.encode())

    def sample(self, model, size: int, like: TokenSet, seed: int, workdir: Path) -> TokenSet:
        self._ready()
        return loops.sample_shards(model, size, self.config, self.vocab_, seed, Path(workdir) / "sample", self.device, like)

    def load_sample(self, workdir: Path) -> TokenSet:
        self._ready()
        return verify(loops.load_shards(Path(workdir) / "sample"), self.vocab_.ids)

    def save_model(self, model, workdir: Path) -> None:
        """model.json (what the model is, to rebuild it) with model.safetensors (ours), hf/ (a model run
        through transformers) or adapter/ only (LoRA on the same base every generation), and the tokenizer."""
        workdir = Path(workdir)
        self._ready()
        v = self.vocab_
        meta = dict(tokenizer="tokenizer.json", bos=v.bos, eos=v.eos, model_bos=v.model_bos,
                    bos_token=self.base_.bos_token if self.base_ else text.BOS, eos_token=self.base_.eos_token if self.base_ else text.EOS,
                    reference=reference_path(model, workdir))
        adapter = getattr(model, "adapter_", None)
        if adapter is not None:
            from modelcollapse.families.lm.lora import save_adapter

            save_adapter(model, workdir / "adapter")
        if adapter is not None and self.config.init == "base":  # the base and the adapters rebuild it
            meta.update(kind="lora", base=str(Path(self.config.base).expanduser().resolve()))
        elif isinstance(model, HFModel):
            from modelcollapse.families.lm.hf import save_hf_dir

            save_hf_dir(model, self.base_, workdir / "hf")
            meta.update(kind="hf")
        else:
            common.save_module(model, workdir / "model.safetensors")
            meta.update(kind="ours", config=dataclasses.asdict(model.config))
        atomic_write_json(workdir / "model.json", meta)
        shutil.copyfile(self.tokenizer_path_, workdir / "tokenizer.json")
        if distributed.is_writer():
            (workdir / loops.CHECKPOINT).unlink(missing_ok=True)  # the saved model supersedes the fit's checkpoint

    def load_model(self, workdir: Path):
        workdir = Path(workdir)
        meta = read_meta(workdir)
        kind = meta.get("kind", "ours")
        if kind == "lora":
            from modelcollapse.families.lm.lora import load_adapter

            base = self.base_ if self.base_ is not None else read_base(meta["base"], self.config.dropout, self.device)
            model = load_adapter(base.model, workdir / "adapter")
        else:
            model = read_model(workdir, meta, dropout=None)
        model.reference_ = None if meta.get("reference", ".") == "." else Path(os.path.normpath(workdir / meta["reference"]))
        return model.to(self.device).eval()


# -- generation folders and bases -----------------------------------------------------------------------------


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "model.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        return meta
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read the model config {folder / 'model.json'}: {e}") from None


def read_model(folder: Path, meta: dict, dropout: float | None):
    """The model a generation folder holds (ours or run through transformers), on the CPU. `dropout`
    replaces the one it was trained with (None: keep it)."""
    from modelcollapse.families.lm.model import LM, LMConfig

    if meta.get("kind", "ours") == "hf":
        from transformers import AutoModelForCausalLM

        import torch

        return HFModel(AutoModelForCausalLM.from_pretrained(str(folder / "hf"), local_files_only=True, dtype=torch.float32))
    try:
        shape = LMConfig(**{**meta["config"], **({} if dropout is None else {"dropout": dropout})})
    except (KeyError, TypeError, ValueError) as e:
        raise BadInput(f"cannot read the model config {folder / 'model.json'}: {e}") from None
    return common.load_module(LM(shape), folder / "model.safetensors")


def reference_path(model, workdir: Path) -> str:
    """Where model.json points for the model sample_ppl is measured under: "." (this one) or a relative path."""
    folder = getattr(model, "reference_", None)
    return "." if folder is None else os.path.relpath(folder, workdir)


def reference_of(previous: Path) -> Path:
    """The reference folder of the generation after `previous`: the previous generation's own reference."""
    ref = read_meta(previous).get("reference", ".")
    return previous if ref == "." else Path(os.path.normpath(previous / ref))


def read_base(spec: str, dropout: float, device: str) -> Base:
    """`lm.base`: a local Hugging Face causal-LM folder or a gen-<n> folder of an lm run, with its tokenizer."""
    from tokenizers import Tokenizer

    from modelcollapse.families.lm.hf import load_hf_dir

    path = Path(spec).expanduser()
    if not path.is_dir():
        raise BadInput(f"lm.base: {spec!r} is not a local directory (nothing is downloaded): give a Hugging Face model "
                       f"folder (config.json) or a gen-<n> folder of an lm run")
    if (path / "model.json").exists():
        meta = read_meta(path)
        if meta.get("kind", "ours") == "lora":
            model = Family(Config.model_construct(dropout=dropout), device="cpu").load_model(path)
        else:
            model = read_model(path, meta, dropout)
        try:
            tokenizer = Tokenizer.from_file(str(path / meta.get("tokenizer", "tokenizer.json")))
        except Exception as e:  # tokenizers raises a bare Exception for a missing or malformed file
            raise BadInput(f"lm.base: cannot read the tokenizer of {path}: {e}") from None
        bos = meta.get("bos", tokenizer.token_to_id(text.BOS))
        rows = model.config.vocab_size if not isinstance(model, HFModel) else model.hf.get_input_embeddings().weight.size(0)
        vocab = Vocab(rows, bos, meta.get("eos", tokenizer.token_to_id(text.EOS)), meta.get("model_bos", bos))
        base = Base(model, tokenizer, vocab, meta.get("bos_token", text.BOS), meta.get("eos_token", text.EOS))
    elif (path / "config.json").exists():
        base = load_hf_dir(path, dropout)
    else:
        raise BadInput(f"lm.base: {path} holds neither a Hugging Face model (config.json) nor an lm generation (model.json)")
    base.model.reference_ = None
    base.model.to(device).eval()
    return base


def export(gen_dir: Path, out_dir: Path) -> Path:
    """Write generation `gen_dir`'s model as a Hugging Face transformers directory (GPT2LMHeadModel or
    LlamaForCausalLM for ours, the architecture it came in otherwise), with its tokenizer as a
    PreTrainedTokenizerFast, that `from_pretrained` loads."""
    from transformers import PreTrainedTokenizerFast

    from modelcollapse.families.lm.hf import export_hf

    gen_dir = Path(gen_dir)
    for name in ("model.json", "tokenizer.json"):  # all there before anything is written
        if not (gen_dir / name).is_file():
            raise BadInput(f"{gen_dir} holds no {name}; give a finished gen-<n> folder of an lm run")
    meta = read_meta(gen_dir)
    weights = {"hf": "hf/config.json", "lora": "adapter/adapter_model.safetensors"}.get(meta.get("kind"), "model.safetensors")
    if not (gen_dir / weights).is_file():
        raise BadInput(f"{gen_dir} holds no {weights}; give a finished gen-<n> folder of an lm run")
    model = Family(Config.model_construct(), device="cpu").load_model(gen_dir)
    if isinstance(model, HFModel):
        model.hf.save_pretrained(out_dir)
        out = Path(out_dir)
    else:
        out = export_hf(model, out_dir, bos_id=meta.get("model_bos", 0), eos_id=meta.get("eos", 1))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(gen_dir / "tokenizer.json"), bos_token=meta.get("bos_token", text.BOS),
                                        eos_token=meta.get("eos_token", text.EOS))
    tokenizer.save_pretrained(out)
    return out
