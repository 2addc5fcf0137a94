"""Task labels, section selection, tokenization and the padding collator."""

import logging

import pytest
import torch
from datasets import Dataset, DatasetDict

from hfplug.data import padding_collator, parse_text_fields, prepare_task, tokenize_splits
from hfplug.testing.tiny import build_bert_tokenizer

DECISIONS = ["ACCEPTED", "REJECTED", "CONT-ACCEPTED", "PENDING", "CONT-REJECTED", "CONT-PENDING"]


def _records(decisions, ipcs):
    n = len(decisions)
    return {
        "decision": decisions,
        "ipc_label": ipcs,
        "title": [f"title {i}" for i in range(n)],
        "abstract": [f"an abstract about widget {i}" for i in range(n)],
        "claims": [f"claim {i}" if i % 2 else "" for i in range(n)],
    }


@pytest.fixture
def splits():
    return DatasetDict(
        train=Dataset.from_dict(
            _records(
                DECISIONS + ["ACCEPTED"], ["G06F17/30", "H01L21/00", "G06F3/01", "A61K9/00", "", "H01L1/1", "G06F1/1"]
            )
        ),
        validation=Dataset.from_dict(
            _records(["REJECTED", "ACCEPTED", "PENDING"], ["G06F9/44", "B65D1/1", "H01L3/3"])
        ),
    )


@pytest.fixture(scope="module")
def tokenizer():
    return build_bert_tokenizer(
        ["an abstract about widget claim title"] * 20 + [str(i) for i in range(10)], vocab_size=200
    )


def test_decision_keeps_accepted_and_rejected_only(splits, caplog):
    with caplog.at_level(logging.WARNING):
        task = prepare_task(splits, "decision")
    assert task.label_names == ["REJECTED", "ACCEPTED"]
    assert task.splits["train"]["decision"] == ["ACCEPTED", "REJECTED", "ACCEPTED"]
    assert task.splits["train"]["label"] == [1, 0, 1]
    assert task.splits["validation"]["label"] == [0, 1]
    assert task.dropped == {"train": 4, "validation": 1}
    assert "dropped 4 of 7 train" in caplog.text


def test_ipc_labels_from_train_and_unseen_validation_counted(splits):
    task = prepare_task(splits, "ipc")
    assert task.label_names == ["A61K", "G06F", "H01L"]  # "" (no label) is not a class
    assert task.splits["train"]["label"] == [1, 2, 1, 0, 2, 1]
    # B65D never occurs in training: it cannot be predicted, so it is dropped and counted.
    assert task.splits["validation"]["ipc_label"] == ["G06F9/44", "H01L3/3"]
    assert task.dropped == {"train": 1, "validation": 1}


def test_ipc_with_a_single_class_is_an_error():
    one = DatasetDict(train=Dataset.from_dict(_records(["ACCEPTED"] * 2, ["G06F1/1", "G06F2/2"])))
    with pytest.raises(ValueError, match="at least 2 IPC subclasses.*found 1 \\(G06F\\)"):
        prepare_task(one, "ipc")


def test_unknown_task():
    with pytest.raises(ValueError, match="Unknown task 'abstracts'. Allowed: decision, ipc"):
        prepare_task(DatasetDict(), "abstracts")


def test_text_fields_parsing():
    assert parse_text_fields("claims, title") == ["claims", "title"]
    with pytest.raises(ValueError, match="twice"):
        parse_text_fields("title,title")
    with pytest.raises(ValueError, match="empty"):
        parse_text_fields(" , ")


def test_tokenize_joins_sections_in_order_without_padding(splits, tokenizer):
    task = prepare_task(splits, "decision")
    enc = tokenize_splits(
        task.splits, tokenizer, text_fields=["abstract", "title", "claims"], max_length=64, add_length=True
    )
    assert set(enc["train"].column_names) == {"input_ids", "attention_mask", "label", "length"}
    first = tokenizer.decode(enc["train"][0]["input_ids"])
    assert first == "[CLS] an abstract about widget 0 [SEP] title 0 [SEP]"  # empty claims skipped, no padding
    lengths = [len(ids) for ids in enc["train"]["input_ids"]]
    assert enc["train"]["length"] == lengths and len(set(lengths)) > 1


