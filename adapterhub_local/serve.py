"""The serving set as an MLflow pyfunc model: `ahl store package` logs and registers it, and
whatever runs MLflow models runs it (`mlflow models serve`, `mlflow.pyfunc.load_model`,
`mlflow.pyfunc.spark_udf`), answering as `ahl predict --json` does.

The model's artifacts are a folder that travels with it: the router, each serving adapter with
its head and label map, and serving.json (the base's name and fingerprint, each task's version
and method). The base is not copied: it is found by name where the model loads
(`model_config={"base": PATH}` points elsewhere) and must have the recorded fingerprint; it
runs on `model_config={"device": ...}`, else $AHL_DEVICE, else the best device there. The
model is MLflow's "model from code" (MODEL_CODE): loading it unpickles nothing.
"""

import json
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd

from adapterhub_local.errors import AhlError
from adapterhub_local.store import PRODUCTION, TAG

SERVING_MODEL = "_serving"  # the packages' registered model; task names cannot start with "_"
MODEL_ARTIFACT, SERVING_FOLDER, SERVING_META = "model", "serving", "serving.json"
PACKAGE_DIGEST = f"{TAG}package.versions.sha256"  # which serving set a package holds
PACKAGE_FORMAT, FORMAT_TAG = "2", f"{TAG}package.format"  # raised when the model's interface changes
MODEL_CODE = '''"""The file MLflow runs to load a packaged adapterhub-local serving set."""
import mlflow

from adapterhub_local.serve import ServingSetModel

mlflow.models.set_model(ServingSetModel())
'''
ANSWER_FIELDS = ["text", "task", "label", "completion", "score", "adapters", "reason", "error"]
ANSWER_SCHEMA = ("text string, task string, label string, completion string, score double, "
                 "adapters array<struct<task: string, version: bigint, weight: double>>, "
                 "reason string, error string")
REQUIRED = ["adapterhub-local", "torch", "transformers", "peft", "safetensors", "scikit-learn",
            "scipy", "mlflow", "pandas"]


