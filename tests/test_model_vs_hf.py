"""Logits and greedy tokens against Hugging Face transformers with identical weights."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import TINY_LLAMA, TINY_QWEN2, sharegpt_user_messages

from cadenza import LLM, SamplingParams
from cadenza.model.hf_reference import build_hf_model
from cadenza.model.source import random_model_source

DECODE_STEPS = 32


def engine_logits(llm: LLM, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy-decode ``steps`` tokens, recording the logits row of every sampling step."""
    engine = llm.engine
    engine.add_request(
        "probe", prompt, SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    )
    rows = []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if outputs:
            rows.append(engine.runner.last_logits[0].clone())
    tokens = outputs[0].outputs[0].token_ids
    return tokens, torch.stack(rows)


def hf_logits(model, tokens: list[int], first: int) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(torch.tensor([tokens])).logits[0]
    return logits[first - 1 : len(tokens) - 1].float()


@pytest.mark.parametrize("linear_backend", ["auto", "torch"])
@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_QWEN2], ids=lambda c: c.name)
def test_tiny_random_models_match_transformers(config, linear_backend):
    source = random_model_source(config, seed=3)
    hf = build_hf_model(config, source.state_dict)
    # Small blocks and budget: the prompt is prefilled in chunks over a cached prefix.
    llm = LLM(
        source=source,
        block_size=4,
        num_kv_blocks=64,
        max_num_batched_tokens=16,
        linear_backend=linear_backend,
    )
    prompt = torch.randint(
        3, config.vocab_size, (45,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    generated, ours = engine_logits(llm, prompt, DECODE_STEPS)
    theirs = hf_logits(hf, prompt + generated, len(prompt))
    assert ours.shape == theirs.shape == (DECODE_STEPS + 1, config.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_QWEN2], ids=lambda c: c.name)
def test_tiny_random_models_match_transformers_on_cuda(config, dtype):
    """The CUDA path (the Triton attention kernel, weights and KV on the device) against
    transformers on the CPU in float32 with the same weights: float32 as tight as on the
    CPU; bfloat16 within its rounding (8 bits of mantissa through every layer)."""
    source = random_model_source(config, seed=3)
    hf = build_hf_model(config, source.state_dict)
    llm = LLM(
        source=source,
        device="cuda",
        dtype=dtype,
        block_size=16,
        num_kv_blocks=64,
        max_num_batched_tokens=16,
    )
    assert llm.engine.runner.attention.name == "triton"
    prompt = torch.randint(
        3, config.vocab_size, (45,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    generated, ours = engine_logits(llm, prompt, DECODE_STEPS)
    theirs = hf_logits(hf, prompt + generated, len(prompt))
    error = (ours.cpu() - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    print(f"{config.name} {dtype}: max logit error {error:.3g} (largest logit {scale:.3g})")
    assert error <= (1e-3 if dtype == "float32" else 0.05 * scale)


def test_smollm2_logits_match_transformers(smollm2_source, smollm2_hf):
    llm = LLM(source=smollm2_source, num_kv_blocks=256, max_num_batched_tokens=64)
    tokenizer = llm.get_tokenizer()
    prompt = tokenizer.encode_chat(
        [{"role": "user", "content": "Explain paged attention in two sentences."}]
    )
    generated, ours = engine_logits(llm, prompt, DECODE_STEPS)
    theirs = hf_logits(smollm2_hf, prompt + generated, len(prompt))
    assert (ours - theirs).abs().max().item() <= 1e-3


def test_smollm2_greedy_matches_transformers_on_sharegpt(smollm2_source, smollm2_hf):
    llm = LLM(source=smollm2_source, num_kv_blocks=512)
    tokenizer = llm.get_tokenizer()
    messages = sharegpt_user_messages(8)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": m}]) for m in messages]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    ours = llm.generate(prompts, params)  # all eight batched together
    for prompt, output in zip(prompts, ours, strict=True):
        with torch.inference_mode():
            ref = smollm2_hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=40,
                min_new_tokens=40,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_ids[0],
            )[0, len(prompt) :].tolist()
        assert output.outputs[0].token_ids == ref
