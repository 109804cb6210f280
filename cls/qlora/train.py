"""QLoRA sequence classification and regression on a Llama-family model: a frozen 4-bit NF4 base (bitsandbytes),
LoRA on every linear projection and a fully trained score head, reading one vector per text (the last token of a
left-padded row, or the mean of its tokens).

Default run, no GPU, no download (tiny random-init Llama, bundled 3-way sentiment data), about a minute:
    cd cls/qlora && bash run.sh
Regression (one float target):      bash run.sh --task=regression --data_path=../../data/cls/regression_train.jsonl \
                                        --eval_data_path=../../data/cls/regression_eval.jsonl
One GPU, a real checkpoint:         bash run.sh --model_path=/models/Llama-2-7b-hf --data_path=train.jsonl \
                                        --eval_data_path=eval.jsonl
N GPUs (DDP): NGPU=N bash run.sh ...      Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 bash run.sh ...
Data (.jsonl, .json, .jsonl.zst): {"text": "...", "label": "positive"} (string or integer class) or a number for
regression. Writes output_dir/: final/ (adapter with the score head, tokenizer, labels.json), eval_results.json,
predictions.jsonl (with --predict_data_path), config.json, metrics.jsonl, loss.png, tensorboard/.
A 7B base in 4-bit takes about 5 GB of GPU memory; sequence classification texts are short, so one 8-12 GB card fits.
A base too big for one card, split by layers over the GPUs of one process (65B in 4-bit on two 24 GB cards):
    CUDA_VISIBLE_DEVICES=0,1 bash run.sh --model_path=/models/llama-65b --device_map=auto --max_memory_per_gpu=22GiB \
        --lora_r=16 --batch_size=1 --grad_accum=16
Only one GPU computes at a time (it is for fitting, not speed; for speed shard with sft/fsdp-qlora).
"""
import contextlib
import dataclasses
import json
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
from common.cls_eval import (
    ClsLoss,
    cls_loss_sum,
    data_report,
    describe_loss,
    eval_metrics,
    log_eval,
    parse_class_weights,
    prediction_rows,
    resolve_loss_name,
    save_eval_results,
    score_examples,
    target_tensor,
    write_jsonl,
)
from common.config import config_to_dict, exit_on_user_error, parse_config
from common.data import batch_stream, build_cls_examples, collate_left_padded, label_set, plan_batches, read_records
from common.layer_split import describe_layer_split, layer_split_device_map
from common.logs import StepLogger, memory_gb, peak_memory_gb, quiet_third_party_logs
from common.losses import is_finite, non_finite_error
from common.model import (
    PooledClassifier,
    add_lora,
    count_parameters,
    load_model,
    load_tokenizer,
    prepare_for_lora_training,
    resolve_model_path,
)
from common.optim import make_optimizer, resolve_lr, warmup_cosine
from common.runtime import (
    all_reduce_sum,
    catch_stop_signals,
    cleanup,
    setup_runtime,
    stop_requested,
    training_precision,
)

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "data" / "cls"


