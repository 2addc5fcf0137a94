"""--task abstract: chat examples (exact labels, truncation, drops, pad token), generation, and the recipe end to end."""

import json
import logging
import math
import sys

import pytest
import torch
from conftest import finetune_command, qlora_flags, run_command, run_dirs
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from hfplug import loading
from hfplug.arguments import HupdArguments
from hfplug.chat.format import ChatFormat
from hfplug.config import parse_args
from hfplug.data.collate import causal_lm_collator
from hfplug.data.tasks import (
    IGNORE_INDEX,
    abstract_prompt,
    encode_abstract_example,
    prepare_task,
    tokenize_abstract_splits,
)
from hfplug.model_args import ModelArguments
from hfplug.testing.tiny import build_llama3_tokenizer, build_tiny_llama
from hfplug.training.chat_setup import TRAINING_DATE_STRING, reply_end_ids, training_chat_format
from hfplug.training.generation import generate_batch, generation_records, plan_batches
from hfplug.training.model_setup import check_causal_lm

TEXTS = [
    "A widget comprising a wheel and a battery. The widget turns the wheel.",
    "1. A widget comprising a wheel. 2. The widget of claim 1, wherein the wheel turns.",
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nsystem user assistant\n\n"
    "Write the abstract of a patent application from its claims.\n\nClaims:\n",
] * 30
LLAMA3_PROMPT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    f"Cutting Knowledge Date: December 2023\nToday Date: {TRAINING_DATE_STRING}\n\n<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n"
    "Write the abstract of a patent application from its claims.\n\nClaims:\n1. A widget."
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)


@pytest.fixture
def tok():
    """A fresh Llama-3-style tokenizer (no pad token, no chat template): each test may change it."""
    return build_llama3_tokenizer(TEXTS, vocab_size=600, model_max_length=1024)


@pytest.fixture
def fmt(tok):
    return training_chat_format(tok)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- examples and labels


def test_labels_are_the_abstract_and_end_of_turn_only_exact(tok, fmt):
    ids, labels = encode_abstract_example(fmt, {"claims": "1. A widget."}, "A widget.", max_length=512)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    prompt = tok.convert_tokens_to_ids(tok.tokenize(LLAMA3_PROMPT))  # the layout, spelled out above
    reply = _ids(tok, "A widget.") + [eot]
    assert ids == prompt + reply
    assert labels == [IGNORE_INDEX] * len(prompt) + reply
    assert tok.decode(ids) == LLAMA3_PROMPT + "A widget.<|eot_id|>"
    assert ids.count(tok.bos_token_id) == 1


def test_collated_batch_exact_pad_is_not_eos_and_labels_pad_with_ignore(tok, fmt):
    pad, eos, eot = tok.pad_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.pad_token == "<|finetune_right_pad_id|>" and pad not in (eos, eot)
    a = encode_abstract_example(fmt, {"claims": "1. A widget."}, "A widget.", 512)
    b = encode_abstract_example(fmt, {"claims": "1. A widget comprising a wheel."}, "A wheel.", 512)
    batch = causal_lm_collator(tok)(
        [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels} for ids, labels in (a, b)]
    )
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(len(a[0]), len(b[0]))
    for row, (ids, labels) in enumerate((a, b)):
        fill = width - len(ids)
        assert torch.equal(batch["input_ids"][row], torch.tensor(ids + [pad] * fill))
        assert torch.equal(batch["labels"][row], torch.tensor(labels + [IGNORE_INDEX] * fill))
        assert torch.equal(batch["attention_mask"][row], torch.tensor([1] * len(ids) + [0] * fill))
        assert pad not in ids  # the pad token only ever pads
        assert [t for t in labels if t != IGNORE_INDEX][-1] == eot  # the model learns to stop


def test_truncation_cuts_the_claims_and_keeps_the_abstract_whole(tok, fmt):
    claims = " ".join(f"{i}. A widget comprising a wheel and a battery." for i in range(1, 80))
    abstract = "A widget turns the wheel with a battery."
    full, _ = encode_abstract_example(fmt, {"claims": claims}, abstract, max_length=10_000)
    ids, labels = encode_abstract_example(fmt, {"claims": claims}, abstract, max_length=150)
    assert len(full) > 150 >= len(ids) >= 150 - 3  # cut to fit, and not much more than needed
    reply = _ids(tok, abstract) + [tok.convert_tokens_to_ids("<|eot_id|>")]
    assert [t for t in labels if t != IGNORE_INDEX] == reply
    text = tok.decode(ids)
    kept = text.split("Claims:\n", 1)[1].split("<|eot_id|>", 1)[0]
    assert 20 < len(kept) < len(claims) and claims.startswith(kept)


