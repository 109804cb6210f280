"""QLoRA supervised fine-tuning of a Llama-family model: a frozen 4-bit NF4 base (bitsandbytes, double quant) with
LoRA adapters on every linear projection, trained on instruction data with the prompt masked out of the loss.

Default run, no GPU, no download (tiny random-init Llama, bundled English/Chinese sample data), about a minute:
    cd sft/qlora && bash run.sh
One GPU, a real checkpoint (bf16 compute, gradient checkpointing, paged 8-bit AdamW):
    bash run.sh --model_path=/models/Llama-2-7b-hf --data_path=train.jsonl --eval_data_path=eval.jsonl
Data-parallel on N GPUs: NGPU=N bash run.sh ...
Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 bash run.sh ...
Data (.jsonl, .json, .jsonl.zst): alpaca {"instruction","input","output"}, {"input","target"} or chat {"messages"}.
Writes output_dir/: final/ (adapter + tokenizer), config.json, metrics.jsonl, loss.png, tensorboard/, checkpoints/.
A 7B base in 4-bit takes about 5 GB; with LoRA r=64, sequence 1024 and batch 4 a 24 GB card has room to spare.
A base too big for one card, split by layers over the GPUs of one process (65B in 4-bit on two 24 GB cards):
    CUDA_VISIBLE_DEVICES=0,1 bash run.sh --model_path=/models/llama-65b --device_map=auto --max_memory_per_gpu=22GiB \
        --lora_r=16 --max_seq_len=512 --batch_size=1 --grad_accum=16
Only one GPU computes at a time (it is for fitting, not speed; for speed shard with sft/fsdp-qlora).
"""
import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from common.checkpoint import (
    atomic_write_dir,
    latest_checkpoint,
    prepare_output_dir,
    resume_adapter_training,
    save_checkpoint,
)
from common.config import config_to_dict, exit_on_user_error, parse_config, refuse_values_below
from common.data import (
    batch_stream,
    build_sft_examples,
    collate_left_padded,
    collate_packed,
    pack_examples,
    padding_efficiency,
    plan_batches,
    read_records,
    sft_data_report,
)
from common.inference import save_generation_config
from common.layer_split import describe_layer_split, layer_split_device_map
from common.logs import StepLogger, memory_gb, peak_memory_gb, quiet_third_party_logs
from common.losses import causal_lm_loss_sum, count_trained_tokens, is_finite, loss_window, non_finite_error
from common.model import (
    add_lora,
    apply_liger_kernels,
    compile_decoder_layers,
    count_parameters,
    load_model,
    load_tokenizer,
    prepare_for_lora_training,
    resolve_liger,
    resolve_model_path,
)
from common.optim import make_optimizer, warmup_cosine
from common.runtime import (
    all_reduce_sum,
    catch_stop_signals,
    cleanup,
    setup_runtime,
    stop_requested,
    training_precision,
)

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "data" / "sft"


