"""The commit protocol: one writer at a time changes what a store serves, and a killed writer
leaves nothing that counts.

- The lease: a registered model `NAMESPACE._lease` whose existence is the lock. MLflow keeps model
  names unique in its database, so creating it is atomic on SQLite and on a tracking server
  shared by many machines alike. Its tags say who holds it (host:pid:start) and until when; the
  holder renews the expiry from a thread. A lease past its expiry, or one whose holder is a dead
  process on this host, is taken over by renaming it to `_lease.expired.TOKEN` first: of two
  writers doing that at once only one rename succeeds.
- A commit (add-task's, under the lease): register the new version and router as *pending*
  (invisible to every query), evaluate, write the step's record, then set the sequence run's
  step count: that one call is the commit point. Afterwards `finalize` clears the pending tags
  and moves the aliases; it is idempotent, and `repair` re-runs it for a writer killed after the
  commit point and rolls back (deletes) the pending versions of one killed before it.
"""

import json
import logging
import threading
import time
import uuid

from adapterhub_local.errors import AhlError
from adapterhub_local.forgetting import carry, summarize_step
from adapterhub_local.sequence import (MATRICES, MODES, commit_step, read_carry, read_step,
                                       sequence_run, write_step)
from adapterhub_local.serving import (ADAPTER_ARTIFACT, gate_verdict, metric_of,
                                      register_router, serving_set, sync_router)
from adapterhub_local.store import (HELD, LEASE, LINEAGE_ARTIFACT, PENDING, PRODUCTION, ROUTER,
                                    STEP_TAG, TAG)
from adapterhub_local.tracking import owner_is_dead, process_owner

log = logging.getLogger("adapterhub_local")
RESYNC = f"{TAG}resync"  # store tag: the task whose serving change awaits its router refit
LEASE_SECONDS = 120.0  # a holder renews every third of this; a dead holder's lease lapses after it
DEFAULT_WAIT = 300.0  # how long a writer waits for the lease before giving up


class Lease:
    """The store's write lease, held in a `with` block:

        with Lease(store):
            ...  # nobody else commits to this store meanwhile
    """

    def __init__(self, store, wait: float = DEFAULT_WAIT, seconds: float = LEASE_SECONDS):
        self.store, self.wait, self.seconds = store, wait, seconds
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer = None
        self.waited = 0.0  # seconds acquire() waited for another writer

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        store, started, next_notice = self.store, time.monotonic(), 0.0
        store.experiment_id()  # a store that cannot be reached says so before any waiting
        while not store.create_model(LEASE, self._tags()):
            holder = store.model_tags(LEASE)
            if holder is None:
                continue  # released between our two calls: try again at once
            if self._lapsed(holder):
                self._take_over(holder)
                continue
            waited = time.monotonic() - started
            if waited >= self.wait:
                raise AhlError(f"store {store.location} is locked by {holder.get('owner')} "
                               f"(held {age(holder)}): try again later, or wait longer with "
                               f"--wait SECONDS (waited {waited:.0f} s)")
            if waited >= next_notice:
                log.warning("waiting for the store's lock, held by %s for %s",
                            holder.get("owner"), age(holder))
                next_notice = waited + 30
            time.sleep(0.5)
        self.waited = time.monotonic() - started
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="ahl-lease")
        self._renewer.start()

    def _take_over(self, holder: dict) -> None:
        """Move a lapsed lease aside (the rename is atomic: of two writers one wins). If the
        lease we moved is not the one we judged lapsed (it was released and taken anew in
        between), put it back at once: its holder is alive."""
        aside = f"{LEASE}.expired.{holder.get('token', 'none')}"
        if not self.store.rename_model(LEASE, aside):
            return
        moved = self.store.model_tags(aside) or {}
        if moved.get("token") != holder.get("token"):
            self.store.rename_model(aside, LEASE)
            return
        log.warning("took over the store's lock from %s (held since %s, %s)",
                    holder.get("owner"), holder.get("since"), self._why(holder))

    def holds(self) -> bool:
        """Whether the lease is still ours (checked again just before the commit point)."""
        tags = self.store.model_tags(LEASE)
        return tags is not None and tags.get("token") == self.token

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.holds():
            self.store.delete_model(LEASE)

    def _tags(self) -> dict:
        now = time.time()
        return {"owner": process_owner(), "token": self.token, "expires": now + self.seconds,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                "since_epoch": now}

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if self.holds():
                    self.store.set_model_tag(LEASE, "expires", time.time() + self.seconds)
            except Exception:  # a renewal that fails is retried; a lease that lapses is checked
                pass

    @staticmethod
    def _lapsed(holder: dict) -> bool:
        return float(holder.get("expires", 0)) < time.time() or owner_is_dead(holder.get("owner", ""))

    @staticmethod
    def _why(holder: dict) -> str:
        return ("its process is gone" if owner_is_dead(holder.get("owner", ""))
                else "its lease expired")


