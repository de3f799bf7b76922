"""The hf engine's decode strategies beyond the CPU default (engines/hf.py): the static-cache step that CUDA graphs
replay, run eagerly here and through a recorder standing in for torch.cuda's graph and stream calls, and decoding
from a model.dtype copy of the weights."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from tsopsd_cli.checkpoint import load_checkpoint
from tsopsd_cli.engines import SamplingParams
from tsopsd_cli.engines import hf
from tsopsd_cli.engines.hf import HFEngine


def _storages(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class _Recorder(TorchDispatchMode):
    """Records every aten op run while a fake graph captures, with the very tensors it read and wrote: a replay
    reruns them on those tensors, as a CUDA graph reruns its kernels on the same addresses. A Python number that
    changed between steps would be replayed stale, as on a GPU; a host sync (`.item()`) fails the capture."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        assert func is not torch.ops.aten._local_scalar_dense.default, "a host sync inside a captured step"
        out = func(*args, **kwargs)
        self.graph.ops.append((func, args, kwargs, out))
        return out


class _FakeGraph:
    """torch.cuda.CUDAGraph on the CPU: capture_begin/end record the ops (they also run once, as the captured step
    is idempotent), replay reruns them and writes each result into the tensor the capture produced."""

    made: list["_FakeGraph"] = []
    last: "_FakeGraph | None" = None

    def __init__(self):
        self.ops, self.replays = [], 0
        _FakeGraph.made.append(self)

    def capture_begin(self, pool=None, capture_error_mode="global"):
        assert pool is not None  # every bucket's graph of a batch shares one pool
        self.mode = _Recorder(self)
        self.mode.__enter__()

    def capture_end(self):
        self.mode.__exit__(None, None, None)
        self.reads = set().union(*(_storages((args, kwargs)) for _, args, kwargs, _ in self.ops))

    def replay(self):
        self.replays += 1
        _FakeGraph.last = self
        for func, args, kwargs, out in self.ops:
            res = func(*args, **kwargs)
            inputs = _storages((args, kwargs))
            for o, r in zip(tree_flatten(out)[0], tree_flatten(res)[0]):
                if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:  # not a view/in-place
                    o.copy_(r)


class _FakeStream:
    def __init__(self, device=None):
        pass

    def wait_stream(self, other):
        pass


def _fake_cuda_graphs(monkeypatch) -> list[_FakeGraph]:
    """What only a GPU has, replaced: graphs, streams, the pool handle; the engine takes its CUDA-graph path.
    Returns the graphs made from now on."""
    _FakeGraph.made.clear()
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(HFEngine, "_graphs_here", lambda self: True)
    return _FakeGraph.made


def _strategies(monkeypatch) -> list:
    made = []
    real = HFEngine._decode_strategy
    monkeypatch.setattr(HFEngine, "_decode_strategy", lambda self, w: made.append(real(self, w)) or made[-1])
    return made


def _toy_prompts(ld, n: int):
    from tsopsd_cli.tasks import toy

    return [ld.tokenizer(p.prompt)["input_ids"] for p in toy.make_problems("test", n, seed=3)]


def _same(a, b, tol: float) -> None:
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    for x, y in zip(a, b, strict=True):
        assert x.finish_reason == y.finish_reason
        assert x.logprobs == pytest.approx(y.logprobs, abs=tol) and x.entropies == pytest.approx(y.entropies, abs=tol)


