from __future__ import annotations

from pathlib import Path

import pytest

from checkpoints import write_byte_level_tokenizer
from stepflash.tokenizer import (
    CONTROL_TOKENS,
    MARKUP_TOKENS,
    Tokenizer,
)
from stepflash.train.tokenizer import corpus_files, train_tokenizer

VOCAB_SIZE = 500

_WORDS = (
    "batch", "cache", "decode", "encode", "expert", "gate", "layer", "logits", "mask",
    "norm", "prompt", "query", "router", "sample", "stream", "token", "weight", "window",
)

_FUNCTION = '''\
def {name}_{word}(values, scale={index}):
    """Scale the {word} values by {index} and return their total for the {other}."""
    total = 0
    for value in values:
        if value > {index}:
            total += value * scale
        else:
            total -= value
    return total

'''

_CLASS = '''\
class Model{index}:
    def __init__(self, size: int) -> None:
        self.size = size  # größe — 大小

    def forward(self, hidden_states):
        return self.size * hidden_states

'''


def _write_corpus(root: Path) -> list[Path]:
    """Three small generated Python files full of `def `, `return` and `self`."""
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for file_index, name in enumerate(("alpha", "beta", "gamma")):
        text = "".join(
            _FUNCTION.format(name=name, word=word, other=_WORDS[-i], index=i)
            + _CLASS.format(index=file_index * 100 + i)
            for i, word in enumerate(_WORDS)
        )
        path = root / f"{name}.py"
        path.write_text(text, encoding="utf-8")
        files.append(path)
    return files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, corpus: list[Path]) -> Path:
    out_dir = tmp_path_factory.mktemp("trained")
    train_tokenizer(corpus, out_dir, VOCAB_SIZE)
    return out_dir


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


def test_special_token_ids_match_writer(tmp_path: Path, tokenizer: Tokenizer) -> None:
    write_byte_level_tokenizer(tmp_path, VOCAB_SIZE)
    reference = Tokenizer.from_pretrained(tmp_path)
    specials = [*CONTROL_TOKENS, *MARKUP_TOKENS]
    assert [tokenizer.token_to_id(token) for token in specials] == list(range(len(specials)))
    assert [tokenizer.token_to_id(t) for t in specials] == [reference.token_to_id(t) for t in specials]
    assert tokenizer.bos_token_id == reference.bos_token_id
    assert tokenizer.eos_token_ids == reference.eos_token_ids


def test_specials_marked_like_writer(tmp_path: Path, tokenizer: Tokenizer) -> None:
    write_byte_level_tokenizer(tmp_path, VOCAB_SIZE)
    reference = Tokenizer.from_pretrained(tmp_path)
    text = "".join([*CONTROL_TOKENS, *MARKUP_TOKENS])
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "".join(MARKUP_TOKENS)
    assert tokenizer.encode("x", add_special_tokens=True)[0] == tokenizer.bos_token_id


def test_vocab_size_is_reached(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == VOCAB_SIZE


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    return x + 1\n",
        "s = 'größe — 大小 🚀'\nprint(s)  # naïve\n",
        "\t\r\n  \x00 trailing  ",
        "",
    ],
)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("piece", ["def", " return", " hidden", "self"])
def test_common_code_becomes_one_token(tokenizer: Tokenizer, piece: str) -> None:
    assert len(tokenizer.encode(piece)) == 1


def test_training_compresses_code(tmp_path: Path, tokenizer: Tokenizer, corpus: list[Path]) -> None:
    write_byte_level_tokenizer(tmp_path, VOCAB_SIZE)
    reference = Tokenizer.from_pretrained(tmp_path)
    text = corpus[0].read_text(encoding="utf-8")
    assert len(tokenizer.encode(text)) < len(reference.encode(text)) / 2


def test_training_is_deterministic(tmp_path: Path, corpus: list[Path], model_dir: Path) -> None:
    train_tokenizer(corpus, tmp_path, VOCAB_SIZE)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (model_dir / name).read_bytes()


def test_rejects_small_vocab_and_empty_corpus(tmp_path: Path, corpus: list[Path]) -> None:
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(corpus, tmp_path, len(CONTROL_TOKENS) + len(MARKUP_TOKENS) + 255)
    with pytest.raises(ValueError, match="no training files"):
        train_tokenizer([], tmp_path, VOCAB_SIZE)


def test_transformers_renders_chat_template_identically(tokenizer: Tokenizer, model_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Write a function that adds two numbers — schnell!"},
        {
            "role": "assistant",
            "reasoning_content": "Simple addition.",
            "content": "def add(a, b):\n    return a + b",
        },
        {"role": "user", "content": "Now multiply."},
    ]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer.apply_chat_template(messages)
    assert prompt == expected
    assert prompt.startswith(CONTROL_TOKENS[0])
    ids = tokenizer.encode(prompt)
    assert ids == hf_tokenizer.encode(prompt, add_special_tokens=False)
    assert hf_tokenizer.decode(ids) == prompt


def test_corpus_files_order_and_suffix_filter(tmp_path: Path) -> None:
    for relative in ("b/z.py", "b/a.py", "a.py", "a/deep/er/m.py", "notes.txt", "c/data.pyi"):
        path = tmp_path / "src" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n", encoding="utf-8")
    (tmp_path / "src" / ".venv").mkdir()
    (tmp_path / "src" / ".venv" / "lib.py").write_text("y = 2\n", encoding="utf-8")
    (tmp_path / "src" / "binary.py").write_bytes(b"\xff\xfe\x00broken")
    (tmp_path / "src" / "b" / "site-packages").mkdir()
    (tmp_path / "src" / "b" / "site-packages" / "dep.py").write_text("z = 3\n", encoding="utf-8")
    extra = tmp_path / "README.md"
    extra.write_text("# readme\n", encoding="utf-8")
    src = tmp_path / "src"

    found = corpus_files([src, extra, src / "a.py"], exclude=("site-packages",))
    assert found == [
        extra,
        src / "a" / "deep" / "er" / "m.py",
        src / "a.py",
        src / "b" / "a.py",
        src / "b" / "z.py",
    ]
    assert corpus_files([src], suffixes=(".txt", ".pyi")) == [src / "c" / "data.pyi", src / "notes.txt"]
    assert src / "b" / "site-packages" / "dep.py" in corpus_files([src])  # only skipped when excluded


def test_corpus_files_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        corpus_files([tmp_path / "missing"])


def test_cli_trains_a_tokenizer(tmp_path, capsys):
    from stepflash.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def add(a, b):\n    return a + b\n" * 50)
    assert main(["train-tokenizer", "--corpus", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    assert "trained on 1 files" in capsys.readouterr().out
    assert Tokenizer.from_pretrained(tmp_path / "tok").decode(Tokenizer.from_pretrained(tmp_path / "tok").encode("x")) == "x"
    assert main(["train-tokenizer", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "t2")]) == 2
