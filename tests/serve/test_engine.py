"""The decoding engine without Ray, on a tiny Llama and on a tiny Zebra hybrid: greedy decoding
against HF generate, log-probs against a float64 forward pass, continuous batching (interleaved
requests equal the same requests served alone), admission by cache bytes, seeds, stop strings,
streaming, the batched sampler and the incremental detokeniser against simple references, a failing
request that leaves the others alone, and loading from S3 (moto) or a broken folder."""
import json
import logging
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve.engine import Engine, Prompt, Sampling, Update, _PaddedRows, check_model_dir, resolve_model_dir, sample, uniform


@pytest.fixture(scope="module", params=["tiny_model_dir", "tiny_hybrid_dir"], ids=["llama", "zebra"])
def model_dir(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = Engine.load(model_dir)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def model64(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


def random_ids(n: int, seed: int, vocab: int = 49152) -> tuple[int, ...]:
    return tuple(torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist())


def greedy(n: int, temperature: float = 0.0, **kw) -> Sampling:
    return Sampling(max_tokens=n, temperature=temperature, **kw)


def test_greedy_matches_hf_generate(engine):
    for seed in range(3):
        ids = random_ids(7 + seed, seed)
        got = engine.complete([Prompt(ids, greedy(6))])[0]
        want = engine.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):]
        print("engine", got.output_ids, "generate", want.tolist())
        assert got.output_ids == want.tolist()


def test_echo_logprobs_match_float64_forward(engine, model64):
    ids = random_ids(12, seed=5)
    got = engine.complete([Prompt(ids, greedy(4), logprobs=3, echo=True)])[0]
    full = list(ids) + got.output_ids
    with torch.no_grad():
        ref = model64(torch.tensor([full])).logits[0].log_softmax(-1)  # [seq, vocab]
    want = ref[:-1].gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    diff = (torch.tensor(got.token_logprobs[1:], dtype=torch.float64) - want).abs().max().item()
    print("max |logprob - float64 reference|", diff)
    assert diff < 1e-4
    for pos, top in enumerate(got.top_logprobs[1:]):
        values, tokens = ref[pos].topk(3)
        assert list(top) == tokens.tolist()
        assert max(abs(a - b) for a, b in zip(top.values(), values.tolist())) < 1e-4
    # greedy: each new token is the top-1 of its position
    assert got.output_ids == ref[len(ids) - 1 : -1].argmax(-1).tolist()


def test_batch_gives_each_prompt_what_it_gets_alone(engine):
    prompts = [
        Prompt(random_ids(9, 1), greedy(5), logprobs=1, echo=True),
        Prompt(random_ids(9, 2), greedy(7, temperature=0.9, seed=11)),
        Prompt(random_ids(4, 3), greedy(3, temperature=1.3, top_p=0.8, seed=12)),
        Prompt(random_ids(6, 5), greedy(6, temperature=0.7, top_k=5, seed=13), logprobs=2),
        Prompt(random_ids(9, 4), greedy(0), logprobs=1, echo=True),
    ]
    together = engine.complete(prompts)
    for prompt, got in zip(prompts, together):
        alone = engine.complete([prompt])[0]
        assert got.output_ids == alone.output_ids
        assert got.finish_reason == alone.finish_reason
        assert len(got.token_logprobs) == len(alone.token_logprobs)
        for a, b in zip(got.token_logprobs, alone.token_logprobs):
            assert (a is None and b is None) or abs(a - b) < 1e-5
    assert together[4].output_ids == [] and len(together[4].token_logprobs) == 9


