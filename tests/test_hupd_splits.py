"""The official HUPD selection rules, on small hand-built metadata frames."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hfplug.data.hupd_selection import (
    RANDOM_STATE,
    balance_validation,
    date_split,
    filter_by_label,
    filter_by_query,
    parse_filing_date,
    select_splits,
    uniform_split,
    validate_split_dates,
)

DATE_SPLIT = dict(
    train_filing_start_date="2016-01-01",
    train_filing_end_date="2016-01-20",
    val_filing_start_date="2016-01-20",
    val_filing_end_date="2016-02-01",
)


def frame(rows: list[tuple]) -> pd.DataFrame:
    """Metadata from (number, filing date, decision, ipc, cpc) tuples."""
    df = pd.DataFrame(
        rows, columns=["application_number", "filing_date", "decision", "main_ipcr_label", "main_cpc_label"]
    )
    df["filing_date"] = pd.to_datetime(df["filing_date"])
    return df


def numbers(df: pd.DataFrame) -> list[str]:
    return list(df["application_number"])


@pytest.fixture
def month() -> pd.DataFrame:
    """101 applications over January 2016, deliberately not in date order."""
    decisions = ["ACCEPTED", "REJECTED", "PENDING", "ACCEPTED", "CONT-ACCEPTED", "CONT-REJECTED", "CONT-PENDING"]
    rows = [
        (
            f"{15000000 + i}",
            f"2016-01-{1 + (i * 7) % 31:02d}",
            decisions[i % 7],
            ["G06F17/30", "H04L29/06", None][i % 3],
            ["G06F16/24", "H04W4/00", "A61K9/00"][i % 3],
        )
        for i in range(101)
    ]
    return frame(rows)


# --- dates -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "2016/01/01",
        "2016-1-1",
        "16-01-01",
        "2016-01-01T00:00",
        "",
        "2016011",
        "201601011",
        "2016-0101",
        "201601-01",
        "01/02/2016",
    ],
)
def test_malformed_date_names_value_and_format(bad):
    with pytest.raises(ValueError, match=r"train_filing_start_date=.*YYYY-MM-DD or YYYYMMDD"):
        parse_filing_date(bad, "train_filing_start_date")


@pytest.mark.parametrize("value", ["2016-01-21", "20160121"])
def test_both_date_forms_parse_as_upstream_compares_them(value):
    """Upstream compares the raw string with datetime64 filing dates; pandas reads both forms as the same day."""
    assert parse_filing_date(value, "train_filing_start_date") == pd.Timestamp("2016-01-21")
    dates = pd.Series(pd.to_datetime(["2016-01-20", "2016-01-21", "2016-01-22"]))
    assert list(dates >= value) == [False, True, True]  # what the official script does with the string


@pytest.mark.parametrize("value", ["2016-02-30", "20160230", "2016-13-01", "20161301"])
def test_impossible_calendar_date(value):
    with pytest.raises(ValueError, match=f"'{value}'.*valid calendar date"):
        parse_filing_date(value, "val_filing_end_date")


def test_non_string_date_rejected():
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        parse_filing_date(20160101, "val_filing_end_date")  # type: ignore[arg-type]


def test_date_split_needs_all_four_dates():
    with pytest.raises(ValueError, match="Missing val_filing_end_date.*uniform_split=True"):
        validate_split_dates("2016-01-01", "2016-01-20", "2016-01-20", None)


@pytest.mark.parametrize("end", ["2016-01-01", "2015-12-31"])
def test_end_not_after_start_is_an_error(end):
    with pytest.raises(ValueError, match="train_filing_end_date .* must be after train_filing_start_date"):
        validate_split_dates("2016-01-01", end, "2016-01-20", "2016-02-01")


def test_uniform_split_end_before_start_is_an_error():
    with pytest.raises(ValueError, match="before train_filing_start_date"):
        validate_split_dates("2016-01-20", None, None, "2016-01-10", uniform_split=True)


def test_uniform_split_needs_no_dates():
    assert validate_split_dates(uniform_split=True)["val_filing_end_date"] is None


# --- date split ----------------------------------------------------------------------------


def test_date_split_end_dates_are_exclusive():
    df = frame(
        [
            ("1", "2016-01-01", "ACCEPTED", "G06F1/00", "G06F1/00"),
            ("2", "2016-01-19", "ACCEPTED", "G06F1/00", "G06F1/00"),
            ("3", "2016-01-20", "REJECTED", "G06F1/00", "G06F1/00"),
            ("4", "2016-01-31", "REJECTED", "G06F1/00", "G06F1/00"),
            ("5", "2016-02-01", "REJECTED", "G06F1/00", "G06F1/00"),
        ]
    )
    selection = select_splits(df, **DATE_SPLIT)
    assert numbers(selection.train) == ["1", "2"]
    assert numbers(selection.validation) == ["3", "4"]  # 2016-02-01 is the exclusive end


def test_overlapping_windows_put_a_row_in_both():
    df = frame([("1", "2016-01-10", "ACCEPTED", "G06F1/00", "G06F1/00")])
    train, val = date_split(df, *(pd.Timestamp(d) for d in ("2016-01-01", "2016-01-15", "2016-01-05", "2016-01-20")))
    assert numbers(train) == numbers(val) == ["1"]


@pytest.mark.parametrize("compact", [False, True], ids=["iso", "yyyymmdd"])
def test_date_split_matches_upstream_string_comparison(month, compact):
    # upstream compares the datetime column with the raw date strings, and keeps the metadata order
    dates = {k: v.replace("-", "") if compact else v for k, v in DATE_SPLIT.items()}
    selection = select_splits(month, **dates)
    upstream_train = month[
        (month["filing_date"] >= dates["train_filing_start_date"])
        & (month["filing_date"] < dates["train_filing_end_date"])
    ]
    upstream_val = month[
        (month["filing_date"] >= dates["val_filing_start_date"])
        & (month["filing_date"] < dates["val_filing_end_date"])
    ]
    assert numbers(selection.train) == numbers(upstream_train)
    assert numbers(selection.validation) == numbers(upstream_val)
    assert numbers(selection.train) != sorted(
        numbers(selection.train), key=lambda n: month.set_index("application_number").loc[n, "filing_date"]
    )  # metadata order, not date order


# --- uniform split -----------------------------------------------------------------------


def upstream_uniform(df: pd.DataFrame, start: str | None, end: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The official loader's uniform split, transcribed."""
    if start:
        df = df[df["filing_date"] >= start]
    if end:
        df = df[df["filing_date"] <= end]
    df = df.sample(frac=1.0, random_state=RANDOM_STATE)
    num_train_samples = int(len(df) * 0.85)
    return df.iloc[0:num_train_samples], df.iloc[num_train_samples:-1]


