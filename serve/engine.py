"""Decoding for the endpoint: load a causal LM (local folder or s3://), complete batches of prompts
with per-prompt sampling, report log-probs, and stream one prompt token by token.

Works with any transformers causal LM whose forward takes `input_ids`, `past_key_values`,
`use_cache` and `logits_to_keep` (Llama teachers and Zebra hybrids alike). A batch only ever holds
prompts of one length, so no padding token enters the model: a Mamba2 layer would fold a pad into
its state, and left padding needs attention-mask support that not every model has.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Iterator

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

import zebra  # noqa: F401  registers the Auto classes, so AutoModelForCausalLM loads hybrids
from cluster.storage import open_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How to pick the next tokens. temperature 0 is greedy; top_p keeps the smallest set of tokens
    whose probability reaches top_p; seed makes one prompt's samples reproducible in any batch."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Prompt:
    """One prompt to complete. logprobs=k reports each token's log-prob and its k likeliest
    alternatives (None: no log-probs); echo reports the prompt's tokens too."""

    ids: tuple[int, ...]
    sampling: Sampling = Sampling()
    logprobs: int | None = None
    echo: bool = False


@dataclass
class Completion:
    """A finished prompt. token_logprobs / top_logprobs run over logprob_ids(): the prompt (when
    echoed; its first token has None) then the new tokens. Log-probs are of the model's own
    distribution (log_softmax of the logits), before temperature or top_p."""

    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str
    echo: bool
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[int, float] | None] = field(default_factory=list)

    def logprob_ids(self) -> list[int]:
        return (self.prompt_ids if self.echo else []) + self.output_ids


# -- loading -------------------------------------------------------------------------------------


def resolve_model_dir(model_dir: str | Path) -> Path:
    """A local folder holding the checkpoint: model_dir itself, or the copy of an s3:// prefix under
    $ZEBRA_CACHE/storage/ (fetched afresh; replicas on one node take turns through a file lock)."""
    if str(model_dir).startswith("s3://"):
        storage = open_storage(str(model_dir))
        with FileLock(f"{storage.cache_dir}.lock"):
            model_dir = storage.fetch_dir("")
        log.info("model %s copied to %s", storage.uri, model_dir)
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model_dir {model_dir}: no config.json there; expected a Hugging Face model folder")
    return path


