"""tools/estimate_memory.py: exact sizes of known shapes, the ZeRO / offload / FSDP arithmetic, one-line errors, the
--table, and on CPU the estimate against two measured training steps (bench/memory_estimate.py's measurement)."""
import dataclasses
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.tools.conftest import load_tool

em = load_tool("estimate_memory")
TOOL = REPO / "tools" / "estimate_memory.py"
TOLERANCE = 0.20  # |estimated / measured - 1| on CPU; the runs below came out at 0.97-1.07 (2026-11-24)


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=60)


def test_parameter_counts_of_the_llama_sizes():
    # the published counts of Llama-2 7B / 13B / 70B and Llama-1 65B
    assert em.SHAPES["7B"].params == 6_738_415_616
    assert em.SHAPES["13B"].params == 13_015_864_320
    assert em.SHAPES["65B"].params == 65_285_660_672
    assert em.SHAPES["70B"].params == 68_976_648_192
    assert em.SHAPES["70B"].kv_dim == 1024  # 8 KV heads of 128


def test_weights_of_7b_in_bf16_and_in_nf4():
    s = em.SHAPES["7B"]
    full = em.estimate(s, "full")
    assert full["weights"] == s.params * 2 and round(full["weights"] / 1e9, 1) == 13.5
    assert abs(em.NF4_BITS - 4.127) <= 5e-4
    qlora = em.estimate(s, "qlora", lora_r=64)
    adapters = s.lora_params(64)
    assert adapters == 159_907_840
    # the projections in NF4, embeddings / head / norms in fp32 (peft's cast), adapters in fp32
    assert qlora["weights"] == pytest.approx(6_476_005_376 * 4.127 / 8 + 262_410_240 * 4 + adapters * 4, rel=1e-4)
    assert qlora["gradients"] == adapters * 4 and qlora["optimizer"] == adapters * 2  # fp32 grads, 8-bit AdamW


def test_zero_stages_divide_model_states_by_the_gpus():
    s = em.SHAPES["13B"]
    one, eight = (em.estimate(s, "full", zero_stage=3, gpus=g, seq_len=512) for g in (1, 8))
    for key in ("weights", "gradients", "optimizer"):
        assert one[key] == pytest.approx(8 * eight[key])
    stage1 = em.estimate(s, "full", zero_stage=1, gpus=8)
    assert stage1["weights"] == s.params * 2 and stage1["gradients"] == s.params * 2  # only the optimizer split
    assert stage1["optimizer"] == pytest.approx(s.params * (8 + 4) / 8)  # Adam states + fp32 master weights


def test_offload_moves_the_optimizer_and_then_the_weights_to_host_ram():
    s = em.SHAPES["7B"]
    on_gpu = em.estimate(s, "full", zero_stage=2, gpus=2)
    offloaded = em.estimate(s, "full", zero_stage=2, gpus=2, offload="optimizer")
    assert on_gpu["optimizer"] > 0 and on_gpu["host_offload"] == 0
    assert offloaded["optimizer"] == 0 and offloaded["gradients"] == 0
    # fp32 master + Adam m and v + fp32 gradients, summed over the node's GPUs
    assert offloaded["host_offload"] == pytest.approx(s.params * 16)
    params_too = em.estimate(s, "full", zero_stage=3, gpus=2, offload="optimizer+params")
    assert params_too["weights"] == 0 and params_too["host_offload"] == pytest.approx(s.params * 18)
    assert params_too["total"] < 5e9 < offloaded["total"]


def test_fsdp_splits_the_4bit_base_but_not_the_activations():
    s = em.SHAPES["65B"]
    one = em.estimate(s, "qlora", seq_len=512, optimizer="adamw")
    two = em.estimate(s, "qlora", seq_len=512, fsdp=True, gpus=2)  # sft/fsdp-qlora steps torch AdamW
    split = em.estimate(s, "qlora", seq_len=512, layer_split=True, gpus=2, optimizer="adamw")
    assert two["activations"] == one["activations"] and split["activations"] < one["activations"]
    assert one["weights"] / 2 < two["weights"] < one["weights"] * 0.6  # half, plus the gathered layers and head
    assert two["optimizer"] == pytest.approx(one["optimizer"] / 2)


