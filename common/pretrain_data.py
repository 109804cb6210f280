"""Pretraining data: documents from jsonl(.zst) shards or a pre-tokenized token file, packed into fixed-length
windows, split over ranks x loader workers so every document (or window) is seen exactly once per epoch.

    source = open_token_source("data/pretrain/shards", tokenizer)  # or "tokens.bin" (data_scripts/pretokenize.py)
    loader = packed_loader(source, seq_len=256, batch_size=8, rank=0, world_size=1, num_workers=1, start_batch=0)
    for batch in loader: ...  # input_ids, labels, position_ids(, attention_mask)

Packing: documents are tokenized as BOS + text + EOS and concatenated into one stream, cut into windows of seq_len
tokens with a stride of seq_len - 1, so the last token of a window is the first of the next and every token but the
very first is a prediction target exactly once. With `document_mask` a window's documents do not attend to each
other: position ids restart at each document (a document starts after an EOS) and, for sdpa, a block-diagonal causal
4D mask goes with them; for flash-attention 2 ('positions') the batch is joined into one row of batch_size x seq_len
tokens, as its kernel reads the document starts from the position ids alone and only in a batch of one row.

Splitting: the stream has n_slots = world_size x num_workers slots, slot = rank x num_workers + worker. Text sources
give slot s the documents i with i % n_slots == s (each slot tokenizes only its own); token files give slot s the
windows of a per-epoch permutation at positions s, s + n_slots, ... Every slot loops over epochs forever; a DataLoader
hands out its workers' batches round-robin, which `start_batch` uses to resume exactly where a run stopped.
"""
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import UserError
from common.data import DataError, flatten_for_flash_attention

TEXT_SUFFIXES = (".jsonl.zst", ".jsonl", ".json")


# ---------------------------------------------------------------------------------------------------------------
# Where the text comes from


def list_shards(path) -> list[Path]:
    """The shard files of a corpus: a folder (its manifest.json's shards, else every .jsonl(.zst) in it, sorted), a
    manifest.json, or one file."""
    path = Path(path)
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return list_shards(path / "manifest.json")
        shards = sorted(p for p in path.iterdir() if p.name.endswith((".jsonl.zst", ".jsonl")))
        if not shards:
            raise UserError(f"{path}: no .jsonl.zst or .jsonl shards in this folder")
        return shards
    if path.name == "manifest.json":
        manifest = json.loads(path.read_text())
        shards = [path.parent / s["file"] for s in manifest["shards"]]
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise UserError(f"{path}: lists {missing[0].name}, which is not there")
        return shards
    if not path.is_file():
        raise UserError(f"{path}: no such file or folder; expected shards (.jsonl.zst / .jsonl), a folder of them "
                        "or a token file (.bin) from data_scripts/pretokenize.py")
    if not path.name.endswith(TEXT_SUFFIXES):
        raise UserError(f"{path}: expected .jsonl.zst, .jsonl or .json text, or a .bin token file")
    return [path]


def shard_lines(shard: Path) -> Iterator[str]:
    """The lines of a .jsonl / .jsonl.zst shard, streamed (a shard is never held in memory whole)."""
    import io

    if shard.name.endswith(".zst"):
        import zstandard

        with open(shard, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            yield from io.TextIOWrapper(reader, encoding="utf-8")
    elif shard.name.endswith(".json"):  # a list of records: small files only
        for record in json.loads(shard.read_text(encoding="utf-8")):
            yield json.dumps(record)
    else:
        with open(shard, encoding="utf-8") as f:
            yield from f


def slot_documents(shards: list[Path], slot: int, n_slots: int, text_field: str = "text") -> Iterator[str]:
    """The texts of documents i % n_slots == slot, in corpus order; only those lines are parsed."""
    i = 0
    for shard in shards:
        for line_no, line in enumerate(shard_lines(shard), 1):
            if not line.strip():
                continue
            if i % n_slots == slot:
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{shard}:{line_no}: expected a JSON object with a string field "
                                    f"'{text_field}' ({type(e).__name__})") from None
                if not isinstance(text, str):
                    raise DataError(f"{shard}:{line_no}: field '{text_field}' must be a string, got "
                                    f"{type(text).__name__}")
                yield text
            i += 1


def encode_document(tokenizer, text: str) -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


# ---------------------------------------------------------------------------------------------------------------
# Token sources: text shards tokenized on the fly, or a token file


