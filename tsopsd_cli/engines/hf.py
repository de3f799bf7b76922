"""Rollouts with transformers: batched, left-padded, KV-cached sampling written out step by step.

Why not `model.generate`: its generation config can silently add top_k=50 or a max_length, and its scores are
after logit processing. This loop samples exactly softmax(logits / temperature), optionally truncated by the
explicit top_k/top_p of the recipe, and returns the untruncated temperature-scaled log-probs of sampled tokens.

How a batch runs the model is a `_Decode` strategy: the lean decoder (CPU, or `model.cuda_graphs: false`), the
lean decoder's static form with each decode step replayed from a CUDA graph (CUDA), or transformers' forward.
Every strategy reads weights in the engine's dtype (`model.dtype`): a run whose float32 master weights compute in
bfloat16 decodes from one bfloat16 copy made per `generate` call and freed after it, not under autocast.
"""

from __future__ import annotations

from typing import Protocol

import torch

from tsopsd_cli import signals
from tsopsd_cli.core.chunked import nucleus, rows_per_block
from tsopsd_cli.core.stats import entropy_from_logp
from tsopsd_cli.engines.base import Completion, SamplingParams, check_context, context_length, end_token_ids


_M64 = 2**64


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return x - _M64 if x >= 2**63 else x


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def counter_uniform(seeds: torch.Tensor, step: int, n: int) -> torch.Tensor:
    """Uniform numbers in (0, 1) that depend only on (seed, step, column): splitmix64 of a counter, all rows and
    columns in a handful of integer ops (one generator object per row costs a kernel launch per row and step).
    seeds: [R] int64 -> [R, n] float64"""
    col = torch.arange(n, device=seeds.device, dtype=torch.int64)
    z = seeds[:, None] + (step * n + col + 1)[None, :] * _GOLDEN  # int64 arithmetic wraps modulo 2**64
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (_shr(z, 11).double() + 0.5) * 2.0**-53


