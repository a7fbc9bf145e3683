"""jobs.context.sequences: the corpus read only as far as the stages need, cut into disjoint
held-out | ild | kd token ranges that hold at every seq_len."""
import json
import random

import numpy as np
import pytest
from transformers import AutoTokenizer

import jobs.context
import zebra.data
from cluster.storage import LocalStorage
from jobs.context import Context, sequences, token_budgets
from jobs.spec import load_spec
from tests.jobs.conftest import teacher_dir  # noqa: F401 (module fixture)
from zebra.data import packed_sequences, tokenize, tokenize_until

N_DOCS = 200


@pytest.fixture
def setup(teacher_dir, tmp_path, monkeypatch):  # noqa: F811
    rng = random.Random(0)
    words = "alpha beta gamma delta river stone cloud seven paper quiet lamp orange violet".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 30))) for _ in range(N_DOCS)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = load_spec({
        "teacher": {"source": str(teacher_dir)}, "storage": {"uri": str(tmp_path / "store")},
        "data": {"source": str(corpus), "held_out_sequences": 3},
        "init": {"seq_len": 16, "calibration_sequences": 1}, "smart": {"seq_len": 16},
        "ild": {"tokens": 160, "seq_len": 16, "micro_batch": 2}, "kd": {"tokens": 240, "seq_len": 24, "micro_batch": 2},
    })
    ctx = Context(storage=LocalStorage(tmp_path / "store"), scratch=tmp_path / "scratch", teacher_dir=str(teacher_dir),
                  local_storage=True, num_mla=1)
    read = []  # the documents sequences() kept, per call of tokenize_until
    real = jobs.context.tokenize_until

    def recording(*args, **kwargs):
        texts, stream = real(*args, **kwargs)
        read.append(texts)
        return texts, stream

    monkeypatch.setattr(jobs.context, "tokenize_until", recording)
    jobs.context._texts.cache_clear()
    yield spec, ctx, docs, read
    jobs.context._texts.cache_clear()


def _intervals(rows: np.ndarray, full: np.ndarray, seq_len: int) -> list[tuple[int, int]]:
    """The token interval [start, stop) of the packed stream each row is."""
    out = []
    for row in rows:
        (idx,) = np.nonzero((full == row).all(axis=1))
        assert len(idx) == 1, "rows must be unique in this corpus"
        out.append((int(idx[0]) * seq_len, (int(idx[0]) + 1) * seq_len))
    return out


def test_slices_are_disjoint_and_only_the_needed_text_is_read(setup, monkeypatch):
    spec, ctx, docs, read = setup
    budgets = token_budgets(spec)
    assert budgets == {"held_out": 3 * 24, "ild": 160, "kd": 240}

    def tokenising_again(*args):
        raise AssertionError("the corpus was tokenised a second time to pack it")

    monkeypatch.setattr(zebra.data, "_stream_array", tokenising_again)  # the one pass stored its stream
    ild, held16 = sequences(spec, ctx, 16, "ild")
    kd, held24 = sequences(spec, ctx, 24, "kd")
    monkeypatch.undo()
    assert held16.shape == (3, 16) and held24.shape == (3, 24) and ild.dtype == np.int64
    assert len(read) == 1  # read once for both seq_lens
    texts = read[0]  # the first documents, in order, and not all of them
    assert texts == docs[: len(texts)] and len(texts) < N_DOCS / 2
    tok = AutoTokenizer.from_pretrained(ctx.teacher_dir)
    counts = [len(ids) for ids in tokenize(texts, tok)]
    need = sum(budgets.values()) + 2 * 3 * 24  # the budgets plus the largest slack sequences() asks for
    assert sum(counts[:-1]) < need  # the last document read was the one that reached the need
    spans = {}
    for name, rows, seq_len in (("ild", ild, 16), ("held16", held16, 16), ("kd", kd, 24), ("held24", held24, 24)):
        full = packed_sequences(list(texts), tok, seq_len)
        spans[name] = _intervals(rows, full, seq_len)
    assert len(ild) == 160 // 16 - 1 or len(ild) == 160 // 16  # whole rows of the ild range
    held_stop = max(b for name in ("held16", "held24") for _, b in spans[name])
    assert held_stop <= budgets["held_out"]  # held-out rows lie in the held-out range
    for a, b in (("ild", "kd"), ("ild", "held24"), ("kd", "held16"), ("ild", "held16"), ("kd", "held24")):
        for s0, e0 in spans[a]:
            for s1, e1 in spans[b]:
                assert e0 <= s1 or e1 <= s0, f"{a} row [{s0}, {e0}) overlaps {b} row [{s1}, {e1})"
    assert all(budgets["held_out"] <= s and e <= budgets["held_out"] + 160 for s, e in spans["ild"])
    assert all(budgets["held_out"] + 160 <= s for s, _ in spans["kd"])


