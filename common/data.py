"""Reading records, building SFT examples with prompt masking, left-padded batches and the batch plan.

The contract every recipe inherits:
- `read_records(path)` reads .jsonl, .json (a list of objects) and .jsonl.zst; a bad line is a `DataError` naming
  file, line and field.
- An example is `{"input_ids": [...], "labels": [...]}`; labels are -100 wherever no loss is wanted (prompt, pad).
- Batches are left-padded (pads first) with attention_mask 0 on pads and position_ids counting real tokens from 0,
  so a row's logits do not depend on how much padding it got.
"""
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import UserError

IGNORE_INDEX = -100  # label value that carries no loss (prompt and pad positions)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataError(UserError):
    """Bad input data; the message names the file, line and field."""


@dataclass
class Record:
    data: dict
    where: str  # "path:line" (jsonl) or "path:item N" (json list), for error messages


def read_records(path) -> list[Record]:
    """Read JSON objects from .jsonl, .jsonl.zst or .json (a list); fail with file:line on the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    name = path.name
    raw = path.read_bytes()
    if name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
        name = name[: -len(".zst")]
    if name.endswith(".json"):
        try:
            items = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(items).__name__}")
        records = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise DataError(f"{path}:item {i}: expected a JSON object, got {type(item).__name__}")
            records.append(Record(item, f"{path}:item {i}"))
    elif name.endswith(".jsonl"):
        records = []
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line)") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(item, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
            records.append(Record(item, f"{path}:{lineno}"))
    else:
        raise DataError(f"{path}: unsupported file type; expected .jsonl, .json or .jsonl.zst")
    if not records:
        raise DataError(f"{path}: no records (empty file)")
    return records


def require_str(record: Record, field: str, allow_empty=False) -> str:
    if field not in record.data:
        raise DataError(f"{record.where}: missing field '{field}'")
    value = record.data[field]
    if not isinstance(value, str):
        raise DataError(f"{record.where}: field '{field}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{record.where}: field '{field}' is empty")
    return value


# ---------------------------------------------------------------------------------------------------------------
# SFT: a record becomes text segments, each trained on or not, then token ids and labels.


def sft_format(record: Record) -> str:
    keys = record.data.keys()
    if "messages" in keys:
        return "chat"
    if "instruction" in keys or "output" in keys:
        return "alpaca"
    if "target" in keys:
        return "input_target"
    raise DataError(
        f"{record.where}: unrecognized SFT record with fields {sorted(keys)}; expected alpaca "
        "{instruction, input?, output}, {input, target} or chat {messages: [{role, content}, ...]}"
    )


def chat_messages(record: Record) -> list[dict]:
    messages = record.data["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{record.where}: field 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{record.where}: field 'messages[{i}]' must be an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            role = m["role"]
            raise DataError(f"{record.where}: field 'messages[{i}].role' is {role!r}; "
                            "expected system, user or assistant")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError(f"{record.where}: field 'messages' must end with a non-empty assistant message")
    return messages


def prompt_and_answer(record: Record, fmt: str, alpaca_template=True) -> tuple[str, str]:
    """alpaca and input/target records as (prompt, answer) text; alpaca_template=False gives the bare instruction
    (plus input) as the prompt, for a chat template to wrap."""
    if fmt == "alpaca":
        instruction = require_str(record, "instruction")
        extra = record.data.get("input", "")
        if not isinstance(extra, str):
            raise DataError(f"{record.where}: field 'input' must be a string, got {type(extra).__name__}")
        answer = require_str(record, "output")
        if not alpaca_template:
            return (f"{instruction}\n\n{extra}" if extra.strip() else instruction), answer
        template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=instruction, input=extra), answer
    return require_str(record, "input", allow_empty=True), require_str(record, "target")


def sft_segments(record: Record, tokenizer, prompt_template: str) -> tuple[list[tuple[str, bool]], bool]:
    """Text segments [(text, train_on_it)] and whether the tokenizer's BOS/EOS must be added around them.

    prompt_template "alpaca": alpaca records use the Alpaca prompt, input/target records are raw prompt + answer.
    prompt_template "chat": every record goes through the tokenizer's chat template (chat records always do).
    """
    fmt = sft_format(record)
    if fmt == "chat" or prompt_template == "chat":
        if fmt == "chat":
            messages = chat_messages(record)
        else:
            prompt, answer = prompt_and_answer(record, fmt, alpaca_template=False)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return chat_segments(messages, tokenizer, record.where), False
    prompt, answer = prompt_and_answer(record, fmt)
    return [(prompt, False), (answer, True)], True


def chat_segments(messages, tokenizer, where) -> list[tuple[str, bool]]:
    """Split a rendered conversation into prompt parts and assistant replies (each reply trained on).

    Reply i spans from the rendering of messages[:i] with the generation prompt to the rendering of messages[:i+1],
    so the reply includes the template's end-of-turn token and the model learns to stop.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat data needs a tokenizer with a chat template; this tokenizer has none")

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, after = render(messages[:i], True), render(messages[: i + 1], False)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError(f"{where}: the chat template does not render the conversation prefix by prefix; "
                            "cannot tell the replies apart")
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    full = render(messages, False)
    if len(full) > len(done):
        segments.append((full[len(done):], False))
    return [s for s in segments if s[0]]


