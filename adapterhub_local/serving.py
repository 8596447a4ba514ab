"""The serving set: which version of each task answers, the router fit for exactly those, the
forgetting gate, and reading it all back with every file checked against its checksum.

A task's serving version is its `production` alias, else its newest version the gate did not
hold back (store.serving). The router model `_router` has its own `production` alias, always
pointing at a router fit for exactly the serving set: whatever changes the serving set (a commit,
promote, rm) calls sync_router under the store's lease.
"""

import hashlib
import itertools
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapterhub_local import __version__
from adapterhub_local.errors import AhlError
from adapterhub_local.forgetting import drops
from adapterhub_local.methods import get_method
from adapterhub_local.store import (LABELS_FILE, PRODUCTION, ROUTER, TAG, serving_version,
                                    sha256_file)

if TYPE_CHECKING:
    from adapterhub_local.router import GaussianRouter, TaskStats

log = logging.getLogger("adapterhub_local")
ADAPTER_ARTIFACT, STATS_ARTIFACT, ROUTER_ARTIFACT = "adapter", "router_stats", "router"
TEST_ARTIFACT = "eval/test.json"
SCORES_ARTIFACT = "eval/scores.safetensors"  # the test split's features and oracle probabilities
CROSS_ARTIFACT = "cross"  # sequence run: each step's cross scores (composed mode), one file a step
VERSIONS_DIGEST = f"{TAG}versions.sha256"  # router version tag: which serving set it was fit for
MANIFEST = "serving.json"  # beside a router's files: each version it serves, with its tags


@dataclass
class Served:
    """A serving version as its router's manifest recorded it: what a model version offers
    (name, version, run_id, source, tags, aliases), without a registry look-up per task."""

    name: str
    version: str
    run_id: str
    source: str
    tags: dict
    aliases: list


def serving_set(store) -> dict:
    """{task: version} that routing and prediction use: the manifest of the router's
    production version, which every change of the serving set rewrites under the store's lock;
    one look-up however many tasks. A version committed by a writer killed before it moved the
    router counts too (its step is recorded). Stores older than manifests: a full listing."""
    router = serving_router(store) if store.exists() else None
    if router is None:
        return {}
    if VERSIONS_DIGEST not in router.tags:  # a router from before manifests
        return store.serving()
    manifest = store.local_artifact(f"{router.source}/{MANIFEST}")
    served = {}
    for task, e in json.loads(manifest.read_text(encoding="utf-8")).items():
        served[task] = Served(store.model_name(task), str(e["version"]), e["run_id"],
                              f"{store.run_artifact_uri(e['run_id'])}/{ADAPTER_ARTIFACT}",
                              e["tags"], e["aliases"])
    # A commit killed between its commit point and finalize: its task serves what the serving
    # rule says of its versions, the committed one included (store.visible).
    for task in {store.task_of(v.name) for v in store.pending_versions() if store.visible(v)}:
        if task != ROUTER:
            chosen = serving_version(store.versions(task))
            served.pop(task, None)
            if chosen is not None:
                served[task] = chosen
    return served


# What readers of a serving version use of its tags (the rest stays in the registry).
MANIFEST_TAGS = [f"{TAG}{k}" for k in ("task", "kind", "metric", "max_new_tokens", "method",
                                        "train", "files", "accuracy")]


def manifest_of(versions: dict) -> dict:
    return {t: {"version": int(v.version), "run_id": v.run_id, "aliases": list(v.aliases or []),
                "tags": {k: v.tags[k] for k in MANIFEST_TAGS if k in v.tags}}
            for t, v in versions.items()}


def versions_digest(versions: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(versions.items())).encode()).hexdigest()


def digest_of_router(router_version) -> str:
    """The serving set a router version was fit for, as a digest (older routers: their tag)."""
    tags = router_version.tags
    if VERSIONS_DIGEST in tags:
        return tags[VERSIONS_DIGEST]
    return versions_digest({t: int(v) for t, v in json.loads(tags.get(f"{TAG}versions", "{}")).items()})


