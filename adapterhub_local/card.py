"""The model card of an exported adapter: what it is, from the store's record of it.

An export's README.md, in the Hugging Face model-card format (YAML front matter a hub reads,
then prose): the task and its labels or metric, the method and its config, the base by its
public id and fingerprint, the training data by name and digest (never a local path), the test
score, the forgetting record of the step that added it, its lineage, and how to load it with
its head outside ahl.
"""

import json
from pathlib import Path

GGUF_BASES = ("smollm2-135m",)  # packaged as a quantized GGUF file, named by its full hub id
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
             f"- training: `{json.dumps(info['train'])}`" if not info.get("origin") else
             f"- training: elsewhere; imported from `{info['origin']['folder']}` (peft type "
             f"{info['origin']['peft_type']}, weights sha256 "
             f"`{info['origin']['weights_sha256']}`)",
             "", "## Training data", "",
             f"- source: {source_names(info['data']['source'])}; digest (sha256 of the rows) "
             f"`{info['data']['digest']}`",
             f"- {info['data']['rows']} training rows, {info['data']['test_rows']} test rows "
             f"(split: `{json.dumps(split_of(info['data']['split']))}`)",
             f"- licence: {info['data']['license']}" if info["data"].get("license") else
             "- licence: not recorded (a task spec's `license = \"...\"` records it)",
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
             "Set `base` to the base model's id or folder and `texts` to yours; run it in this "
             "folder.", "", *loading_lines(info, kind, hub_id or f"PATH/TO/{Path(base['name']).name}")]
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


# Loads a bottleneck export onto `model` (card.loading_lines): each adapted module's output h
# becomes h + up(act(down(h))), as in ahl (bottleneck.py).
BOTTLENECK_LOADER = [
    'config = json.load(open(f"{folder}/bottleneck_config.json"))',
    'weights = load_file(f"{folder}/bottleneck.safetensors")',
    'act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}'
    '[config["non_linearity"]]', "",
    "def bottleneck(name):",
    '    down, up = [(weights[f"{name}.{p}.weight"], weights[f"{name}.{p}.bias"]) '
    'for p in ("down", "up")]',
    "    return lambda module, args, h: h + F.linear(act(F.linear(h, *down)), *up)", "",
    'for name in config["modules"]:  # named inside the backbone (model.base_model)',
    "    model.base_model.get_submodule(name).register_forward_hook(bottleneck(name))"]
NF4_BASE = ['nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",',
            "                         bnb_4bit_use_double_quant=True, "
            "bnb_4bit_compute_dtype=torch.float32)"]
CLASSIFY_USE = [
    'labels = json.load(open(f"{folder}/labels.json"))',
    'head = load_file(f"{folder}/head.safetensors")',
    'tokenizer.padding_side = "right"',
    "tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token",
    'batch = tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding=True, '
    'return_tensors="pt")',
    "with torch.no_grad():",
    "    hidden = model(**batch).last_hidden_state",
    'mask = batch["attention_mask"].unsqueeze(-1)',
    "hidden = hidden[:, -mask.shape[1]:]  # without prompt tuning's virtual tokens",
    "pooled = (hidden * mask).sum(1) / mask.sum(1)",
    'probs = (pooled @ head["weight"].T + head["bias"]).softmax(-1)',
    "print([labels[i] for i in probs.argmax(-1)])"]
# Greedy decoding as ahl's, token by token without a cache: peft's `generate` starts prefix
# tuning's positions where its training did not.
GENERATE_USE = [
    'settings = json.load(open(f"{folder}/generate.json"))',
    "completions = []",
    "for text in texts:",
    "    if tokenizer.chat_template:  # the prompt as the adapter was trained on it",
    '        text = tokenizer.apply_chat_template([{"role": "user", "content": text}],',
    "                                             tokenize=False, add_generation_prompt=True)",
    "    start = [] if tokenizer.chat_template or tokenizer.bos_token_id is None "
    "else [tokenizer.bos_token_id]",
    '    ids, new = start + tokenizer(text, add_special_tokens=False)["input_ids"], []',
    '    for _ in range(settings["max_new_tokens"]):',
    "        x = torch.tensor([ids + new])",
    "        with torch.no_grad():",
    "            token = int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax())",
    "        if token == tokenizer.eos_token_id:",
    "            break",
    "        new.append(token)",
    "    completions.append(tokenizer.decode(new, skip_special_tokens=True).strip())",
    "print(completions)"]


def loading_lines(info: dict, kind: str, base: str) -> list[str]:
    """Python that loads the export without ahl and answers as ahl does: the base (4-bit NF4 for
    QLoRA and LoftQ, as ahl quantizes it), the adapter (peft, or the bottleneck loader), then
    the head or greedy decoding."""
    from adapterhub_local.methods import get_method

    auto = "AutoModelForCausalLM" if kind == "generate" else "AutoModel"
    quantized = get_method(info["method"]).quantized
    peft = info["method"] != "bottleneck"
    imports = ["import json", "", "import torch",
               "from peft import PeftModel" if peft else "import torch.nn.functional as F",
               "from safetensors.torch import load_file",
               f"from transformers import {auto}, AutoTokenizer"
               + (", BitsAndBytesConfig" if quantized else ""), ""]
    gguf = info["base"]["name"] in GGUF_BASES
    setup = [f'base = "{base}"' + ("  # ahl ran its GGUF file (Q4_1, dequantized): "
                                   "from_pretrained(folder, gguf_file=...) for its exact weights"
                                   if gguf else ""),
             'folder = "."  # this folder',
             'texts = ["YOUR TEXT"]' if kind == "classify" else 'texts = ["YOUR PROMPT"]',
             "tokenizer = AutoTokenizer.from_pretrained(base)"]
    if quantized:
        setup += NF4_BASE + [f"model = {auto}.from_pretrained(base, quantization_config=nf4).eval()",
                             "for module in model.modules():  # ahl's CPU layout of 4-bit weights",
                             '    if hasattr(module, "support_avx512bf16_for_cpu"):',
                             "        module.support_avx512bf16_for_cpu = False"]
    else:
        setup += [f"model = {auto}.from_pretrained(base).eval()"]
    adapter = (["model = PeftModel.from_pretrained(model, folder).eval()"] if peft
               else BOTTLENECK_LOADER)
    use = GENERATE_USE if kind == "generate" else [
        line.replace("MAX_LENGTH", str(info["train"].get("max_length", 128))) for line in CLASSIFY_USE]
    return ["```python", *imports, *setup, *adapter, "", *use, "```"]


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
