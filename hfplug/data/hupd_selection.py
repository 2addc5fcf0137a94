"""Which HUPD applications go to train and validation: the official loader's rules, in pandas.

These are pure functions of the metadata DataFrame (one row per application; at least
``application_number``, ``filing_date`` as datetime64, ``decision``, ``main_ipcr_label``,
``main_cpc_label``). They reproduce the selection of the official ``HUPD/hupd`` loading
script exactly, in its order:

1. label prefix filter: ``ipcr_label`` on ``main_ipcr_label``, *else* ``cpc_label`` on
   ``main_cpc_label`` (when both are given only the IPC filter applies, as upstream);
2. ``query``: :meth:`pandas.DataFrame.query`;
3. split: by filing dates (default, end dates exclusive) or ``uniform_split``;
4. ``val_set_balancer`` on the validation part.

Upstream compares the date strings with the datetime column, so pandas parses them: both
``YYYY-MM-DD`` and ``YYYYMMDD`` work there, and here. Upstream fails late on a bad date; here
dates are checked up front and an empty selection is an error that says what the metadata holds.

The frames returned are in upstream's row order (the order its loader yields examples in):
metadata order for a date split, ``df.sample(frac=1.0, random_state=1729)`` order for
``uniform_split``, and rejected-then-accepted for ``val_set_balancer``; a repeated metadata
row stays repeated.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re

import pandas as pd

__all__ = [
    "RANDOM_STATE",
    "TRAIN_FRACTION",
    "HupdSelection",
    "balance_validation",
    "date_split",
    "filter_by_label",
    "filter_by_query",
    "parse_filing_date",
    "select_splits",
    "to_filing_dates",
    "uniform_split",
    "validate_split_dates",
]

logger = logging.getLogger(__name__)

RANDOM_STATE = 1729  # the official loader's seed, for both the uniform split and the balancer
TRAIN_FRACTION = 0.85  # uniform split: share of shuffled rows that go to train
DATE_FORMAT = "YYYY-MM-DD or YYYYMMDD"
_DATE_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})|(\d{4})(\d{2})(\d{2})")
_DAY_PREFIX_RE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})(?!\d)")  # YYYY-MM-DD or YYYYMMDD, then no digit


@dataclasses.dataclass
class HupdSelection:
    """The metadata rows of each split (``train`` and ``validation``), in upstream order."""

    train: pd.DataFrame
    validation: pd.DataFrame

    def items(self) -> list[tuple[str, pd.DataFrame]]:
        return [("train", self.train), ("validation", self.validation)]


# ---------------------------------------------------------------------------------------
# Dates
# ---------------------------------------------------------------------------------------


def parse_filing_date(value: str | None, name: str) -> pd.Timestamp | None:
    """Parse a ``YYYY-MM-DD`` or ``YYYYMMDD`` date argument; ``None`` stays ``None``.

    Both forms work upstream (pandas parses the string it compares with the dates), and
    ``YYYYMMDD`` is how the JSON records write dates. Nothing else is accepted: pandas would
    also take e.g. ``01/02/2016``, whose day and month are ambiguous.
    Raises ValueError naming the argument, the bad value and the expected format.
    """
    if value is None:
        return None
    match = _DATE_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{name}={value!r} is not a date in {DATE_FORMAT} format (e.g. '2016-01-21')")
    year, month, day = (int(part) for part in match.groups() if part is not None)
    try:
        return pd.Timestamp(dt.datetime(year, month, day))
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a valid calendar date ({DATE_FORMAT})") from None


def validate_split_dates(
    train_filing_start_date: str | None = None,
    train_filing_end_date: str | None = None,
    val_filing_start_date: str | None = None,
    val_filing_end_date: str | None = None,
    *,
    uniform_split: bool = False,
) -> dict[str, pd.Timestamp | None]:
    """Check the four date arguments before any data is read; return them parsed.

    Date split: all four are required and each end must be after its start (ends are
    exclusive, so end == start would select nothing). Uniform split: only
    ``train_filing_start_date`` and ``val_filing_end_date`` are used (both optional,
    both inclusive); the other two are ignored, as upstream.
    """
    dates = {
        "train_filing_start_date": parse_filing_date(train_filing_start_date, "train_filing_start_date"),
        "train_filing_end_date": parse_filing_date(train_filing_end_date, "train_filing_end_date"),
        "val_filing_start_date": parse_filing_date(val_filing_start_date, "val_filing_start_date"),
        "val_filing_end_date": parse_filing_date(val_filing_end_date, "val_filing_end_date"),
    }
    if uniform_split:
        start, end = dates["train_filing_start_date"], dates["val_filing_end_date"]
        if start is not None and end is not None and end < start:
            raise ValueError(
                f"val_filing_end_date={val_filing_end_date!r} is before "
                f"train_filing_start_date={train_filing_start_date!r}; with uniform_split=True "
                "they bound one inclusive filing-date range"
            )
        return dates
    missing = [name for name, value in dates.items() if value is None]
    if missing:
        raise ValueError(
            f"Missing {', '.join(missing)}: a date split needs all four of train_filing_start_date, "
            "train_filing_end_date, val_filing_start_date and val_filing_end_date (end dates exclusive), "
            "or pass uniform_split=True for a random 85/15 split"
        )
    for split in ("train", "val"):
        start, end = dates[f"{split}_filing_start_date"], dates[f"{split}_filing_end_date"]
        if end <= start:
            raise ValueError(
                f"{split}_filing_end_date ({end.date()}) must be after {split}_filing_start_date "
                f"({start.date()}): the end date is exclusive"
            )
    return dates


def to_filing_dates(column: pd.Series) -> pd.Series:
    """A filing-date column as timezone-naive datetime64; what cannot be a date becomes NaT.

    The Hub files already hold naive datetime64, which passes through untouched. Anything
    else is normalised so that comparisons with the (naive) split dates cannot raise: a
    timezone is dropped (a filing date is a calendar day, so the wall date is kept);
    strings and numbers are parsed as ``YYYY-MM-DD`` or ``YYYYMMDD`` (the JSON records'
    form; an int column would otherwise be read as nanoseconds since 1970).
    """
    if pd.api.types.is_datetime64_any_dtype(column):
        return column.dt.tz_localize(None) if column.dt.tz is not None else column
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        column = pd.to_numeric(column, errors="coerce").astype("Int64").astype("string")
    # Only the leading day is parsed, with one exact format: a time or a timezone after it
    # (which pandas refuses to mix within a column) cannot matter for a filing date.
    days = column.map(_leading_day, na_action="ignore")
    return pd.to_datetime(days, format="%Y-%m-%d", errors="coerce")


def _leading_day(value: object) -> str | None:
    """``"2016-01-05..."``, ``"20160105"`` or a date object -> ``"2016-01-05"``; anything else -> None."""
    if isinstance(value, dt.date):  # also datetime and pd.Timestamp (NaT is caught by na_action)
        return f"{value.year:04d}-{value.month:02d}-{value.day:02d}"
    match = _DAY_PREFIX_RE.match(value.strip()) if isinstance(value, str) else None
    return "-".join(match.groups()) if match else None


def _filing_dates(df: pd.DataFrame) -> pd.Series:
    """The ``filing_date`` column as naive datetime64 (a CSV-born string column is parsed)."""
    return to_filing_dates(df["filing_date"])


def _describe(df: pd.DataFrame) -> str:
    """ "N records filed A to B" for error messages."""
    dates = _filing_dates(df).dropna()
    if dates.empty:
        return f"{len(df)} records"
    return f"{len(df)} records filed {dates.min().date()} to {dates.max().date()}"


# ---------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------


def filter_by_label(df: pd.DataFrame, ipcr_label: str | None = None, cpc_label: str | None = None) -> pd.DataFrame:
    """Keep rows whose main IPC label starts with ``ipcr_label``, else whose main CPC label
    starts with ``cpc_label``. As upstream, ``cpc_label`` is ignored when ``ipcr_label`` is
    given. Missing labels never match (``na=False``)."""
    if ipcr_label:
        return df[_starts_with(df["main_ipcr_label"], ipcr_label)]
    if cpc_label:
        return df[_starts_with(df["main_cpc_label"], cpc_label)]
    return df


def _starts_with(column: pd.Series, prefix: str) -> pd.Series:
    """Boolean mask of labels starting with ``prefix``; non-string labels never match.

    ``.str`` refuses a column that is not text (e.g. all-numeric labels), so such a column
    is matched as text of its values instead of crashing.
    """
    if not (pd.api.types.is_object_dtype(column) or pd.api.types.is_string_dtype(column)):
        column = column.astype("string")
    return column.str.startswith(prefix, na=False).astype(bool)


def filter_by_query(df: pd.DataFrame, query: str | None = None) -> pd.DataFrame:
    """Apply a :meth:`pandas.DataFrame.query` string (upstream's ``query_string``)."""
    if not query:
        return df
    try:
        return df.query(query)
    except Exception as exc:  # pandas raises many types (SyntaxError, UndefinedVariableError, ...)
        raise ValueError(
            f"query={query!r} failed on the HUPD metadata ({type(exc).__name__}: {exc}); "
            f"available columns: {', '.join(map(str, df.columns))}"
        ) from exc


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------


def date_split(
    df: pd.DataFrame,
    train_start: pd.Timestamp,
    train_end: pd.Timestamp,
    val_start: pd.Timestamp,
    val_end: pd.Timestamp,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train = ``train_start <= filing_date < train_end``; validation likewise.

    End dates are exclusive. The windows may overlap; a row in both goes to both, as upstream.
    """
    dates = _filing_dates(df)
    train = df[(dates >= train_start) & (dates < train_end)]
    val = df[(dates >= val_start) & (dates < val_end)]
    return train, val


def uniform_split(
    df: pd.DataFrame, start: pd.Timestamp | None = None, end: pd.Timestamp | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The official random split, row for row.

    Keeps ``start <= filing_date <= end`` (both inclusive, each only if given), shuffles with
    ``df.sample(frac=1.0, random_state=1729)``, puts the first ``int(0.85 * n)`` rows in train
    and ``iloc[n_train:-1]`` in validation. Note the ``-1``: the official code leaves the
    last shuffled row out of both splits, and so does this function, so that splits match
    upstream exactly. The result depends on the metadata's row order, as upstream.
    """
    dates = _filing_dates(df)
    if start is not None:
        df, dates = df[dates >= start], dates[dates >= start]
    if end is not None:
        df = df[dates <= end]
    shuffled = df.sample(frac=1.0, random_state=RANDOM_STATE)
    n_train = int(len(shuffled) * TRAIN_FRACTION)
    return shuffled.iloc[0:n_train], shuffled.iloc[n_train:-1]


def balance_validation(val: pd.DataFrame) -> pd.DataFrame:
    """Upstream's ``val_set_balancer``: equal numbers of REJECTED and ACCEPTED.

    Keeps only rows whose metadata ``decision`` is ACCEPTED or REJECTED; the larger class is
    shuffled (``random_state=1729``) and cut to the smaller's size (on a tie the rejected rows
    are shuffled, as upstream). Returns ``concat([rejected, accepted])``.
    """
    rejected = val[val["decision"] == "REJECTED"]
    accepted = val[val["decision"] == "ACCEPTED"]
    if len(rejected) < len(accepted):
        accepted = accepted.sample(frac=1.0, random_state=RANDOM_STATE).iloc[: len(rejected)]
    else:
        rejected = rejected.sample(frac=1.0, random_state=RANDOM_STATE).iloc[: len(accepted)]
    return pd.concat([rejected, accepted])


def select_splits(
    df: pd.DataFrame,
    *,
    train_filing_start_date: str | None = None,
    train_filing_end_date: str | None = None,
    val_filing_start_date: str | None = None,
    val_filing_end_date: str | None = None,
    uniform_split: bool = False,
    val_set_balancer: bool = False,
    ipcr_label: str | None = None,
    cpc_label: str | None = None,
    query: str | None = None,
) -> HupdSelection:
    """Apply the official selection to the metadata: label filter, query, split, balancer.

    Raises ValueError for malformed or inconsistent dates, for filters that match nothing,
    and for date windows that select no records (the message says how many records the
    metadata has and their filing-date range).
    """
    dates = validate_split_dates(
        train_filing_start_date,
        train_filing_end_date,
        val_filing_start_date,
        val_filing_end_date,
        uniform_split=uniform_split,
    )
    filtered = filter_by_query(filter_by_label(df, ipcr_label, cpc_label), query)
    if filtered.empty:
        filters = ", ".join(
            f"{k}={v!r}"
            for k, v in [
                ("ipcr_label", ipcr_label),
                ("cpc_label", None if ipcr_label else cpc_label),
                ("query", query),
            ]
            if v
        )
        raise ValueError(f"{filters} matched none of the {_describe(df)} in the HUPD metadata")
    if uniform_split:
        train, val = _uniform(df, filtered, dates)
    else:
        train, val = date_split(
            filtered,
            dates["train_filing_start_date"],
            dates["train_filing_end_date"],
            dates["val_filing_start_date"],
            dates["val_filing_end_date"],
        )
        for split, part in (("train", train), ("val", val)):
            if part.empty:
                raise ValueError(
                    f"{split}_filing_start_date={_iso(dates[f'{split}_filing_start_date'])} to "
                    f"{split}_filing_end_date={_iso(dates[f'{split}_filing_end_date'])} (exclusive) selects "
                    f"no records; {_context(df, filtered)}"
                )
    if val_set_balancer:
        unbalanced = len(val)
        val = balance_validation(val)
        logger.info(
            "val_set_balancer: validation cut from %d to %d rows (equal ACCEPTED and REJECTED)", unbalanced, len(val)
        )
        if val.empty:
            logger.warning("val_set_balancer left the validation split empty: it lacks ACCEPTED or REJECTED rows")
    return HupdSelection(train=train, validation=val)


def _uniform(
    df_all: pd.DataFrame, filtered: pd.DataFrame, dates: dict[str, pd.Timestamp | None]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Uniform split with an informative error when the date range keeps nothing."""
    start, end = dates["train_filing_start_date"], dates["val_filing_end_date"]
    ignored = [n for n in ("train_filing_end_date", "val_filing_start_date") if dates[n] is not None]
    if ignored:
        logger.warning(
            "uniform_split=True ignores %s (only train_filing_start_date and val_filing_end_date bound its range)",
            " and ".join(ignored),
        )
    train, val = uniform_split(filtered, start, end)
    if train.empty and val.empty:
        # 0 or 1 rows in the window: int(0.85 * 1) == 0 and iloc[0:-1] drops the only row
        dates = _filing_dates(filtered)
        in_window = pd.Series(True, index=filtered.index)
        if start is not None:
            in_window &= dates >= start
        if end is not None:
            in_window &= dates <= end
        window = f"filing dates {_iso(start) or 'any'} to {_iso(end) or 'any'} (inclusive)"
        raise ValueError(
            f"uniform_split over {window} selects {int(in_window.sum())} record(s), "
            f"too few to split; {_context(df_all, filtered)}"
        )
    return train, val


def _iso(value: pd.Timestamp | None) -> str | None:
    return None if value is None else str(value.date())


def _context(df: pd.DataFrame, filtered: pd.DataFrame) -> str:
    """What the metadata holds, for an empty-selection error."""
    text = f"the HUPD metadata has {_describe(df)}"
    if len(filtered) != len(df):
        text += f" ({_describe(filtered)} after the label/query filters)"
    return text