@dataclass
class Config:
    # model
    model_path: str = "tiny"  # 'tiny' (random-init test Llama) or a local Hugging Face model folder
    quantization: Literal["nf4", "int8", "none"] = "nf4"  # base weights: 4-bit NormalFloat, 8-bit, or as stored
    gradient_checkpointing: bool | None = None  # recompute activations in backward (less memory); None: on with a GPU
    device_map: Literal["single", "auto"] = "single"  # auto: the layers split over all visible GPUs (too big for one)
    max_memory_per_gpu: str = ""  # auto: weights cap per GPU, 22GiB (room for activations) or 10GiB,22GiB; '': all free
    lora_r: int = 64  # adapter rank (QLoRA paper: 64)
    lora_alpha: int = 16  # adapter scale is alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter input (QLoRA paper: 0.05-0.1; masks cost ~30% of a CPU step)
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # or e.g. q_proj,v_proj
    lora_modules_to_save: list[str] = field(default_factory=list)  # trained in full beside LoRA, e.g. lm_head
    compile: bool = False  # torch.compile each decoder layer (the first batch compiles: ~1 min on CPU; see README)
    liger: Literal["auto", "on", "off"] = "auto"  # Liger's RMSNorm/RoPE/SwiGLU kernels; auto: on a GPU when installed
    # data
    data_path: str = str(SAMPLE_DATA / "train.jsonl")  # training records
    eval_data_path: str = str(SAMPLE_DATA / "eval.jsonl")  # held-out records; '' for none
    prompt_template: Literal["alpaca", "chat"] = "alpaca"  # chat: the tokenizer's chat template for every record
    train_on_prompt: bool = False  # also put loss on prompt tokens
    max_seq_len: int = 1024  # longer examples lose prompt tokens from the left first, then answer tokens
    truncation: Literal["keep_answer", "drop"] = "keep_answer"  # or drop examples that do not fit
    group_by_length: bool = True  # batch similar lengths together: less padding, faster
    packing: bool = False  # concatenate examples into rows of max_seq_len, kept apart by masks (best with FA2 on GPU)
    loss_chunk: int = 0  # >0: LM head + loss on this many trained tokens at a time, recomputed in backward (e.g. 1024)
    # optimization
    epochs: float = 3.0  # passes over the training data (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    batch_size: int = 4  # examples per micro-batch per GPU
    grad_accum: int = 4  # micro-batches per optimizer step
    lr: float = 2e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW decay (not on norms and biases)
    warmup_ratio: float = 0.03  # fraction of steps with linear warmup, then cosine decay to 10%
    max_grad_norm: float = 0.3  # gradient clipping (QLoRA paper: 0.3)
    optim: Literal["paged_adamw_8bit", "adamw_8bit", "adamw"] = "paged_adamw_8bit"  # 8-bit ones need a GPU
    seed: int = 42  # seeds LoRA init, dropout and data order
    # output, logging, checkpoints
    output_dir: str = "./out"  # everything this run writes
    log_every: int = 1  # steps between step-log lines
    eval_every: int = 0  # steps between evals; 0: only before training and at the end
    save_every: int = 0  # steps between checkpoints for --resume; 0: none
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the latest checkpoint in output_dir
    overwrite: bool = False  # replace an earlier, different run in output_dir (else refused)
    on_nan: Literal["stop", "skip"] = "stop"  # a nan/inf loss or gradient: stop before updating, or skip the step
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow or none
    inspect_data: bool = False  # data only: lengths, truncation, trained tokens, bad records; exit, no weights loaded


# build_examples, evaluate and save_final are this recipe's own copies (the other sft recipes have near-identical
# ones): short, and kept here on purpose so this folder can be copied and edited on its own.
def build_examples(cfg: Config, tokenizer, path: str):
    """One data file read, rendered, tokenized, masked and truncated: (examples, stats)."""
    records = read_records(path)
    return build_sft_examples(records, tokenizer, cfg.max_seq_len, cfg.prompt_template, cfg.train_on_prompt,
                              cfg.truncation)


def evaluate(model, batches, examples, pad_id, rt, autocast, loss_chunk: int) -> float:
    """Mean loss per trained token over the eval batches of all ranks."""
    model.eval()
    loss_sum, n_tokens = 0.0, 0
    input_device = model.get_input_embeddings().weight.device  # the first GPU of a layer split
    with torch.no_grad(), autocast:
        for idx in batches:
            batch = collate_left_padded([examples[i] for i in idx], pad_id)
            window = loss_window(batch["labels"])  # window and counts from the CPU labels: no wait for the GPU
            n_tokens += count_trained_tokens(batch["labels"])
            labels = batch.pop("labels")  # stays on the CPU: the loss finds the trained tokens there
            batch = {k: v.to(input_device) for k, v in batch.items()}
            loss = causal_lm_loss_sum(model, model.get_output_embeddings(), batch, labels, window, loss_chunk)
            loss_sum += loss.double()  # on the device, read once below
    model.train()
    loss_sum = float(loss_sum)
    loss_sum, n_tokens = all_reduce_sum([loss_sum, n_tokens], rt)
    return loss_sum / max(n_tokens, 1)