def test_one_token_requests_are_scored_together(engine, model64):
    """lm-eval's log-likelihood requests (echo, logprobs, max_tokens 0 or 1) never join the decode batch:
    the waiting ones run together in right-padded forwards of at most score_tokens padded tokens, and each
    equals the float64 forward of its prompt alone (log-probs, top-k, the greedy new token)."""
    scorer = Engine(engine.model, engine.tokenizer, max_batch=4, score_tokens=40)
    batches = []
    score = scorer._score
    scorer._score = lambda batch: (batches.append([len(r.prompt.ids) for r in batch]), score(batch))[1]
    prompts = [Prompt(random_ids(3 + 5 * i % 13, 40 + i), greedy(i % 2), logprobs=2, echo=True) for i in range(9)]
    done = serve_waiting_at_once(scorer, prompts)  # all waiting at once, as with lm-eval's concurrent requests
    print("batches (prompt lengths)", batches)
    assert sorted(n for b in batches for n in b) == sorted(len(p.ids) for p in prompts)
    assert len(batches) < len(prompts)
    assert all(len(b) == 1 or len(b) * max(b) <= 40 for b in batches)
    for i, prompt in enumerate(prompts):
        update = done[i]
        assert update.error is None
        got, ids = update.completion, list(prompt.ids)
        with torch.no_grad():
            ref = model64(torch.tensor([ids])).logits[0].log_softmax(-1)  # [seq, vocab]
        want = ref[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert got.token_logprobs[0] is None
        assert max(abs(a - b) for a, b in zip(got.token_logprobs[1 : len(ids)], want.tolist())) < 1e-4
        for pos, top in enumerate(got.top_logprobs[1 : len(ids)]):
            assert list(top) == ref[pos].topk(2).indices.tolist()
        if prompt.sampling.max_tokens == 1:
            assert got.output_ids == [ref[-1].argmax().item()]
            assert abs(got.token_logprobs[-1] - ref[-1].max().item()) < 1e-4
        else:
            assert got.output_ids == [] and len(got.token_logprobs) == len(ids)


def test_a_one_token_request_arriving_while_others_are_scored_is_scored_too(engine):
    """A max_tokens-0 request that arrives while the scheduler scores others never joins the decode batch
    (where it would never finish)."""
    scorer = Engine(engine.model, engine.tokenizer, max_batch=4)
    done: dict[str, object] = {}
    score = scorer._score

    def score_then_submit(batch):
        if "late" not in done:
            done["late"] = None
            scorer.submit(Prompt(random_ids(5, 61), greedy(0), logprobs=1, echo=True),
                          lambda u: done.__setitem__("late", u))
        return score(batch)

    scorer._score = score_then_submit
    first = scorer.complete([Prompt(random_ids(6, 60), greedy(1), logprobs=1, echo=True)])[0]
    deadline = time.monotonic() + 30
    while done["late"] is None and time.monotonic() < deadline:
        time.sleep(0.01)
    scorer.close()
    assert len(first.output_ids) == 1
    assert done["late"] is not None and done["late"].error is None
    assert done["late"].completion.output_ids == [] and len(done["late"].completion.token_logprobs) == 5


def count_prefills(engine: Engine) -> list[list[int]]:
    """Wrap the engine's prefills: the list returned gets the prompt lengths of each prefill forward."""
    groups: list[list[int]] = []
    many, one = engine.rows.prefill_many, engine.rows.prefill
    engine.rows.prefill_many = lambda prompts: (groups.append([len(p) for p in prompts]), many(prompts))[1]
    engine.rows.prefill = lambda ids, all_logits: (groups.append([len(ids)]), one(ids, all_logits))[1]
    return groups


def serve_waiting_at_once(engine: Engine, prompts: list[Prompt]) -> dict[int, Update]:
    """Submit prompts all at once (under the engine's lock, as under concurrent load); their last updates."""
    done: dict[int, Update] = {}
    with engine._wake:
        for i, prompt in enumerate(prompts):
            engine.submit(prompt, lambda u, i=i: done.__setitem__(i, u))
    deadline = time.monotonic() + 60
    while len(done) < len(prompts) and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.close()
    return done


def assert_each_as_alone(engine: Engine, prompts: list[Prompt], done: dict[int, Update]) -> None:
    for i, prompt in enumerate(prompts):
        assert done[i].error is None
        alone = engine.complete([prompt])[0]
        print(i, len(prompt.ids), done[i].completion.output_ids, alone.output_ids)
        assert done[i].completion.output_ids == alone.output_ids and done[i].completion.text == alone.text


def test_waiting_prompts_of_different_lengths_are_prefilled_together(engine):
    """Prompts of different lengths that wait together are prefilled in one padded forward (the hybrid:
    Decoder.prefill_rows with lengths into consecutive cache rows; the teacher: one left-padded forward joined
    to the batch), within the batch's slots, first come first served; each answer equals the same request
    served alone."""
    batched = Engine(engine.model, engine.tokenizer, max_batch=4)
    groups = count_prefills(batched)
    lengths = [7, 3, 11, 5, 6, 4]
    prompts = [Prompt(random_ids(n, 70 + i), greedy(3 + i)) for i, n in enumerate(lengths)]
    done = serve_waiting_at_once(batched, prompts)
    print("prefill groups", groups)
    assert groups == [[7, 3, 11, 5], [6], [4]]  # four slots: the first four together; the rest as slots free up
    assert_each_as_alone(engine, prompts, done)


def test_prefill_groups_stop_at_score_tokens_and_at_an_echo(engine):
    """A group holds at most score_tokens padded tokens (rows x longest prompt) and never an echoed prompt,
    which is prefilled alone (it needs every position's logits); FIFO order is kept."""
    batched = Engine(engine.model, engine.tokenizer, max_batch=8, score_tokens=24)
    groups = count_prefills(batched)
    prompts = [Prompt(random_ids(n, 90 + i), greedy(4)) for i, n in enumerate([5, 3, 6, 9, 4, 2])]
    prompts[2] = Prompt(prompts[2].ids, greedy(4), logprobs=1, echo=True)
    done = serve_waiting_at_once(batched, prompts)
    print("prefill groups", groups)
    assert groups == [[5, 3], [6], [9, 4], [2]]  # 3 x 9 > 24 tokens: the 2 waits for the next group
    assert_each_as_alone(engine, prompts, done)
    echoed = engine.complete([prompts[2]])[0].token_logprobs[1:6]  # the prompt's, from its own forward
    assert done[2].completion.token_logprobs[1:6] == pytest.approx(echoed, rel=1e-5)


@torch.no_grad()
def test_teacher_rows_prefilled_together_equal_each_alone(teacher64):
    """The teacher's rows: prompts of 6, 2 and 9 tokens prefilled in one left-padded forward (padding mask,
    per-row position ids) join a running row of 4 tokens; then 3 steps of all four rows. Every logit equals
    the full forward of that row's sequence alone (float64)."""
    rows = _PaddedRows(teacher64, lambda tokens: tokens)
    lengths = [4, 6, 2, 9]
    seqs = [torch.randint(3, 256, (n + 3,)) for n in lengths]
    got = [[rows.prefill(seqs[0][:4], False)[-1]]]
    got += [[logits] for logits in rows.prefill_many([tuple(s[:n].tolist()) for s, n in zip(seqs[1:], lengths[1:])])]
    for t in range(3):
        logits = rows.step(torch.stack([s[n + t] for s, n in zip(seqs, lengths)]))
        for r in range(4):
            got[r].append(logits[r])
    for r, n in enumerate(lengths):
        full = teacher64(seqs[r][None]).logits[0, n - 1 :]
        err = float((torch.stack(got[r]) - full).norm() / full.norm())
        print(f"row {r} ({n} prompt tokens): rel err {err:.1e}")
        assert err < 1e-10


def test_interleaved_requests_equal_each_served_alone(engine):
    """Requests of different lengths join a running batch of 3 slots as others leave (continuous
    batching); every greedy answer equals the same request served alone."""
    batched = Engine(engine.model, engine.tokenizer, max_batch=3)
    joins = []  # rows already running when prompts are prefilled
    prefill, many = batched.rows.prefill, batched.rows.prefill_many
    batched.rows.prefill = lambda ids, all_logits: (joins.append(len(batched._running)), prefill(ids, all_logits))[1]
    batched.rows.prefill_many = lambda prompts: (joins.append(len(batched._running)), many(prompts))[1]
    prompts = [Prompt(random_ids(3 + 4 * i % 11, 20 + i), greedy(2 + 3 * i % 9)) for i in range(8)]
    results, done = {}, threading.Event()

    def collect(i):
        def notify(update):
            results[i] = update
            if len(results) == len(prompts):
                done.set()
        return notify

    for i, prompt in enumerate(prompts):
        batched.submit(prompt, collect(i))
        time.sleep(0.01 * (i % 3))  # some arrive while others decode
    assert done.wait(60)
    batched.close()
    assert max(joins) > 0, "no prompt joined a running batch"
    for i, prompt in enumerate(prompts):
        alone = engine.complete([prompt])[0]
        got = results[i].completion
        print(i, len(prompt.ids), got.output_ids, alone.output_ids)
        assert got.output_ids == alone.output_ids and got.text == alone.text
        assert got.finish_reason == alone.finish_reason


@pytest.mark.gpu
def test_interleaved_requests_on_cuda(tmp_path):
    """The CUDA paths (the teacher's padded DynamicCache, the hybrid's Decoder with CUDA-graph steps over
    batch buckets): interleaved greedy requests equal each served alone, in float32."""
    from benchmarks.serve_load import tiny_pair

    for folder in tiny_pair(tmp_path):
        engine = Engine.load(folder, device="cuda", dtype="float32", max_batch=5)
        prompts = [Prompt(random_ids(5 + 7 * i % 23, i, vocab=256), greedy(3 + 5 * i % 17)) for i in range(12)]
        together = engine.complete(prompts)
        for prompt, got in zip(prompts, together):
            assert got.output_ids == engine.complete([prompt])[0].output_ids, folder.name
        engine.close()


def test_admission_by_exact_cache_bytes(tiny_model_dir, tiny_hybrid_dir):
    """Under one budget each model runs as many sequences at once as their exact cache bytes allow:
    the hybrid (smaller cache per token) more than its teacher."""
    prompt = Prompt(random_ids(16, 1), greedy(16))
    seen = {}
    for name, folder in (("teacher", tiny_model_dir), ("hybrid", tiny_hybrid_dir)):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        teacher_bytes = 32 * 256  # the tiny Llama: 2 layers x K,V x 2 heads x 8 dims x 4 bytes per token
        engine = Engine(model, AutoTokenizer.from_pretrained(folder), max_batch=64, max_len=32,
                        cache_budget_bytes=4 * teacher_bytes)
        widths = []
        step = engine.rows.step
        engine.rows.step = lambda tokens: (widths.append(len(tokens)), step(tokens))[1]
        engine.complete([prompt] * 12)
        engine.close()
        seen[name] = max(widths)
        print(name, "bytes per sequence", engine.sequence_bytes(32), "most at once", seen[name])
        assert seen[name] == min(12, engine.cache_budget // engine.sequence_bytes(32))
    assert seen["teacher"] == 4 and seen["hybrid"] > seen["teacher"]


def test_max_len_past_the_models_positions_is_capped_with_a_warning(tiny_model_dir, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    positions = model.config.max_position_embeddings
    with caplog.at_level("WARNING", logger="serve.engine"):
        engine = Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir), max_len=positions + 5)
    engine.close()
    assert engine.max_len == positions
    assert f"max_len {positions + 5} is past the model's max_position_embeddings {positions}" in caplog.text
    caplog.clear()
    Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir), max_len=positions).close()
    assert "max_position_embeddings" not in caplog.text