def package(store, loader) -> dict:
    """Log the serving set as a pyfunc model and make it the `production` version of the store's
    `_serving` model; when that version already holds this serving set, it is kept (callers
    hold the store's lease). {"model_uri", "tracking_uri", "version", "tasks", "new"}."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    from adapterhub_local.evaluation import COMPOSE_TOP_K
    from adapterhub_local.serving import digest_of_router, serving_router

    router = serving_router(store)
    if router is None:
        raise AhlError(f"store {store.location} has nothing serving to package: add a task with "
                       "ahl add-task NAME --train FILE")
    digest = digest_of_router(router)
    current = store.alias_version(SERVING_MODEL, PRODUCTION)
    if current is not None and current.tags.get(PACKAGE_DIGEST) == digest and \
            current.tags.get(FORMAT_TAG) == PACKAGE_FORMAT:
        return package_result(store, current, False)
    base_name, base_sha = store.base_binding()
    with tempfile.TemporaryDirectory() as tmp:
        serving = Path(tmp) / SERVING_FOLDER
        tasks = copy_serving_set(store, loader, router, serving)
        (serving / SERVING_META).write_text(json.dumps({
            "base": {"name": base_name, "sha256": base_sha}, "tasks": tasks}), encoding="utf-8")
        code = Path(tmp) / "ahl_serving_model.py"
        code.write_text(MODEL_CODE, encoding="utf-8")
        params = ParamSchema([ParamSpec("mode", "string", "routed"),
                              ParamSpec("top_k", "long", COMPOSE_TOP_K),
                              ParamSpec("format", "string", "columns")])
        with warnings.catch_warnings():  # MLflow's advice on what to log: not for our users
            warnings.filterwarnings("ignore", message=".*input example was not provided",
                                    category=UserWarning)
            mlflow.pyfunc.save_model(
                path=Path(tmp) / MODEL_ARTIFACT, python_model=str(code),
                artifacts={SERVING_FOLDER: str(serving)}, model_config={"base": "", "device": ""},
                signature=ModelSignature(inputs=None, params=params),
                pip_requirements=requirements(base_name))
        run_id = store.create_finished_run(SERVING_MODEL, {f"{TAG}kind": "package"})
        store.log_artifacts(run_id, Path(tmp) / MODEL_ARTIFACT, MODEL_ARTIFACT)
    version = store.register(SERVING_MODEL, run_id, MODEL_ARTIFACT, tags={
        PACKAGE_DIGEST: digest, FORMAT_TAG: PACKAGE_FORMAT, f"{TAG}versions": json.dumps({t: e["version"] for t, e in tasks.items()}),
        f"{TAG}base.sha256": base_sha})
    store.set_alias(SERVING_MODEL, PRODUCTION, version.version)
    return package_result(store, version, True)


def package_result(store, version, new: bool) -> dict:
    return {"model_uri": f"models:/{store.model_name(SERVING_MODEL)}/{version.version}",
            "tracking_uri": store.uri, "version": int(version.version),
            "tasks": json.loads(version.tags.get(f"{TAG}versions", "{}")), "new": new}


def copy_serving_set(store, loader, router, folder: Path) -> dict:
    """The router's and each serving adapter's files (checked against their checksums) into
    folder/router and folder/adapters/TASK; {task: {"version", "method", "adapter"}}."""
    from adapterhub_local.inference import adapter_name
    from adapterhub_local.router import ROUTER_META

    loader.copy_version(router, folder / "router")
    versions = json.loads((folder / "router" / ROUTER_META).read_text(encoding="utf-8"))["versions"]
    tasks = {}
    for task, number in versions.items():
        version = store.get_version(task, number)
        loader.copy_version(version, folder / "adapters" / task)
        tasks[task] = {"version": int(number), "method": version.tags.get(f"{TAG}method", "lora"),
                       "adapter": adapter_name(task, version.run_id)}
    return tasks


def requirements(base_name: str) -> list[str]:
    """This environment's versions of what the model imports, plus the base's package when
    the base ships in one."""
    from adapterhub_local.base import ALIASES, PACKAGED_BASES

    wanted = list(REQUIRED)
    packaged = PACKAGED_BASES.get(ALIASES.get(base_name.lower(), base_name.lower()))
    if packaged:
        wanted.append(packaged[1].replace("_", "-"))
    return [f"{name}=={metadata.version(name)}" for name in wanted]


class ServingSetModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model: routes and answers texts with the packaged router and adapters."""

    def load_context(self, context) -> None:
        from adapterhub_local.base import load_base
        from adapterhub_local.device import resolve_device
        from adapterhub_local.inference import bank_for
        from adapterhub_local.methods import get_method
        from adapterhub_local.router import GaussianRouter

        folder = Path(context.artifacts[SERVING_FOLDER])
        meta = json.loads((folder / SERVING_META).read_text(encoding="utf-8"))
        recorded = meta["base"]
        config = context.model_config or {}
        wanted = config.get("base") or recorded["name"]
        base = load_base(wanted, resolve_device(config.get("device") or None))  # $AHL_DEVICE, auto
        if base.sha256 != recorded["sha256"]:
            raise AhlError(f"this model was packaged for base {recorded['name']} (sha256 "
                           f"{recorded['sha256'][:12]}), not {wanted} (sha256 {base.sha256[:12]}): "
                           "load it with that base, e.g. model_config={'base': PATH}")
        self.bank = bank_for(base)
        self.router = GaussianRouter.load(folder / "router")
        self.adapters, self.versions = {}, {}
        for task, entry in meta["tasks"].items():
            self.bank.load_adapter(entry["adapter"], folder / "adapters" / task,
                                   get_method(entry["method"]))
            self.adapters[task], self.versions[task] = entry["adapter"], entry["version"]

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """A DataFrame with predict --json's fields, a row per input: `model_input` is a
        DataFrame with a `text` column, or a list of strings (MLflow reads the DataFrame hint
        as "validate nothing"). params: mode (routed, the default, or composed, as ahl
        predict --mode), top_k, and format: "columns" (the default), or "json", one column
        `answer` of each row's JSON (what spark_udf below parses). A cell that is not a string
        is answered with an "error"; the others as usual."""
        from mlflow.exceptions import MlflowException

        from adapterhub_local.evaluation import COMPOSE_TOP_K
        from adapterhub_local.hub import check_predict_options
        from adapterhub_local.inference import answer_routes, route_texts

        params = params or {}
        try:
            cells = texts_of(model_input)
            try:
                top_k = int(params.get("top_k", COMPOSE_TOP_K))
            except (TypeError, ValueError):
                raise AhlError(f"top_k must be a whole number, got {params['top_k']!r}: try 2") from None
            mode = check_predict_options(params.get("mode", "routed"), top_k)
        except AhlError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None
        good = [i for i, c in enumerate(cells) if isinstance(c, str)]
        texts = [cells[i] for i in good]
        routes, states = route_texts(self.bank, self.router, texts, 1 if mode == "pick" else top_k)
        answered = answer_routes(self.bank, texts, routes, states, self.adapters, self.versions, {})
        empty = dict.fromkeys(ANSWER_FIELDS)  # a field an answer lacks is None
        rows = [{**empty, "score": 0.0, "adapters": [], "error": cell_error(i, c)}
                for i, c in enumerate(cells)]
        for i, result in zip(good, answered):
            rows[i] = {**empty, **result}
        if params.get("format") == "json":
            return pd.DataFrame({"answer": [json.dumps(row) for row in rows]})
        # Object columns: a missing field stays None (pandas would make it NaN, or a float).
        return pd.DataFrame({k: pd.Series([r[k] for r in rows], dtype=float if k == "score" else object)
                             for k in ANSWER_FIELDS})


def texts_of(model_input) -> list:
    """The cells to answer: a DataFrame's `text` column, or a list (or array) of strings."""
    if isinstance(model_input, pd.DataFrame):
        if "text" not in model_input.columns:
            raise AhlError(f"the input has no 'text' column (columns: "
                           f"{', '.join(map(str, model_input.columns)) or 'none'}): send texts in "
                           "a column named text")
        model_input = model_input["text"]
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    if not isinstance(model_input, (list, tuple)):
        raise AhlError(f"cannot read texts from a {type(model_input).__name__}: send a DataFrame "
                       "with a text column, or a list of strings")
    return list(model_input)


def cell_error(row: int, cell) -> str | None:
    """Why a cell cannot be answered (None when it is a string)."""
    if isinstance(cell, str):
        return None
    if cell is None or cell != cell:  # a missing value: None, or pandas' NaN
        return f"row {row} is empty: send a text in every row"
    return f"row {row} is a {type(cell).__name__}, not a string: send texts as strings"


def spark_udf(spark, model_uri: str, mode: str = "routed", top_k: int = 2):
    """A function of a text column giving each row's answer as a struct (ANSWER_SCHEMA):
        answer = spark_udf(spark, "models:/ahl._serving@production")
        frame.withColumn("answer", answer("text")).select("text", "answer.*")
    It runs the packaged model through mlflow.pyfunc.spark_udf, answers coming back as JSON:
    MLflow's struct results turn a missing string (an abstained row's task) into "None"."""
    from pyspark.sql import functions as F

    udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type="string", env_manager="local",
                                  params={"mode": mode, "top_k": top_k, "format": "json"})
    return lambda column: F.from_json(udf(F.struct(F.col(column).alias("text"))), ANSWER_SCHEMA)
