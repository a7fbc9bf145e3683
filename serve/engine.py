"""The serving engine: load a causal LM (local folder or s3://) and decode many requests at once with
continuous batching.

One scheduler thread owns the model. Requests wait in a FIFO queue and join the running batch between
two decode steps as soon as a slot and the cache budget allow (each sequence is charged the cache bytes
of its prompt + max_tokens, from `zebra.kv`: a hybrid admits as many more sequences as its smaller cache
allows); a finished request leaves at once and frees its slot. Per step the whole batch is sampled
in one batched op (per-request temperature, top-p, top-k and seed) and each request's text grows by
incremental detokenisation (a window of a few tokens is decoded, as vLLM does, never the whole output).

Two cache paths, one engine:
- Zebra hybrids: `zebra.decode.Decoder` over the preallocated `ZebraCache` (a decode step captured in a
  CUDA graph per batch bucket on the GPU); rows 0..n-1 are the running sequences, each at its own
  length; a leaving row is replaced by the last one (copy_row).
- Plain HF causal LMs (the Llama teacher): HF's DynamicCache holding the running rows left-padded to
  one width, with a padding mask and per-row position ids (as batched `generate` does); new rows are
  prefilled and padded into the batch, a leaving row is dropped with index_select.
Prompts waiting together, of any lengths, are prefilled in one padded forward (right-padded into the
hybrid's rows, `Decoder.prefill_rows` with lengths; left-padded for a teacher) and join the batch at once.
"""
from __future__ import annotations

import json
import logging
import queue
import secrets
import struct
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicLayer

import zebra  # noqa: F401  registers the Auto classes, so AutoModelForCausalLM loads hybrids
from zebra.kv import kv_bytes_per_token, state_bytes_per_sequence
from zebra.modeling import CACHE_KEY

log = logging.getLogger(__name__)

# Safe ranges of the sampling parameters (the HTTP schema reads them from here).
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 2.0
MAX_SEED = 2**63 - 1
MAX_STOPS, MAX_STOP_CHARS = 16, 256


@dataclass(frozen=True)
class Sampling:
    """How to pick the next tokens. temperature 0 is greedy; top_k keeps the k likeliest tokens (0: all);
    top_p then keeps the smallest set whose probability reaches top_p; seed makes one request's samples
    reproducible in any batch (None: a fresh random seed); ignore_eos decodes past end-of-sequence tokens
    (benchmarks: every request then gets max_tokens)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def check(self) -> None:
        """ValueError naming the first field outside its safe range."""
        t = self.temperature
        if not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise ValueError(f"temperature: {t!r}; use 0 (greedy) or a value in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: {self.top_p!r}; use a value in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k: {self.top_k!r}; use 0 (all tokens) or a positive count")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed: {self.seed!r}; use an integer in [0, 2**63 - 1]")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens: {self.max_tokens!r}; use 0 or more")
        if len(self.stop) > MAX_STOPS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop: at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")


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
    distribution (log_softmax of the logits), before temperature, top-k or top-p."""

    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str
    echo: bool
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[int, float] | None] = field(default_factory=list)

    def logprob_ids(self) -> list[int]:
        return (self.prompt_ids if self.echo else []) + self.output_ids


@dataclass(frozen=True)
class Update:
    """What a request's callback receives: new text that is safe to send (streamed requests, once per
    token), then a last update with finish_reason and the Completion, or with an error instead."""

    text: str
    finish_reason: str | None = None
    completion: Completion | None = None
    error: str | None = None


# -- loading -------------------------------------------------------------------------------------


def resolve_model_dir(model_dir: str | Path) -> Path:
    """A local folder holding the checkpoint: model_dir itself, or the copy of an s3:// prefix under
    $ZEBRA_CACHE/storage/ (fetched afresh; replicas on one node take turns through a file lock)."""
    if str(model_dir).startswith("s3://"):
        from cluster.storage import open_storage  # boto3 only where a model comes from S3

        storage = open_storage(str(model_dir))
        with FileLock(f"{storage.cache_dir}.lock"):
            model_dir = storage.fetch_dir("")
        log.info("model %s copied to %s", storage.uri, model_dir)
    check_model_dir(model_dir)
    return Path(model_dir)