@pytest.mark.parametrize("start,end", [(None, None), ("2016-01-05", "2016-01-25"), (None, "2016-01-10")])
def test_uniform_split_matches_upstream_exactly(month, start, end):
    selection = select_splits(month, uniform_split=True, train_filing_start_date=start, val_filing_end_date=end)
    train, val = upstream_uniform(month, start, end)
    assert numbers(selection.train) == numbers(train)
    assert numbers(selection.validation) == numbers(val)


def test_uniform_split_drops_the_last_shuffled_row(month):
    train, val = uniform_split(month)
    shuffled = month.sample(frac=1.0, random_state=RANDOM_STATE)
    assert len(train) == int(0.85 * 101) == 85
    assert len(val) == 101 - 85 - 1
    left_out = set(numbers(month)) - set(numbers(train)) - set(numbers(val))
    assert left_out == {shuffled["application_number"].iloc[-1]}


def test_uniform_split_bounds_are_inclusive():
    df = frame(
        [
            (str(i), f"2016-01-{d:02d}", "ACCEPTED", "G06F1/00", "G06F1/00")
            for i, d in enumerate([4, 5, 10, 15, 20, 25, 26] * 3)
        ]
    )
    train, val = uniform_split(df, pd.Timestamp("2016-01-05"), pd.Timestamp("2016-01-25"))
    kept = pd.concat([train, val])["filing_date"]
    assert kept.min() >= pd.Timestamp("2016-01-05") and kept.max() <= pd.Timestamp("2016-01-25")
    assert len(train) + len(val) == 15 - 1  # 5 dates x 3 in range, minus the dropped row


def test_uniform_split_ignores_inner_dates_with_a_warning(month, caplog):
    selection = select_splits(month, uniform_split=True, train_filing_end_date="2016-01-10")
    train, val = upstream_uniform(month, None, None)
    assert numbers(selection.train) == numbers(train)
    assert "ignores train_filing_end_date" in caplog.text


def test_repeated_metadata_rows_stay_repeated_in_upstream_order(month):
    doubled = pd.concat([month, month.iloc[[3, 10, 3]]], ignore_index=True)  # row 3 three times in all
    selection = select_splits(doubled, uniform_split=True)
    train, val = upstream_uniform(doubled, None, None)
    assert numbers(selection.train) == numbers(train) and numbers(selection.validation) == numbers(val)
    dated = select_splits(doubled, **DATE_SPLIT)
    kept = numbers(dated.train) + numbers(dated.validation)
    assert kept.count(month["application_number"].iloc[3]) == 3 and len(kept) == len(doubled)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=2, max_value=120))
def test_uniform_split_sizes_and_disjointness(n):
    df = frame([(str(i), "2016-01-01", "ACCEPTED", "G06F1/00", "G06F1/00") for i in range(n)])
    train, val = uniform_split(df)
    assert len(train) == int(0.85 * n)
    assert len(val) == n - int(0.85 * n) - 1
    assert not set(numbers(train)) & set(numbers(val))


