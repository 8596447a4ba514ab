"""The store's write lease (commit.Lease): a live holder elsewhere keeps writers out and they say
who holds it and how to wait longer; a lapsed lease (expired, or its owner a dead process on
this host) is taken over and the takeover logged; a held lease is renewed; a waiter says so."""

import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from adapterhub_local import AhlError, Hub
from adapterhub_local.commit import Lease
from adapterhub_local.store import LEASE, AdapterStore
from conftest import FAST, file_digest
from test_cli import FAST_ARGS, add, ahl

LOGGER = "adapterhub_local"


def hold_by_hand(store, owner: str, expires_in: float, held_for: float = 0.0) -> dict:
    """Create the lease model as another writer would have: the lock is its existence."""
    now = time.time()
    tags = {"owner": owner, "token": "theirs", "expires": now + expires_in,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - held_for)),
            "since_epoch": now - held_for}
    assert store.create_model(LEASE, tags)
    return store.model_tags(LEASE)


def snapshot(store_dir, store) -> dict:
    """What a reader sees of the store, with every model version (pending ones included)."""
    versions = store.client.search_model_versions(f"name LIKE '{store.namespace}.%'")
    return {"tasks": json.loads(ahl("tasks", "--json", "--store", store_dir).stdout),
            "metrics": json.loads(ahl("metrics", "--json", "--store", store_dir).stdout),
            "versions": sorted((v.name, v.version, v.status) for v in versions),
            "lease": store.model_tags(LEASE)}


def runs(store) -> dict:
    return {r.info.run_id: r.info.status
            for r in store.client.search_runs([store.experiment_id()])}


def assert_locked_out(result):
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    # Held since 75 s before the command (plus however long it ran): "1 min 15 s" or a bit more.
    assert re.search(r"locked by otherhost:123:1 \(held \d+ min \d+ s\)", result.stderr)
    assert "--wait SECONDS" in result.stderr and "Traceback" not in result.output


def test_a_live_holder_elsewhere_keeps_every_writer_out(store_dir, tiny_data, tiny_base):
    add(store_dir, "colors", tiny_data, tiny_base)
    store = Hub(store_dir).store
    hold_by_hand(store, "otherhost:123:1", expires_in=600, held_for=75)
    before, runs_before = snapshot(store_dir, store), runs(store)

    # add-task trains before it takes the lock: only its own run (now FAILED) is new.
    assert_locked_out(ahl("add-task", "animals", "--train", tiny_data["animals"]["train"],
                          "--test", tiny_data["animals"]["test"], "--base", tiny_base,
                          "--store", store_dir, *FAST_ARGS, "--wait", 1, ok=False))
    assert snapshot(store_dir, store) == before
    runs_after = runs(store)
    assert {k: v for k, v in runs_after.items() if k in runs_before} == runs_before
    assert [v for k, v in runs_after.items() if k not in runs_before] == ["FAILED"]

    # promote and rm check their input and wait before they write anything at all.
    files = file_digest(store_dir)
    for args in (["store", "promote", "colors", 1, "--alias", "production"],
                 ["store", "rm", "colors@1"]):
        assert_locked_out(ahl(*args, "--wait", 1, "--store", store_dir, ok=False))
        assert file_digest(store_dir) == files, args


def test_an_expired_lease_is_taken_over_and_logged(store_dir, tiny_data, tiny_base, caplog):
    hub = Hub(store_dir)
    hold_by_hand(hub.store, "otherhost:123:1", expires_in=-10)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = hub.add_task("colors", tiny_data["colors"]["train"], tiny_data["colors"]["test"],
                              base=tiny_base, **FAST)
    assert result["version"] == 1
    assert any("took over the store's lock from otherhost:123:1" in r.getMessage()
               and "its lease expired" in r.getMessage() for r in caplog.records)
    assert hub.store.model_tags(LEASE) is None  # released after the commit
    assert hub.store.model_tags(f"{LEASE}.expired.theirs")["owner"] == "otherhost:123:1"


def test_a_dead_owner_on_this_host_loses_the_lease_at_once(store_dir, caplog):
    store = AdapterStore(store_dir)
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: its pid names no process now
    owner = f"{socket.gethostname()}:{process.pid}:1"
    hold_by_hand(store, owner, expires_in=3600)
    lease = Lease(store, wait=5)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        lease.acquire()
    try:
        assert lease.holds()
        assert any(f"took over the store's lock from {owner}" in r.getMessage()
                   and "its process is gone" in r.getMessage() for r in caplog.records)
        assert not any("waiting" in r.getMessage() for r in caplog.records)
    finally:
        lease.release()


def test_a_held_lease_keeps_a_second_writer_out_until_released(store_dir):
    store = AdapterStore(store_dir)
    first, second = Lease(store), Lease(store, wait=1)
    first.acquire()
    try:
        with pytest.raises(AhlError, match=r"is locked by .*--wait SECONDS"):
            second.acquire()
        assert first.holds() and not second.holds()
    finally:
        first.release()
    second.acquire()
    assert second.holds()
    second.release()
    assert store.model_tags(LEASE) is None


def test_a_held_lease_is_renewed(store_dir):
    store = AdapterStore(store_dir)
    with Lease(store, seconds=0.6):  # renewed every 0.2 s
        first = float(store.model_tags(LEASE)["expires"])
        deadline = time.monotonic() + 30  # generous: the cores are shared
        while float(store.model_tags(LEASE)["expires"]) <= first:
            assert time.monotonic() < deadline, "the lease's expiry never moved"
            time.sleep(0.05)


def test_a_waiting_writer_says_so_and_gets_the_lease_when_released(store_dir, caplog):
    store, held = AdapterStore(store_dir), threading.Event()

    def hold_briefly():
        with Lease(store):
            held.set()
            time.sleep(2)

    holder = threading.Thread(target=hold_briefly)
    holder.start()
    assert held.wait(30)
    waiter = Lease(store, wait=60)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        waiter.acquire()
    try:
        holder.join()
        assert waiter.holds() and waiter.waited > 0
        assert any("waiting for the store's lock, held by" in r.getMessage()
                   for r in caplog.records)
    finally:
        waiter.release()