def log_startup(log, cfg: Config, model_dir, model, precision, checkpointing, kernels, data_lines, plan, lengths,
                total_steps, rt):
    """The start-up block: model, data (with one rendered example), batches, steps, and the layer split."""
    trainable, total = count_parameters(model)
    log.info(f"model    {cfg.model_path} ({model_dir}) | {cfg.quantization} base + LoRA r={cfg.lora_r} on "
             f"{','.join(cfg.lora_target_modules)} | trainable {trainable:,} / {total:,} params "
             f"({100 * trainable / total:.2f}%) | {precision.reason} | "
             f"activation checkpointing {'on' if checkpointing else 'off'} | {kernels}")
    for line in data_lines:
        log.info(line)
    batches_per_epoch = len(plan(0))
    rows_per_step = cfg.batch_size * cfg.grad_accum * rt.world_size
    row_kind = "packed rows" if cfg.packing else "examples"
    log.info(f"batches  {batches_per_epoch} per epoch per rank | batch {cfg.batch_size} x accum {cfg.grad_accum} x "
             f"{rt.world_size} ranks = {rows_per_step} {row_kind}/step | "
             f"padding efficiency {padding_efficiency(plan(0), lengths):.3f}")
    log.info(f"steps    {total_steps} ({total_steps * cfg.grad_accum / batches_per_epoch:.2f} epochs), "
             f"lr {cfg.lr:g} warmup {int(cfg.warmup_ratio * total_steps)} | device {rt.describe()}")
    if cfg.device_map == "auto":  # no hf_device_map: it all fit on the first GPU
        input_device = model.get_input_embeddings().weight.device
        split = describe_layer_split(getattr(model, "hf_device_map", {"": str(input_device)}))
        log.info(f"layers   {split}; one GPU computes at a time | mem: peak of the fullest GPU")


def save_final(model, tokenizer, final_dir: Path, rt):
    """Adapter, tokenizer and generation_config.json in final/, written by rank 0 all at once."""
    def write(d):
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        save_generation_config(d, model, tokenizer)

    if rt.is_main:
        atomic_write_dir(final_dir, write)


