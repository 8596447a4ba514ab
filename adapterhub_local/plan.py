"""An add-task's plan: every input validated before anything is written, and what its version
will record of where it came from."""

import difflib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from adapterhub_local import __version__
from adapterhub_local.base import fingerprint, load_base, resolve_base
from adapterhub_local.data import (KINDS, TaskData, check_task_name, load_generate_data, load_spec,
                                   load_task_data)
from adapterhub_local.device import resolve_device
from adapterhub_local.errors import AhlError, brief
from adapterhub_local.router import ROUTER_FEATURES
from adapterhub_local.scoring import DEFAULT_METRIC, check_metric
from adapterhub_local.serving import kind_of, metric_of
from adapterhub_local.methods import get_method, method_options
from adapterhub_local.store import LABELS_FILE, TAG
from adapterhub_local.trainer import TrainOptions, auto_epochs


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
    generate: dict | None = None
    """A generate task's decoding settings (template digest, max_new_tokens, metric), kept with
    its adapter; None for classify."""
    origin: dict | None = None
    """An imported adapter's source (importer.AdapterFolder.origin); None for one ahl trained."""


def plan_add_task(store, name, train, test, spec, text_column, label_column, method, method_args,
                  base, train_args, device: str | None = None, kind: str | None = None,
                  prompt_column: str | None = None, completion_column: str | None = None) -> Plan:
    """Validate every input; raises AhlError before anything is written."""
    defaults, license = {}, ""
    if kind is not None and kind not in KINDS:
        raise AhlError(f"unknown task kind {kind!r}: use one of {', '.join(KINDS)}")
    columns = {"--text-column": text_column, "--label-column": label_column,
               "--prompt-column": prompt_column, "--completion-column": completion_column}
    if spec is not None:
        task_spec = load_spec(spec)
        if kind is not None and kind != task_spec.kind:
            raise AhlError(f"task spec {Path(spec).name} describes a {task_spec.kind} task but "
                           f"--kind {kind} was given: drop --kind, or set kind = \"{kind}\" in "
                           "the spec with its prompt and completion columns")
        name, train, test = name or task_spec.name, train or task_spec.train, test or task_spec.test
        text_column = text_column or task_spec.text_column
        label_column = label_column or task_spec.label_column
        prompt_column = prompt_column or task_spec.prompt_column
        completion_column = completion_column or task_spec.completion_column
        kind, defaults, license = task_spec.kind, task_spec.defaults, task_spec.license
        check_spec_options(Path(spec).name, defaults)
    if train is None:
        raise AhlError("no training data: pass --train FILE or --spec FILE")
    check_task_name(name)
    current = store.current_version(name) if store.exists() else None
    kind = kind or (kind_of(current) if current is not None else "classify")  # a new version's
    check_column_options(kind, columns)
    check_same_kind(current, name, kind, defaults.get("metric", DEFAULT_METRIC)
                    if kind == "generate" else "accuracy")
    method = method or defaults.get("method", "lora")
    options = method_options(method, {**defaults.get("method_args", {}), **(method_args or {})})
    known = set(TrainOptions.__dataclass_fields__)
    unknown = sorted(set(train_args) - known)
    if unknown:
        raise AhlError(f"unknown training option {', '.join(unknown)}: use {', '.join(sorted(known))}")
    train_options = TrainOptions(**{**{k: v for k, v in defaults.items() if k in known},
                                    **{k: v for k, v in train_args.items() if v is not None}})
    if kind == "generate":
        metric = check_metric(defaults.get("metric", DEFAULT_METRIC))
        data = load_generate_data(name, train, test, prompt_column or "prompt",
                                  completion_column or "completion", seed=train_options.seed)
        data.metric = metric
    else:
        data = load_task_data(name, train, test, text_column or "text", label_column or "label",
                              seed=train_options.seed)
    data.license = license
    if kind == "classify":
        check_same_labels(store, current, name, data.labels)
    if kind == "classify" and "epochs" not in defaults and train_args.get("epochs") is None:
        train_options = replace(train_options, epochs=auto_epochs(data.strata(), train_options))
    # The command line's base, else the store's, else the spec's (a store keeps its base).
    base_name, base_path = resolve_base(base or (store.base_binding() or (None,))[0]
                                        or defaults.get("base"))
    store.check_base(base_name, fingerprint(base_path))
    device = resolve_device(device)
    loaded = load_base(base_name, device)
    get_method(method).check_base(loaded)
    generate = plan_generation(data, loaded, train_options, defaults) if kind == "generate" else None
    try:
        peft_config = get_method(method).build(options, loaded)  # bad combinations fail here
    except ValueError as e:
        raise AhlError(f"method {method!r}: {brief(e)}") from None
    return Plan(data, method, options, peft_config, train_options, base_name,
                store.router_features(ROUTER_FEATURES), device, generate)


SPEC_OPTIONS = {"method", "method_args", "metric", "base", "max_new_tokens"}  # beside TrainOptions'


