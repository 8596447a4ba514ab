"""The packaged serving set over HTTP (`mlflow models serve`) beside Hub.predict in one process.

On a store that ran the bundled sequence with ahl's defaults (made with `ahl demo` under --work
when missing): `ahl store package`, then the time until the server answers /ping, then mixed
test texts of every task answered both ways in requests of --batch texts (and one text a
request, for latency), the two alternating, answers compared. The HTTP peer pays JSON and a
loopback round trip per request; it is what every MLflow deployment target runs.

    .venv/bin/python bench/serving.py [--work bench-out/serving] [--per-task 100] [--batch 100]
"""

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from routing import store_for  # noqa: E402
from services import mlflow_model_server  # noqa: E402

from adapterhub_local import Hub  # noqa: E402
from adapterhub_local.serving import TEST_ARTIFACT  # noqa: E402


def mixed_texts(hub: Hub, per_task: int) -> list[str]:
    """The first per_task test texts of every task, interleaved."""
    splits = [hub.store.read_json_artifact(hub.store.current_version(t["task"]).run_id,
                                           TEST_ARTIFACT)["texts"][:per_task] for t in hub.tasks()]
    return [s[i] for i in range(per_task) for s in splits if i < len(s)]


def over_http(url: str, texts: list[str], batch: int) -> list[dict]:
    answers = []
    for start in range(0, len(texts), batch):
        body = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts[start:start + batch]]}}
        request = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            answers += json.loads(response.read())["predictions"]
    return answers


def in_process(hub: Hub, texts: list[str], batch: int) -> list[dict]:
    return [a for start in range(0, len(texts), batch) for a in hub.predict(texts[start:start + batch])]


def timed(fn) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    answers = fn()
    return time.perf_counter() - started, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "serving")
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    store = store_for(ROOT / "tasks", args.work.resolve())
    hub = Hub(store)
    seconds, info = timed(hub.package)
    print(f"ahl store package: {seconds:.1f} s ({'new version' if info['new'] else 'unchanged'} "
          f"{info['model_uri']})")
    texts = mixed_texts(hub, args.per_task)
    in_process(hub, texts[:8], args.batch)  # the base and adapters loaded before timing
    started = time.perf_counter()
    with mlflow_model_server(info["model_uri"], info["tracking_uri"], args.work / "serve.log") as url:
        print(f"mlflow models serve: answers /ping after {time.perf_counter() - started:.1f} s")
        over_http(url, texts[:8], args.batch)  # its first request loads nothing more
        rates = {"http": [], "hub": []}
        for round_ in range(2):  # alternate which goes first
            order = ["http", "hub"] if round_ == 0 else ["hub", "http"]
            for who in order:
                seconds, answers = timed(lambda: over_http(url, texts, args.batch) if who == "http"
                                         else in_process(hub, texts, args.batch))
                rates[who].append(len(texts) / seconds)
                if who == "http":
                    http_answers = answers
                else:
                    hub_answers = answers
        one = [timed(lambda: over_http(url, [t], 1))[0] for t in texts[:50]]
    same = sum((a["task"], a["label"]) == (b["task"], b["label"]) for a, b in zip(http_answers, hub_answers))
    print(f"{len(texts)} mixed texts, requests of {args.batch}: HTTP {max(rates['http']):.0f} texts/s, "
          f"Hub.predict {max(rates['hub']):.0f} texts/s (HTTP/Hub {max(rates['http']) / max(rates['hub']):.2f}x; "
          f"best of 2 each)")
    print(f"same task and label: {same}/{len(texts)}")
    one.sort()
    print(f"one text a request: median {1000 * one[len(one) // 2]:.0f} ms, "
          f"p90 {1000 * one[int(len(one) * 0.9)]:.0f} ms")


if __name__ == "__main__":
    main()
