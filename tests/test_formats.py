"""Data formats, prompt/completion and chat data with loss masking, and `finetune prepare`, via the CLI."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import SAMPLE, read_metrics, run_cli

RECIPES = [r.strip() for r in SAMPLE.read_text().split("<|endoftext|>")][:40]


def train(data, model_dir, run, *extra, expect=0):
    return run_cli(
        "train",
        *data,
        "--model",
        model_dir,
        "--run-name",
        run,
        "--steps",
        2,
        "--block-size",
        64,
        "--batch-size",
        4,
        "--eval-every",
        2,
        "--sample-every",
        0,
        "--log-every",
        1,
        *extra,
        expect=expect,
    )


@pytest.fixture
def files(workdir):
    with open(workdir / "recipes.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "body"])
        for i, recipe in enumerate(RECIPES):
            writer.writerow([i, recipe])  # quoted fields with newlines inside
    with open(workdir / "recipes.tsv", "w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["text"])
        for recipe in RECIPES:
            writer.writerow([recipe])
    (workdir / "recipes.jsonl").write_text("".join(json.dumps({"text": r, "n": 1}) + "\n" for r in RECIPES))
    (workdir / "recipes.json").write_text(json.dumps({"data": [{"text": r} for r in RECIPES]}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": RECIPES}), workdir / "recipes.parquet")
    import datasets

    datasets.Dataset.from_dict({"text": RECIPES}).save_to_disk(str(workdir / "saved"))
    pairs = [{"prompt": r.split("\n")[0] + "\n", "completion": "\n".join(r.split("\n")[1:])} for r in RECIPES]
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    chats = [
        {
            "messages": [
                {"role": "system", "content": "You write recipes."},
                {"role": "user", "content": r.split("\n")[0]},
                {"role": "assistant", "content": "\n".join(r.split("\n")[1:4])},
            ]
        }
        for r in RECIPES
    ]
    (workdir / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return workdir


@pytest.mark.parametrize(
    "name, extra",
    [
        ("recipes.csv", ["--text-column", "body"]),
        ("recipes.tsv", []),
        ("recipes.jsonl", []),
        ("recipes.json", []),
        ("recipes.parquet", []),
        ("saved", []),
        ("saved/data-00000-of-00001.arrow", []),
    ],
)
def test_each_format_trains(files, gpt2_dir, name, extra):
    result = train([name], gpt2_dir, "fmt", *extra)
    assert "40 documents" in result.output, result.output
    assert len([m for m in read_metrics(files / "runs/fmt") if "loss" in m]) == 2


def test_formats_mix_in_one_run_and_format_override(files, gpt2_dir):
    (files / "recipes.data").write_text((files / "recipes.jsonl").read_text())
    result = train(["recipes.data"], gpt2_dir, "override", "--format", "jsonl")  # an unknown extension, read as JSONL
    assert "40 documents" in result.output
    result = train(["recipes.jsonl", "recipes.parquet", str(SAMPLE)], gpt2_dir, "mix")
    assert "230 documents" in result.output  # 40 + 40 + 150


def test_prompt_completion_labels_are_masked_token_by_token(files, gpt2_dir):
    from transformers import AutoTokenizer

    from finetune.batching import make_dataloader
    from finetune.config import DataConfig
    from finetune.data_files import resolve_files
    from finetune.token_cache import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    (files / "one.jsonl").write_text(json.dumps({"prompt": "Title: Toast\n", "completion": "Serves: 1"}) + "\n")
    prepared = prepare_data(
        resolve_files([str(files / "one.jsonl")]),
        tokenizer,
        64,
        DataConfig(val_fraction=0, cache_dir=str(files / "c")),
        log=lambda _m: None,
    )
    batch = next(iter(make_dataloader(prepared.train, 1, 0, shuffle=False, pad_id=0)))
    prompt = tokenizer("Title: Toast\n").input_ids
    completion = tokenizer("Serves: 1", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert batch["input_ids"][0].tolist() == prompt + completion
    assert batch["labels"][0].tolist() == [-100] * len(prompt) + completion
    assert batch["attention_mask"][0].tolist() == [1] * (len(prompt) + len(completion))


def test_padding_is_masked_and_batches_group_lengths(files, gpt2_dir):
    from transformers import AutoTokenizer

    from finetune.batching import make_dataloader
    from finetune.config import DataConfig
    from finetune.data_files import resolve_files
    from finetune.token_cache import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    prepared = prepare_data(
        resolve_files([str(files / "pairs.jsonl")]),
        tokenizer,
        512,
        DataConfig(val_fraction=0, cache_dir=str(files / "c")),
        log=lambda _m: None,
    )
    for batch in make_dataloader(prepared.train, 4, 0, shuffle=True, pad_id=0):
        padding = batch["attention_mask"] == 0
        assert (batch["labels"][padding] == -100).all()
    lengths = prepared.train.lengths()
    order = list(iter(make_dataloader(prepared.train, 4, 0, shuffle=True).sampler))
    assert [lengths[i] for i in order] == sorted((lengths[i] for i in order), reverse=True)  # one group of 200


def test_prompt_completion_trains_and_generates(files, gpt2_dir):
    result = train(["pairs.jsonl"], gpt2_dir, "pc")
    assert "40 examples (prompt/completion)" in result.output and "are learned" in result.output
    out = run_cli("generate", "--run", "pc", "--prompt", "Title: Toast\n", "--max-new-tokens", 5, "--seed", 0).stdout
    assert out.startswith("Title: Toast")


def _chat_mask_text(tokenizer, ids, mask):
    return tokenizer.decode([i for i, m in zip(ids, mask) if m])


def test_chat_masking_with_builtin_template(gpt2_dir):
    from transformers import AutoTokenizer

    from finetune.supervised import SIMPLE_CHAT_TEMPLATE, chat_example, ensure_chat_template

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    assert not tokenizer.chat_template
    ensure_chat_template(tokenizer)
    assert tokenizer.chat_template == SIMPLE_CHAT_TEMPLATE
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Serves 4"},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "Time 10"},
    ]
    ids, mask = chat_example(tokenizer, messages)
    learned = _chat_mask_text(tokenizer, ids, mask)
    assert "Serves 4" in learned and "Time 10" in learned
    assert "Hi there" not in learned and "More?" not in learned and "### User" not in learned
    assert ids[-1] == tokenizer.eos_token_id and mask[-1] == 1


def test_chat_masking_with_the_tokenizer_own_template(gpt2_dir):
    from transformers import AutoTokenizer

    from finetune.supervised import chat_example, ensure_chat_template

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer.chat_template = chatml
    ensure_chat_template(tokenizer)
    assert tokenizer.chat_template == chatml  # a template the tokenizer has is kept
    ids, mask = chat_example(
        tokenizer, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Serves 2"}]
    )
    learned = _chat_mask_text(tokenizer, ids, mask)
    assert "Serves 2" in learned and "Hello" not in learned and "user" not in learned


def test_chat_run_trains_and_generate_applies_the_template(files, gpt2_dir):
    result = train(["chats.jsonl"], gpt2_dir, "chat", "--block-size", 256)
    assert "40 examples (chat)" in result.output
    ckpt = files / "runs/chat/checkpoint-000002"
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert "### Assistant" in (config.get("chat_template") or (ckpt / "chat_template.jinja").read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Title: Toast"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt").input_ids
    import torch

    with torch.no_grad():
        reference = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0)[0, ids.shape[1] :]
    out = run_cli(
        "generate", "--run", "chat", "--prompt", "Title: Toast", "--temperature", 0, "--max-new-tokens", 6
    ).stdout
    assert out == "Title: Toast\n" + tokenizer.decode(reference, skip_special_tokens=True) + "\n"


def test_prepared_directory_trains_like_the_raw_files(files, gpt2_dir):
    result = run_cli("prepare", "pairs.jsonl", "--model", gpt2_dir, "--output", "prepared", "--block-size", 64)
    assert "40 examples" in result.output and "truncated" in result.output
    assert (files / "prepared" / "finetune_prepared.json").is_file()
    train(["prepared"], gpt2_dir, "from-prepared")
    train(["pairs.jsonl"], gpt2_dir, "from-raw")

    def first(run):
        return next(m["loss"] for m in read_metrics(files / "runs" / run) if "loss" in m)

    assert first("from-prepared") == first("from-raw")
    result = train(["prepared"], gpt2_dir, "bad-block", "--block-size", 32, expect=2)
    assert "was prepared with --block-size 64" in result.output


def test_prepared_directory_refuses_another_tokenizer(files, gpt2_dir, llama_dir):
    run_cli("prepare", "recipes.jsonl", "--model", gpt2_dir, "--output", "prep", "--block-size", 64)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    tok.add_tokens(["<extra>"])  # a different tokenizer
    tok.save_pretrained(llama_dir / "other")
    import shutil

    for name in ("config.json", "model.safetensors"):
        shutil.copy(llama_dir / name, llama_dir / "other" / name)
    result = train(["prep"], llama_dir / "other", "x", expect=2)
    assert "was prepared with the tokenizer of" in result.output


def test_truncation_is_counted_not_dropped(files, gpt2_dir):
    result = run_cli("prepare", "pairs.jsonl", "--model", gpt2_dir, "--output", "short", "--block-size", 24)
    assert "40 examples" in result.output and "40 truncated to 24 tokens" in result.output
    result = run_cli("prepare", "chats.jsonl", "--model", gpt2_dir, "--output", "shorter", "--block-size", 64)
    assert "left out because truncation removed every learned token (raise --block-size)" in result.output
    result = run_cli(
        "prepare", "chats.jsonl", "--model", gpt2_dir, "--output", "shortest", "--block-size", 16, expect=2
    )
    assert "removed every learned token of all 40 examples; raise --block-size" in result.output


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.csv", 'text\n"fine"\n"broken, "quote\n', "bad.csv:3: malformed row"),
        ("bad.csv", "text,b\n1,2\n1,2,3\n", "bad.csv:3: row has 3 fields, the header has 2"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2: not valid JSON"),
        ("bad.jsonl", '{"text": "ok"}\n[1, 2]\n', "bad.jsonl:2: expected a JSON object"),
        (
            "bad.jsonl",
            '{"body": "x", "id": 1}\n',
            "no 'text' field (nor prompt/completion or messages); fields present: body, id",
        ),
        ("bad.json", '[{"text": "a"}, {"text": ', "bad.json:1: not valid JSON"),
    ],
)
def test_bad_rows_name_file_and_line(files, gpt2_dir, name, content, message):
    (files / name).write_text(content)
    result = train([name], gpt2_dir, "bad", expect=2)
    assert message in result.output and "Traceback" not in result.output


def test_skip_bad_rows_counts_them(files, gpt2_dir):
    lines = [json.dumps({"text": r}) for r in RECIPES] + ["{broken", "[1]"]
    (files / "some-bad.jsonl").write_text("\n".join(lines) + "\n")
    result = train(["some-bad.jsonl"], gpt2_dir, "skip", expect=2)
    assert "--skip-bad-rows" in result.output
    result = train(["some-bad.jsonl"], gpt2_dir, "skip", "--skip-bad-rows")
    assert "40 documents" in result.output and "2 bad rows skipped" in result.output


def test_hub_dataset_without_network(workdir, gpt2_dir):
    result = run_cli("train", "--dataset", "someone/some-data", "--model", gpt2_dir, "--steps", 1, expect=2)
    assert "could not load dataset 'someone/some-data'" in result.output and "Traceback" not in result.output


def test_prepare_refuses_a_taken_output_before_tokenizing(files, gpt2_dir):
    (files / "taken").mkdir()
    (files / "taken" / "mine.txt").write_text("keep")
    result = run_cli("prepare", "pairs.jsonl", "--model", gpt2_dir, "--output", "taken", expect=2)
    assert "already exists and is not empty; choose another --output\n" in result.output
    assert "examples" not in result.output  # nothing was tokenized
    assert (files / "taken" / "mine.txt").read_text() == "keep"
    result = run_cli("prepare", "bad.jsonl", "--model", gpt2_dir, "--output", "never", expect=2)
    assert not (files / "never").exists() and not (files / ".tmp-never").exists()


def test_the_data_formats_are_one_list():
    """--format's choices and the config check read records.FORMATS, the formats the readers handle."""
    from finetune.cli import main
    from finetune.config import DataConfig, RunConfig, validate_run_config
    from finetune.errors import FinetuneError
    from finetune.records import FORMATS

    for command in ("train", "prepare"):
        (option,) = [p for p in main.commands[command].params if p.name == "format"]
        assert tuple(option.type.choices) == FORMATS
    for fmt in (None, *FORMATS):
        validate_run_config(RunConfig(data=DataConfig(paths=["a.txt"], format=fmt)))
    with pytest.raises(FinetuneError, match=f"must be one of {', '.join(FORMATS)}$"):
        validate_run_config(RunConfig(data=DataConfig(paths=["a.txt"], format="xml")))