# --- balancer ----------------------------------------------------------------------------


def test_balancer_cuts_the_larger_class_and_drops_others():
    val = frame(
        [
            (str(i), "2016-01-01", d, "G06F1/00", "G06F1/00")
            for i, d in enumerate(["ACCEPTED"] * 5 + ["REJECTED"] * 2 + ["PENDING", "CONT-ACCEPTED", "CONT-REJECTED"])
        ]
    )
    balanced = balance_validation(val)
    accepted = val[val["decision"] == "ACCEPTED"].sample(frac=1.0, random_state=RANDOM_STATE).iloc[:2]
    assert numbers(balanced) == ["5", "6"] + numbers(accepted)  # rejected first, as upstream
    assert list(balanced["decision"]) == ["REJECTED"] * 2 + ["ACCEPTED"] * 2


def test_balancer_tie_shuffles_rejected():
    val = frame(
        [(str(i), "2016-01-01", d, "G06F1/00", "G06F1/00") for i, d in enumerate(["REJECTED"] * 4 + ["ACCEPTED"] * 4)]
    )
    balanced = balance_validation(val)
    rejected = val[val["decision"] == "REJECTED"].sample(frac=1.0, random_state=RANDOM_STATE)
    assert numbers(balanced) == numbers(rejected) + ["4", "5", "6", "7"]


def test_balancer_applies_to_validation_only(month):
    selection = select_splits(month, **DATE_SPLIT, val_set_balancer=True)
    plain = select_splits(month, **DATE_SPLIT)
    assert numbers(selection.train) == numbers(plain.train)
    counts = selection.validation["decision"].value_counts()
    assert set(counts.index) == {"ACCEPTED", "REJECTED"} and counts["ACCEPTED"] == counts["REJECTED"]


# --- filters -----------------------------------------------------------------------------


def test_ipc_filter_wins_over_cpc(month):
    both = filter_by_label(month, ipcr_label="G06F", cpc_label="H04W")
    assert numbers(both) == numbers(month[month["main_ipcr_label"].str.startswith("G06F", na=False)])
    assert set(both["main_ipcr_label"]) == {"G06F17/30"}


def test_cpc_filter_when_no_ipc(month):
    assert set(filter_by_label(month, cpc_label="H04W")["main_cpc_label"]) == {"H04W4/00"}


def test_missing_labels_never_match(month):
    # a third of the rows have no IPC label; na=False keeps them out instead of raising
    assert filter_by_label(month, ipcr_label="A61K").empty


def test_query_runs_after_the_label_filter(month):
    selection = select_splits(month, uniform_split=True, ipcr_label="H04L", query="decision == 'ACCEPTED'")
    kept = pd.concat([selection.train, selection.validation])
    assert set(kept["decision"]) == {"ACCEPTED"} and set(kept["main_ipcr_label"]) == {"H04L29/06"}
    expected = month[month["main_ipcr_label"].str.startswith("H04L", na=False)].query("decision == 'ACCEPTED'")
    train, val = upstream_uniform(expected, None, None)
    assert numbers(selection.train) == numbers(train)


def test_bad_query_names_the_columns(month):
    with pytest.raises(ValueError, match="query='no_such_column == 1' failed.*available columns: application_number"):
        filter_by_query(month, "no_such_column == 1")


# --- empty selections --------------------------------------------------------------------


def test_dates_selecting_nothing_describe_the_metadata(month):
    with pytest.raises(ValueError) as info:
        select_splits(
            month,
            train_filing_start_date="2017-01-01",
            train_filing_end_date="2017-06-01",
            val_filing_start_date="2016-01-01",
            val_filing_end_date="2016-02-01",
        )
    message = str(info.value)
    assert "train_filing_start_date=2017-01-01" in message and "selects no records" in message
    assert "101 records filed 2016-01-01 to 2016-01-31" in message


def test_empty_validation_window_is_an_error(month):
    with pytest.raises(ValueError, match="val_filing_start_date=2018-01-01.*selects no records"):
        select_splits(
            month,
            train_filing_start_date="2016-01-01",
            train_filing_end_date="2016-02-01",
            val_filing_start_date="2018-01-01",
            val_filing_end_date="2018-02-01",
        )


def test_uniform_window_selecting_nothing(month):
    with pytest.raises(ValueError, match=r"selects 0 record\(s\).*101 records filed 2016-01-01 to 2016-01-31"):
        select_splits(month, uniform_split=True, train_filing_start_date="2019-01-01")


def test_filter_matching_nothing_is_an_error(month):
    with pytest.raises(ValueError, match="ipcr_label='Z99' matched none of the 101 records"):
        select_splits(month, uniform_split=True, ipcr_label="Z99")