def check_model_dir(model_dir: str | Path) -> None:
    """FileNotFoundError / ValueError naming the file when model_dir is not a complete HF checkpoint:
    config.json, the weights (every shard an index names; safetensors not truncated) and a tokenizer."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model_dir {model_dir}: no config.json there; expected a Hugging Face model folder")
    try:
        json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"model_dir {model_dir}: config.json is not valid JSON ({e})") from None
    for weights in _weight_files(path):
        if weights.suffix == ".safetensors":
            _check_safetensors(weights)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(f"model_dir {model_dir}: no tokenizer (tokenizer.json or tokenizer_config.json)")


def _weight_files(path: Path) -> list[Path]:
    """The weight files of the checkpoint at path; FileNotFoundError naming what is missing."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"model_dir {path}: {index_name} names missing weight files {missing}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise FileNotFoundError(f"model_dir {path}: no weights (model.safetensors, pytorch_model.bin or a shard index)")


def _check_safetensors(file: Path) -> None:
    """ValueError naming file when its size differs from what its header describes (a truncated copy)."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        if 8 + n > size:
            raise ValueError(f"weights {file}: truncated ({size} bytes; its header alone claims {8 + n})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"weights {file}: corrupt safetensors header") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"weights {file}: truncated or padded ({size} bytes, the header describes {8 + n + end})")


# -- sampling ------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for int64 x in [0, 2**32), computed in 16-bit halves so nothing overflows int64."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection that mixes every bit), elementwise on int64 tensors."""
    x = (x & _M32) ^ ((x & _M32) >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """A uniform draw in [0, 1) per row, a pure function of (seed, step): int64 [n] each -> float64 [n].

    Counter-based (no generator state), so a request's draws are the same in any batch, and a whole
    batch draws in a few vector ops. seeds in [0, 2**63), steps in [0, 2**31).
    """
    key = _fmix32((seeds & _M32) ^ _fmix32((seeds >> 32) + 0x9E3779B9))
    a = _fmix32(key ^ _fmix32((2 * steps) ^ 0x6A09E667))
    b = _fmix32(key ^ _fmix32((2 * steps + 1) ^ 0x6A09E667))
    return ((a >> 5) * 2**26 + (b >> 6)).double() / 2**53


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           u: torch.Tensor) -> torch.Tensor:
    """Next tokens [n] from logits [n, vocab] in one batched op.

    temperature, top_p [n] float (temperature 0: argmax); top_k [n] int64 (0: all); u [n] float64 in
    [0, 1): the uniform draw inverted through each row's cumulative distribution. The logits are shifted
    by their max before the temperature divides them, so no temperature can overflow the softmax.
    """
    logits = logits.float()
    greedy = logits.argmax(-1)
    z = (logits - logits.amax(-1, keepdim=True)) / temperature.clamp_min(MIN_TEMPERATURE)[:, None]
    vocab = z.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp_max(vocab), vocab)
    if bool((k < vocab).any() or (top_p < 1).any()):  # which tokens to keep is decided in sorted order
        z, order = z.sort(-1, descending=True)
        z = z.masked_fill(torch.arange(vocab, device=z.device) >= k[:, None], float("-inf"))
        probs = z.softmax(-1)
        tail = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1)[:, None]  # mass before reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, probs.masked_fill(tail, 0.0))
    else:
        probs = z.softmax(-1)
    # the draw is inverted in vocabulary order, so a row's token does not depend on its batch mates
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    pick = torch.searchsorted(cdf, u[:, None] * total, right=True)
    token = torch.minimum(pick, (cdf < total).sum(-1, keepdim=True))[:, 0]  # never past the last token of mass > 0
    return torch.where(temperature > 0, token, greedy)


# -- one request ---------------------------------------------------------------------------------