class GumbelMax:
    """Per-row seeded sampling, argmax(logits - log(-log u)) with u = counter_uniform(seeds, step, V): the same
    numbers and tokens as written with counter_uniform, computed in buffers kept from one decoding step to the next
    (the splitmix64 rounds in place) instead of a dozen fresh [rows, V] int64/float64 tensors per step, each a new
    mapping with its page faults once it is above glibc's mmap threshold (at a 151,936-token vocabulary and 8 rows,
    9.7 MB apiece)."""

    def __init__(self):
        self.g = None  # [rows, V] in the logits' dtype; z, t (int64) and u (float64) beside it

    def __call__(self, logits: torch.Tensor, seeds: torch.Tensor, step: int) -> torch.Tensor:
        """logits: [R, V] (after temperature and filtering), seeds: [R] int64 -> sampled columns [R]"""
        rows, n = logits.shape
        g = self.g
        if g is None or g.shape[0] < rows or g.shape[1] != n or g.dtype != logits.dtype or g.device != logits.device:
            dev = logits.device
            self.col = torch.arange(1, n + 1, dtype=torch.int64, device=dev)  # column + 1
            self.z, self.t = (torch.empty(rows, n, dtype=torch.int64, device=dev) for _ in range(2))
            self.u = torch.empty(rows, n, dtype=torch.float64, device=dev)
            self.g = torch.empty(rows, n, dtype=logits.dtype, device=dev)
        z, t, u, g = self.z[:rows], self.t[:rows], self.u[:rows], self.g[:rows]
        torch.add(seeds[:, None], ((self.col + step * n) * _GOLDEN)[None, :], out=z)  # wraps modulo 2**64
        for k, mix in ((30, _MIX1), (27, _MIX2), (31, None)):
            torch.bitwise_right_shift(z, k, out=t).bitwise_and_((1 << (64 - k)) - 1)  # logical shift
            z.bitwise_xor_(t)
            if mix is not None:
                z.mul_(mix)
        torch.bitwise_right_shift(z, 11, out=t).bitwise_and_((1 << 53) - 1)
        u.copy_(t).add_(0.5).mul_(2.0**-53)  # counter_uniform's numbers, float64
        g.copy_(u.log_().neg_().log_())  # log(-log u), rounded to the logits' dtype
        # max's indices are argmax's (the first maximum) from a kernel about 3x faster on the CPU
        return torch.sub(logits, g, out=g).max(-1).indices


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k / nucleus sets with -inf.  logits: [B, V] -> [B, V]"""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return nucleus(logits, top_p)


def sample_next(logits: torch.Tensor, params: SamplingParams, gen, gumbel: GumbelMax, step: int):
    """One decoding step's draw from softmax(logits / temperature), truncated by params.top_k / top_p: the tokens,
    their untruncated log-probs and the entropies.  logits: [R, V]; gen: a torch.Generator (one stream for the
    batch) or per-row seeds [R] int64 (Gumbel-max) -> ([R] int64, [R] float32, [R] float32).

    With per-row seeds the rows are taken a few at a time on the CPU (core.chunked.rows_per_block): the float32
    passes over a block (upcast, temperature, log-softmax, entropy, the Gumbel noise) then stay in a core's cache,
    and no [R, V] float32 temporary is allocated per step. Each row's draw depends on its own seed alone, so the
    blocks give the tokens of the whole batch at once."""
    rows = logits.shape[0]
    n = rows if isinstance(gen, torch.Generator) else rows_per_block(logits)  # one stream: one call
    nxt = torch.empty(rows, dtype=torch.long, device=logits.device)
    logp_next = torch.empty(rows, dtype=torch.float32, device=logits.device)
    ent = torch.empty(rows, dtype=torch.float32, device=logits.device)
    for r in range(0, rows, n):
        scaled = logits[r:r + n].float()  # [n, V]; a copy unless the logits are float32 already
        scaled = scaled / params.temperature if params.temperature != 1.0 else scaled
        logp = scaled.log_softmax(-1)
        filtered = filter_logits(scaled, params.top_k, params.top_p)
        if isinstance(gen, torch.Generator):
            pick = torch.multinomial(filtered.softmax(-1), 1, generator=gen).squeeze(-1)
        else:  # Gumbel-max with per-row seeds: argmax(logits + Gumbel) ~ softmax(logits)
            pick = gumbel(filtered, gen[r:r + n], step)
        nxt[r:r + n] = pick
        logp_next[r:r + n] = logp.gather(-1, pick[:, None]).squeeze(-1)
        ent[r:r + n] = entropy_from_logp(logp)
    return nxt, logp_next, ent


def cut_at_stop(text: str, stops) -> str:
    """`text` up to and including its earliest-ending stop string (as vLLM's `include_stop_str_in_output`): the
    token that completed a stop string may carry characters after it."""
    ends = [i + len(s) for s in stops if (i := text.find(s)) >= 0]
    return text[:min(ends)] if ends else text


class HFEngine:
    """Samples from a transformers model in this process: the trainer's own weights, so there is nothing to
    sync, no memory to release, and its log-probs are the trainer's."""

    name = "hf"
    needs_model = True
    samples_from_trainer_weights = True

    def __init__(self, model, tokenizer, batch_size: int = 64, lean: bool = True, sample_context=None,
                 dtype: torch.dtype | None = None, cuda_graphs: bool = True):
        from tsopsd_cli import lean as lean_mod

        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        # The plain-torch decode path (tsopsd_cli.lean) for architectures it reproduces exactly; else transformers.
        self.lean = lean and lean_mod.supports(model)
        self.sample_context = sample_context  # () -> context manager entered around generate (FSDP gather)
        self.dtype = dtype  # the dtype decoding computes in (model.dtype); None: the parameters' own
        self.cuda_graphs = cuda_graphs  # on a CUDA device, the lean decode steps replay from CUDA graphs
        # every end token the checkpoint names: tokenizer, config.json, generation_config.json (as loaded)
        self.end_ids = end_token_ids(tokenizer, getattr(model, "config", None),
                                     getattr(model, "generation_config", None))

    @staticmethod
    def check_installed() -> None:
        """transformers is a core dependency: nothing to check."""

    @classmethod
    def from_recipe(cls, tokenizer, *, model=None, checkpoint=None, model_section=None, rollout=None,
                    batch_size=None, sample_context=None, log=None) -> "HFEngine":
        if model is None:
            raise ValueError("the hf engine samples from a loaded model")
        from tsopsd_cli.devices import resolve_dtype

        bs = batch_size or (rollout.batch_size if rollout is not None else 64)
        if model_section is None:
            return cls(model, tokenizer, batch_size=bs, sample_context=sample_context)
        device = next(model.parameters()).device
        return cls(model, tokenizer, batch_size=bs, lean=model_section.lean, sample_context=sample_context,
                   dtype=resolve_dtype(model_section.dtype, device), cuda_graphs=model_section.cuda_graphs)

    def with_batch_size(self, batch_size: int) -> "HFEngine":
        if batch_size == self.batch_size:
            return self
        return HFEngine(self.model, self.tokenizer, batch_size=batch_size, lean=self.lean,
                        sample_context=self.sample_context, dtype=self.dtype, cuda_graphs=self.cuda_graphs)

    def sync_weights(self, named_tensors) -> None:
        return None  # samples from the trained parameters themselves; the iterator is not consumed (no gather)

    def release(self) -> None:
        pass

    def acquire(self) -> None:
        pass

    def own_logprobs(self, comps) -> None:
        return None

    def check_sync(self, logprob_diff, step: int) -> None:
        pass  # nothing is synced

    def close(self) -> None:
        pass

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress=None,
                 ignore_eos: bool = False) -> list[Completion]:
        """As `Engine.generate`; `ignore_eos` (benchmarks, as the vLLM engine's): sample on past every end token up
        to max_new_tokens."""
        if self.sample_context is None:
            return self._generate(prompts, params, progress, ignore_eos)
        with self.sample_context():
            return self._generate(prompts, params, progress, ignore_eos)

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], params: SamplingParams, progress=None,
                  ignore_eos: bool = False) -> list[Completion]:
        prompt_ids = prompts
        context = context_length(self.model.config)
        check_context([len(p) for p in prompts], context, "prompts")
        jobs = [(i, j) for i in range(len(prompts)) for j in range(params.num_generations)]
        gen = torch.Generator(device=self.device).manual_seed(params.seed)
        out: list[Completion] = []
        was_training = self.model.training
        self.model.eval()
        weights = self._decode_weights()  # once per call (a model.dtype copy of float32 masters), freed on return
        try:
            for s in range(0, len(jobs), self.batch_size):
                signals.check("generation")
                batch = jobs[s:s + self.batch_size]
                seeds = None
                if params.row_seeds is not None:  # the stream of completion (i, j): (row_seeds[i], j) alone
                    seeds = torch.tensor([_i64((params.row_seeds[i] * 1_000_003 + j) % _M64) for i, j in batch],
                                         dtype=torch.int64, device=self.device)
                out.extend(self._generate_batch([prompt_ids[i] for i, _ in batch], batch, params,
                                                gen if seeds is None else seeds, () if ignore_eos else self.end_ids,
                                                weights, context))
                if progress is not None:
                    progress(len(batch))
        finally:
            self.model.train(was_training)
        return out

    def _generate_batch(self, ids: list[list[int]], jobs, params: SamplingParams, gen,
                        end_ids: tuple[int, ...], weights, context: int | None) -> list[Completion]:
        """One batch of prompts `ids` (completion `jobs[r]` = (prompt index, sample index) per row): prefill, the
        decode loop, and each row's Completion. A row ends, as in vLLM, at max_new_tokens or where prompt and
        completion fill the model's context (finish reason "length"): no token is sampled at a position the model
        does not take (`context`: the model's, None when its config declares none)."""
        caps = [min(params.max_new_tokens, context - len(x)) if context else params.max_new_tokens for x in ids]
        steps = max(caps)
        input_ids, mask = _left_pad(ids, self.tokenizer.pad_token_id, self.device)
        decode = self._decode_strategy(weights)
        logits = decode.prefill(input_ids, mask, steps)
        rows = _BatchRows(len(ids), steps, self.tokenizer.pad_token_id, self.device, caps)
        ends = torch.tensor(end_ids, dtype=torch.long, device=self.device)
        live = torch.arange(len(ids), device=self.device)  # rows still decoded: a strategy may drop finished ones
        gumbel = GumbelMax()
        for t in range(steps):
            nxt, logp_next, ent = sample_next(logits, params, gen if isinstance(gen, torch.Generator) else gen[live],
                                              gumbel, t)  # [R] each
            nxt = rows.record(t, live, nxt, logp_next, ent)
            rows.end(live, nxt, ends, params.stop, self.tokenizer)
            if t == steps - 1 or bool(rows.done.all()):
                break
            signals.check("generation")
            live, logits = decode.step(nxt, live, rows.done)
        return rows.completions(ids, jobs, self.tokenizer, params.stop)

    def _decode_weights(self):
        """What every batch of one `generate` call decodes from, in the engine's dtype: the lean decoder's tensors
        (`lean.DecodeWeights`), or for transformers' forward a {name: tensor} of cast parameters (None: the
        parameters are in that dtype already)."""
        from tsopsd_cli import lean as lean_mod

        if self.lean:
            return lean_mod.DecodeWeights(self.model, self.dtype)
        return _cast_parameters(self.model, self.dtype)

    def _graphs_here(self) -> bool:
        """Decode steps replay from CUDA graphs: on a CUDA device, unless turned off (model.cuda_graphs: false)."""
        return self.cuda_graphs and self.device.type == "cuda"

    def _decode_strategy(self, weights) -> _Decode:
        """How this batch runs the model: the lean decoder (tsopsd_cli.lean), its static form replayed from CUDA
        graphs (CUDA), or transformers' own forward."""
        if not self.lean:
            return _TransformersDecode(self.model, weights)
        if self._graphs_here():
            return _StaticDecode(self.model, weights, _CudaGraphs(self.device))
        return _LeanDecode(self.model, weights)


