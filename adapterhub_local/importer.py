"""`ahl store import`: a PEFT adapter made elsewhere becomes the next version of a task.

The folder is what `save_pretrained` writes (adapter_config.json, adapter_model.safetensors),
with, for a classify task, the head ahl reads (head.safetensors and labels.json, as an export
has them) or none: then a linear head is fitted on the frozen adapter from the task's rows.
Everything is checked before the store is touched: the folder, the peft type, safetensors only
(a pickled adapter_model.bin is refused, never opened), the base it names, the head against its
labels, and the weights against the base (loaded under a staging name, each weight matched).
From there an import is an add-task without training (hub.py): measured on the test split, the
router fitted from the rows, a step in the matrices, the forgetting gate.
"""

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from adapterhub_local.errors import AhlError, brief
from adapterhub_local.export import move_backbone
from adapterhub_local.methods import get_method
from adapterhub_local.store import (GENERATE_FILE, HEAD_FILE, LABELS_FILE, PEFT_CONFIG, PEFT_WEIGHTS,
                                    sha256_file)

# The peft types ahl runs, as methods (a LORA folder may be QLoRA's or LoftQ's: --method says).
PEFT_TYPES = {"PROMPT_TUNING": "prompt-tuning", "PREFIX_TUNING": "prefix-tuning",
              "ADAPTION_PROMPT": "adaption-prompt", "LORA": "lora", "ADALORA": "adalora",
              "LOHA": "loha", "LOKR": "lokr", "IA3": "ia3", "BOTTLENECK": "bottleneck"}
LORA_METHODS = ("lora", "qlora", "loftq")


@dataclass
class AdapterFolder:
    """An import folder, checked: its PEFT config, the method it runs as, where it came from."""

    folder: Path
    config: dict
    method: str
    origin: dict
    """What the version records of its source: folder name, files' digest, peft type, base."""


def read_adapter_folder(folder: str | Path, method: str | None = None) -> AdapterFolder:
    folder = Path(folder)
    if not folder.exists():
        raise AhlError(f"{folder} does not exist: check the path of the PEFT adapter folder")
    if not folder.is_dir():
        raise AhlError(f"{folder} is not a folder: import a PEFT adapter folder (what "
                       "save_pretrained writes)")
    if not (folder / PEFT_CONFIG).is_file():
        raise AhlError(f"no {PEFT_CONFIG} in {folder}: import a PEFT adapter folder "
                       f"({PEFT_CONFIG} and {PEFT_WEIGHTS}, as save_pretrained writes them)")
    if not (folder / PEFT_WEIGHTS).is_file():
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        if pickled:
            raise AhlError(f"{folder} holds its weights as {pickled[0]} (pickle), which ahl never "
                           "loads: save the adapter with save_pretrained(..., "
                           "safe_serialization=True) and import that")
        raise AhlError(f"no {PEFT_WEIGHTS} in {folder}: save the adapter with save_pretrained")
    config = read_json(folder / PEFT_CONFIG, dict, "the adapter's config")
    tensor_shapes(folder / PEFT_WEIGHTS)  # a readable safetensors file, or one line
    peft_type = str(config.get("peft_type"))
    if peft_type not in PEFT_TYPES:
        raise AhlError(f"{folder}'s adapter is of peft type {peft_type!r}, which ahl does not run: "
                       f"import one of {', '.join(PEFT_TYPES)}")
    kind = PEFT_TYPES[peft_type]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.split("_")[0] in ("pissa", "olora", "corda"):
        raise AhlError(f"{folder}'s LoRA was initialised with {init}, which changes the base's "
                       "weights: save it converted to a plain LoRA (save_pretrained(..., "
                       "path_initial_model_for_weight_conversion=...)) and import that")
    if method is not None and (method != kind and not (kind == "lora" and method in LORA_METHODS)):
        raise AhlError(f"{folder}'s adapter is {peft_type}, not a {method} adapter: drop --method"
                       + (" or pick lora, qlora or loftq" if kind == "lora" else ""))
    digest = sha256_file(folder / PEFT_WEIGHTS)
    origin = {"folder": folder.resolve().name, "peft_type": peft_type, "weights_sha256": digest,
              "base_model_name_or_path": config.get("base_model_name_or_path")}
    return AdapterFolder(folder, config, method or kind, origin)


