"""The decoding engine without Ray, on a tiny Llama and on a tiny Zebra hybrid: greedy decoding
against HF generate, log-probs against a float64 forward pass, batching, seeds, stop strings,
streaming, top-p, and loading from S3 (moto)."""
import logging

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer
from transformers import AutoModelForCausalLM

from serve.engine import Engine, Prompt, Sampling, _top_p, resolve_model_dir


@pytest.fixture(scope="module", params=["tiny_model_dir", "tiny_hybrid_dir"], ids=["llama", "zebra"])
def model_dir(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.load(model_dir)


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
    assert together[3].output_ids == [] and len(together[3].token_logprobs) == 9


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


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.rand(50, generator=torch.Generator().manual_seed(0)).double()
    probs /= probs.sum()
    for p in (0.05, 0.3, 0.9, 1.0):
        kept = _top_p(probs.clone(), p)
        order = probs.argsort(descending=True)
        k = int((probs[order].cumsum(0) < p).sum()) + 1  # reference: fewest tokens whose mass reaches p
        want = torch.zeros_like(probs)
        want[order[:k]] = probs[order[:k]]
        assert torch.equal(kept, want), p


def test_load_from_s3(model_dir, tmp_path, monkeypatch, engine):
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


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_dir(tmp_path / "nowhere")
