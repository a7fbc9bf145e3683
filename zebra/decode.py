"""Fast decoding of a ZebraForCausalLM, gpt-fast style: one static ZebraCache, chunked prefill into a
slot, and a one-token step captured in a CUDA graph per batch-size bucket (eager on the CPU, same code).

The API the serve engine builds on:
    dec = Decoder(model, max_batch, max_len)      # dec.cache: ZebraCache [max_batch rows, max_len tokens]
    dec.prefill(ids [L], slot) -> logits [vocab]  # starts a sequence in `slot` (the row is reset first)
    dec.prefill_rows(ids [b, L], start, lengths [b]) -> logits [b, vocab]   # prompts of different lengths,
                                                  # right-padded, in rows start..start+b-1 (one forward per chunk)
    dec.step(tokens [n]) -> logits [n, vocab]     # one token for each of rows 0..n-1, at its own position
    dec.generate(ids [b, L], max_new_tokens, greedy=True) -> [b, L + max_new_tokens]   (built on the two)
Rows may hold sequences of different lengths (dec.cache.lengths). On CUDA, step(n) runs the graph of the
smallest bucket >= n, so rows n..bucket-1 are stepped too (with token 0): keep the running sequences in
rows 0..n-1 (cache.copy_row moves one) and treat the rest as free; prefill resets the slot it fills.
The MLA and Mamba2 decode kernels (kernels.decode) run inside the captured step.
"""
from __future__ import annotations

import contextlib
import gc
import logging

import torch

from .cache import ZebraCache

log = logging.getLogger(__name__)


