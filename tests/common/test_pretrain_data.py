"""Pretraining data: every document / window exactly once per epoch across ranks x loader workers, packing, exact
resume positions, document masking, token files, and the FLOPs formula behind MFU."""
import json

import numpy as np
import pytest
import torch
import zstandard

from tests.conftest import REPO, run_script

SHARDS = REPO / "data" / "pretrain" / "shards"
PRETOKENIZE = REPO / "data_scripts" / "pretokenize.py"


def write_shard(path, texts):
    path.write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three shards of numbered documents of different lengths."""
    folder = tmp_path_factory.mktemp("corpus")
    docs = [f"document {i} " + "word " * (i % 7) for i in range(50)]
    for k, chunk in enumerate((docs[:20], docs[20:35], docs[35:])):
        write_shard(folder / f"shard-{k:05d}.jsonl.zst", chunk)
    return folder, docs


def test_every_document_once_per_epoch_across_ranks_and_workers(corpus):
    from common.pretrain_data import list_shards, slot_documents

    folder, docs = corpus
    shards = list_shards(folder)
    for n_slots in (1, 2, 3, 4, 6):  # e.g. 3 ranks x 2 workers
        seen = [d for slot in range(n_slots) for d in slot_documents(shards, slot, n_slots)]
        assert sorted(seen) == sorted(docs), n_slots


def test_loader_workers_split_a_rank_and_resume_exactly(corpus, tokenizer):
    """Two ranks x two DataLoader workers: the four slots' windows, taken through real loaders, cover each
    window of each slot once; a loader started at batch k yields exactly what the uninterrupted one yields from k."""
    from common.pretrain_data import TextSource, list_shards, packed_loader

    folder, _ = corpus
    source = TextSource(list_shards(folder), tokenizer, eos_id=tokenizer.eos_token_id)
    per_rank = []
    for rank in (0, 1):
        loader = packed_loader(source, 16, 2, rank, 2, 2, seed=0)
        batches = [b["input_ids"] for b, _ in zip(loader, range(12))]
        resumed = [b["input_ids"] for b, _ in zip(packed_loader(source, 16, 2, rank, 2, 2, seed=0, start_batch=5),
                                                   range(7))]
        assert all(torch.equal(a, b) for a, b in zip(batches[5:], resumed))
        per_rank.append(batches)
        # worker w of rank r reads slot 2r + w; the loader alternates the workers' batches
        for worker in (0, 1):
            direct = source.windows(16, 2 * rank + worker, 4, 0)
            expected = [np.stack([next(direct), next(direct)]) for _ in range(6)]
            assert all(torch.equal(batches[2 * i + worker], torch.from_numpy(e)) for i, e in enumerate(expected))
    assert not torch.equal(per_rank[0][0], per_rank[1][0])


def test_packing_keeps_every_token_and_predicts_each_once(corpus, tokenizer):
    from common.pretrain_data import TextSource, encode_document, list_shards

    folder, docs = corpus
    stream = [t for d in docs for t in encode_document(tokenizer, d)]
    windows = list(TextSource(list_shards(folder), tokenizer, eos_id=tokenizer.eos_token_id).windows(
        16, 0, 1, 0, loop=False))
    assert all(len(w) == 16 for w in windows)
    # consecutive windows overlap by one token: their predicted tokens (all but the first) tile the stream
    rebuilt = list(windows[0]) + [t for w in windows[1:] for t in w[1:]]
    assert rebuilt == stream[:len(rebuilt)] and len(stream) - len(rebuilt) < 15
    assert stream[0] == tokenizer.bos_token_id and stream.count(tokenizer.eos_token_id) == len(docs)


def test_document_mask_makes_a_packed_window_equal_its_documents_alone(tiny_model, tokenizer):
    from common.pretrain_data import encode_document, make_batch

    a, b = encode_document(tokenizer, "Rain in Spain."), encode_document(tokenizer, "今天天气很好。")
    window = np.asarray(a + b, dtype=np.int64)
    masked = make_batch([window], tokenizer.eos_token_id, "sdpa")
    assert masked["position_ids"][0].tolist() == list(range(len(a))) + list(range(len(b)))
    assert masked["attention_mask"].shape == (1, 1, len(window), len(window))
    plain = make_batch([window], tokenizer.eos_token_id, "none")
    with torch.no_grad():
        packed = tiny_model(input_ids=masked["input_ids"], position_ids=masked["position_ids"],
                            attention_mask=masked["attention_mask"]).logits[0]
        alone_b = tiny_model(input_ids=torch.tensor([b])).logits[0]
        leaky = tiny_model(input_ids=plain["input_ids"], position_ids=plain["position_ids"]).logits[0]
    torch.testing.assert_close(packed[len(a):], alone_b, atol=1e-4, rtol=0)
    assert (leaky[len(a):] - alone_b).abs().max() > 1e-2  # without the mask the second document sees the first
    assert make_batch([window], tokenizer.eos_token_id, "positions").keys() == {"input_ids", "labels", "position_ids"}


@pytest.mark.slow  # pretokenize.py end to end
def test_pretokenize_matches_on_the_fly_and_token_file_windows_cover_once(tmp_path, corpus, tokenizer):
    from common.pretrain_data import encode_document, open_token_file

    folder, docs = corpus
    files = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}" / "tokens.bin"
        proc = run_script(PRETOKENIZE, f"--data_path={folder}", "--tokenizer_path=tiny", f"--out={out}",
                          f"--workers={workers}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "50 documents" in proc.stdout
        files.append(out)
    assert files[0].read_bytes() == files[1].read_bytes()
    meta = json.loads(files[0].with_suffix(".json").read_text())
    assert meta["dtype"] == "uint16" and meta["documents"] == 50 and meta["eos_id"] == tokenizer.eos_token_id
    source = open_token_file(files[0], tokenizer)
    assert source.tokens.tolist() == [t for d in docs for t in encode_document(tokenizer, d)]
    n_windows = (len(source.tokens) - 1) // 15
    starts = []
    for slot in range(3):
        for w in source.windows(16, slot, 3, seed=1, loop=False):
            j = next(j for j in range(n_windows) if np.array_equal(source.tokens[j * 15:j * 15 + 16], w))
            starts.append(j)
    assert sorted(starts) == list(range(n_windows))


@pytest.mark.slow  # pretokenize.py in child processes
def test_token_file_errors_are_one_clear_line(tmp_path, corpus):
    folder, _ = corpus
    out = tmp_path / "tokens.bin"
    assert run_script(PRETOKENIZE, f"--data_path={folder}", f"--out={out}").returncode == 0
    with open(out, "r+b") as f:
        f.truncate(10)
    from common.config import UserError
    from common.pretrain_data import open_token_file

    with pytest.raises(UserError, match=r"holds 5 tokens but tokens.json says"):
        open_token_file(out)
    proc = run_script(PRETOKENIZE, f"--data_path={tmp_path / 'nope'}", f"--out={out}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    proc = run_script(PRETOKENIZE, f"--data_path={bad}", f"--out={tmp_path / 'b.bin'}", "--workers=1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {bad}:2: expected a JSON object with a string field "
                                                    "'text' (KeyError)")


def test_flops_per_token_matches_torch_flop_counter(tiny_dir):
    """6 x matmul parameters + 12 x layers x hidden x seq_len per token, against the FLOPs torch counts in one
    forward + backward (matmuls and attention; the formula ignores norms and activations, as the counter does).
    Eager attention, whose matmuls the counter sees (it has no formula for the CPU sdpa kernel)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from common.pretrain_data import flops_per_token

    seq_len, batch = 128, 2
    ids = torch.randint(0, 2000, (batch, seq_len))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").train()
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    expected = flops_per_token(model.config, seq_len) * batch * seq_len
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)


