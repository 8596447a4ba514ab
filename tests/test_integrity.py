"""Integrity: a stored file that changed is caught, and forgetting is measured, never assumed.

- Every version's files are checked against the sha256 recorded at registration the first time
  a process uses them (serving.Loader.folder). A broken adapter costs only the inputs routed to
  it (one `error:` line naming it, exit 1); a broken router is one line, no traceback.
- Each add-task scores every serving task again from the weights in memory: a score is reused
  only while AdapterBank.digest of those weights is unchanged, so an adapter altered in memory
  shows up as forgetting in the oracle matrix, and an untouched one keeps its column exactly.
"""

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest

from adapterhub_local import Hub
from adapterhub_local.inference import AdapterBank, adapter_name, bank_for
from conftest import FAST, tiny_rows
from test_cli import add, ahl


def local_folder(source: str, store_dir: Path) -> Path:
    """A version's artifact folder from its file:// source; it must lie inside the store."""
    folder = Path(url2pathname(urlparse(source).path))
    assert folder.is_dir() and folder.resolve().is_relative_to(Path(store_dir).resolve())
    return folder


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def ahl_process(*args) -> subprocess.CompletedProcess:
    """The CLI in a fresh process: nothing this test process loaded or checked is reused."""
    return subprocess.run([sys.executable, "-m", "adapterhub_local.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture
def two_tasks(store_dir, tiny_data, tiny_base):
    add(store_dir, "colors", tiny_data, tiny_base)
    add(store_dir, "animals", tiny_data, tiny_base)
    return store_dir


def test_an_altered_adapter_fails_only_the_inputs_routed_to_it(two_tasks, tmp_path):
    store = two_tasks
    folder = local_folder(Hub(store).show("animals@1")["source"], store)
    flip_middle_byte(folder / "adapter_model.safetensors")
    colors = [t for t, _ in tiny_rows("colors", 3, seed=7)]
    animals = [t for t, _ in tiny_rows("animals", 3, seed=7)]
    mixed = [t for pair in zip(colors, animals) for t in pair] + animals[len(colors):]

    result = ahl_process("predict", *mixed, "--json", "--store", store)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: animals@1: adapter_model.safetensors")
    assert "checksum" in lines[0] and "altered" in lines[0] and "ahl store verify" in lines[0]
    answers = json.loads(result.stdout)
    assert [a["text"] for a in answers] == mixed
    for a in answers:
        if a["text"] in colors:  # the intact adapter still answers
            assert a["task"] == "colors" and a["label"] in ("red", "blue") and "error" not in a
        else:  # routed to the broken one: no answer, and why
            assert [x["task"] for x in a["adapters"]] == ["animals"]
            assert a["task"] is None and a["label"] is None and "animals@1" in a["error"]

    ahl("predict", *colors, "--task", "colors", "--store", store)  # exits 0: colors is intact
    verify = ahl("store", "verify", "--store", store, ok=False)
    assert verify.exit_code == 1
    problems = verify.stderr.splitlines()
    assert problems and all(line.startswith("animals@1: adapter_model") for line in problems)
    exported = ahl("store", "export", "animals@1", tmp_path / "out", "--store", store, ok=False)
    assert exported.exit_code == 1 and exported.stderr.count("\n") == 1
    assert "animals@1" in exported.stderr and "Traceback" not in exported.output


@pytest.mark.parametrize("file", ["router.safetensors", "router.json"])
def test_an_altered_router_file_is_one_line_naming_the_router(two_tasks, file):
    from adapterhub_local.serving import serving_router

    store = two_tasks
    router = serving_router(Hub(store).store)
    flip_middle_byte(local_folder(router.source, store) / file)

    result = ahl_process("predict", "red and blue", "a kitten", "--store", store)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        (f"error: _router@{router.version}: {file} missing or altered (checksum mismatch): "
         "run ahl store verify")]
    verify = ahl("store", "verify", "--store", store, ok=False)
    assert verify.exit_code == 1
    assert [line.split(" (")[0] for line in verify.stderr.splitlines()] == [
        f"_router@{router.version}: {file} altered"]


def oracle(hub: Hub) -> tuple[list[list], float]:
    modes = hub.metrics()["modes"]["oracle"]
    return modes["matrix"], modes["bwt"]


def colors_adapter(bank: AdapterBank, hub: Hub) -> str:
    """The name colors@1's adapter has in the bank (ahl-colors-<run id>)."""
    name = adapter_name("colors", hub.store.resolve("colors@1").run_id)
    assert name in bank.heads
    return name


def add_tasks(hub: Hub, tiny_data, tiny_base, *tasks: str) -> None:
    for task in tasks:
        hub.add_task(task, tiny_data[task]["train"], tiny_data[task]["test"], base=tiny_base,
                     **FAST)


def test_untouched_adapters_keep_their_oracle_column_exactly(store_dir, tiny_data, tiny_base):
    from adapterhub_local.base import load_base

    hub = Hub(store_dir)
    bank = bank_for(load_base(tiny_base))  # the very bank the hub scores with
    add_tasks(hub, tiny_data, tiny_base, "colors")
    colors = colors_adapter(bank, hub)
    digests = [bank.digest(colors)]
    for task in ("animals", "moods"):
        add_tasks(hub, tiny_data, tiny_base, task)
        digests.append(bank.digest(colors))
    # Isolated adapters: later tasks move none of colors' weights, so its column cannot move.
    assert len(set(digests)) == 1
    matrix, bwt = oracle(hub)
    assert bwt == 0 and len({row[0] for row in matrix}) == 1


@pytest.mark.parametrize("digest_blind", [False, True], ids=["measured", "counter-check"])
def test_weights_changed_in_memory_show_as_forgetting(store_dir, tiny_data, tiny_base,
                                                      monkeypatch, digest_blind):
    """An adapter altered in memory after its step must lose accuracy in the next row. The
    counter-check makes the score cache blind to the weights (a constant digest) and sees no
    drop: so the first case passes only because the step really scored the weights again."""
    from adapterhub_local.base import load_base

    if digest_blind:
        monkeypatch.setattr(AdapterBank, "digest", lambda self, name: "same weights")
    hub = Hub(store_dir)
    bank = bank_for(load_base(tiny_base))
    add_tasks(hub, tiny_data, tiny_base, "colors", "animals")
    colors_before = oracle(hub)[0][-1][0]
    assert colors_before > 0.5
    # Negating the head's weights flips most of its two-way decisions: accuracy must fall.
    bank.heads[colors_adapter(bank, hub)].weight.data.mul_(-1)
    add_tasks(hub, tiny_data, tiny_base, "moods")
    matrix, bwt = oracle(hub)
    if digest_blind:  # the stale score is reused: forgetting goes unseen
        assert matrix[-1][0] == colors_before and bwt == 0
    else:
        assert matrix[-1][0] < colors_before and bwt < 0


def test_a_new_process_reuses_stored_scores_only_while_they_hold(store_dir, tiny_data,
                                                                 tiny_base, monkeypatch, caplog):
    """A later add-task in a fresh process (a new Hub: nothing cached) reads an earlier task's
    test scores from the store, under the digest of the weights it loaded; a scores file that
    fails its checksum is scored again, with a warning."""
    from adapterhub_local import serving

    add_tasks(Hub(store_dir), tiny_data, tiny_base, "colors")
    computed = []
    original = serving.compute_scores
    monkeypatch.setattr(serving, "compute_scores",
                        lambda bank, adapter, *args: computed.append(adapter) or original(
                            bank, adapter, *args))
    hub = Hub(store_dir)
    add_tasks(hub, tiny_data, tiny_base, "animals")
    assert computed == []  # colors' scores came from the store, animals' from its candidate
    matrix, _ = oracle(hub)
    assert matrix[-1][0] == matrix[0][0]

    version = hub.store.resolve("colors@1")
    scores = hub.store.artifact_folder(version.run_id, serving.SCORES_ARTIFACT)
    scores.write_bytes(scores.read_bytes()[:-4] + b"\0\0\0\0")
    add_tasks(Hub(store_dir), tiny_data, tiny_base, "moods")
    assert computed == [colors_adapter(bank_for_tiny(tiny_base), hub)]  # colors scored again
    assert "fail their checksum" in caplog.text
    assert oracle(hub)[0][-1][0] == matrix[0][0]


def bank_for_tiny(tiny_base) -> AdapterBank:
    from adapterhub_local.base import load_base

    return bank_for(load_base(tiny_base))


def test_cross_scores_are_reused_by_a_new_process_only_under_their_checksum(
        store_dir, tiny_data, tiny_base, monkeypatch):
    """Composed mode's other-adapter scores of one step are kept with it (cross/step_N) and
    taken in by the next step's process, keyed by the weights' digest; a file that fails its
    checksum is ignored."""
    from adapterhub_local.serving import Loader
    from adapterhub_local.sequence import sequence_run

    hub = Hub(store_dir)
    add_tasks(hub, tiny_data, tiny_base, "colors", "animals")
    bank = bank_for_tiny(tiny_base)
    versions = {t: hub.store.resolve(f"{t}@1") for t in ("colors", "animals")}
    wanted = [("colors", 0, "animals"), ("colors", 3, "animals")]
    loader = Loader(hub.store)
    computed = loader.other_probs(bank, versions, wanted)
    run = sequence_run(hub.store)
    sha = loader.save_cross(run, 99)

    calls = []
    real = bank.probabilities
    monkeypatch.setattr(bank, "probabilities", lambda texts, *a, **k: calls.append(len(texts))
                        or real(texts, *a, **k))
    fresh = Loader(hub.store)
    fresh.load_cross(run, 99, sha)
    assert [p.tolist() for p in fresh.other_probs(bank, versions, wanted)] == [
        p.tolist() for p in computed]
    assert calls == []  # nothing left to compute

    stale = Loader(hub.store)
    stale.load_cross(run, 99, "0" * 64)  # not the file's checksum
    stale.other_probs(bank, versions, wanted)
    assert calls == [2]