END_OF_TURN_PROBE = "END-OF-TURN-PROBE"  # an assistant reply rendered to find what the template puts after replies


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token the chat template puts right after an assistant reply (Llama 3 <|eot_id|>, ChatML
    <|im_end|>, EOS for the [INST] templates), as [id]: the token that chat_segments trains at the end of every reply,
    so the one generation must stop at. [] without a chat template or when plain text follows a reply."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": END_OF_TURN_PROBE}]
    replies = [text for text, trained in chat_segments(probe, tokenizer, "the chat template") if trained]
    after_reply = replies[0].split(END_OF_TURN_PROBE, 1)[-1] if replies else ""
    ids = tokenizer(after_reply.lstrip(), add_special_tokens=False).input_ids  # Llama 2: ' </s>'
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return ids[:1] if ids and ids[0] in special else []


def tokenize_segments(segments, tokenizer, add_bos_eos: bool) -> tuple[list[int], list[bool]]:
    """Tokenize the concatenated text once (ids equal what inference sees); mark the tokens of trained segments.

    A token belongs to the segment where its text ends; zero-width special tokens (BOS) belong to none.
    """
    text = "".join(t for t, _ in segments)
    enc = tokenizer(text, add_special_tokens=add_bos_eos, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    spans, pos = [], 0
    for seg_text, trained in segments:
        if trained:
            spans.append((pos, pos + len(seg_text)))
        pos += len(seg_text)
    is_answer = [end > start and any(s < end <= e for s, e in spans) for start, end in offsets]
    if add_bos_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; SFT needs one to teach the model to stop")
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
            is_answer.append(True)
    return ids, is_answer


def truncate_keep_answer(ids: list[int], is_answer: list[bool], max_len: int, keep_first: int):
    """Cut to max_len tokens keeping the last answer: drop prompt tokens from the left (after the first
    `keep_first`, the BOS), then, if the answer alone is too long, its end. Returns ids, is_answer, tokens cut."""
    excess = len(ids) - max_len
    if excess <= 0:
        return ids, is_answer, 0
    last_answer_start = len(ids)
    while last_answer_start > 0 and not is_answer[last_answer_start - 1]:
        last_answer_start -= 1  # skip a trailing non-answer tail (template text after the last reply)
    while last_answer_start > 0 and is_answer[last_answer_start - 1]:
        last_answer_start -= 1
    cut_left = min(excess, max(0, last_answer_start - keep_first))
    ids = ids[:keep_first] + ids[keep_first + cut_left:]
    is_answer = is_answer[:keep_first] + is_answer[keep_first + cut_left:]
    return ids[:max_len], is_answer[:max_len], excess


@dataclass
class DataStats:
    examples: int = 0
    tokens: int = 0  # total input tokens after truncation
    trained_tokens: int = 0  # tokens that carry loss
    truncated_examples: int = 0
    truncated_tokens: int = 0
    dropped_examples: int = 0  # with truncation="drop", or left with no trained token

    def summary(self) -> str:
        trained = f" ({self.trained_tokens:,} trained)" if self.trained_tokens else ""
        return (f"{self.examples:,} examples, {self.tokens:,} tokens{trained}, "
                f"{self.truncated_examples:,} truncated ({self.truncated_tokens:,} tokens cut), "
                f"{self.dropped_examples:,} dropped")


def build_sft_examples(records, tokenizer, max_seq_len: int, prompt_template="alpaca", train_on_prompt=False,
                       truncation="keep_answer") -> tuple[list[dict], DataStats]:
    """Records to examples {input_ids, labels}. truncation: "keep_answer" (cut the prompt's start first) or "drop"."""
    if prompt_template not in ("alpaca", "chat"):
        raise ValueError(f"prompt_template must be 'alpaca' or 'chat', got {prompt_template!r}")
    if truncation not in ("keep_answer", "drop"):
        raise ValueError(f"truncation must be 'keep_answer' or 'drop', got {truncation!r}")
    examples, stats = [], DataStats()
    for record in records:
        segments, add_bos_eos = sft_segments(record, tokenizer, prompt_template)
        ids, is_answer = tokenize_segments(segments, tokenizer, add_bos_eos)
        if len(ids) > max_seq_len:
            if truncation == "drop":
                stats.dropped_examples += 1
                continue
            keep_first = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
            ids, is_answer, cut = truncate_keep_answer(ids, is_answer, max_seq_len, keep_first)
            stats.truncated_examples += 1
            stats.truncated_tokens += cut
        labels = [t if (answer or train_on_prompt) else IGNORE_INDEX for t, answer in zip(ids, is_answer)]
        n_trained = sum(label != IGNORE_INDEX for label in labels[1:])  # position 0 is never predicted
        if n_trained == 0:
            stats.dropped_examples += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
        stats.examples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += n_trained
    if not examples:
        raise DataError(f"no usable examples: all {len(records)} records were dropped (max_seq_len={max_seq_len})")
    return examples, stats


TRAINED_MARKERS = ("[[", "]]")  # around trained (labelled) text in render_trained_example
TRAINED_COLOR = ("\033[32m", "\033[0m")  # green instead, when the text goes to a terminal


def trained_pieces(example: dict, tokenizer) -> list[tuple[str, bool]]:
    """An example's decoded text as [(text, trained)] pieces, one per run of tokens that are (or are not) labelled.
    Special tokens are kept. Each run's text is the difference of two decoded prefixes, so spaces a tokenizer only
    shows after an earlier token (SentencePiece's '▁') come out as in the whole decoded text."""
    ids, labels = example["input_ids"], example["labels"]
    trained = [i > 0 and label != IGNORE_INDEX for i, label in enumerate(labels)]  # position 0 is never predicted
    pieces, start, done = [], 0, ""
    for end in range(1, len(ids) + 1):
        if end < len(ids) and trained[end] == trained[start]:
            continue
        upto = tokenizer.decode(ids[:end], skip_special_tokens=False)
        run_alone = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        text = upto[len(done):] if upto.startswith(done) else run_alone
        pieces.append((text, trained[start]))
        start, done = end, upto
    return pieces


def cut_middle(pieces: list[tuple[str, bool]], max_chars: int) -> list[tuple[str, bool]]:
    """Keep the first and last max_chars // 2 characters of the pieces' text, a ' [... N characters ...] ' piece
    (not trained) between them."""
    total = sum(len(text) for text, _ in pieces)
    if total <= max_chars:
        return pieces
    head_left, tail_from = max_chars // 2, total - (max_chars - max_chars // 2)
    head, tail, pos = [], [], 0
    for text, trained in pieces:
        if pos < head_left:
            head.append((text[:head_left - pos], trained))
        if pos + len(text) > tail_from:
            tail.append((text[max(0, tail_from - pos):], trained))
        pos += len(text)
    cut_note = (f" [... {tail_from - head_left:,} characters ...] ", False)
    return head + [cut_note] + tail


def render_trained_example(example: dict, tokenizer, max_chars: int = 2000, color: bool | None = None) -> str:
    """One example (or packed row) as decoded text with the trained (labelled) part marked, for the start-up block
    and --inspect_data: special tokens shown, trained text inside [[ ]] (green instead when color, which defaults
    to whether stdout is a terminal), an example longer than max_chars cut in the middle."""
    import sys

    use_color = sys.stdout.isatty() if color is None else color
    opening, closing = TRAINED_COLOR if use_color else TRAINED_MARKERS
    rendered = []
    for text, trained in cut_middle(trained_pieces(example, tokenizer), max_chars):
        rendered.append(f"{opening}{text}{closing}" if trained and text else text)
    return "".join(rendered)


def length_summary(examples: list[dict]) -> str:
    """The shortest, median and longest example in tokens."""
    lengths = sorted(len(e["input_ids"]) for e in examples)
    median = lengths[len(lengths) // 2]
    return f"lengths min {lengths[0]:,}, median {median:,}, max {lengths[-1]:,} tokens"


def sft_data_report(tokenizer, data_path, examples: list[dict], stats: DataStats, eval_path="", eval_stats=None,
                    packed_rows: list[dict] | None = None, max_seq_len: int = 0) -> list[str]:
    """The start-up block's data lines of an SFT recipe, also all that --inspect_data prints: counts of examples,
    tokens, trained tokens, truncated and dropped ones, lengths, the packing, and the first training example (and
    the first packed row) rendered with its trained part marked."""
    lines = [f"data     train {data_path}: {stats.summary()}", f"         train {length_summary(examples)}"]
    if eval_stats is not None:
        lines.append(f"         eval  {eval_path}: {eval_stats.summary()}")
    if packed_rows is not None:
        packed_tokens = sum(len(row["input_ids"]) for row in packed_rows)
        fill = packed_tokens / max(len(packed_rows) * max_seq_len, 1)
        lines.append(f"packing  {len(examples):,} examples in {len(packed_rows):,} rows of up to {max_seq_len:,} "
                     f"tokens, {fill:.1%} full")
    lines.append(f"example  {render_trained_example(examples[0], tokenizer)}")
    if packed_rows:
        lines.append(f"packed row 1 {render_trained_example(packed_rows[0], tokenizer)}")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Batching: left padding and the order of batches.


def collate_left_padded(examples: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Left-pad a list of {input_ids, labels?} into tensors; pads get attention 0, label -100, position 0."""
    longest = max(len(e["input_ids"]) for e in examples)
    width = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, width - n:] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention_mask[row, width - n:] = 1
        if "labels" in e:
            labels[row, width - n:] = torch.tensor(e["labels"], dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if "labels" in examples[0]:
        batch["labels"] = labels
    return batch


def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool,
                 rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches (lists of example indices) for one epoch; deterministic in (seed, epoch).

    group_by_length: shuffle, then sort within windows of 64 batches by length so a batch holds similar lengths
    (less padding), shuffle the batches and put the longest first (an out-of-memory shows at step 1, not hour 5).
    Every rank gets the same number of batches: the plan wraps around to fill the last round.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * 64
        order = [i for w in range(0, len(order), window)
                 for i in sorted(order[w:w + window], key=lambda i: -lengths[i])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length and len(batches) > 1:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        first = batches.pop(longest)
        rng.shuffle(batches)
        batches.insert(0, first)
    rounds = math.ceil(len(batches) / world_size)
    batches += batches[: rounds * world_size - len(batches)]
    return batches[rank::world_size]


def batch_stream(plan, start_batch: int = 0):
    """This rank's batches without end, epoch after epoch: `plan(epoch)` gives one epoch's batches (plan_batches with
    the recipe's settings). start_batch skips that many batches first, so a resumed run sees the batches it would
    have seen had it never stopped (resuming at step s skips s * grad_accum)."""
    epoch, skip = 0, start_batch
    while True:
        batches = plan(epoch)
        if not batches:
            raise ValueError("batch_stream: the plan has no batches for an epoch")
        if skip >= len(batches):  # a whole epoch already trained on: skip it without yielding
            skip -= len(batches)
        else:
            yield from batches[skip:]
            skip = 0
        epoch += 1


def pack_lengths(lengths: list[int], pack_len: int) -> list[list[int]]:
    """Rows of example indices whose lengths sum to at most pack_len (best fit, longest first; an example longer
    than pack_len gets a row of its own). Deterministic."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: the tightest row that fits is found by bisect
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (room - n, row))
        else:
            rows.append([i])
            bisect.insort(free, (pack_len - n, len(rows) - 1))
    return rows


def pack_examples(examples: list[dict], pack_len: int) -> list[dict]:
    """Concatenate examples into rows of at most pack_len tokens (pack_lengths), each row keeping its examples'
    labels, lengths (`segments`) and indices in `examples` (`members`) so collate_packed can keep them apart."""
    rows = pack_lengths([len(e["input_ids"]) for e in examples], pack_len)
    return [{"input_ids": [t for i in row for t in examples[i]["input_ids"]],
             "labels": [t for i in row for t in examples[i]["labels"]],
             "segments": [len(examples[i]["input_ids"]) for i in row], "members": row} for row in rows]


def packed_segment_ids(rows: list[dict], width: int) -> torch.Tensor:
    """[rows, width]: which of its row's examples (0, 1, ...) each position of the left-padded packed rows holds;
    -1 on padding."""
    segment_id = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = width - sum(row["segments"])
        for s, n in enumerate(row["segments"]):
            segment_id[r, start:start + n] = s
            start += n
    return segment_id


def flatten_for_flash_attention(batch: dict) -> dict:
    """One row of B x L tokens from a (B, L) batch whose position ids restart at every example (and at every row):
    transformers' flash-attention 2 finds packed examples from restarting position ids only when the batch has one
    row (modeling_flash_attention_utils._is_packed_sequence); with more rows it attends across them unmasked. The
    label of each row's first token becomes -100: in one row it would be predicted by the previous row's last token,
    which the (B, L) batch never asks for, so the loss sum and the count of trained tokens stay the same."""
    if "attention_mask" in batch:
        raise ValueError("flatten_for_flash_attention: the batch has an attention mask; flash-attention 2 packs by "
                         "position ids alone")
    if bool((batch["position_ids"][:, 0] != 0).any()):
        raise ValueError("flatten_for_flash_attention: every row must start a new example (position id 0)")
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX
    flat = {key: value.reshape(1, -1) for key, value in batch.items() if key != "labels"}
    flat["labels"] = labels.reshape(1, -1)
    return flat


def collate_packed(rows: list[dict], pad_id: int, attention: str = "sdpa") -> dict:
    """Left-pad packed rows (pack_examples) so that each packed example computes exactly what it computes alone:
    position ids restart at every example, and with sdpa/eager a block-diagonal causal mask (B, 1, L, L) keeps
    examples from attending to each other. flash_attention_2 gets no mask but the rows joined into one
    (flatten_for_flash_attention): it reads the example boundaries from the restarting position ids, and only in a
    batch of one row. A pad has position id 0 there, an example of one token of its own, with no loss."""
    batch = collate_left_padded(rows, pad_id)
    width = batch["input_ids"].shape[1]
    segment_id = packed_segment_ids(rows, width)
    for r, row in enumerate(rows):
        start = width - sum(row["segments"])
        for n in row["segments"]:
            batch["position_ids"][r, start:start + n] = torch.arange(n)
            start += n
    if attention == "flash_attention_2":
        del batch["attention_mask"]
        return flatten_for_flash_attention(batch)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment_id[:, :, None] == segment_id[:, None, :]
    mask = causal & same & (segment_id[:, :, None] >= 0)
    mask |= torch.eye(width, dtype=torch.bool)  # a pad attends to itself: no row is all -inf (nan in softmax)
    batch["attention_mask"] = mask.unsqueeze(1)
    return batch


def padding_efficiency(batches: list[list[int]], lengths: list[int]) -> float:
    """Real tokens over tokens computed (real + pad) for a batch plan."""
    real = sum(lengths[i] for b in batches for i in b)
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return real / max(computed, 1)


# ---------------------------------------------------------------------------------------------------------------
# Classification, regression and preference pairs.


def read_label(record: Record, field: str, task: str):
    """A class label (string or integer) for classification, a number for regression."""
    if field not in record.data:
        raise DataError(f"{record.where}: missing field '{field}'")
    value = record.data[field]
    if task == "regression":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{record.where}: field '{field}' must be a number for regression, got {value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{record.where}: field '{field}' must be a string or integer class label, got {value!r}")
    return value


def label_set(records, field: str) -> list:
    """The sorted class labels of the training records (integers numerically, strings alphabetically)."""
    labels = {read_label(r, field, "classification") for r in records}
    if len({type(x) for x in labels}) > 1:
        raise DataError(f"{records[0].where.rsplit(':', 1)[0]}: field '{field}' mixes string and integer labels")
    if len(labels) < 2:
        raise DataError(f"{records[0].where.rsplit(':', 1)[0]}: field '{field}' has {len(labels)} distinct value(s); "
                        "classification needs at least 2")
    return sorted(labels)


def encode_text(tokenizer, text: str, max_seq_len: int, append_eos: bool) -> tuple[list[int], int]:
    """BOS + text (+ EOS, the token whose state a last-token classifier reads); cut at max_seq_len keeping the
    start and the EOS. Returns ids and the number of tokens cut."""
    ids = list(tokenizer(text).input_ids)
    if append_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    cut = max(0, len(ids) - max_seq_len)
    if cut:
        ids = ids[: max_seq_len - 1] + ids[-1:] if append_eos else ids[:max_seq_len]
    return ids, cut


def build_cls_examples(records, tokenizer, max_seq_len: int, task: str, labels: list | None, text_field="text",
                       label_field="label", append_eos=True, require_label=True) -> tuple[list[dict], DataStats]:
    """Records to {input_ids, label}: label is a class index (classification, `labels` the class list) or a float
    (regression). require_label=False (prediction) allows records without a label."""
    index = {label: i for i, label in enumerate(labels or [])}
    examples, stats = [], DataStats()
    for record in records:
        text = require_str(record, text_field)
        example = {"text": text}
        if require_label or label_field in record.data:
            value = read_label(record, label_field, task)
            if task == "classification" and value not in index:
                raise DataError(f"{record.where}: field '{label_field}' is {value!r}, not one of the training labels "
                                f"{labels}")
            example["label"] = index[value] if task == "classification" else value
        example["input_ids"], cut = encode_text(tokenizer, text, max_seq_len, append_eos)
        stats.truncated_examples += cut > 0
        stats.truncated_tokens += cut
        stats.examples += 1
        stats.tokens += len(example["input_ids"])
        examples.append(example)
    return examples, stats


def without_template_bos(tokenizer, text: str) -> str:
    """A chat-template rendering without the BOS it starts with, when the tokenizer adds one itself (else the text
    would get two). SmolLM2's BOS is <|im_start|>, the start of every ChatML turn, and it adds none: kept there."""
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]
    return text[len(tokenizer.bos_token):] if adds_bos and text.startswith(tokenizer.bos_token) else text


def render_prompt_response(tokenizer, prompt: str, response: str, prompt_template: str) -> str:
    """A (prompt, response) pair as the text a reward model scores: the Alpaca prompt or the chat template."""
    if prompt_template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_template 'chat' needs a tokenizer with a chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        return without_template_bos(tokenizer, text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=prompt) + response


def build_preference_examples(records, tokenizer, max_seq_len: int, prompt_template="alpaca",
                              append_eos=True) -> tuple[list[dict], DataStats]:
    """{prompt, chosen, rejected} records to {chosen_ids, rejected_ids}; identical pairs are refused."""
    examples, stats = [], DataStats()
    for record in records:
        prompt = require_str(record, "prompt")
        chosen, rejected = require_str(record, "chosen"), require_str(record, "rejected")
        if chosen == rejected:
            raise DataError(f"{record.where}: fields 'chosen' and 'rejected' are identical")
        pair = {}
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            ids, cut = encode_text(tokenizer, render_prompt_response(tokenizer, prompt, response, prompt_template),
                                   max_seq_len, append_eos)
            pair[f"{side}_ids"] = ids
            stats.truncated_tokens += cut
            stats.tokens += len(ids)
        stats.truncated_examples += len(pair["chosen_ids"]) == max_seq_len or len(pair["rejected_ids"]) == max_seq_len
        stats.examples += 1
        examples.append(pair)
    return examples, stats


# ---------------------------------------------------------------------------------------------------------------
# Preference pairs for training the language model itself (DPO and kin): each side is prompt + answer with labels on
# the answer, built as the sft recipes build an example, so a policy tuned from an SFT adapter sees the same text.


def preference_conversations(record: Record) -> tuple[list[dict], dict, dict] | None:
    """A conversational pair as (shared prompt messages, chosen reply, rejected reply), or None for a text pair.
    {"chosen": [messages], "rejected": [messages]} (HH / UltraFeedback style): the prompt is what both share, and each
    must go on with exactly one final assistant reply. An optional "prompt": [messages] goes before both."""
    chosen, rejected = record.data.get("chosen"), record.data.get("rejected")
    if not isinstance(chosen, list) and not isinstance(rejected, list):
        return None
    sides = {}
    prefix = record.data.get("prompt", [])
    if not isinstance(prefix, list):
        raise DataError(f"{record.where}: field 'prompt' must be a list of messages when 'chosen' and 'rejected' are")
    for side in ("chosen", "rejected"):
        messages = record.data.get(side)
        if not isinstance(messages, list):
            raise DataError(f"{record.where}: field '{side}' must be a list of messages, as 'chosen' and 'rejected' "
                            f"are one kind; got {type(messages).__name__}")
        sides[side] = chat_messages(Record({"messages": prefix + messages}, record.where))
    shared = 0
    while shared < min(map(len, sides.values())) - 1 and sides["chosen"][shared] == sides["rejected"][shared]:
        shared += 1
    for side, messages in sides.items():
        if len(messages) != shared + 1:
            raise DataError(f"{record.where}: field '{side}' must share every message with the other side but its "
                            f"final assistant reply; they part at message {shared}")
    if sides["chosen"][-1]["content"] == sides["rejected"][-1]["content"]:
        raise DataError(f"{record.where}: fields 'chosen' and 'rejected' end with the same reply")
    return sides["chosen"][:shared], sides["chosen"][-1], sides["rejected"][-1]


def preference_sft_records(record: Record) -> tuple[Record, Record]:
    """The chosen and the rejected side of a preference record as the SFT records the sft recipes would train on:
    chat {"messages"} for conversational pairs; for text pairs alpaca {"instruction", "input"?, "output"} from
    "instruction"(+"input") or "prompt" (a bare prompt goes in the instruction slot)."""
    conversation = preference_conversations(record)
    if conversation:
        prompt, chosen, rejected = conversation
        return (Record({"messages": prompt + [chosen]}, record.where),
                Record({"messages": prompt + [rejected]}, record.where))
    if "instruction" in record.data:
        prompt = {"instruction": require_str(record, "instruction")}
        if "input" in record.data:
            prompt["input"] = require_str(record, "input", allow_empty=True)
    else:
        prompt = {"instruction": require_str(record, "prompt")}
    chosen, rejected = require_str(record, "chosen"), require_str(record, "rejected")
    if chosen == rejected:
        raise DataError(f"{record.where}: fields 'chosen' and 'rejected' are identical")
    return (Record({**prompt, "output": chosen}, record.where), Record({**prompt, "output": rejected}, record.where))


def final_answer_only(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Segments with only the last trained one still trained: earlier assistant turns of a conversation are part
    of the prompt a preference pair shares."""
    last = max(i for i, (_, trained) in enumerate(segments) if trained)
    return [(text, trained and i == last) for i, (text, trained) in enumerate(segments)]


def build_preference_pairs(records, tokenizer, max_seq_len: int,
                           prompt_template="alpaca") -> tuple[list[dict], DataStats]:
    """Preference records to {chosen_ids, chosen_labels, rejected_ids, rejected_labels}: each side rendered,
    tokenized and masked as an SFT example (labels -100 on the prompt and on earlier turns), cut to max_seq_len from
    the prompt's left so the answers stay whole. Text pairs {"prompt" or "instruction"/"input", "chosen",
    "rejected"} go through the Alpaca or the chat template; conversational pairs through the chat template.
    (build_preference_examples is the reward model's kind: whole texts, no labels.)"""
    pairs, stats = [], DataStats()
    for record in records:
        pair = {}
        for side, sft_record in zip(("chosen", "rejected"), preference_sft_records(record), strict=True):
            segments, add_bos_eos = sft_segments(sft_record, tokenizer, prompt_template)
            ids, is_answer = tokenize_segments(final_answer_only(segments), tokenizer, add_bos_eos)
            if len(ids) > max_seq_len:
                keep_first = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
                ids, is_answer, cut = truncate_keep_answer(ids, is_answer, max_seq_len, keep_first)
                stats.truncated_tokens += cut
                pair["truncated"] = True
            pair[f"{side}_ids"] = ids
            pair[f"{side}_labels"] = [t if answer else IGNORE_INDEX for t, answer in zip(ids, is_answer, strict=True)]
            stats.tokens += len(ids)
            stats.trained_tokens += sum(answer for answer in is_answer[1:])
        stats.truncated_examples += pair.pop("truncated", False)
        pairs.append(pair)
        stats.examples += 1
    if not pairs:
        raise DataError(f"no preference pairs in {records[0].where.rsplit(':', 1)[0] if records else 'the data'}")
    return pairs, stats
