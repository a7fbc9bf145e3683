"""Training text -> fixed-length token sequences, cached, in a seeded order, sharded across ranks, resumable.

    texts = load_texts("builtin")                       # or a file/folder (.jsonl.xz too), s3://..., a hub id
    texts = texts_for_tokens(iter_texts("$ZEBRA_DATA/corpus/prose-v1.jsonl.xz"), tokenizer, 7_000_000)
    seqs = packed_sequences(texts, tokenizer, 512)      # [n, 512]: the token stream, tokenised once, cached as .npy
    ranges = token_slices({"held_out": 8192, "ild": 2_000_000, "kd": 5_000_000}, seqs.size)
    ild_rows = seqs[rows_of(ranges["ild"], 512)]        # disjoint from kd's and the held-out rows
    data = PackedDataset(seqs, seed=0, rank=r, world_size=w)
    batch = data.next_batch(8)                          # [8, 512] int64; data.state_dict() resumes here

Sequences are inputs only: a training step shifts them for next-token targets.
"""
from __future__ import annotations

import ast
import bz2
import functools
import gzip
import hashlib
import itertools
import json
import logging
import lzma
import os
import shutil
import sysconfig
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .teacher import cache_root

log = logging.getLogger(__name__)

BUILTIN = "builtin"
FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # suffix -> format
COMPRESSIONS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}  # read as streams, never unpacked to disk
MIN_DOC_CHARS = 200  # shorter docstrings are mostly "Return self." and signatures, not prose
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
DATA_ENV = "ZEBRA_DATA"  # the shared data folder; see data_root
DATA_VAR = "$" + DATA_ENV  # a source "$ZEBRA_DATA/corpus/x.jsonl" names a file in it
CACHE_VERSION = b"zebra-stream-v2"  # bump when tokenize changes what a cache file holds


def load_texts(
    source: str,
    split: str = "train",
    text_field: str = "text",
    *,
    name: str | None = None,
    limit: int | None = None,
    s3_endpoint_url: str | None = None,
) -> list[str]:
    """Documents of a corpus, in the source's order (empty and missing texts dropped).

    source: "builtin" (offline, see builtin_texts); a local file or folder (.txt = one document
    per file; .json/.jsonl/.parquet = one per record, read from text_field; .txt/.json/.jsonl may be
    compressed: .xz, .gz, .bz2), "$ZEBRA_DATA/..." for a file of the shared data folder (resolve_local);
    s3://bucket/key, an object or a folder of such files ($AWS_ENDPOINT_URL or s3_endpoint_url for
    S3-compatible servers); otherwise a Hugging Face hub dataset id, with config `name`.
    split: the split of a hub dataset; the builtin corpus and files have one.
    limit: keep the first `limit` documents; local and S3 files are read as streams that stop
    there, and a hub dataset is then streamed, not downloaded whole.
    """
    if source != BUILTIN and _is_hub(source):
        return _load_hub(source, name, split, text_field, limit)
    return list(itertools.islice(iter_texts(source, split, text_field, s3_endpoint_url=s3_endpoint_url), limit))


def iter_texts(source: str, split: str = "train", text_field: str = "text", *, name: str | None = None,
               s3_endpoint_url: str | None = None) -> Iterator[str]:
    """The documents of load_texts one at a time, read lazily: stop iterating and nothing more is
    read (a hub dataset is streamed)."""
    scheme, sep, _ = source.partition("://")
    if source == BUILTIN:
        return iter(builtin_texts())
    if sep and scheme == "s3":
        return _iter_local(_download_s3(source, s3_endpoint_url), text_field, label=source)
    if sep:
        raise ValueError(f"data source {source!r}: unknown scheme {scheme!r}; use a path, s3:// or a hub id")
    if _is_hub(source):
        return _iter_hub(source, name, split, text_field)
    return _iter_local(resolve_local(source), text_field, label=source)


def _is_hub(source: str) -> bool:
    return "://" not in source and not source.startswith(DATA_VAR) and not _is_local(source)


def resolve_local(source: str) -> Path:
    """The local path of a source: "$ZEBRA_DATA/rest" is data_root() / rest; a missing file is looked
    for compressed (name + .xz/.gz/.bz2) or uncompressed (without that suffix), so one spec reads
    corpus/prose-v1.jsonl.xz here and the unpacked corpus/prose-v1.jsonl on the GPU host."""
    path = data_root() / source[len(DATA_VAR) + 1 :] if source.startswith(DATA_VAR + "/") else Path(source)
    path = path.expanduser()
    if path.exists():
        return path
    variants = [path.with_name(path.name + c) for c in COMPRESSIONS]
    variants += [path.with_suffix("")] if path.suffix in COMPRESSIONS else []
    found = next((v for v in variants if v.exists()), path)
    if found != path:
        log.info("data source %s: reading %s", source, found)
    return found