def register_router(store, router: "GaussianRouter", run_id: str, served: dict,
                    extra_tags: dict | None = None):
    """Save a router, fit for `served` ({task: model version}), with its manifest as run
    artifacts and register it as the next `_router` version, with the checksums of its files
    (checked when it is loaded)."""
    versions = {t: int(v.version) for t, v in served.items()}
    with tempfile.TemporaryDirectory() as tmp:
        router.save(Path(tmp), versions)
        (Path(tmp) / MANIFEST).write_text(json.dumps(manifest_of(served)), encoding="utf-8")
        files = {f.name: sha256_file(f) for f in sorted(Path(tmp).iterdir())}
        store.log_artifacts(run_id, Path(tmp), ROUTER_ARTIFACT)
    return store.register(ROUTER, run_id, ROUTER_ARTIFACT, tags={
        VERSIONS_DIGEST: versions_digest(versions), f"{TAG}files": json.dumps(files),
        f"{TAG}shrinkage": router.shrinkage_, f"{TAG}threshold": router.threshold_,
        f"{TAG}package_version": __version__, **(extra_tags or {})})


def serving_router(store):
    """The router version prediction uses: `_router`'s production alias; without one, nothing
    serves (every version removed or held back), except in stores made before that alias
    existed, whose newest router serves."""
    chosen = store.alias_version(ROUTER, PRODUCTION)
    if chosen is None:
        newest = store.current_version(ROUTER)
        chosen = newest if newest is not None and VERSIONS_DIGEST not in newest.tags and \
            f"{TAG}versions" in newest.tags else None
    return chosen


def sync_router(store, loader, changed: str | None = None, prefer=None) -> bool:
    """Point the router's production alias at a router fit for exactly the serving versions:
    `prefer` (a commit's own router) if it fits, else the newest such router version, else a
    new one fit from the stored statistics. Returns whether the alias moved. `changed`: the
    one task whose serving version may have moved (the rest is read from the router's
    manifest); without it, every task is listed again."""
    if changed is None:
        serving = store.serving()
    else:
        serving = {t: v for t, v in serving_set(store).items() if t != changed}
        chosen = serving_version(store.versions(changed))
        if chosen is not None:
            serving[changed] = chosen
    wanted = {t: int(v.version) for t, v in serving.items()}
    digest = versions_digest(wanted)
    now = store.alias_version(ROUTER, PRODUCTION)
    if now is not None and digest_of_router(now) == digest:
        return False
    # A commit's own router usually fits; else an earlier one (a promote back, an rm undone).
    earlier = (v for v in reversed(store.versions(ROUTER)))
    for router_version in itertools.chain([prefer] if prefer else [], earlier):
        if digest_of_router(router_version) == digest:
            store.set_alias(ROUTER, PRODUCTION, router_version.version)
            return True
    if not serving:
        if now is not None:
            store.delete_alias(ROUTER, PRODUCTION)
        return now is not None
    from adapterhub_local.router import GaussianRouter

    router = GaussianRouter().fit({t: loader.task_stats(v) for t, v in serving.items()})
    run_id = store.start_run(ROUTER, params={"tasks": len(wanted)}, tags={f"{TAG}kind": "router"})
    try:
        made = register_router(store, router, run_id, serving)
        store.set_alias(ROUTER, PRODUCTION, made.version)
    except BaseException:
        store.finish_run(run_id, "FAILED")
        raise
    store.finish_run(run_id)
    return True


def gate_verdict(gate: float | None, task: str, previous: dict, row: dict) -> dict | None:
    """Whether a new version of `task` may serve: no earlier task's routed accuracy dropped by
    more than the gate from the previous step (previous and row: {task: routed accuracy})."""
    if gate is None:
        return None
    dropped = [{"task": t, "before": before, "after": after, "drop": before - after}
               for t, before, after in drops(previous, row, gate) if t != task]
    return {"threshold": gate, "passed": not dropped, "regressions": dropped}


def check_gate(gate: float) -> float:
    if not 0 <= gate < 1:
        raise AhlError(f"gate {gate} is not an accuracy drop between 0 and 1: give e.g. 0.02")
    return float(gate)