def test_eval_batches_give_every_rank_as_many_forwards_and_count_each_real_one(tmp_path, tokenizer):
    """One eval document over two ranks: rank 0 wraps around it, rank 1 (no document) runs uncounted placeholders,
    both exactly n_batches; rank 0's batches are the loader's. A training reader with no document is one error."""
    from common.config import UserError
    from common.pretrain_data import TextSource, eval_batches, list_shards, packed_loader

    folder = tmp_path / "eval"
    folder.mkdir()
    write_shard(folder / "shard-00000.jsonl.zst", ["the only eval document, short"])
    source = TextSource(list_shards(folder), tokenizer, eos_id=tokenizer.eos_token_id)
    rank0 = list(eval_batches(source, 16, 2, 0, 2, 0, 3))
    rank1 = list(eval_batches(source, 16, 2, 1, 2, 0, 3))
    assert [c for _, c in rank0] == [True] * 3 and [c for _, c in rank1] == [False] * 3
    loader = [b["input_ids"] for b, _ in zip(packed_loader(source, 16, 2, 0, 2, 0, seed=0), range(3))]
    assert all(torch.equal(b["input_ids"], a) for (b, _), a in zip(rank0, loader))
    assert rank1[0][0]["input_ids"].shape == (2, 16)
    with pytest.raises(UserError, match="reader 2 of 2 .* has no documents"):
        next(iter(packed_loader(source, 16, 2, 1, 2, 0, seed=0)))