def _is_local(source: str) -> bool:
    """A path rather than a hub id ("org/name"): it exists, or it is spelled like a path."""
    path = Path(source).expanduser()
    return (path.exists() or source.startswith(("/", ".", "~")) or _data_format(path) is not None
            or path.suffix in COMPRESSIONS or source.count("/") > 1)


def _data_format(path: Path) -> str | None:
    """The data suffix of a file name, under a compression suffix if any: ".jsonl" for x.jsonl and
    x.jsonl.xz; None when there is none."""
    suffixes = path.suffixes[:-1] if path.suffix in COMPRESSIONS else path.suffixes
    return suffixes[-1] if suffixes and suffixes[-1] in FORMATS else None


def _local_files(path: Path) -> list[Path]:
    """The data files of a file, or of a folder (sorted; one format)."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _data_format(p) and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"data folder {path} holds no {'/'.join(FORMATS)} files")
    else:
        raise FileNotFoundError(f"data file or folder {path} does not exist")
    unknown = [str(p) for p in files if _data_format(p) is None or (p.suffix in COMPRESSIONS and
                                                                   _data_format(p) == ".parquet")]
    if unknown:
        raise ValueError(f"data file {unknown[0]}: unsupported name; use one of {', '.join(FORMATS)} "
                         f"(text formats optionally compressed: {', '.join(COMPRESSIONS)})")
    formats = sorted({FORMATS[_data_format(p)] for p in files})
    if len(formats) > 1:
        raise ValueError(f"data folder {path} mixes formats {formats}; keep one format per folder")
    return files


def _iter_local(path: Path, text_field: str, label: str) -> Iterator[str]:
    for file in _local_files(path):
        fmt = _data_format(file)
        if fmt == ".parquet":
            yield from _parquet_texts(file, text_field, label)
            continue
        with COMPRESSIONS.get(file.suffix, open)(file, "rt", encoding="utf-8") as stream:
            if fmt == ".txt":
                text = stream.read()
                if text:
                    yield text
            elif fmt == ".jsonl":
                records = (_json_record(line, file, n) for n, line in enumerate(stream, 1) if line.strip())
                yield from _texts_of(records, text_field, label)
            else:
                yield from _texts_of(json.load(stream), text_field, label)


def _json_record(line: str, file: Path, number: int) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"data file {file}, line {number}: not JSON ({e})") from None


def _texts_of(records: Iterable[dict], text_field: str, label: str) -> Iterator[str]:
    for record in records:
        if text_field not in record:
            raise ValueError(f"data {label}: no field {text_field!r}; its fields are {sorted(record)}")
        if record[text_field]:
            yield record[text_field]


def _parquet_texts(file: Path, text_field: str, label: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(file)
    if text_field not in table.schema_arrow.names:
        raise ValueError(f"data {label}: no field {text_field!r}; its fields are {sorted(table.schema_arrow.names)}")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        yield from filter(None, batch.column(0).to_pylist())


def _iter_hub(source: str, name: str | None, split: str, text_field: str) -> Iterator[str]:
    import datasets

    yield from _texts_of(datasets.load_dataset(source, name, split=split, streaming=True), text_field, repr(source))


def _load_hub(source: str, name: str | None, split: str, text_field: str, limit: int | None) -> list[str]:
    import datasets

    ds = datasets.load_dataset(source, name, split=split, streaming=limit is not None)
    return list(itertools.islice(_texts_of(ds, text_field, repr(source)), limit))


def _download_s3(uri: str, endpoint_url: str | None) -> Path:
    """Download an S3 object, or every object under an S3 folder, to the cache; returns the local path."""
    import boto3
    import botocore.exceptions

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    key = key.strip("/")
    client = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
    dest = cache_root() / "data" / "s3" / bucket / key
    shutil.rmtree(dest, ignore_errors=True)
    try:
        for obj, local in _s3_objects(client, bucket, key, dest).items():
            local.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj, str(local))
    except botocore.exceptions.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        missing = code in ("404", "NoSuchKey", "NoSuchBucket")
        raise (FileNotFoundError if missing else OSError)(f"data source {uri}: {code} ({e})") from e
    return dest


def _s3_objects(client, bucket: str, key: str, dest: Path) -> dict[str, Path]:
    """{S3 key: local path}: the object itself when key names a data file, else every object under the folder."""
    if Path(key).suffix in FORMATS:
        return {key: dest}
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{key}/" if key else "")
    objects = {o["Key"]: dest / o["Key"][len(key) :].lstrip("/") for p in pages for o in p.get("Contents", [])}
    if not objects:
        raise FileNotFoundError(f"data source s3://{bucket}/{key}: no objects under it")
    return objects


def data_root() -> Path:
    """The shared data folder (corpus/, eval/): $ZEBRA_DATA where set (the GPU host's bundle sets it),
    else ../shared/data next to the repository."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@functools.lru_cache(maxsize=1)
def builtin_texts() -> list[str]:
    """An offline English corpus (~2 M characters) from the running Python installation, no download:
    iter_builtin_texts as a list, once per process (parsing the standard library takes a few seconds)."""
    return list(iter_builtin_texts())


def iter_builtin_texts() -> Iterator[str]:
    """builtin_texts lazily: a reader that needs only the first tokens (zebra convert's calibration)
    stops before the standard library is parsed.

    In order: the Language Reference and library topics that `help()` shows (pydoc_data.topics,
    sorted by topic); the module, class and function docstrings of the standard library's .py
    files (sorted by path, parsed with ast so nothing is imported; tests and site-packages left
    out; at least MIN_DOC_CHARS characters); Python's LICENSE.txt. First occurrence of duplicates
    kept. Deterministic for a given Python version.
    """
    from pydoc_data.topics import topics

    lib = Path(sysconfig.get_paths()["stdlib"])
    license_file = lib / "LICENSE.txt"
    licence = [license_file.read_text(encoding="utf-8")] if license_file.is_file() else []
    seen: set[str] = set()
    for text in itertools.chain((topics[k] for k in sorted(topics)), _stdlib_docstrings(lib), licence):
        if text not in seen:
            seen.add(text)
            yield text


def _stdlib_docstrings(lib: Path) -> Iterator[str]:
    """Docstrings of at least MIN_DOC_CHARS of the .py files under lib, by sorted path then source order."""
    files = sorted(p for p in lib.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(lib).parts))
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a few stdlib files are templates or Latin-1
            log.debug("builtin corpus: skipping %s (not parseable)", path)
            continue
        yield from (d for d in _docstrings(tree) if len(d) >= MIN_DOC_CHARS)


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Docstrings of the module and of the classes/functions reachable through class and def bodies."""
    kinds = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    todo = [tree]
    while todo:
        node = todo.pop(0)
        doc = ast.get_docstring(node)
        if doc:
            yield doc
        todo += [n for n in node.body if isinstance(n, kinds)]


def tokenize(texts: Iterable[str], tokenizer, batch_size: int = 256) -> Iterator[list[int]]:
    """Per document: its token ids (no special tokens added) followed by the tokenizer's EOS id."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token_id; packing needs one")
    it = iter(texts)
    while batch := list(itertools.islice(it, batch_size)):
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            yield list(ids) + [eos]


