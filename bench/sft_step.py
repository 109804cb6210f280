"""What the step benches (lora_dropout.py, compile_layers.py) share: the bundled SFT data in the recipes' batches
for a model, and one forward + backward of the recipes' loss on a batch."""
import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a standalone script: make `common` importable
from common.data import build_sft_examples, collate_left_padded, plan_batches, read_records  # noqa: E402
from common.losses import causal_lm_loss_sum, loss_window  # noqa: E402
from common.model import load_tokenizer, resolve_model_path  # noqa: E402


def step_bench_parser(doc: str) -> argparse.ArgumentParser:
    """The options every step bench takes; a bench adds what it compares."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="tiny", help="'tiny' or a local model folder")
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--batches", type=int, default=6, help="batches per contender per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    return p


def sft_batches(model_path: str, batch_size: int):
    """(model folder, tokenizer, examples, batches): the bundled SFT data tokenized for the model ('tiny' or a
    folder, ~ expanded), in length-grouped batches of batch_size example indices, as the recipes plan them."""
    model_dir = resolve_model_path(str(Path(model_path).expanduser()) if model_path != "tiny" else "tiny")
    tokenizer = load_tokenizer(model_dir)
    examples, _ = build_sft_examples(read_records(REPO / "data" / "sft" / "train.jsonl"), tokenizer, 1024)
    batches = plan_batches([len(e["input_ids"]) for e in examples], batch_size, 0, 0, True)
    return model_dir, tokenizer, examples, batches


def train_step(model, examples: list[dict], idx: list[int], pad_id: int) -> tuple[int, float]:
    """Forward + backward of the recipes' loss on one left-padded batch, gradients dropped: (real tokens, loss)."""
    batch = collate_left_padded([examples[i] for i in idx], pad_id)
    labels = batch.pop("labels")
    loss = causal_lm_loss_sum(model, model.get_output_embeddings(), batch, labels, loss_window(labels))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return int(batch["attention_mask"].sum()), float(loss.detach())


def time_alternating(models: dict, examples: list[dict], batches: list[list[int]], pad_id: int, rounds: int,
                     per_round: int, first: int = 0) -> tuple[dict, dict]:
    """Every model trains on the same batch back to back (A B A B), rounds x per_round batches from batches[first]
    on: (real tokens, seconds) per model, so a machine that slows down slows every contender alike."""
    tokens, seconds = dict.fromkeys(models, 0), dict.fromkeys(models, 0.0)
    for k in range(rounds * per_round):
        idx = batches[(first + k) % len(batches)]
        for name, model in models.items():
            start = time.perf_counter()
            tokens[name] += train_step(model, examples, idx, pad_id)[0]
            seconds[name] += time.perf_counter() - start
    return tokens, seconds