def test_pipeline_stages_and_tensor_parallel_divide_the_full_fine_tune():
    s = em.SHAPES["65B"]  # 80 layers
    eight = em.estimate(s, "full", pp=8, gpus=8, grad_accum=16)
    sixteen = em.estimate(s, "full", pp=8, gpus=16, grad_accum=16)  # the same stages, 2-way FSDP2 within each
    # the fullest stage, the last: 10 layers (projections and norms), the head and the final norm; fp32 masters,
    # gradients and AdamW's two moments
    stage = 10 * (s.layer_params + 2 * s.hidden) + s.vocab * s.hidden + s.hidden
    gathered = 2 * s.layer_params * 2  # two bf16 layers: computing one, fetching the next
    assert eight["weights"] == pytest.approx(4 * stage + gathered)
    assert eight["gradients"] == pytest.approx(4 * stage) and eight["optimizer"] == pytest.approx(8 * stage)
    assert sixteen["optimizer"] == pytest.approx(eight["optimizer"] / 2)
    assert sixteen["weights"] == pytest.approx(2 * stage + gathered)
    assert eight["total"] / 2**30 > 0.9 * 80 > sixteen["total"] / 2**30  # 65B: not on 8 x 80 GB, on 16
    # 1F1B keeps up to pp micro-batches alive on the first stage: more stages, more of them
    assert em.estimate(s, "full", pp=8, gpus=8, grad_accum=2)["activations"] < eight["activations"]
    # tensor parallel halves every stage's matrices
    tp = em.estimate(s, "full", pp=8, tp=2, gpus=16, grad_accum=16)
    assert tp["optimizer"] == pytest.approx(eight["optimizer"] / 2)
    for kwargs, needle in (({"pp": 3, "gpus": 8}, "--gpus=8: must be a whole multiple"),
                           ({"tp": 3, "gpus": 3}, "--tp=3: must divide the 64 attention"),
                           ({"pp": 81, "gpus": 81}, "--pp=81: the model has 80"),
                           ({"pp": 2, "gpus": 2, "method": "qlora"}, "--pp and --tp model full fine-tuning")):
        with pytest.raises(em.UserError, match=needle):
            em.estimate(s, **{"method": "full", **kwargs})
    proc = run_tool("--model=65B", "--method=full", "--pp=8", "--gpus=16")
    assert proc.returncode == 0 and "(pp 8 x tp 1 x dp 2, FSDP2)" in proc.stdout


def test_lora_dropout_costs_activations_and_checkpointing_saves_them():
    s = em.SHAPES["7B"]
    plain, dropout = (em.estimate(s, "lora", lora_dropout=p, gradient_checkpointing=False)["activations"]
                      for p in (0.0, 0.1))
    assert dropout > plain
    assert em.estimate(s, "lora", gradient_checkpointing=True)["activations"] < plain / 5


def test_config_json_is_read_like_the_model(tiny_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = em.load_shape(str(tiny_dir / "config.json"))
    assert (shape.hidden, shape.layers, shape.kv_heads, shape.vocab) == (256, 4, 2, 2048)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_dir))
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert em.load_shape("tiny") == dataclasses.replace(shape, name="tiny") and em.load_shape("7b") is em.SHAPES["7B"]


def test_a_bad_model_name_is_one_line_listing_the_valid_ones():
    proc = run_tool("--model=8B")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["error: --model=8B: not a model size (7B, 13B, 30B, 65B, 70B, tiny) "
                                                "nor a config.json"]
    bad = run_tool("--model=7B", "--method=full", "--offload=optimizer+params", "--zero_stage=2")
    assert bad.returncode == 2 and "needs --zero_stage=3" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_a_broken_or_incomplete_config_json_is_one_line_naming_the_file_and_line(tmp_path):
    broken = tmp_path / "broken" / "config.json"
    broken.parent.mkdir()
    broken.write_text('{"hidden_size": 4096,\n  "num_hidden_layers": 32,,\n}\n')
    proc = run_tool(f"--model={broken}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {broken}:2: not valid JSON (Expecting property name enclosed "
                                                "in double quotes); expected a model's config.json"]
    incomplete = tmp_path / "config.json"
    incomplete.write_text('{"hidden_size": 4096, "num_attention_heads": 32}\n')
    proc = run_tool(f"--model={tmp_path}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"{incomplete}: no 'intermediate_size'" in proc.stderr


def test_one_run_prints_every_row_and_the_cards():
    proc = run_tool("--model=7B", "--method=qlora", "--seq_len=2048")
    assert proc.returncode == 0, proc.stderr
    for label in ("weights", "gradients", "optimizer state", "activations", "framework overhead", "total per GPU",
                  "host RAM", "24 GB card: fits", "80 GB card: fits"):
        assert label in proc.stdout


def test_the_table_has_7b_13b_65b_rows_against_24_and_80_gb_cards():
    proc = run_tool("--table")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "GB |" in line]
    assert {r[0] for r in rows} == {"| 7B", "| 13B", "| 65B"}
    by = {(r[0][2:], r[1], r[2]): r for r in rows}
    assert by[("7B", "QLoRA, NF4 base", "1")][5] == "yes"  # fits a 24 GB card
    assert by[("65B", "QLoRA, NF4 base", "1")][5] == "no" and by[("65B", "QLoRA, NF4 base", "1")][6] == "yes |"
    assert {("65B", "2")} == {(r[0][2:], r[2]) for r in rows if "layer split" in r[1] or "FSDP" in r[1]}