@dataclass
class Config:
    # task
    task: Literal["classification", "regression"] = "classification"  # regression: one float target
    pooling: Literal["last", "mean"] = "last"  # the last token (EOS) of each text, or the mean of its tokens
    loss: Literal["auto", "ce", "focal", "mse", "huber"] = "auto"  # auto: ce for classification, mse for regression
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    class_weights: str = "none"  # none, balanced (inverse frequency) or one weight per class: 1.0,2.5,1.0
    focal_gamma: float = 2.0  # focal loss focusing strength
    # model
    model_path: str = "tiny"  # 'tiny' (random-init test Llama) or a local Hugging Face model folder
    quantization: Literal["nf4", "int8", "none"] = "nf4"  # base weights: 4-bit NormalFloat, 8-bit, or as stored
    gradient_checkpointing: bool | None = None  # recompute activations in backward (less memory, slower); None: GPU
    device_map: Literal["single", "auto"] = "single"  # auto: layers split over the visible GPUs (too big for one)
    max_memory_per_gpu: str = ""  # auto: weights cap per GPU, 22GiB (room for the rest) or 10GiB,22GiB; '': free
    lora_r: int = 16  # adapter rank
    lora_alpha: int = 32  # adapter scale is alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter input (QLoRA paper: 0.05-0.1; masks cost ~30% of a CPU step)
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # or e.g. q_proj,v_proj
    # data
    data_path: str = str(SAMPLE_DATA / "train.jsonl")  # training records {"text", "label"}
    eval_data_path: str = str(SAMPLE_DATA / "eval.jsonl")  # held-out records; '' for none
    predict_data_path: str = ""  # records to label after training (label optional) -> predictions.jsonl
    text_field: str = "text"  # record field holding the text
    label_field: str = "label"  # record field holding the class or the number
    max_seq_len: int = 512  # longer texts keep their start and the final EOS
    append_eos: bool = True  # end every text with EOS: the token a last-token classifier reads
    group_by_length: bool = True  # batch similar lengths together: less padding, faster
    inspect_data: bool = False  # data only: counts, lengths, truncation, labels, bad records; exit, no weights loaded
    # optimization
    epochs: float = 3.0  # passes over the training data (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    batch_size: int = 16  # examples per micro-batch per GPU
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # peak lr (adapters, head); none: 2e-4 (QLoRA's rate for 7B-13B), 1e-3 on 'tiny'
    weight_decay: float = 0.0  # AdamW decay (not on norms and biases)
    warmup_ratio: float = 0.05  # fraction of steps with linear warmup, then cosine decay to 10%
    max_grad_norm: float = 1.0  # gradient clipping
    optim: Literal["paged_adamw_8bit", "adamw_8bit", "adamw"] = "paged_adamw_8bit"  # 8-bit ones need a GPU
    seed: int = 42  # seeds LoRA and head init, dropout and data order
    # output, logging, checkpoints
    output_dir: str = "./out"  # everything this run writes
    log_every: int = 5  # steps between step-log lines
    eval_every: int = 0  # steps between evals; 0: only before training and at the end
    save_every: int = 0  # steps between checkpoints for --resume; 0: none
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the latest checkpoint in output_dir
    overwrite: bool = False  # replace an earlier, different run in output_dir (else refused)
    on_nan: Literal["stop", "skip"] = "stop"  # a nan/inf loss or gradient: stop before updating, or skip the step
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow or none


