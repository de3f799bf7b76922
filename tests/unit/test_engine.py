from __future__ import annotations

import torch

from tsopsd_cli.checkpoint import load_checkpoint
from tsopsd_cli.engines import SamplingParams
from tsopsd_cli.engines.hf import HFEngine, filter_logits
from tsopsd_cli.modeling import completion_hidden, decoder_and_head, pack


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert not torch.isinf(filter_logits(logits, 0, 1.0)).any()


def test_generation_is_seeded_and_logprobs_match_teacher_forcing(tiny_ckpt):
    ld = load_checkpoint(tiny_ckpt, device="cpu")
    eng = HFEngine(ld.model, ld.tokenizer, batch_size=3)  # batches of 3 over 2 prompts x 3 samples (ragged)
    params = SamplingParams(num_generations=3, temperature=1.3, max_new_tokens=12, seed=5)
    prompts = [ld.tokenizer(t)["input_ids"] for t in ("1+2=?\n", "(3*4)-5=?\n")]
    a = eng.generate(prompts, params)
    b = eng.generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [(c.prompt_index, c.sample_index) for c in a] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    # logprobs are log softmax(logits / T) of the sampled tokens, as a teacher-forced pass computes them
    _, head = decoder_and_head(ld.model)
    seqs = [(c.prompt_ids, c.token_ids) for c in a]
    batch = pack(seqs, ld.tokenizer.pad_token_id, ld.device)
    with torch.no_grad():
        hidden, _ = completion_hidden(ld.model, batch)
        lp = (head(hidden) / 1.3).log_softmax(-1).gather(-1, batch.targets[:, None]).squeeze(-1)
    want = torch.tensor([x for c in a for x in c.logprobs])
    torch.testing.assert_close(lp, want, atol=2e-4, rtol=1e-4)
    for c in a:
        assert len(c.logprobs) == len(c.token_ids) <= 12
        assert c.finish_reason == ("stop" if ld.tokenizer.eos_token_id in c.token_ids else "length")
        # completions end at the first eos; the pad token is a real token a model may sample, so it may appear
        assert ld.tokenizer.eos_token_id not in c.token_ids[:-1]


def test_stop_strings_end_completions(tiny_ckpt):
    ld = load_checkpoint(tiny_ckpt, device="cpu")
    eng = HFEngine(ld.model, ld.tokenizer)
    prompt = [ld.tokenizer("1+1=?\n")["input_ids"]]
    free = eng.generate(prompt, SamplingParams(num_generations=8, temperature=3.0, max_new_tokens=30, seed=0))
    # stop on a character that some unconstrained sample contains
    char = next(ch for c in free for ch in c.text if ch.strip())
    cut = eng.generate(prompt, SamplingParams(num_generations=8, temperature=3.0, max_new_tokens=30, seed=0,
                                                   stop=(char,)))
    for f, c in zip(free, cut, strict=True):
        if char in f.text:
            assert c.finish_reason == "stop" and c.text.endswith(char) and c.text.count(char) == 1
            assert f.text.startswith(c.text)


def test_row_seeds_make_samples_independent_of_batch_composition(tiny_ckpt):
    ld = load_checkpoint(tiny_ckpt, device="cpu")
    tok = ld.tokenizer
    prompts = [tok(t)["input_ids"] for t in ("1+2=?\n", "(3*4)-5=?\n", "7*7=?\n")]
    p = SamplingParams(num_generations=2, temperature=1.5, max_new_tokens=10, row_seeds=(11, 22, 33))
    together = HFEngine(ld.model, tok, batch_size=6).generate(prompts, p)
    alone = HFEngine(ld.model, tok, batch_size=1).generate(prompts[1:2], SamplingParams(
        num_generations=2, temperature=1.5, max_new_tokens=10, row_seeds=(22,)))
    assert [c.token_ids for c in together[2:4]] == [c.token_ids for c in alone]
    assert together[0].token_ids != together[1].token_ids or together[0].token_ids != together[2].token_ids


def test_counter_uniform_is_uniform_and_depends_only_on_seed_step_and_column():
    from tsopsd_cli.engines.hf import counter_uniform

    seeds = torch.tensor([3, -7, 2**62 + 5, 3], dtype=torch.int64)
    u = counter_uniform(seeds, 4, 50_000)
    assert u.shape == (4, 50_000) and u.dtype == torch.float64
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert torch.equal(u[0], u[3])  # the same seed, the same numbers, whatever else is in the batch
    assert torch.equal(counter_uniform(seeds[1:2], 4, 50_000)[0], u[1])
    assert not torch.equal(u[0], counter_uniform(seeds, 5, 50_000)[0])  # another step, other numbers
    for row in u[:3]:
        assert abs(float(row.mean()) - 0.5) < 0.005 and abs(float(row.var()) - 1 / 12) < 0.002
        counts = torch.histc(row, bins=20, min=0, max=1)
        chi2 = float(((counts - 2500) ** 2 / 2500).sum())
        assert chi2 < 45  # 19 degrees of freedom: p ~ 0.001
    assert abs(float(torch.corrcoef(u[:3])[0, 1])) < 0.02