# ---- on CPU: the estimate against a measurement (one child process for all runs, about 30 s on 2 quiet cores)

MID = em.Shape("mid", 512, 1536, 8, 8, 4, 8192)  # 33.6M parameters, grouped-query attention
RUNS = [("tiny", "full", 4, 256, 0.05), ("tiny", "lora", 4, 256, 0.05), ("tiny", "qlora", 4, 256, 0.05),
        ("mid", "full", 1, 256, 0.05), ("mid", "lora", 1, 256, 0.0)]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    sys.path.insert(0, str(REPO / "bench"))
    import memory_estimate

    shapes = {"tiny": em.load_shape("tiny"), "mid": MID}
    runs = [{"shape": shapes[name], "method": method, "batch_size": b, "seq_len": t, "lora_dropout": p}
            for name, method, b, t, p in RUNS]
    results = memory_estimate.measure(runs, tmp_path_factory.mktemp("checkpoints"))
    return {run: r for run, r in zip(RUNS, results)}


@pytest.mark.slow  # the measured peaks come from training runs in child processes
@pytest.mark.parametrize("run", RUNS, ids=lambda r: f"{r[0]}-{r[1]}-{r[2]}x{r[3]}")
def test_cpu_estimate_is_within_20_percent_of_the_measured_peak(measured, run):
    r = measured[run]
    ratio = r["estimated_bytes"] / r["measured_bytes"]
    assert abs(ratio - 1) <= TOLERANCE, (f"{run}: estimated {r['estimated_bytes'] / 1e6:.0f} MB, measured "
                                         f"{r['measured_bytes'] / 1e6:.0f} MB")


def test_dpo_counts_two_rows_per_pair_and_grpo_the_larger_of_training_and_generation():
    s = em.SHAPES["7B"]
    sft = em.estimate(s, "qlora", seq_len=512, batch_size=8, lora_r=16)
    dpo = em.estimate(s, "qlora", seq_len=512, batch_size=4, lora_r=16, stage="dpo")
    assert dpo == sft  # 4 pairs are 8 rows: the same tensors as 8 SFT examples, and no reference model on the GPU
    grpo = em.estimate(s, "qlora", seq_len=512, batch_size=1, lora_r=16, stage="grpo", generations=8)
    kv_cache = 8 * 512 * 32 * 2 * 4096 * 2  # rows x tokens x layers x (K, V) x width x bf16
    assert grpo["generation"] == kv_cache + 8 * 32000 * 4
    assert grpo["activations"] == sft["activations"]  # 8 completions of one prompt train as 8 rows
    assert grpo["weights"] == sft["weights"] + 4 * s.lora_params(16)  # the frozen reference adapter
    training = grpo["weights"] + grpo["optimizer"] + grpo["overhead"] + grpo["gradients"] + grpo["activations"]
    assert grpo["total"] == pytest.approx(max(training, training - grpo["gradients"] - grpo["activations"]
                                              + grpo["generation"]))
    proc = run_tool("--model=7B", "--stage=ppo")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --stage=ppo: expected one of sft, dpo, grpo"
    proc = run_tool("--model=7B", "--stage=dpo", "--method=full")
    assert proc.returncode == 2 and "no --method=full or --fsdp" in proc.stderr
