"""Full-parameter sequence classification and regression of a Llama-family model under DeepSpeed ZeRO: every weight
and the score head train; the fp32 master weights and Adam states live in CPU RAM and are stepped there
(DeepSpeedCPUAdam), so one GPU holds only the bf16 weights, gradients and activations. ZeRO-3 (optionally with the
weights offloaded too) for large models. One vector per text: the last token of a left-padded row, or the mean.

Default run, no GPU, no download (tiny random-init Llama, bundled 3-way sentiment data), about a minute:
    cd cls/full-ft-deepspeed-offload && bash run.sh
Regression (one float target):      bash run.sh --task=regression --data_path=../../data/cls/regression_train.jsonl \
                                        --eval_data_path=../../data/cls/regression_eval.jsonl
One GPU, a real checkpoint:         bash run.sh --model_path=/models/Llama-2-7b-hf --data_path=train.jsonl \
                                        --eval_data_path=eval.jsonl
N GPUs: NGPU=N bash run.sh ...   Several nodes: HOSTFILE=hostfile bash run.sh ...   Large models: --zero_stage=3
Data (.jsonl, .json, .jsonl.zst): {"text": "...", "label": "positive"} (string or integer class) or a number for
regression. Writes output_dir/: final/ (config.json + model.safetensors + tokenizer + labels.json), eval_results.json,
predictions.jsonl (with --predict_data_path), config.json, metrics.jsonl, loss.png, tensorboard/, checkpoints/.
The first run JIT-compiles DeepSpeedCPUAdam with gcc (60-90 s, cached in TORCH_EXTENSIONS_DIR).
Host RAM for the offloaded optimizer: 12-16 bytes/parameter (about 100 GB for 7B).
"""
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from common.checkpoint import atomic_write_dir, latest_checkpoint, prepare_output_dir, resume_checkpoint
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
from common.config import UserError, config_to_dict, exit_on_user_error, parse_config
from common.data import batch_stream, build_cls_examples, collate_left_padded, label_set, plan_batches, read_records
from common.deepspeed_utils import (
    build_cpu_adam,
    fill_ds_config,
    gather_full_state_dict,
    init_distributed,
    load_deepspeed_checkpoint,
    quiet_deepspeed_warnings,
    read_ds_config,
    save_deepspeed_checkpoint,
)
from common.logs import StepLogger, memory_gb, peak_memory_gb, quiet_third_party_logs
from common.losses import is_finite, non_finite_error
from common.model import PooledClassifier, load_model, load_tokenizer, resolve_model_path
from common.optim import warmup_cosine, weight_decay_groups
from common.runtime import (
    all_reduce_sum,
    catch_stop_signals,
    cleanup,
    set_single_process_env,
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
    gradient_checkpointing: bool | None = None  # recompute activations in backward (less memory, slower); None: GPU
    # DeepSpeed ZeRO
    zero_stage: Literal[2, 3] = 2  # 2: gradients and optimizer states partitioned; 3: the weights too (large models)
    offload_optimizer: bool = True  # fp32 master weights + Adam states in CPU RAM, stepped by DeepSpeedCPUAdam
    offload_params: bool = False  # stage 3 only: the weights wait in CPU RAM too and are fetched layer by layer
    ds_config: str = str(Path(__file__).resolve().with_name("ds_config.json"))  # DeepSpeed's own knobs (buckets...)
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
    lr: float = 2e-5  # peak lr of the backbone; full fine-tuning of 7B-13B takes 1e-5 to 2e-5
    head_lr: float = 1e-3  # peak lr of the new, randomly initialised score head: it starts from nothing
    weight_decay: float = 0.0  # AdamW decay (not on norms and biases)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW beta1,beta2
    warmup_ratio: float = 0.05  # fraction of steps with linear warmup, then cosine decay to 10%
    max_grad_norm: float = 1.0  # gradient clipping (done by DeepSpeed on the whole, partitioned gradient)
    seed: int = 42  # seeds head init, dropout and data order
    # output, logging, checkpoints
    output_dir: str = "./out"  # everything this run writes
    log_every: int = 5  # steps between step-log lines
    eval_every: int = 0  # steps between evals; 0: only before training and at the end
    save_every: int = 0  # steps between checkpoints for --resume; 0: none
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the latest checkpoint in output_dir
    overwrite: bool = False  # replace an earlier, different run in output_dir (else refused)
    on_nan: Literal["stop"] = "stop"  # a nan/inf loss stops before its update (DeepSpeed updates inside engine.step)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow or none


def deepspeed_config(cfg: Config, dtype: torch.dtype, world_size: int) -> dict:
    """ds_config.json holds DeepSpeed's own knobs; every value below comes from Config and wins (a JSON value that
    disagrees is an error, "auto" is filled in)."""
    offload_optimizer = "cpu" if cfg.offload_optimizer else "none"
    owned = {
        "train_micro_batch_size_per_gpu": (cfg.batch_size, "--batch_size"),
        "gradient_accumulation_steps": (cfg.grad_accum, "--grad_accum"),
        "train_batch_size": (cfg.batch_size * cfg.grad_accum * world_size, "--batch_size x --grad_accum x ranks"),
        "gradient_clipping": (cfg.max_grad_norm, "--max_grad_norm"),
        "bf16.enabled": (dtype == torch.bfloat16, "the device (bf16 from compute capability 8.0)"),
        "fp16.enabled": (dtype == torch.float16, "the device (fp16 below compute capability 8.0)"),
        "zero_optimization.stage": (cfg.zero_stage, "--zero_stage"),
        "zero_optimization.offload_optimizer.device": (offload_optimizer, "--offload_optimizer"),
        "zero_optimization.offload_param.device": ("cpu" if cfg.offload_params else "none", "--offload_params"),
        "optimizer": (None, "--lr, --head_lr, --adam_betas, --weight_decay"),
        "scheduler": (None, "--warmup_ratio (warmup then cosine, a LambdaLR)"),
    }
    return fill_ds_config(read_ds_config(cfg.ds_config), owned, cfg.ds_config)


def make_ds_optimizer(classifier, cfg: Config, device: torch.device):
    """AdamW over the decay / no-decay groups, the score head in groups of its own with head_lr. Offloaded, the step
    runs on CPU in DeepSpeedCPUAdam (DeepSpeed refuses another optimizer there)."""
    groups = []
    head_ids = {id(p) for p in classifier.model.score.parameters()}
    for group in weight_decay_groups(classifier, cfg.weight_decay):
        for is_head in (False, True):
            params = [p for p in group["params"] if (id(p) in head_ids) == is_head]
            if params:
                groups.append({**group, "params": params, "lr": cfg.head_lr if is_head else cfg.lr})
    if cfg.offload_optimizer:
        return build_cpu_adam(groups, cfg.lr, tuple(cfg.adam_betas))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), fused=device.type == "cuda")


