"""Routed batch inference on Spark (`mlflow.pyfunc.spark_udf` over the packaged serving set)
with 1 and 2 executors (local[1], local[2]) beside Hub.predict in one process.

On a store that ran the bundled sequence with ahl's defaults (made with `ahl demo` under --work
when missing): mixed test texts of every task, repeated to --rows, answered by each, the order
alternated, answers compared. Spark pays a JVM, Arrow batches and a model load per Python
worker; its peer is one process using every core. Needs the `spark` extra and Java.

    .venv/bin/python bench/spark_predict.py [--work bench-out/serving] [--rows 3000]
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable

ROOT = Path(__file__).resolve().parent.parent

from routing import store_for  # noqa: E402
from serving import mixed_texts  # noqa: E402

from adapterhub_local import Hub  # noqa: E402

def on_spark(cores: int, model: str, texts: list[str]) -> tuple[float, list[tuple]]:
    """(seconds for the answers, answers) on a fresh local[cores] session; the session's start
    and the first model load are not counted (a warm-up batch)."""
    from pyspark.sql import SparkSession

    from adapterhub_local.serve import spark_udf

    spark = (SparkSession.builder.master(f"local[{cores}]").appName("ahl-bench")
             .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1")
             .config("spark.python.worker.reuse", "true")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true").getOrCreate())
    try:
        answer = spark_udf(spark, model)
        frame = lambda rows: spark.createDataFrame(list(enumerate(rows)), "id long, text string") \
            .repartition(cores)  # noqa: E731
        frame(texts[: 8 * cores]).withColumn("a", answer("text")).collect()  # warm-up
        started = time.perf_counter()
        rows = frame(texts).withColumn("a", answer("text")).select("id", "a.*").collect()
        seconds = time.perf_counter() - started
    finally:
        spark.stop()
    return seconds, [(r["task"], r["label"]) for r in sorted(rows, key=lambda r: r["id"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "serving")
    parser.add_argument("--rows", type=int, default=3000)
    args = parser.parse_args()
    hub = Hub(store_for(ROOT / "tasks", args.work.resolve()))
    hub.package()
    model = hub.store.alias_version("_serving", "production").source
    base = mixed_texts(hub, 100)
    texts = [base[i % len(base)] for i in range(args.rows)]
    hub.predict(texts[:8])  # loaded before timing
    results = {}
    for who in ("hub", "spark-1", "spark-2", "spark-2", "spark-1", "hub"):  # alternated
        if who == "hub":
            started = time.perf_counter()
            answers = [(a["task"], a["label"]) for a in hub.predict(texts)]
            seconds = time.perf_counter() - started
        else:
            seconds, answers = on_spark(int(who[-1]), model, texts)
        results.setdefault(who, []).append((len(texts) / seconds, answers))
    expected = results["hub"][0][1]
    print(f"{len(texts)} mixed texts (this machine: {os.cpu_count()} cores), best of 2 each:")
    hub_rate = max(r for r, _ in results["hub"])
    for who, runs in results.items():
        rate = max(r for r, _ in runs)
        same = sum(a == b for a, b in zip(runs[0][1], expected))
        print(f"  {who:<8} {rate:7.1f} texts/s  ({rate / hub_rate:.2f}x Hub.predict; same task "
              f"and label {same}/{len(texts)})")


if __name__ == "__main__":
    main()
