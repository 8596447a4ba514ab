"""Generate tasks on a tiny random causal Llama: every causal-LM method learns a prompt ->
completion task, reloads in a fresh process and generates; a store mixing a classify task and
two generate tasks routes each input to its adapter; mixed-batch decoding equals one row at a
time; the score matrices carry each task's metric; bad input is one line and changes nothing."""

import json
import subprocess
import sys

import pytest

from adapterhub_local import Hub
from adapterhub_local.base import load_base
from adapterhub_local.generation import greedy, prompt_ids
from adapterhub_local.inference import bank_for
from adapterhub_local.methods import METHODS, get_method
from adapterhub_local.scoring import exact_match
from conftest import (file_digest, perturbed_adapter, plain_greedy, run_export_cards, tiny_rows,
                      write_csv)
from test_cli import ahl

GENERATE = {"epochs": 15, "lr": 1e-2, "batch_size": 16, "method_args": {"layers": "all", "r": 16}}
CAUSAL_METHODS = [m for m in METHODS if "llama" in METHODS[m].architectures]


@pytest.fixture(scope="session")
def gen_data(tmp_path_factory) -> dict:
    """colors and animals as generate tasks (the prompt's words -> the word naming its kind),
    moods as a classify task: {task: (train, test)}."""
    folder = tmp_path_factory.mktemp("gen_data")
    header = {"colors": ("prompt", "completion"), "animals": ("prompt", "completion"),
              "moods": ("text", "label")}
    return {task: tuple(write_csv(folder / f"{task}_{split}.csv", tiny_rows(task, n, seed), columns)
                        for split, n, seed in (("train", 40, 1), ("test", 10, 2)))
            for task, columns in header.items()}


@pytest.fixture(scope="session")
def mixed_store(tmp_path_factory, store_template, gen_data, tiny_llama):
    """moods (classify), then colors_gen and animals_gen (generate), on the tiny Llama."""
    import shutil

    folder = tmp_path_factory.mktemp("mixed") / "store"
    shutil.copytree(store_template, folder)
    hub = Hub(folder)
    hub.add_task("moods", *gen_data["moods"], base=tiny_llama, **GENERATE)
    for task in ("colors", "animals"):
        hub.add_task(f"{task}_gen", *gen_data[task], kind="generate", **GENERATE)
    hub.drawing.join()
    return folder