def age(holder: dict) -> str:
    seconds = max(0, time.time() - float(holder.get("since_epoch", time.time())))
    return f"{seconds // 60:.0f} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def finalize(store, loader, record: dict) -> None:
    """After the commit point of `record`'s step: move the aliases, mark the run finished and
    clear the pending tags, last, so that while one is left repair knows there is something
    to finish. Idempotent: repair runs it again for a writer killed halfway."""
    task, version, router = record["task"], record["version"], record["router"]
    if (record.get("gate") or {}).get("passed"):
        store.set_alias(task, PRODUCTION, version)
    made = {name: store.get_version(name, number) for name, number in ((ROUTER, router),
                                                                       (task, version))}
    # The version counts from the commit point on (store.visible), so the router moves first.
    sync_router(store, loader, changed=task, prefer=made[ROUTER])
    store.finish_run(record["run_id"])
    for name, made_version in made.items():
        if PENDING in made_version.tags:
            store.delete_version_tag(name, made_version.version, PENDING)


def repair(store, loader) -> list[str]:
    """Under the lease: finish or roll back what killed writers left; one line per action."""
    done, actions, finished = store.steps_committed(), [], set()
    for version in store.pending_versions():
        model = store.task_of(version.name)
        step = int(version.tags.get(STEP_TAG, "0"))
        record = read_step(store, step) if 0 < step <= done else None
        committed = record is not None and (
            (model, int(version.version)) in ((record["task"], record["version"]),
                                              (ROUTER, record["router"])))
        if committed:
            if step not in finished:
                finalize(store, loader, record)
                finished.add(step)
            actions.append(f"{model}@{version.version}: committed at step {step}; finished "
                           "making it visible")
        else:
            store.unregister(version.name, version.version)
            actions.append(f"{model}@{version.version}: its writer died before committing; "
                           "rolled back")
    for run in store.running_runs():
        owner = run.data.tags.get("ahl.owner", "")
        if owner and owner_is_dead(owner):
            store.finish_run(run.info.run_id, "KILLED")
            actions.append(f"run {run.info.run_id} ({run.info.run_name}): its process "
                           f"{owner.split(':')[1]} is gone; marked KILLED")
    changed = store.store_tag(RESYNC)
    if changed is not None:  # a promote or rm killed before it refit the router
        sync_router(store, loader, changed=changed)
        store.set_store_tag(RESYNC, None)
        actions.append(f"{changed}: the router refit for the serving set an interrupted "
                       "promote or rm left")
    for line in actions:
        log.warning("repaired: %s", line)
    return actions


def change_serving(store, loader, task: str, change) -> None:
    """Under the lease: apply a change to `task`'s serving version (promote, rm), then refit
    the router. A marker names the task meanwhile, so that repair finishes the refit for a
    writer killed in between."""
    store.set_store_tag(RESYNC, task)
    change()
    sync_router(store, loader, changed=task)
    store.set_store_tag(RESYNC, None)


