"""HUPD records: a JSON record as one row with the official loader's 14 fields, cleaned of hostile input.

:data:`FEATURES` is the schema every split has by default; ``load_hupd(columns=...)`` keeps
only some of its fields (:func:`stored_columns`: those asked for, plus :data:`KEPT_COLUMNS`).
:func:`record_to_example` maps a record's keys to the official field names; any JSON value is
accepted (null -> ``""``, other non-strings their ``str()``, lone surrogates -> U+FFFD), and
:func:`_example` turns bytes that are not one JSON object into None (skipped, never fatal).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import datasets

__all__ = ["FEATURES", "KEPT_COLUMNS", "OFFICIAL_FIELDS", "record_to_example", "stored_columns"]

# The official loader's 14 string fields, in its order.
OFFICIAL_FIELDS = (
    "patent_number",
    "decision",
    "title",
    "abstract",
    "claims",
    "background",
    "summary",
    "description",
    "cpc_label",
    "ipc_label",
    "filing_date",
    "patent_issue_date",
    "date_published",
    "examiner_id",
)
FEATURES = datasets.Features(
    {
        **{name: datasets.Value("string") for name in OFFICIAL_FIELDS},
        "application_number": datasets.Value("string"),
        "ipcr_labels": datasets.List(datasets.Value("string")),
        "cpc_labels": datasets.List(datasets.Value("string")),
    }
)
# Stored whatever ``columns`` asks for: the row's key (to find it in the metadata) and the fields the
# selection rules act on (filing date, decision for val_set_balancer, main IPC/CPC labels for the prefix
# filters), so that any cache can be checked against its selection. Tens of bytes a row; the text
# sections are kilobytes.
KEPT_COLUMNS = ("application_number", "decision", "filing_date", "ipc_label", "cpc_label")
# output field -> key in the JSON record (patent_number is filled from the metadata instead)
_JSON_KEYS = {
    "decision": "decision",
    "title": "title",
    "abstract": "abstract",
    "claims": "claims",
    "background": "background",
    "summary": "summary",
    "description": "full_description",
    "cpc_label": "main_cpc_label",
    "ipc_label": "main_ipcr_label",
    "filing_date": "filing_date",
    "patent_issue_date": "patent_issue_date",
    "date_published": "date_published",
    "examiner_id": "examiner_id",
}

_DESCRIPTION = (
    "The Harvard USPTO Patent Dataset (HUPD): English-language US patent applications filed "
    "2004-2018, with their final decisions (Suzgun et al., arXiv 2207.04043)."
)


def stored_columns(columns: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """The fields a load keeps for ``columns``: those, plus :data:`KEPT_COLUMNS`, in :data:`FEATURES` order.

    None (every field) for ``columns=None`` or when that adds up to every field. A name that is
    not a field of :data:`FEATURES` raises ValueError naming the valid ones.
    """
    if columns is None:
        return None
    names = [columns] if isinstance(columns, str) else list(columns)
    unknown = [name for name in names if not isinstance(name, str) or name not in FEATURES]
    if unknown:
        raise ValueError(
            f"Unknown HUPD column(s) {', '.join(map(repr, unknown))}. Valid: {', '.join(FEATURES)} "
            f"({', '.join(KEPT_COLUMNS)} are always kept; the JSON's full_description is 'description')."
        )
    kept = {*names, *KEPT_COLUMNS}
    return None if kept == set(FEATURES) else tuple(name for name in FEATURES if name in kept)


def features_for(columns: tuple[str, ...] | None) -> datasets.Features:
    """:data:`FEATURES`, or only the ``columns`` (from :func:`stored_columns`) of it."""
    return FEATURES if columns is None else datasets.Features({name: FEATURES[name] for name in columns})


def dataset_info(columns: tuple[str, ...] | None = None) -> datasets.DatasetInfo:
    """The ``DatasetInfo`` every split carries (description, its features, homepage)."""
    return datasets.DatasetInfo(
        description=_DESCRIPTION, features=features_for(columns), homepage="https://github.com/suzgunmirac/hupd"
    )


def _parse_record(data: bytes) -> dict[str, Any] | None:
    """The JSON object in ``data``, or None if it is not valid JSON for one object."""
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return record if isinstance(record, dict) else None


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _text(value: Any) -> str:
    """A field as a string: null -> "", other non-strings -> str(); always valid Unicode.

    JSON may spell a lone UTF-16 surrogate (``"\\ud800"``); Python decodes it, but it has no
    UTF-8 form, so Arrow would fail on it. Such characters become U+FFFD.
    """
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if text.isascii():  # O(1) in CPython, and the common case
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE_RE.sub("\ufffd", text)
    return text


def _labels(value: Any) -> list[str]:
    """A label list as strings (a lone label becomes a one-item list; nulls are dropped)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value if v is not None]
    return [_text(value)]


def record_to_example(application_number: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """One output example from a HUPD JSON record, with the official field names.

    ``patent_number`` gets the application number, as the official loader does. Any JSON
    value is accepted: nulls become ``""``, other non-strings their ``str()``.
    """
    example = {"patent_number": application_number}
    for field, key in _JSON_KEYS.items():
        example[field] = _text(record.get(key))
    example["application_number"] = application_number
    example["ipcr_labels"] = _labels(record.get("ipcr_labels"))
    example["cpc_labels"] = _labels(record.get("cpc_labels"))
    return {name: example[name] for name in FEATURES}


def _example(number: str, data: bytes, columns: tuple[str, ...] | None = None) -> dict[str, Any] | None:
    """The example for a member's bytes (only ``columns``, if given), or None when they are not one usable JSON object.

    Every field is converted even when fewer are kept, so that whether a record is usable does
    not depend on ``columns`` (a cache of more columns holds the same rows as one of fewer).
    """
    record = _parse_record(data)
    try:
        example = None if record is None else record_to_example(number, record)
    except RecursionError:  # str() of a nesting just under json's own limit
        return None
    if example is None or columns is None:
        return example
    return {name: example[name] for name in columns}