def test_a_short_corpus_keeps_every_held_out_row_and_shrinks_the_training_slices(setup, caplog):
    """Budgets beyond the corpus (a stage meant to repeat its data): the held-out rows are still all there
    and the same rows as with room to spare; ILD and KD share the rest, disjoint, and the log says so."""
    spec, ctx, docs, _ = setup
    _, held_before = sequences(spec, ctx, 24, "kd")
    jobs.context._texts.cache_clear()
    big = spec.model_copy(update={"kd": spec.kd.model_copy(update={"tokens": 8000})})
    ild, held16 = sequences(big, ctx, 16, "ild")
    kd, held24 = sequences(big, ctx, 24, "kd")
    assert held16.shape == (3, 16) and held24.shape == (3, 24)
    np.testing.assert_array_equal(held24, held_before)
    assert "repeats it" in caplog.text
    tok = AutoTokenizer.from_pretrained(ctx.teacher_dir)
    full16 = packed_sequences(list(docs), tok, 16)
    full24 = packed_sequences(list(docs), tok, 24)
    ild_end = max(b for _, b in _intervals(ild, full16, 16))
    assert ild_end <= min(a for a, _ in _intervals(kd, full24, 24))  # ILD before KD, no overlap
    assert len(kd) > 10 * len(ild)  # the proportion of the budgets: KD wanted 50x ILD's 160 tokens


def test_a_disabled_stage_has_no_slice(setup):
    spec, ctx, _, _ = setup
    spec = spec.model_copy(update={"kd": spec.kd.model_copy(update={"enabled": False})})
    assert "kd" not in token_budgets(spec)
    with pytest.raises(ValueError, match="'kd'"):
        sequences(spec, ctx, 24, "kd")
    with pytest.raises(ValueError, match="'dpo'"):
        sequences(spec, ctx, 24, "dpo")


def test_ray_tasks_tokenise_as_the_driver_does(ray_session, teacher_dir):  # noqa: F811
    """The parallel chunk map (Ray tasks, a few chunks in flight) gives tokenize_until the same documents and
    the same token stream as tokenising in the driver, and stops reading where the driver stops."""
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    rng = random.Random(1)
    docs = [" ".join(rng.choice("one two three four five six".split()) for _ in range(rng.randint(1, 40)))
            for _ in range(300)]
    pulled = []

    def corpus():
        for doc in docs:
            pulled.append(doc)
            yield doc

    want_texts, want = tokenize_until(iter(docs), tok, 2000, chunk_docs=16)
    got_texts, got = tokenize_until(corpus(), tok, 2000, chunk_docs=16,
                                    map_chunks=jobs.context.parallel_chunk_map(str(teacher_dir), in_flight=3))
    assert got_texts == want_texts and len(want_texts) < len(docs)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert np.array_equal(want, np.concatenate([np.array(ids) for ids in tokenize(want_texts, tok)]))
    assert len(pulled) <= len(want_texts) + 3 * 16  # read ahead by no more than the chunks in flight
