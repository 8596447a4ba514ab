"""An add-task's plan: every input validated before anything is written, and what its version
will record of where it came from."""

import json
from dataclasses import dataclass

from adapterhub_local import __version__
from adapterhub_local.base import fingerprint, load_base, resolve_base
from adapterhub_local.data import TaskData, check_task_name, load_spec, load_task_data
from adapterhub_local.device import resolve_device
from adapterhub_local.errors import AhlError
from adapterhub_local.router import ROUTER_FEATURES
from adapterhub_local.methods import get_method, method_options
from adapterhub_local.store import TAG
from adapterhub_local.trainer import TrainOptions


@dataclass
class Plan:
    """A validated add-task: everything checked before the store is touched."""

    data: TaskData
    method: str
    options: object
    peft_config: object
    """What the method's builder made of the options for this base."""
    train: TrainOptions
    base: str
    features: str
    """What the store's router reads (router.FEATURES): this task's statistics must match."""
    device: str = "cpu"
    """Where it trains (device.resolve_device)."""


def plan_add_task(store, name, train, test, spec, text_column, label_column, method, method_args,
                  base, train_args, device: str | None = None) -> Plan:
    """Validate every input; raises AhlError before anything is written."""
    defaults = {}
    if spec is not None:
        task_spec = load_spec(spec)
        name, train, test = name or task_spec.name, train or task_spec.train, test or task_spec.test
        text_column = text_column or task_spec.text_column
        label_column = label_column or task_spec.label_column
        defaults = task_spec.defaults
    if train is None:
        raise AhlError("no training data: pass --train FILE or --spec FILE")
    check_task_name(name)
    method = method or defaults.get("method", "lora")
    options = method_options(method, {**defaults.get("method_args", {}), **(method_args or {})})
    known = set(TrainOptions.__dataclass_fields__)
    unknown = sorted(set(train_args) - known)
    if unknown:
        raise AhlError(f"unknown training option {', '.join(unknown)}: use {', '.join(sorted(known))}")
    train_options = TrainOptions(**{**{k: v for k, v in defaults.items() if k in known},
                                    **{k: v for k, v in train_args.items() if v is not None}})
    data = load_task_data(name, train, test, text_column or "text", label_column or "label",
                          seed=train_options.seed)
    base_name, base_path = resolve_base(base or (store.base_binding() or (None,))[0])
    store.check_base(base_name, fingerprint(base_path))
    device = resolve_device(device)
    loaded = load_base(base_name, device)
    get_method(method).check_base(loaded)
    peft_config = get_method(method).build(options, loaded)  # bad combinations fail here
    return Plan(data, method, options, peft_config, train_options, base_name,
                store.router_features(ROUTER_FEATURES), device)


def run_params(plan: Plan, base) -> dict:
    """The add-task run's params: what was asked, flat."""
    data = plan.data
    return {"task": data.name, "method": plan.method, **plan.train.as_dict(), "base": base.name,
            "device": base.device,
            **{f"method.{k}": v for k, v in vars(plan.options).items()},
            "data.source": data.source, "data.rows": len(data.train_texts),
            "data.test_rows": len(data.test_texts)}


def lineage_tags(plan: Plan, base, parent, files: dict, accuracy: float) -> dict:
    """What a version records of where it came from (DESIGN section 5, `store show`); the
    tasks that served before it (`after`) grow with the store and go to an artifact instead."""
    data = plan.data
    return {
        f"{TAG}task": data.name, f"{TAG}method": plan.method,
        f"{TAG}method.config": json.dumps(vars(plan.options)),
        f"{TAG}train": json.dumps(plan.train.as_dict()),
        f"{TAG}base.name": base.name, f"{TAG}base.sha256": base.sha256,
        f"{TAG}data.digest": data.digest, f"{TAG}data.rows": len(data.train_texts),
        f"{TAG}data.test_rows": len(data.test_texts), f"{TAG}data.source": data.source,
        f"{TAG}data.split": json.dumps(data.split), f"{TAG}data.dropped": data.dropped,
        f"{TAG}parent": parent.version if parent else "",
        f"{TAG}labels": json.dumps(data.labels), f"{TAG}files": json.dumps(files),
        f"{TAG}accuracy": f"{accuracy:.6f}", f"{TAG}package_version": __version__,
    }
