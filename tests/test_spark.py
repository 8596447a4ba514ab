"""The packaged serving set through `mlflow.pyfunc.spark_udf` on a local[2] Spark session:
routed batch inference on Spark answers row for row as Hub.predict does. PySpark (the `spark`
extra) and Java are needed; without them this skips, unless AHL_REQUIRE_SERVICES=1."""

import importlib.util
import os
import shutil
import sys

import pytest

from adapterhub_local import Hub
from conftest import tiny_rows
from services import missing

@pytest.fixture(scope="module")
def spark():
    if importlib.util.find_spec("pyspark") is None:
        missing("PySpark", "pip install -e '.[spark]'")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        missing("Java", "apt-get install default-jre-headless")
    from pyspark.sql import SparkSession

    # Spark's Python workers run this interpreter (with ahl installed), not the first python3 on PATH.
    saved = {k: os.environ.get(k) for k in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    os.environ.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    session = (SparkSession.builder.master("local[2]").appName("ahl-test")
               .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true").getOrCreate())
    try:
        yield session
    finally:
        session.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_spark_udf_answers_like_hub_predict(spark, two_task_store, tmp_path):
    from adapterhub_local.serve import spark_udf

    store = tmp_path / "store"
    shutil.copytree(two_task_store, store)
    hub = Hub(store)
    hub.package()
    model = hub.store.alias_version("_serving", "production").source
    mixed = tiny_rows("colors", 500, seed=11) + tiny_rows("animals", 330, seed=12)
    texts = [text for text, _ in mixed][:1990] + ["", "   "] + ["zebra quartz"] * 8
    assert len(texts) == 2000
    frame = spark.createDataFrame(list(enumerate(texts)), "id long, text string").repartition(4)
    answer = spark_udf(spark, model)
    rows = frame.withColumn("a", answer("text")).select("id", "a.*").orderBy("id").collect()
    expected = hub.predict(texts)
    assert [r["id"] for r in rows] == list(range(2000))
    assert [(r["text"], r["task"], r["label"], r["reason"], r["error"]) for r in rows] == \
        [(e["text"], e["task"], e["label"], e.get("reason"), None) for e in expected]
    assert [[(a["task"], a["version"]) for a in r["adapters"]] for r in rows] == \
        [[(a["task"], a["version"]) for a in e["adapters"]] for e in expected]
    assert [r["score"] for r in rows] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    assert {e.get("reason") for e in expected} >= {None, "empty text"}
