"""Left padding must not change what the model computes for a row: logits and greedy generations of a padded batch
equal those of each row alone, whatever sdpa kernel runs the padded rows; a row of pads only leaves gradients finite.

On CPU in fp32 by default. LLAMA_RECIPES_TEST_DEVICE=cuda (bench/gpu_smoke.sh sets it) runs the same tests on the GPU
in bf16 with a bf16 tolerance: there the padded rows go through other sdpa kernels (memory-efficient; flash takes no
mask and runs the unpadded rows), and a fully masked row is where a kernel can produce nan."""
import os
from dataclasses import dataclass

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.data import collate_left_padded

PROMPTS = ["What is the capital of France?", "计算 17 加 25。", "Reverse the letters: a b c d e f g h i j"]
DEVICE = os.environ.get("LLAMA_RECIPES_TEST_DEVICE", "cpu")
# the sdpa kernels that take a padding mask on each device (CUDA's flash kernel takes none: it runs unpadded rows)
PADDED_KERNELS = {"cpu": ("math", "flash"), "cuda": ("math", "efficient")}
BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
BF16_REL = 2e-2  # |actual - expected| / |expected| allowed in bf16 (the two sides round differently on the way)


@dataclass(frozen=True)
class Target:
    device: torch.device
    dtype: torch.dtype


@pytest.fixture(scope="module")
def target() -> Target:
    if DEVICE not in PADDED_KERNELS:
        pytest.fail(f"LLAMA_RECIPES_TEST_DEVICE={DEVICE}: expected cpu or cuda")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("LLAMA_RECIPES_TEST_DEVICE=cuda but torch sees no CUDA device")
    return Target(torch.device(DEVICE), torch.bfloat16 if DEVICE == "cuda" else torch.float32)


def load_on(tiny_dir, target: Target, dtype=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype or target.dtype, attn_implementation="sdpa")
    return model.to(target.device)


@pytest.fixture(scope="module")
def model(request, tiny_dir, target):
    """The tiny model for inference on the target: the session's CPU one, or a bf16 copy on the GPU."""
    if target.device.type == "cpu":
        return request.getfixturevalue("tiny_model")
    return load_on(tiny_dir, target).eval()


@pytest.fixture(scope="module")
def model_fp32(request, tiny_dir, target):
    """fp32 on the target, for greedy generation: bf16 rounding flips the near-ties of a random model's argmax."""
    if target.device.type == "cpu":
        return request.getfixturevalue("tiny_model")
    return load_on(tiny_dir, target, torch.float32).eval()


def on(batch: dict, target: Target) -> dict:
    return {k: v.to(target.device) for k, v in batch.items()}


def assert_close(actual, expected, target: Target, atol: float, rtol: float = 0.0, msg: str = ""):
    """fp32: within atol + rtol elementwise (the CPU tests' bounds); bf16: within BF16_REL of expected's norm."""
    actual, expected = actual.float(), expected.float()
    if target.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda text: f"{msg}: {text}")
        return
    rel = ((actual - expected).norm() / expected.norm()).item()
    assert rel < BF16_REL, f"{msg} relative error {rel:.3g} >= {BF16_REL}"


def encode(tokenizer):
    return [{"input_ids": tokenizer(p).input_ids} for p in PROMPTS]


