import json

import pytest
import zstandard

from common.data import (
    IGNORE_INDEX,
    DataError,
    Record,
    batch_stream,
    build_sft_examples,
    collate_left_padded,
    padding_efficiency,
    plan_batches,
    read_records,
)

ROWS = [{"instruction": "Say hi.", "input": "", "output": "hi"}, {"input": "Q: 1+1?\nA:", "target": " 2"}]


def write(path, text: bytes | str):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


# ---- reading files


def test_jsonl_json_and_zst_read_the_same(tmp_path):
    jsonl = "\n".join(json.dumps(r) for r in ROWS) + "\n\n"
    a = read_records(write(tmp_path / "a.jsonl", jsonl))
    b = read_records(write(tmp_path / "b.json", json.dumps(ROWS)))
    c = read_records(write(tmp_path / "c.jsonl.zst", zstandard.ZstdCompressor().compress(jsonl.encode())))
    assert [r.data for r in a] == [r.data for r in b] == [r.data for r in c] == ROWS
    assert a[1].where.endswith("a.jsonl:2") and b[1].where.endswith("b.json:item 1")


@pytest.mark.parametrize("content,needle", [
    (b'{"input": "x", "target": "y"}\n{"input": "x", "target": \n', "c.jsonl:2: malformed JSON"),
    (b'{"input": "x", "target": "y"}\n["a list"]\n', "c.jsonl:2: expected a JSON object, got list"),
    (b'{"input": "x", "target": "y"}\n{"input": "\xff\xfe"}\n', "c.jsonl:2: not UTF-8"),
    (b"", "no records (empty file)"),
    (b"\n\n", "no records (empty file)"),
])
def test_bad_files_name_file_and_line(tmp_path, content, needle):
    with pytest.raises(DataError) as e:
        read_records(write(tmp_path / "c.jsonl", content))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unsupported file type"):
        read_records(write(tmp_path / "a.csv", "x,y"))


# ---- SFT examples: formats, exact masks, errors


def pieces(tokenizer, example):
    ids, labels = example["input_ids"], example["labels"]
    label_tokens = [label if label == IGNORE_INDEX else tokenizer.convert_ids_to_tokens(label) for label in labels]
    return tokenizer.convert_ids_to_tokens(ids), label_tokens


def test_input_target_mask_is_exact(tokenizer):
    (ex,), _ = build_sft_examples([Record({"input": "Q: 2+3?\nA:", "target": " 5"}, "t:1")], tokenizer, 64)
    toks, labels = pieces(tokenizer, ex)
    assert toks == ["<s>", "▁Q", ":", "▁", "2", "+", "3", "?", "<0x0A>", "A", ":", "▁", "5", "</s>"]
    assert labels == [IGNORE_INDEX] * 11 + ["▁", "5", "</s>"]


def test_alpaca_mask_covers_answer_and_eos_only(tokenizer):
    rec = Record({"instruction": "Reverse the letters.", "input": "a b c", "output": "c b a"}, "t:1")
    (ex,), stats = build_sft_examples([rec], tokenizer, 512)
    toks, labels = pieces(tokenizer, ex)
    assert toks[:2] == ["<s>", "▁Below"] and toks[-8:] == ["###", "▁Response", ":", "<0x0A>", "c", "▁b", "▁a", "</s>"]
    assert labels == [IGNORE_INDEX] * (len(toks) - 4) + ["c", "▁b", "▁a", "</s>"]
    assert "### Input:\na b c" in tokenizer.decode(ex["input_ids"])
    assert stats.trained_tokens == 4


def test_chat_trains_every_assistant_turn_with_end_token(tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "no"}]
    (ex,), _ = build_sft_examples([Record({"messages": msgs}, "t:1")], tokenizer, 512)
    toks, labels = pieces(tokenizer, ex)
    assert toks == ["<s>", "<|user|>", "<0x0A>", "hi", "<0x0A>", "<|assistant|>", "<0x0A>", "ok", "</s>", "<0x0A>",
                    "<|user|>", "<0x0A>", "b", "ye", "<0x0A>", "<|assistant|>", "<0x0A>", "no", "</s>", "<0x0A>"]
    m = IGNORE_INDEX
    assert labels == [m] * 7 + ["ok", "</s>", "<0x0A>"] + [m] * 7 + ["no", "</s>", "<0x0A>"]


def test_prompt_template_chat_renders_alpaca_through_chat_template(tokenizer):
    (ex,), _ = build_sft_examples([Record(ROWS[0], "t:1")], tokenizer, 512, prompt_template="chat")
    text = tokenizer.decode(ex["input_ids"])
    assert text.startswith("<s><|user|>\nSay hi.\n<|assistant|>\n")
    assert "### Instruction" not in text


def test_train_on_prompt_labels_everything(tokenizer):
    (ex,), _ = build_sft_examples([Record(ROWS[1], "t:1")], tokenizer, 64, train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]


