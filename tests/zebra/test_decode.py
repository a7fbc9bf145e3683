"""zebra.decode.Decoder: slot prefill (chunked) and batched steps over rows of different lengths against
the full forward (float64), generate() against HF generate, a step traced whole by torch.compile, and on
CUDA the graph-captured step against the eager one."""
import pytest
import torch

from tests.conftest import rel
from zebra.decode import Decoder, default_buckets


def test_buckets_cover_every_batch_within_one_and_a_half():
    assert default_buckets(1) == [1]
    assert default_buckets(20) == [1, 2, 3, 4, 6, 8, 12, 16, 20]
    buckets = default_buckets(1000)
    assert buckets[-1] == 1000 and all(b / a <= 1.5 for a, b in zip(buckets[1:], buckets[2:]))


@pytest.mark.parametrize("chunk", [2048, 4])
def test_slot_prefill_and_steps_equal_full_forward(hybrid, chunk):
    """Three sequences prefilled into slots 2, 0, 1 with prompts of 9, 5 and 1 tokens, then decoded together."""
    dec = Decoder(hybrid, max_batch=3, max_len=16, prefill_chunk=chunk)
    prompt = {2: 9, 0: 5, 1: 1}
    seqs = {slot: torch.randint(3, 256, (n + 6,)) for slot, n in prompt.items()}
    got = {slot: [dec.prefill(seqs[slot][:n], slot)] for slot, n in prompt.items()}
    assert dec.cache.lengths.tolist() == [5, 1, 9]
    for t in range(6):
        logits = dec.step(torch.stack([seqs[slot][prompt[slot] + t] for slot in range(3)]))
        for slot in range(3):
            got[slot].append(logits[slot])
    with torch.no_grad():
        for slot, n in prompt.items():
            full = hybrid(seqs[slot][None]).logits[0, n - 1 :]
            err = rel(torch.stack(got[slot]), full)
            print(f"slot {slot}: {n} prompt tokens (chunk {chunk}) + 6 steps, rel err vs full forward {err:.2e}")
            assert err < 1e-10


def test_generate_equals_hf_generate_and_step_serves_fewer_rows(hybrid):
    ids = torch.randint(3, 256, (3, 7))
    dec = Decoder(hybrid, max_batch=4, max_len=16)
    got = dec.generate(ids, max_new_tokens=6)
    want = hybrid.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, want)
    dec.prefill(ids[0], 0)
    with torch.no_grad():
        step = dec.step(ids[0, :1])  # only row 0 advances
        full = hybrid(torch.cat([ids[0], ids[0, :1]])[None]).logits[0, -1]
    assert dec.cache.lengths[0] == 8 and rel(step[0], full) < 1e-10
    with pytest.raises(ValueError, match="exceed max_len 16"):
        dec.generate(ids, max_new_tokens=11)


def test_decode_step_traces_as_one_graph(hybrid):
    """torch.compile(fullgraph=True) fails on any graph break: the whole step, every layer, is one graph."""
    dec = Decoder(hybrid, max_batch=2, max_len=12)
    for slot in range(2):
        dec.prefill(torch.randint(3, 256, (4 + slot,)), slot)
    tokens = torch.randint(3, 256, (2, 1))
    state = dec.cache.tensors() + [dec.cache.lengths]
    before = [t.clone() for t in state]
    with torch.no_grad():
        eager = dec._logits(tokens, dec.cache)
        for t, saved in zip(state, before):  # the same step again, now traced
            t.copy_(saved)
        view = dec.cache.narrow(0, 2)
        view.static = True
        traced = torch.compile(dec._logits, backend="eager", fullgraph=True)(tokens, view)
    print("traced vs eager step max diff", float((traced - eager).abs().max()))
    assert torch.allclose(traced, eager, rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, compile", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_graph_steps_equal_eager_steps(hybrid, dtype, compile):
    """Rows of 9, 4 and 6 tokens step together in bucket 4 (row 3 free): captured at the first step, then
    replayed; with compile, the step is also torch.compiled whole (fullgraph) with the decode kernels in it."""
    model = hybrid.to("cuda", dtype)
    prompts = [torch.randint(3, 256, (n,)) for n in (9, 4, 6)]
    tokens = torch.randint(3, 256, (8, 3), device="cuda")
    runs = []
    for graphs in (False, True):
        dec = Decoder(model, max_batch=4, max_len=32, graphs=graphs, buckets=[2, 4], compile=graphs and compile)
        out = [torch.stack([dec.prefill(p, slot) for slot, p in enumerate(prompts)])]
        out += [dec.step(step_tokens) for step_tokens in tokens]
        assert dec.cache.lengths[:3].tolist() == [17, 12, 14]
        runs.append(torch.stack(out).float())
    err = rel(runs[1], runs[0])
    print(f"{dtype}, compile={compile}: graph vs eager steps rel err {err:.2e}")
    assert err < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
def test_hf_generate_on_cuda_equals_the_decoder(hybrid):
    """HF generate on CUDA (no automatic compile: see ZebraForCausalLM._valid_auto_compile_criteria) equals the
    Decoder's graph-captured steps."""
    model = hybrid.to("cuda", torch.float32)
    ids = torch.randint(3, 256, (2, 7), device="cuda")
    want = Decoder(model, max_batch=2, max_len=16).generate(ids, max_new_tokens=6)
    got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_no_garbage_collection_while_a_step_is_captured(hybrid, monkeypatch):
    """A dropped Decoder is a reference cycle that keeps its captured graphs until the collector runs; if it ran
    in the middle of another capture, destroying those graphs would fail that capture (seen on an H200 in
    benchmarks.decode's max-batch search). So the collector is off from capture_begin to capture_end, and a
    new decoder's graph steps still equal the eager steps."""
    import gc

    collecting = []
    begin = torch.cuda.CUDAGraph.capture_begin
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin",
                        lambda self, *a, **k: collecting.append(gc.isenabled()) or begin(self, *a, **k))
    model = hybrid.to("cuda", torch.float32)
    tokens = torch.randint(3, 256, (3, 2), device="cuda")
    old = Decoder(model, max_batch=2, max_len=16, buckets=[2])
    old.step(tokens[0])
    del old
    new = Decoder(model, max_batch=2, max_len=16, buckets=[2])
    got = torch.stack([new.step(t) for t in tokens])
    eager = Decoder(model, max_batch=2, max_len=16, graphs=False)
    want = torch.stack([eager.step(t) for t in tokens])
    assert collecting == [False, False] and gc.isenabled()
    assert rel(got, want) < 1e-5
