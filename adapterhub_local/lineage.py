"""What a version records of where it came from, as `store show` and `store lineage` give it:
its tags (base, data, method, parent, checksums) and, from its run, the tasks that served when
it was committed and its metrics."""

import json

from adapterhub_local.serving import kind_of, metric_of, serving_set
from adapterhub_local.store import HELD, LINEAGE_ARTIFACT, REMOVED, TAG


def after(store, version) -> list[dict]:
    """The tasks (and versions) that served when a version was committed: an artifact of its
    run, since the list grows with the store (older stores kept it in a tag)."""
    if f"{TAG}after" in version.tags:
        after = json.loads(version.tags[f"{TAG}after"])
    else:
        try:
            after = store.read_json_artifact(version.run_id, LINEAGE_ARTIFACT)["after"]
        except Exception:
            return []
    return [{"task": a["task"], "version": int(a["version"])} for a in after]

def lineage_tree(store, task: str) -> dict:
    """Every version of a task, removed ones included, as a tree: each version's parent,
    the tasks it was trained after, base, data digest, method, accuracy and status."""
    versions = store.versions(task, include_removed=True) if not task.startswith("_") else []
    if not versions:
        store.resolve(task)  # the one-line error naming the known tasks
    serving = getattr(serving_set(store).get(task), "version", None)
    nodes = []
    for v in versions:
        info = version_lineage(store, v, with_run=False)
        nodes.append({k: info[k] for k in ("version", "parent", "after", "base", "method",
                                           "aliases", "status")}
                     | {"data_digest": info["data"]["digest"],
                        "accuracy": float(v.tags.get(f"{TAG}accuracy", "nan")),
                        "serving": str(v.version) == str(serving),
                        "children": [int(c.version) for c in versions
                                     if c.tags.get(f"{TAG}parent") == str(v.version)]})
    return {"task": task, "versions": nodes}


def version_lineage(store, version, with_run: bool = True) -> dict:
    """A version's lineage, files and metrics, from its tags and run (DESIGN section 5);
    status: "removed" (ahl store rm), "held" (by the forgetting gate) or "live"."""
    tags = version.tags
    metrics = dict(store.run_info(version.run_id)[2]) if with_run else {}
    read = lambda key, default: json.loads(tags.get(f"{TAG}{key}", default))  # noqa: E731
    return {
        "task": tags.get(f"{TAG}task"), "version": int(version.version),
        "method": tags.get(f"{TAG}method"), "method_config": read("method.config", "{}"),
        "train": read("train", "{}"),
        "base": {"name": tags.get(f"{TAG}base.name"), "sha256": tags.get(f"{TAG}base.sha256")},
        "data": {"digest": tags.get(f"{TAG}data.digest"),
                 "rows": int(tags.get(f"{TAG}data.rows", 0)),
                 "test_rows": int(tags.get(f"{TAG}data.test_rows", 0)),
                 "source": tags.get(f"{TAG}data.source"), "split": read("data.split", "{}"),
                 "license": tags.get(f"{TAG}data.license"),
                 "dropped": int(tags.get(f"{TAG}data.dropped", 0))},
        "labels": read("labels", "[]"),
        "kind": kind_of(version), "metric": metric_of(version),
        **({"generate": {"template": tags.get(f"{TAG}template"),
                         "max_new_tokens": int(tags.get(f"{TAG}max_new_tokens", 0))}}
           if kind_of(version) == "generate" else {}),
        "parent": int(tags[f"{TAG}parent"]) if tags.get(f"{TAG}parent") else None,
        "after": after(store, version),
        "router_version": int(tags[f"{TAG}router.version"]) if tags.get(f"{TAG}router.version") else None,
        "aliases": list(version.aliases or []),
        "run_id": version.run_id, "source": version.source,
        "files": read("files", "{}"), "metrics": metrics,
        "status": "removed" if REMOVED in tags else "held" if HELD in tags else "live",
        "held": read("gate.held", "null"),
        "package_version": tags.get(f"{TAG}package_version"),
        "origin": read("origin", "null"),
    }
