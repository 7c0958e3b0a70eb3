"""Tokenizer, chat-template rendering and streaming detokenization for Step-3.5 models.

Chat templates are rendered in a Jinja environment set up like the one in
``transformers`` so that prompts are byte-identical to ``apply_chat_template``
there; any difference would change the token ids the model sees.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.meta
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<|begin_of_sentence|>"
EOS_TOKEN = "<|end_of_sentence|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Kept as ordinary (non-special) added tokens so that decoding with
# skip_special_tokens=True still shows them to the reasoning and tool parsers.
MARKUP_TOKENS = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)
CONTROL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START, IM_END)

# The special-token attributes transformers passes to chat templates.
_TEMPLATE_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

def _template_token(value: Any) -> str | None:
    """Token string from a config entry, which may be a string or a serialized AddedToken."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file, or return {} when it does not exist."""
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def _as_id_list(value: Any) -> list[int]:
    """Normalize a config `eos_token_id` (int, list or missing) to a list."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _read_chat_template(model_dir: Path, config: Mapping[str, Any]) -> str | None:
    """A `chat_template.jinja` file wins over the config entry, as in transformers."""
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


def default_chat_template() -> str:
    """The Step-3.5 chat template shipped with this package."""
    return resources.files("stepflash").joinpath("chat_template.jinja").read_text(encoding="utf-8")


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Same as transformers' filter: plain json.dumps, no HTML escaping."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    return _environment().from_string(source)


@functools.lru_cache(maxsize=8)
def _template_variables(source: str) -> frozenset[str]:
    return frozenset(jinja2.meta.find_undeclared_variables(_environment().parse(source)))


def _parse_arguments(arguments: str) -> dict[str, Any]:
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise ValueError(f"tool-call arguments are not valid JSON: {arguments!r}") from exc
    if not isinstance(parsed, dict):
        raise ValueError(f"tool-call arguments must be a JSON object, got {arguments!r}")
    return parsed


def _normalize_tool_call(call: Mapping[str, Any]) -> Mapping[str, Any]:
    """Turn OpenAI-style JSON-string arguments into the mapping the template needs."""
    function = call.get("function", call)
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        return call
    function = {**function, "arguments": _parse_arguments(arguments)}
    return {**call, "function": function} if "function" in call else function


def _normalize_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """Mirror transformers' preprocessing: drop None values and alias reasoning fields."""
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_KEYS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    if "tool_calls" in message:
        message["tool_calls"] = [_normalize_tool_call(call) for call in message["tool_calls"]]
    return message


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the chat template and special tokens of a model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        chat_template: str | None = None,
        template_tokens: Mapping[str, str] | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.template_tokens = dict(template_tokens or {})
        self._eos_token_ids = list(dict.fromkeys(eos_token_ids))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json` and eos ids from a model directory.

        End-of-sequence ids are the union of the config's `eos_token`, the
        `eos_token_id` of `generation_config.json` / `config.json`, and `<|im_end|>`,
        which ends every chat turn and so must stop generation.
        """
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_file}")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(model_dir / "tokenizer_config.json")
        template_tokens = {
            key: token
            for key in _TEMPLATE_TOKEN_KEYS
            if (token := _template_token(config.get(key))) is not None
        }
        eos_ids = _as_id_list(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
        eos_ids += _as_id_list(_read_json(model_dir / "config.json").get("eos_token_id"))
        for token in (template_tokens.get("eos_token"), IM_END):
            token_id = backend.token_to_id(token) if token else None
            if token_id is not None:
                eos_ids.append(token_id)
        return cls(backend, _read_chat_template(model_dir, config), template_tokens, eos_ids)

    @property
    def bos_token_id(self) -> int | None:
        bos = self.template_tokens.get("bos_token")
        return self.backend.token_to_id(bos) if bos else None

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_token_ids)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_unlocked(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """`encode`, letting other Python threads run meanwhile: the library's batch call releases the
        GIL, its single one does not (a 100K-token text holds it ~0.2 s). For long texts, in a thread."""
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def template_variables(self) -> frozenset[str]:
        """Names the chat template reads from its context (what extra template arguments can set)."""
        return _template_variables(self.chat_template) if self.chat_template else frozenset()

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to prompt text, as transformers would with `tokenize=False`.

        Unlike transformers, tool-call `arguments` may also be JSON strings (as in the
        OpenAI API); they are parsed into mappings first. Extra keyword arguments
        are passed to the template and override the special-token variables.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        try:
            template = _compile_template(self.chat_template)
            return template.render(
                messages=[_normalize_message(message) for message in messages],
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self.template_tokens, **kwargs},
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template error: {exc}") from exc


class IncrementalDetokenizer:
    """Turns a growing stream of token ids into text deltas.

    Byte-level tokens can end in the middle of a UTF-8 character, so text is held
    back while the decoded tail ends in U+FFFD. Only the tokens since the last
    emitted boundary are decoded each step: ``prefix_offset`` marks where the
    decoding window starts and ``read_offset`` where its already-emitted part ends.
    The deltas joined with `flush()` equal `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], self._skip_special_tokens)

    def feed(self, token_ids: int | Sequence[int]) -> str:
        """Add one or more token ids; return the newly completed text (may be empty)."""
        self._ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset)
        if len(window_text) <= len(prefix_text) or window_text.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return window_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return the held-back text, replacement characters included, at end of stream."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset = len(self._ids)
        return window_text[len(prefix_text) :]


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_bpe_tokenizer(
    texts: Iterable[str],
    out_dir: Path,
    vocab_size: int,
    chat_template: str | None = None,
    length: int | None = None,
) -> None:
    """Train byte-level BPE on `texts` and write tokenizer.json + tokenizer_config.json.

    Ids 0 and 1 are `<|begin_of_sentence|>` and `<|end_of_sentence|>`, followed by the
    other control and markup tokens, the 256 byte symbols, and the learned merges until
    `vocab_size` is reached (or merges run out). Deterministic for the same texts.
    The files load with both `Tokenizer.from_pretrained` and transformers' AutoTokenizer.
    """
    specials = [*CONTROL_TOKENS, *MARKUP_TOKENS]
    minimum = len(specials) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small; need at least {minimum}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer, length=length)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, backend.token_to_id(BOS_TOKEN))],
    )
    data = json.loads(backend.to_str())
    for token in data["added_tokens"]:
        token["special"] = token["content"] in CONTROL_TOKENS
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "tokenizer.json", data)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": chat_template if chat_template is not None else default_chat_template(),
    }
    _write_json(out_dir / "tokenizer_config.json", config)