def pack(token_ids: Iterable[Sequence[int]], seq_len: int) -> Iterator[list[int]]:
    """Concatenate documents' ids and cut into [seq_len] lists; the final partial piece is dropped."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    buf: list[int] = []
    for ids in token_ids:
        buf.extend(ids)
        full = len(buf) // seq_len * seq_len
        for start in range(0, full, seq_len):
            yield buf[start : start + seq_len]
        del buf[:full]


def texts_for_tokens(texts: Iterable[str], tokenizer, tokens: int, batch_size: int = 256) -> list[str]:
    """The first documents of `texts` that hold at least `tokens` tokens once tokenised (tokenize's
    count, EOS included), or all of them: the iterable is consumed no further than that, so a
    streamed corpus is read only as far as a run needs."""
    return tokenize_until(texts, tokenizer, tokens, chunk_docs=batch_size)[0]


ChunkMap = Callable[[Iterator[list[str]]], Iterator[tuple[np.ndarray, np.ndarray]]]


def tokenize_chunk(texts: list[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(every document's ids followed by EOS, concatenated; each document's token count): tokenize's
    output for a chunk of documents as two arrays (cheap to ship between processes)."""
    dtype = stream_dtype(tokenizer)
    docs = list(tokenize(texts, tokenizer, batch_size=max(1, len(texts))))
    flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=sum(map(len, docs)))
    return flat, np.array([len(d) for d in docs], dtype=np.int64)


