"""Rebuild the bundled generate sequence (prompt -> completion) from its offline sources.

Sources (see LICENSES.md):
  fortune cookies   Debian `fortunes`      /usr/share/games/fortunes (attributed quotes)
  WordNet 3.0       Debian `wordnet-base`  /usr/share/wordnet/{noun,verb,adj}.exc, data.*

    apt-get install fortunes wordnet-base
    python tasks/generate/build_generate.py

Three tasks a small decoder learns on a CPU in a minute or two, each of a different shape:
- fortune_author (short-answer extraction): an attributed quote -> the author's name as the
  attribution gives it (before any comma: "-- Mark Twain, \"Pudd'nhead Wilson\"" -> Mark Twain).
- wordnet_lemma (rewriting): an irregular inflected word -> its base form (WordNet's exception
  lists: "went" -> go, "geese" -> goose, "better" -> good), for base forms with a sense in
  WordNet's tagged corpus (words in use).
- wordnet_entry (formatting): a synset's first word, part of speech and definition as key=value
  fields -> a dictionary line, "domestic dog (noun): a member of the genus Canis".
Writes tasks/generate/data/<task>/{train,test}.csv; deterministic for a given seed.
"""

import argparse
import csv
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
FORTUNES = Path("/usr/share/games/fortunes")
WORDNET = Path("/usr/share/wordnet")
TRAIN, TEST = 240, 60
FORTUNE_FILES = ["people", "humorists", "wisdom", "fortunes", "literature", "politics", "science",
                 "work", "miscellaneous", "platitudes", "computers", "education", "love", "law"]
POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective"}


def fortune_author(rng: random.Random) -> list[tuple[str, str]]:
    rows, seen = [], set()
    for name in FORTUNE_FILES:
        path = FORTUNES / name
        if not path.is_file():
            continue
        for record in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [line.strip() for line in record.strip().splitlines()]
            if len(lines) < 2 or not lines[-1].startswith("-- "):
                continue
            quote = " ".join(" ".join(lines[:-1]).split())
            attribution = " ".join(lines[-1][3:].split())
            author = attribution.split(",")[0].strip().strip('"')
            if not (20 <= len(quote) <= 160 and re.fullmatch(r"[A-Z][A-Za-z.' -]{2,30}", author)
                    and len(author.split()) <= 4 and quote not in seen):
                continue
            seen.add(quote)
            rows.append((f'Give only the author\'s name: "{quote}" -- {attribution}', author))
    return rows


def tagged_lemmas(pos: str) -> set[str]:
    """Lemmas with a sense seen in WordNet's tagged corpus (index.POS: the tagsense_cnt field):
    words in use, not only Latin plurals of rare nouns."""
    lemmas = set()
    for line in (WORDNET / f"index.{pos}").read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):
            continue
        fields = line.split()
        pointers = int(fields[3])
        if int(fields[5 + pointers]) > 0:
            lemmas.add(fields[0])
    return lemmas


def wordnet_lemma(rng: random.Random) -> list[tuple[str, str]]:
    rows, seen = [], set()
    for pos in ("noun", "verb", "adj"):
        common = tagged_lemmas(pos)
        for line in (WORDNET / f"{pos}.exc").read_text(encoding="utf-8").splitlines():
            inflected, base = line.split()[:2]
            if not (inflected.isalpha() and base.isalpha()) or inflected == base or \
                    inflected in seen or base not in common:
                continue
            seen.add(inflected)
            rows.append((f'What is the base form of the word "{inflected}"?', base))
    return rows


def wordnet_entry(rng: random.Random) -> list[tuple[str, str]]:
    rows = []
    for pos in ("noun", "verb", "adj"):
        for line in (WORDNET / f"data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            word, kind = re.sub(r"\(.*\)$", "", parts[4]), POS[parts[2]]
            definition = gloss.split(";")[0].strip()
            if not (15 <= len(definition) <= 60 and '"' not in definition):
                continue
            rows.append((f"Write a dictionary line: word={word}; pos={parts[2]}; "
                         f"definition={definition}", f"{word.replace('_', ' ')} ({kind}): {definition}"))
    return rows


TASKS = {"fortune_author": fortune_author, "wordnet_lemma": wordnet_lemma,
         "wordnet_entry": wordnet_entry}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for task, build in TASKS.items():
        rng = random.Random(args.seed)
        rows = build(rng)
        rng.shuffle(rows)
        if len(rows) < TRAIN + TEST:
            raise SystemExit(f"{task}: only {len(rows)} rows; is its source installed?")
        folder = HERE / "data" / task
        folder.mkdir(parents=True, exist_ok=True)
        for split, chunk in (("train", rows[:TRAIN]), ("test", rows[TRAIN: TRAIN + TEST])):
            with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["prompt", "completion"])
                writer.writerows(chunk)
        print(f"{task}: {len(rows)} candidates, wrote {TRAIN} train and {TEST} test rows")


if __name__ == "__main__":
    main()