def test_truncation_keeps_answer_and_counts_cut(tokenizer):
    rec = Record({"input": "word " * 100, "target": " the answer"}, "t:1")
    (full,), _ = build_sft_examples([rec], tokenizer, 1000)
    (ex,), stats = build_sft_examples([rec], tokenizer, 20)
    n_answer = sum(label != IGNORE_INDEX for label in full["labels"])
    assert len(ex["input_ids"]) == 20 and ex["input_ids"][0] == tokenizer.bos_token_id
    assert ex["input_ids"][-n_answer:] == full["input_ids"][-n_answer:]  # the whole answer survives
    assert ex["labels"][-n_answer:] == full["labels"][-n_answer:]
    assert stats.truncated_examples == 1 and stats.truncated_tokens == len(full["input_ids"]) - 20


def test_truncation_drop_policy(tokenizer):
    recs = [Record({"input": "word " * 100, "target": " a"}, "t:1"), Record(ROWS[1], "t:2")]
    examples, stats = build_sft_examples(recs, tokenizer, 20, truncation="drop")
    assert len(examples) == 1 and stats.dropped_examples == 1


@pytest.mark.parametrize("data,needle", [
    ({"instruction": "x"}, "t:7: missing field 'output'"),
    ({"instruction": "x", "output": 3}, "t:7: field 'output' must be a string, got int"),
    ({"instruction": "x", "output": "  "}, "t:7: field 'output' is empty"),
    ({"input": "x", "target": ""}, "t:7: field 'target' is empty"),
    ({"text": "x"}, "t:7: unrecognized SFT record with fields ['text']"),
    ({"messages": []}, "t:7: field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "x"}]}, "must end with a non-empty assistant message"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "field 'messages[0].role' is 'robot'"),
])
def test_bad_records_name_line_and_field(tokenizer, data, needle):
    with pytest.raises(DataError) as e:
        build_sft_examples([Record(data, "t:7")], tokenizer, 64)
    assert needle in str(e.value)


# ---- batches


def test_left_padding_masks_labels_and_positions():
    batch = collate_left_padded([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                                pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert collate_left_padded([{"input_ids": [1, 2, 3]}], 0, pad_to_multiple_of=8)["input_ids"].shape == (1, 8)


def test_batch_plan_is_deterministic_and_covers_every_example_once():
    lengths = [(i * 37) % 50 + 1 for i in range(103)]
    a = plan_batches(lengths, 4, seed=1, epoch=0, group_by_length=True)
    assert a == plan_batches(lengths, 4, seed=1, epoch=0, group_by_length=True)
    assert a != plan_batches(lengths, 4, seed=1, epoch=1, group_by_length=True)
    assert sorted(i for b in a for i in b) == list(range(103))
    assert max(lengths[i] for i in a[0]) == max(lengths)  # longest batch first
    plain = plan_batches(lengths, 4, seed=1, epoch=0, group_by_length=False)
    assert padding_efficiency(a, lengths) > padding_efficiency(plain, lengths) + 0.2


def test_batch_plan_splits_ranks_evenly():
    lengths = [10] * 10
    per_rank = [plan_batches(lengths, 2, 0, 0, False, rank=r, world_size=3) for r in range(3)]
    assert [len(p) for p in per_rank] == [2, 2, 2]  # 5 batches wrap around to 6
    seen = [i for p in per_rank for b in p for i in b]
    assert set(seen) == set(range(10))


# ---- batch_stream: epochs without end, resumed at a batch


def epoch_plan(epoch: int) -> list[str]:
    """Three batches an epoch, named by epoch and position (a reshuffled epoch would give other names)."""
    return [f"e{epoch}b{i}" for i in range(3)]


def test_batch_stream_goes_epoch_after_epoch_in_order():
    stream = batch_stream(epoch_plan)
    assert [next(stream) for _ in range(7)] == ["e0b0", "e0b1", "e0b2", "e1b0", "e1b1", "e1b2", "e2b0"]


@pytest.mark.parametrize("start_batch", [0, 1, 2, 3, 5, 7])  # inside the first epoch, at its end, across epochs
def test_batch_stream_resumed_at_a_batch_is_the_tail_of_the_whole_stream(start_batch):
    whole = batch_stream(epoch_plan)
    expected = [next(whole) for _ in range(start_batch + 4)][start_batch:]
    resumed = batch_stream(epoch_plan, start_batch)
    assert [next(resumed) for _ in range(4)] == expected


def test_batch_stream_skips_whole_epochs_and_refuses_an_empty_plan():
    planned = []

    def plan(epoch):
        planned.append(epoch)
        return epoch_plan(epoch)

    stream = batch_stream(plan, start_batch=6)
    assert next(stream) == "e2b0" and planned == [0, 1, 2]
    with pytest.raises(ValueError, match="the plan has no batches"):
        next(batch_stream(lambda epoch: []))