def test_left_padded_batch_pads_on_the_left(tokenizer):
    rows = encode(tokenizer)
    batch = collate_left_padded(rows, tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    for r, row in enumerate(rows):
        n_pad = width - len(row["input_ids"])
        assert batch["input_ids"][r, :n_pad].eq(tokenizer.pad_token_id).all()
        assert batch["attention_mask"][r, :n_pad].eq(0).all() and batch["attention_mask"][r, n_pad:].eq(1).all()
        assert batch["input_ids"][r, n_pad:].tolist() == row["input_ids"]
    assert len({len(r["input_ids"]) for r in rows}) == len(rows)  # the test needs real padding


def test_last_token_logits_match_unpadded(model, tokenizer, target):
    rows = encode(tokenizer)
    batch = on(collate_left_padded(rows, tokenizer.pad_token_id), target)
    with torch.no_grad():
        padded_last = model(**batch).logits[:, -1]
        for r, row in enumerate(rows):
            alone = on(collate_left_padded([row], tokenizer.pad_token_id), target)
            alone_last = model(**alone).logits[0, -1]
            assert_close(padded_last[r], alone_last, target, atol=1e-5, msg=f"row {r}")


@pytest.mark.parametrize("kernel", PADDED_KERNELS.get(DEVICE, ()))
def test_sdpa_kernel_gives_a_left_padded_row_the_logits_it_has_alone(model, tokenizer, target, kernel):
    """Every real position of each padded row, through one sdpa kernel, against the row alone with no mask at all
    (the kernel the device picks for it: flash on CUDA)."""
    rows = encode(tokenizer)
    batch = on(collate_left_padded(rows, tokenizer.pad_token_id), target)
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        with sdpa_kernel([BACKENDS[kernel]]):
            padded = model(**batch).logits
        for r, row in enumerate(rows):
            ids = torch.tensor([row["input_ids"]], device=target.device)
            alone = model(input_ids=ids).logits[0]
            assert_close(padded[r, width - ids.shape[1]:], alone, target, atol=1e-4, msg=f"{kernel}, row {r}")


def test_greedy_generation_of_padded_batch_equals_each_prompt_alone(model_fp32, tokenizer, target):
    rows = encode(tokenizer)
    batch = on(collate_left_padded(rows, tokenizer.pad_token_id), target)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        together = model_fp32.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        width = batch["input_ids"].shape[1]
        for r, row in enumerate(rows):
            ids = torch.tensor([row["input_ids"]], device=target.device)
            alone = model_fp32.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            assert together[r, width:].tolist() == alone[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("kernel", PADDED_KERNELS.get(DEVICE, ()))
def test_fully_masked_pad_row_leaves_loss_and_gradients_those_of_the_real_row(tiny_dir, tokenizer, target, kernel):
    """A row of pads only (attention mask all 0, labels all -100: what a short last batch or a rank's placeholder
    can hold): every attention score of the row is masked, where a kernel's softmax can give nan and backward
    spread it to every gradient. The loss and gradients must be those of the real row alone."""
    from common.losses import token_loss_sum

    ids = torch.tensor([encode(tokenizer)[2]["input_ids"]])
    pads = torch.full_like(ids, tokenizer.pad_token_id)
    labels = torch.cat([ids, torch.full_like(ids, -100)])
    batch = on({"input_ids": torch.cat([ids, pads]), "attention_mask": torch.cat([torch.ones_like(ids), 0 * ids])},
               target)
    results = []
    for inputs, targets in ((batch, labels), (on({"input_ids": ids}, target), ids)):
        model = load_on(tiny_dir, target)
        with sdpa_kernel([BACKENDS[kernel]]):
            loss = token_loss_sum(model(**inputs, use_cache=False).logits, targets.to(target.device))
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g.isfinite().all() for g in grads.values()), [n for n, g in grads.items() if not g.isfinite().all()]
        results.append((loss.detach(), grads))
    (loss, grads), (loss_alone, grads_alone) = results
    assert_close(loss, loss_alone, target, atol=0, rtol=1e-6, msg="loss")
    for name, grad in grads_alone.items():  # a batch of 2 rows rounds differently from 1: fp32 noise, no more
        assert_close(grads[name], grad, target, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_rows_compute_each_example_as_if_alone(model, tokenizer, target):
    """pack_examples + collate_packed: several examples in one row, position ids restarting and a block-diagonal
    mask, give every example the logits it has alone; labels and trained-token counts are unchanged."""
    from common.data import build_sft_examples, collate_packed, pack_examples, read_records
    from common.losses import count_trained_tokens
    from tests.conftest import REPO

    examples, _ = build_sft_examples(read_records(REPO / "data" / "sft" / "train.jsonl"), tokenizer, 1024)
    examples = examples[:7]
    rows = pack_examples(examples, 200)
    assert sorted(n for r in rows for n in r["segments"]) == sorted(len(e["input_ids"]) for e in examples)
    assert all(sum(r["segments"]) <= 200 for r in rows) and len(rows) < len(examples)
    batch = on(collate_packed(rows, tokenizer.pad_token_id), target)
    trained_alone = sum(count_trained_tokens(torch.tensor([e["labels"]])) for e in examples)
    assert count_trained_tokens(batch["labels"]) == trained_alone
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"]).logits
    width = batch["input_ids"].shape[1]
    for r, row in enumerate(rows):
        start = width - sum(row["segments"])
        for n, member in zip(row["segments"], row["members"]):
            ids = batch["input_ids"][r, start:start + n]
            assert ids.tolist() == examples[member]["input_ids"]  # members: which example each segment is
            with torch.no_grad():
                alone = model(input_ids=ids[None]).logits[0]
            assert_close(packed[r, start:start + n], alone, target, atol=1e-4, msg=f"row {r}")
            assert batch["position_ids"][r, start:start + n].tolist() == list(range(n))
            start += n


def test_logits_only_over_the_answers_give_the_same_loss_and_gradients(tiny_dir, tokenizer, target):
    """loss_window + logits_to_keep: the LM head runs only where a trained token is predicted; the loss and every
    gradient equal those of the full logits."""
    from common.data import build_sft_examples, read_records
    from common.losses import loss_window, token_loss_sum
    from tests.conftest import REPO

    examples, _ = build_sft_examples(read_records(REPO / "data" / "sft" / "train.jsonl"), tokenizer, 1024)
    batch = on(collate_left_padded(examples[:4], tokenizer.pad_token_id), target)
    labels = batch.pop("labels")
    window = loss_window(labels)
    assert 1 < window < labels.shape[1]  # the prompts are left out
    results = []
    for keep in (0, window):  # 0: every position's logits
        model = load_on(tiny_dir, target)
        logits = model(**batch, use_cache=False, logits_to_keep=keep).logits
        assert logits.shape[1] == (keep or labels.shape[1])
        loss = token_loss_sum(logits, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    if target.dtype == torch.float32:
        assert results[1][0].item() == pytest.approx(results[0][0].item(), rel=1e-6)
        for name, grad in results[0][1].items():  # the summed loss's gradients are O(1); one thread sums the
            # embedding rows in another order than two (measured: 8 of 524,288 elements 2.7e-6 apart)
            torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-5, msg=f"{name} differs")
        return
    assert_close(results[1][0], results[0][0], target, atol=0, msg="loss")
    for name, grad in results[0][1].items():
        assert_close(results[1][1][name], grad, target, atol=0, msg=name)
