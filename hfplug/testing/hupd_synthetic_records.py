"""Synthetic HUPD JSON records with a learnable signal (the text side of :mod:`hfplug.testing.hupd_synthetic`).

Every record has the full real schema. Marker words from two disjoint vocabularies predict
ACCEPTED vs REJECTED in ~95% of records (the rest are label noise), and topic words predict
the IPC subclass, so a tiny model trained on them visibly learns. Everything is drawn from
one ``random.Random(seed)``: the same arguments give the same records on every machine. The words
themselves are in :mod:`hfplug.testing.hupd_synthetic_vocab`.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Mapping, Sequence
from typing import Any

from hfplug.testing.hupd_synthetic_vocab import (
    ACCEPT_MARKERS,
    CITIES,
    DECISIONS,
    FILLER,
    FIRST_NAMES,
    IPC_SUBCLASSES,
    LAST_NAMES,
    REJECT_MARKERS,
    TITLE_NOUNS,
)

__all__ = ["SIGNAL_RATE", "make_records"]

SIGNAL_RATE = 0.95  # share of records whose markers agree with their decision (the rest: label noise)
_TOPIC_COPIES = 2  # 70 filler words + 2 x 16 topic words: ~30% of prose is topic words


def make_records(
    n_records: int,
    *,
    seed: int = 0,
    start_date: str = "2016-01-01",
    end_date: str = "2016-02-01",
    description_words: tuple[int, int] = (300, 900),
    claims_words: tuple[int, int] = (120, 400),
    background_words: tuple[int, int] = (60, 200),
    summary_words: tuple[int, int] = (60, 200),
    abstract_words: tuple[int, int] = (50, 250),
    null_section_rate: float = 0.03,
) -> list[dict[str, Any]]:
    """Make ``n_records`` HUPD JSON records (dicts with the full real schema).

    Filing dates are uniform over ``[start_date, end_date)`` (``YYYY-MM-DD``, end exclusive).
    Each ``*_words`` pair is the inclusive (min, max) word count of that section; raise
    ``description_words`` to make big archives (the detailed description is most of a real
    record). With ``n_records >= 6`` all six decisions occur. ``null_section_rate`` is the
    chance that background or summary is null, as happens in the real data.
    """
    if n_records < 0:
        raise ValueError(f"n_records must be >= 0, got {n_records}")
    start, end = _parse_day(start_date, "start_date"), _parse_day(end_date, "end_date")
    if end <= start:
        raise ValueError(f"end_date ({end_date}) must be after start_date ({start_date})")
    for name, (low, high) in [
        ("description_words", description_words),
        ("claims_words", claims_words),
        ("background_words", background_words),
        ("summary_words", summary_words),
        ("abstract_words", abstract_words),
    ]:
        if not 1 <= low <= high:
            raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {(low, high)}")

    rng = random.Random(seed)
    numbers = rng.sample(range(14_000_000, 16_000_000), n_records)
    decisions = rng.choices(list(DECISIONS), weights=list(DECISIONS.values()), k=n_records)
    # Guarantee every decision appears; archive order is by application number, so these
    # forced records end up spread through the archive anyway.
    for i, decision in enumerate(list(DECISIONS)[: min(n_records, len(DECISIONS))]):
        decisions[i] = decision
    span = (end - start).days
    sizes = {
        "description": description_words,
        "claims": claims_words,
        "background": background_words,
        "summary": summary_words,
        "abstract": abstract_words,
    }
    return [
        _make_record(
            rng, str(number), decision, start + dt.timedelta(days=rng.randrange(span)), sizes, null_section_rate
        )
        for number, decision in zip(numbers, decisions)
    ]


def _parse_day(value: str, name: str) -> dt.date:
    """Parse ``YYYY-MM-DD`` or raise a ValueError naming the argument."""
    try:
        return dt.datetime.strptime(value, "%Y-%m-%d").date()
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a date in YYYY-MM-DD format, got {value!r}") from None


def _marker_side(rng: random.Random, decision: str) -> tuple[str, ...]:
    """Marker vocabulary for one record: its decision's side with prob SIGNAL_RATE."""
    if decision.endswith("ACCEPTED"):
        own, other = ACCEPT_MARKERS, REJECT_MARKERS
    elif decision.endswith("REJECTED"):
        own, other = REJECT_MARKERS, ACCEPT_MARKERS
    else:  # pending applications have no label; give them either side at random
        return rng.choice((ACCEPT_MARKERS, REJECT_MARKERS))
    return own if rng.random() < SIGNAL_RATE else other


