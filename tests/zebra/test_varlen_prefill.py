"""Varlen prefill (zebra.decode.Decoder.prefill_rows with lengths): prompts of different lengths right-padded
into one forward leave each cache row (MLA latents and RoPE keys, Mamba2 conv window and SSM state, length)
and each row's logits and later decode steps as prefilling that prompt alone does, in float64, also in
chunks shorter than the longest prompt; and the Mamba2 scan of a padded row equals the unpadded scan (the
reference in float64, the Triton scan in float32: on CUDA, or on the CPU under TRITON_INTERPRET=1)."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # read when the Triton kernels are decorated (kernels.ssd loads them lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.ssd import ssd_scan
from zebra.cache import ZebraCache
from tests.conftest import rel
from zebra.decode import Decoder


def row_state(cache: ZebraCache, row: int) -> list[torch.Tensor]:
    """What row `row` holds: its latents and RoPE keys up to its length, conv windows and SSM states."""
    n = int(cache.lengths[row])
    return ([t[row, :n] for t in [*cache.latent.values(), *cache.k_pe.values()]]
            + [t[row] for t in [*cache.conv.values(), *cache.ssm.values()]])


@pytest.mark.parametrize("chunk", [2048, 4, 3])
def test_varlen_prefill_and_steps_equal_each_prompt_alone(hybrid, chunk):
    """Prompts of 9, 2 and 6 tokens prefilled together into rows 1..3 (row 0 already holds a sequence), then
    decoded 4 steps, against each prompt prefilled alone in a fresh decoder and decoded alone."""
    assert hybrid.config.mla_layers and hybrid.config.mamba_layers
    lengths = [9, 2, 6]
    seqs = [torch.randint(3, 256, (n + 4,)) for n in lengths]
    ids = torch.zeros(3, max(lengths), dtype=torch.long)  # right padding with a real token id, not a special one
    ids[:] = torch.randint(3, 256, ids.shape)
    for r, n in enumerate(lengths):
        ids[r, :n] = seqs[r][:n]
    dec = Decoder(hybrid, max_batch=4, max_len=16, prefill_chunk=chunk)
    dec.prefill(torch.randint(3, 256, (5,)), 0)
    got = dec.prefill_rows(ids, 1, torch.tensor(lengths))
    assert dec.cache.lengths.tolist() == [5] + lengths
    held = [[t.clone() for t in row_state(dec.cache, r + 1)] for r in range(3)]
    steps = [dec.step(torch.stack([torch.tensor(7)] + [s[n + t] for s, n in zip(seqs, lengths)]))[1:]
             for t in range(4)]
    for r, n in enumerate(lengths):
        alone = Decoder(hybrid, max_batch=1, max_len=16, prefill_chunk=chunk)
        want = [alone.prefill(seqs[r][:n], 0)]
        err_logits = rel(got[r], want[0])
        state_errs = [rel(a, b) if b.norm() > 0 else float(a.abs().max())
                      for a, b in zip(held[r], row_state(alone.cache, 0))]
        want += [alone.step(seqs[r][n + t : n + t + 1])[0] for t in range(3)]
        err_steps = rel(torch.stack([s[r] for s in steps[:3]]), torch.stack(want[1:]))
        print(f"row {r}: {n} tokens, chunk {chunk}: logits {err_logits:.1e}, cache {max(state_errs):.1e}, "
              f"steps {err_steps:.1e}")
        assert err_logits < 1e-10 and max(state_errs) < 1e-10 and err_steps < 1e-10
    with torch.no_grad():  # and against the full forward (float64) of each whole sequence
        for r, n in enumerate(lengths):
            full = hybrid(seqs[r][None, : n + 4]).logits[0, n - 1 : n + 3]
            assert rel(torch.stack([got[r]] + [s[r] for s in steps[:3]]), full) < 1e-10


def test_varlen_mamba2_scan_ignores_the_padding(hybrid):
    """One Mamba2 layer: a padded batch with cache.valid gives each row the conv window and SSM state of its
    unpadded scan (float64), and a row with valid 0 keeps the state it had."""
    layer = hybrid.config.mamba_layers[0]
    mixer = hybrid.model.layers[layer].mixer
    x = torch.randn(3, 7, hybrid.config.hidden_size, dtype=torch.float64)
    cache = ZebraCache(hybrid.config, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        hybrid.model.layers[layer].mixer(x[:, :2], cache=_begun(cache, 2))  # some state to start from
        cache.advance(2)
        before = [cache.conv[layer].clone(), cache.ssm[layer].clone()]
        valid = torch.tensor([7, 3, 0])
        cache.begin(7, 3)
        cache.valid = valid
        mixer(x, cache=cache)
        for r, n in enumerate(valid.tolist()):
            alone = ZebraCache(hybrid.config, 1, 16, dtype=torch.float64)
            mixer(x[r : r + 1, :2], cache=_begun(alone, 2))
            alone.advance(2)
            if n:
                mixer(x[r : r + 1, :n], cache=_begun(alone, n))
            for got, want in [(cache.conv[layer][r], alone.conv[layer][0]), (cache.ssm[layer][r], alone.ssm[layer][0])]:
                print(f"row {r} ({n} real tokens): max diff {float((got - want).abs().max()):.1e}")
                assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
        assert torch.equal(cache.conv[layer][2], before[0][2]) and torch.equal(cache.ssm[layer][2], before[1][2])


def _begun(cache: ZebraCache, new: int) -> ZebraCache:
    cache.begin(new, cache.batch_size)
    return cache


def test_varlen_lengths_are_checked(hybrid):
    dec = Decoder(hybrid, max_batch=2, max_len=16)
    with pytest.raises(ValueError, match="lengths"):
        dec.prefill_rows(torch.ones(2, 4, dtype=torch.long), 0, torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="lengths"):
        dec.prefill_rows(torch.ones(2, 4, dtype=torch.long), 0, torch.tensor([0, 2]))


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs CUDA or the Triton interpreter")
def test_triton_scan_with_zero_dt_padding_equals_unpadded_reference():
    """kernels.ssd's Triton scan (float32) over rows whose dt is 0 past their length (what a varlen prefill
    feeds it): each row's final state and real outputs equal the float64 reference scan of the unpadded row."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, l, h, p, n = 2, 40, 2, 8, 16
    x, B, C = torch.randn(b, l, h, p), torch.randn(b, l, 1, n), torch.randn(b, l, 1, n)
    dt, A, D, s0 = torch.rand(b, l, h) * 0.1 + 0.01, -torch.rand(h) - 0.5, torch.randn(h), torch.randn(b, h, p, n)
    valid = torch.tensor([23, 7])
    padded_dt = dt * (torch.arange(l) < valid[:, None])[..., None]
    on = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    y, state = ssd_scan(*on(x, padded_dt, A, B, C), 16, D=D.to(device), initial_state=s0.to(device), backend="triton")
    for r, v in enumerate(valid.tolist()):
        row = [t[r : r + 1, :v].double() for t in (x, dt)]
        want_y, want_state = ssd_scan(row[0], row[1], A.double(), B[r : r + 1, :v].double(), C[r : r + 1, :v].double(),
                                      16, D=D.double(), initial_state=s0[r : r + 1].double(), backend="torch")
        err_state = float((state[r].cpu().double() - want_state[0]).abs().max())
        err_y = float((y[r, :v].cpu().double() - want_y[0]).abs().max())
        print(f"row {r} ({v} of {l} real): state max diff {err_state:.1e}, y max diff {err_y:.1e}")
        assert err_state < 1e-4 and err_y < 1e-4
