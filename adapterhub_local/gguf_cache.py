"""A GGUF base, read once: its dequantized weights and tokenizer kept as a plain folder.

transformers parses a GGUF file's metadata (the whole vocabulary) three times to load one model,
tokenizer and config, then maps its tensor names: 18 s for SmolLM2-135M on 2 cores, in every
process. The first load writes what it got (safetensors, JSON, the chat template's text) under
$AHL_CACHE (default: $XDG_CACHE_HOME/adapterhub-local, else ~/.cache/adapterhub-local), named
by the GGUF file's sha256; later processes read that folder (4 s with their imports), to the
same weights bit for bit. AHL_CACHE=off keeps nothing. The store still names the GGUF file and
its sha256: the folder is only a cache, and a damaged or deleted one costs one slow load.
"""

import contextlib
import copy
import json
import os
import shutil
import time
import uuid
from pathlib import Path

ENV = "AHL_CACHE"
COMPLETE = "gguf.json"  # written last, listing the folder's files: without it, not read
STALE_S = 3600  # a temporary folder this old was left by a killed conversion


def cache_root() -> Path | None:
    """Where ahl keeps converted bases, or None when AHL_CACHE=off (or there is no home)."""
    chosen = os.environ.get(ENV, "")
    if chosen.lower() == "off":
        return None
    if chosen:
        return Path(chosen).expanduser()
    try:
        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:
        return None
    return Path(xdg) / "adapterhub-local"


def converted(sha256: str) -> Path | None:
    """The converted folder of the GGUF file with this sha256, if a whole one is kept: its
    completion mark written, and every file it lists there."""
    root = cache_root()
    if root is None:
        return None
    folder = root / "gguf" / sha256
    try:
        files = json.loads((folder / COMPLETE).read_text(encoding="utf-8"))["files"]
        return folder if all((folder / name).is_file() for name in files) else None
    except (OSError, ValueError, KeyError, TypeError):  # absent, unreadable, edited by hand
        return None


def keep_converted(sha256: str, source: Path, model, tokenizer) -> None:
    """Write the loaded model (a transformers model from a GGUF file) and its tokenizer as a
    folder that from_pretrained reads, atomically: a half-written folder is never seen. It
    replaces whatever folder is there (the caller converted because that one would not load;
    a racing writer's holds the same). Best effort: a cache that cannot be written (read-only,
    full) only means the next load is slow again."""
    from safetensors.torch import save_model

    root = cache_root()
    # Only plain weights: a loader that kept the file's packed blocks would cache those.
    if root is None or not all(t.is_floating_point() for t in model.state_dict().values()):
        return
    final = root / "gguf" / sha256
    work = final.parent / f".{sha256[:12]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    replaced = work.with_name(work.name + "-replaced")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for old in final.parent.glob(f".{sha256[:12]}-*"):
            if time.time() - old.stat().st_mtime > STALE_S:
                shutil.rmtree(old, ignore_errors=True)
        work.mkdir()  # with the user's umask: a shared cache stays readable to the others
        config = copy.deepcopy(model.config)
        # transformers marks a GGUF load as quantized (and refuses to save it); the weights it
        # made are plain, which is what the folder holds. A GGUF config names no architecture;
        # the folder's must, or it loads as a bare backbone missing the causal LM's prefix.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.save_pretrained(work)
        model.generation_config.save_pretrained(work)
        save_model(model, str(work / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(work)
        files = sorted(p.name for p in work.iterdir())
        (work / COMPLETE).write_text(json.dumps({"source": source.name, "sha256": sha256,
                                                 "files": files}), encoding="utf-8")
        with contextlib.suppress(FileNotFoundError):
            os.rename(final, replaced)  # moved aside: a reader's open files stay readable
        os.rename(work, final)
    except Exception:  # noqa: BLE001 (safetensors' and transformers' own errors too)
        pass
    finally:
        for leftover in (work, replaced):  # work is left only when it was not renamed
            shutil.rmtree(leftover, ignore_errors=True)


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
