"""Train a byte-level BPE tokenizer with the Step-3.5 special tokens on a text corpus.

The result has the same layout as `write_byte_level_tokenizer` (tests/checkpoints.py):
the control tokens and markup tokens take ids 0.. in that order, then the 256
byte symbols, then the learned merges. It loads with `Tokenizer.from_pretrained`
and with transformers' AutoTokenizer, and training is deterministic: the same
files in the same order give a byte-identical tokenizer.json.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from stepflash.tokenizer import Tokenizer, write_bpe_tokenizer


def _is_utf8_text(path: Path) -> bool:
    try:
        path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return True


def _walk(directory: Path, suffixes: Sequence[str], exclude: Sequence[str]) -> Iterator[Path]:
    """Files under `directory` with one of `suffixes`, skipping hidden files and folders and
    anything below a folder named in `exclude`."""
    for path in directory.rglob("*"):
        parts = path.relative_to(directory).parts
        skipped = any(part.startswith(".") or part in exclude for part in parts)
        if not skipped and path.suffix in suffixes and path.is_file():
            yield path


def corpus_files(paths: Sequence[Path], suffixes: Sequence[str] = (".py",), exclude: Sequence[str] = ()) -> list[Path]:
    """The training files named by `paths`, without duplicates, in `Path` order.

    A directory contributes every file below it (recursively) whose suffix is in
    `suffixes`, leaving out hidden files and folders (`.git`, `.venv`, ...); a file
    named directly is taken whatever its suffix. Files that cannot be read or are
    not valid UTF-8 are skipped. Folders named in `exclude` (e.g. `site-packages`) are
    skipped inside directories. A path that does not exist raises FileNotFoundError.
    """
    found: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found.update(_walk(path, suffixes, exclude))
        elif path.exists():
            found.add(path)
        else:
            raise FileNotFoundError(f"corpus path not found: {path}")
    return sorted(file for file in found if _is_utf8_text(file))


def _read_texts(files: Sequence[Path]) -> Iterator[str]:
    for file in files:
        yield file.read_text(encoding="utf-8")


def train_tokenizer(files: Sequence[Path], out_dir: Path, vocab_size: int) -> Tokenizer:
    """Train byte-level BPE on `files` and write tokenizer.json + tokenizer_config.json.

    `vocab_size` counts every id (special tokens and byte symbols included); fewer
    ids result when the corpus runs out of merges. The config carries the package
    chat template, `<|begin_of_sentence|>` as bos and `<|end_of_sentence|>` as eos;
    encoding with special tokens prepends bos. Returns the written tokenizer, loaded
    back from `out_dir`.
    """
    if not files:
        raise ValueError("no training files")
    write_bpe_tokenizer(_read_texts(files), out_dir, vocab_size, length=len(files))
    return Tokenizer.from_pretrained(out_dir)