@dataclass
class TextSource:
    shards: list[Path]
    tokenizer: object
    text_field: str = "text"
    eos_id: int = 2

    def describe(self) -> str:
        return f"{len(self.shards)} text shard(s), tokenized on the fly"

    def windows(self, seq_len: int, slot: int, n_slots: int, seed: int, loop=True) -> Iterator[np.ndarray]:
        """This slot's windows: its documents packed end to end, across epochs when loop (else one epoch)."""
        buffer: list[int] = []
        while True:
            n_documents = 0
            for text in slot_documents(self.shards, slot, n_slots, self.text_field):
                n_documents += 1
                buffer += encode_document(self.tokenizer, text)
                # cut windows at a moving offset: re-slicing the buffer per window is quadratic in a long document
                start = 0
                while len(buffer) - start >= seq_len:
                    yield np.asarray(buffer[start:start + seq_len], dtype=np.int64)
                    start += seq_len - 1
                del buffer[:start]
            if not loop or n_documents == 0:  # a slot with no document (fewer documents than slots) never fills
                return


@dataclass
class TokenFile:
    """A flat token file (data_scripts/pretokenize.py): tokens.bin (uint16 / uint32) beside tokens.json."""
    path: Path
    tokens: np.ndarray
    meta: dict
    eos_id: int

    def describe(self) -> str:
        return (f"token file, {len(self.tokens):,} tokens of {self.meta.get('documents', '?'):,} documents "
                f"({self.tokens.dtype})")

    def windows(self, seq_len: int, slot: int, n_slots: int, seed: int, loop=True) -> Iterator[np.ndarray]:
        """Windows j of a per-epoch permutation at positions slot, slot + n_slots, ...: each once per epoch."""
        n_windows = (len(self.tokens) - 1) // (seq_len - 1)
        if n_windows < n_slots:
            raise UserError(f"{self.path}: {len(self.tokens):,} tokens make {n_windows} windows of {seq_len}, "
                            f"fewer than the {n_slots} ranks x workers reading them")
        epoch = 0
        while True:
            order = np.random.default_rng([seed, epoch]).permutation(n_windows)
            for j in order[slot::n_slots]:
                start = int(j) * (seq_len - 1)
                yield self.tokens[start:start + seq_len].astype(np.int64)
            epoch += 1
            if not loop:
                return


def open_token_file(path: Path, tokenizer=None) -> TokenFile:
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise UserError(f"{path}: no {meta_path.name} beside it; make token files with data_scripts/pretokenize.py")
    meta = json.loads(meta_path.read_text())
    tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if len(tokens) != meta["tokens"]:
        raise UserError(f"{path}: holds {len(tokens):,} tokens but {meta_path.name} says {meta['tokens']:,}; "
                        "the file is truncated or not the one pretokenize.py wrote")
    if tokenizer is not None:
        if meta["vocab_size"] > len(tokenizer):
            raise UserError(f"{path}: tokenized with a vocabulary of {meta['vocab_size']:,}, but the tokenizer has "
                            f"{len(tokenizer):,}: use the tokenizer it was made with ({meta.get('tokenizer')})")
        if meta["eos_id"] != tokenizer.eos_token_id:
            raise UserError(f"{path}: EOS id {meta['eos_id']} differs from the tokenizer's "
                            f"{tokenizer.eos_token_id}: use the tokenizer it was made with ({meta.get('tokenizer')})")
    return TokenFile(path, tokens, meta, meta["eos_id"])


def open_token_source(path, tokenizer, text_field: str = "text"):
    """A .bin token file, or text shards (file, folder or manifest) to tokenize with `tokenizer`."""
    path = Path(path)
    if path.suffix == ".bin":
        return open_token_file(path, tokenizer)
    return TextSource(list_shards(path), tokenizer, text_field, tokenizer.eos_token_id)


