"""The offline zero-shot tasks (serve/tasks/*_local.yaml over the shared eval data): lm-eval scores a
tiny random model on them exactly as acc and acc_norm computed by hand from the model's float64
log-probabilities; the results table shows teacher vs student with stderr, retention and the average."""
import argparse
import hashlib
import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from jobs.spec import load_spec
from serve.cli import add_eval
from serve.eval import (BATCH_SIZE, DEFAULT_TASKS, NUM_CONCURRENT, average_row, local_task, markdown_table, retention_rows,
                        sha256_order)
from zebra.data import data_root

ITEMS = 3  # per task


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory, tokenizer_dir):
    """A random 2-layer Llama over the SmolLM2 vocabulary whose context holds a whole boolq passage."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # logits spread by a few nats: the choices' log-likelihoods differ
        model.lm_head.weight.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("models") / "tiny-long"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def first_items(task: str, n: int) -> list[dict]:
    """The first n items in the README's order: sorted by the hex sha256 of "0:{task}:{id}"."""
    docs = [json.loads(line) for line in (data_root() / "eval" / f"{task}.jsonl").read_text().splitlines()]
    return sorted(docs, key=lambda d: hashlib.sha256(f"0:{task}:{d['id']}".encode()).hexdigest())[:n]


def by_hand(model_dir, task: str) -> dict[str, float]:
    """acc and acc_norm of the first ITEMS items: one float64 forward per choice over context + " " + choice
    (encoded together, no special tokens), log-likelihood summed over the continuation's tokens;
    acc_norm divides it by the choice's length in characters."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    hits = {"acc": [], "acc_norm": []}
    for doc in first_items(task, ITEMS):
        n_ctx = len(tok(doc["context"], add_special_tokens=False).input_ids)
        lls = []
        for choice in doc["choices"]:
            ids = tok(doc["context"] + " " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            lls.append(sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids))))
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        hits["acc"].append(max(range(len(lls)), key=lls.__getitem__) == doc["gold"])
        hits["acc_norm"].append(max(range(len(normed)), key=normed.__getitem__) == doc["gold"])
    return {k: sum(v) / len(v) for k, v in hits.items()}


@pytest.mark.slow
def test_local_tasks_score_like_a_direct_log_likelihood(long_context_model):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(long_context_model), "dtype": "float64", "device": "cpu"},
        tasks=[local_task(t) for t in DEFAULT_TASKS], limit=ITEMS, task_manager=TaskManager(include_defaults=False),
    )
    for name in DEFAULT_TASKS:
        task = name.removesuffix("_local")
        got = out["results"][name]
        want = by_hand(long_context_model, task)
        print(f"{name}: lm-eval {got}; by hand {want}")
        assert out["n-samples"][name]["effective"] == ITEMS
        assert got["acc,none"] == pytest.approx(want["acc"])
        if task == "boolq":
            assert "acc_norm,none" not in got  # lm-eval reports only acc for boolq
        else:
            assert got["acc_norm,none"] == pytest.approx(want["acc_norm"])


def test_every_default_task_resolves_to_existing_data():
    for name in DEFAULT_TASKS:
        config = local_task(name)
        path = config["dataset_kwargs"]["data_files"]["test"]
        assert config["task"] == name and path.startswith(str(data_root())) and path.endswith(".jsonl")
        assert config["output_type"] == "multiple_choice" and not {"include", "doc_order"} & set(config)
        assert config["process_docs"] is sha256_order
    assert local_task("no_such_task") is None
    assert load_spec({}).eval.tasks == list(DEFAULT_TASKS)  # the eval stage's default (jobs.spec cannot import serve)
    ev = load_spec({}).eval  # and the stage sends lm-eval's requests as serve.eval does by default
    assert (ev.batch_size, ev.num_concurrent) == (BATCH_SIZE, NUM_CONCURRENT)
    parser = argparse.ArgumentParser()
    add_eval(parser.add_subparsers())
    assert parser.parse_args(["eval", "model"]).tasks.split(",") == list(DEFAULT_TASKS)  # `zebra eval`'s default


def test_items_come_in_the_readme_order():
    import datasets

    docs = [json.loads(line) for line in (data_root() / "eval" / "piqa.jsonl").read_text().splitlines()]
    ordered = sha256_order(datasets.Dataset.from_list(docs))
    assert [d["id"] for d in ordered][:20] == [d["id"] for d in first_items("piqa", 20)]
    assert len(ordered) == len(docs)


def test_missing_data_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("ZEBRA_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"arc_easy_local: no data file {tmp_path}/eval/arc_easy.jsonl"):
        local_task("arc_easy_local")


def test_table_has_stderr_retention_and_average():
    def result(acc, acc_norm=None):
        metrics = {"acc,none": acc, "acc_stderr,none": 0.01}
        return metrics | ({"acc_norm,none": acc_norm, "acc_norm_stderr,none": 0.02} if acc_norm else {})

    results = {"student": {"results": {"arc_easy_local": result(0.5, 0.4), "boolq_local": result(0.6)}},
               "teacher": {"results": {"arc_easy_local": result(0.5, 0.5), "boolq_local": result(0.7)}}}
    rows = retention_rows(results)
    average = average_row(rows)
    table = markdown_table(rows)
    print(table)
    # the headline metrics: arc_easy acc_norm 0.4 / 0.5, boolq acc 0.6 / 0.7
    assert average["student"] == pytest.approx(0.5) and average["teacher"] == pytest.approx(0.6)
    assert average["retention"] == pytest.approx(0.5 / 0.6)
    assert "| arc_easy_local | acc_norm | 0.4000 ± 0.0200 | 0.5000 ± 0.0200 | 0.800 |" in table
    assert "| average (2 tasks) | acc_norm/acc | 0.5000 | 0.6000 | 0.833 |" in table