def test_abstract_alone_too_long_is_dropped_and_counted(tok, fmt, caplog):
    short = "A widget."
    overhead = len(encode_abstract_example(fmt, {"claims": "1. A widget."}, short, 10_000)[0])
    assert encode_abstract_example(fmt, {"claims": "1. A widget."}, short * 40, overhead + 5) is None
    splits = DatasetDict(
        train=Dataset.from_dict({"claims": ["1. A widget.", "1. A wheel."], "abstract": [short, short * 40]}),
        validation=Dataset.from_dict({"claims": ["1. A widget."], "abstract": [short]}),
    )
    with caplog.at_level(logging.WARNING):
        encoded, too_long = tokenize_abstract_splits(splits, fmt, text_fields=["claims"], max_length=overhead + 5)
    assert too_long == {"train": 1, "validation": 0}
    assert len(encoded["train"]) == 1 and set(encoded["train"].column_names) == {
        "input_ids",
        "attention_mask",
        "labels",
    }
    assert "dropped 1 of 2 train record(s): the abstract alone does not fit" in caplog.text


def test_prepare_drops_and_counts_records_without_claims_or_abstract(caplog):
    splits = DatasetDict(
        train=Dataset.from_dict(
            {
                "claims": ["1. A.", "", "1. C.", None],
                "abstract": ["A.", "B.", "  ", "D."],
                "title": ["a", "b", "c", "d"],
            }
        ),
        validation=Dataset.from_dict({"claims": ["1. A."], "abstract": ["A."], "title": ["a"]}),
    )
    with caplog.at_level(logging.WARNING):
        task = prepare_task(splits, "abstract")
    assert task.splits["train"]["claims"] == ["1. A."] and task.label_names == []
    assert task.dropped == {"train": 3}
    assert "dropped 3 of 4 train record(s): empty claims or abstract" in caplog.text
    task.add_dropped({"train": 1, "validation": 2})
    assert task.dropped == {"train": 4, "validation": 2}


def test_several_text_fields_are_introduced_by_name():
    assert abstract_prompt({"title": "Widget ", "claims": "1. A widget."}) == (
        "Write the abstract of a patent application from its title and claims.\n\nTitle:\nWidget\n\nClaims:\n1. A widget."
    )


def test_text_fields_default_per_task_and_abstract_cannot_read_itself():
    (args,) = parse_args((HupdArguments,), ["--task", "abstract"])
    assert args.text_fields == "claims"
    (args,) = parse_args((HupdArguments,), ["--task", "decision"])
    assert args.text_fields == "title,abstract"
    with pytest.raises(
        ValueError, match="text_fields cannot include it \\(got title,abstract\\).*--text_fields claims"
    ):
        parse_args((HupdArguments,), ["--task", "abstract", "--text_fields", "title,abstract"])
    with pytest.raises(ValueError, match="chat_template applies to --task abstract only"):
        parse_args((HupdArguments,), ["--task", "ipc", "--chat_template", "llama3"])


# --------------------------------------------------------------------------- pad token, date, saved template


