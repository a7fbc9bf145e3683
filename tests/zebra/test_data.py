"""Data layer: loading sources, packing, the token cache, seeded order, sharding and resuming."""
import itertools
import json
import random
import sysconfig
from pathlib import Path

import boto3
import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto import mock_aws
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from zebra import data
from zebra.data import PackedDataset, builtin_texts, load_texts, pack, packed_sequences, tokenize


@pytest.fixture(scope="module")
def tok():
    """A byte-level tokenizer (one token per UTF-8 byte, lossless) plus <eos>: no download, instant."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("ZEBRA_CACHE", str(tmp_path / "zebra"))


def _random_docs(rng: random.Random, n: int) -> list[list[int]]:
    return [[rng.randrange(1000) for _ in range(rng.randrange(0, 40))] for _ in range(n)]


@pytest.mark.parametrize("seq_len", [1, 7, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_pack_fixed_lengths_loses_only_the_tail(seq_len, seed):
    docs = _random_docs(random.Random(seed), 50)
    flat = [t for d in docs for t in d]
    seqs = list(pack(iter(docs), seq_len))
    assert all(len(s) == seq_len for s in seqs)
    assert [t for s in seqs for t in s] == flat[: len(seqs) * seq_len]
    assert 0 <= len(flat) - len(seqs) * seq_len < seq_len
    with pytest.raises(ValueError, match="seq_len"):
        next(pack(docs, 0))


def test_tokenize_is_lossless_and_ends_each_document_with_eos(tok):
    texts = ["héllo world", "second\ndocument", "x" * 600]
    ids = list(tokenize(texts, tok, batch_size=2))
    assert len(ids) == 3 and all(d[-1] == tok.eos_token_id for d in ids)
    assert [tok.decode(d[:-1]) for d in ids] == texts


def test_packed_sequences_match_pack_and_are_cached(tok, tmp_path, monkeypatch):
    texts = [f"document {i}: " + "lorem ipsum " * (i % 7) for i in range(200)]
    seqs = packed_sequences(texts, tok, 32, tmp_path / "tok")
    expected = np.array(list(pack(tokenize(texts, tok), 32)))
    assert seqs.shape == expected.shape and (seqs == expected).all()
    with pytest.raises(ValueError, match="fewer tokens than one sequence"):
        packed_sequences(["ab"], tok, 32, tmp_path / "tok")
    def no_retokenising(*args):
        raise RuntimeError("re-tokenised")

    files = len(list((tmp_path / "tok").glob("*.npy")))  # texts' stream, and the short one's
    monkeypatch.setattr(data, "_stream_array", no_retokenising)
    assert (packed_sequences(texts, tok, 32, tmp_path / "tok") == expected).all()
    for seq_len in (16, 7):  # another seq_len cuts the same cached stream, as pack would
        again = packed_sequences(texts, tok, seq_len, tmp_path / "tok")
        assert (again == np.array(list(pack(tokenize(texts, tok), seq_len)))).all()
    assert len(list((tmp_path / "tok").glob("*.npy"))) == files == 2
    with pytest.raises(RuntimeError, match="re-tokenised"):  # another corpus is another file
        packed_sequences(texts[:-1], tok, 32, tmp_path / "tok")


def _epoch_rows(ds: PackedDataset, epoch: int) -> list[int]:
    return [ds.row(p) for p in range(epoch * len(ds), (epoch + 1) * len(ds))]


def test_order_is_deterministic_per_seed():
    seqs = np.arange(40 * 4).reshape(40, 4)
    a, b, c = PackedDataset(seqs, seed=3), PackedDataset(seqs, seed=3), PackedDataset(seqs, seed=4)
    batches_a = [a.next_batch(6) for _ in range(10)]  # crosses an epoch boundary
    assert all((x == b.next_batch(6)).all() for x in batches_a)
    assert not all((x == c.next_batch(6)).all() for x in batches_a)
    fresh = PackedDataset(seqs, seed=3)
    assert sorted(_epoch_rows(fresh, 0)) == list(range(40)) and _epoch_rows(fresh, 0) != _epoch_rows(fresh, 1)
    assert batches_a[0].dtype == np.int64 and (batches_a[0] == seqs[_epoch_rows(fresh, 0)[:6]]).all()


@pytest.mark.parametrize("n,world", [(24, 3), (25, 4), (7, 7)])
def test_shards_are_disjoint_and_cover_the_epoch(n, world):
    seqs = np.arange(n)[:, None]
    shards = [PackedDataset(seqs, seed=11, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        rows = [_epoch_rows(s, epoch) for s in shards]
        assert all(len(r) == n // world for r in rows)
        flat = [x for r in rows for x in r]
        assert len(set(flat)) == len(flat) == n // world * world  # disjoint; only n % world skipped
    with pytest.raises(ValueError, match="rank"):
        PackedDataset(seqs, rank=world, world_size=world)


def test_resume_continues_exactly_where_it_stopped():
    seqs = np.random.default_rng(0).integers(0, 100, size=(30, 5))
    whole = PackedDataset(seqs, seed=7, rank=1, world_size=2)
    expected = [whole.next_batch(4) for _ in range(9)]
    first = PackedDataset(seqs, seed=7, rank=1, world_size=2)
    for _ in range(5):
        first.next_batch(4)
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = PackedDataset(seqs, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert all((resumed.next_batch(4) == e).all() for e in expected[5:])
    with pytest.raises(ValueError, match="world_size=2.*world_size=3"):
        PackedDataset(seqs, seed=7, world_size=3).load_state_dict(state)


def _write_sources(root: Path, docs: list[str]) -> dict[str, Path]:
    root.mkdir()
    (root / "d.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    (root / "d.json").write_text(json.dumps([{"text": t} for t in docs]))
    pq.write_table(pa.table({"text": docs}), root / "d.parquet")
    (root / "txt").mkdir()
    for i, t in enumerate(docs):
        (root / "txt" / f"{i:02d}.txt").write_text(t)
    return {s: root / f"d.{s}" for s in ("jsonl", "json", "parquet")} | {"txt": root / "txt"}


def test_local_files_and_folders(tmp_path):
    docs = [f"doc {i}\nwith two lines" for i in range(12)] + [""]  # the empty one is dropped
    for kind, path in _write_sources(tmp_path / "src", docs).items():
        assert load_texts(str(path)) == docs[:-1], kind
    assert load_texts(str(tmp_path / "src" / "d.jsonl"), limit=3) == docs[:3]
    with pytest.raises(ValueError, match="no field 'body'.*'id', 'text'"):
        load_texts(str(tmp_path / "src" / "d.jsonl"), text_field="body")
    with pytest.raises(ValueError, match="mixes formats"):
        load_texts(str(tmp_path / "src"))


def test_shared_compressed_corpus_loads_a_few_records():
    corpus = data.data_root() / "corpus" / "prose-v1.jsonl.xz"
    if not corpus.is_file():
        pytest.skip(f"no shared corpus at {corpus}")
    texts = load_texts("$ZEBRA_DATA/corpus/prose-v1.jsonl.xz", limit=3)  # 30 MB compressed: read only its start
    print([t[:60] for t in texts])
    assert len(texts) == 3 and all(isinstance(t, str) and len(t) > 100 for t in texts)
    assert load_texts(str(corpus), limit=3) == texts


@pytest.mark.parametrize("suffix", ["", ".xz", ".gz", ".bz2"])
def test_streaming_stops_at_the_limit(tmp_path, suffix):
    """Line 4 is not JSON: reading 3 documents never gets there, reading 4 names the line."""
    path = tmp_path / f"d.jsonl{suffix}"
    body = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)) + "{broken\n"
    data.COMPRESSIONS.get(suffix, open)(path, "wt", encoding="utf-8").write(body)
    assert load_texts(str(path), limit=3) == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(ValueError, match=f"{path.name}, line 4: not JSON"):
        load_texts(str(path), limit=4)


def test_compressed_formats_and_resolution(tmp_path, monkeypatch):
    docs = ["first document", "second one"]
    with data.COMPRESSIONS[".gz"](tmp_path / "d.json.gz", "wt") as f:
        json.dump([{"text": t} for t in docs], f)
    with data.COMPRESSIONS[".xz"](tmp_path / "book.txt.xz", "wt") as f:
        f.write("a whole book")
    assert load_texts(str(tmp_path / "d.json.gz")) == docs
    assert load_texts(str(tmp_path / "d.json")) == docs  # the compressed file stands in for a missing plain one
    assert load_texts(str(tmp_path / "book.txt.xz")) == ["a whole book"]
    monkeypatch.setenv("ZEBRA_DATA", str(tmp_path))
    assert data.resolve_local("$ZEBRA_DATA/d.json") == tmp_path / "d.json.gz"
    (tmp_path / "plain.jsonl").write_text('{"text": "x"}\n')
    assert data.resolve_local("$ZEBRA_DATA/plain.jsonl.xz") == tmp_path / "plain.jsonl"  # unpacked on the GPU host
    assert load_texts("$ZEBRA_DATA/plain.jsonl.xz") == ["x"]


def test_texts_for_tokens_reads_only_what_it_needs(tok):
    def stream():
        yield from ["abcd", "ef", "ghij"]  # 5, 3, 5 tokens with EOS
        raise AssertionError("read past the documents needed")

    assert data.texts_for_tokens(stream(), tok, 8, batch_size=1) == ["abcd", "ef"]
    assert data.texts_for_tokens(iter(["abcd", "ef", "ghij"]), tok, 9, batch_size=2) == ["abcd", "ef", "ghij"]
    assert data.texts_for_tokens(iter(["abcd"]), tok, 100) == ["abcd"]  # a short corpus: all of it


def test_token_slices_are_disjoint_and_map_to_rows(caplog):
    budgets = {"held_out": 100, "ild": 1000, "kd": 3000}
    got = data.token_slices(budgets, 10_000)
    assert got == {"held_out": (0, 100), "ild": (100, 1100), "kd": (1100, 4100)}
    for seq_len in (7, 64, 100):
        all_rows = range(10_000 // seq_len)
        rows = {k: set(all_rows[data.rows_of(r, seq_len)]) for k, r in got.items()}
        assert not rows["ild"] & rows["kd"] and not rows["held_out"] & rows["ild"]
        for name, (start, stop) in got.items():  # every row's tokens lie inside the range
            assert all(start <= r * seq_len and (r + 1) * seq_len <= stop for r in rows[name])
    short = data.token_slices(budgets, 2050)  # half of what they want: each gets half
    assert short == {"held_out": (0, 50), "ild": (50, 550), "kd": (550, 2050)}
    assert "repeats" in caplog.text
    with pytest.raises(ValueError, match="held_out gets no tokens"):
        data.token_slices({"held_out": 1, "kd": 10_000}, 100)
    # a fixed consumer keeps its whole budget; the others share what is left in proportion
    kept = data.token_slices(budgets, 2100, fixed=("held_out",))
    assert kept == {"held_out": (0, 100), "ild": (100, 600), "kd": (600, 2100)}
    assert "repeats it 2.00 times" in caplog.text
    assert data.token_slices(budgets, 10_000, fixed=("held_out",)) == got  # room for all: unchanged
    with pytest.raises(ValueError, match="held_out need 100 tokens, the corpus holds 99"):
        data.token_slices(budgets, 99, fixed=("held_out",))
    with pytest.raises(ValueError, match=r"fixed consumers \['eval'\]"):
        data.token_slices(budgets, 10_000, fixed=("eval",))
    with pytest.raises(ValueError, match="no whole sequence of seq_len 64"):
        data.rows_of((10, 70), 64)


def test_missing_sources_and_unknown_schemes_are_named(tmp_path):
    for missing in (tmp_path / "nope.jsonl", tmp_path / "nodir", Path("data/absent.parquet")):
        with pytest.raises(FileNotFoundError, match=str(missing)):
            load_texts(str(missing))
    with pytest.raises(ValueError, match="'gs'"):
        load_texts("gs://bucket/x.jsonl")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="notes.md"):
        load_texts(str(tmp_path / "notes.md"))


def test_s3_object_and_folder(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="corpus")
        s3.put_object(Bucket="corpus", Key="web/a.jsonl", Body=b'{"text": "one"}\n{"text": "two"}\n')
        s3.put_object(Bucket="corpus", Key="web/b.jsonl", Body=b'{"text": "three"}\n')
        assert load_texts("s3://corpus/web/b.jsonl") == ["three"]
        assert load_texts("s3://corpus/web") == ["one", "two", "three"]
        with pytest.raises(FileNotFoundError, match="s3://corpus/none"):
            load_texts("s3://corpus/none/")
        with pytest.raises(FileNotFoundError, match="s3://corpus/web/zz.jsonl"):
            load_texts("s3://corpus/web/zz.jsonl")
        with pytest.raises(FileNotFoundError, match="s3://nobucket/web"):
            load_texts("s3://nobucket/web")


def test_hub_ids_go_to_datasets(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return iter([{"text": "a"}, {"text": None}, {"text": "b"}, {"text": "c"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_texts("org/corpus", split="validation", name="en", limit=2) == ["a", "b"]
    assert load_texts("corpus") == ["a", "b", "c"]
    assert calls == [("org/corpus", "en", "validation", True), ("corpus", None, "train", False)]


def test_builtin_corpus_is_large_english_and_deterministic():
    texts = builtin_texts()
    joined = "\n".join(texts)
    assert len(joined) > 1_000_000 and len(set(texts)) == len(texts)
    assert joined.count(" the ") > 5000  # prose, not code
    lib = Path(sysconfig.get_paths()["stdlib"])
    part = list(data._stdlib_docstrings(lib / "email"))  # a recomputation in the same order
    assert part == list(data._stdlib_docstrings(lib / "email")) and len(part) > 20
    assert set(part) <= set(texts)


def test_the_lazy_builtin_corpus_reads_only_what_is_taken(monkeypatch):
    """zebra convert's calibration takes a few thousand tokens: the lazy reader must yield the list's
    first texts without parsing the standard library."""
    first = builtin_texts()[:3]

    def parsed(lib):
        raise AssertionError("parsed the standard library")
        yield  # a generator, as the real one

    monkeypatch.setattr(data, "_stdlib_docstrings", parsed)
    assert list(itertools.islice(data.iter_builtin_texts(), 3)) == first


@pytest.mark.slow
def test_teacher_tokenizer_packs_builtin_corpus(tmp_path):
    """The real teacher tokenizer (SmolLM2, from its GGUF file; ~10 s to load) over the builtin corpus."""
    from transformers import AutoTokenizer

    from zebra.teacher import default_teacher_gguf

    gguf = default_teacher_gguf()
    teacher_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    texts = builtin_texts()
    seqs = packed_sequences(texts, teacher_tok, 512, tmp_path)
    assert seqs.dtype == np.uint16 and seqs.shape[1] == 512 and seqs.shape[0] > 500
    assert (seqs == teacher_tok.eos_token_id).sum() >= len(texts) - 1  # every document but the cut tail ends in EOS
    assert teacher_tok.decode(seqs[0][:50]) in texts[0]
