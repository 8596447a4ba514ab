"""Rebuild the second, confusable task sequence (development, not the demo) from offline sources.

Six tasks from two broad domains whose texts look alike across tasks: software documentation
(Python docstrings, C manual pages) and short English lines (chatbot dialogue, fortune cookies).
Two tasks share a label set (pydoc_topic and manual_topic: the same five topics in two registers).

Sources (see LICENSES.md):
  Python 3.11 standard library docstrings   the interpreter itself
  numpy, torch, scikit-learn, transformers   the versions in ahl's .venv (PyPI)
  Linux man-pages 6.03                       Debian `manpages`, `manpages-dev`
  chatterbot-corpus 1.3.3                    PyPI (pass the folder of its `data/`)
  fortune cookies                            Debian `fortunes`

    apt-get install manpages manpages-dev fortunes
    pip download --no-deps chatterbot-corpus && unzip chatterbot_corpus-*.whl -d cbc
    .venv/bin/python tasks/confusable/build_confusable.py --chatterbot cbc/chatterbot_corpus/data

Writes tasks/confusable/data/<task>/{train,test}.csv, the task specs and sequence.toml; rows are
sentences, deduplicated across the sequence, split as tasks/build_tasks.py splits them.
"""

import ast
import gzip
import importlib
import inspect
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from build_tasks import (CHATTERBOT_LICENSE, FORTUNES_LICENSE, builder_args, clean,  # noqa: E402
                         read_chatterbot, read_fortunes, write_sequence)

MAN = Path("/usr/share/man")
# Topics shared by pydoc_topic and manual_topic: stdlib modules and C headers of each.
PY_TOPICS = {
    "files": ["os", "os.path", "shutil", "pathlib", "io", "_pyio", "tempfile", "glob", "fnmatch",
              "zipfile", "tarfile", "stat", "filecmp", "fileinput"],
    "math": ["math", "cmath", "statistics", "_pydecimal", "fractions", "random", "numbers"],
    "network": ["socket", "ssl", "http.client", "http.server", "http.cookiejar", "urllib.request",
                "urllib.parse", "smtplib", "ftplib", "imaplib", "poplib", "ipaddress",
                "socketserver", "email.message"],
    "text": ["string", "re", "textwrap", "difflib", "unicodedata", "codecs", "html.parser",
             "shlex", "str", "locale", "gettext"],
    "time": ["time", "datetime", "calendar", "zoneinfo", "sched", "_strptime"],
}
C_TOPICS = {
    "files": ["fcntl.h", "sys/stat.h", "dirent.h", "stdio.h", "sys/mman.h", "sys/file.h",
              "sys/xattr.h", "ftw.h", "glob.h", "sys/statvfs.h"],
    "math": ["math.h", "complex.h", "fenv.h"],
    "network": ["sys/socket.h", "netdb.h", "arpa/inet.h", "netinet/in.h", "net/if.h",
                "rpc/rpc.h", "resolv.h", "ifaddrs.h"],
    "text": ["string.h", "wchar.h", "ctype.h", "wctype.h", "regex.h", "strings.h", "iconv.h",
             "langinfo.h"],
    "time": ["time.h", "sys/time.h", "sys/timerfd.h", "sys/times.h", "utime.h"],
}
MAN_SECTIONS = {"system_call": "man2", "library_function": "man3", "device": "man4",
                "file_format": "man5", "overview": "man7"}
LIBRARIES = {
    "numpy": ["numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.ndarray"],
    "torch": ["torch", "torch.nn", "torch.nn.functional", "torch.Tensor", "torch.optim",
              "torch.utils.data", "torch.distributions"],
    "scikit-learn": ["sklearn.linear_model", "sklearn.ensemble", "sklearn.svm", "sklearn.metrics",
                     "sklearn.preprocessing", "sklearn.model_selection", "sklearn.cluster",
                     "sklearn.decomposition", "sklearn.pipeline", "sklearn.neighbors"],
    "transformers": [],  # read from source files: importing transformers' models is slow
}
# Chatterbot's tech_support file repeats a few lines thousands of times: trivia instead.
CHAT_TOPICS = ["ai", "coding", "emotion", "psychology", "trivia"]
FORTUNE_TOPICS = {"art": ["art"], "education": ["education"], "food": ["food"], "law": ["law"],
                  "literature": ["literature"]}
SEQUENCE = ["library_docs", "chat_topic", "manual_section", "fortune_life", "pydoc_topic",
            "manual_topic"]
DESCRIPTIONS = {
    "library_docs": "Docstring sentences by Python library (numpy, torch, scikit-learn, transformers).",
    "chat_topic": "English chatbot dialogue lines by topic.",
    "manual_section": "Linux man-pages description sentences by manual section.",
    "fortune_life": "English fortune cookies by topic (art, education, food, law, literature).",
    "pydoc_topic": "Python standard library docstring sentences by topic.",
    "manual_topic": "C library man-page sentences by topic (same labels as pydoc_topic).",
}
MAN_PAGES_LICENSE = ("per page: Linux-man-pages-copyleft, BSD-2-Clause, BSD-3-Clause, "
                     "BSD-4-Clause-UC or MIT (Linux man-pages 6.03; GPL pages left out)")
LICENSES = {
    "library_docs": "BSD-3-Clause (numpy, torch, scikit-learn docstrings), Apache-2.0 "
                    "(transformers docstrings)",
    "chat_topic": CHATTERBOT_LICENSE, "manual_section": MAN_PAGES_LICENSE,
    "manual_topic": MAN_PAGES_LICENSE, "pydoc_topic": "PSF-2.0 (CPython 3.11 docstrings)",
    "fortune_life": FORTUNES_LICENSE,
}
SECTION_HEADER = re.compile(r"\n\s*(Parameters|Returns|Args|Arguments|Example|Examples|Note|Notes|"
                            r"Attributes|Raises|See Also|References|Yields|Warning|\.\. )", re.I)