def main(cfg: Config) -> dict:
    # ---- setup
    quiet_third_party_logs()
    lr = resolve_lr(cfg.lr, cfg.model_path, real_base_lr=2e-4, tiny_lr=1e-3)
    cfg = dataclasses.replace(cfg, lr=lr.value)  # config.json records the rate used
    rt = setup_runtime(cfg.seed)
    device_map, max_memory = layer_split_device_map(cfg.device_map, cfg.max_memory_per_gpu, rt.device, rt.world_size)
    out = Path(cfg.output_dir)
    precision = training_precision(rt.device, "grad_scaler")  # fp16 + GradScaler below compute capability 8.0
    dtype = precision.dtype
    scaler = torch.amp.GradScaler(rt.device.type, enabled=precision.grad_scaler)  # a no-op in bf16 and fp32
    autocast = torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    loss_name = resolve_loss_name(cfg.loss, cfg.task)  # auto: ce for classification, mse for regression

    # ---- tokenizer and data
    model_dir = resolve_model_path(cfg.model_path)
    tokenizer = load_tokenizer(model_dir)
    train_records = read_records(cfg.data_path)
    labels = None if cfg.task == "regression" else label_set(train_records, cfg.label_field)

    def build(records, require_label=True):
        return build_cls_examples(records, tokenizer, cfg.max_seq_len, cfg.task, labels, cfg.text_field,
                                  cfg.label_field, cfg.append_eos, require_label)

    train_examples, train_stats = build(train_records)
    eval_examples, eval_stats = build(read_records(cfg.eval_data_path)) if cfg.eval_data_path else ([], None)
    predict_records = read_records(cfg.predict_data_path) if cfg.predict_data_path else []
    train_targets = [e["label"] for e in train_examples]
    class_weights = parse_class_weights(cfg.class_weights, train_targets, labels)
    loss = ClsLoss(cfg.task, loss_name, cfg.label_smoothing, class_weights, cfg.focal_gamma)
    files = {"train": (cfg.data_path, train_examples, train_stats)}
    files["eval"] = (cfg.eval_data_path, eval_examples, eval_stats)
    if cfg.inspect_data:  # a data-only run: nothing written, no model weights read
        files["predict"] = (cfg.predict_data_path, *build(predict_records, require_label=False))
        if rt.is_main:
            print("\n".join(data_report(files, tokenizer, cfg.task, labels)), flush=True)
        cleanup(rt)
        return {"inspect_data": True, "train_stats": train_stats, "eval_stats": eval_stats}
    lengths = [len(e["input_ids"]) for e in train_examples]

    def plan(epoch):  # this rank's batches of one epoch
        return plan_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length, rt.rank, rt.world_size)

    batches_per_epoch = len(plan(0))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum)
    prepare_output_dir(cfg, out, rt.is_main)  # refuses to mix this run into an earlier, different one
    log = StepLogger(out, total_steps, cfg.report_to, enabled=rt.is_main, config=config_to_dict(cfg))

    # ---- model: quantized base, LoRA adapters, a fully trained score head
    from transformers import AutoModelForSequenceClassification

    label_names = [str(x) for x in labels] if labels else ["score"]
    model = load_model(model_dir, cfg.quantization, dtype, device_map, model_class=AutoModelForSequenceClassification,
                       max_memory=max_memory, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                       label2id={n: i for i, n in enumerate(label_names)})
    # split by layers (--device_map=auto), the embedding is on the first GPU and the head on the last: the batch goes
    # to the one, the loss is taken on the other, and the step log's mem is the fullest GPU
    input_device = model.get_input_embeddings().weight.device
    devices = sorted({p.device for p in model.parameters()}, key=str)
    model.config.pad_token_id = tokenizer.pad_token_id
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else rt.device.type == "cuda"
    model = prepare_for_lora_training(model, cfg.quantization != "none", checkpointing)
    model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, task_type="SEQ_CLS")
    trainable, total = count_parameters(model)
    classifier = PooledClassifier(model, cfg.pooling)
    train_classifier = classifier
    if rt.distributed:
        train_classifier = torch.nn.parallel.DistributedDataParallel(
            classifier, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

    # ---- optimizer and schedule
    trained_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, cfg.optim, cfg.lr, cfg.weight_decay, rt.device)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup))
    start_step = resume_adapter_training(model, optimizer, scheduler, out, rt.device, log, scaler) if cfg.resume else 0

    log.info(f"model    {cfg.model_path} ({model_dir}) | {cfg.quantization} base + LoRA r={cfg.lora_r} + score head | "
             f"{cfg.pooling}-token pooling | trainable {trainable:,} / {total:,} params | {precision.reason}")
    log.info(f"task     {cfg.task}, {describe_loss(loss, labels)}")
    for line in data_report(files, tokenizer, cfg.task, labels):
        log.info(line)
    log.info(f"steps    {total_steps} ({total_steps * cfg.grad_accum / batches_per_epoch:.2f} epochs), batch "
             f"{cfg.batch_size} x accum {cfg.grad_accum} x {rt.world_size} ranks, lr {lr.description} | "
             f"device {rt.describe()}")
    if cfg.device_map == "auto":  # no hf_device_map: it all fit on the first GPU
        split = describe_layer_split(getattr(model, "hf_device_map", {"": str(input_device)}))
        log.info(f"layers   {split}; one GPU computes at a time | mem: peak of the fullest GPU")

    def evaluate(examples) -> torch.Tensor:  # scores of every example, each rank scoring its share
        return score_examples(classifier, examples, len(label_names), cfg.batch_size, tokenizer.pad_token_id,
                              input_device, rt, autocast)

    # ---- training loop
    stream = batch_stream(plan, start_batch=start_step * cfg.grad_accum)  # resume: what was trained on is skipped
    if eval_examples and start_step == 0:
        metrics = eval_metrics(evaluate(eval_examples), eval_examples, loss, label_names, train_targets)
        log_eval(log, 0, total_steps, metrics, cfg.task)
    classifier.train()
    train_seconds, tokens_seen, losses = 0.0, 0, []
    stop, preempted, path = catch_stop_signals(), False, None  # SIGTERM / Ctrl-C: checkpoint, then exit
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        chunk = [[train_examples[i] for i in next(stream)] for _ in range(cfg.grad_accum)]
        n_examples = sum(len(c) for c in chunk)
        n_tokens = sum(len(e["input_ids"]) for c in chunk for e in c)
        n_examples, n_tokens = all_reduce_sum([n_examples, n_tokens], rt)
        loss_sum = 0.0
        for i, examples in enumerate(chunk):
            batch = {k: v.to(input_device) for k, v in collate_left_padded(examples, tokenizer.pad_token_id).items()}
            sync = i == len(chunk) - 1 or not rt.distributed
            with (contextlib.nullcontext() if sync else train_classifier.no_sync()), autocast:
                micro_loss = cls_loss_sum(train_classifier(**batch), target_tensor(examples, cfg.task), loss)
            # mean over the examples of the whole step on all ranks (DDP averages gradients, hence * world_size)
            scaler.scale(micro_loss * rt.world_size / n_examples).backward()
            loss_sum += micro_loss.detach().double()  # stays on the device: no wait per micro-batch
        scaler.unscale_(optimizer)  # clip and report the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(trained_params, cfg.max_grad_norm)
        (loss_sum,) = all_reduce_sum([float(loss_sum)], rt)  # the step's one read of the device losses
        step_loss = loss_sum / n_examples
        # before any update; with the fp16 scaler an overflow alone is the scaler's to skip
        if not is_finite(step_loss, grad_norm, loss_scaled=scaler.is_enabled()):
            if cfg.on_nan == "stop":
                raise non_finite_error(step, step_loss, grad_norm, out)
            optimizer.zero_grad(set_to_none=True)
            scaler.update()
            scheduler.step()
            log.info(f"step {step}/{total_steps}: loss {step_loss}, gradient norm {float(grad_norm)}: skipped "
                     "(--on_nan=skip)")
            continue
        scaler.step(optimizer)  # fp16: skips a step whose gradients overflowed, and update() lowers the scale
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        train_seconds += dt
        tokens_seen += int(n_tokens)
        losses.append(step_loss)
        log.advance()
        if step % cfg.log_every == 0 or step == total_steps:
            log.log(step, {"loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                           "tokens_per_s": n_tokens / dt, **memory_gb(devices)})
        if eval_examples and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != total_steps:
            metrics = eval_metrics(evaluate(eval_examples), eval_examples, loss, label_names, train_targets)
            log_eval(log, step, total_steps, metrics, cfg.task)
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

    # ---- save, final eval, predictions
    final_dir = out / "final"
    label_info = {"task": cfg.task, "labels": label_names, "pooling": cfg.pooling, "append_eos": cfg.append_eos,
                  "text_field": cfg.text_field}
    if rt.is_main:
        def write_final(d):
            model.save_pretrained(d)
            tokenizer.save_pretrained(d)
            (d / "labels.json").write_text(json.dumps(label_info, indent=2, ensure_ascii=False) + "\n")
        atomic_write_dir(final_dir, write_final)
    results = None
    if eval_examples:
        results = eval_metrics(evaluate(eval_examples), eval_examples, loss, label_names, train_targets)
        log_eval(log, total_steps, total_steps, results, cfg.task)
        if rt.is_main:
            save_eval_results(log, out, total_steps, results, cfg.task)
    if predict_records:
        examples, _ = build(predict_records, require_label=False)
        rows = prediction_rows(examples, evaluate(examples), cfg.task, labels, cfg.text_field)
        if rt.is_main:
            write_jsonl(out / "predictions.jsonl", rows)
            log.info(f"predictions for {len(examples)} records in {out / 'predictions.jsonl'}")
    log.info(f"done: {total_steps - start_step} steps in {train_seconds:.1f}s, "
             f"{tokens_seen / max(train_seconds, 1e-9):,.0f} tok/s, peak mem {peak_memory_gb(devices):.2f} GB")
    log.info(f"adapter + score head, tokenizer and labels.json in {final_dir}")
    log.close()
    cleanup(rt)
    return {"model": model, "classifier": classifier, "tokenizer": tokenizer, "losses": losses, "eval": results,
            "labels": labels, "final_dir": final_dir, "train_seconds": train_seconds, "tokens": tokens_seen,
            "steps": total_steps - start_step}


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
