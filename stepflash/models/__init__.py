"""Where the default model lives: the bundled one when shipped, else a random stand-in."""

import os
from pathlib import Path

BUNDLED_MODEL = Path(__file__).parent / "tiny"


def default_model_dir() -> Path:
    """The bundled model when present; otherwise a small random checkpoint written once to a cache dir
    (`$STEPFLASH_CACHE`, default ~/.cache/stepflash)."""
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL
    cache = Path(os.environ.get("STEPFLASH_CACHE", Path.home() / ".cache" / "stepflash")) / "random-tiny"
    if not (cache / "config.json").is_file():
        from stepflash.testing import tiny_config, write_checkpoint

        write_checkpoint(cache, tiny_config())
    return cache
