"""TinyStories text for the `lm` family: where the stories come from, the train/test split, the tokenizer.

Sources (`Config.data`), all read by the same loader into lists of stories:
- "shipped": the TinyStories excerpt inside the package (data/tinystories/, CDLA-Sharing-1.0, see its
  PROVENANCE.md). Train = files 1 and 3 (training text, `<|endoftext|>`-separated); test = file 2 (the head of
  the validation split). File 2 marks no story boundaries (paragraphs and stories alike are separated by
  blank lines), so a test story starts at every paragraph that opens like a TinyStories story ("Once upon a
  time", "Once there was", ...): 64% of the training stories open so, and 2 of their 17,687 later
  paragraphs do. The other third of the stories stay attached to the story before them, which only changes
  which test tokens see a BOS before them: test_ce still counts every test token once.
- "hf:NAME": a Hugging Face dataset (e.g. "hf:roneneldan/TinyStories"), its "train" and "validation" splits,
  column "text". Needs the `datasets` package and the network (or its local cache).
- a local path: a .txt (stories separated by `<|endoftext|>`, or by blank lines if it has none), .jsonl
  (objects with "text", or strings), .parquet (column "text") file, or a folder of such files.

Every story is normalised the same way (mojibake such as "â€™" repaired, lines stripped, blank lines
dropped: paragraphs end with one "\n", as in TinyStories' training text). Without a test source of its own
(a local path without `test_data`), a story is a test story when the hash of its text falls in the
`holdout` fraction: deterministic, and independent of the order of the files. Repeated training stories,
and training stories that begin like a test story (same first 200 characters, case and spacing aside), are
dropped: in the shipped data that removes 7 repeats and no test story (the 54 training stories that share
their first 80 characters with a test story only share a formulaic opening).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import importlib.util
import os
import re
import socket
import sys
import threading
import urllib.parse
import urllib.request
import uuid
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

from modelcollapse import paths
from modelcollapse.errors import BadInput

BOS, EOS = "<|bos|>", "<|eos|>"  # ids 0 and 1 of every tokenizer made here
SEPARATOR = "<|endoftext|>"
SHIPPED_TRAIN = (  # (file, whether its first fragment is a cut-off story)
    ("gusjengis__toy-RNN__data__tinystories_sample.txt", False),
    ("yuesu0202__assignment1-basics__tests_fixtures__tinystories_sample_5M.prefix.txt", True),
)
SHIPPED_TEST = "yuninxia__moe-routing-bench__data__tinystories_val.txt"
STORY_OPENER = re.compile(r"(Once upon a time|Once there (was|were|lived)|Once,|There once|Long ago|A long time ago|Once in a|Once a)")
SUFFIXES = (".txt", ".jsonl", ".parquet")
MOJIBAKE = re.compile("â€(.?)", re.S)  # UTF-8 punctuation (E2 80 xx) once decoded as cp1252
DEDUP_CHARS = 200  # 80 would also match formulaic openings ("Once upon a time, there was a little girl named Lily. She loved to play outside"), which are not repeats


# -- normalisation --------------------------------------------------------------------------------------


def _repair(m: re.Match) -> str:
    c = m.group(1)
    try:
        b = c.encode("cp1252")
    except UnicodeEncodeError:
        b = b""
    if len(b) == 1 and 0x80 <= b[0] <= 0xBF:  # a UTF-8 continuation byte: the third byte of E2 80 xx
        return (b"\xe2\x80" + b).decode("utf-8")
    return "\u201d" + c  # ” is E2 80 9D, and 9D, having no cp1252 character, was lost


def normalize(story: str) -> str:
    """One story as the family stores it: mojibake repaired, each paragraph stripped and ended by one "\\n"
    between paragraphs (no trailing newline)."""
    story = MOJIBAKE.sub(_repair, story)
    return "\n".join(line.strip() for line in story.splitlines() if line.strip())


def dedup_key(text: str) -> str:
    return " ".join(text.split())[:DEDUP_CHARS].lower()


# -- readers ---------------------------------------------------------------------------------------------


def split_txt(text: str, drop_first: bool = False) -> list[str]:
    """Stories of a .txt file: each ends with `<|endoftext|>`, so text after the last one is a cut-off
    fragment and is dropped. A file without separators has one story per blank-line-separated block."""
    if SEPARATOR not in text:
        return [b for b in re.split(r"\n\s*\n", text) if b.strip()]
    pieces = text.split(SEPARATOR)[:-1]
    return [p for p in pieces[1 if drop_first else 0 :] if p.strip()]


def split_by_openers(text: str) -> list[str]:
    """Stories of a text whose only boundaries are blank lines: a story starts at a paragraph that opens
    like a TinyStories story (see the module docstring)."""
    stories: list[list[str]] = []
    for block in re.split(r"\n\s*\n", text):
        if not block.strip():
            continue
        if not stories or STORY_OPENER.match(block.strip()):
            stories.append([])
        stories[-1].append(block)
    return ["\n".join(s) for s in stories]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"data file {path} is not UTF-8 text: {e}") from None


def _read_jsonl(path: Path) -> Iterator[str]:
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"data file {path} line {i} is not JSON: {e}") from None
        text = row.get("text") if isinstance(row, dict) else row
        if not isinstance(text, str):
            raise BadInput(f"data file {path} line {i} has no \"text\" string")
        yield text


def _read_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise BadInput(f"data file {path} is not a parquet file: {e}") from None
    if "text" not in f.schema_arrow.names:
        raise BadInput(f"data file {path} has no \"text\" column (columns: {f.schema_arrow.names})")
    for batch in f.iter_batches(columns=["text"], batch_size=8192):  # streamed, one row group at a time
        yield from (t for t in batch.column(0).to_pylist() if t)


def read_file(path: Path) -> Iterator[str]:
    """Raw stories of one local file, by its suffix."""
    if path.suffix == ".txt":
        yield from split_txt(_read_text(path))
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise BadInput(f"data file {path}: unsupported type {path.suffix!r} (use {', '.join(SUFFIXES)})")


def read_path(spec: str) -> Iterator[str]:
    """Raw stories of a local file, or of every supported file in a folder (sorted by path)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise BadInput(f"data path {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise BadInput(f"data folder {path} holds no {', '.join(SUFFIXES)} files")
    for f in files:
        paths.regular_file(f, "data file")  # before it is opened: a FIFO blocks for ever, /dev/zero never ends
    for f in files:
        yield from read_file(f)


def hub_answers(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub (HF_ENDPOINT), or the proxy in front of it, accepts a connection within
    `timeout` seconds, name lookup included."""
    proxy = urllib.request.getproxies().get("https")
    url = urllib.parse.urlsplit(proxy or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    answered = []

    def probe():
        with contextlib.suppress(OSError, ValueError):
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            answered.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def offline_unless_the_hub_answers() -> bool:
    """Put the Hugging Face libraries offline when the Hub does not answer, so that a dataset in the local
    cache still loads and a missing one fails at once (online they retry for half a minute). True if offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    if hub_answers():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module in ("huggingface_hub.constants", "datasets.config"):  # they read it once, when imported
        if module in sys.modules:
            sys.modules[module].HF_HUB_OFFLINE = True
    return True


def read_hf(name: str, split: str) -> Iterator[str]:
    """Raw stories of a Hugging Face dataset split (column "text"), streamed from its local cache."""
    if importlib.util.find_spec("datasets") is None:  # said before anything else; imported once offline is set
        raise BadInput(f"data 'hf:{name}' needs the `datasets` package: pip install 'modelcollapse[hf]'")
    offline = not Path(name).exists() and offline_unless_the_hub_answers()
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, missing split: all surface as different types
        why = "offline, and it is not in the local Hugging Face cache" if offline else str(e).splitlines()[0]
        raise BadInput(f"cannot load Hugging Face dataset {name!r} split {split!r}: {why}") from None
    if "text" not in ds.column_names:
        raise BadInput(f"Hugging Face dataset {name!r} has no \"text\" column (columns: {ds.column_names})")
    for batch in ds.iter(batch_size=8192):
        yield from (t for t in batch["text"] if t)


def shipped_file(name: str) -> Path:
    return Path(str(resources.files("modelcollapse") / "data" / "tinystories" / name))


# -- the split ------------------------------------------------------------------------------------------


def in_holdout(story: str, holdout: float) -> bool:
    """Whether a story is a test story under the hash split: a fraction `holdout` of all stories."""
    h = int.from_bytes(hashlib.sha256(story.encode()).digest()[:8], "big")
    return h < holdout * 2**64


def load_stories(data: str, test_data: str | None, holdout: float) -> tuple[list[str], list[str]]:
    """(train, test) normalised stories of a source, before deduplication, in source order."""
    if data == "shipped":  # Config allows no test_data with it: it has its own test split
        train = [s for name, cut in SHIPPED_TRAIN for s in split_txt(_read_text(shipped_file(name)), drop_first=cut)]
        test = split_by_openers(_read_text(shipped_file(SHIPPED_TEST)))
        return _norm(train), _norm(test)
    if data.startswith("hf:"):
        train_raw: Iterable[str] = read_hf(data[3:], "train")
        test_raw: Iterable[str] | None = None if test_data is not None else read_hf(data[3:], "validation")
    else:
        train_raw, test_raw = read_path(data), None
    if test_data is not None:
        test_raw = read_hf(test_data[3:], "validation") if test_data.startswith("hf:") else read_path(test_data)
    train = _norm(train_raw)
    if test_raw is not None:
        return train, _norm(test_raw)
    test = [s for s in train if in_holdout(s, holdout)]
    return [s for s in train if not in_holdout(s, holdout)], test


def _norm(raw: Iterable[str]) -> list[str]:
    return [s for s in map(normalize, raw) if s]


def dedup(train: list[str], test: list[str]) -> list[str]:
    """Training stories without repeats, and without those that begin like a test story. A shipped test
    story may hold several stories, so the text from each of its paragraphs on is compared too."""
    seen = set()
    for story in test:
        paragraphs = story.split("\n")
        seen.update(dedup_key("\n".join(paragraphs[i:])) for i in range(len(paragraphs)))
    out = []
    for story in train:
        key = dedup_key(story)
        if key not in seen:
            seen.add(key)
            out.append(story)
    return out


def digest(stories: Iterable[str], *extra: object) -> str:
    """Content hash of a list of stories (and of the settings that shape what is derived from them)."""
    h = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    for s in stories:
        h.update(s.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


# -- the tokenizer --------------------------------------------------------------------------------------


def train_tokenizer(stories: list[str], vocab_size: int, cache_dir: Path):
    """A byte-level BPE with BOS/EOS (ids 0, 1) fit on `stories`, cached in cache_dir by their content hash.
    Returns (tokenizer, path of its JSON file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(cache_dir) / "lm" / "tokenizers" / f"bpe-{digest(stories, 'bpe-v1', vocab_size)}.json"
    if path.exists():
        try:
            tok = Tokenizer.from_file(str(path))
            if tok.token_to_id(BOS) != 0 or tok.token_to_id(EOS) != 1 or tok.get_vocab_size() > vocab_size:
                raise ValueError(f"not a BPE of at most {vocab_size} tokens with {BOS}, {EOS} as ids 0, 1")
            return tok, path
        except Exception as e:  # tokenizers raises a plain Exception for a file it cannot parse
            paths.rebuilding(path, e)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(stories, trainer=trainer, length=len(stories))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")  # unique across processes sharing the cache
    tok.save(str(tmp))
    tmp.replace(path)  # atomic: a half-written tokenizer is never picked up
    return tok, path