def test_teacher_padded_cache_stays_within_its_charged_footprint(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    engine = Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir), max_batch=4)
    seen = []
    step = engine.rows.step

    def measured(tokens):
        held = sum(t.nbytes for layer in engine.rows.cache.layers for t in (layer.keys, layer.values))
        seen.append((held, engine.rows.footprint([r.tokens for r in engine._running])))
        return step(tokens)

    engine.rows.step = measured
    engine.complete([Prompt(random_ids(4 + 9 * i % 20, i), greedy(2 + 7 * i % 13)) for i in range(10)])
    engine.close()
    print("cache bytes held / charged per step", seen)
    assert len(seen) > 10 and all(held <= charged for held, charged in seen)


def test_seed_fixes_samples(engine):
    ids = random_ids(6, 7)
    runs = [engine.complete([Prompt(ids, greedy(8, temperature=1.0, seed=s))])[0].output_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stop_string_and_stream(engine):
    ids = random_ids(8, 9)
    full = engine.complete([Prompt(ids, greedy(10))])[0]
    stop = full.text[6:9]
    cut = engine.complete([Prompt(ids, greedy(10, stop=(stop,)))])[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    for prompt, want in ((Prompt(ids, greedy(10)), full), (Prompt(ids, greedy(10, stop=(stop,))), cut)):
        pieces = list(engine.stream(prompt))
        assert "".join(text for text, _ in pieces) == want.text
        assert [reason for _, reason in pieces[:-1]] == [None] * (len(pieces) - 1)
        assert pieces[-1][1] == want.finish_reason


def test_ignore_eos_decodes_past_end_of_sequence(engine, monkeypatch):
    ids = random_ids(6, 8)
    first = engine.complete([Prompt(ids, greedy(1))])[0].output_ids[0]
    monkeypatch.setattr(engine, "eos_ids", frozenset({first}))  # the model's first greedy token ends it
    stopped = engine.complete([Prompt(ids, greedy(5))])[0]
    assert stopped.output_ids == [first] and stopped.finish_reason == "stop" and stopped.text == ""
    full = engine.complete([Prompt(ids, greedy(5, ignore_eos=True))])[0]
    assert len(full.output_ids) == 5 and full.output_ids[0] == first and full.finish_reason == "length"


def test_bad_sampling_is_refused_by_name(engine):
    ids = random_ids(5, 1)
    for sampling, field in ((greedy(4, temperature=1e-300), "temperature"), (greedy(4, temperature=3.0), "temperature"),
                            (greedy(4, temperature=1.0, seed=2**64), "seed"), (greedy(4, top_p=0.0), "top_p"),
                            (greedy(4, top_k=-1), "top_k"), (greedy(10**6), "max_tokens")):
        with pytest.raises(ValueError, match=f"^{field}"):
            engine.submit(Prompt(ids, sampling), lambda update: None)


def test_a_failing_prompt_leaves_the_others_alone(engine):
    prompts = [Prompt(random_ids(5 + i, 40 + i), greedy(6)) for i in range(4)]
    want = [engine.complete([p])[0].output_ids for p in prompts]
    prefill = engine.rows.prefill
    bad = len(prompts[2].ids)

    def flaky(ids, all_logits):
        if len(ids) == bad:
            raise RuntimeError("simulated out of memory")
        return prefill(ids, all_logits)

    def flaky_many(prompts):
        if any(len(p) == bad for p in prompts):
            raise RuntimeError("simulated out of memory")
        return prefill_many(prompts)

    prefill_many = engine.rows.prefill_many
    engine.rows.prefill, engine.rows.prefill_many = flaky, flaky_many
    try:
        updates = []
        done = threading.Semaphore(0)
        for p in prompts:
            engine.submit(p, lambda u, p=p: (updates.append((p, u)), done.release()))
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        engine.rows.prefill, engine.rows.prefill_many = prefill, prefill_many
    by_prompt = {p: u for p, u in updates}
    assert "simulated out of memory" in by_prompt[prompts[2]].error
    for i in (0, 1, 3):
        assert by_prompt[prompts[i]].completion.output_ids == want[i]


def test_cancelled_stream_frees_its_slot(engine):
    pieces = engine.stream(Prompt(random_ids(5, 3), greedy(50)))
    next(pieces)
    pieces.close()
    start = time.monotonic()
    while engine._running and time.monotonic() - start < 10:
        time.sleep(0.01)
    assert not engine._running


# -- the sampler and the detokeniser against simple references ----------------------------------


def fmix32_reference(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def uniform_reference(seed: int, step: int) -> float:
    key = fmix32_reference((seed & 0xFFFFFFFF) ^ fmix32_reference((seed >> 32) + 0x9E3779B9))
    a = fmix32_reference(key ^ fmix32_reference((2 * step) ^ 0x6A09E667))
    b = fmix32_reference(key ^ fmix32_reference((2 * step + 1) ^ 0x6A09E667))
    return ((a >> 5) * 2**26 + (b >> 6)) / 2**53


def test_uniform_equals_reference_and_is_uniform():
    g = torch.Generator().manual_seed(0)
    seeds = torch.cat([torch.randint(0, 2**62, (200,), generator=g) * 2 + 1, torch.tensor([0, 2**63 - 1])])
    steps = torch.randint(0, 2**31, (202,), generator=g)
    got = uniform(seeds, steps)
    want = torch.tensor([uniform_reference(s, t) for s, t in zip(seeds.tolist(), steps.tolist())], dtype=torch.float64)
    assert torch.equal(got, want)
    draws = uniform(torch.arange(500).repeat_interleave(100), torch.arange(100).repeat(500)).sort().values
    ks = (draws - torch.arange(1, len(draws) + 1, dtype=torch.float64) / len(draws)).abs().max().item()
    print("Kolmogorov-Smirnov distance of 50,000 draws", ks)
    assert 0 <= draws.min() and draws.max() < 1 and ks < 0.01  # the 99.9% bound for n = 50,000 is 0.0087


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """float64: softmax(logits / T), the k likeliest kept and renormalised, then the smallest set reaching top_p."""
    p = (logits.double() / temperature).softmax(-1)
    order = p.argsort(descending=True).tolist()
    kept = order[:top_k] if top_k else order
    q = torch.zeros_like(p)
    q[kept] = p[kept] / p[kept].sum()
    mass, keep = 0.0, []
    for t in kept:
        if mass >= top_p:
            break
        keep.append(t)
        mass += q[t].item()
    out = torch.zeros_like(p)
    out[keep] = q[keep] / q[keep].sum()
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.6), (0.9, 5, 0.8)])
def test_sampler_draws_the_reference_distribution(temperature, top_k, top_p):
    logits = torch.randn(8, generator=torch.Generator().manual_seed(top_k)) * 2
    want = reference_probs(logits, temperature, top_k, top_p)
    n = 40_000
    u = uniform(torch.arange(n), torch.zeros(n, dtype=torch.long))
    rows = logits.expand(n, -1)
    tokens = sample(rows, torch.full((n,), temperature), torch.full((n,), top_p), torch.full((n,), top_k), u)
    freq = torch.bincount(tokens, minlength=8).double() / n
    diff = (freq - want).abs().max().item()
    print("max |frequency - float64 probability|", diff, "want", want.tolist())
    assert diff < 4 * (0.25 / n) ** 0.5
    assert torch.all(freq[want == 0] == 0)


