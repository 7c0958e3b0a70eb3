"""Where the default model lives: the bundled one (see tiny/README.md)."""

from pathlib import Path

BUNDLED_MODEL = Path(__file__).parent / "tiny"


def default_model_dir() -> Path:
    """The bundled model shipped inside the package."""
    if not (BUNDLED_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the bundled model is missing from {BUNDLED_MODEL}; reinstall stepflash "
                                "or pass --model DIR")
    return BUNDLED_MODEL
