"""Batched inference over one base with many named adapters and their task heads.

The base is wrapped by peft once per process; every task version becomes a named adapter on it,
so switching tasks never reloads the base. Each adapter has a small head (mean pooling + linear)
and a label map, saved beside the PEFT files as safetensors and JSON.
"""

import contextlib
import copy
import hashlib
import itertools
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapterhub_local import lexical, lora_batch, packing
from adapterhub_local.router import FEATURES, ROUTER_FEATURES
from adapterhub_local.store import GENERATE_FILE, HEAD_FILE, LABELS_FILE, PEFT_WEIGHTS


EVAL_BATCH_SIZE = 64


@contextlib.contextmanager
def quiet_peft_wrap():
    """peft 0.21 reads transformers 5's deprecated is_gradient_checkpointing when wrapping, and
    warns that a stored AdaLoRA rank_pattern matches no module (its keys name the pruned lora_E
    entries, which AdaLoRA's own loader applies)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
        # AdaLoRA saves a fully pruned update as zero-sized tensors, and peft takes that for an
        # unsharded DeepSpeed save; it loads back fine.
        warnings.filterwarnings("ignore", message=".*have invalid shape.*")
        # A GGUF base has no config.json beside it; the embeddings are never trained here.
        warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
        yield


@contextlib.contextmanager
def quiet_forward():
    """peft's prefix tuning passes the prefix as `past_key_values`, which transformers 5 still
    accepts under its new name (`cache`) with a warning at every forward; silenced around our
    forward passes only, never process-wide."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`past_key_values` is deprecated",
                                category=FutureWarning)
        yield


def adapter_name(task: str, run_id: str) -> str:
    """The adapter's name in the bank: one per add-task run, so stores sharing a process never
    collide. It has no "_": peft finds an adapter's parameters by substrings such as "lora_" or
    "hada_", and a task named "adalora" would otherwise match them."""
    return f"ahl-{task.replace('_', '-')}-{run_id}"