def commit_add_task(store, loader, candidate, gate: float | None, lease: Lease) -> dict:
    """Under the lease: make the candidate the task's next version, refit the router over the
    serving set as it is now, evaluate every task in every mode and record the step. Returns
    the step's record; on any error before the commit point nothing of it is visible."""
    from adapterhub_local.evaluation import evaluate_step
    from adapterhub_local.plan import lineage_tags
    from adapterhub_local.router import GaussianRouter

    repair(store, loader)
    c, name = candidate, candidate.plan.data.name
    store.check_base(c.base.name, c.base.sha256)  # another writer may have bound the store
    if store.router_features(c.plan.features) != c.plan.features:  # bound by another writer
        raise AhlError(f"store {store.location} routes on {store.router_features('')} features, "
                       f"this add-task measured {c.plan.features}: run it again")
    store.bind_base(c.base.name, c.base.sha256, c.plan.features)
    current = serving_set(store)
    parent = store.current_version(name)
    sequence = sequence_run(store, create=True)
    step = store.steps_committed() + 1
    previous = {**(read_step(store, step - 1) or {}), **read_carry(store, step - 1)}
    store.log_json(c.run_id, LINEAGE_ARTIFACT, {"after": [
        {"task": t, "version": int(v.version)} for t, v in current.items() if t != name]})
    pending = {PENDING: "1", STEP_TAG: step}
    made = []  # (model, version) registered here, rolled back on failure
    try:
        registered = store.register(name, c.run_id, ADAPTER_ARTIFACT, tags={
            **lineage_tags(c.plan, c.base, parent, c.files, c.accuracy), **pending})
        made.append((store.model_name(name), registered.version))
        evaluated = {**{t: v for t, v in current.items() if t != name}, name: registered}
        router = GaussianRouter().fit({**{t: loader.task_stats(v) for t, v in evaluated.items()
                                          if t != name}, name: c.stats})
        router_version = register_router(store, router, c.run_id, evaluated, pending)
        made.append((store.model_name(ROUTER), router_version.version))
        store.set_version_tag(name, registered.version, f"{TAG}router.version",
                              router_version.version)
        loader.load_cross(sequence, step - 1, previous.get("cross"))  # a fresh process's
        results = evaluate_step(c.bank, router, loader, evaluated)
        record = step_record(step, previous, name, registered, router_version, c.run_id,
                             evaluated, results, router)
        record["cross"] = loader.save_cross(sequence, step)  # for the next step to reuse
        record["gate"] = gate_verdict(gate, name, routed_row(previous), routed_row(record))
        if record["gate"] and not record["gate"]["passed"]:
            worst = sorted(record["gate"]["regressions"], key=lambda r: -r["drop"])
            store.set_version_tag(name, registered.version, HELD, json.dumps(  # bounded size
                {"gate": gate, "regressions": worst[:10], "total": len(worst)}))
        write_step(store, sequence, record, previous)
        # Fencing: a writer that stalled past its lease's expiry must not commit over the
        # writer that took the lease over.
        if not lease.holds() or store.steps_committed() != step - 1:
            raise AhlError(f"lost the store's lock while committing {name} (another writer took "
                           "it over after it expired): nothing was committed; run add-task again")
        commit_step(store, sequence, step)  # the commit point
    except BaseException:
        # The commit point's call may have landed and failed after (a lost reply, Ctrl-C):
        # then the step counts, and finalize (here or in the next writer's repair) finishes it.
        if not (made and store.steps_committed() >= step):
            for model, version in reversed(made):
                store.unregister(model, version)
        raise
    finalize(store, loader, record)
    return record


def routed_row(record: dict) -> dict:
    """{task: routed accuracy} of a step's record ({} for none): what the gate compares."""
    return dict(zip(record.get("tasks", []), record.get("rows", {}).get("routed", [])))


def step_record(step: int, previous: dict, task: str, registered, router_version, run_id: str,
                evaluated: dict, results: dict, router) -> dict:
    """One step of the sequence record (sequence.py): the columns so far, one row per mode,
    what forgetting needs of the rows before (first and best values) and the summaries."""
    tasks = previous.get("tasks", []) + [t for t in evaluated if t not in previous.get("tasks", [])]
    rows, first, best, summary = {}, {}, {}, {}
    for mode in MATRICES:
        row = {t: round(getattr(results[t], mode), 6) if t in results else None for t in tasks}
        old_first = previous.get("first", {}).get(mode, {})
        old_best = previous.get("best", {}).get(mode, {})
        if mode in MODES:
            summary[mode] = summarize_step(old_first, old_best, row)
        rows[mode] = [row[t] for t in tasks]
        first[mode], best[mode] = carry(old_first, old_best, row)
    parent = registered.tags.get(f"{TAG}parent")
    return {"step": step, "task": task, "version": int(registered.version),
            "parent": int(parent) if parent else None,
            "router": int(router_version.version), "run_id": run_id,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tasks": tasks,
            "versions": {t: int(v.version) for t, v in evaluated.items()}, "rows": rows,
            "first": first, "best": best, "summaries": summary,
            # What each column measures, and a generate task's soft metric beside it.
            "metrics": {t: metric_of(v) for t, v in evaluated.items()},
            "soft": {t: e.soft for t, e in results.items() if e.soft},
            "confusion": {"tasks": router.tasks_, "true_tasks": list(results),
                          "matrix": [results[t].confusion for t in results]}}
