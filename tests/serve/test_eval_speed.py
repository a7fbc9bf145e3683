"""benchmarks.eval_speed against a served tiny hybrid: each setting of prompts per request x requests in flight
scores the same items to the same figures (the engine's batched scoring does not depend on how requests are
grouped), and the table and ratios are made of what was measured."""
import pytest
from ray import serve

from benchmarks.eval_speed import baseline_setting, measure, parse_setting, table
from serve.app import model_name_of, run_server
from serve.eval import APP_NAME, ROUTE

pytestmark = pytest.mark.slow


def test_settings_score_alike(serve_port, offline, tiny_hybrid_dir):
    settings = [baseline_setting(), parse_setting("1x1"), parse_setting("3x2")]
    url = run_server(tiny_hybrid_dir, port=serve_port, api_key_env=None, app_name=APP_NAME, route_prefix=ROUTE)
    try:
        rows = measure(url, model_name_of(tiny_hybrid_dir), tiny_hybrid_dir, ["zebra_mc"], 12, 256, settings)
    finally:
        serve.delete(APP_NAME)
    assert [r["setting"] for r in rows] == ["%dx%d" % s for s in settings]
    assert all(r["items"] == 12 for r in rows)
    assert rows[0]["scores"] and all(r["scores"] == rows[0]["scores"] for r in rows), [r["scores"] for r in rows]
    assert all(r["same_scores"] for r in rows) and rows[0]["x_baseline"] == 1.0
    for r in rows:
        assert r["items_per_s"] == pytest.approx(r["items"] / r["seconds"])
        assert r["x_baseline"] == pytest.approx(r["items_per_s"] / rows[0]["items_per_s"])
    assert table(rows).count("\n") == len(rows)


@pytest.mark.parametrize("bad", ["8", "0x4", "ax2"])
def test_a_bad_setting_names_the_option(bad):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="--settings"):
        parse_setting(bad)
