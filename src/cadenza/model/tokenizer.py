"""Tokenizer: a thin wrapper over a ``tokenizers.Tokenizer`` plus the chat template.

Built either from a GGUF file's metadata (byte-level BPE only) or from a Hugging Face model
directory (``tokenizer.json`` + ``tokenizer_config.json``).

GGUF pre-tokenization follows llama.cpp (``tokenizer.ggml.pre``), which is what the vocabulary
was trained with. For ``smollm`` (and StarCoder-style vocabularies) digits are split one by one
*before* the GPT-2 regex runs; transformers' GGUF loader skips that step, which changes the
tokens of a whitespace run in front of a digit (``"\\n\\n1."``: llama.cpp and the original
``tokenizer.json`` give ``ĊĊ`` + ``1``, transformers' GGUF tokenizer gives ``Ċ`` + ``Ċ`` + ``1``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

if TYPE_CHECKING:
    from gguf import GGUFReader

    from cadenza.model.gguf_file import GGUFFile

# Used when a model ships no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Special tokens that close a turn in common chat templates; when the template uses one and it is
# a special token of the vocabulary, generation must stop on it too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

# GGUF token types (gguf.TokenType), spelled out so this module does not need gguf at import.
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4

# Pre-tokenizer regexes, as in llama.cpp's llama-vocab.cpp / the original tokenizer.json files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
)
_GPT2 = frozenset({"gpt-2", "gpt2", "default", "phi-2", "mpt", "olmo", "jais", "roberta-bpe"})
_LLAMA3 = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"})
# llama.cpp looks a whole word up in the vocabulary before merging for these (``ignore_merges``).
_IGNORE_MERGES = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"})
_QWEN2 = frozenset({"qwen2", "deepseek-r1-qwen", "megrez"})


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    split = _LLAMA3_SPLIT if pre in _LLAMA3 else _QWEN2_SPLIT if pre in _QWEN2 else None
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre is not None and pre not in _GPT2:
        warnings.warn(f"unknown GGUF pre-tokenizer {pre!r}; using the GPT-2 regex", stacklevel=3)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _gguf_field(reader: GGUFFile | GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or a dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"messages[{i}]['{key}'] must be a string")
    return messages


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@cache
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandbox, with the same globals, as transformers."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class Tokenizer:
    """Text <-> token ids, plus chat-template rendering.

    ``chat_template`` is the model's own template, or None when it has none (``apply_chat_template``
    then falls back to plain ChatML, :data:`CHATML_TEMPLATE`).
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        chat_template: str | None = None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.chat_template = chat_template
        eos = list(dict.fromkeys(eos_token_ids))
        if chat_template:
            specials = self._special_contents()
            for token in END_OF_TURN_TOKENS:
                token_id = backend.token_to_id(token)
                if token in chat_template and token in specials and token_id is not None:
                    eos.append(token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, reader: GGUFFile | GGUFReader) -> Tokenizer:
        """Rebuild the byte-level BPE tokenizer described by a GGUF file's metadata."""
        model = _gguf_field(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"unsupported GGUF tokenizer model {model!r}: only byte-level BPE ('gpt2') is "
                "supported; use the Hugging Face directory of this model instead"
            )
        tokens: list[str] = _gguf_field(reader, "tokenizer.ggml.tokens")
        token_types: list[int] = _gguf_field(reader, "tokenizer.ggml.token_type") or []
        merges: list[str] = _gguf_field(reader, "tokenizer.ggml.merges") or []
        pre: str | None = _gguf_field(reader, "tokenizer.ggml.pre")

        alphabet = set(bytes_to_unicode().values())
        spell = bytes_to_unicode()
        # Every real token is written in the byte alphabet; respell any that is not (as
        # transformers does) so the vocabulary keeps its size and ids.
        vocab = {
            tok if set(tok) <= alphabet else "".join(spell[b] for b in tok.encode("utf-8")): i
            for i, tok in enumerate(tokens)
        }
        pairs = [tuple(m.split(" ")) for m in merges]
        bad = [m for m, p in zip(merges, pairs, strict=True) if len(p) != 2]
        if bad:
            raise ValueError(f"malformed GGUF merges, e.g. {bad[0]!r}")
        backend = BackendTokenizer(
            models.BPE(
                vocab=vocab,
                merges=pairs,
                fuse_unk=False,
                byte_fallback=False,
                ignore_merges=pre in _IGNORE_MERGES,
            )
        )
        backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()

        control = [
            AddedToken(tok, special=True, normalized=False)
            for tok, kind in zip(tokens, token_types, strict=False)
            if kind == _GGUF_CONTROL and set(tok) <= alphabet
        ]
        user_defined = [
            AddedToken(tok, special=False, normalized=False)
            for tok, kind in zip(tokens, token_types, strict=False)
            if kind == _GGUF_USER_DEFINED and tok in vocab
        ]
        if control:
            backend.add_special_tokens(control)
        if user_defined:
            backend.add_tokens(user_defined)

        bos_id = _gguf_field(reader, "tokenizer.ggml.bos_token_id")
        if _gguf_field(reader, "tokenizer.ggml.add_bos_token", False) and bos_id is not None:
            bos = tokens[bos_id]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, bos_id)]
            )
        eos = [
            _gguf_field(reader, f"tokenizer.ggml.{key}")
            for key in ("eos_token_id", "eot_token_id", "eom_token_id")
        ]
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=[e for e in eos if e is not None],
            chat_template=_gguf_field(reader, "tokenizer.chat_template"),
            pad_token_id=_gguf_field(reader, "tokenizer.ggml.padding_token_id"),
            unk_token_id=_gguf_field(reader, "tokenizer.ggml.unknown_token_id"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``,
        ``special_tokens_map.json``, ``generation_config.json`` when present)."""
        directory = Path(path)
        tokenizer_json = directory / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"{directory} has no tokenizer.json")
        backend = BackendTokenizer.from_file(str(tokenizer_json))

        def read_json(name: str) -> dict[str, Any]:
            file = directory / name
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}

        tok_config = read_json("tokenizer_config.json")
        special_map = read_json("special_tokens_map.json")

        def token_id(key: str) -> int | None:
            content = _token_content(tok_config.get(key)) or _token_content(special_map.get(key))
            return None if content is None else backend.token_to_id(content)

        template_file = directory / "chat_template.jinja"
        if template_file.is_file():
            template: Any = template_file.read_text(encoding="utf-8")
        else:
            template = tok_config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        eos = [token_id("eos_token")]
        eos += _as_id_list(read_json("generation_config.json").get("eos_token_id"))
        return cls(
            backend,
            bos_token_id=token_id("bos_token"),
            eos_token_ids=[e for e in eos if e is not None],
            chat_template=template if isinstance(template, str) else None,
            pad_token_id=token_id("pad_token"),
            unk_token_id=token_id("unk_token"),
        )

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (loadable by ``from_hf_dir``)."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {
            "bos_token": self._token(self.bos_token_id),
            "eos_token": self._token(self.eos_token_ids[0] if self.eos_token_ids else None),
            "pad_token": self._token(self.pad_token_id),
            "unk_token": self._token(self.unk_token_id),
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # -- token ids ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) are
        always parsed as such; ``add_special_tokens`` only adds the BOS the model wants."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render ``messages`` (and ``tools``, for templates that use them) with the model's
        chat template, as transformers would."""
        messages = _validate_messages(messages)
        template = _compile_template(self.chat_template or CHATML_TEMPLATE)
        return template.render(
            messages=messages,
            tools=tools or None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token(self.bos_token_id) or "",
            eos_token=self._token(self.eos_token_ids[0] if self.eos_token_ids else None) or "",
            pad_token=self._token(self.pad_token_id),
            unk_token=self._token(self.unk_token_id),
        )

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of the rendered chat. The template writes any BOS itself, so none is added."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools))

    # -- helpers --------------------------------------------------------------------------------

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def _special_contents(self) -> set[str]:
        return {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
