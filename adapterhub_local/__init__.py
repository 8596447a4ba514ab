"""adapterhub-local: a local-first continual-learning adapter manager.

One frozen pretrained transformer, a parameter-efficient adapter per task, a versioned store on
MLflow with lineage, and forgetting metrics after every new task.
"""

import logging
import os

# Nothing in this package may reach the network: set the offline switches before transformers,
# datasets or mlflow are imported (users can still override them in their environment).
for _name, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                      "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                      "TOKENIZERS_PARALLELISM": "false",
                      "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                      # A tracking server that is down should fail in seconds, not after
                      # MLflow's default of 7 retries with exponential backoff (minutes).
                      "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                      "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}.items():
    os.environ.setdefault(_name, _value)

# bitsandbytes (QLoRA, LoftQ) warns at import, on every command, that an optional CPU kernel
# package is missing; it then uses its plain CPU path, which is what we want.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__version__ = "0.1.0"

from adapterhub_local.errors import AhlError  # noqa: E402
from adapterhub_local.hub import Hub  # noqa: E402

__all__ = ["AhlError", "Hub", "__version__"]