def check_spec_options(spec_name: str, options: dict) -> None:
    """A key of a spec that nothing reads is a typo (epoch = 1), not a default to drop."""
    known = SPEC_OPTIONS | set(TrainOptions.__dataclass_fields__)
    for key in sorted(set(options) - known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean {close[0]}?" if close else f"known options: {', '.join(sorted(known))}"
        raise AhlError(f"task spec {spec_name}: unknown key {key!r} ({hint}): fix or remove it")


def check_column_options(kind: str, columns: dict) -> None:
    """A column option (given on the command line) of the other kind is a mistake, not
    something to ignore."""
    reads = (["--prompt-column", "--completion-column"] if kind == "generate"
             else ["--text-column", "--label-column"])
    wrong = [option for option, value in columns.items() if value is not None and option not in reads]
    if wrong:
        raise AhlError(f"{wrong[0]} does not apply to a {kind} task, which reads "
                       f"{' and '.join(reads)}: drop it"
                       + (", or pass --kind generate" if kind == "classify" else ""))


def check_same_kind(current, name: str, kind: str, metric: str) -> None:
    """A task keeps its kind and metric across versions (`current`: its newest, or None): its
    matrix column and the forgetting gate compare its scores step to step."""
    if current is None:
        return
    if (kind_of(current), metric_of(current)) != (kind, metric):
        raise AhlError(f"task {name!r} is a {kind_of(current)} task scored by "
                       f"{metric_of(current)}; this add-task makes a {kind} task scored by "
                       f"{metric}: keep its kind and metric, or add it under a new name")


def check_same_labels(store, current, name: str, labels: list[str]) -> None:
    """A new version of a classify task shares at least one label with the version before it
    (`current`, or None): one that shares none is another task under a taken name, which would
    replace the task's answers everywhere and read as transfer in its matrix column."""
    if current is None:
        return
    before = json.loads(store.local_artifact(f"{current.source}/{LABELS_FILE}")
                        .read_text(encoding="utf-8"))
    if not set(before) & set(labels):
        shown = ", ".join(before[:4]) + (", ..." if len(before) > 4 else "")
        raise AhlError(f"task {name!r} (version {current.version}: {shown}) shares no label with "
                       f"this data's: add it under a new name, or remove the task's version "
                       f"first (ahl store rm {name}@{current.version}) to replace it")


def plan_generation(data: TaskData, base, train: TrainOptions, defaults: dict) -> dict:
    """A generate task's decoding settings, once its rows fit the base: the base has an output
    layer for text, every prompt and completion fits --max-length and the base's context, and
    decoding may run a quarter longer than the longest training completion (or the spec's
    max_new_tokens)."""
    from adapterhub_local.generation import completion_ids, prompt_ids, template_digest

    if not base.generates:
        raise AhlError(f"base {base.name!r} is an encoder ({base.model.config.model_type}) "
                       "without an output layer for text: generate tasks need a causal LM "
                       "base, e.g. --base smollm2")
    context = base.max_positions or train.max_length
    limit = min(train.max_length, context)
    prompts = data.train_texts + data.test_texts
    completions = completion_ids(base, data.train_targets + data.test_targets)
    for prompt, ids, completion in zip(prompts, prompt_ids(base, prompts), completions):
        if len(ids) + len(completion) > limit:
            raise AhlError(f"the prompt {prompt[:40]!r}... and its completion are "
                           f"{len(ids) + len(completion)} tokens, more than {limit} (--max-length "
                           f"{train.max_length}, the base's context {context}): shorten it, or "
                           "raise --max-length up to the context")
    longest = max(len(c) for c in completions[: len(data.train_targets)])
    budget = defaults.get("max_new_tokens", longest + (longest + 3) // 4)
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise AhlError(f"max_new_tokens = {budget!r} in the spec is not a whole number of "
                       "tokens: give e.g. max_new_tokens = 32")
    return {"template": template_digest(base), "max_new_tokens": budget, "metric": data.metric,
            # the causal LM's attribute holding the backbone: an export names weights from it
            "backbone": base.model.base_model_prefix}


def run_params(plan: Plan, base) -> dict:
    """The add-task run's params: what was asked, flat."""
    data = plan.data
    return {"task": data.name, "kind": data.kind, "method": plan.method, **plan.train.as_dict(),
            "base": base.name,
            "device": base.device,
            **{f"method.{k}": v for k, v in vars(plan.options).items()},
            "data.source": data.source, "data.rows": len(data.train_texts),
            "data.test_rows": len(data.test_texts)}


def lineage_tags(plan: Plan, base, parent, files: dict, accuracy: float) -> dict:
    """What a version records of where it came from (DESIGN section 5, `store show`); the
    tasks that served before it (`after`) grow with the store and go to an artifact instead."""
    data = plan.data
    return {
        f"{TAG}task": data.name, f"{TAG}kind": data.kind, f"{TAG}metric": data.metric,
        f"{TAG}method": plan.method,
        **({f"{TAG}template": plan.generate["template"],
            f"{TAG}max_new_tokens": plan.generate["max_new_tokens"]} if plan.generate else {}),
        f"{TAG}method.config": json.dumps(vars(plan.options)),
        f"{TAG}train": json.dumps(plan.train.as_dict()),
        f"{TAG}base.name": base.name, f"{TAG}base.sha256": base.sha256,
        f"{TAG}data.digest": data.digest, f"{TAG}data.rows": len(data.train_texts),
        f"{TAG}data.test_rows": len(data.test_texts), f"{TAG}data.source": data.source,
        **({f"{TAG}data.license": data.license} if data.license else {}),
        f"{TAG}data.split": json.dumps(data.split), f"{TAG}data.dropped": data.dropped,
        f"{TAG}data.test_seen": data.test_seen,
        f"{TAG}parent": parent.version if parent else "",
        f"{TAG}labels": json.dumps(data.labels), f"{TAG}files": json.dumps(files),
        f"{TAG}accuracy": f"{accuracy:.6f}", f"{TAG}package_version": __version__,
        **({f"{TAG}origin": json.dumps(plan.origin)} if plan.origin else {}),
    }