def stream_dtype(tokenizer) -> type:
    """uint16 where the vocabulary fits (halves the token cache), else uint32."""
    return np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32


def tokenize_until(texts: Iterable[str], tokenizer, tokens: int, chunk_docs: int = 256,
                   map_chunks: ChunkMap | None = None) -> tuple[list[str], np.ndarray]:
    """(the first documents of `texts` holding at least `tokens` tokens, or all of them; their token
    stream as token_stream holds it) in one pass of tokenisation.

    The documents go in chunks of chunk_docs to map_chunks, which yields each chunk's tokenize_chunk
    result in order; the default tokenises in this process, a parallel map (several processes, each
    chunk as it is read) may take its place. Reading stops once the tokens are there; a parallel
    map reads no further ahead than the chunks it keeps in flight."""
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    if map_chunks is None:
        map_chunks = lambda chunks: (tokenize_chunk(c, tokenizer) for c in chunks)  # noqa: E731
    sent: deque[list[str]] = deque()

    def chunks() -> Iterator[list[str]]:
        it = iter(texts)
        while chunk := list(itertools.islice(it, chunk_docs)):
            sent.append(chunk)
            yield chunk

    taken: list[str] = []
    parts: list[np.ndarray] = []
    count = 0
    results = map_chunks(chunks())
    try:
        for flat, lengths in results:
            chunk = sent.popleft()
            n = 0
            while n < len(chunk) and count < tokens:
                count += int(lengths[n])
                n += 1
            taken += chunk[:n]
            parts.append(flat[: int(lengths[:n].sum())])
            if count >= tokens:
                break
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()  # a parallel map cancels what it still has in flight
    return taken, (np.concatenate(parts) if parts else np.zeros(0, dtype=stream_dtype(tokenizer)))


def store_token_stream(texts: Sequence[str], tokenizer, stream: np.ndarray, cache_dir: str | Path | None = None) -> Path:
    """Put an already computed token stream of `texts` (tokenize_until's) where token_stream looks for it,
    so that packing the same texts does not tokenise them again."""
    path = _stream_path(texts, tokenizer, cache_dir)
    if not path.exists():
        _save_atomic(path, np.asarray(stream, dtype=stream_dtype(tokenizer)))
    return path


def token_slices(budgets: dict[str, int], available: int, fixed: Sequence[str] = ()) -> dict[str, tuple[int, int]]:
    """Disjoint [start, stop) token ranges of the packed corpus, one per consumer, in budgets' order.

    budgets: tokens each consumer wants, e.g. {"held_out": 16 * 1024, "ild": 2_000_000, "kd": 5_000_000}.
    available: tokens of the packed corpus (rows x seq_len). Packing concatenates the documents in
    order, so token t is the same token at every seq_len (up to the dropped tail): one set of ranges
    serves stages that pack at different lengths (rows_of).
    fixed: consumers that always get their whole budget (the held-out rows: a figure over fewer rows is
    another figure).
    When the budgets exceed the corpus, every other range shrinks in proportion to what the fixed ones
    leave, with a warning (a training stage then repeats its data over epochs); ValueError where the
    fixed budgets alone exceed the corpus, or naming the consumer that would get no token.
    """
    unknown = [name for name in fixed if name not in budgets]
    if unknown:
        raise ValueError(f"data: fixed consumers {unknown} have no budget in {sorted(budgets)}")
    kept = sum(budgets[name] for name in fixed)
    if kept > available:
        raise ValueError(f"data: {', '.join(fixed)} need {kept} tokens, the corpus holds {available}")
    wanted = sum(budget for name, budget in budgets.items() if name not in fixed)
    scale = min(1.0, (available - kept) / wanted) if wanted else 1.0
    if scale < 1.0:
        log.warning("data: the stages want %d tokens, the corpus holds %d; each gets %.0f%% of its budget "
                    "and repeats it %.2f times", wanted + kept, available, 100 * scale, 1 / max(scale, 1e-9))
    slices, start = {}, 0
    for name, budget in budgets.items():
        size = budget if name in fixed else int(budget * scale)
        if size < 1:
            raise ValueError(f"data: {name} gets no tokens of the corpus ({available} tokens for budgets {budgets})")
        slices[name] = (start, start + size)
        start += size
    return slices