def gradient_norm(engine) -> float:
    """The norm of the step's whole gradient after its last backward, before engine.step() clips and applies it
    (engine.get_global_grad_norm() has it only after the update): the ZeRO optimizer's norms of its partitions,
    combined over the ranks, so every rank calls it and gets the same number; inf for a nan or inf gradient."""
    from deepspeed.runtime.utils import combine_grad_norm_groups

    zero = engine.optimizer
    if hasattr(zero, "scaled_global_norm"):  # ZeRO-1 and -2
        scaled = zero.scaled_global_norm()
    else:  # ZeRO-3
        scaled = combine_grad_norm_groups(zero._get_norm_groups())
    return float(scaled) / zero.loss_scale  # the fp16 loss scale (1 in bf16 and fp32)


def resume(engine, out: Path, log) -> int:
    """--resume: weights, optimizer, schedule and RNG of the latest checkpoint; returns its step (0: none)."""
    ckpt = resume_checkpoint(out)  # rank 0's latest, on every rank
    if ckpt is None:
        log.info(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
        return 0
    start_step = load_deepspeed_checkpoint(engine, ckpt)
    log.info(f"resumed from {ckpt} at step {start_step}")
    return start_step


def main(cfg: Config) -> dict:
    # ---- setup: one process group even for one process (DeepSpeed needs it), then seed, device, threads
    if cfg.offload_params and cfg.zero_stage != 3:
        raise UserError("--offload_params needs --zero_stage=3 (ZeRO-2 keeps the full weights on every GPU)")
    if len(cfg.adam_betas) != 2:
        raise UserError(f"--adam_betas: expected two numbers beta1,beta2, got {cfg.adam_betas}")
    loss_name = resolve_loss_name(cfg.loss, cfg.task)  # auto: ce for classification, mse for regression
    quiet_third_party_logs()
    set_single_process_env()
    rt = setup_runtime(cfg.seed)
    out = Path(cfg.output_dir)
    precision = training_precision(rt.device, "deepspeed")  # bf16; fp16 below compute capability 8.0
    dtype = precision.dtype

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
    if cfg.inspect_data:  # a data-only run: nothing written, no model weights read, DeepSpeed not started
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
    import deepspeed

    quiet_deepspeed_warnings()
    init_distributed()  # gloo on CPU, nccl on GPUs; joins the group setup_runtime made, if any
    prepare_output_dir(cfg, out, rt.is_main)  # refuses to mix this run into an earlier, different one
    log = StepLogger(out, total_steps, cfg.report_to, enabled=rt.is_main, config=config_to_dict(cfg))
    ds_config = deepspeed_config(cfg, dtype, rt.world_size)

    # ---- model: LlamaForSequenceClassification, all weights train. Under ZeRO-3, HfDeepSpeedConfig makes
    # from_pretrained build the model inside deepspeed.zero.Init, so each rank only ever holds its partition; the
    # object must stay alive while transformers uses it, hence the variable.
    from transformers import AutoModelForSequenceClassification

    hf_zero3 = None
    if cfg.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_zero3 = HfDeepSpeedConfig(ds_config)  # noqa: F841
    label_names = [str(x) for x in labels] if labels else ["score"]
    model = load_model(model_dir, "none", dtype, model_class=AutoModelForSequenceClassification,
                       num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                       label2id={n: i for i, n in enumerate(label_names)})
    model.config.pad_token_id = tokenizer.pad_token_id
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else rt.device.type == "cuda"
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    classifier = PooledClassifier(model, cfg.pooling)  # the engine wraps the whole read-out, pooling included
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ds_numel: the unpartitioned size

    # ---- optimizer and schedule, given to DeepSpeed ready-made
    optimizer = make_ds_optimizer(classifier, cfg, rt.device)
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    engine, _, _, _ = deepspeed.initialize(model=classifier, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    start_step = resume(engine, out, log) if cfg.resume else 0

    offloaded = {(True, True): "optimizer and weights", (True, False): "optimizer", (False, True): "weights",
                 (False, False): "nothing"}[(cfg.offload_optimizer, cfg.offload_params)]
    log.info(f"model    {cfg.model_path} ({model_dir}) | full fine-tune + score head, {n_params:,} params, all "
             f"trainable | {cfg.pooling}-token pooling | {precision.reason} | "
             f"activation checkpointing {'on' if checkpointing else 'off'}")
    log.info(f"zero     stage {cfg.zero_stage}, {offloaded} offloaded to CPU | {type(optimizer).__name__} | "
             f"config {cfg.ds_config}")
    log.info(f"task     {cfg.task}, {describe_loss(loss, labels)}")
    for line in data_report(files, tokenizer, cfg.task, labels):
        log.info(line)
    log.info(f"steps    {total_steps} ({total_steps * cfg.grad_accum / batches_per_epoch:.2f} epochs), batch "
             f"{cfg.batch_size} x accum {cfg.grad_accum} x {rt.world_size} ranks, lr {cfg.lr:g} (head {cfg.head_lr:g}) "
             f"| device {rt.describe()}")

    def evaluate(examples) -> torch.Tensor:  # every rank runs as many forwards: ZeRO-3 gathers weights in each
        return score_examples(engine, examples, len(label_names), cfg.batch_size, tokenizer.pad_token_id, rt.device,
                              rt, lockstep=True)

    # ---- training loop
    stream = batch_stream(plan, start_batch=start_step * cfg.grad_accum)  # resume: what was trained on is skipped
    if eval_examples and start_step == 0:
        metrics = eval_metrics(evaluate(eval_examples), eval_examples, loss, label_names, train_targets)
        log_eval(log, 0, total_steps, metrics, cfg.task)
    engine.train()
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
            batch = {k: v.to(rt.device) for k, v in collate_left_padded(examples, tokenizer.pad_token_id).items()}
            micro_loss = cls_loss_sum(engine(**batch), target_tensor(examples, cfg.task), loss)
            loss_sum += micro_loss.detach().double()  # stays on the device: no wait per micro-batch
            # mean over the examples of the whole step on all ranks: scale_wrt_gas=False stops DeepSpeed dividing by
            # grad_accum again, and its gradient reduction averages over ranks, hence * world_size
            engine.backward(micro_loss * rt.world_size / n_examples, scale_wrt_gas=False)
            if i == len(chunk) - 1:  # engine.step() updates at this one: check the step's loss and gradient first
                # both summed over the ranks: a nan on any rank stops every rank, none is left waiting in a collective
                (loss_sum,) = all_reduce_sum([float(loss_sum)], rt)  # the step's one read of the device losses
                grad_norm = gradient_norm(engine)
                if not is_finite(loss_sum, grad_norm, loss_scaled=dtype == torch.float16):  # fp16: DeepSpeed skips
                    raise non_finite_error(step, loss_sum / n_examples, grad_norm, out)  # an overflow itself
            engine.step()  # steps optimizer and schedule (and clips) only after the grad_accum-th micro-batch
        step_loss = loss_sum / n_examples
        dt = time.perf_counter() - t0
        train_seconds += dt
        tokens_seen += int(n_tokens)
        losses.append(step_loss)
        log.advance()
        if step % cfg.log_every == 0 or step == total_steps:
            log.log(step, {"loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                           "tokens_per_s": n_tokens / dt, **memory_gb(rt.device)})
        if eval_examples and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != total_steps:
            metrics = eval_metrics(evaluate(eval_examples), eval_examples, loss, label_names, train_targets)
            log_eval(log, step, total_steps, metrics, cfg.task)
        preempted = stop_requested(stop, rt)
        if (cfg.save_every > 0 and step % cfg.save_every == 0 or preempted):  # every rank saves its partition
            path = save_deepspeed_checkpoint(engine, out, step, cfg.keep_last)
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

    # ---- save: one Hugging Face checkpoint gathered from the partitions (every rank takes part), labels.json, then
    # the final eval and predictions
    final_dir = out / "final"
    gathered = gather_full_state_dict(engine)  # keys of the PooledClassifier: "model." + the HF model's own
    label_info = {"task": cfg.task, "labels": label_names, "pooling": cfg.pooling, "append_eos": cfg.append_eos,
                  "text_field": cfg.text_field}
    if rt.is_main:
        state_dict = {k.removeprefix("model."): v for k, v in gathered.items()}

        def write_final(d):
            model.save_pretrained(d, state_dict=state_dict)
            tokenizer.save_pretrained(d)
            (d / "labels.json").write_text(json.dumps(label_info, indent=2, ensure_ascii=False) + "\n")
        atomic_write_dir(final_dir, write_final)
        del state_dict
    del gathered
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
             f"{tokens_seen / max(train_seconds, 1e-9):,.0f} tok/s, peak mem {peak_memory_gb(rt.device):.2f} GB")
    log.info(f"model, tokenizer and labels.json in {final_dir}: "
             f"AutoModelForSequenceClassification.from_pretrained('{final_dir}')")
    log.close()
    cleanup(rt)
    # classifier: the trained model (under ZeRO-3 its weights stay partitioned; final_dir has them whole)
    return {"model": model, "classifier": classifier, "tokenizer": tokenizer, "losses": losses, "eval": results,
            "labels": labels, "final_dir": final_dir, "train_seconds": train_seconds, "tokens": tokens_seen,
            "steps": total_steps - start_step}


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
