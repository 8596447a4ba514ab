"""A GGUF base, read once: its dequantized weights and tokenizer kept as a plain folder.

transformers parses a GGUF file's metadata (the whole vocabulary) three times to load one model,
tokenizer and config, then maps its tensor names: about 25 s for SmolLM2-135M on 2 cores, for
every command of every process. The first load writes what it got as safetensors and JSON,
under $AHL_CACHE (default: $XDG_CACHE_HOME/adapterhub-local, else ~/.cache/adapterhub-local)
and named by the GGUF file's sha256; later loads read that folder in under a second, with the
same weights bit for bit. AHL_CACHE=off keeps nothing. The store still names the GGUF file and
its sha256: the folder is a cache, and deleting it costs one slow load.
"""

import contextlib
import copy
import os
import shutil
import tempfile
from pathlib import Path

ENV = "AHL_CACHE"
COMPLETE = "gguf.json"  # written last: a folder without it was cut short and is not read
NEEDED = (COMPLETE, "config.json", "model.safetensors", "tokenizer.json")


def cache_root() -> Path | None:
    """Where ahl keeps converted bases, or None when AHL_CACHE=off."""
    chosen = os.environ.get(ENV, "")
    if chosen.lower() == "off":
        return None
    if chosen:
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "adapterhub-local"


def converted(sha256: str) -> Path | None:
    """The converted folder of the GGUF file with this sha256, if a complete one is kept."""
    root = cache_root()
    folder = root / "gguf" / sha256 if root else None
    return folder if folder and all((folder / name).is_file() for name in NEEDED) else None


def keep_converted(sha256: str, source: Path, model, tokenizer) -> None:
    """Write the loaded model (a transformers model from a GGUF file, fp32) and its tokenizer
    as a folder that from_pretrained reads, atomically: a half-written folder is never seen,
    and of two processes converting at once the first to finish wins. A cache that cannot be
    written (read-only, full) only means the next load is slow again."""
    import json

    from safetensors.torch import save_model

    root = cache_root()
    if root is None:
        return
    final = root / "gguf" / sha256
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=final.parent))
        try:
            config = copy.deepcopy(model.config)
            # transformers marks a GGUF load as quantized (and refuses to save it); the weights
            # it made are plain fp32, which is what the folder holds.
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            # A GGUF config names no architecture; the folder's must, or it loads as a bare
            # backbone whose weights' names miss the causal LM's prefix.
            config.architectures = [type(model).__name__]
            config.save_pretrained(work)
            model.generation_config.save_pretrained(work)
            save_model(model, str(work / "model.safetensors"))  # tied weights once
            tokenizer.save_pretrained(work)
            (work / COMPLETE).write_text(json.dumps({"source": source.name, "sha256": sha256}),
                                         encoding="utf-8")
            if final.is_dir() and converted(sha256) is None:  # files deleted by hand
                shutil.rmtree(final, ignore_errors=True)
            os.rename(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # left only when another process won
    except OSError:
        pass


@contextlib.contextmanager
def quiet_gguf():
    """transformers draws its GGUF dequantizing bar with plain tqdm, which its own
    disable_progress_bar does not reach; a bar for a local file load is noise on stderr."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = lambda items, **kwargs: items
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