class Loader:
    """What this process has read from the store: each version's files are checked against the
    checksums recorded at registration the first time they are used (a bad file is one line
    naming the version), router statistics and test splits are read once."""

    def __init__(self, store, device: str | None = None):
        self.store = store
        self.device = device
        """The device asked for (device.check_device_name): resolved where the base loads."""
        self.checked: dict[str, Path] = {}  # model version source -> its verified local folder
        self.cache: dict[tuple, object] = {}
        self.cross: dict[tuple, object] = {}  # (run id, adapter digest, row) -> probabilities
        self.cross_live: tuple[set, set] = (set(), set())  # (run ids, digests): see save_cross
        self.cross_saved: tuple | None = None  # (run id, step) of the cross scores in memory
        self.opened = None  # (router version, (bank, router, adapters, versions, broken))

    def folder(self, version) -> Path:
        """The version's local folder, its files checked once per process."""
        if version.source not in self.checked:
            label = f"{version.tags.get(f'{TAG}task', version.name.split('.', 1)[-1])}@{version.version}"
            recorded = json.loads(version.tags.get(f"{TAG}files", "{}"))
            try:
                folder = self.store.adapter_folder(version)
            except Exception:
                raise AhlError(f"{label}: its files are missing from the store: run ahl store "
                               "verify") from None
            bad = [n for n, sha in recorded.items()
                   if not (folder / n).is_file() or sha256_file(folder / n) != sha]
            if bad:
                raise AhlError(f"{label}: {', '.join(bad)} missing or altered (checksum "
                               "mismatch): run ahl store verify")
            self.checked[version.source] = folder
        return self.checked[version.source]

    def copy_version(self, version, target: Path) -> list[str]:
        """Copy a version's recorded files (checked against their checksums) into `target`;
        their names, sorted."""
        import shutil

        source = self.folder(version)
        target.mkdir(parents=True, exist_ok=True)
        names = sorted(self.store.recorded_files(version))
        for name in names:
            shutil.copyfile(source / name, target / name)
        return names

    def cached(self, key: tuple, compute):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def load_version(self, bank, task: str, version) -> str:
        from adapterhub_local.inference import adapter_name

        name = adapter_name(task, version.run_id)
        method = get_method(version.tags.get(f"{TAG}method", "lora"))
        bank.load_adapter(name, self.folder(version), method)
        return name

    def test_split(self, version) -> dict:
        """{"texts", "labels"}: the version's test split, as its run stored it."""
        return self.cached((version.run_id, "test"), lambda: self.store.read_json_artifact(
            version.run_id, TEST_ARTIFACT))

    def grams(self, bank, version) -> list[list[int]]:
        """The version's test split's grams (lexical.grams), for a router that reads words: as
        its run stored them, or (versions from before word evidence) tokenized again."""
        from adapterhub_local import lexical

        split = self.test_split(version)
        if "grams" in split:
            return split["grams"]
        return self.cached((version.run_id, "grams"), lambda: lexical.grams(
            bank.base, split["texts"], max_length_of(version)))

    def labels(self, bank, task: str, version) -> list[str]:
        """The labels of the version's head, without loading its adapter ([] for a generate
        task: it has no head)."""
        from adapterhub_local.inference import adapter_name

        if kind_of(version) == "generate":
            return []
        name = adapter_name(task, version.run_id)
        if name in bank:
            return bank.labels[name]
        return self.cached((version.run_id, "labels"), lambda: json.loads(
            (self.folder(version) / LABELS_FILE).read_text(encoding="utf-8")))

    def digest(self, bank, task: str, version) -> str:
        """AdapterBank.digest of the version's adapter weights: of those in memory where the
        bank holds them; else of its files as they load, which its stored test scores recorded
        when they were written from the very weights saved in those files (the files checked
        here against their registered checksums; tests/test_methods.py checks that every
        method that says it reloads exactly does). Otherwise the adapter is loaded."""
        from adapterhub_local.inference import adapter_name

        name = adapter_name(task, version.run_id)
        if name not in bank:
            self.folder(version)
            recorded = (self.test_split(version).get("scores") or {}).get("adapter_digest")
            if recorded and get_method(version.tags.get(f"{TAG}method", "lora")).reloads_exactly:
                return recorded
            self.load_version(bank, task, version)
        return bank.digest(name)

    def scores(self, bank, task: str, version) -> tuple:
        """(features, outputs) of the version's test split (compute_scores): the bare base's
        features (what the router reads) and the adapter's oracle answers. A score is
        reused only for the very weights that produced it (self.digest): from memory, or from
        the store's scores file (eval/scores.safetensors, written with the version) when its
        recorded digest is theirs and its checksum holds. An adapter changed in memory is
        scored again: forgetting is measured, never assumed. Computing them runs each text's
        bottom half once for both."""
        digest = self.digest(bank, task, version)
        return self.cached((version.run_id, "scores", digest),
                           lambda: self.stored_scores(bank, version, digest) or compute_scores(
                               bank, self.load_version(bank, task, version),
                               self.test_split(version)["texts"], max_length_of(version),
                               self.task_stats(version).features))

    def stored_scores(self, bank, version, digest: str) -> tuple | None:
        recorded = self.test_split(version).get("scores") or {}
        if recorded.get("adapter_digest") != digest:
            return None
        try:
            file = self.store.artifact_folder(version.run_id, SCORES_ARTIFACT)
        except Exception:
            return None
        if sha256_file(file) != recorded.get("sha256"):
            log.warning("%s: its stored test scores fail their checksum; scoring again", file)
            return None
        from safetensors.torch import load_file

        tensors = load_file(file)
        if "tokens" in tensors:  # a generate task's completions
            from adapterhub_local.generation import from_tensors

            return tensors["features"], from_tensors(bank.base, tensors)
        return tensors["features"], list(tensors["probs"])

    def other_probs(self, bank, versions: dict, wanted: list[tuple[str, int, str]]) -> list:
        """Probabilities of task t's adapter on row r of task s's test split, for each (s, r, t)
        of `wanted` (composed mode; versions: {task: model version}). Reused under the digest
        of t's weights (self.digest): from memory, or from the cross scores of earlier steps
        (load_cross); the rest are computed in shared batches, loading the adapters they need."""
        digest = {t: self.digest(bank, t, v) for t, v in versions.items()}
        keys = [(versions[s].run_id, digest[t], row) for s, row, t in wanted]
        missing: dict[int, dict] = {}  # max_length -> {(s, r, t): its key in self.cross}
        for pair, key in zip(wanted, keys):
            if key not in self.cross:
                missing.setdefault(max_length_of(versions[pair[0]]), {})[pair] = key
        for max_length, pairs in missing.items():
            texts = [self.test_split(versions[s])["texts"][row] for s, row, _ in pairs]
            names = {t: self.load_version(bank, t, versions[t]) for *_, t in pairs}
            computed = bank.probabilities(texts, [names[t] for *_, t in pairs], max_length)
            for key, p in zip(pairs.values(), computed):
                self.cross[key] = p
        # What save_cross keeps: scores of these rows by these weights, whichever step used them.
        self.cross_live = ({v.run_id for v in versions.values()}, set(digest.values()))
        return [self.cross[key] for key in keys]

    def save_cross(self, run_id: str, step: int) -> str:
        """Write the cross scores that are still live (rows of the versions of this step's last
        other_probs, by the weights they serve with) as the sequence run's cross/step_N file;
        returns its sha256, which the step's record keeps. Scores of pairs that a step did not
        route are kept too: routes move as the router is refit, and often move back."""
        import torch
        from safetensors.torch import save_file

        runs, digests = self.cross_live
        self.cross = {k: p for k, p in self.cross.items() if k[0] in runs and k[1] in digests}
        groups: dict[str, list[tuple[int, object]]] = {}
        for (run, digest, row), p in sorted(self.cross.items(), key=lambda item: item[0]):
            groups.setdefault(f"{run}.{digest}", []).append((row, p))
        tensors = {}
        for key, rows in groups.items():
            tensors[f"{key}.rows"] = torch.tensor([row for row, _ in rows])
            tensors[f"{key}.probs"] = torch.stack([p for _, p in rows])
        self.cross_saved = (run_id, step)
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / f"step_{step:06d}.safetensors"
            save_file(tensors, file)
            self.store.log_artifacts(run_id, Path(tmp), CROSS_ARTIFACT)
            return sha256_file(file)

    def load_cross(self, run_id: str, step: int, sha: str | None) -> None:
        """Take in step `step`'s cross scores, if its record names them and they hold their
        checksum (a bad or missing file only means computing them again)."""
        if not sha or self.cross_saved == (run_id, step):  # this process wrote them: in memory
            return
        try:
            file = self.store.artifact_folder(run_id, f"{CROSS_ARTIFACT}/step_{step:06d}.safetensors")
        except Exception:
            return
        if sha256_file(file) != sha:
            log.warning("%s: cross scores fail their checksum; scoring again", file)
            return
        from safetensors.torch import load_file

        tensors = load_file(file)
        for key in (k[: -len(".rows")] for k in tensors if k.endswith(".rows")):
            run, digest = key.split(".")
            for row, p in zip(tensors[f"{key}.rows"].tolist(), tensors[f"{key}.probs"]):
                self.cross.setdefault((run, digest, row), p)

    def task_stats(self, version) -> "TaskStats":
        from adapterhub_local.router import TaskStats

        return self.cached((version.run_id, "stats"), lambda: TaskStats.load(
            self.store.artifact_folder(version.run_id, STATS_ARTIFACT)))

    def open_router(self, base_name: str):
        """(bank, router, {task: adapter}, {task: version}, {task: error}) for the serving router:
        its adapters loaded, each checked; a broken one is left out and named in `broken`, so
        that only the inputs routed to it fail."""
        from adapterhub_local.router import ROUTER_META, GaussianRouter

        version = serving_router(self.store)
        if version is None:
            raise AhlError(f"store {self.store.location} has no serving versions (removed, or "
                           "held back by the gate): add a task, or promote a version with ahl "
                           "store promote NAME VERSION --alias production")
        if self.opened and self.opened[0] == version.version:
            return self.opened[1]
        folder = self.folder(version)
        router = GaussianRouter.load(folder)
        versions = {t: int(v) for t, v in json.loads(
            (folder / ROUTER_META).read_text(encoding="utf-8"))["versions"].items()}
        bank = bank_for_base(base_name, self.device)
        adapters, broken = {}, {}
        for task, v in versions.items():
            try:
                adapters[task] = self.load_version(bank, task, self.store.get_version(task, v))
            except AhlError as e:
                broken[task] = str(e)
        self.opened = (version.version, (bank, router, adapters, versions, broken))
        return self.opened[1]


