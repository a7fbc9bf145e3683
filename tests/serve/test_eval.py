"""lm-eval's `local-completions` runs the local multiple-choice task against the endpoint with no
network, for a student and a teacher, and writes the results table with a retention column; the
accuracy it reports equals the one computed directly from each model's log-likelihoods."""
import json
import shutil

import pytest

import torch
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer

import serve.eval as serve_eval
from serve.app import run_server
from serve.eval import TASKS_DIR, run_eval

pytestmark = pytest.mark.slow


def direct_accuracy(model_dir) -> float:
    """The task's accuracy from one float64 forward pass per choice, tokenized the way lm-eval does:
    context 'Question: q\\nAnswer:' and continuation ' choice', encoded together, no special tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = [json.loads(line) for line in (TASKS_DIR / "zebra_mc.jsonl").read_text().splitlines()]
    hits = []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        n_ctx = len(tok(context, add_special_tokens=False).input_ids)
        scores = []
        for choice in doc["choices"]:
            ids = tok(context + " " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids))))
        hits.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return sum(hits) / len(hits)


def test_local_task_offline_with_retention(serve_port, offline, tiny_model_dir, make_tiny_llama, tmp_path,
                                          monkeypatch):
    teacher_dir = make_tiny_llama(tmp_path / "teacher-llama", seed=1)
    monkeypatch.setenv("ZEBRA_EVAL_CACHE", str(tmp_path / "cache"))  # nothing to reuse: both models are scored
    served = []
    monkeypatch.setattr(serve_eval, "run_server", lambda path, **kw: served.append(path) or run_server(path, **kw))
    report = run_eval(tiny_model_dir, ["zebra_mc"], tmp_path / "out", teacher_dir=teacher_dir, port=serve_port)
    assert len(served) == 2 and report["reused"] == {}
    assert "zebra-eval" not in serve.status().applications  # run_eval deletes what it deployed
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    table = (tmp_path / "out" / "eval.md").read_text()
    print(table)
    acc = {r["metric"]: r for r in saved["rows"]}["acc"]
    student, teacher = direct_accuracy(tiny_model_dir), direct_accuracy(teacher_dir)
    print("direct accuracy: student", student, "teacher", teacher)
    assert acc["student"] == pytest.approx(student) and acc["teacher"] == pytest.approx(teacher)
    assert acc["retention"] == pytest.approx(student / teacher)
    assert saved["student"]["n-samples"]["zebra_mc"]["effective"] == 32

    # the same files, tasks and limit again (the teacher at another path): nothing is served, the same table
    again = run_eval(tiny_model_dir, ["zebra_mc"], tmp_path / "again", port=serve_port,
                     teacher_dir=shutil.copytree(teacher_dir, tmp_path / "teacher-copy"))
    assert len(served) == 2 and set(again["reused"]) == {"student", "teacher"}
    assert again["rows"] == report["rows"]
    assert f"| zebra_mc | acc | {student:.4f} ± " in table and f"{student / teacher:.3f} |" in table
    assert report["rows"] == saved["rows"]