def test_gumbel_max_with_row_seeds_samples_the_softmax():
    """argmax(logits + Gumbel noise from the engine's per-row counter generator) is a sample of softmax(logits)."""
    from tsopsd_cli.engines.hf import counter_uniform

    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    n = 40_000
    u = counter_uniform(torch.arange(n, dtype=torch.int64) * 1_000_003, 0, 5)
    picks = (probs.log().double() - (-u.log()).log()).argmax(-1)
    freq = torch.bincount(picks, minlength=5).double() / n
    chi2 = float(n * ((freq - probs.double()) ** 2 / probs.double()).sum())
    assert chi2 < 18.5  # 4 degrees of freedom: p ~ 0.001
    torch.testing.assert_close(freq, probs.double(), atol=0.015, rtol=0)


def test_a_stop_string_end_appends_no_unsampled_eos_when_pad_is_eos(tiny_ckpt):
    """pad == eos (common in real tokenizers): the filler after a row's end is the eos id itself, and must not be
    read as a sampled eos (which would then be trained on and lengthen eval completions)."""
    ld = load_checkpoint(tiny_ckpt, device="cpu")
    tok = ld.tokenizer
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    eng = HFEngine(ld.model, tok, batch_size=16)
    prompts = [tok(t)["input_ids"] for t in ("1+2=?\n", "(3*4)-5=?\n")]
    stops = tuple("0123456789")  # a random tiny model samples digits often: many rows end by a stop string
    comps = eng.generate(prompts, SamplingParams(num_generations=8, temperature=1.0, max_new_tokens=20, stop=stops,
                                                 row_seeds=(3, 4)))
    by_string = [c for c in comps if c.finish_reason == "stop" and (not c.token_ids or c.token_ids[-1] != eos)]
    assert len(by_string) >= 4  # the case under test happens
    for c in comps:
        if eos in c.token_ids:
            assert c.token_ids.index(eos) == len(c.token_ids) - 1 and c.finish_reason == "stop"
        if c.finish_reason == "stop" and c.token_ids[-1] != eos:
            assert any(s in tok.decode(c.token_ids) for s in stops)
            assert not any(s in tok.decode(c.token_ids[:-1]) for s in stops)  # ends at the stop's first token
        assert len(c.logprobs) == len(c.token_ids)


def test_buffered_gumbel_max_gives_counter_uniforms_tokens():
    """GumbelMax (buffers reused across steps and across fewer rows) samples exactly the tokens of the plain
    expression argmax(logits - log(-log counter_uniform(seeds, step, V)))."""
    from tsopsd_cli.engines.hf import GumbelMax, counter_uniform

    g = torch.Generator().manual_seed(0)
    seeds = torch.tensor([3, -7, 2**62 + 5, 11], dtype=torch.int64)
    sampler = GumbelMax()
    for step, rows in ((0, 4), (1, 4), (2, 2), (7, 3)):
        logits = torch.randn(rows, 997, generator=g) * 3
        want = (logits - (-counter_uniform(seeds[:rows], step, 997).log()).log().to(logits.dtype)).argmax(-1)
        assert torch.equal(sampler(logits, seeds[:rows], step), want)
        noise = (-counter_uniform(seeds[:rows], step, 997).log()).log().to(logits.dtype)
        assert torch.equal(sampler.g[:rows], logits - noise)  # the buffer holds logits - noise now


def test_sampling_in_row_blocks_equals_the_whole_batch(monkeypatch):
    """sample_next takes per-row-seeded rows a few at a time on the CPU (a 151,936-token vocabulary: 4); blocks of
    3 rows give exactly the tokens, log-probs and entropies of one block of all rows, with a temperature and
    top-k/top-p truncation; the log-probs are the untruncated temperature-scaled ones, against float64."""
    from tsopsd_cli.engines import hf
    from tsopsd_cli.engines.hf import GumbelMax, sample_next

    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(8, 501, generator=g) * 4).bfloat16()
    seeds = torch.arange(8, dtype=torch.int64) * 977 - 3
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=40, top_p=0.9)):
        got = {}
        for rows in (8, 3):
            monkeypatch.setattr(hf, "rows_per_block", lambda x, rows=rows: rows)
            got[rows] = [sample_next(logits, params, seeds, GumbelMax(), step) for step in range(3)]
        for a, b in zip(got[8], got[3]):
            for x, y in zip(a, b):
                assert torch.equal(x, y)
        tok, lp, ent = got[3][0]
        ref = (logits.double() / params.temperature).log_softmax(-1)
        torch.testing.assert_close(lp.double(), ref.gather(-1, tok[:, None]).squeeze(-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent.double(), -(ref.exp() * ref).sum(-1), atol=1e-4, rtol=1e-5)
        if params.top_k:
            assert bool((ref.argsort(-1, descending=True)[:, :40] == tok[:, None]).any(-1).all())  # within top-k