def bank_for_base(base_name: str, device: str | None = None):
    from adapterhub_local.base import load_base
    from adapterhub_local.device import resolve_device
    from adapterhub_local.inference import bank_for

    return bank_for(load_base(base_name, resolve_device(device)))


def compute_scores(bank, adapter: str, texts: list[str], max_length: int, features: str) -> tuple:
    """(features, outputs) of texts: the bare base's features (what the router reads) and the
    adapter's answers: label probabilities of a classify adapter, the bottom half run once for
    both (the adapter goes on from its states where it leaves that half bare), or a generate
    adapter's greedy completions (generation.Generated) of the texts as prompts."""
    if adapter in bank.generate:
        from adapterhub_local.generation import complete, prompt_ids

        found = bank.features(texts, max_length, features)
        return found, complete(bank, prompt_ids(bank.base, texts), [[(adapter, 1.0)]] * len(texts))
    found, states = bank.encode(texts, max_length, features=features)
    return found, bank.probabilities(texts, [adapter] * len(texts), max_length, states=states)


def scores_tensors(features, outputs) -> dict:
    """compute_scores' result as the tensors of a scores file (SCORES_ARTIFACT)."""
    import torch

    if outputs and not isinstance(outputs[0], torch.Tensor):
        from adapterhub_local.generation import to_tensors

        return {"features": features.contiguous(), **to_tensors(outputs)}
    return {"features": features.contiguous(), "probs": torch.stack(outputs)}


def kind_of(version) -> str:
    return version.tags.get(f"{TAG}kind", "classify")


def metric_of(version) -> str:
    return version.tags.get(f"{TAG}metric", "accuracy")


def max_length_of(version) -> int:
    return json.loads(version.tags.get(f"{TAG}train", "{}")).get("max_length", 128)
