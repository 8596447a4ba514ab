"""An exported version: a folder that its users load without ahl, with a model card.

peft's own methods export as a plain PEFT folder for `PeftModel.from_pretrained` on the model a
user loads: AutoModel for a classify task, AutoModelForCausalLM for a generate task. ahl trains
generate adapters on the causal LM's backbone, so their weight names gain the backbone's prefix
and their config the CAUSAL_LM task type (peft's `generate` then handles soft prompts too).

Bottleneck adapters have no peft type outside ahl, and the AdapterHub `adapters` library, which
has them, pins transformers 4 (it does not import beside ours): they export as plain safetensors,
a down and an up projection per adapted module, which the card's loader of a few lines hooks
onto the base (card.BOTTLENECK_LOADER).
"""

import json
import struct
from pathlib import Path

from adapterhub_local.store import GENERATE_FILE, HEAD_FILE, LABELS_FILE, PEFT_CONFIG, PEFT_WEIGHTS

BOTTLENECK_WEIGHTS = "bottleneck.safetensors"
BOTTLENECK_CONFIG = "bottleneck_config.json"
WRAPPED = "base_model.model."  # where peft's saved weight names start from the wrapped model
# Every file an export may write; other files in the folder are the user's and stay
EXPORT_FILES = {PEFT_CONFIG, PEFT_WEIGHTS, HEAD_FILE, LABELS_FILE, GENERATE_FILE, BOTTLENECK_CONFIG,
                BOTTLENECK_WEIGHTS, "README.md"}


def export_version(store, loader, version, folder: Path) -> list[str]:
    """Write `version` into `folder` (the version's files checked against their checksums, then
    made loadable outside ahl) with its model card; the names of the folder's files."""
    from adapterhub_local.card import model_card, public_id
    from adapterhub_local.lineage import version_lineage
    from adapterhub_local.sequence import read_step
    from adapterhub_local.store import GENERATE_FILE, STEP_TAG

    info = version_lineage(store, version)
    files = set(loader.copy_version(version, folder))
    backbone = ""
    if info["kind"] == "generate":  # versions made before it was recorded are all Llama's
        settings = json.loads((folder / GENERATE_FILE).read_text(encoding="utf-8"))
        backbone = settings.get("backbone") or "model"
    if info["method"] == "bottleneck":
        files = plain_bottleneck(folder, files)
    else:
        peft_for_users(folder, public_id(info["base"]["name"]), backbone)
    (folder / "README.md").write_text(
        model_card(info, read_step(store, int(version.tags.get(STEP_TAG, 0)))), encoding="utf-8")
    files |= {"README.md"}
    for stale in EXPORT_FILES - files:  # an earlier export's, overwritten with --force: a LoRA
        (folder / stale).unlink(missing_ok=True)  # folder must not keep a bottleneck's config
    return sorted(files)


def peft_for_users(folder: Path, hub_id: str | None, backbone: str) -> None:
    """Name the base by its public id where it has one (not the exporting machine's path); for
    a generate adapter, name its weights from the causal LM that holds the backbone."""
    config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    if hub_id:
        config["base_model_name_or_path"] = hub_id
    if backbone:
        config["task_type"] = "CAUSAL_LM"
        move_backbone(folder, config, backbone, outward=True)
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")


def move_backbone(folder: Path, config: dict, backbone: str, outward: bool) -> None:
    """Rename a PEFT folder's weights, and AdaLoRA's rank pattern in `config`, from names inside
    the backbone (ahl's layout) to names inside the model that holds it as `backbone`
    (outward: a causal LM or a task model, as users load it), or back. Soft prompts belong to
    no module and keep their names."""
    inner, outer = WRAPPED, f"{WRAPPED}{backbone}."
    old, new = (inner, outer) if outward else (outer, inner)
    rename_tensors(folder / PEFT_WEIGHTS, lambda k: new + k[len(old):] if k.startswith(old) else k)
    if config.get("rank_pattern"):  # by name inside the wrapped model
        old, new = ("", f"{backbone}.") if outward else (f"{backbone}.", "")
        config["rank_pattern"] = {new + k[len(old):] if k.startswith(old) else k: v
                                  for k, v in config["rank_pattern"].items()}


def plain_bottleneck(folder: Path, files: set[str]) -> set[str]:
    """Replace the PEFT files of a bottleneck adapter by bottleneck_config.json (width,
    non-linearity, the adapted modules by their names in the backbone) and bottleneck.safetensors
    (MODULE.down.weight, MODULE.down.bias, MODULE.up.weight, MODULE.up.bias)."""
    config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))

    def plain(name: str) -> str:
        module, projection, kind = name.removeprefix(WRAPPED).rsplit(".", 2)
        return f"{module}.{projection.removeprefix('bottleneck_')}.{kind}"

    (folder / PEFT_WEIGHTS).rename(folder / BOTTLENECK_WEIGHTS)
    names = rename_tensors(folder / BOTTLENECK_WEIGHTS, plain)
    modules = sorted({name.rsplit(".", 2)[0] for name in names})
    (folder / BOTTLENECK_CONFIG).write_text(json.dumps(
        {"r": config["r"], "non_linearity": config["non_linearity"], "modules": modules,
         "adapter": "h + up(non_linearity(down(h))), h = the module's output"}, indent=2),
        encoding="utf-8")
    (folder / PEFT_CONFIG).unlink()
    return files - {PEFT_CONFIG, PEFT_WEIGHTS} | {BOTTLENECK_CONFIG, BOTTLENECK_WEIGHTS}


def rename_tensors(path: Path, rename) -> list[str]:
    """Rename the tensors of a safetensors file in place: a new header (8-byte length, JSON,
    padded to 8 bytes), the data bytes as they were (offsets count from the data, so they hold;
    no tensor library needed, every dtype kept). The new names."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8: 8 + size])
    header = {k if k == "__metadata__" else rename(k): v for k, v in header.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])
    return [k for k in header if k != "__metadata__"]