def _cast_parameters(model, dtype: torch.dtype | None) -> dict | None:
    """{name: parameter in `dtype`} (one copy of those in another floating dtype), or None when there is nothing to
    cast."""
    params = dict(model.named_parameters())
    if dtype is None or all(p.dtype == dtype or not p.is_floating_point() for p in params.values()):
        return None
    with torch.no_grad():
        return {n: p.detach().to(dtype) if p.is_floating_point() else p for n, p in params.items()}


def _left_pad(ids: list[list[int]], pad: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> input_ids and attention mask [B, width], left-padded with `pad`, on `dev`."""
    bsz, width = len(ids), max(len(x) for x in ids)
    input_ids = torch.full((bsz, width), pad, dtype=torch.long)
    mask = torch.zeros((bsz, width), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, width - len(x):] = torch.tensor(x)
        mask[r, width - len(x):] = 1
    return input_ids.to(dev), mask.to(dev)


class _Decode(Protocol):
    """One batch's forward passes while decoding: the prompts once, then one token per live row at a time."""

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
        """input_ids, mask: [B, P] left-padded; room for `steps` new tokens -> logits [B, V] of the first one"""

    def step(self, nxt: torch.Tensor, live: torch.Tensor, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """nxt [R]: the tokens just sampled for the batch rows `live` [R]; done [B] -> (the rows decoded next [R'],
        their logits [R', V]); a strategy may drop finished rows, or keep decoding them (their tokens are pads)"""


def _compaction(live: torch.Tensor, done: torch.Tensor) -> torch.Tensor | None:
    """The lean strategies' rule for dropping finished rows: once a quarter of the live rows [R] finished, the
    positions of those still going, else None."""
    still = ~done[live]
    if int(still.sum()) <= 0.75 * len(live):
        return still.nonzero().squeeze(-1)
    return None


class _LeanDecode:
    """The plain-torch decoder with a preallocated KV cache; once a quarter of the rows finished, it drops them."""

    def __init__(self, model, weights=None):
        from tsopsd_cli.lean import LeanDecoder

        self.decoder = LeanDecoder(model, weights)

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
        return self.decoder.prefill(input_ids, mask, steps)

    def step(self, nxt: torch.Tensor, live: torch.Tensor, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = _compaction(live, done)
        if keep is not None:
            self.decoder.keep(keep)
            live, nxt = live[keep], nxt[keep]
        return live, self.decoder.step(nxt)


class _StaticDecode:
    """The lean decoder's static form (`LeanDecoder(static=True)`): the KV cache sized for this batch, every decode
    step the same shapes. The rows sampled are the lean strategy's (the same compaction rule, so the same tokens
    for the same seeds); the cache keeps them in a batch-size bucket: the batch's own size, then powers of two.
    When compaction leaves rows that fit a bucket of at most half the current one, the kept rows move there (one
    copy of the cache: its peak is 1.5x); until then finished rows keep their slots, their outputs unread. With
    `graphs` (`_CudaGraphs`) each bucket's step is captured once and replayed; without, it runs eagerly (tests)."""

    def __init__(self, model, weights, graphs=None):
        from tsopsd_cli.lean import LeanDecoder

        self.decoder = LeanDecoder(model, weights, static=True)
        self.graphs = graphs
        self.replays: dict[int, object] = {}  # bucket size -> replay (the current bucket's only)
        self.buckets: list[int] = []  # the buckets this batch went through

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
        logits = self.decoder.prefill(input_ids, mask, steps)
        self.slots = torch.arange(self.decoder.rows, device=input_ids.device)  # the cache row of each live row
        self.full = True  # every cache row is live, in order
        self.buckets.append(self.decoder.rows)
        return logits

    def step(self, nxt: torch.Tensor, live: torch.Tensor, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = _compaction(live, done)
        if keep is not None:
            live, nxt, self.slots = live[keep], nxt[keep], self.slots[keep]
            self.full = False
            self._shrink()
        self.decoder.feed(self.slots, nxt)
        logits = self._forward()  # [bucket, V]
        return live, logits if self.full else logits.index_select(0, self.slots)

    def _shrink(self) -> None:
        """Move the live rows to the smallest bucket that holds them, when it is at most half the current one."""
        n, rows = len(self.slots), self.decoder.rows
        bucket = 1 << (n - 1).bit_length()  # the smallest power of two >= n
        if 2 * bucket > rows:
            return
        pad = self.slots[:1].expand(bucket - n)  # unused slots of the new bucket: copies of a live row
        self.decoder.keep(torch.cat([self.slots, pad]))
        self.slots = torch.arange(n, device=self.slots.device)
        self.full = n == bucket
        self.replays.clear()  # the larger bucket's graph is never replayed again: its memory goes back
        self.buckets.append(bucket)

    def _forward(self) -> torch.Tensor:
        if self.graphs is None:
            return self.decoder.forward_static()
        rows = self.decoder.rows
        if rows not in self.replays:
            self.replays[rows] = self.graphs.capture(self.decoder.forward_static)
        return self.replays[rows]()


class _CudaGraphs:
    """Decode steps captured as CUDA graphs and replayed: the one part of the engine that needs CUDA. All graphs of
    a batch share one memory pool (one replays at a time, its output read before the next). Captured with
    `CUDAGraph.capture_begin/capture_end` on a side stream: `torch.cuda.graph` would also synchronise, run the
    garbage collector and empty the allocator's cache at every capture."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device=device)

    def capture(self, fn):
        """fn run once on the side stream (the warm-up a capture needs: cuBLAS workspaces, the allocator), then
        captured -> replay: () -> fn's output tensor, recomputed in place at each call. fn must read and write only
        tensors whose storage stays put, and give the same result when run twice on the same inputs (the warm-up
        and the first replay compute the same step)."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self.stream):
            fn()
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                out = fn()
            finally:
                graph.capture_end()
        current.wait_stream(self.stream)

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


class _TransformersDecode:
    """The model's own forward with a DynamicCache grown by concatenation; every row stays to the end. `params`
    ({name: tensor}, `_cast_parameters`): the parameters to run with instead of the module's own."""

    def __init__(self, model, params: dict | None = None):
        self.model = model
        self.params = params

    def _call(self, **kwargs):
        if self.params is None:
            return self.model(**kwargs)
        return torch.func.functional_call(self.model, self.params, (), kwargs)

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.mask = mask
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self._call(input_ids=input_ids, attention_mask=mask, position_ids=self.positions,
                          past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def step(self, nxt: torch.Tensor, live: torch.Tensor, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bsz = self.mask.shape[0]
        self.mask = torch.cat([self.mask, torch.ones((bsz, 1), dtype=self.mask.dtype, device=self.mask.device)], 1)
        self.positions = self.positions[:, -1:] + 1
        return live, self._call(input_ids=nxt[:, None], attention_mask=self.mask, position_ids=self.positions,
                                past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]


class _BatchRows:
    """What each row of a batch has sampled: tokens, log-probs and entropies [B, steps], and where and how it
    ended. Recorded, not searched for afterwards: the pad filler after the end may be the eos token itself
    (pad == eos is common)."""

    def __init__(self, bsz: int, steps: int, pad: int, dev, caps: list[int]):
        self.pad = pad
        self.caps = caps  # each row's most tokens: max_new_tokens, or less where the context ends first
        self.min_cap = min(caps)
        self.tokens = torch.full((bsz, steps), pad, dtype=torch.long, device=dev)
        self.logps = torch.zeros((bsz, steps), dtype=torch.float32, device=dev)
        self.ents = torch.zeros((bsz, steps), dtype=torch.float32, device=dev)
        self.done = torch.zeros(bsz, dtype=torch.bool, device=dev)
        self.n = 0  # steps sampled
        self.length = [steps] * bsz  # each row's number of tokens
        self.reason = ["length"] * bsz
        self.by_string = [False] * bsz  # ended by a stop string (its text is cut after it)

    def record(self, t: int, live: torch.Tensor, nxt: torch.Tensor, logp: torch.Tensor,
               ent: torch.Tensor) -> torch.Tensor:
        """Step t's draw for the rows `live` [R] -> its tokens, pads in rows that had already ended [R]"""
        nxt = torch.where(self.done[live], torch.full_like(nxt, self.pad), nxt)
        self.tokens[live, t] = nxt
        self.logps[live, t] = logp
        self.ents[live, t] = ent
        self.n = t + 1
        return nxt

    def end(self, live: torch.Tensor, nxt: torch.Tensor, ends: torch.Tensor, stop, tok) -> None:
        """Mark the rows that the last step ended: an end token, or a stop string in the decoded text of their last
        tokens (one may straddle token boundaries)."""
        n = self.n
        still = ~self.done[live]
        is_end = torch.isin(nxt, ends)
        ended = live[still & is_end].tolist()
        if stop:
            for r in live[still & ~is_end].tolist():
                tail = tok.decode(self.tokens[r, max(0, n - 16):n].tolist(), skip_special_tokens=True)
                if any(s in tail for s in stop):
                    ended.append(r)
                    self.by_string[r] = True
        for r in ended:
            self.done[r] = True
            self.length[r], self.reason[r] = n, "stop"
        if n < self.min_cap:  # no row's room is used up yet (the usual case: no host sync here)
            return
        for r in live[~self.done[live]].tolist():
            if n >= self.caps[r]:  # the row's room is used up: it ends here by length
                self.done[r] = True
                self.length[r] = n

    def completions(self, ids: list[list[int]], jobs, tok, stop) -> list[Completion]:
        n = self.n
        tokens, logps, ents = self.tokens[:, :n].cpu(), self.logps[:, :n].cpu(), self.ents[:, :n].cpu()
        result = []
        for r, (pi, si) in enumerate(jobs):
            n = min(self.length[r], tokens.shape[1])
            row = tokens[r, :n].tolist()
            text = tok.decode(row, skip_special_tokens=True)
            if self.by_string[r]:
                text = cut_at_stop(text, stop)
            result.append(Completion(prompt_index=pi, sample_index=si, prompt_ids=ids[r], token_ids=row,
                                     text=text, logprobs=logps[r, :n].tolist(), finish_reason=self.reason[r],
                                     entropies=ents[r, :n].tolist()))
        return result