class _Detokenizer:
    """Incremental detokenisation (vLLM's scheme): decode the window [prefix, end) and the window
    [prefix, read); the difference is what the newest tokens add. A window that still ends in an
    unfinished character (U+FFFD) waits for the next token. text equals decode(all ids)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.prefix_text = ""
        self.text = ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        new = self.tokenizer.decode(self.ids[self.prefix:])
        if len(new) > len(self.prefix_text) and not new.endswith("\ufffd"):
            self.text += new[len(self.prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            self.prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read])

    def flush(self) -> None:
        """At the end: whatever the held-back tokens decode to (an unfinished character's U+FFFD)."""
        if self.read < len(self.ids):
            self.text += self.tokenizer.decode(self.ids[self.prefix:])[len(self.prefix_text):]
            self.read = len(self.ids)


class _Request:
    """Decode state of one prompt: new tokens, text, log-probs, why it stopped; reports to `notify`."""

    def __init__(self, prompt: Prompt, engine: Engine, notify: Callable[[Update], None], stream: bool):
        self.prompt, self.notify, self.stream = prompt, notify, stream
        s = prompt.sampling
        self.seed = s.seed if s.seed is not None else secrets.randbits(63)
        self.tokens = len(prompt.ids) + s.max_tokens  # the most cache positions it will hold
        self.eos_ids = frozenset() if s.ignore_eos else engine.eos_ids
        self.detok = _Detokenizer(engine.tokenizer)
        self.text, self.sent = "", 0
        self.finish: str | None = None
        self.cancelled = False
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[int, float] | None] = []

    def cancel(self) -> None:
        """Stop decoding this request (its client went away); its slot frees at the next step."""
        self.cancelled = True

    @property
    def steps(self) -> int:
        return len(self.detok.ids)

    def record_prompt(self, ids: torch.Tensor, logp: torch.Tensor) -> None:
        """Log-probs of prompt tokens 1.. given their prefixes; ids [seq], logp [seq - 1, vocab]."""
        self.token_logprobs = [None] + logp.gather(-1, ids[1:, None])[:, 0].tolist()
        values, top = logp.topk(self.prompt.logprobs, dim=-1)
        self.top_logprobs = [None] + [dict(zip(i, v)) for i, v in zip(top.tolist(), values.tolist())]

    def push(self, token: int, logprob: float | None, top: dict[int, float] | None) -> bool:
        """Append a sampled token (and its log-probs); True when the request is finished."""
        if self.cancelled:
            self.finish = "cancelled"
            return True
        if self.prompt.logprobs is not None:
            self.token_logprobs.append(logprob)
            self.top_logprobs.append(top)
        s, seen = self.prompt.sampling, len(self.text)
        if token in self.eos_ids:
            self.detok.flush()
            self.detok.ids.append(token)  # counted as output, never shown as text
            self.finish = "stop"
        else:
            self.detok.add(token)
            if self.steps >= s.max_tokens:
                self.detok.flush()
                self.finish = "length"
        self.text = self.detok.text
        self._cut_at_stop(max(0, seen - max((len(x) for x in s.stop), default=0) + 1))
        if self.finish is not None:
            self._send(Update(self.text[self.sent:], self.finish, self.result()))
        elif self.stream:
            self._send(Update(self._unsent()))
        return self.finish is not None

    def _send(self, update: Update) -> None:
        """Hand an update to the request's callback; a callback that fails (its client is gone) cancels it."""
        try:
            self.notify(update)
        except Exception:  # noqa: BLE001  one client's failure must not stop the batch
            log.exception("a request's callback failed; cancelling the request")
            self.cancelled = True

    def _cut_at_stop(self, start: int) -> None:
        """Cut text at the first stop string found at or after `start` (earlier text was searched before)."""
        cut = min((i for i in (self.text.find(x, start) for x in self.prompt.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish = self.text[:cut], "stop"

    def _unsent(self) -> str:
        """Text that no later token can change (not a possible start of a stop string); marked as sent."""
        hold = max((len(x) - 1 for x in self.prompt.sampling.stop), default=0)
        safe = max(len(self.text) - hold, self.sent)
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def finish_now(self, reason: str) -> None:
        """Finish without decoding (max_tokens 0)."""
        self.finish = reason
        self._send(Update("", reason, self.result()))

    def fail(self, message: str) -> None:
        self.finish = "error"
        self._send(Update("", "error", error=message))

    def result(self) -> Completion:
        return Completion(list(self.prompt.ids), list(self.detok.ids), self.text, self.finish, self.prompt.echo,
                          self.token_logprobs, self.top_logprobs)


# -- cache paths ---------------------------------------------------------------------------------


class _PaddedRows:
    """Running rows of a plain HF causal LM in one DynamicCache, left-padded to one width.

    A new row is prefilled alone and padded into the batch; a step feeds [n, 1] tokens with a padding
    mask [n, width + 1] and each row's own position. Every row is as wide as the widest, and the budget
    is charged so (footprint); columns that no row needs any more are trimmed.
    """

    def __init__(self, model, sequence_bytes: Callable[[int], int]):
        self.model, self.sequence_bytes = model, sequence_bytes
        self.cache = None
        self.lengths: list[int] = []
        self.width = 0

    def footprint(self, tokens: list[int]) -> int:
        """Cache bytes of rows that will hold at most these many tokens each: all as wide as the widest."""
        return len(tokens) * self.sequence_bytes(max(tokens))

    def prefill(self, ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """Add a row for prompt ids [seq]; its logits [seq or 1, vocab]."""
        out = self.model(input_ids=ids[None], use_cache=True, logits_to_keep=0 if all_logits else 1)
        self._join(getattr(out, CACHE_KEY), [len(ids)])
        return out.logits[0]

    def prefill_many(self, prompts: list[tuple[int, ...]]) -> torch.Tensor:
        """Add rows for prompts of any lengths in one left-padded forward (a padding mask and each row's own
        position ids, as HF's batched generate does); their last logits [rows, vocab]."""
        lengths = [len(p) for p in prompts]
        width, device = max(lengths), self.model.device
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
        cols = torch.arange(width)
        mask = (cols >= width - torch.tensor(lengths)[:, None]).long()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=position_ids.to(device), use_cache=True, logits_to_keep=1)
        self._join(getattr(out, CACHE_KEY), lengths)
        return out.logits[:, -1]

    def _join(self, new, lengths: list[int]) -> None:
        """Append the rows of a prefill's cache (row i holds lengths[i] tokens, left-padded to the longest),
        both sides left-padded to one width."""
        if any(type(layer) is not DynamicLayer for layer in new.layers):  # e.g. sliding-window layers
            raise TypeError(f"{type(self.model).__name__}: the engine batches full-attention DynamicLayer caches only")
        if self.cache is None:
            self.cache, self.width = new, max(lengths)
        else:
            width = max(self.width, *lengths)
            for old, add in zip(self.cache.layers, new.layers):
                old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(add.keys, width)])
                old.values = torch.cat([_left_pad(old.values, width), _left_pad(add.values, width)])
            self.width = width
        self.lengths += lengths

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] after feeding tokens [n], one per running row."""
        lengths = torch.tensor(self.lengths, device=tokens.device)
        cols = torch.arange(self.width + 1, device=tokens.device)
        mask = (cols >= (self.width - lengths)[:, None]).long()
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=lengths[:, None],
                         use_cache=True, **{CACHE_KEY: self.cache})
        self.width += 1
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1]

    def remove(self, rows: list[int]) -> list[int]:
        """Drop rows; returns the old indices of the rows kept, in their new order."""
        gone = set(rows)
        keep = [i for i in range(len(self.lengths)) if i not in gone]
        self.lengths = [self.lengths[i] for i in keep]
        if not keep:
            self.cache, self.width = None, 0
            return keep
        drop = self.width - max(self.lengths)
        index = torch.tensor(keep, device=self.cache.layers[0].keys.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, drop:]
            layer.values = layer.values[index, :, drop:]
        self.width -= drop
        return keep

    def clear(self) -> None:
        self.cache, self.lengths, self.width = None, [], 0


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """[batch, heads, seq, dim] -> [batch, heads, width, dim], zeros in front."""
    return torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0))


class _SlotRows:
    """Running rows of a Zebra hybrid in the preallocated cache of `zebra.decode.Decoder` (CUDA-graph
    steps on the GPU): row i of the batch is cache row i. A prompt is prefilled into the row after the
    last, a step runs rows 0..n-1, and a leaving row is overwritten by the last one (copy_row)."""

    def __init__(self, model, max_batch: int, max_len: int, sequence_bytes: Callable[[int], int], prefill_chunk: int):
        from zebra.decode import Decoder

        self.model, self.sequence_bytes = model, sequence_bytes
        self.decoder = Decoder(model, max_batch, max_len, prefill_chunk=prefill_chunk)
        self.cache = self.decoder.cache
        self.n = 0

    def footprint(self, tokens: list[int]) -> int:
        """Exact cache bytes of rows that will hold at most these many tokens each (zebra.kv)."""
        return sum(self.sequence_bytes(t) for t in tokens)

    def prefill(self, ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """Prefill prompt ids [seq] into the next free row; its logits [seq or 1, vocab]."""
        last = self.decoder.prefill(ids, self.n)
        self.n += 1
        if all_logits:  # the decoder keeps the last position only; echoed log-probs need every one
            return self.model(input_ids=ids[None], use_cache=False).logits[0]
        return last[None]

    def prefill_many(self, prompts: list[tuple[int, ...]]) -> torch.Tensor:
        """Prefill prompts of any lengths into the next free rows, right-padded in one pass (Decoder.prefill_rows
        with lengths, in chunks of at most prefill_chunk tokens); their last logits [rows, vocab]."""
        lengths = [len(p) for p in prompts]
        ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        last = self.decoder.prefill_rows(ids, self.n, None if len(set(lengths)) == 1 else torch.tensor(lengths))
        self.n += len(prompts)
        return last

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] after feeding tokens [n] to rows 0..n-1."""
        return self.decoder.step(tokens)

    def remove(self, rows: list[int]) -> list[int]:
        """Drop rows; returns the old indices of the rows kept, in their new order."""
        order = list(range(self.n))
        for i in sorted(rows, reverse=True):
            last = len(order) - 1
            if i != last:
                self.cache.copy_row(last, i)
                order[i] = order[last]
            order.pop()
        self.n = len(order)
        return order

    def clear(self) -> None:
        self.n = 0