@pytest.mark.slow
@pytest.mark.parametrize("row_seeds", [True, False])
def test_static_step_eagerly_samples_what_the_lean_decoder_samples(toy_base, monkeypatch, row_seeds):
    """The static form (whole zero-filled cache, validity mask, batch-size buckets) run eagerly on the CPU: the same
    tokens as the lean decoder, log-probs and entropies to float rounding (attention sums over the whole cache);
    with one generator stream too (the same rows are sampled at every step). Finished rows move the batch to
    smaller buckets."""
    ld = load_checkpoint(toy_base, device="cpu")
    prompts = _toy_prompts(ld, 24)
    params = SamplingParams(num_generations=2, temperature=1.0, max_new_tokens=40, seed=3,
                            row_seeds=tuple(range(24)) if row_seeds else None)
    want = HFEngine(ld.model, ld.tokenizer, batch_size=48).generate(prompts, params)
    made = _strategies(monkeypatch)
    monkeypatch.setattr(HFEngine, "_graphs_here", lambda self: True)
    monkeypatch.setattr(hf, "_CudaGraphs", lambda device: None)  # the static step, without graphs
    got = HFEngine(ld.model, ld.tokenizer, batch_size=48).generate(prompts, params)
    _same(got, want, 1e-5)
    (strategy,) = made
    assert isinstance(strategy, hf._StaticDecode) and strategy.graphs is None
    assert strategy.buckets[0] == 48 and len(strategy.buckets) >= 3  # 48 rows, then powers of two
    assert all(b < a and b & (b - 1) == 0 for a, b in zip(strategy.buckets, strategy.buckets[1:]))


@pytest.mark.slow
def test_graph_capture_once_per_bucket_replays_on_static_buffers(toy_base, monkeypatch):
    """CUDA graphs as the engine uses them, with torch.cuda's graph and stream calls replaced by a recorder: one
    capture per batch-size bucket (batches of 16 and a last one of 4; buckets shrink as rows finish), every decode
    step a replay whose recorded ops read the decoder's current static buffers, and the tokens of the lean decoder
    (the replays rerun recorded ops on recorded tensors: a step that read a per-step Python value would drift)."""
    ld = load_checkpoint(toy_base, device="cpu")
    prompts = _toy_prompts(ld, 10)
    params = SamplingParams(num_generations=2, temperature=1.0, max_new_tokens=40, row_seeds=tuple(range(10)))
    want = HFEngine(ld.model, ld.tokenizer, batch_size=16).generate(prompts, params)
    graphs = _fake_cuda_graphs(monkeypatch)
    made = _strategies(monkeypatch)
    steps = []
    real_forward = hf._StaticDecode._forward

    def forward(self):
        out = real_forward(self)
        dec = self.decoder
        buffers = _storages([dec.tokens, dec.write, dec.valid, dec.shift, dec.cache[0], dec.cache[-1]])
        assert buffers <= _FakeGraph.last.reads  # the graph replayed reads the buffers just fed
        steps.append((self, dec.rows, _FakeGraph.last, out))
        return out

    monkeypatch.setattr(hf._StaticDecode, "_forward", forward)
    got = HFEngine(ld.model, ld.tokenizer, batch_size=16).generate(prompts, params)
    _same(got, want, 1e-5)
    assert [s.buckets[0] for s in made] == [16, 4]
    assert len(graphs) == sum(len(s.buckets) for s in made)  # one capture per bucket
    assert any(len(s.buckets) > 1 for s in made)
    assert sum(g.replays for g in graphs) == len(steps)  # each decode step: one replay, no eager step
    for strategy in made:
        mine = [(rows, graph, out) for s, rows, graph, out in steps if s is strategy]
        assert [rows for rows, _, _ in mine] == sorted((rows for rows, _, _ in mine), reverse=True)
        for rows in {r for r, _, _ in mine}:
            same_bucket = [(graph, out) for r, graph, out in mine if r == rows]
            assert len({id(g) for g, _ in same_bucket}) == 1  # one graph per bucket, replayed
            assert len({o.data_ptr() for _, o in same_bucket}) == 1  # its output buffer, rewritten in place


def test_graphs_only_on_cuda_and_a_recipe_turns_them_off(tiny_ckpt):
    from tsopsd_cli.recipe import ModelSection

    ld = load_checkpoint(tiny_ckpt, device="cpu")
    eng = HFEngine.from_recipe(ld.tokenizer, model=ld.model, model_section=ModelSection())
    assert eng.cuda_graphs and not eng._graphs_here()  # the CPU: the lean decoder, byte for byte as before
    assert isinstance(eng._decode_strategy(eng._decode_weights()), hf._LeanDecode)
    eng.device = torch.device("cuda")
    assert eng._graphs_here()
    off = HFEngine.from_recipe(ld.tokenizer, model=ld.model, model_section=ModelSection(cuda_graphs=False))
    off.device = torch.device("cuda")
    assert not off._graphs_here() and not off.with_batch_size(3)._graphs_here()


