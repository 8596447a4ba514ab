"""cli/README.md is generated from the Typer app (`make cli-docs`); this keeps it current. Typer
escapes the help texts for HTML (an apostrophe becomes &#x27;); the reference is plain text."""

import html
import subprocess
import sys
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent.parent / "cli" / "README.md"
REGENERATE = [sys.executable, "-m", "typer", "adapterhub_local.cli", "utils", "docs", "--name",
              "ahl", "--title", "ahl command reference"]


def test_command_reference_is_current(tmp_path):
    out = tmp_path / "README.md"
    subprocess.run([*REGENERATE, "--output", str(out)], check=True, capture_output=True)
    assert html.unescape(out.read_text()) == REFERENCE.read_text(), (
        "cli/README.md is stale: regenerate it with make cli-docs")
    assert "&#" not in REFERENCE.read_text() and "&quot;" not in REFERENCE.read_text()


def test_no_help_text_loses_words_to_rich_markup():
    """Rich reads "[default: 3]" in a help text as a markup tag and drops it from --help and
    from this reference: every option's help must come through whole."""
    from typer.main import get_command

    from adapterhub_local.cli import app

    def commands(group):
        for command in group.commands.values():
            yield from commands(command) if hasattr(command, "commands") else [command]

    for command in commands(get_command(app)):
        for param in command.params:
            assert "[" not in (getattr(param, "help", None) or ""), (command.name, param.name)
    assert "(default: 2e-3)" in REFERENCE.read_text()
