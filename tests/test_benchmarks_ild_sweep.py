"""benchmarks.ild_sweep: one layer trained as the ILD stage trains it (only its mixer; the ILD loss, which
falls on the batches it trains on), every learning rate on the same data, a table of ratios and JSON."""
import copy
import json

import torch

from benchmarks import ild_sweep
from benchmarks.decode import tiny_pair


def test_only_the_mixer_trains_and_the_loss_falls():
    teacher = tiny_pair()[0].float()
    ids = torch.randint(0, teacher.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    states = ild_sweep.layer_states(teacher, ids, [2])[2]
    x, out, mixer = states
    with torch.no_grad():
        hs = teacher(ids, output_hidden_states=True).hidden_states
        t = teacher.model.layers[2]
        mid = x + mixer  # the layer's residual stream after its attention
        rebuilt = mid + t.mlp(t.post_attention_layernorm(mid))
    assert torch.allclose(x, hs[2]) and torch.allclose(out, hs[3])
    assert torch.allclose(rebuilt, out, atol=1e-5)  # the attention output is the one between the two
    (student,) = ild_sweep.students(teacher, ["mamba"], ids, kv_rank=16, qk_rope_dim=8).values()
    layer = student.model.layers[2]
    before = copy.deepcopy(layer.state_dict())
    losses = ild_sweep.train_layer(layer, states, lr=2e-3, steps=12, batch=4)
    changed = {name for name, value in layer.state_dict().items() if not torch.equal(value, before[name])}
    assert changed and all(name.startswith("mixer.") for name in changed)
    assert losses[-1] < losses[0]  # the same 4 sequences every step: the loss on them falls


def test_tiny_run_writes_every_rate(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    ild_sweep.main(["--tiny", "--lrs", "1e-4", "1e-3", "--out", str(out)])
    assert "| mixer | layer | init | lr 0.0001 | lr 0.001 | lr 0.001 / lr 0.0001 |" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert {(r["kind"], r["layer"]) for r in report["rows"]} == {("mamba", 1), ("mla", 1)}
    for row in report["rows"]:
        assert set(row["lrs"]) == {"0.0001", "0.001"}
        assert all(v["held_out"] > 0 for v in row["lrs"].values())
