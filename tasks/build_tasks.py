"""Rebuild the bundled task sequence from its offline sources.

Sources (see LICENSES.md):
  WordNet 3.0            Debian `wordnet-base`    /usr/share/wordnet/data.{noun,verb}
  fortune cookies        Debian `fortunes`, `fortunes-es`, `fortunes-it`   /usr/share/games/fortunes
  chatterbot-corpus      PyPI `chatterbot-corpus` (pass the folder of its `data/`)

    apt-get install wordnet-base fortunes fortunes-es fortunes-it
    pip download --no-deps chatterbot-corpus && unzip chatterbot_corpus-*.whl -d cbc
    python tasks/build_tasks.py --chatterbot cbc/chatterbot_corpus/data

Writes tasks/data/<task>/{train,test}.csv and tasks/<task>.toml. Deterministic for a given seed:
texts are deduplicated across the whole sequence, shuffled, and each class gets up to
TRAIN_PER_CLASS training and TEST_PER_CLASS test rows.
"""

import argparse
import csv
import random
import re
from pathlib import Path

import yaml

TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 100
MIN_CHARS, MAX_CHARS = 12, 240
HERE = Path(__file__).parent
WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")

# Lexicographer file numbers of WordNet 3.0 (lexnames(5WN)).
WORDNET_TASKS = {
    "wordnet_things": ("noun", {5: "animal", 20: "plant", 13: "food", 6: "artifact", 8: "body"}),
    "wordnet_actions": ("verb", {38: "motion", 32: "communication", 34: "consumption",
                                 35: "contact", 37: "emotion"}),
    "wordnet_concepts": ("noun", {12: "feeling", 9: "cognition", 28: "time", 23: "quantity",
                                  15: "location"}),
}
# English fortune files (BSD-licensed `fortunes` package) by topic label.
FORTUNE_TOPICS = {"computers": ["computers", "linux"], "politics": ["politics"],
                  "science": ["science"], "work": ["work"], "relationships": ["men-women", "love"]}
FORTUNE_LANGUAGES = {"en": ["fortunes", "wisdom", "people", "miscellaneous", "platitudes"],
                     "es": ["es/sabiduria.fortunes", "es/varios.fortunes", "es/sentimientos.fortunes",
                            "es/vida.fortunes", "es/humanos.fortunes"],
                     "it": ["it/italia", "it/norm", "it/luke"]}
CHAT_LANGUAGES = {"en": "english", "es": "spanish", "it": "italian"}
SEQUENCE = ["wordnet_things", "fortune_topic", "chat_language", "wordnet_actions",
            "fortune_language", "wordnet_concepts"]
DESCRIPTIONS = {
    "wordnet_things": "WordNet noun definitions by lexicographer category (concrete things).",
    "fortune_topic": "English fortune cookies by topic.",
    "chat_language": "Chatterbot dialogue lines by language.",
    "wordnet_actions": "WordNet verb definitions by lexicographer category.",
    "fortune_language": "Fortune cookies by language (same labels as chat_language, other domain).",
    "wordnet_concepts": "WordNet noun definitions by lexicographer category (abstract concepts).",
}

WORDNET_LICENSE = ("WordNet 3.0 licence (Princeton University): use, copy, modify and distribute "
                   "for any purpose, with the copyright notice kept")
FORTUNES_LICENSE = "BSD (fortune-mod, Regents of the University of California)"
CHATTERBOT_LICENSE = "BSD-3-Clause (chatterbot-corpus, Gunther Cox)"
# What each task's spec says of its data's licence (LICENSES.md has the details).
LICENSES = {
    "wordnet_things": WORDNET_LICENSE, "fortune_topic": FORTUNES_LICENSE,
    "chat_language": CHATTERBOT_LICENSE, "wordnet_actions": WORDNET_LICENSE,
    "fortune_language": "BSD (English rows, fortune-mod); public domain (Spanish and Italian rows, "
                        "Debian fortunes-es and fortunes-it)",
    "wordnet_concepts": WORDNET_LICENSE,
}


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def read_wordnet(pos: str, categories: dict[int, str]) -> dict[str, list[str]]:
    by_label = {label: [] for label in categories.values()}
    for line in (WORDNET / f"data.{pos}").read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):  # licence header
            continue
        fields, _, gloss = line.partition(" | ")
        label = categories.get(int(fields.split()[1]))
        if label:
            definition = gloss.split('; "')[0]  # drop the quoted usage examples
            by_label[label].append(clean(definition))
    return by_label


