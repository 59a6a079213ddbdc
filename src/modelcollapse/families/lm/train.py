"""Training, evaluation and sampling loops of the `lm` family, in the manner of nanoGPT's train.py/sample.py.

- `fit`: a fresh model (seeded init) or a given starting model (a base, the previous generation's) with
  optional LoRA adapters, `epochs` passes over the training set (or `steps` steps), documents shuffled and
  packed into block_size rows, AdamW with linear warm-up and cosine (or linear, or no) decay to
  `min_lr_frac`·lr, gradient clipping, bf16 autocast on CUDA (float32 on the CPU). Every `checkpoint_every`
  steps model, optimizer and RNG go to `workdir/fit.ckpt.safetensors`, so a killed fit resumes where it
  stopped, with the same result; the checkpoint is removed once the fitted model is saved (`Family.save_model`).
- `test_ce`: mean nats per token over every real test token (the text and its EOS; BOS is given, never a
  target), the test documents packed as in training.
- `sample_shards`: documents from BOS (or from BOS and the first `prompt_tokens` tokens of a real training
  document) until EOS or `max_sample_len` tokens, until exactly `size` tokens, written as shards of
  `shard_tokens` tokens. Shard k depends only on (seed, k), so a killed sampling phase keeps its finished
  shards and redoes only the rest. Our sampler (model.LM.generate) draws with temperature, top-k, top-p and
  min-p; a repetition penalty, beam search or a model run through transformers go through transformers'
  `generate` (hf.hf_generate), seeded from the same stream.
- `example_nll`: each document's mean nats per token of its continuation under a model (sample_ppl, and a
  selection's perplexity score).

Data-parallel (several ranks, distributed.py): `fit` trains a DistributedDataParallel replica on each rank,
rank r taking rows r·B/W .. (r+1)·B/W of the very batch a one-process fit draws, its loss weighted so the
averaged gradient is the one-process mean over the batch's targets; `test_ce` shares the test batches out
and sums; `sample_shards` gives shard k to rank k mod W. Rank 0 alone writes (checkpoints, shards).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from modelcollapse import distributed
from modelcollapse.errors import BadInput
from modelcollapse.families.common import autocast, example_weights, warmup_cosine
from modelcollapse.families.lm.hf import Vocab, hf_generate
from modelcollapse.families.lm.model import LM, lm_config
from modelcollapse.families.lm.shards import TokenSet, open_part, shard_exists, write_shard
from modelcollapse.seeding import derive_seed
from modelcollapse.store import atomic_write_json

BETAS = (0.9, 0.95)  # nanoGPT's and Llama-2's AdamW betas
CHECKPOINT = "fit.ckpt.safetensors"


def _seeded_rng(device: str):
    """The global torch RNG, forked so our seeding never leaks out (dropout and init draw from it)."""
    return torch.random.fork_rng(devices=[torch.device(device)] if device.startswith("cuda") else [])


def lr_at(step: int, total: int, cfg) -> float:
    """The learning rate of step `step` of `total`: warm-up over `warmup_frac` of the steps, then cosine or
    linear decay to `min_lr_frac`·lr, or constant (`schedule`)."""
    warmup, floor = round(cfg.warmup_frac * total), cfg.min_lr_frac * cfg.lr
    if cfg.schedule == "cosine" or step < warmup:
        return warmup_cosine(step, total, cfg.lr, warmup, floor)
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr + (floor - cfg.lr) * min(1.0, (step - warmup) / max(1, total - warmup))  # linear


def build(cfg, vocab_size: int, seed: int, device: str) -> LM:
    """A freshly initialised model of the configured shape, its init drawn from `seed`."""
    shape = lm_config(cfg.model, vocab_size=vocab_size, block_size=cfg.block_size, **cfg.shape_overrides())
    with _seeded_rng(device):
        torch.manual_seed(seed)
        return LM(shape).to(device)


def steps_of(cfg, train: TokenSet) -> int:
    """Optimizer steps of a fit: `steps`, or `epochs` passes over `train`."""
    return cfg.steps or cfg.epochs * train.n_batches(cfg.block_size, cfg.batch_size)


def _targets(y: np.ndarray, bos: int) -> np.ndarray:
    y[y == bos] = -1  # the BOS after each EOS is given, not predicted
    return y


# -- fit --------------------------------------------------------------------------------------------------


def _rng_key(kind: str, rank: int) -> str:
    return f"rng.{kind}" if rank == 0 else f"rng.{kind}.{rank}"


def _save_checkpoint(path: Path, model: LM, opt: torch.optim.Optimizer, step: int, plan: dict) -> None:
    """Written by rank 0; every rank's RNG state is gathered into it (the others return at once)."""
    rng = {"cpu": torch.get_rng_state()}  # dropout's draws, so a resumed fit makes the same ones
    if next(model.parameters()).is_cuda:
        rng["cuda"] = torch.cuda.get_rng_state(next(model.parameters()).device)
    every_rng = distributed.gather(rng)
    if not distributed.is_writer():
        return
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # clone: tied weights
    state = opt.state_dict()
    for i, s in state["state"].items():
        tensors.update({f"opt.{i}.{k}": v.detach().clone().contiguous() for k, v in s.items()})
    tensors.update({_rng_key(kind, r): v for r, states in enumerate(every_rng) for kind, v in states.items()})
    meta = dict(step=step, plan=plan, param_groups=state["param_groups"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata={"state": json.dumps(meta)})
    tmp.replace(path)  # one file, renamed: a killed write leaves the previous checkpoint intact


def _load_checkpoint(path: Path, model: LM, opt: torch.optim.Optimizer, plan: dict, device: str) -> int:
    """Restore a checkpoint of the same plan; returns its step (0 when there is none to resume). A rank
    whose RNG state it lacks (a resume with more ranks) keeps its seeded one."""
    if not path.exists():
        return 0
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
        if meta["plan"] != plan:
            return 0  # another fit's checkpoint (other data, seed or settings): start afresh
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # a damaged checkpoint (truncated, overwritten) costs only the steps it held
        tqdm.write(f"warning: {path} cannot be read ({type(e).__name__}: {e}); fitting from the first step")
        return 0
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v  # load_state_dict moves each to its parameter's device
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if _rng_key("cpu", distributed.rank()) in tensors:
        torch.set_rng_state(tensors[_rng_key("cpu", distributed.rank())])
    if _rng_key("cuda", distributed.rank()) in tensors and device.startswith("cuda"):
        torch.cuda.set_rng_state(tensors[_rng_key("cuda", distributed.rank())], torch.device(device))
    return int(meta["step"])


def _rank_rows(x: np.ndarray, y: np.ndarray, B: int, w: np.ndarray | None = None):
    """This rank's rows of the global batch (x, y) (and of the targets' weights w), and the weight of their
    mean loss: (x, y, w, weight). Rank r of W takes rows
    r·B/W .. (r+1)·B/W; weighted by W·(its targets)/(the batch's targets), the mean over ranks that DDP takes
    of the gradients is the gradient of the one-process loss, the mean over every target of the batch (the
    rows hold different numbers of ignored targets, so unweighted per-rank means would not average to it)."""
    W, r = distributed.world_size(), distributed.rank()
    if W == 1:
        return x, y, w, 1.0
    if len(x) < B:  # the short last batch: padded with rows without targets, so every rank has B/W rows
        x = np.concatenate([x, np.zeros((B - len(x), x.shape[1]), x.dtype)])
        y = np.concatenate([y, np.full((B - len(y), y.shape[1]), -1, y.dtype)])
        w = None if w is None else np.concatenate([w, np.zeros((B - len(w), w.shape[1]), w.dtype)])
    n_all = int((y >= 0).sum())
    rows = slice(r * B // W, (r + 1) * B // W)
    x, y, w = x[rows], y[rows].copy(), None if w is None else w[rows]
    n = int((y >= 0).sum())
    if n == 0:  # only padding: the rank still joins the all-reduce; a dummy target keeps its loss finite, weight 0
        y[0, 0] = 0
    return x, y, w, W * n / n_all


def fit(cfg, train: TokenSet, vocab: Vocab, seed: int, workdir: Path, device: str, start: LM | None = None,
        real_weight: float | None = None):
    """A model trained for `cfg.epochs` passes over `train` (or `cfg.steps` steps): a fresh one, or `start`
    (left unchanged: a copy is trained), with LoRA adapters merged into it after training when `cfg.lora`.
    With `real_weight` w each predicted token's loss is weighted so that the real stories' tokens carry a
    share w of the total and the synthetic ones 1 − w (common.example_weights: the weights average to 1)."""
    B, T = cfg.batch_size, cfg.block_size
    per_epoch = train.n_batches(T, B)
    total = steps_of(cfg, train)
    if start is None:
        model = build(cfg, vocab.size, derive_seed(seed, "init"), device)
    else:
        model = copy.deepcopy(start).to(device)
    if cfg.lora is not None:
        from modelcollapse.families.lm.lora import add_adapters

        with _seeded_rng(device):
            torch.manual_seed(derive_seed(seed, "lora"))
            model = add_adapters(model, cfg.lora)
    opt = model.configure_optimizers(cfg.weight_decay, cfg.lr, BETAS)
    weights = None if real_weight is None else example_weights(train.real_docs(), real_weight, train.n_targets())
    plan = dict(seed=seed, tokens=train.n_tokens, docs=train.n_docs, total=total, config=cfg.model_dump(mode="json"))
    if real_weight is not None:  # a checkpoint of an unweighted fit is another fit's
        plan["real_weight"] = real_weight
    ckpt = Path(workdir) / CHECKPOINT
    rank = distributed.rank()
    with _seeded_rng(device):
        torch.manual_seed(derive_seed(seed, "dropout", *([rank] if rank else [])))  # each rank its own masks
        step = _load_checkpoint(ckpt, model, opt, plan, device)  # rank 0's checkpoint, read by every rank
        replica = distributed.data_parallel(model, device)
        step_fn = torch.compile(replica) if cfg.compile else replica
        model.train()
        bar = tqdm(total=total * B * T, initial=step * B * T, unit="tok", unit_scale=True, desc="fit",
                   disable=None if distributed.is_writer() else True, leave=False)
        while step < total:
            epoch, done = divmod(step, per_epoch)  # batches of this epoch already trained on
            for x, y, *w in train.batches(T, B, seed=derive_seed(seed, "order", epoch), start=done, weights=weights):
                lr = lr_at(step, total, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                x, y, w, weight = _rank_rows(vocab.inputs(x), _targets(y, vocab.bos), B, *w)
                x = torch.from_numpy(x).to(device, non_blocking=True)
                y = torch.from_numpy(y).to(device, non_blocking=True)
                with autocast(device):
                    _, loss = step_fn(x, y) if w is None else step_fn(x, y, torch.from_numpy(w).to(device, non_blocking=True))
                (loss * weight).backward()  # under DDP the gradients are averaged over the ranks here
                if cfg.grad_clip > 0:  # on the averaged gradient, the same on every rank
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.update(B * T)
                if step % 50 == 0 or step == total:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
                if step % cfg.checkpoint_every == 0 and step < total:
                    _save_checkpoint(ckpt, model, opt, step, plan)
                if step == total:  # `steps` may end a fit inside an epoch
                    break
        bar.close()
    if cfg.lora is not None:
        from modelcollapse.families.lm.lora import merge_adapters

        model = merge_adapters(model, start)
    model.eval()  # the checkpoint stays until the family's save_model has written the model
    return model


# -- evaluation ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_ce(model: LM, test: TokenSet, cfg, vocab: Vocab, device: str) -> float:
    """Mean nats per token over every token of `test` that follows its BOS. With several ranks, rank r
    takes batches r, r + W, ... and the sums are added up over the ranks."""
    model.eval()
    W, r = distributed.world_size(), distributed.rank()
    nats, count = 0.0, 0
    for i, (x, y) in enumerate(test.batches(cfg.block_size, cfg.batch_size, seed=None)):
        if i % W != r:
            continue
        y = _targets(y, vocab.bos)
        n = int((y >= 0).sum())
        if n == 0:
            continue
        with autocast(device):
            _, loss = model(torch.from_numpy(vocab.inputs(x)).to(device), torch.from_numpy(y).to(device))
        nats += float(loss) * n  # the model's loss is the mean over the targets that are not -1
        count += n
    nats, count = distributed.all_sum([nats, count])
    return nats / count


def fast_path(model, cfg) -> bool:
    """Whether our sampler does what `cfg` asks of `model` (else transformers' generate does)."""
    return isinstance(model, LM) and cfg.repetition_penalty == 1.0 and cfg.num_beams == 1


@torch.no_grad()
def generate_docs(model: LM, n: int, cfg, vocab: Vocab, generator: torch.Generator, device: str,
                  prompts: np.ndarray | None = None) -> list[np.ndarray]:
    """`n` documents `BOS ... EOS` (no EOS when cut at max_sample_len tokens), sampled in one batch, each
    continuing its row of `prompts` (n, P + 1) (BOS and P real tokens; None: BOS alone)."""
    model.eval()
    stored = np.full((n, 1), vocab.bos, dtype=np.int64) if prompts is None else prompts
    idx = torch.from_numpy(vocab.inputs(stored)).to(device)
    T0 = idx.size(1)
    new = cfg.max_sample_len - T0
    with autocast(device):
        if fast_path(model, cfg):
            out = model.generate(
                idx, new, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, eos_id=vocab.eos, generator=generator,
                compile=cfg.compile, min_p=cfg.min_p,
            )
        else:
            seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
            out = hf_generate(model, idx, new, cfg, vocab.eos, seed)
    docs = []
    for row, prompt in zip(out.cpu().numpy(), stored):
        ends = np.flatnonzero(row[T0:] == vocab.eos)
        row = row[: T0 + ends[0] + 1] if len(ends) else row
        row[:T0] = prompt  # as stored: the document's own BOS id
        docs.append(row)
    return docs


def _generator(seed: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class Prompts:
    """The prompts of one stream of samples: the first P + 1 tokens (BOS and P text tokens) of real documents
    longer than that, in an order drawn from `seed`, cycled through as often as needed."""

    def __init__(self, real: TokenSet, P: int, seed: int):
        self.real, self.P = real, P
        self.eligible = np.flatnonzero(real.doc_lengths() >= P + 2)  # at least one real token after the prompt
        if not len(self.eligible):
            raise BadInput(f"The 'prompt_tokens' parameter of lm ({P}) leaves no real training document longer than its prompt")
        self.rng = np.random.default_rng(seed)
        self.docs = iter(())

    def take(self, n: int) -> np.ndarray:
        out = np.empty((n, self.P + 1), dtype=np.int64)
        for i in range(n):
            doc = next(self.docs, None)
            if doc is None:
                self.docs = self.real.iter_docs(self.rng.permutation(self.eligible))
                doc = next(self.docs)
            out[i] = doc[: self.P + 1]
        return out


def prompts_for(cfg, real: TokenSet | None, seed: int) -> Prompts | None:
    return Prompts(real, cfg.prompt_tokens, seed) if cfg.prompt_tokens else None


def eval_samples(model: LM, cfg, vocab: Vocab, seed: int, device: str, real: TokenSet | None = None) -> list[np.ndarray]:
    """The `eval_samples` documents the diversity metrics and samples.txt are computed from (prompted from
    `real`, the real training set, when `prompt_tokens` > 0)."""
    g = _generator(derive_seed(seed, "eval-samples"), device)
    prompts = prompts_for(cfg, real, derive_seed(seed, "eval-prompts"))
    docs: list[np.ndarray] = []
    while len(docs) < cfg.eval_samples:
        b = min(cfg.sample_batch, cfg.eval_samples - len(docs))
        docs += generate_docs(model, b, cfg, vocab, g, device, None if prompts is None else prompts.take(b))
    return docs


def diversity(docs: list[np.ndarray], bos: int, eos: int) -> dict[str, float]:
    """distinct-n (unique n-grams / n-grams, pooled over documents, n = 1..3), distinct token ids used,
    mean length in tokens and the share of documents that ended by EOS rather than the length limit."""
    texts = [d[(d != bos) & (d != eos)] for d in docs]
    out = {}
    for n in (1, 2, 3):
        grams = [tuple(t[i : i + n]) for t in texts for i in range(len(t) - n + 1)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    out["distinct_tokens"] = float(len(set(np.concatenate(texts).tolist()))) if texts else 0.0
    out["sample_tokens"] = float(np.mean([len(t) for t in texts])) if texts else 0.0
    out["sample_eos"] = float(np.mean([d[-1] == eos for d in docs])) if docs else 0.0
    return out


@torch.no_grad()
def example_nll(model, docs: list[np.ndarray], P, cfg, vocab: Vocab, device: str) -> np.ndarray:
    """(len(docs),) each document's mean nats per token of what follows its BOS and P prompt tokens (its EOS
    included), under `model`: a batch of documents at a time, padded on the right. P: one prompt length for
    all, or one per document."""
    model.eval()
    P = np.broadcast_to(np.asarray(P, dtype=np.int64), (len(docs),))
    out = np.empty(len(docs))
    for i in range(0, len(docs), cfg.batch_size):
        batch = docs[i : i + cfg.batch_size]
        L = max(len(d) for d in batch)
        x = np.zeros((len(batch), L - 1), np.int64)
        y = np.full((len(batch), L - 1), -1, np.int64)
        for j, d in enumerate(batch):
            p = int(P[i + j])
            x[j, : len(d) - 1] = d[:-1]
            y[j, p : len(d) - 1] = d[p + 1 :]
        with autocast(device):
            logits, _ = model(torch.from_numpy(vocab.inputs(x)).to(device))
        logp = torch.log_softmax(logits.float(), dim=-1)
        yt = torch.from_numpy(y).to(device)
        nll = -logp.gather(-1, yt.clamp(min=0)[..., None]).squeeze(-1) * (yt >= 0)
        out[i : i + len(batch)] = (nll.sum(1) / (yt >= 0).sum(1).clamp(min=1)).cpu().numpy()
    return out


# -- sampling ------------------------------------------------------------------------------------------------


def sample_shards(model: LM, size: int, cfg, vocab: Vocab, seed: int, folder: Path, device: str, real: TokenSet | None = None) -> TokenSet:
    """Exactly `size` tokens of sampled documents, as shards under `folder` (kept across a resume), prompted
    from `real` when `prompt_tokens` > 0. With W ranks, shard k is sampled by rank k mod W, W shards a round,
    and rank 0 writes each round's shards."""
    quotas = [min(cfg.shard_tokens, size - i) for i in range(0, size, cfg.shard_tokens)]
    stems = [folder / f"shard-{k:05d}" for k in range(len(quotas))]
    plan = dict(size=size, seed=seed, quotas=quotas, config=cfg.model_dump(mode="json"))
    if distributed.is_writer():
        plan_path = folder / "sample.json"
        if plan_path.exists() and json.loads(plan_path.read_text()) != plan:
            for p in folder.glob("shard-*.npy"):  # another sampling's shards: not ours to keep
                p.unlink()
        atomic_write_json(plan_path, plan)
    todo = set(distributed.broadcast([k for k, stem in enumerate(stems) if not _shard_whole(stem, quotas[k])]))  # rank 0 decides
    W, r = distributed.world_size(), distributed.rank()
    dtype = vocab.dtype
    bar = tqdm(total=size, initial=size - sum(quotas[k] for k in todo), unit="tok", unit_scale=True, desc="sample",
               disable=None if distributed.is_writer() else True, leave=False)
    for first in range(0, len(quotas), W):
        if todo.isdisjoint(range(first, first + W)):
            continue
        k = first + r
        docs = _sample_shard(model, quotas[k], cfg, vocab, derive_seed(seed, "shard", k), device, bar, real) if k in todo else None
        for i, theirs in enumerate(distributed.gather(docs) or []):  # rank 0: the round's shards, in shard order
            if theirs is not None:
                P = cfg.prompt_tokens  # the last document may be cut inside its prompt
                write_shard(stems[first + i], theirs, dtype, [min(P, len(d) - 1) for d in theirs] if P else None)
                if i:
                    bar.update(quotas[first + i])
    bar.close()
    distributed.barrier()  # every shard is on disk before the other ranks open them
    return TokenSet.open(stems)


def _shard_whole(stem: Path, quota: int) -> bool:
    """A shard a stopped sampling left behind, whole (it opens and holds its quota): kept, not redone."""
    if not shard_exists(stem):
        return False
    try:
        return open_part(stem).n_tokens == quota
    except BadInput:
        return False  # damaged since it was written: sampled again from its own seed


def _sample_shard(model: LM, quota: int, cfg, vocab: Vocab, seed: int, device: str, bar, real: TokenSet | None) -> list[np.ndarray]:
    """The documents of one shard: exactly `quota` tokens, drawn from `seed` alone (whichever rank draws it)."""
    g = _generator(seed, device)
    prompts = prompts_for(cfg, real, derive_seed(seed, "prompts"))
    docs, have = [], 0
    while have < quota:
        batch = None if prompts is None else prompts.take(cfg.sample_batch)
        for doc in generate_docs(model, cfg.sample_batch, cfg, vocab, g, device, batch):
            doc = doc[: quota - have]  # the last document is cut so the shard holds exactly its quota
            docs.append(doc.astype(vocab.dtype))  # as stored: a half or a quarter of the bytes to send to rank 0
            have += len(doc)
            bar.update(len(doc))
            if have == quota:
                break
    return docs


def load_shards(folder: Path) -> TokenSet:
    """The shards `sample_shards` wrote under `folder`."""
    plan_path = folder / "sample.json"
    if not plan_path.exists():
        raise BadInput(f"no sampled data in {folder} (sample.json is missing)")
    stems = [folder / f"shard-{k:05d}" for k in range(len(json.loads(plan_path.read_text())["quotas"]))]
    missing = [s.name for s in stems if not shard_exists(s)]
    if missing:
        raise BadInput(f"sampled data in {folder} is incomplete: {', '.join(missing)} missing")
    return TokenSet.open(stems)