def _make_record(
    rng: random.Random,
    number: str,
    decision: str,
    filed: dt.date,
    sizes: Mapping[str, tuple[int, int]],
    null_rate: float,
) -> dict[str, Any]:
    """One record with the full HUPD JSON schema, keys in the real files' order."""
    subclass = rng.choice(list(IPC_SUBCLASSES))
    groups, uspc_class, topic = IPC_SUBCLASSES[subclass]
    ipcr = [subclass + g for g in rng.sample(groups, rng.randint(1, 3))]
    cpc = [label + f"{rng.randrange(100):02d}" for label in ipcr]
    markers = _marker_side(rng, decision)
    accepted = decision.endswith("ACCEPTED")
    rejected = decision.endswith("REJECTED")

    def words(section: str) -> int:
        return rng.randint(*sizes[section])

    title_topic = rng.sample(topic, 2)
    title = f"{rng.choice(markers).capitalize()} {title_topic[0]} {title_topic[1]} {rng.choice(TITLE_NOUNS)}"
    abstract = _prose(rng, words("abstract"), topic, [rng.choice(markers) for _ in range(3)])
    background = None if rng.random() < null_rate else _prose(rng, words("background"), topic)
    summary = None if rng.random() < null_rate else _prose(rng, words("summary"), topic)
    detail = _prose(rng, words("description"), topic, paragraph=6)
    full_description = "\n\n".join(
        part for part in ("BACKGROUND", background, "SUMMARY", summary, "DETAILED DESCRIPTION", detail) if part
    )
    examiner = rng.randrange(len(LAST_NAMES))
    return {
        "application_number": number,
        "publication_number": f"US{filed.year + 1}0{rng.randrange(100000, 999999)}A1",
        "title": title,
        "decision": decision,
        "date_produced": _yyyymmdd(filed + dt.timedelta(days=rng.randint(520, 560))),
        "date_published": _yyyymmdd(filed + dt.timedelta(days=rng.randint(540, 560))),
        "main_cpc_label": cpc[0],
        "cpc_labels": cpc,
        "main_ipcr_label": ipcr[0],
        "ipcr_labels": ipcr,
        "patent_number": str(rng.randrange(9_500_000, 10_400_000)) if accepted else None,
        "filing_date": _yyyymmdd(filed),
        "patent_issue_date": _yyyymmdd(filed + dt.timedelta(days=rng.randint(500, 1400))) if accepted else None,
        "abandon_date": _yyyymmdd(filed + dt.timedelta(days=rng.randint(600, 1500))) if rejected else None,
        "uspc_class": uspc_class,
        "uspc_subclass": f"{rng.randrange(1000):03d}000",
        "examiner_id": str(rng.randrange(60000, 100000)),
        "examiner_name_last": LAST_NAMES[examiner],
        "examiner_name_first": rng.choice(FIRST_NAMES),
        "examiner_name_middle": rng.choice(("A", "B", "J", None)),
        "inventor_list": [_inventor(rng) for _ in range(rng.randint(1, 4))],
        "abstract": abstract,
        "claims": _claims(rng, words("claims"), topic),
        "background": background,
        "summary": summary,
        "full_description": full_description,
    }


def _inventor(rng: random.Random) -> dict[str, Any]:
    city, state, country = rng.choice(CITIES)
    return {
        "inventor_name_last": rng.choice(LAST_NAMES),
        "inventor_name_first": rng.choice(FIRST_NAMES),
        "inventor_city": city,
        "inventor_state": state,
        "inventor_country": country,
    }


def _yyyymmdd(day: dt.date) -> str:
    return day.strftime("%Y%m%d")


def _word_list(rng: random.Random, n_words: int, topic: Sequence[str]) -> list[str]:
    """``n_words`` words, about a third of them topic words.

    The topic words are listed twice in the population instead of weighting them:
    unweighted ``choices`` is twice as fast, which matters for the benchmark's big archives.
    """
    return rng.choices(FILLER + tuple(topic) * _TOPIC_COPIES, k=n_words)


def _prose(
    rng: random.Random, n_words: int, topic: Sequence[str], markers: Sequence[str] = (), paragraph: int = 0
) -> str:
    """Sentences of exactly ``n_words`` words; ``markers`` replace words at random positions.

    ``paragraph`` > 0 starts a new paragraph every that many sentences.
    """
    words = _word_list(rng, n_words, topic)
    for marker in markers:
        words[rng.randrange(n_words)] = marker
    sentences, i = [], 0
    while i < n_words:
        chunk = words[i : i + rng.randint(10, 25)]
        i += len(chunk)
        sentences.append(chunk[0].capitalize() + (" " + " ".join(chunk[1:]) if len(chunk) > 1 else "") + ".")
    if paragraph <= 0:
        return " ".join(sentences)
    return "\n\n".join(" ".join(sentences[j : j + paragraph]) for j in range(0, len(sentences), paragraph))


def _claims(rng: random.Random, n_words: int, topic: Sequence[str]) -> str:
    """Numbered claims, an independent one first, then dependent ones, ~``n_words`` words."""
    noun = rng.choice(TITLE_NOUNS)
    claims, used, number = [], 0, 1
    while used < n_words:
        body_words = min(rng.randint(15, 45), max(n_words - used, 5))
        body = " ".join(_word_list(rng, body_words, topic))
        if number == 1:
            claims.append(f"1. A {rng.choice(topic)} {noun} comprising: {body}.")
        else:
            claims.append(f"{number}. The {noun} of claim {rng.randint(1, number - 1)}, wherein {body}.")
        used += body_words
        number += 1
    return " ".join(claims)