def default_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 3, 4, 6, 8, 12, 16, ... (from 2 on, each within 1.5x of the next), and max_batch."""
    sizes, p = set(), 1
    while p < max_batch:
        sizes.update({p, p + p // 2} if p > 1 else {1})
        p *= 2
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


class Decoder:
    """Prefill and graph-captured decode steps of one model over one static cache (see the module docstring).

    model: a ZebraForCausalLM (eval mode); max_batch, max_len: the cache's rows and tokens per row;
    buckets: the batch sizes that get a graph (default_buckets); prefill_chunk: most tokens (rows x length)
    one prefill forward takes; graphs: capture the step in CUDA graphs (default: on CUDA); compile: also
    torch.compile the step (fullgraph, so a graph break is an error) before capturing it (graphs only).
    """

    def __init__(self, model, max_batch: int, max_len: int, buckets: list[int] | None = None,
                 prefill_chunk: int = 2048, graphs: bool | None = None, compile: bool = False):
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        self.cache = ZebraCache(model.config, max_batch, max_len, self.device, param.dtype)
        self.max_batch, self.max_len, self.prefill_chunk = max_batch, max_len, prefill_chunk
        self.buckets = sorted(buckets or default_buckets(max_batch))
        if self.buckets[-1] < max_batch:
            raise ValueError(f"buckets {self.buckets} must reach max_batch {max_batch}")
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"graphs=True needs a CUDA model, this one is on {self.device}")
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._forward = torch.compile(self._logits, fullgraph=True, dynamic=False) if compile else self._logits
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    # -- prefill ----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill_rows(self, ids: torch.Tensor, start: int = 0, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Start sequences ids [b, L] in rows start..start+b-1 (reset first), in forwards of at most
        prefill_chunk tokens -> the logits after each row's last token [b, vocab].

        lengths int [b] (1..L): row r's prompt is ids[r, :lengths[r]], the rest right padding (varlen prefill:
        one forward for prompts of different lengths; each row ends with its own length and state). None: all L.
        """
        b, width = ids.shape
        if start + b > self.max_batch or width > self.max_len or width == 0:
            raise ValueError(f"prefill of {b} rows x {width} tokens at row {start} does not fit the cache "
                             f"({self.max_batch} rows x {self.max_len} tokens), or is empty")
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=self.device).long()
            if lengths.shape != (b,) or not bool(((lengths >= 1) & (lengths <= width)).all()):
                raise ValueError(f"lengths {lengths.tolist()}: expected {b} prompt lengths in 1..{width}")
        self.cache.reset_rows(range(start, start + b))
        ids = ids.to(self.device)
        chunk = min(width, self.prefill_chunk)
        rows = max(1, self.prefill_chunk // chunk)
        last = []
        for r in range(0, b, rows):
            view = self.cache.narrow(start + r, min(rows, b - r))
            if lengths is None:
                for c in range(0, width, chunk):
                    logits = self._logits(ids[r : r + rows, c : c + chunk], view)
            else:
                logits = self._prefill_varlen(ids[r : r + rows], lengths[r : r + rows], view, chunk)
            last.append(logits)
        return torch.cat(last)

    def _prefill_varlen(self, ids: torch.Tensor, lengths: torch.Tensor, view: ZebraCache, chunk: int) -> torch.Tensor:
        """Right-padded prompts ids [b, L] with lengths [b] into the rows of `view`, `chunk` columns per forward;
        a row whose prompt ended in an earlier chunk takes no tokens in later ones (cache.valid = 0)
        -> logits after each row's last real token [b, vocab]."""
        out = None
        for c in range(0, int(lengths.max()), chunk):
            view.valid = (lengths - c).clamp(0, chunk)
            hidden = self.model.model(input_ids=ids[:, c : c + chunk], cache=view, use_cache=True).last_hidden_state
            at = (lengths - c - 1).clamp(0, hidden.shape[1] - 1)
            logits = self.model.lm_head(hidden[torch.arange(len(at), device=at.device), at])
            ends_here = ((lengths > c) & (lengths <= c + chunk))[:, None]
            out = logits if out is None else torch.where(ends_here, logits, out)
        return out

    def prefill(self, ids: torch.Tensor, slot: int) -> torch.Tensor:
        """Start the sequence ids [L] in row `slot` (reset first) -> the logits after its last token [vocab]."""
        return self.prefill_rows(torch.as_tensor(ids).reshape(1, -1), slot)[0]

    # -- decode -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [n] to rows 0..n-1 (each at its own position) -> next-token logits [n, vocab]."""
        n = tokens.shape[0]
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"step got {n} tokens; the decoder has 1..{self.max_batch} rows")
        self.tokens[:n].copy_(tokens)
        if not self.graphs:
            return self._logits(self.tokens[:n, None], self.cache.narrow(0, n))
        bucket = next(b for b in self.buckets if b >= n)
        if bucket not in self._captured:
            return self._capture(bucket)[:n].clone()
        graph, out = self._captured[bucket]
        graph.replay()
        return out[:n].clone()

    def _logits(self, ids: torch.Tensor, cache: ZebraCache) -> torch.Tensor:
        """ids [b, t] through the model with `cache` (b rows) -> logits after the last token [b, vocab]."""
        return self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def _capture(self, bucket: int) -> torch.Tensor:
        """Run the step of `bucket` rows once eagerly (it warms up kernels and is a real step), then record
        it in a CUDA graph (recording runs nothing). Returns the eager step's logits [bucket, vocab]."""
        view = self.cache.narrow(0, bucket)
        view.static = True  # the whole buffer and no host reads: what the graph will replay
        ids = self.tokens[:bucket, None]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # compile: one compiled graph per bucket, more than dynamo's default limit of 8 recompilations
        with torch._dynamo.config.patch(cache_size_limit=max(8, len(self.buckets))):
            with torch.cuda.stream(stream):
                logits = self._forward(ids, view)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with _no_collection(), torch.cuda.graph(graph, pool=self._pool):
                out = self._forward(ids, view)
        self._pool = graph.pool()
        self._captured[bucket] = (graph, out)
        log.info("captured the decode step for %d rows", bucket)
        return logits

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, greedy: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """ids [b, L] -> [b, L + max_new_tokens]: prefill rows 0..b-1, then one step per new token
        (greedy argmax, or sampling from the softmax)."""
        b, length = ids.shape
        if length + max_new_tokens - 1 > self.max_len:
            raise ValueError(f"{length} prompt + {max_new_tokens} new tokens exceed max_len {self.max_len}")
        logits = self.prefill_rows(ids)
        new = []
        for i in range(max_new_tokens):
            probs = None if greedy else torch.softmax(logits.float(), dim=-1)
            token = logits.argmax(-1) if greedy else torch.multinomial(probs, 1, generator=generator)[:, 0]
            new.append(token)
            if i + 1 < max_new_tokens:
                logits = self.step(token)
        return torch.cat([ids.to(self.device), torch.stack(new, dim=1)], dim=1)


@contextlib.contextmanager
def _no_collection():
    """Collect garbage now, and not again until the block ends. A Decoder is a reference cycle (self._forward
    is its own bound method), so a dropped one keeps its captured graphs until the collector runs; if that
    happens during another capture, destroying them is an operation not permitted while a stream captures,
    and the capture fails ("operation failed due to a previous error during capture": H200, the 1,024-row
    decoder of benchmarks.decode's max-batch search right after the 512-row one)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
