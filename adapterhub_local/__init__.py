"""adapterhub-local: a local-first continual-learning adapter manager.

One frozen pretrained transformer, a parameter-efficient adapter per task, a versioned store on
MLflow with lineage, and forgetting metrics after every new task.
"""

# Importing the package changes nothing in the user's process (environment, warning filters,
# logging): the `ahl` command sets its own defaults (cli.py), a notebook keeps its own.
# It imports no torch, transformers or peft either (seconds): the modules that need them are
# imported inside the functions that train or answer, so that queries (`ahl tasks`, `ahl store
# show`, ...), `--help` and argument errors answer at once. tests/test_imports.py holds to it.

__version__ = "0.1.0"

from adapterhub_local.errors import AhlError  # noqa: E402
from adapterhub_local.hub import Hub  # noqa: E402

__all__ = ["AhlError", "Hub", "__version__"]