# ---------------------------------------------------------------------------------------------------------------
# Windows to batches


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per position, which document of its row it belongs to: a new document starts after every EOS."""
    after_eos = torch.zeros_like(input_ids)
    after_eos[:, 1:] = (input_ids[:, :-1] == eos_id).long()
    return after_eos.cumsum(1)


def make_batch(windows: list[np.ndarray], eos_id: int, document_mask: str = "none") -> dict:
    """input_ids, labels (the same ids: the loss shifts them), position_ids; document_mask 'sdpa' adds a
    block-diagonal causal mask (B, 1, L, L) and restarts positions per document, 'positions' (flash-attention 2)
    restarts them and joins the rows into one (common.data.flatten_for_flash_attention: the first label of each row
    is -100 there, so the loss sum is that of the (B, L) batch and the tokens it predicts number B x (L - 1))."""
    input_ids = torch.from_numpy(np.stack(windows))
    batch = {"input_ids": input_ids, "labels": input_ids.clone()}
    length = input_ids.shape[1]
    if document_mask == "none":
        batch["position_ids"] = torch.arange(length).expand_as(input_ids).clone()
        return batch
    docs = document_ids(input_ids, eos_id)
    is_start = torch.ones_like(docs, dtype=torch.bool)
    is_start[:, 1:] = docs[:, 1:] != docs[:, :-1]
    positions = torch.arange(length).expand_as(docs)
    # each position's document start
    starts = torch.where(is_start, positions, torch.zeros_like(positions)).cummax(1).values
    batch["position_ids"] = positions - starts
    if document_mask == "sdpa":
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        batch["attention_mask"] = (causal & (docs[:, :, None] == docs[:, None, :])).unsqueeze(1)
    if document_mask == "positions":
        return flatten_for_flash_attention(batch)
    return batch


class PackedBatches(torch.utils.data.IterableDataset):
    """Batches of packed windows for one rank; inside a DataLoader each worker reads its own slot."""

    def __init__(self, source, seq_len: int, batch_size: int, rank: int, world_size: int, num_workers: int,
                 seed: int, document_mask: str = "none", start_batch: int = 0, loop: bool = True):
        if seq_len < 2:
            raise UserError(f"--seq_len={seq_len}: expected at least 2")
        self.source, self.seq_len, self.batch_size = source, seq_len, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, max(num_workers, 1)
        self.seed, self.document_mask, self.start_batch, self.loop = seed, document_mask, start_batch, loop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        # the loader takes its k-th batch from worker k % num_workers, and batch start_batch of the run must come
        # first: so worker w reads the slot of the run's worker (w + start_batch) % num_workers, past its share
        role = (worker + self.start_batch) % self.num_workers
        slot, n_slots = self.rank * self.num_workers + role, self.world_size * self.num_workers
        skip = max(0, math.ceil((self.start_batch - role) / self.num_workers))
        windows = self.source.windows(self.seq_len, slot, n_slots, self.seed, self.loop)
        n = 0
        while True:
            chunk = [w for _, w in zip(range(self.batch_size), windows)]
            if len(chunk) < self.batch_size and self.loop:
                raise UserError(f"{self.source.describe()}: reader {slot + 1} of {n_slots} (ranks x loader workers) "
                                "has no documents; use fewer --num_workers or ranks, or more, smaller shards")
            if len(chunk) < self.batch_size:  # one epoch only (loop=False) and it ended
                return
            n += 1
            if n > skip:
                yield make_batch(chunk, self.source.eos_id, self.document_mask)


def packed_loader(source, seq_len: int, batch_size: int, rank: int, world_size: int, num_workers: int, seed: int,
                  document_mask: str = "none", start_batch: int = 0, loop: bool = True):
    """A DataLoader over PackedBatches: num_workers processes tokenize ahead (0: in the training process)."""
    dataset = PackedBatches(source, seq_len, batch_size, rank, world_size, num_workers, seed, document_mask,
                            start_batch, loop)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                         persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None)
    return batches_with_plain_errors(loader)


def eval_batches(source, seq_len: int, batch_size: int, rank: int, world_size: int, seed: int, n_batches: int,
                 document_mask: str = "none"):
    """Exactly n_batches (batch, counted) pairs for this rank's eval, as sharded weights (ZeRO-3, FSDP) need every
    rank to run as many forwards: the rank's windows, wrapping around a short eval set; a rank with no eval document
    (fewer documents than ranks) runs uncounted placeholder batches of EOS tokens instead."""
    windows = source.windows(seq_len, rank, world_size, seed, loop=True)
    placeholder = [np.full(seq_len, source.eos_id, dtype=np.int64)] * batch_size
    for _ in range(n_batches):
        chunk = [w for _, w in zip(range(batch_size), windows)]
        counted = len(chunk) == batch_size
        yield make_batch(chunk if counted else placeholder, source.eos_id, document_mask), counted


def batches_with_plain_errors(loader):
    """The loader's batches; a bad record met in a worker process is raised again as its own one-line error (the
    DataLoader folds the worker's traceback into the message: "Caught DataError in DataLoader worker ...")."""
    try:
        yield from loader
    except UserError as e:
        message = str(e)
        if not message.startswith("Caught "):
            raise
        raise type(e)(message.strip().splitlines()[-1].split(": ", 1)[-1]) from None


# ---------------------------------------------------------------------------------------------------------------
# Throughput accounting


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x parameters in the matrix multiplies (embedding lookup
    excluded, LM head included) + 12 x layers x hidden x seq_len for the attention scores and their use (causal
    masking not discounted), as in the PaLM paper's MFU (appendix B)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    matmul_params = layers * per_layer + h * config.vocab_size
    return 6 * matmul_params + 12 * layers * q * seq_len


# Dense bf16 peak TFLOPs per GPU (no sparsity), for MFU; --peak_tflops overrides, unknown devices report no MFU
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "L4": 121.0,
               "4090": 165.0, "3090": 71.0, "A10": 125.0, "V100": 125.0, "T4": 65.0}


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