class Engine:
    """A model and its tokenizer on one device, with the limits requests are checked against."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.max_len: int = model.config.max_position_embeddings
        self.vocab_size: int = model.config.vocab_size
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = frozenset(eos + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))

    @classmethod
    def load(cls, model_dir: str | Path, device: str | None = None, dtype: str | None = None) -> Engine:
        """Load the checkpoint at a folder or s3:// URL; bfloat16 on CUDA and float32 on CPU unless dtype says."""
        path = resolve_model_dir(model_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        log.info("loaded %s (%s) on %s as %s", path, type(model).__name__, device, dtype)
        return cls(model, AutoTokenizer.from_pretrained(path))

    # -- text <-> tokens ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The tokenizer's chat template applied to messages, ending with the assistant's turn opened."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # -- decoding ----------------------------------------------------------------------------------

    def complete(self, prompts: list[Prompt]) -> list[Completion]:
        """Complete every prompt; prompts of equal length share one batched decode."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
        done: dict[int, Completion] = {}
        for _, group in groupby(order, key=lambda i: len(prompts[i].ids)):
            idx = list(group)
            batch = _Batch(self, [prompts[i] for i in idx])
            while not batch.done:
                batch.step()
            done.update(zip(idx, (row.result() for row in batch.rows)))
        return [done[i] for i in range(len(prompts))]

    def stream(self, prompt: Prompt) -> Iterator[tuple[str, str | None]]:
        """Yield (new text, finish_reason or None) per decoded token; the last item has the reason.
        Text that could still turn into a stop string or an unfinished character is held back."""
        batch = _Batch(self, [prompt])
        row, sent = batch.rows[0], 0
        if batch.done:  # max_tokens == 0
            yield "", row.finish
        while not batch.done:
            batch.step()
            safe = row.safe_length()
            yield row.text[sent:safe], row.finish
            sent = safe


class _Row:
    """Decode state of one prompt: its new tokens and text, its log-probs, its sampler, why it stopped."""

    def __init__(self, prompt: Prompt, engine: Engine):
        self.prompt, self.engine = prompt, engine
        self.out: list[int] = []
        self.text = ""
        self.finish: str | None = "length" if prompt.sampling.max_tokens == 0 else None
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[int, float] | None] = []
        self.generator = torch.Generator(device=engine.device)
        if prompt.sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(prompt.sampling.seed)

    def record_prompt(self, ids: torch.Tensor, logp: torch.Tensor) -> None:
        """Log-probs of prompt tokens 1.. given their prefixes; ids [seq], logp [seq - 1, vocab]."""
        self.token_logprobs = [None] + logp.gather(-1, ids[1:, None])[:, 0].tolist()
        self.top_logprobs = [None] + self._top(logp)

    def _top(self, logp: torch.Tensor) -> list[dict[int, float]]:
        """Per row of logp [positions, vocab], the k likeliest tokens {id: log-prob}."""
        values, ids = logp.topk(self.prompt.logprobs, dim=-1)
        return [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]

    def sample(self, logp: torch.Tensor) -> int:
        """Next token from log-probs [vocab]."""
        s = self.prompt.sampling
        if s.temperature == 0:
            return int(logp.argmax())
        probs = (logp / s.temperature).softmax(-1)
        if s.top_p < 1:
            probs = _top_p(probs, s.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def push(self, token: int, logp: torch.Tensor) -> None:
        """Append a sampled token (with its log-prob row [vocab]) and decide whether the row is finished."""
        self.out.append(token)
        if self.prompt.logprobs is not None:
            self.token_logprobs.append(logp[token].item())
            self.top_logprobs.extend(self._top(logp[None]))
        eos = token in self.engine.eos_ids
        self.text = self.engine.decode(self.out[:-1] if eos else self.out)
        cut = min((i for i in (self.text.find(s) for s in self.prompt.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish = self.text[:cut], "stop"
        elif eos:
            self.finish = "stop"
        elif len(self.out) == self.prompt.sampling.max_tokens:
            self.finish = "length"

    def safe_length(self) -> int:
        """How much of text can be streamed now without a later token changing it."""
        if self.finish is not None:
            return len(self.text)
        hold = max((len(s) - 1 for s in self.prompt.sampling.stop), default=0)
        end = len(self.text) - hold
        while end > 0 and self.text[end - 1] == "\ufffd":  # a character split across tokens
            end -= 1
        return max(end, 0)

    def result(self) -> Completion:
        return Completion(list(self.prompt.ids), self.out, self.text, self.finish, self.prompt.echo,
                          self.token_logprobs, self.top_logprobs)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of probs [vocab] outside the smallest set whose mass reaches top_p."""
    sorted_p, idx = probs.sort(descending=True)
    sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= top_p] = 0.0
    return torch.zeros_like(probs).scatter(-1, idx, sorted_p)


class _Batch:
    """Prompts of one length decoded together through the model's cache. A finished row keeps
    riding along (its tokens are ignored) so the batch never has to be reshaped."""

    def __init__(self, engine: Engine, prompts: list[Prompt]):
        self.engine = engine
        self.rows = [_Row(p, engine) for p in prompts]
        ids = torch.tensor([p.ids for p in prompts], device=engine.device)
        keep_all = any(p.echo and p.logprobs is not None for p in prompts)
        logp = self._forward(ids, None, logits_to_keep=0 if keep_all else 1)
        for row, row_ids, row_logp in zip(self.rows, ids, logp):
            if row.prompt.echo and row.prompt.logprobs is not None:
                row.record_prompt(row_ids, row_logp[:-1])
        self.last = logp[:, -1]

    @property
    def done(self) -> bool:
        return all(row.finish is not None for row in self.rows)

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, cache, logits_to_keep: int = 1) -> torch.Tensor:
        """Log-probs [batch, kept positions, vocab] of ids [batch, seq] after `cache`; keeps the new cache."""
        out = self.engine.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)
        self.cache = out.past_key_values
        return out.logits.float().log_softmax(-1)

    def step(self) -> None:
        """Give every unfinished row one new token, then run the model on them unless all are done."""
        tokens = []
        for row, logp in zip(self.rows, self.last):
            token = row.sample(logp) if row.finish is None else 0
            if row.finish is None:
                row.push(token, logp)
            tokens.append(token)
        if not self.done:
            ids = torch.tensor(tokens, device=self.engine.device)[:, None]
            self.last = self._forward(ids, self.cache)[:, -1]
