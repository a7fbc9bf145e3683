"""serve.eval.results_key: what an evaluation's scores depend on, and nothing else. A copy of the model
folder elsewhere has the original's key; a changed byte of a weight file or of a task's data, another
limit or device, gives another; and the key is the same in another process (no object addresses)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serve.eval import results_key
from zebra.data import data_root

REPO = Path(__file__).resolve().parents[2]
TASKS = ["arc_easy_local", "zebra_mc"]


@pytest.fixture
def model(make_tiny_llama, tmp_path):
    return make_tiny_llama(tmp_path / "model")


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    """$ZEBRA_DATA pointing at a writable copy of the shared eval data."""
    root = tmp_path / "data"
    shutil.copytree(data_root() / "eval", root / "eval")
    monkeypatch.setenv("ZEBRA_DATA", str(root))
    return root


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def test_key_follows_the_content_not_the_path(model, tmp_path, data_copy):
    key = results_key(model, TASKS, 20, gpu=False)
    copy = shutil.copytree(model, tmp_path / "elsewhere" / "model-copy")
    assert results_key(copy, TASKS, 20, gpu=False) == key
    assert results_key(model, TASKS, 21, gpu=False) != key
    assert results_key(model, TASKS, None, gpu=False) != key
    assert results_key(model, TASKS, 20, gpu=True) != key
    assert results_key(model, TASKS[:1], 20, gpu=False) != key
    flip_last_byte(next(copy.glob("*.safetensors")))
    assert results_key(copy, TASKS, 20, gpu=False) != key
    flip_last_byte(data_copy / "eval" / "arc_easy.jsonl")
    assert results_key(model, TASKS, 20, gpu=False) != key


def test_key_is_the_same_in_another_process(model):
    """arc_easy_local's config holds a function (its sha256 document order): named, not by address."""
    code = f"from serve.eval import results_key; print(results_key({str(model)!r}, {TASKS!r}, 20, gpu=False))"
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr[-3000:]
    assert other.stdout.split()[-1] == results_key(model, TASKS, 20, gpu=False)