def test_pad_equal_to_a_reply_end_is_replaced(tok, caplog):
    tok.pad_token = "<|eot_id|>"  # as some community tokenizers ship
    with caplog.at_level(logging.WARNING):
        chat_format = training_chat_format(tok)
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert "pads with '<|eot_id|>', which also ends a reply" in caplog.text
    assert sorted(reply_end_ids(chat_format)) == sorted(tok.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"]))


def test_no_pad_but_eos_is_a_clear_error(tok, monkeypatch):
    monkeypatch.setattr(loading, "PAD_CANDIDATES", ())  # a vocabulary without any pad-like token
    with pytest.raises(
        ValueError, match="no token to pad with other than the ones a reply ends with.*add_special_tokens"
    ):
        training_chat_format(tok)


def test_a_pad_that_is_another_stop_token_is_kept():
    # Qwen-style ChatML: eos <|im_end|> ends replies; <|endoftext|> pads and never occurs in a reply.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(
        TEXTS,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    qwen = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    chat_format = training_chat_format(qwen)
    assert chat_format.name == "chatml" and qwen.pad_token == "<|endoftext|>"


def test_saved_tokenizer_chats_exactly_as_training_prompted(tok, fmt, tmp_path):
    assert f"Today Date: {TRAINING_DATE_STRING}" in fmt.render([{"role": "user", "content": "hi"}])
    tok.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    assert saved.pad_token == "<|finetune_right_pad_id|>"
    chat = ChatFormat.from_tokenizer(saved)  # what recipes/chat.py builds: no template kwargs
    assert chat.name == "tokenizer"
    user = [{"role": "user", "content": abstract_prompt({"claims": "1. A widget."})}]
    assert chat.encode(user, add_generation_prompt=True) == fmt.encode(user, add_generation_prompt=True)
    before = saved.chat_template
    training_chat_format(saved)  # training again from the saved adapter: the default is not added twice
    assert saved.chat_template == before


def test_encoder_model_is_refused_for_abstract(repo):
    with pytest.raises(ValueError, match="needs a causal \\(decoder-only\\) language model.*BertModel \\(bert\\)"):
        check_causal_lm(ModelArguments(model_name_or_path=str(repo / "assets" / "tiny-bert")))


# --------------------------------------------------------------------------- generation


def test_generation_records_split_prompt_and_reference(tok, fmt):
    examples = [
        encode_abstract_example(fmt, {"claims": c}, a, 512)
        for c, a in (("1. A widget.", "A widget."), ("1. A wheel comprising a widget.", "A wheel turns."))
    ]
    dataset = Dataset.from_dict({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]})
    records = generation_records(dataset, 5, tok)
    assert [r.index for r in records] == [0, 1]
    assert tok.decode(records[0].prompt_ids) == LLAMA3_PROMPT
    assert [r.reference for r in records] == ["A widget.", "A wheel turns."]


def test_batch_plan_is_the_same_for_any_number_of_processes():
    prompts = [[0] * n for n in (5, 3, 9, 3, 7)]
    assert plan_batches(prompts, 2) == [[1, 3], [0, 4], [2]]
    shards = [plan_batches(prompts, 2)[rank::2] for rank in range(2)]
    assert sorted(i for shard in shards for batch in shard for i in batch) == [0, 1, 2, 3, 4]


def test_batched_greedy_generation_equals_one_by_one(tok, fmt):
    model = build_tiny_llama(tok, max_position_embeddings=1024).eval()
    prompts = [
        fmt.encode([{"role": "user", "content": text}], add_generation_prompt=True)
        for text in ("1. A widget.", "1. A widget comprising a wheel and a battery, wherein it turns.")
    ]

    def generate(batch):
        return generate_batch(model, fmt, batch, max_new_tokens=24, pad_token_id=tok.pad_token_id)

    together = generate(prompts)
    assert together == [generate([p])[0] for p in prompts] and all(together)  # left padding changes nothing
    # Greedy whatever the model's own generation config asks for (generate() fills unset settings from it;
    # a repetition penalty of 2 changes these replies when it is applied).
    model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=2.0)
    assert generate(prompts) == together
    assert not model.training


# --------------------------------------------------------------------------- the recipe end to end