def test_a_store_mixing_kinds_routes_each_input_to_its_adapter(mixed_store, gen_data):
    hub = Hub(mixed_store)
    tasks = {row["task"]: row for row in json.loads(ahl("tasks", "--json", "--store", mixed_store).stdout)}
    assert {t: (r["kind"], r["metric"]) for t, r in tasks.items()} == {
        "moods": ("classify", "accuracy"), "colors_gen": ("generate", "exact_match"),
        "animals_gen": ("generate", "exact_match")}

    metrics = json.loads(ahl("metrics", "--json", "--store", mixed_store).stdout)
    assert metrics["tasks"] == ["moods", "colors_gen", "animals_gen"]
    assert metrics["metrics"] == {"moods": "accuracy", "colors_gen": "exact_match",
                                  "animals_gen": "exact_match"}
    oracle = metrics["modes"]["oracle"]["matrix"]
    assert oracle[0][1:] == [None, None] and oracle[2][0] == oracle[0][0]
    assert set(metrics["soft"]) == {"colors_gen", "animals_gen"}

    # Each generate column is its test split's exact match, as predict answers it.
    import csv

    for column, task in ((1, "colors"), (2, "animals")):
        with open(gen_data[task][1], encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        given = hub.predict([r["prompt"] for r in rows], task=f"{task}_gen")
        score = sum(exact_match(a["completion"], r["completion"]) for a, r in zip(given, rows))
        assert oracle[2][column] == pytest.approx(score / len(rows), abs=1e-6)
        assert oracle[2][column] >= 0.6  # learnt: a constant answer scores 1/2 or 1/3
        assert 0 <= metrics["soft"][f"{task}_gen"]["oracle"] <= 1

    texts = ["the crimson here today", "a puppy near the nest", "very sad gloom here"]
    for mode in ("routed", "composed"):
        answers = json.loads(ahl("predict", *texts, "--mode", mode, "--json", "--store",
                                 mixed_store).stdout)
        assert [a["task"] for a in answers] == ["colors_gen", "animals_gen", "moods"], answers
        assert all(isinstance(a["completion"], str) and "label" not in a for a in answers[:2])
        assert answers[2]["label"] in ("happy", "sad") and "completion" not in answers[2]
        assert set(answers[0]) >= {"text", "task", "completion", "score", "adapters"}


@pytest.fixture(scope="module")
def causal_store(tmp_path_factory, store_template, gen_data, tiny_llama):
    """Every causal-LM method trained on animals as a generate task named after it."""
    import shutil

    store = tmp_path_factory.mktemp("causal") / "store"
    shutil.copytree(store_template, store)
    hub = Hub(store)
    for method in CAUSAL_METHODS:
        result = hub.add_task(method.replace("-", "_"), *gen_data["animals"], kind="generate",
                              base=tiny_llama, method=method, epochs=3, lr=2e-2)
        assert result["kind"] == "generate" and result["method"] == method
        assert hub.show(result["task"])["method"] == method
    return store


def test_every_causal_lm_method_learns_a_generate_task_and_reloads(causal_store):
    store_dir = causal_store
    hub = Hub(store_dir)
    prompt = "the kitten near the nest"
    here = {m: hub.predict([prompt], task=m.replace("-", "_"))[0] for m in CAUSAL_METHODS}
    code = ("import json, sys\nfrom adapterhub_local import Hub\nhub = Hub(sys.argv[1])\n"
            "print(json.dumps({t: hub.predict([sys.argv[2]], task=t)[0] for t in sys.argv[3:]}))")
    done = subprocess.run([sys.executable, "-c", code, str(store_dir), prompt,
                           *[m.replace("-", "_") for m in CAUSAL_METHODS]],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(done.stdout.splitlines()[-1])
    for method, answer in here.items():
        again = fresh[method.replace("-", "_")]
        assert isinstance(again["completion"], str)
        # The same weights decode the same tokens; AdaLoRA's saved files prune its ranks.
        if get_method(method).reloads_exactly:
            assert again["completion"] == answer["completion"], method


def test_every_generate_export_decodes_without_ahl_as_ahl_does(causal_store, tiny_llama,
                                                                gen_data, tmp_path):
    """The card's code (AutoModelForCausalLM, the adapter, greedy `generate`), run where ahl
    cannot be imported, writes the completions ahl writes from the store's files."""
    from adapterhub_local.inference import adapter_name

    hub = Hub(causal_store)
    bank = bank_for(load_base(tiny_llama))
    prompts = [text for text, _ in tiny_rows("animals", 1, seed=2)]
    jobs, wanted = [], []
    tasks = [method.replace("-", "_") for method in CAUSAL_METHODS]
    for task in tasks:  # ahl answers from the stored files, as exported
        bank.remove_adapter(adapter_name(task, hub.store.resolve(task).run_id))
    for task in tasks:
        hub.export(task, tmp_path / task)
        wanted.append([answer["completion"] for answer in hub.predict(prompts, task=task)])
        jobs.append({"folder": str(tmp_path / task), "base": tiny_llama, "texts": prompts})
    got = run_export_cards(jobs)
    assert got == wanted
    # Every adapter changes what the bare base says: an export that lost its weights would fail.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    budget = max(json.loads((tmp_path / t / "generate.json").read_text())["max_new_tokens"]
                 for t in tasks)
    bare = plain_greedy(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(),
                        AutoTokenizer.from_pretrained(tiny_llama), prompts, budget)
    # Adaption prompts (zero gates) and IA3 (unit scales) start as the identity and three epochs
    # leave their greedy tokens as the base's; test_methods checks that their exports load, on
    # probabilities, and the backbone renaming here is the same for every method.
    changed = [m for m, completions in zip(CAUSAL_METHODS, wanted) if completions != bare]
    assert set(CAUSAL_METHODS) - set(changed) <= {"adaption-prompt", "ia3"}, (bare, wanted)


def test_mixed_batch_generation_equals_one_row_at_a_time(tiny_llama):
    base = load_base(tiny_llama)
    bank = bank_for(base)
    made = []
    methods = ["lora", "prefix-tuning", "prompt-tuning", "ia3", "bottleneck", "adaption-prompt",
               "loha", "lora"]
    for seed, method in enumerate(methods):
        made.append(perturbed_adapter(bank, f"gen-mix-{seed}-{method}", method, [], seed, 0.5,
                                      {"max_new_tokens": 6}))
    try:
        texts = ["the red here", "a very long prompt of the cat near the nest today",
                 "dog", "blue and azure near here today"]
        prompts = prompt_ids(base, [texts[i % len(texts)] for i in range(2 * len(made))])
        # One adapter a row (routed), and rows that mix two or three (composed).
        mixtures = [[(made[i % len(made)], 1.0)] for i in range(len(made))]
        mixtures += [[(made[i % len(made)], 0.6), (made[(i + 3) % len(made)], 0.4)]
                     for i in range(len(made) - 1)]
        mixtures += [[(made[0], 0.5), (made[1], 0.3), (made[4], 0.2)]]
        together = greedy(bank, prompts, mixtures, 6)
        alone = [greedy(bank, [p], [m], 6)[0] for p, m in zip(prompts, mixtures)]
        assert [g.tokens for g in together] == [g.tokens for g in alone]
        for got, want in zip(together, alone):
            assert got.score == pytest.approx(want.score, rel=1e-4)
        # The adapters really differ: their completions of one prompt are not all the same.
        firsts = [greedy(bank, prompts[:1], [[(name, 1.0)]], 6)[0].tokens for name in made]
        assert len({tuple(t) for t in firsts}) > len(made) // 2
    finally:
        for name in made:
            bank.remove_adapter(name)


@pytest.mark.parametrize("case", ["encoder base", "no prompt column", "empty completion",
                                  "too long", "classify spec", "label column", "budget",
                                  "kind change"])
def test_bad_generate_input_is_one_line_and_changes_nothing(case, store_dir, tmp_path, gen_data,
                                                            tiny_base, tiny_llama):
    train = gen_data["animals"][0]
    args = ["add-task", "animals_gen", "--kind", "generate", "--base", tiny_llama]
    if case == "encoder base":
        args[-1], message = tiny_base, "without an output layer for text"
    elif case == "no prompt column":
        train = gen_data["moods"][0]
        message = "has no column 'prompt' (columns found: text, label): pass --prompt-column"
    elif case == "empty completion":
        train = write_csv(tmp_path / "empty.csv", [("the cat", "cat"), ("a dog", "")],
                          ("prompt", "completion"))
        message = "row 2 of empty.csv has a prompt but an empty 'completion'"
    elif case == "too long":
        rows = tiny_rows("animals", 5) + [(" ".join(["the cat"] * 10), "cat")]
        train = write_csv(tmp_path / "long.csv", rows, ("prompt", "completion"))
        args += ["--max-length", "16"]
        message = "are 22 tokens, more than 16 (--max-length 16"
    elif case == "label column":
        args += ["--label-column", "completion"]
        message = "--label-column does not apply to a generate task"
    elif case == "kind change":  # animals_gen is a classify task already
        Hub(store_dir).add_task("animals_gen", *gen_data["moods"], base=tiny_llama, epochs=1)
        message = "task 'animals_gen' is a classify task scored by accuracy"
    else:
        spec = tmp_path / "task.toml"
        if case == "budget":
            spec.write_text(f'kind = "generate"\ntrain = "{train}"\nmax_new_tokens = "ten"\n',
                            encoding="utf-8")
            message = "max_new_tokens = 'ten' in the spec is not a whole number"
            args = ["add-task", "--spec", spec, "--base", tiny_llama]
        else:
            spec.write_text(f'train = "{gen_data["moods"][0]}"\n', encoding="utf-8")
            args = ["add-task", "--spec", spec, "--kind", "generate", "--base", tiny_llama]
            message = "describes a classify task but --kind generate was given"
    if "--spec" not in args:
        args += ["--train", train]
    before = file_digest(store_dir)
    result = ahl(*args, "--store", store_dir, ok=False)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr
    assert file_digest(store_dir) == before


def test_completions_stream_to_files_and_come_from_the_packaged_model(mixed_store, tmp_path):
    import shutil

    import mlflow
    import pandas as pd
    import pyarrow.parquet as pq

    store = tmp_path / "store"
    shutil.copytree(mixed_store, store)
    texts = ["the crimson here today", "a puppy near the nest", "very sad gloom here", "blue"]
    expected = [(a["task"], a.get("label"), a.get("completion")) for a in Hub(store).predict(texts)]
    assert {e[2] is not None for e in expected} == {True, False}  # both kinds answered
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts), encoding="utf-8")
    for output in (tmp_path / "out.jsonl", tmp_path / "out.parquet"):
        ahl("predict", "--file", source, "--output", output, "--store", store)
        written = ([json.loads(line) for line in output.read_text().splitlines()]
                   if output.suffix == ".jsonl" else pq.read_table(output).to_pylist())
        assert [(a["task"], a.get("label"), a.get("completion")) for a in written] == expected

    ahl("store", "package", "--store", store)
    version = Hub(store).store.alias_version("_serving", "production")
    folder = mlflow.artifacts.download_artifacts(artifact_uri=version.source,
                                                 dst_path=str(tmp_path / "model"))
    served = mlflow.pyfunc.load_model(folder).predict(pd.DataFrame({"text": texts}))
    assert list(zip(served["task"], served["label"], served["completion"])) == expected


def test_a_generate_adapter_refuses_another_chat_template(tiny_llama, tmp_path):
    from adapterhub_local.errors import AhlError
    from adapterhub_local.generation import template_digest

    base = load_base(tiny_llama)
    bank = bank_for(base)
    method = get_method("lora")
    bank.add_adapter("gen-template", method.build(method.options(), base), [], method,
                     {"template": template_digest(base), "max_new_tokens": 4})
    try:
        bank.save_adapter("gen-template", tmp_path)
    finally:
        bank.remove_adapter("gen-template")
    settings = json.loads((tmp_path / "generate.json").read_text())
    (tmp_path / "generate.json").write_text(json.dumps({**settings, "template": "0" * 64}))
    with pytest.raises(AhlError, match="trained with another chat template"):
        bank.load_adapter("gen-template-again", tmp_path, method)
    assert "gen-template-again" not in bank  # the bank is as it was
    (tmp_path / "generate.json").write_text(json.dumps(settings))
    bank.load_adapter("gen-template-again", tmp_path, method)
    assert bank.generate["gen-template-again"]["max_new_tokens"] == 4
    bank.remove_adapter("gen-template-again")