def test_sampler_rows_are_independent_and_greedy_is_argmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g)
    temperature = torch.tensor([0.0, 1.0, 0.5, 0.0, 2.0, 1.0])
    top_p, top_k = torch.tensor([1.0, 0.9, 1.0, 0.5, 1.0, 0.3]), torch.tensor([0, 0, 7, 3, 0, 0])
    u = torch.rand(6, generator=g, dtype=torch.float64)
    together = sample(logits, temperature, top_p, top_k, u)
    alone = torch.cat([sample(logits[i:i + 1], temperature[i:i + 1], top_p[i:i + 1], top_k[i:i + 1], u[i:i + 1])
                       for i in range(6)])
    assert torch.equal(together, alone)
    assert together[0] == logits[0].argmax() and together[3] == logits[3].argmax()


def test_incremental_detokenizer_equals_full_decode(engine):
    from serve.engine import _Detokenizer

    tok = engine.tokenizer
    texts = ["naïve café — 日本語のテキスト 🦓🦓 done", "  two  spaces\nand\ttabs ", "ÀÉÎÕÜ ∑∫√ 👩‍👩‍👧"]
    cases = [tok(t, add_special_tokens=False).input_ids for t in texts]
    cases += [list(random_ids(30, s, vocab=len(tok))) for s in range(3)]
    for ids in cases:
        d = _Detokenizer(tok)
        for k, t in enumerate(ids):
            d.add(t)
            assert tok.decode(ids[: k + 1]).startswith(d.text)
            assert "\ufffd" not in d.text or "\ufffd" in tok.decode(ids[: k + 1])
        d.flush()
        assert d.text == tok.decode(ids), ids


# -- loading -------------------------------------------------------------------------------------


def test_load_from_s3(model_dir, tmp_path, monkeypatch, engine):
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                            "ZEBRA_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="models")
        files = sorted(p for p in model_dir.iterdir() if p.is_file())
        for path in files:
            s3.upload_file(str(path), "models", f"export/tiny/{path.name}")
        local = resolve_model_dir("s3://models/export/tiny")
        assert sorted(p.name for p in local.iterdir()) == [p.name for p in files]
        assert str(local).startswith(str(tmp_path / "cache"))
        ids = random_ids(5, 3)
        from_s3 = Engine.load("s3://models/export/tiny").complete([Prompt(ids, greedy(4))])[0]
        assert from_s3.output_ids == engine.complete([Prompt(ids, greedy(4))])[0].output_ids
    finally:
        server.stop()


def test_broken_folders_are_named(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_dir(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    check_model_dir(broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"weights {weights}: truncated"):
        check_model_dir(broken)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        check_model_dir(broken)
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "part-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"missing weight files \['part-1.safetensors'\]"):
        check_model_dir(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        check_model_dir(broken)