def read_fortunes(names: list[str]) -> list[str]:
    texts = []
    for name in names:
        raw = (FORTUNES / name).read_bytes()
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError:
            content = raw.decode("latin-1")
        for cookie in content.split("\n%\n"):
            # Attribution lines ("-- Mark Twain") name the source, not the content.
            body = [ln for ln in cookie.splitlines() if not ln.strip().startswith(("--", "%"))]
            texts.append(clean(" ".join(body)))
    return texts


def read_chatterbot(folder: Path, language: str, files: str = "*.yml") -> list[str]:
    texts = []
    for path in sorted((folder / language).glob(files)):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in doc.get("conversations") or []:
            texts += [clean(s) for s in conversation if isinstance(s, str) and "```" not in s]
    return texts


def split_task(by_label: dict[str, list[str]], seen: set[str], rng: random.Random):
    train, test = [], []
    for label in sorted(by_label):
        texts = sorted({t for t in by_label[label] if MIN_CHARS <= len(t) <= MAX_CHARS} - seen)
        rng.shuffle(texts)
        texts = texts[: TRAIN_PER_CLASS + TEST_PER_CLASS]
        seen.update(texts)
        n_test = min(TEST_PER_CLASS, len(texts) // 4)
        test += [(t, label) for t in texts[:n_test]]
        train += [(t, label) for t in texts[n_test:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_task(name: str, train, test, home: Path, description: str, license: str,
               builder: str) -> None:
    """Write a task's CSVs under home/data/<name>/ and its spec as home/<name>.toml."""
    folder = home / "data" / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    (home / f"{name}.toml").write_text(
        f'# {description} Built by {builder}.\n'
        f'name = "{name}"\n'
        f'description = "{description}"\n'
        f'license = "{license}"\n'
        f'train = "data/{name}/train.csv"\n'
        f'test = "data/{name}/test.csv"\n'
        'text_column = "text"\n'
        'label_column = "label"\n',
        encoding="utf-8",
    )
    print(f"{name}: {len(train)} train, {len(test)} test, labels {sorted({l for _, l in train})}")


def builder_args(doc: str) -> argparse.Namespace:
    """A builder's command line: where chatterbot-corpus is, and the seed of the splits."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--chatterbot", type=Path, required=True, help="chatterbot_corpus/data folder")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def write_sequence(sources: dict, sequence: list[str], seed: int, home: Path, comment: str,
                   descriptions: dict, licenses: dict, builder: str) -> None:
    """Split and write each task in order (texts deduplicated across the sequence), then
    home/sequence.toml."""
    rng, seen = random.Random(seed), set()
    for name in sequence:
        write_task(name, *split_task(sources[name], seen, rng), home, descriptions[name],
                   licenses[name], builder)
    (home / "sequence.toml").write_text(f"# {comment}\ntasks = {sequence!r}\n".replace("'", '"'),
                                        encoding="utf-8")


def main() -> None:
    args = builder_args(__doc__)
    sources = {name: read_wordnet(*spec) for name, spec in WORDNET_TASKS.items()}
    sources["fortune_topic"] = {k: read_fortunes(v) for k, v in FORTUNE_TOPICS.items()}
    sources["chat_language"] = {k: read_chatterbot(args.chatterbot, v) for k, v in CHAT_LANGUAGES.items()}
    sources["fortune_language"] = {k: read_fortunes(v) for k, v in FORTUNE_LANGUAGES.items()}
    write_sequence(sources, SEQUENCE, args.seed, HERE,
                   "The bundled task sequence, in the order `ahl demo` adds it.",
                   DESCRIPTIONS, LICENSES, "tasks/build_tasks.py")


if __name__ == "__main__":
    main()
