"""The model card of an exported adapter: what it is, from the store's record of it.

An export's README.md, in the Hugging Face model-card format (YAML front matter a hub reads,
then prose): the task and its labels or metric, the method and its config, the base by its
public id and fingerprint, the training data by name and digest (never a local path), the test
score, the forgetting record of the step that added it, its lineage, and how to load it with
its head outside ahl.
"""

import json
from pathlib import Path

PIPELINES = {"classify": "text-classification", "generate": "text-generation"}
# The packaged bases' ids on the Hugging Face hub (base.PACKAGED_BASES), which a card names.
PUBLIC_IDS = {"all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
              "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def public_id(name: str) -> str | None:
    """A base's id on the Hugging Face hub: known for the packaged bases, the name itself for
    a hub id (owner/model, not a local folder); None otherwise."""
    if name in PUBLIC_IDS:
        return PUBLIC_IDS[name]
    looks_like_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    return name if looks_like_id and not Path(name).exists() else None


def model_card(info: dict, step: dict | None) -> str:
    """README.md for a version (`info`: Hub.show's dict) added at `step` (its sequence record)."""
    base = info["base"]
    hub_id = public_id(base["name"])
    kind, metric = info.get("kind", "classify"), info.get("metric", "accuracy")
    front = {"library_name": "peft", "pipeline_tag": PIPELINES[kind],
             "tags": ["adapterhub-local", info["method"], kind]
             + ([f"base_model:adapter:{hub_id}"] if hub_id else [])}
    if hub_id:
        front["base_model"] = hub_id
    score = info["metrics"].get(f"test_{metric}")
    lines = ["---", *yaml_lines(front), "---", "",
             f"# {info['task']}, version {info['version']}: a {info['method']} adapter",
             "", what_it_does(info, kind, metric), "",
             "## Adapter", "",
             f"- method: `{info['method']}`, config: `{json.dumps(info['method_config'])}`",
             f"- base: {hub_id or Path(base['name']).name + ' (a local model folder)'} (sha256 "
             f"of its weights `{base['sha256']}`; ahl "
             "refuses to load the adapter on any other)",
             f"- training: `{json.dumps(info['train'])}`",
             "", "## Training data", "",
             f"- source: {source_names(info['data']['source'])}; digest (sha256 of the rows) "
             f"`{info['data']['digest']}`",
             f"- {info['data']['rows']} training rows, {info['data']['test_rows']} test rows "
             f"(split: `{json.dumps(split_of(info['data']['split']))}`)",
             "- licence: that of the data's source (ahl does not record it)",
             "", "## Evaluation", "",
             f"- test {metric.replace('_', ' ')}: "
             + (f"{100 * score:.1f}%" if score is not None else "not recorded"),
             *forgetting_lines(step), "",
             "## Lineage", "",
             f"- parent version: {info['parent'] or 'none (the first)'}",
             "- tasks in the store before it: "
             + (", ".join(f"{a['task']}@{a['version']}" for a in info["after"]) or "none"),
             f"- made by adapterhub-local {info.get('package_version') or '?'} (run "
             f"`{info['run_id']}`)",
             "", "## Loading it without ahl", "",
             *loading_lines(info, kind, hub_id or f"PATH/TO/{Path(base['name']).name}")]
    return "\n".join(lines) + "\n"


def what_it_does(info: dict, kind: str, metric: str) -> str:
    if kind == "generate":
        budget = (info.get("generate") or {}).get("max_new_tokens")
        return (f"Writes a completion for a prompt (task `{info['task']}`), scored by "
                f"{metric.replace('_', ' ')}; greedy decoding, up to {budget} new tokens, the "
                "prompt wrapped in the base's chat template.")
    return (f"Classifies a text for task `{info['task']}` into one of: "
            f"{', '.join(info['labels'])}. A linear head over the mean of the last hidden states "
            "answers (`head.safetensors`, label order in `labels.json`).")


def source_names(source: str | None) -> str:
    """The data files' names, without the folders of the machine that trained it."""
    return " + ".join(Path(part.strip()).name for part in (source or "").split(" + ")) or "?"


def split_of(split: dict) -> dict:
    """The split as recorded, a test file by its name."""
    return {k: Path(v).name if k == "test_file" else v for k, v in split.items()}


def forgetting_lines(step: dict | None) -> list[str]:
    if not step:
        return []
    lines = [f"- at step {step['step']} of the store's sequence (when this version was added), "
             "each task's score:", "", "| task | oracle | routed |", "|---|---:|---:|"]
    for task, oracle, routed in zip(step["tasks"], step["rows"]["oracle"], step["rows"]["routed"]):
        lines.append(f"| {task} | {percent(oracle)} | {percent(routed)} |")
    summary = step.get("summaries", {}).get("routed", {})
    lines += ["", f"- routed, across the tasks: average {percent(summary.get('average_accuracy'))}, "
              f"backward transfer {signed(summary.get('bwt'))}, forgetting "
              f"{signed(summary.get('forgetting'))} (points)"]
    return lines


def loading_lines(info: dict, kind: str, base: str) -> list[str]:
    if kind == "generate":
        return ["```python", "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
                f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), '
                '"THIS_FOLDER")',
                'messages = [{"role": "user", "content": "YOUR PROMPT"}]',
                "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
                'return_tensors="pt")',
                "out = model.generate(ids, max_new_tokens=32, do_sample=False)",
                "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))", "```"]
    return ["```python", "import json, torch", "from peft import PeftModel",
            "from safetensors.torch import load_file",
            "from transformers import AutoModel, AutoTokenizer", "",
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(AutoModel.from_pretrained("{base}"), "THIS_FOLDER")',
            'head = load_file("THIS_FOLDER/head.safetensors")',
            'labels = json.load(open("THIS_FOLDER/labels.json"))', "",
            'batch = tokenizer(["YOUR TEXT"], return_tensors="pt", padding=True)',
            "hidden = model(**batch).last_hidden_state",
            'mask = batch["attention_mask"].unsqueeze(-1)',
            "pooled = (hidden * mask).sum(1) / mask.sum(1)",
            'logits = pooled @ head["weight"].T + head["bias"]',
            "print(labels[int(logits.argmax())])", "```"]


def yaml_lines(values: dict) -> list[str]:
    """Flat YAML: JSON strings are YAML scalars, lists one item a line."""
    lines = []
    for key, value in values.items():
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return lines


def percent(value) -> str:
    """A share as a percentage with one decimal; "-" for none (or NaN)."""
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def signed(value) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"