def main(cfg: Config) -> dict:
    # ---- setup
    quiet_third_party_logs()
    refuse_values_below(cfg, {"batch_size": 1, "grad_accum": 1, "max_seq_len": 2, "max_steps": 0, "loss_chunk": 0,
                              "log_every": 1, "eval_every": 0, "save_every": 0, "keep_last": 1})
    rt = setup_runtime(cfg.seed)
    liger = resolve_liger(cfg.liger, rt.device)  # --liger=on without a GPU or liger-kernel: refused before any output
    device_map, max_memory = layer_split_device_map(cfg.device_map, cfg.max_memory_per_gpu, rt.device, rt.world_size)
    out = Path(cfg.output_dir)

    # ---- tokenizer and data
    model_dir = resolve_model_path(cfg.model_path)
    tokenizer = load_tokenizer(model_dir)
    examples, train_stats = build_examples(cfg, tokenizer, cfg.data_path)
    eval_examples, eval_stats = build_examples(cfg, tokenizer, cfg.eval_data_path) if cfg.eval_data_path else ([], None)
    # each packed row holds several examples; position ids and a block mask keep them independent
    train_examples = pack_examples(examples, cfg.max_seq_len) if cfg.packing else examples
    data_lines = sft_data_report(tokenizer, cfg.data_path, examples, train_stats, cfg.eval_data_path, eval_stats,
                                 train_examples if cfg.packing else None, cfg.max_seq_len)
    if cfg.inspect_data:  # a data-only run: nothing written, no model weights read
        if rt.is_main:
            print("\n".join(data_lines), flush=True)
        cleanup(rt)
        return {"inspect_data": True, "train_stats": train_stats, "eval_stats": eval_stats}
    lengths = [len(e["input_ids"]) for e in train_examples]

    def plan(epoch):  # this rank's batches of one epoch
        return plan_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length, rt.rank, rt.world_size)

    batches_per_epoch = len(plan(0))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum)
    eval_lengths = [len(e["input_ids"]) for e in eval_examples]  # every eval example once, split over ranks
    all_eval_batches = plan_batches(eval_lengths, cfg.batch_size, 0, 0, True) if eval_examples else []
    eval_batches = all_eval_batches[rt.rank::rt.world_size]
    prepare_output_dir(cfg, out, rt.is_main)  # refuses to mix this run into an earlier, different one
    log = StepLogger(out, total_steps, cfg.report_to, enabled=rt.is_main, config=config_to_dict(cfg))
    precision = training_precision(rt.device, "grad_scaler")  # fp16 + GradScaler below compute capability 8.0
    dtype = precision.dtype
    scaler = torch.amp.GradScaler(rt.device.type, enabled=precision.grad_scaler)  # a no-op in bf16 and fp32
    autocast = torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    # ---- model: quantized base, LoRA adapters
    model = load_model(model_dir, cfg.quantization, dtype, device_map, max_memory=max_memory)
    kernels = apply_liger_kernels(model) if liger else "liger off"  # before LoRA: Liger looks for the bare layers
    # split by layers (--device_map=auto), the embedding is on the first GPU and the head on the last: the batch goes
    # to the one, the loss is taken on the other, and the step log's mem is the fullest GPU
    input_device = model.get_input_embeddings().weight.device
    devices = sorted({p.device for p in model.parameters()}, key=str)
    model.config.pad_token_id = tokenizer.pad_token_id
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else rt.device.type == "cuda"
    model = prepare_for_lora_training(model, cfg.quantization != "none", checkpointing)
    model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                     modules_to_save=cfg.lora_modules_to_save or None)
    if cfg.compile:  # after the adapters, so that the compiled layers include them
        kernels += f" | {compile_decoder_layers(model)} decoder layers compiled"
    train_model = model
    if rt.distributed:
        ddp_devices = [rt.local_rank] if rt.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ddp_devices)

    # ---- optimizer and schedule
    optimizer = make_optimizer(model, cfg.optim, cfg.lr, cfg.weight_decay, rt.device)
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    start_step = resume_adapter_training(model, optimizer, scheduler, out, rt.device, log, scaler) if cfg.resume else 0
    log_startup(log, cfg, model_dir, model, precision, checkpointing, kernels, data_lines, plan, lengths, total_steps,
                rt)

    # ---- training loop
    stream = batch_stream(plan, start_batch=start_step * cfg.grad_accum)  # resume: past what was trained on
    pad_id, attn = tokenizer.pad_token_id, model.config._attn_implementation
    head = model.get_output_embeddings()  # the LM head of the unwrapped model: the loss runs it on the trained tokens

    def collate(rows):
        return collate_packed(rows, pad_id, attn) if cfg.packing else collate_left_padded(rows, pad_id)

    if eval_examples and start_step == 0:
        log.log(0, {"eval_loss": evaluate(model, eval_batches, eval_examples, pad_id, rt, autocast, cfg.loss_chunk)})
    model.train()
    train_seconds, tokens_seen, tokens_computed, losses = 0.0, 0, 0, []
    stop, preempted, path = catch_stop_signals(), False, None  # SIGTERM / Ctrl-C: checkpoint, then exit
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        chunk_idx = [next(stream) for _ in range(cfg.grad_accum)]
        chunk = [collate([train_examples[i] for i in idx]) for idx in chunk_idx]
        # normalise by the trained tokens of the whole step on all ranks: every token weighs the same
        n_trained = sum(count_trained_tokens(b["labels"]) for b in chunk)
        n_tokens = sum(lengths[i] for idx in chunk_idx for i in idx)
        n_computed = sum(b["input_ids"].numel() for b in chunk)
        n_trained, n_tokens, n_computed = all_reduce_sum([n_trained, n_tokens, n_computed], rt)
        loss_sum = 0.0
        for i, batch in enumerate(chunk):
            window = loss_window(batch["labels"])  # from the CPU labels: no wait for the GPU
            labels = batch.pop("labels")  # stays on the CPU: the loss finds the trained tokens there
            batch = {k: v.to(input_device) for k, v in batch.items()}
            sync = i == len(chunk) - 1 or not rt.distributed
            with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast:
                # logits only where a trained token is predicted (the answers), not over the prompts
                micro_loss = causal_lm_loss_sum(train_model, head, batch, labels, window, cfg.loss_chunk)
            # DDP averages gradients over ranks, so scale by world_size to get the sum over all ranks' tokens
            scaler.scale(micro_loss * rt.world_size / max(n_trained, 1)).backward()
            loss_sum += micro_loss.detach().double()  # stays on the device: no wait per micro-batch
        scaler.unscale_(optimizer)  # clip and report the true gradients
        trained_params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trained_params, cfg.max_grad_norm)
        (loss_sum,) = all_reduce_sum([float(loss_sum)], rt)  # the step's one read of the device losses
        loss = loss_sum / max(n_trained, 1)
        # checked before any update; with the fp16 scaler an overflow alone is the scaler's to skip
        if not is_finite(loss, grad_norm, scaler.is_enabled()):
            if cfg.on_nan == "stop":
                raise non_finite_error(step, loss, grad_norm, out)
            optimizer.zero_grad(set_to_none=True)
            scaler.update()
            scheduler.step()
            log.info(f"step {step}/{total_steps}: loss {loss}, gradient norm {float(grad_norm)}: "
                     "skipped (--on_nan=skip)")
            continue
        scaler.step(optimizer)  # fp16: skips a step whose gradients overflowed, and update() lowers the scale
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        train_seconds += dt
        tokens_seen += int(n_tokens)
        tokens_computed += int(n_computed)
        losses.append(loss)
        log.advance()
        if step % cfg.log_every == 0 or step == total_steps:
            log.log(step, {"loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                           "tokens_per_s": n_tokens / dt, **memory_gb(devices)})
        if eval_examples and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != total_steps:
            eval_loss = evaluate(model, eval_batches, eval_examples, pad_id, rt, autocast, cfg.loss_chunk)
            log.log(step, {"eval_loss": eval_loss})
        preempted = stop_requested(stop, rt)
        if (cfg.save_every > 0 and step % cfg.save_every == 0 or preempted):  # all ranks call it; rank 0 writes
            path = save_checkpoint(out, step, model.save_pretrained, optimizer, scheduler, cfg.keep_last, scaler)
            log.info(f"saved checkpoint {path}")
        if preempted:
            log.info(f"stopped by {stop.signal or 'a signal to another rank'} after step {step}: checkpoint "
                     f"{path or latest_checkpoint(out)}; continue with --resume")
            break

    stop.restore()
    if preempted:
        log.close()
        cleanup(rt)
        return {"preempted": True, "losses": losses, "steps": step - start_step}

    # ---- save and final eval
    final_dir = out / "final"
    save_final(model, tokenizer, final_dir, rt)
    eval_loss = None
    if eval_examples:
        eval_loss = evaluate(model, eval_batches, eval_examples, pad_id, rt, autocast, cfg.loss_chunk)
        log.log(total_steps, {"eval_loss": eval_loss})
    log.info(f"done: {total_steps - start_step} steps in {train_seconds:.1f}s, "
             f"{tokens_seen / max(train_seconds, 1e-9):,.0f} tok/s, peak mem {peak_memory_gb(devices):.2f} GB")
    log.info(f"adapter and tokenizer in {final_dir}; metrics in {out / 'metrics.jsonl'}, curve in {out / 'loss.png'}")
    log.info(f"use it: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{model_dir}'), '{final_dir}')")
    log.close()
    cleanup(rt)
    return {"model": model, "tokenizer": tokenizer, "losses": losses, "eval_loss": eval_loss, "final_dir": final_dir,
            "train_seconds": train_seconds, "tokens": tokens_seen, "tokens_computed": tokens_computed,
            "steps": total_steps - start_step}


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