def rows_of(token_range: tuple[int, int], seq_len: int) -> slice:
    """The rows of a [n, seq_len] packing that lie wholly inside token_range [start, stop)."""
    start, stop = token_range
    rows = slice(-(-start // seq_len), stop // seq_len)
    if rows.stop <= rows.start:
        raise ValueError(f"token range [{start}, {stop}) holds no whole sequence of seq_len {seq_len}")
    return rows


def packed_sequences(texts: Sequence[str], tokenizer, seq_len: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """[n, seq_len] token ids of the packed corpus (a read-only memmap view): the cached token stream
    (token_stream) cut into rows, the final partial row dropped, as pack(tokenize(texts)) cuts it.
    Every seq_len reads the same stream: the corpus is tokenised once per run."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    stream = token_stream(texts, tokenizer, cache_dir)
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"corpus of {len(texts)} documents has fewer tokens than one sequence (seq_len={seq_len})")
    return stream[: rows * seq_len].reshape(rows, seq_len)


def token_stream(texts: Sequence[str], tokenizer, cache_dir: str | Path | None = None) -> np.ndarray:
    """[tokens] every document's ids followed by EOS, concatenated (read-only memmap), cached by content.

    The cache file is keyed by the texts and the tokenizer (its full serialised form), so a changed
    corpus or tokenizer never reuses a stale file. cache_dir: default $ZEBRA_CACHE/tokens.
    """
    path = _stream_path(texts, tokenizer, cache_dir)
    if not path.exists():
        log.info("tokenising %d documents -> %s", len(texts), path)
        _save_atomic(path, _stream_array(texts, tokenizer))
    return np.load(path, mmap_mode="r")


def _stream_path(texts: Sequence[str], tokenizer, cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or cache_root() / "tokens") / f"{_fingerprint(texts, tokenizer)}.npy"


def _stream_array(texts: Sequence[str], tokenizer, block_tokens: int = 1 << 22) -> np.ndarray:
    dtype = stream_dtype(tokenizer)
    blocks, block = [], []  # numpy blocks: a list of Python ints costs ~10x the memory
    for ids in tqdm(tokenize(texts, tokenizer), total=len(texts), desc="tokenise", unit="doc", leave=False,
                    mininterval=5):
        block.extend(ids)
        if len(block) >= block_tokens:
            blocks.append(np.array(block, dtype=dtype))
            block = []
    blocks.append(np.array(block, dtype=dtype))
    return np.concatenate(blocks)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write then rename, so concurrent workers never read a half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _fingerprint(texts: Sequence[str], tokenizer) -> str:
    h = hashlib.sha256(CACHE_VERSION + f":{tokenizer.eos_token_id}:".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    for text in texts:
        data = text.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:24]


class PackedDataset:
    """One rank's share of packed sequences, in a seeded order that is reshuffled every epoch.

    Epoch e visits the permutation drawn from (seed, e) of all n sequences; rank r takes its
    positions r, r + W, r + 2W, ... (W = world_size), n // W of them, so shards are disjoint and
    every rank runs the same number of steps (the n % W left over in an epoch are skipped).
    `position` counts this rank's sequences consumed across epochs; it is all a resume needs.
    """

    def __init__(self, sequences: np.ndarray, seed: int = 0, rank: int = 0, world_size: int = 1):
        if sequences.ndim != 2:
            raise ValueError(f"sequences must be [n, seq_len], got shape {sequences.shape}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(sequences) < world_size:
            raise ValueError(f"{len(sequences)} sequences cannot give each of {world_size} ranks one")
        self.sequences, self.seed, self.rank, self.world_size = sequences, seed, rank, world_size
        self.position = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Sequences per epoch on this rank."""
        return len(self.sequences) // self.world_size

    @property
    def epoch(self) -> int:
        return self.position // len(self)

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))
        return self._order_cache[1]

    def row(self, position: int) -> int:
        """Row of `sequences` this rank reads at a position of its stream."""
        epoch, i = divmod(position, len(self))
        return int(self._order(epoch)[self.rank + i * self.world_size])

    def next_batch(self, batch_size: int) -> np.ndarray:
        """The next [batch_size, seq_len] int64 sequences (crossing into the next epoch as needed)."""
        rows = [self.row(p) for p in range(self.position, self.position + batch_size)]
        self.position += batch_size
        return np.asarray(self.sequences[rows], dtype=np.int64)

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_sequences": len(self.sequences),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the order-defining fields must match this dataset's."""
        for field, mine in (("seed", self.seed), ("world_size", self.world_size), ("num_sequences", len(self.sequences))):
            if state[field] != mine:
                raise ValueError(f"data state has {field}={state[field]}, this dataset has {field}={mine}")
        self.position = int(state["position"])
