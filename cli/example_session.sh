#!/usr/bin/env bash
# An example session: two tasks, a second version of the first, and the queries a user runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export AHL_STORE=${AHL_STORE:-/tmp/ahl-example-store}
ahl add-task chat_language --spec tasks/chat_language.toml       # version 1
ahl add-task wordnet_actions --spec tasks/wordnet_actions.toml   # a second task
ahl add-task chat_language --spec tasks/chat_language.toml --epochs 4   # version 2, parent 1
ahl tasks
ahl metrics                        # accuracy matrix; oracle BWT stays 0
ahl store versions chat_language
ahl store show chat_language@2 --json