@pytest.mark.parametrize("lean", [True, False])
def test_decoding_float32_weights_in_bfloat16_samples_from_one_copy(tiny_ckpt, lean):
    """An engine whose dtype (model.dtype) is bfloat16 over float32 parameters decodes from a bfloat16 copy: the same
    tokens, log-probs and entropies as an engine on a model whose parameters were cast to bfloat16 by hand (the
    rotary tables stay float32 in both). Autocast would differ by rounding: it keeps the residual stream and the
    norms' outputs in float32. The lean path copies once per generate call; the transformers path runs its forward
    on the cast parameters (torch.func.functional_call)."""
    ld = load_checkpoint(tiny_ckpt, device="cpu")
    by_hand = copy.deepcopy(ld.model)
    for p in by_hand.parameters():
        p.data = p.data.to(torch.bfloat16)
    prompts = [ld.tokenizer(t)["input_ids"] for t in ("1+2=?\n", "(3*4)-5=?\n")]
    params = SamplingParams(num_generations=3, temperature=1.0, max_new_tokens=12, row_seeds=(4, 9))
    got = HFEngine(ld.model, ld.tokenizer, lean=lean, dtype=torch.bfloat16).generate(prompts, params)
    want = HFEngine(by_hand, ld.tokenizer, lean=lean).generate(prompts, params)
    _same(got, want, 0.0)
    assert all(p.dtype == torch.float32 for p in ld.model.parameters())  # the engine's model is untouched
    float32 = HFEngine(ld.model, ld.tokenizer, lean=lean).generate(prompts, params)
    assert [c.logprobs for c in float32] != [c.logprobs for c in got]  # (it did compute in bfloat16)


@pytest.mark.parametrize("lean", [True, False])
def test_a_completion_ends_where_prompt_and_completion_fill_the_context(tiny_ckpt, lean):
    """As vLLM does: a row whose prompt leaves less room than max_new_tokens ends by length where prompt and
    completion fill max_position_embeddings, and samples nothing at a position the model does not take. Every row
    (capped or not, with its own seed stream) samples what it samples with a context that is never reached, up to
    its cap; a prompt with no room is refused (exit 2's DataError) by the engine itself."""
    from tsopsd_cli.errors import DataError

    ld = load_checkpoint(tiny_ckpt, device="cpu")
    prompts = [ld.tokenizer(t)["input_ids"] for t in ("1+2=?\n", "(3*4)-5+(6*7)-8=?\n", "9=?\n")]
    params = SamplingParams(num_generations=2, temperature=1.0, max_new_tokens=16, row_seeds=(1, 2, 3))
    engine = HFEngine(ld.model, ld.tokenizer, lean=lean)
    wide = engine.generate(prompts, params, ignore_eos=True)
    context = max(len(p) for p in prompts) + 5  # the longest prompt has room for 5 tokens, the others for more
    ld.model.config.max_position_embeddings = context
    narrow = engine.generate(prompts, params, ignore_eos=True)
    for w, c in zip(wide, narrow, strict=True):
        cap = min(16, context - len(c.prompt_ids))
        assert len(c.token_ids) == cap and len(c.prompt_ids) + len(c.token_ids) <= context
        assert c.finish_reason == "length"
        assert c.token_ids == w.token_ids[:cap]
        assert c.logprobs == pytest.approx(w.logprobs[:cap], abs=1e-5)
    lengths = [len(c.token_ids) for c in narrow]
    assert min(lengths) == 5 and max(lengths) > 5  # capped rows beside rows with more room
    ld.model.config.max_position_embeddings = len(prompts[1])
    with pytest.raises(DataError, match="1 of 3 prompts are as long as or longer than the model's context"):
        engine.generate(prompts, params)