class AdapterBank:
    """One frozen base, many named adapters and heads, loaded once and switched by name. A
    classify adapter has a head and labels; a generate adapter has neither (the base's output
    layer answers) and its decoding settings instead (`generate`).

    peft wraps a model for one adapter type at a time, and QLoRA and LoftQ need the base in 4
    bits: adapters live in groups, one per (peft type, base precision), each a peft model. The
    first full-precision group whose tuner injects layers (LoRA, by default) wraps the bank's
    base itself, and the router reads the base with that group's adapters disabled; every other
    group gets its own copy of the base, so one method costs no second base in memory.
    """

    def __init__(self, base):
        self.base = base
        self.groups: dict[str, object] = {}  # group key -> peft model
        self.group_of: dict[str, str] = {}  # adapter name -> group key
        self.in_place: str | None = None  # the group that wraps self.base.model itself
        self.heads: dict[str, torch.nn.Linear | None] = {}
        self.labels: dict[str, list[str]] = {}
        self.generate: dict[str, dict] = {}
        """A generate adapter's settings: template (its sha256, or "none"), max_new_tokens,
        metric."""
        self.mixed_batch: dict[str, bool] = {}
        """Whether the adapter's method honours peft's per-row adapter_names."""
        self.settled: set[str] = set()
        """Groups in eval mode throughout (see evaluating)."""

    def __contains__(self, name: str) -> bool:
        return name in self.group_of

    def model(self, name: str):
        """The peft model that holds adapter `name`."""
        return self.groups[self.group_of[name]]

    def evaluating(self, name: str):
        """The peft model that holds adapter `name`, in eval mode. model.eval() walks every
        module, thousands with a hundred adapters loaded (more than answering a text costs), so
        it is skipped for a model set to eval since it last gained modules and not set to train
        since."""
        key = self.group_of[name]
        if self.groups[key].training or key not in self.settled:
            self.groups[key].eval()
            self.settled.add(key)
        return self.groups[key]

    def _group(self, peft_type: str, method) -> tuple[str, object | None]:
        key = f"{peft_type}/{'nf4' if method.quantized else 'fp32'}"
        return key, self.groups.get(key)

    def _base_for(self, key: str, peft_config, method):
        """The model a new group wraps: the bank's base itself for the first full-precision
        group of a tuner that injects (and can unload) layers, else a copy (in 4 bits for
        quantized methods)."""
        from adapterhub_local.quantize import quantize_nf4

        if method.quantized:
            return quantize_nf4(self.bare_copy(), self.base.layers_name)
        injects = not (peft_config.is_prompt_learning or peft_config.is_adaption_prompt)
        if injects and self.in_place is None:
            self.in_place = key
            return self.base.model
        return self.bare_copy()

    def bare_copy(self) -> torch.nn.Module:
        """A copy of the bare base (without the layers the in-place group injected)."""
        if self.in_place is None:
            return copy.deepcopy(self.base.model)
        return copy.deepcopy(self.groups[self.in_place]).unload()

    def bare(self):
        """A context in which self.base.model computes the bare base."""
        if self.in_place is None:
            return contextlib.nullcontext()
        model = self.groups[self.in_place]
        if lora_batch.covers(model):
            return lora_batch.rows(model, lora_batch.BARE)
        return model.disable_adapter()

    def add_adapter(self, name: str, peft_config, labels: list[str], method,
                    generate: dict | None = None) -> None:
        """A new trainable adapter and a freshly initialised head (seed the caller's RNG first),
        or for a generate adapter (`generate`: its settings) no head."""
        from peft import get_peft_model

        method.register_with_peft()
        key, model = self._group(str(peft_config.peft_type), method)
        if model is None:
            with quiet_peft_wrap():
                self.groups[key] = get_peft_model(self._base_for(key, peft_config, method),
                                                  peft_config, adapter_name=name)
        else:
            model.add_adapter(name, peft_config)
        self.group_of[name] = key
        self.settled.discard(key)  # the new adapter's modules may be in training mode
        lora_batch.install(self.groups[key])
        if method.initialise is not None:
            method.initialise(self.model(name), name, self.base.model)
        self.heads[name] = None if generate is not None else torch.nn.Linear(
            self.base.hidden_size, len(labels)).to(self.base.device)
        self.labels[name] = list(labels)
        if generate is not None:
            self.generate[name] = dict(generate)
        self.mixed_batch[name] = method.mixed_batch
        self.activate(name)

    def load_adapter(self, name: str, folder: Path, method) -> None:
        """Load a saved adapter folder (PEFT files + head + label map), frozen."""
        from peft import PeftConfig, PeftModel

        if name in self:
            return
        # What goes beside the PEFT files first: a bad one leaves the bank as it was.
        head, labels, generate = self._read_answerer(Path(folder))
        method.register_with_peft()
        config = PeftConfig.from_pretrained(folder)
        key, model = self._group(str(config.peft_type), method)
        with quiet_peft_wrap():
            if model is None:
                self.groups[key] = PeftModel.from_pretrained(self._base_for(key, config, method),
                                                             folder, adapter_name=name)
                self.groups[key].eval()
            elif method.quantized or not lora_batch.load_frozen(
                    model, name, config, Path(folder) / PEFT_WEIGHTS):
                model.load_adapter(folder, adapter_name=name)
        self.group_of[name] = key
        self.settled.discard(key)  # the new adapter's modules may be in training mode
        lora_batch.install(self.groups[key])
        self.mixed_batch[name] = method.mixed_batch
        self.heads[name], self.labels[name] = head, labels
        if generate is not None:
            self.generate[name] = generate

    def _read_answerer(self, folder: Path) -> tuple:
        """(head, labels, None) of a classify adapter's folder, or (None, [], its settings) of a
        generate adapter's, whose prompts must be templated as in its training."""
        if (folder / GENERATE_FILE).is_file():
            from adapterhub_local.errors import AhlError
            from adapterhub_local.generation import template_digest

            generate = json.loads((folder / GENERATE_FILE).read_text(encoding="utf-8"))
            if generate.get("template") != template_digest(self.base):
                raise AhlError(f"this generate adapter was trained with another chat template "
                               f"than base {self.base.name!r} has now (sha256 "
                               f"{str(generate.get('template'))[:12]}): restore the base's "
                               "tokenizer files, or train the task again")
            return None, [], generate
        weights = load_file(folder / HEAD_FILE)
        labels = json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))
        head = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
        head.load_state_dict(weights)
        head.requires_grad_(False)
        return head.to(self.base.device), labels, None

    def remove_adapter(self, name: str) -> None:
        if name in self.group_of:
            key = self.group_of.pop(name)
            model = self.groups[key]
            if len(model.peft_config) == 1:
                if key == self.in_place:  # peft cannot delete its last adapter: unload instead
                    self.base.model = model.unload()
                    self.in_place = None
                del self.groups[key]  # a group's copy of the base goes with its last adapter
            else:
                with warnings.catch_warnings():  # "was active, now deleted": that is the point
                    warnings.simplefilter("ignore", UserWarning)
                    model.delete_adapter(name)
                # peft leaves the deleted name active; its next forward would look it up.
                model.set_adapter(next(iter(model.peft_config)))
        for table in (self.heads, self.labels, self.mixed_batch, self.generate):
            table.pop(name, None)

    def save_adapter(self, name: str, folder: Path) -> None:
        """Write the PEFT folder (adapter_config.json, adapter_model.safetensors), head and labels."""
        folder = Path(folder)
        with quiet_peft_wrap():
            # No base embeddings (ahl never resizes the vocabulary): "auto" would look the
            # adapter's base up on the Hub, a network call for a base named by its public id
            self.model(name).save_pretrained(folder, selected_adapters=[name],
                                             save_embedding_layers=False)
        # save_pretrained nests non-default adapters in a subfolder; flatten to a plain PEFT folder.
        nested = folder / name
        if nested.is_dir():
            for file in nested.iterdir():
                file.replace(folder / file.name)
            nested.rmdir()
        if name in self.generate:
            (folder / GENERATE_FILE).write_text(json.dumps(self.generate[name]), encoding="utf-8")
            return
        save_file({k: v.contiguous() for k, v in self.heads[name].state_dict().items()},
                  folder / HEAD_FILE)
        (folder / LABELS_FILE).write_text(json.dumps(self.labels[name], ensure_ascii=False),
                                          encoding="utf-8")

    def activate(self, name: str) -> None:
        self.model(name).set_adapter(name)

    def digest(self, name: str) -> str:
        """sha256 of the adapter's weights and head as they are in memory now: a score computed
        with these weights may be reused only while this stays the same. The name the adapter
        is loaded under is left out (an import's weights are measured under a staging name)."""
        marker = f".{name}."
        h = hashlib.sha256()
        tensors = [(f"{k}.".replace(marker, "."), p) for k, p in self.model(name).named_parameters()
                   if marker in f"{k}."]
        if self.heads[name] is not None:
            tensors += sorted(self.heads[name].state_dict().items())
        for key, tensor in tensors:
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def trainable_parameters(self, name: str) -> list[torch.nn.Parameter]:
        adapter = [p for p in self.model(name).parameters() if p.requires_grad]
        head = self.heads[name]
        return adapter + (list(head.parameters()) if head is not None else [])

    def logits(self, name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Head logits for a padded batch through the named adapter (must be active)."""
        with quiet_forward():
            return self.heads[name](mean_pool(self.model(name)(**batch).last_hidden_state, batch))

    def batch_key(self, name: str):
        """Adapters with one key share a forward pass (peft's adapter_names, or lora_batch's
        rows); an adapter whose method would ignore adapter_names is its own key."""
        return self.group_of[name] if self.mixed_batch[name] else name

    def batch_routing(self, model, names: list[str]):
        """(context, forward kwargs) under which a forward of `model` sends row i through adapter
        names[i] (all of one batch_key)."""
        if not self.mixed_batch[names[0]]:
            self.activate(names[0])
            return contextlib.nullcontext(), {}
        if lora_batch.covers(model):  # cheaper than peft's adapter_names (see lora_batch)
            return lora_batch.rows(model, names), {}
        return contextlib.nullcontext(), {"adapter_names": names}

    def resumes(self, name: str) -> bool:
        """Whether the adapter leaves the bottom half bare, so that its rows can go on from the
        states the router's pass already computed instead of starting over."""
        layers = getattr(self.model(name).peft_config[name], "layers_to_transform", None)
        if layers is None or self.base.middle < 0:  # a one-block base has no bottom half
            return False
        return min([layers] if isinstance(layers, int) else layers) > self.base.middle

    @torch.inference_mode()
    def encode(self, texts: list[str], max_length: int = 128, batch_size: int = EVAL_BATCH_SIZE,
               keep_states: bool = True, features: str = ROUTER_FEATURES
               ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Run the bare base's bottom half (it stops after the middle block). Returns what the
        router sees, each text's `features` (FEATURES), and, to go on from in `probabilities`,
        each text's states after the middle block ([tokens, D] each)."""
        blocks = FEATURES[features](self.base.middle)  # all at or below the middle block
        out = torch.zeros(len(texts), len(blocks) * self.base.hidden_size)
        states: list[torch.Tensor | None] = [None] * len(texts)
        ids = self.base.tokenize(texts, max_length)
        with self.bare():
            for rows in length_batches(ids, range(len(ids)), batch_size):
                # packed: [tokens, D] each, the last the middle block's
                hidden, packed = packing.states_at(self.base, blocks, [ids[i] for i in rows])
                out[rows] = torch.cat([torch.nn.functional.normalize(packed.mean(h), dim=-1)
                                       for h in hidden], dim=1).cpu()  # the router's side
                if keep_states:
                    for row, state in zip(rows, packed.split(hidden[-1])):
                        states[row] = state
        return out, states if keep_states else None

    def features(self, texts: list[str], max_length: int = 128,
                 features: str = ROUTER_FEATURES) -> torch.Tensor:
        return self.encode(texts, max_length, keep_states=False, features=features)[0]

    @torch.inference_mode()
    def probabilities(self, texts: list[str], adapters: list[str], max_length: int = 128,
                      batch_size: int = EVAL_BATCH_SIZE,
                      states: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Label probabilities of texts[i] through adapters[i]. Rows for different adapters share
        one forward pass (peft's adapter_names) where the method honours it; rows of methods that
        would silently ignore it run grouped, one adapter at a time. Given `states` (from
        encode), rows of adapters that leave the bottom half bare go on from them."""
        if not texts:
            return []
        ids = self.base.tokenize(texts, max_length)
        out: list[torch.Tensor | None] = [None] * len(texts)
        resume = {a: states is not None and self.resumes(a) for a in set(adapters)}
        # Rows share a forward pass when their adapters sit in one group, honour adapter_names
        # and agree on resuming; every other adapter's rows run on their own.
        groups = {}
        for i, a in enumerate(adapters):
            groups.setdefault((self.batch_key(a), resume[a]), []).append(i)
        for group in groups.values():
            model = self.evaluating(adapters[group[0]])
            # The weights hold still: layers stack the group's adapters once.
            with lora_batch.frozen({adapters[i] for i in group}):
                for rows in length_batches(ids, group, batch_size):
                    rows = sorted(rows, key=lambda i: adapters[i])  # each adapter's rows a slice
                    names = [adapters[i] for i in rows]
                    given = [states[i] for i in rows] if resume[names[0]] else None
                    pooled = self._pooled(model, [ids[i] for i in rows], names, given)
                    runs = lora_batch.adapter_runs(names)
                    probs = to_host([self.heads[name](pooled[start:stop]).softmax(-1)
                                     for name, start, stop in runs])
                    # The runs cover the batch's rows in order: their rows, run after run
                    for row, p in zip(rows, itertools.chain.from_iterable(map(torch.unbind, probs))):
                        out[row] = p
        return out

    @torch.inference_mode()
    def pooled(self, name: str, texts: list[str], max_length: int = 128,
               batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
        """What adapter `name`'s head reads of each text: its mean-pooled last states."""
        ids = self.base.tokenize(texts, max_length)
        out = torch.zeros(len(texts), self.base.hidden_size)
        model = self.evaluating(name)
        with lora_batch.frozen([name]):
            for rows in length_batches(ids, range(len(ids)), batch_size):
                pooled = self._pooled(model, [ids[i] for i in rows], [name] * len(rows), None)
                out[rows] = pooled.float().cpu()
        return out

    def _pooled(self, model, ids: list[list[int]], names: list[str],
                states: list[torch.Tensor] | None) -> torch.Tensor:
        """Mean-pooled last states of one batch, row i through adapter names[i], going on from
        the bottom half's states where given."""
        bare = model.get_base_model()
        blocks = bare.get_submodule(self.base.layers_name)
        # Packed, no products on pads (packing.py); each adapter's tokens then take a product
        # pair, kernel launches on a GPU (lora_batch.DEVICE_MAX_RUNS): there the padded batch's
        # gathered products stay.
        if (self.mixed_batch[names[0]] and lora_batch.covers(model)
                and torch.device(self.base.device).type == "cpu"
                and packing.packable(bare, blocks)):
            return self._pooled_packed(model, bare, blocks, ids, names, states)
        batch = self.base.pad(ids)
        per_row, mixed = self.batch_routing(model, names)
        resumed = contextlib.nullcontext()
        if states is not None:
            hidden = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
            resumed = self.base.resumed_after(self.base.middle, hidden, bare)
        with resumed, per_row, quiet_forward():
            return mean_pool(model(**batch, **mixed).last_hidden_state, batch)

    def _pooled_packed(self, model, bare, blocks, ids: list[list[int]], names: list[str],
                       states: list[torch.Tensor] | None) -> torch.Tensor:
        """_pooled over packed texts (packing.py); `bare` is the model's base model."""
        packed = packing.Packing.of(ids, self.base.device)
        after, hidden = (self.base.middle, torch.cat(states)) if states else (-1, None)
        with lora_batch.rows(model, names, packed.lengths.tolist()):
            last = packing.last_states(bare, blocks, ids, packed, after, hidden)
        return packed.mean(last)

    def predict(self, name: str, texts: list[str], max_length: int = 128) -> tuple[list[int], list[float]]:
        """(label ids, probabilities of those labels) for texts through one adapter."""
        probs = self.probabilities(texts, [name] * len(texts), max_length)
        return [int(p.argmax()) for p in probs], [float(p.max()) for p in probs]

    def accuracy(self, name: str, texts: list[str], labels: list[int], max_length: int = 128) -> float:
        preds, _ = self.predict(name, texts, max_length)
        return sum(p == y for p, y in zip(preds, labels)) / max(len(labels), 1)


def route_texts(bank, router, texts: list[str], top_k: int):
    """(routes, states) of texts: empty ones abstain; the states after the base's bottom half
    are kept so that prediction goes on from them instead of running it again."""
    from adapterhub_local.router import Route

    filled = [i for i, t in enumerate(texts) if t.strip()]
    routes = [Route([], [], 0.0, "empty text")] * len(texts)
    states = [None] * len(texts)
    if filled:
        given = [texts[i] for i in filled]
        features, kept = bank.encode(given, keep_states=True, features=router.features_)
        grams = lexical.grams(bank.base, given) if router.reads_words else None
        for k, (i, route) in enumerate(zip(filled, router.route(features, top_k, grams))):
            routes[i], states[i] = route, kept[k]
    return routes, states


def answer_routes(bank, texts: list[str], routes: list, states, adapters: dict[str, str],
                  versions: dict[str, int], broken: dict[str, str]) -> list[dict]:
    """predict's answers: each routed (text, adapter) pair through the bank in shared batches,
    then each text's answer; a text routed to a broken adapter gets its "error" instead. A
    text whose first routed task generates is answered with a completion (generate_answers)."""
    labels = {t: bank.labels[name] for t, name in adapters.items()}
    labels.update({t: [] for t in broken})  # unknown kind: never mixed into a label's answer
    failed = [[broken[t] for t in r.tasks if t in broken] for r in routes]
    mixtures = [generation_mixture(r, labels) if not f else [] for r, f in zip(routes, failed)]
    pairs = [(row, t) for row, r in enumerate(routes) for t in r.tasks
             if t in adapters and labels[t] and not mixtures[row]]
    probs = bank.probabilities([texts[row] for row, _ in pairs], [adapters[t] for _, t in pairs],
                               states=states and [states[row] for row, _ in pairs])
    by_row: list[dict] = [{} for _ in texts]
    for (row, t), p in zip(pairs, probs):
        by_row[row][t] = p
    completions = generate_answers(bank, texts, mixtures, adapters, failed)
    results = []
    for row, (text, route, row_probs) in enumerate(zip(texts, routes, by_row)):
        if failed[row]:
            result = {"task": None, "label": None, "score": 0.0}
        elif mixtures[row]:
            made = completions[row]
            result = {"task": route.tasks[0], "completion": made.text,
                      "score": route.confidence * made.score}
        else:
            result = answer(route, row_probs, labels)
        results.append({"text": text, "task": result["task"],
                        **({"completion": result["completion"]} if "completion" in result
                           else {"label": result["label"]}),
                        "score": result["score"],
                        "adapters": [{"task": t, "version": versions[t], "weight": w}
                                     for t, w in zip(route.tasks, route.weights)],
                        **({"reason": route.reason} if route.reason else {}),
                        **({"error": failed[row][0]} if failed[row] else {})})
    return results


def generation_mixture(route, labels: dict[str, list[str]]) -> list[tuple[str, float]]:
    """The routed generate tasks (those without labels) that answer an input together, with
    their route weights: when the first routed task is one; otherwise ([]) a label answers."""
    if not route.tasks or labels[route.tasks[0]]:
        return []
    return [(t, w) for t, w in zip(route.tasks, route.weights) if not labels[t]]


def generate_answers(bank, texts: list[str], mixtures: list, adapters: dict[str, str],
                     failed: list[list[str]]) -> dict:
    """{row: generation.Generated} for the rows with a mixture of generate tasks (generation.
    complete). A prompt too long for the base's context with its budget fails its row (an
    "error" in `failed`) instead of the batch."""
    from adapterhub_local.generation import budget_of, complete, prompt_ids

    rows = [row for row, mixture in enumerate(mixtures) if mixture]
    named = {row: [(adapters[t], w) for t, w in mixtures[row]] for row in rows}
    ids = dict(zip(rows, prompt_ids(bank.base, [texts[row] for row in rows])))
    context = bank.base.max_positions
    for row in rows:
        needed = len(ids[row]) + budget_of(bank, named[row])
        if context is not None and needed > context:
            failed[row] = [f"the prompt is {len(ids[row])} tokens; with up to "
                           f"{needed - len(ids[row])} new ones it exceeds the base's context of "
                           f"{context}: shorten it"]
    rows = [row for row in rows if not failed[row]]
    return dict(zip(rows, complete(bank, [ids[row] for row in rows], [named[row] for row in rows])))


def answer(route, probs: dict[str, torch.Tensor], labels: dict[str, list[str]]) -> dict:
    """One input's answer from its route and the routed adapters' label probabilities.

    Routed tasks that share a label set answer together: their probabilities are mixed by the
    route's weights (generate tasks, without labels, take no part). Tasks with different label
    sets cannot be mixed; the group whose best label has the highest weighted probability
    answers. With one routed task this is that task's label.
    score = the router's confidence times the (mixed) probability of the label.
    """
    if not route.tasks:
        return {"task": None, "label": None, "score": 0.0, "tasks": []}
    groups: dict[tuple, list[tuple[str, float]]] = {}
    for task, weight in zip(route.tasks, route.weights):
        if labels[task]:
            groups.setdefault(tuple(labels[task]), []).append((task, weight))
    best = None
    for label_set, members in groups.items():
        mixture = members[0][1] * probs[members[0][0]]  # as sum() would, without its 0 + tensor
        for task, weight in members[1:]:
            mixture = mixture + weight * probs[task]
        k = int(mixture.argmax())
        if best is None or float(mixture[k]) > best[0]:
            best = (float(mixture[k]), sum(w for _, w in members), label_set[k], members)
    weighted, group_weight, label, members = best
    return {"task": members[0][0], "label": label,
            "score": route.confidence * weighted / group_weight,
            "tasks": [task for task, _ in members]}


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors on the CPU, in one copy off their device: each copy waits for the device,
    and a batch over a hundred adapters has some fifty heads' outputs."""
    flat = torch.cat([t.flatten() for t in tensors]).cpu()
    parts = flat.split([t.numel() for t in tensors])
    return [part.view(t.shape) for t, part in zip(tensors, parts)]


def mean_pool(hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean over each text's own tokens (prompt tuning's virtual tokens, prepended to the
    sequence, are left out)."""
    hidden = hidden[:, -batch["attention_mask"].shape[1]:]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def length_batches(ids: list[list[int]], rows, batch_size: int):
    """Rows sorted by token length, in batches: similar lengths pad little."""
    order = sorted(rows, key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


_banks: dict[str, AdapterBank] = {}


def bank_for(base) -> AdapterBank:
    """The process's one bank per base: peft wraps a base model once, so banks are never copied."""
    key = f"{base.path}@{base.device}"
    if key not in _banks:
        _banks[key] = AdapterBank(base)
    return _banks[key]