# -- the engine ----------------------------------------------------------------------------------


class Engine:
    """A model and its tokenizer on one device, decoding requests with continuous batching.

    max_batch: most sequences decoded at once; max_len: longest sequence (prompt + new tokens);
    cache_budget_bytes: what the running sequences' caches may hold together (default: 80% of the free
    GPU memory after loading, 2 GiB on the CPU). A request joins when the batch's footprint with it fits:
    each sequence counted at its exact sequence_bytes(prompt + max_tokens) for a hybrid, at the widest
    row's for a teacher's padded batch. A hybrid's preallocated cache takes as many slots of max_len
    tokens as the budget holds.

    Requests of at most one new token (lm-eval's log-likelihood requests: echo, logprobs, max_tokens 1)
    never join the batch: the waiting ones are scored together, shortest first, in right-padded forwards
    of at most score_tokens padded tokens (default 16,384 on a GPU, 2,048 on the CPU) without a cache (a
    hybrid's prefills run in forwards of at most score_tokens tokens too: Decoder.prefill_chunk);
    in a causal model the padding after a prompt changes none of its positions. Waiting prompts of any
    lengths are prefilled together in one padded forward, first come first served, as many as fit in the
    free slots, the cache budget and score_tokens padded tokens (rows x longest); an echoed prompt alone.
    """

    def __init__(self, model, tokenizer, max_batch: int = 64, max_len: int | None = None,
                 cache_budget_bytes: int | None = None, score_tokens: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        positions = model.config.max_position_embeddings
        self.max_len: int = min(max_len or positions, positions)
        if max_len and max_len > positions:
            log.warning("engine: max_len %d is past the model's max_position_embeddings %d: serving at most %d "
                        "tokens a sequence", max_len, positions, positions)
        self.vocab_size: int = model.config.vocab_size
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = frozenset(eos + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
        self.cache_budget = cache_budget_bytes or _default_budget(self.device)
        self.max_batch = max_batch
        self.score_tokens = score_tokens or (16384 if self.device.type == "cuda" else 2048)
        if getattr(model.config, "model_type", None) == "zebra":
            self.max_batch = min(self.max_batch, self.cache_budget // self.sequence_bytes(self.max_len))
            if self.max_batch < 1:
                raise ValueError(f"cache_budget_bytes {self.cache_budget}: less than one sequence of max_len "
                                 f"{self.max_len} tokens ({self.sequence_bytes(self.max_len)} bytes); lower max_len")
            self.rows = _SlotRows(model, self.max_batch, self.max_len, self.sequence_bytes, self.score_tokens)
        else:
            self.rows = _PaddedRows(model, self.sequence_bytes)
        log.info("engine: %d sequences at most, cache budget %.1f MiB, %d bytes per token of context",
                 self.max_batch, self.cache_budget / 2**20, kv_bytes_per_token(model.config, self.dtype))
        self._waiting: deque[_Request] = deque()  # requests that will decode, first come first served
        self._scoring: list[_Request] = []  # requests of at most one new token: scored, never in the batch
        self._running: list[_Request] = []
        self._logits: torch.Tensor | None = None  # [running, vocab]: what each running row samples from next
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    def load(cls, model_dir: str | Path, device: str | None = None, dtype: str | None = None, **limits) -> Engine:
        """Load the checkpoint at a folder or s3:// URL; bfloat16 on CUDA and float32 on CPU unless dtype
        says. limits: max_batch, max_len, cache_budget_bytes (see the class)."""
        path = resolve_model_dir(model_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        log.info("loaded %s (%s) on %s as %s", path, type(model).__name__, device, dtype)
        return cls(model, AutoTokenizer.from_pretrained(path), **limits)

    def sequence_bytes(self, tokens: int) -> int:
        """Exact cache bytes of one sequence of `tokens` tokens (zebra.kv's definition)."""
        config = self.model.config
        return tokens * kv_bytes_per_token(config, self.dtype) + state_bytes_per_sequence(config, self.dtype)

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

    # -- requests ----------------------------------------------------------------------------------

    def check(self, prompt: Prompt) -> None:
        """ValueError naming the field when the prompt cannot be served (sampling, length, vocabulary, budget)."""
        prompt.sampling.check()
        n = len(prompt.ids)
        if n == 0:
            raise ValueError("prompt: no tokens; send at least one")
        if any(not 0 <= t < self.vocab_size for t in prompt.ids):
            raise ValueError(f"prompt: token ids outside the vocabulary [0, {self.vocab_size})")
        if n + prompt.sampling.max_tokens > self.max_len:
            raise ValueError(f"max_tokens: {n} prompt tokens + {prompt.sampling.max_tokens} new tokens exceed "
                             f"the engine's max_len of {self.max_len} tokens")
        if self.sequence_bytes(n + prompt.sampling.max_tokens) > self.cache_budget:
            raise ValueError(f"max_tokens: {n} + {prompt.sampling.max_tokens} tokens need more cache than the "
                             f"budget of {self.cache_budget} bytes")
        if prompt.logprobs is not None and not 0 <= prompt.logprobs <= self.vocab_size:
            raise ValueError(f"logprobs: {prompt.logprobs}; use 0..{self.vocab_size}")

    def submit(self, prompt: Prompt, notify: Callable[[Update], None], stream: bool = False) -> _Request:
        """Queue a prompt; `notify` is called from the engine's thread with its Updates (per token when
        stream, else only the last). Returns a handle whose cancel() stops it. ValueError: see check()."""
        self.check(prompt)
        request = _Request(prompt, self, notify, stream)
        with self._wake:
            if self._closed:
                raise RuntimeError("engine: closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
                self._thread.start()
            (self._scoring if prompt.sampling.max_tokens <= 1 else self._waiting).append(request)
            self._wake.notify()
        return request

    def complete(self, prompts: list[Prompt]) -> list[Completion]:
        """Complete every prompt (all decoded together); RuntimeError when the engine failed one."""
        done: queue.Queue[tuple[int, Update]] = queue.Queue()
        for i, prompt in enumerate(prompts):
            self.submit(prompt, lambda u, i=i: done.put((i, u)))
        results: dict[int, Completion] = {}
        while len(results) < len(prompts):
            i, update = done.get()
            if update.error is not None:
                raise RuntimeError(update.error)
            results[i] = update.completion
        return [results[i] for i in range(len(prompts))]

    def stream(self, prompt: Prompt) -> Iterator[tuple[str, str | None]]:
        """Yield (new text, finish_reason or None) per decoded token; the last item has the reason.
        Text that could still turn into a stop string or an unfinished character is held back."""
        updates: queue.Queue[Update] = queue.Queue()
        request = self.submit(prompt, updates.put, stream=True)
        try:
            while True:
                update = updates.get()
                if update.error is not None:
                    raise RuntimeError(update.error)
                yield update.text, update.finish_reason
                if update.finish_reason is not None:
                    return
        finally:
            request.cancel()

    @property
    def alive(self) -> bool:
        """False once the scheduler thread has died (the replica should then be replaced)."""
        return not self._closed and (self._thread is None or self._thread.is_alive())

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # -- the scheduler thread ----------------------------------------------------------------------

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or self._scoring or self._running or self._closed):
                    self._wake.wait()
                if self._closed:
                    for request in [*self._waiting, *self._scoring, *self._running]:
                        request.fail("engine: closed")
                    return
            self._admit()
            if self._running:
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001  the batch is lost, the engine lives on
                    log.exception("decode step failed; failing the %d running requests", len(self._running))
                    for request in self._running:
                        request.fail(f"decode step failed: {type(e).__name__}: {e}")
                    self._running, self._logits = [], None
                    self.rows.clear()

    def _admit(self) -> None:
        """Score the waiting requests of at most one new token; move the others into the batch, first
        come first served, while a slot and the budget allow. (Requests keep arriving meanwhile: every
        pass under the lock scores what waits to be scored before it admits the next one.)"""
        while True:
            with self._wake:
                scored, self._scoring = self._scoring, []
                if not scored:
                    if not self._waiting:
                        return
                    request = self._waiting[0]
                    tokens = [r.tokens for r in self._running] + [request.tokens]
                    fits = len(tokens) <= self.max_batch and self.rows.footprint(tokens) <= self.cache_budget
                    if not (request.cancelled or fits):
                        return
                    self._waiting.popleft()
                    group = [request] + self._followers(request, tokens)
            if scored:
                for batch in self._score_batches([r for r in scored if not r.cancelled]):
                    try:
                        self._score(batch)
                    except Exception as e:  # noqa: BLE001  these prompts fail, the batch goes on
                        log.exception("scoring failed for %d prompts", len(batch))
                        for r in batch:
                            r.fail(f"scoring failed: {type(e).__name__}: {e}")
                continue
            if request.cancelled:
                continue
            if len(group) > 1:
                try:
                    self._prefill_together(group)
                    continue
                except Exception:  # noqa: BLE001  one bad prompt must not fail the others: each is retried alone
                    log.exception("prefill of %d prompts together failed; prefilling each alone", len(group))
            for r in group:
                try:
                    self._prefill(r)
                except Exception as e:  # noqa: BLE001  this prompt fails, the batch goes on
                    log.exception("prefill failed for a prompt of %d tokens", len(r.prompt.ids))
                    r.fail(f"prefill failed: {type(e).__name__}: {e}")

    def _followers(self, head: _Request, tokens: list[int]) -> list[_Request]:
        """Pop the requests right behind `head` (caller holds the lock), in FIFO order, that fit beside it, to
        be prefilled with it in one padded forward of at most score_tokens tokens (rows x longest prompt); none
        when head needs every position's log-probs (echo), and the group stops at the first echoed, cancelled
        or unfitting request. tokens: the batch's footprint with head, extended in place."""
        longest = len(head.prompt.ids)
        group: list[_Request] = []
        if head.prompt.echo or head.cancelled:
            return group
        while self._waiting:
            nxt = self._waiting[0]
            if nxt.cancelled or nxt.prompt.echo:
                break
            if (len(group) + 2) * max(longest, len(nxt.prompt.ids)) > self.score_tokens:
                break
            more = tokens + [nxt.tokens]
            if len(more) > self.max_batch or self.rows.footprint(more) > self.cache_budget:
                break
            tokens.append(nxt.tokens)
            longest = max(longest, len(nxt.prompt.ids))
            group.append(self._waiting.popleft())
        return group

    def _prefill_together(self, group: list[_Request]) -> None:
        """Prompts of any lengths prefilled in one padded forward; they join the batch."""
        last = self.rows.prefill_many([r.prompt.ids for r in group]).float()
        self._logits = last if self._logits is None else torch.cat([self._logits, last])
        self._running.extend(group)

    def _score_batches(self, requests: list[_Request]) -> list[list[_Request]]:
        """Requests grouped shortest first into batches of at most score_tokens padded tokens (a longer
        prompt alone)."""
        batches: list[list[_Request]] = []
        for request in sorted(requests, key=lambda r: len(r.prompt.ids)):
            if batches and (len(batches[-1]) + 1) * len(request.prompt.ids) <= self.score_tokens:
                batches[-1].append(request)
            else:
                batches.append([request])
        return batches

    def _score(self, batch: list[_Request]) -> None:
        """One right-padded forward of the prompts: their echoed log-probs, and the one new token of those
        with max_tokens 1 (sampled as in a decode step); every request of the batch finishes."""
        lengths = [len(r.prompt.ids) for r in batch]
        ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)
        for i, request in enumerate(batch):
            ids[i, : lengths[i]] = torch.tensor(request.prompt.ids)
        ids = ids.to(self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits  # [batch, width, vocab]
        for i, request in enumerate(batch):
            if request.prompt.echo and request.prompt.logprobs is not None:
                request.record_prompt(ids[i, : lengths[i]], logits[i, : lengths[i] - 1].float().log_softmax(-1))
        one = [i for i, r in enumerate(batch) if r.prompt.sampling.max_tokens == 1]
        for i, request in enumerate(batch):
            if request.prompt.sampling.max_tokens == 0:
                request.finish_now("length")
        if one:
            requests = [batch[i] for i in one]
            last = torch.stack([logits[i, lengths[i] - 1] for i in one]).float()
            tokens = self._sample(requests, last)
            for request, token, (lp, top) in zip(requests, tokens.tolist(), self._logprobs(requests, last, tokens)):
                request.push(token, lp, top)

    def _prefill(self, request: _Request) -> None:
        """Run the prompt; record its echoed log-probs; join the batch."""
        prompt = request.prompt
        ids = torch.tensor(prompt.ids, device=self.device)
        all_logits = prompt.echo and prompt.logprobs is not None
        logits = self.rows.prefill(ids, all_logits)
        if all_logits:
            request.record_prompt(ids, logits[:-1].float().log_softmax(-1))
        last = logits[-1:].float()
        self._logits = last if self._logits is None else torch.cat([self._logits, last])
        self._running.append(request)

    def _step(self) -> None:
        """Sample one token for every running row and feed it to the model, then retire the finished rows.

        The model step is queued before the host reads the sampled tokens (on a GPU an asynchronous copy), so
        the requests' bookkeeping (detokenising, stop strings, callbacks) overlaps the step instead of
        leaving the GPU idle; a row that finishes with this token costs one step whose logits are dropped."""
        running, logits = self._running, self._logits
        tokens = self._sample(running, logits)
        logprobs = self._logprobs(running, logits, tokens)
        read_tokens = _host_reader(tokens)
        logits = self.rows.step(tokens).float()
        finished = [i for i, (request, token, (lp, top)) in enumerate(zip(running, read_tokens(), logprobs))
                    if request.push(token, lp, top)]
        if finished:
            order = self.rows.remove(finished)
            running = [running[i] for i in order]
            logits = logits[torch.tensor(order, device=self.device, dtype=torch.long)]
        self._running = running
        self._logits = logits if running else None

    def _sample(self, running: list[_Request], logits: torch.Tensor) -> torch.Tensor:
        """Tokens [n] for the rows, in one batched op (argmax alone when every row is greedy)."""
        params = [r.prompt.sampling for r in running]
        if all(s.temperature == 0 for s in params):
            return logits.argmax(-1)
        as_tensor = lambda values, dtype: torch.tensor(values, device=self.device, dtype=dtype)  # noqa: E731
        u = uniform(as_tensor([r.seed for r in running], torch.long), as_tensor([r.steps for r in running], torch.long))
        return sample(logits, as_tensor([s.temperature for s in params], torch.float32),
                      as_tensor([s.top_p for s in params], torch.float32),
                      as_tensor([min(s.top_k, self.vocab_size) for s in params], torch.long), u)

    def _logprobs(self, running: list[_Request], logits: torch.Tensor, tokens: torch.Tensor) -> list[tuple]:
        """Per row (log-prob of its token, {id: log-prob} of its k likeliest) or (None, None) when not asked."""
        rows = [i for i, r in enumerate(running) if r.prompt.logprobs is not None]
        out: list[tuple] = [(None, None)] * len(running)
        if not rows:
            return out
        index = torch.tensor(rows, device=self.device)
        logp = logits[index].log_softmax(-1)
        chosen = logp.gather(-1, tokens[index][:, None])[:, 0].tolist()
        k = max(running[i].prompt.logprobs for i in rows)
        values, ids = logp.topk(k, dim=-1)
        for j, (i, v, t) in enumerate(zip(rows, values.tolist(), ids.tolist())):
            n = running[i].prompt.logprobs
            out[i] = (chosen[j], dict(zip(t[:n], v[:n])))
        return out


def _host_reader(t: torch.Tensor) -> Callable[[], list]:
    """A function giving t's values as a list. On CUDA the copy to pinned host memory is queued now and the
    function waits for that copy only, not for work queued after it; elsewhere it reads t when called."""
    if t.device.type != "cuda":
        return t.tolist
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> list:
        copied.synchronize()
        return host.tolist()

    return read


def _default_budget(device: torch.device) -> int:
    """80% of the GPU memory free now (after the weights are loaded), or 2 GiB on the CPU."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    return 2 * 2**30