def read_json(path: Path, kind: type, what: str):
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AhlError(f"{path} is not JSON ({str(e)[:80]}): write {what} again") from None
    if not isinstance(value, kind):
        raise AhlError(f"{path} holds a {type(value).__name__}, not a JSON "
                       f"{'object' if kind is dict else 'list'}: write {what} again")
    return value


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape, read from the safetensors header (nothing loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same mistake
        raise AhlError(f"{path} is not a readable safetensors file ({str(e)[:80]}): save it "
                       "again with safetensors") from None


def check_named_base(source: AdapterFolder, base) -> None:
    """The base the adapter's config names must be the store's (by name, public id or weights):
    an adapter for another base is refused here, in one line."""
    from adapterhub_local.base import fingerprint, resolve_base
    from adapterhub_local.card import public_id

    named = source.config.get("base_model_name_or_path")
    if not named or named in (base.name, str(base.path), public_id(base.name)):
        return
    try:
        same = fingerprint(resolve_base(named)[1]) == base.sha256
    except AhlError:
        same = False
    if not same:
        raise AhlError(f"{source.folder}'s adapter was made for base {named!r}, not this store's "
                       f"base {base.name!r}: import an adapter of {base.name}, or set "
                       f"base_model_name_or_path in its {PEFT_CONFIG} if it was trained on it")


def read_head(source: AdapterFolder, base, labels: list[str]) -> tuple | None:
    """(weights, label order) of the folder's head, checked against the base and the task's
    labels; None when the folder has none (one is fitted)."""
    head, names = source.folder / HEAD_FILE, source.folder / LABELS_FILE
    if not head.is_file() and not names.is_file():
        return None
    if not (head.is_file() and names.is_file()):
        raise AhlError(f"{source.folder} has {HEAD_FILE if head.is_file() else LABELS_FILE} "
                       f"without {LABELS_FILE if head.is_file() else HEAD_FILE}: give both, or "
                       "neither (a head is then fitted from the rows)")
    order = read_json(names, list, "the label order (a list of label names)")
    if not all(isinstance(x, str) for x in order) or len(set(order)) != len(order):
        raise AhlError(f"{names} must list each label name once, as strings: write it as "
                       '["negative", "positive"], in the order of the head\'s rows')
    shapes = tensor_shapes(head)
    want = {"weight": [len(order), base.hidden_size], "bias": [len(order)]}
    if shapes != want:
        raise AhlError(f"{head} holds {shapes} but {len(order)} labels over base "
                       f"{base.name!r} (width {base.hidden_size}) need {want}: give the head "
                       f"of these labels, or leave both files out to fit one")
    if sorted(order) != sorted(labels):
        raise AhlError(f"{LABELS_FILE} names {', '.join(order)} but the rows' labels are "
                       f"{', '.join(labels)}: import rows of the head's labels, or leave the head "
                       "out to fit one")
    return head, order


def in_label_order(data, order: list[str]):
    """The task's rows with label ids in the head's order."""
    from dataclasses import replace

    ids = [order.index(label) for label in data.labels]
    return replace(data, labels=list(order), train_labels=[ids[y] for y in data.train_labels],
                   test_labels=[ids[y] for y in data.test_labels])


def fit_head(bank, name: str, data, options) -> float:
    """Fit the adapter's linear head on its frozen output: multinomial logistic regression
    (scikit-learn, deterministic) over the mean-pooled last states of the fitting rows, as the
    trainer splits them. The held-out rows' accuracy (the fitting rows' without any)."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from adapterhub_local.trainer import split_validation

    fit, held = split_validation(data.strata(), options.seed)
    if len({data.train_labels[i] for i in fit}) < 2:  # a label's only rows held out
        fit, held = list(range(len(data.train_texts))), []
    features = bank.pooled(name, data.train_texts, options.max_length).numpy()
    labels = np.array(data.train_labels)
    model = LogisticRegression(max_iter=2000).fit(features[fit], labels[fit])
    weight = np.zeros((len(data.labels), features.shape[1]), dtype=np.float32)
    bias = np.zeros(len(data.labels), dtype=np.float32)
    if model.coef_.shape[0] == 1:  # two classes: one logit z; softmax([-z/2, z/2]) = sigmoid(z)
        weight[model.classes_] = np.stack([-model.coef_[0], model.coef_[0]]) / 2
        bias[model.classes_] = np.array([-model.intercept_[0], model.intercept_[0]]) / 2
    else:
        weight[model.classes_], bias[model.classes_] = model.coef_, model.intercept_
    head = bank.heads[name]
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
    rows = held or fit
    return float((model.predict(features[rows]) == labels[rows]).mean())


def stage(source: AdapterFolder, target: Path, base, plan, head: tuple | None) -> None:
    """The folder as ahl keeps adapters (inference.AdapterBank.load_adapter): the config with
    ahl's task type for the method and the store's base, weights named from the backbone (a
    script's model may have held it, as BertForSequenceClassification or LlamaForCausalLM
    do), the head and labels (zeros until fitted) or the generate settings."""
    import torch
    from safetensors.torch import save_file

    target.mkdir(parents=True)
    config = dict(source.config, base_model_name_or_path=base.name, inference_mode=True)
    for key in ("init_lora_weights", "init_weights"):  # the saved weights replace any init;
        if key in config:  # an init that reads the base (LoftQ's) must not run again on load
            config[key] = True
    soft = get_method(source.method).family == "soft-prompt"
    config["task_type"] = "FEATURE_EXTRACTION" if soft else None  # as the method's builder
    shutil.copyfile(source.folder / PEFT_WEIGHTS, target / PEFT_WEIGHTS)
    move_backbone(target, config, base.model.base_model_prefix, outward=False)
    (target / PEFT_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    if plan.generate is not None:
        (target / GENERATE_FILE).write_text(json.dumps(plan.generate), encoding="utf-8")
    elif head is not None:
        shutil.copyfile(head[0], target / HEAD_FILE)
        (target / LABELS_FILE).write_text(json.dumps(head[1], ensure_ascii=False), encoding="utf-8")
    else:
        labels = plan.data.labels
        save_file({"weight": torch.zeros(len(labels), base.hidden_size),
                   "bias": torch.zeros(len(labels))}, target / HEAD_FILE)
        (target / LABELS_FILE).write_text(json.dumps(labels, ensure_ascii=False), encoding="utf-8")


def check_weights(bank, folder: Path, method) -> int:
    """The staged adapter loads on a copy of the bare base (a failure leaves the bank as it
    was), every weight in the folder goes into it and it has none the folder lacks (peft only
    warns of either). The number of weights (its parameters)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    shapes = tensor_shapes(folder / PEFT_WEIGHTS)
    method.register_with_peft()
    from adapterhub_local.inference import quiet_peft_wrap

    try:
        with quiet_peft_wrap():
            trial = PeftModel.from_pretrained(bank.bare_copy(), folder, adapter_name="trial")
        # Without the embedding check, which looks the folder's base up on the Hub (a network
        # call and two warnings where there is none): only the adapter's own names matter here
        kept = set(get_peft_model_state_dict(trial, adapter_name="trial", save_embedding_layers=False))
    except Exception as e:  # noqa: BLE001 - shapes, modules, peft's own checks: one answer
        raise AhlError(f"the adapter does not load on base {bank.base.name!r}: "
                       f"{brief(e, 240)}") from None
    extra, missing = sorted(set(shapes) - kept), sorted(kept - set(shapes))
    if extra or missing:
        raise AhlError(f"the adapter's weights do not fit base {bank.base.name!r}: "
                       + (f"{extra[0]} has no place in it" if extra else f"{missing[0]} is missing")
                       + " (an adapter for another base, or of a whole model with its own head?): "
                       "import an adapter of the store's base's backbone")
    return sum(math.prod(shape) for shape in shapes.values())