def _flags(out, *extra):
    return (
        *run_dirs(out),
        "--task",
        "abstract",
        "--text_fields",
        "claims",
        "--max_length",
        "512",
        "--max_eval_samples",
        "16",
        "--max_generate_samples",
        "6",
        "--max_new_tokens",
        "8",
        "--per_device_eval_batch_size",
        "4",
        "--logging_steps",
        "2",
        *extra,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    """One short 4-bit + LoRA run of --task abstract on the tiny Llama: evaluated at steps 2 and 3 (the last), then once more."""
    out = tmp_path_factory.mktemp("abstract") / "out"
    flags = _flags(
        out,
        *qlora_flags(tiny_llama_dir),
        "--max_steps",
        "3",
        "--max_train_samples",
        "64",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--log_samples",
        "2",
    )
    proc = run_command(finetune_command(*flags))
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out, proc.stdout


@pytest.mark.slow
def test_abstract_run_with_every_long_context_technique(tmp_path, tiny_llama_dir):
    """--long_context all on CPU: each technique installed and named in the log; training and evaluation (loss from
    the chunked loss, ROUGE from generation, which still gets logits) work through them."""
    out = tmp_path / "out"
    flags = _flags(
        out,
        *("--model_name_or_path", str(tiny_llama_dir), "--quant", "4bit", "--lora", "true", "--lora_r", "8"),
        *("--lora_dropout", "0", "--max_steps", "2", "--max_train_samples", "16", "--eval_strategy", "no"),
        *("--activation_checkpointing", "true", "--long_context", "all", "--max_host_memory", "1GiB"),
    )
    proc = run_command(finetune_command(*flags))
    assert proc.returncode == 0, proc.stdout[-4000:]
    for technique in ("frozen_16bit", "efficient_attention", "chunked_loss", "tiled_mlp", "offload_activations"):
        assert f"--long_context {technique}:" in proc.stdout, technique
    results = json.loads((out / "all_results.json").read_text())
    assert math.isfinite(results["eval_loss"]) and results["eval_perplexity"] == pytest.approx(
        math.exp(results["eval_loss"])
    )
    assert results["eval_generated_samples"] == 6


@pytest.mark.slow
def test_abstract_run_reports_loss_perplexity_rouge_and_counts(trained):
    out, log = trained
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    for key in ("eval_rouge1", "eval_rouge2", "eval_rougeL"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["eval_generated_samples"] == 6
    # 16 validation records, one whose abstract alone fills 512 tiny-tokenizer tokens.
    assert results["eval_samples"] + results["eval_dropped_records"] == 16
    assert "padding with '<|finetune_right_pad_id|>'" in log and "optim=paged_adamw_8bit" in log
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "eval_rougeL" in e] == [
        2,
        3,
    ]  # trainer_state.json is saved before the final one


@pytest.mark.slow
def test_abstract_run_saves_a_lora_adapter_on_all_linear_layers_and_no_head(trained):
    out, _ = trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config["modules_to_save"]
    adapted = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}  # PEFT stores all-linear expanded
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not (out / "model.safetensors").exists()
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names), names  # no lm_head or embeddings


@pytest.mark.slow
def test_abstract_run_saves_the_tokenizer_with_its_chat_template(trained):
    out, _ = trained
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.pad_token == "<|finetune_right_pad_id|>"
    assert saved.chat_template is not None and f'date_string = "{TRAINING_DATE_STRING}"' in saved.chat_template


@pytest.mark.slow
def test_sample_generations_are_written_at_each_evaluation(trained):
    out, log = trained
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    # Steps 2 and 3 during training, then the recipe's final evaluate (still step 3); records 0 and 1 each time.
    assert [(line["step"], line["index"]) for line in lines] == [(2, 0), (2, 1), (3, 0), (3, 1), (3, 0), (3, 1)]
    assert all(line["reference"] and isinstance(line["generated"], str) for line in lines)
    assert "Sample generation, step 2, validation record 0" in log


@pytest.mark.slow
def test_chat_with_the_trained_adapter(trained):
    out, _ = trained
    prompt = abstract_prompt({"claims": "1. A widget comprising a wheel."})
    proc = run_command(
        [
            sys.executable,
            "recipes/chat.py",
            "--adapter",
            str(out),
            "--prompt",
            prompt,
            "--do_sample",
            "false",
            "--max_new_tokens",
            "8",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Loading the LoRA adapter" in proc.stdout
    assert "has no chat template" not in proc.stdout  # the saved tokenizer carries the training format


@pytest.mark.slow
def test_two_processes_score_every_generated_record_once(trained, tmp_path):
    out, _ = trained
    again = tmp_path / "eval2"
    flags = _flags(
        again,
        "--model_name_or_path",
        str(out),
        "--quant",
        "4bit",
        "--do_train",
        "false",
        "--do_eval",
        "true",
        "--log_samples",
        "0",
    )
    proc = run_command(finetune_command(*flags, processes=2))
    assert proc.returncode == 0, proc.stdout[-4000:]
    one = json.loads((out / "eval_results.json").read_text())
    two = json.loads((again / "eval_results.json").read_text())
    assert two["eval_generated_samples"] == one["eval_generated_samples"] == 6
    for key in ("eval_rouge1", "eval_rouge2", "eval_rougeL"):
        assert two[key] == pytest.approx(one[key]), key
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    assert not (again / "samples.jsonl").exists()


@pytest.mark.slow
def test_abstract_with_an_encoder_model_is_a_clear_error(tmp_path):
    proc = run_command(finetune_command(*_flags(tmp_path / "out")))  # quickstart's model: tiny BERT
    assert proc.returncode != 0
    assert "--task abstract writes text, so it needs a causal (decoder-only) language model" in proc.stdout