def test_tokenize_truncates_to_max_length(splits, tokenizer):
    enc = tokenize_splits(
        prepare_task(splits, "decision").splits, tokenizer, text_fields=["title", "abstract"], max_length=5
    )
    assert max(len(ids) for ids in enc["train"]["input_ids"]) == 5


def test_collator_pads_batch_to_multiple_of_8_exactly(tokenizer):
    collate = padding_collator(tokenizer)
    pad = tokenizer.pad_token_id
    batch = collate(
        [
            {"input_ids": [2, 10, 11, 3], "attention_mask": [1, 1, 1, 1], "label": 1},
            {"input_ids": [2, 12, 13, 14, 15, 16, 17, 18, 19, 3], "attention_mask": [1] * 10, "label": 0},
        ]
    )
    assert torch.equal(
        batch["input_ids"],
        torch.tensor(
            [
                [2, 10, 11, 3] + [pad] * 12,
                [2, 12, 13, 14, 15, 16, 17, 18, 19, 3] + [pad] * 6,
            ]
        ),
    )
    assert torch.equal(batch["attention_mask"], torch.tensor([[1] * 4 + [0] * 12, [1] * 10 + [0] * 6]))
    assert torch.equal(batch["labels"], torch.tensor([1, 0]))


def test_collator_short_batch_is_not_padded_to_max_length(tokenizer):
    batch = padding_collator(tokenizer)([{"input_ids": [2, 3], "attention_mask": [1, 1], "label": 0}])
    assert batch["input_ids"].shape == (1, 8)


def test_collator_needs_pad_token():
    class NoPad:
        pad_token = None

    with pytest.raises(ValueError, match="no pad token"):
        padding_collator(NoPad())


# --- abstract --------------------------------------------------------------------------


def test_abstract_keeps_records_with_claims_and_abstract(splits):
    task = prepare_task(splits, "abstract")
    assert task.label_names == [] and "label" not in task.splits["train"].column_names
    assert task.splits["train"]["claims"] == ["claim 1", "claim 3", "claim 5"]  # even records have no claims
    assert task.dropped == {"train": 4, "validation": 2}
    with pytest.raises(ValueError, match="cannot include it"):
        prepare_task(splits, "abstract", text_fields=["claims", "abstract"])


def test_causal_lm_collator_pads_labels_with_ignore_index_exactly(tokenizer):
    from hfplug.data.collate import causal_lm_collator

    pad = tokenizer.pad_token_id
    batch = causal_lm_collator(tokenizer)(
        [
            {"input_ids": [2, 10, 11], "attention_mask": [1, 1, 1], "labels": [-100, 11, 3]},
            {
                "input_ids": [2, 12, 13, 14, 15, 16, 17, 18, 19],
                "attention_mask": [1] * 9,
                "labels": [-100] * 5 + [16, 17, 18, 19],
            },
        ]
    )
    assert torch.equal(
        batch["input_ids"], torch.tensor([[2, 10, 11] + [pad] * 13, [2, 12, 13, 14, 15, 16, 17, 18, 19] + [pad] * 7])
    )
    assert torch.equal(batch["attention_mask"], torch.tensor([[1] * 3 + [0] * 13, [1] * 9 + [0] * 7]))
    assert torch.equal(
        batch["labels"], torch.tensor([[-100, 11, 3] + [-100] * 13, [-100] * 5 + [16, 17, 18, 19] + [-100] * 7])
    )


def test_causal_lm_collator_needs_pad_token():
    from hfplug.data.collate import causal_lm_collator

    class NoPad:
        pad_token = None

    with pytest.raises(ValueError, match="no pad token"):
        causal_lm_collator(NoPad())
