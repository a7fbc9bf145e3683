"""benchmarks.attention: the padded-V row computes MLA's attention exactly (output and every gradient), and
the --tiny run writes every row. Timings are never asserted."""
import json

import torch
import torch.nn.functional as F

from benchmarks.attention import main, step


def test_padded_v_step_equals_the_unpadded_attention():
    """Float64, fresh random q/k/v of MLA's training shapes (q/k wider than v): zero-padding v to q's head dim
    and slicing the output back gives the unpadded SDPA's gradients of q, k and v."""
    shapes = [(2, 3, 17, 12), (2, 3, 17, 12), (2, 3, 17, 8)]
    leaves = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    step(*leaves, pad_v_to=12, scale=0.3)
    padded = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    q, k, v = leaves
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    out.backward(torch.ones_like(out))
    for got, t in zip(padded, leaves):
        torch.testing.assert_close(got, t.grad, rtol=1e-12, atol=1e-12)


def test_tiny_run_writes_every_row(tmp_path):
    out = tmp_path / "attention.json"
    results = main(["--tiny", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["rows"].keys() == results["rows"].keys() == {"teacher", "mla", "mla_pad_v"}
    assert all(row["ms"] > 0 and row["x_teacher"] > 0 for row in written["rows"].values())
    assert written["shape"]["qk_dim"] == 96 and written["shape"]["v_dim"] == 64