def sentences(text: str) -> list[str]:
    """The prose of a docstring or man page paragraph, one sentence per row."""
    text = SECTION_HEADER.split(text)[0]  # parameter lists and examples are not prose
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        if re.search(r"^\s*(>>>|\$ |[-=]{3,})", paragraph, re.M):
            continue  # code, doctests, tables
        out += [clean(s) for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", clean(paragraph))]
    return [s for s in out if s.endswith((".", "!", "?")) and re.search(r"[a-z]{3}", s)]


def docstrings(module_name: str) -> list[str]:
    """Docstrings of a module's (or class's) public members that it defines itself."""
    head, _, tail = module_name.rpartition(".")
    if module_name == "str":
        owner = str
    else:
        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            owner = getattr(importlib.import_module(head), tail)
    docs = [inspect.getdoc(owner) or ""]
    for name, member in sorted(vars(owner).items()):
        if name.startswith("_") and name != "__init__":
            continue
        docs.append(getattr(member, "__doc__", None) or "")
        if inspect.isclass(member):
            docs += [getattr(m, "__doc__", None) or "" for k, m in sorted(vars(member).items())
                     if not k.startswith("_")]
    return [s for doc in docs if isinstance(doc, str) for s in sentences(inspect.cleandoc(doc))]


def source_docstrings(folder: Path) -> list[str]:
    texts = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
                texts += sentences(ast.get_docstring(node) or "")
    return texts


def read_libraries() -> dict[str, list[str]]:
    by_label = {label: [s for m in modules for s in docstrings(m)] for label, modules in LIBRARIES.items()}
    transformers = Path(importlib.util.find_spec("transformers").origin).parent
    by_label["transformers"] = (source_docstrings(transformers) + source_docstrings(transformers / "generation")
                                + source_docstrings(transformers / "pipelines"))
    return by_label


def man_page(path: Path) -> tuple[list[str], list[str], str]:
    """(headers the SYNOPSIS includes, DESCRIPTION sentences, licence) of a troff man page."""
    lines = gzip.open(path, "rt", encoding="utf-8", errors="replace").read().splitlines()
    licence = next((ln.split(":", 1)[1].strip() for ln in lines if "SPDX-License-Identifier" in ln), "")
    section, code, headers, paragraphs, words = None, False, [], [], []
    for line in lines:
        if line.startswith(".SH"):
            section = line[3:].strip().strip('"')
        elif section == "SYNOPSIS" and (include := re.search(r"#include <([^>]+)>", line)):
            headers.append(include.group(1))
        elif section != "DESCRIPTION" or line.startswith('.\\"'):
            continue
        elif line.startswith((".EX", ".nf")):
            code = True
        elif line.startswith((".EE", ".fi")):
            code = False
        elif code:
            continue
        elif re.match(r"\.(B|I|BR|IR|RB|BI|IB|RI)\b", line):
            args = re.findall(r'"([^"]*)"|(\S+)', line.split(None, 1)[1] if " " in line else "")
            words.append("".join(a or b for a, b in args))
        elif line.startswith("."):
            paragraphs.append(" ".join(words))
            words = []
        else:
            words.append(line)
    paragraphs.append(" ".join(words))
    text = "\n\n".join(paragraphs)
    text = re.sub(r"\\f[BIRP]|\\f\(..|\\&|\\c", "", text)
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\~", " ").replace("\\(em", "--")
    text = re.sub(r"\\\(..|\\\[[^]]*\]", "", text)
    return headers, sentences(text), licence


def read_man_pages() -> tuple[dict, dict]:
    """Sentences by topic (pages whose SYNOPSIS includes a topic header) and by section (the rest).
    Pages under a GPL licence are skipped, as the bundled tasks skip GPL text."""
    header_topic = {h: t for t, headers in C_TOPICS.items() for h in headers}
    by_topic = {t: [] for t in C_TOPICS}
    by_section = {s: [] for s in MAN_SECTIONS}
    for label, folder in MAN_SECTIONS.items():
        for path in sorted((MAN / folder).glob("*.gz")):
            headers, texts, licence = man_page(path)
            if not licence or "GPL" in licence:
                continue
            topic = next((header_topic[h] for h in headers if h in header_topic), None)
            if topic and folder in ("man2", "man3"):
                by_topic[topic] += texts
            else:
                by_section[label] += texts
    return by_topic, by_section


def main() -> None:
    args = builder_args(__doc__)
    manual_topic, manual_section = read_man_pages()
    sources = {
        "library_docs": read_libraries(),
        "chat_topic": {label: read_chatterbot(args.chatterbot, "english", f"{label}.yml") for label in CHAT_TOPICS},
        "manual_section": manual_section,
        "fortune_life": {label: read_fortunes(files) for label, files in FORTUNE_TOPICS.items()},
        "pydoc_topic": {label: [s for m in modules for s in docstrings(m)] for label, modules in PY_TOPICS.items()},
        "manual_topic": manual_topic,
    }
    write_sequence(sources, SEQUENCE, args.seed, HERE,
                   "The confusable development sequence (`ahl demo --tasks-dir tasks/confusable`).",
                   DESCRIPTIONS, LICENSES, "tasks/confusable/build_confusable.py")


if __name__ == "__main__":
    main()
