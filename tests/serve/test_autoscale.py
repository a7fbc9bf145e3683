"""Autoscaling: the shipped Serve config carries an autoscaling_config, and under load the deployment
grows to more replicas (seen through serve.status()), then shrinks back once the load stops."""
import threading
import time
from pathlib import Path

import pytest

import requests
import yaml
from ray import serve
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from serve.app import ServeArgs, build_app, run_server
from tests.serve.conftest import delete_apps

CONFIG = Path(__file__).parents[2] / "serve" / "config.yaml"


def test_config_carries_autoscaling(tiny_model_dir):
    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = config.applications
    (deployment,) = app.deployments
    assert app.import_path == "serve.app:build_app" and deployment.name == "ZebraServer"
    scaling = deployment.autoscaling_config
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"] and scaling["target_ongoing_requests"] > 0
    assert config.http_options.host == "127.0.0.1"
    ServeArgs.model_validate(app.args)
    assert isinstance(build_app({**app.args, "model_dir": str(tiny_model_dir)}), Application)


def running_replicas(app: str = "zebra") -> int:
    deployments = serve.status().applications[app].deployments
    return deployments["ZebraServer"].replica_states.get("RUNNING", 0)


def wait_for(condition, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.25)
    return time.monotonic() - start


@pytest.mark.slow
def test_scales_up_under_load_then_down(serve_port, tiny_model_dir):
    try:
        scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
                   "downscale_delay_s": 1.0, "metrics_interval_s": 0.5, "look_back_period_s": 1.0}
        url = run_server(tiny_model_dir, port=serve_port, autoscaling=scaling, num_cpus=1, api_key_env=None)
        assert running_replicas() == 1
        stop, statuses = threading.Event(), []

        def client() -> None:
            while not stop.is_set():
                r = requests.post(f"{url}/v1/completions", timeout=60,
                                  json={"model": "tiny-llama", "prompt": "Count slowly:", "max_tokens": 32})
                statuses.append(r.status_code)

        clients = [threading.Thread(target=client) for _ in range(4)]  # 4 ongoing requests: 2 replicas wanted
        for t in clients:
            t.start()
        try:
            up = wait_for(lambda: running_replicas() == 2, 120, "scale up to 2 replicas under load")
        finally:
            stop.set()
            for t in clients:
                t.join()
        down = wait_for(lambda: running_replicas() == 1, 120, "scale back to 1 replica after the load")
        print(f"scaled up after {up:.1f} s of load, down {down:.1f} s after it; {len(statuses)} requests")
        assert statuses and set(statuses) == {200}
    finally:
        delete_apps()
