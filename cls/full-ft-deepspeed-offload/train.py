"""Full-parameter sequence classification and regression of a Llama-family model under DeepSpeed ZeRO: every weight
and the score head train; the fp32 master weights and Adam states live in CPU RAM and are stepped there
(DeepSpeedCPUAdam), so one GPU holds only the bf16 weights, gradients and activations. ZeRO-3 (optionally with the
weights offloaded too) for large models. One vector per text: the last token of a left-padded row, or the mean.

Default run, no GPU, no download (tiny random-init Llama, bundled 3-way sentiment data), about a minute:
    cd cls/full-ft-deepspeed-offload && bash run.sh
Regression (one float target):      bash run.sh --task=regression --data_path=../../data/cls/regression_train.jsonl \
                                        --eval_data_path=../../data/cls/regression_eval.jsonl
One GPU, a real checkpoint:         bash run.sh --model_path=/models/Llama-2-7b-hf --data_path=train.jsonl --eval_data_path=eval.jsonl
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
from typing import Literal, Optional

import torch

from common.checkpoint import atomic_write_dir, latest_checkpoint, prepare_output_dir, resume_checkpoint
from common.config import UserError, config_to_dict, exit_on_user_error, parse_config
from common.data import build_cls_examples, collate_left_padded, label_set, plan_batches, read_records
from common.deepspeed_utils import (
    fill_ds_config,
    gather_full_state_dict,
    init_distributed,
    load_deepspeed_checkpoint,
    quiet_deepspeed_warnings,
    read_ds_config,
    save_deepspeed_checkpoint,
)
from common.logs import StepLogger, memory_gb, peak_memory_gb, quiet_third_party_logs
from common.losses import classification_loss_sum, regression_loss_sum, step_is_finite
from common.metrics import (
    balanced_class_weights,
    classification_metrics,
    majority_baseline,
    mean_baseline,
    regression_metrics,
)
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
    gradient_checkpointing: Optional[bool] = None  # recompute activations in backward (less memory, slower); None: on with a GPU
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


def predict(engine, examples, width, batch_size, pad_id, rt) -> torch.Tensor:
    """Scores (`width` logits, or one number for regression) of every example in order, gathered from all ranks.
    Under ZeRO-3 every forward gathers weights from all ranks, so every rank runs as many forwards: a rank short of
    a batch runs the first one again and throws the result away."""
    engine.eval()
    scores = torch.zeros(len(examples), width, device=rt.device)
    batches = plan_batches([len(e["input_ids"]) for e in examples], batch_size, 0, 0, True)
    rounds = math.ceil(len(batches) / rt.world_size)
    with torch.no_grad():
        for r in range(rounds):
            j = r * rt.world_size + rt.rank
            idx = batches[j] if j < len(batches) else batches[0]
            batch = {k: v.to(rt.device) for k, v in collate_left_padded([examples[i] for i in idx], pad_id).items()}
            batch_scores = engine(**batch).float()
            if j < len(batches):
                scores[idx] = batch_scores
    if rt.distributed:  # each example was scored by exactly one rank; the others hold zeros there
        torch.distributed.all_reduce(scores)
    engine.train()
    return scores.cpu()


def main(cfg: Config) -> dict:
    # ---- setup: one process group even for one process (DeepSpeed needs it), then seed, device, threads
    import deepspeed

    if cfg.offload_params and cfg.zero_stage != 3:
        raise UserError("--offload_params needs --zero_stage=3 (ZeRO-2 keeps the full weights on every GPU)")
    if len(cfg.adam_betas) != 2:
        raise UserError(f"--adam_betas: expected two numbers beta1,beta2, got {cfg.adam_betas}")
    regression = cfg.task == "regression"
    loss_name = cfg.loss if cfg.loss != "auto" else ("mse" if regression else "ce")
    if (loss_name in ("mse", "huber")) != regression:
        raise UserError(f"--loss={loss_name} does not fit --task={cfg.task}")
    quiet_third_party_logs()
    quiet_deepspeed_warnings()
    set_single_process_env()
    rt = setup_runtime(cfg.seed)
    init_distributed()  # gloo on CPU, nccl on GPUs; joins the group setup_runtime made, if any
    out = Path(cfg.output_dir)
    prepare_output_dir(cfg, out, rt.is_main)  # refuses to mix this run into an earlier, different one
    log = StepLogger(out, 0, [r for r in cfg.report_to if r != "none"], enabled=rt.is_main, config=config_to_dict(cfg))
    precision = training_precision(rt.device, "deepspeed")  # bf16; fp16 below compute capability 8.0
    dtype = precision.dtype

    # ---- tokenizer and data
    model_dir = resolve_model_path(cfg.model_path)
    tokenizer = load_tokenizer(model_dir)
    train_records = read_records(cfg.data_path)
    labels = None if regression else label_set(train_records, cfg.label_field)
    build = lambda records, require_label=True: build_cls_examples(  # noqa: E731
        records, tokenizer, cfg.max_seq_len, cfg.task, labels, cfg.text_field, cfg.label_field, cfg.append_eos,
        require_label)
    train_examples, train_stats = build(train_records)
    eval_examples, eval_stats = build(read_records(cfg.eval_data_path)) if cfg.eval_data_path else ([], None)
    predict_records = read_records(cfg.predict_data_path) if cfg.predict_data_path else []
    train_targets = [e["label"] for e in train_examples]
    class_weights = None
    if not regression and cfg.class_weights != "none":
        weights = (balanced_class_weights(train_targets, len(labels)) if cfg.class_weights == "balanced"
                   else [float(w) for w in cfg.class_weights.split(",")])
        if len(weights) != len(labels):
            raise UserError(f"--class_weights has {len(weights)} values for {len(labels)} classes {labels}")
        class_weights = torch.tensor(weights, device=rt.device)
    lengths = [len(e["input_ids"]) for e in train_examples]
    plan = lambda epoch: plan_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length,  # noqa: E731
                                      rt.rank, rt.world_size)
    batches_per_epoch = len(plan(0))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum)

    # ---- DeepSpeed config: ds_config.json holds DeepSpeed's own knobs; every value below comes from Config and
    # wins (a JSON value that disagrees is an error, "auto" is filled in)
    owned = {
        "train_micro_batch_size_per_gpu": (cfg.batch_size, "--batch_size"),
        "gradient_accumulation_steps": (cfg.grad_accum, "--grad_accum"),
        "train_batch_size": (cfg.batch_size * cfg.grad_accum * rt.world_size, "--batch_size x --grad_accum x ranks"),
        "gradient_clipping": (cfg.max_grad_norm, "--max_grad_norm"),
        "bf16.enabled": (dtype == torch.bfloat16, "the device (bf16 from compute capability 8.0)"),
        "fp16.enabled": (dtype == torch.float16, "the device (fp16 below compute capability 8.0)"),
        "zero_optimization.stage": (cfg.zero_stage, "--zero_stage"),
        "zero_optimization.offload_optimizer.device": ("cpu" if cfg.offload_optimizer else "none",
                                                       "--offload_optimizer"),
        "zero_optimization.offload_param.device": ("cpu" if cfg.offload_params else "none", "--offload_params"),
        "optimizer": (None, "--lr, --head_lr, --adam_betas, --weight_decay"),
        "scheduler": (None, "--warmup_ratio (warmup then cosine, a LambdaLR)"),
    }
    ds_config = fill_ds_config(read_ds_config(cfg.ds_config), owned, cfg.ds_config)

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

    # ---- optimizer and schedule, given to DeepSpeed ready-made; the score head in groups of its own with head_lr.
    # Offloaded, the step runs on CPU in DeepSpeedCPUAdam (DeepSpeed refuses another optimizer there).
    groups = []
    for group in weight_decay_groups(classifier, cfg.weight_decay):
        head_ids = {id(p) for p in model.score.parameters()}
        for is_head in (False, True):
            params = [p for p in group["params"] if (id(p) in head_ids) == is_head]
            if params:
                groups.append({**group, "params": params, "lr": cfg.head_lr if is_head else cfg.lr})
    if cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), fused=rt.device.type == "cuda")
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    engine, _, _, _ = deepspeed.initialize(model=classifier, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    start_step = 0
    if cfg.resume:
        ckpt = resume_checkpoint(out)  # rank 0's latest, on every rank
        if ckpt is None:
            log.info(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
        else:
            start_step = load_deepspeed_checkpoint(engine, ckpt)  # weights, optimizer, scheduler, RNG
            log.info(f"resumed from {ckpt} at step {start_step}")

    log.total_steps = total_steps
    offloaded = {(True, True): "optimizer and weights", (True, False): "optimizer", (False, True): "weights",
                 (False, False): "nothing"}[(cfg.offload_optimizer, cfg.offload_params)]
    log.info(f"model    {cfg.model_path} ({model_dir}) | full fine-tune + score head, {n_params:,} params, all "
             f"trainable | {cfg.pooling}-token pooling | {precision.reason} | "
             f"activation checkpointing {'on' if checkpointing else 'off'}")
    log.info(f"zero     stage {cfg.zero_stage}, {offloaded} offloaded to CPU | {type(optimizer).__name__} | "
             f"config {cfg.ds_config}")
    log.info(f"task     {cfg.task}, loss {loss_name}" + (f", {len(labels)} classes {labels}" if labels else "") +
             (f", class weights {[round(w, 3) for w in class_weights.tolist()]}" if class_weights is not None else ""))
    log.info(f"data     train {cfg.data_path}: {train_stats.summary()}")
    if eval_stats:
        log.info(f"         eval  {cfg.eval_data_path}: {eval_stats.summary()}")
    log.info(f"steps    {total_steps} ({total_steps * cfg.grad_accum / batches_per_epoch:.2f} epochs), batch "
             f"{cfg.batch_size} x accum {cfg.grad_accum} x {rt.world_size} ranks, lr {cfg.lr:g} (head {cfg.head_lr:g}) "
             f"| device {rt.describe()}")

    def step_loss_sum(scores, targets):
        if regression:
            return regression_loss_sum(scores.squeeze(-1), targets, loss_name)
        return classification_loss_sum(scores, targets, loss_name, cfg.label_smoothing, class_weights, cfg.focal_gamma)

    def evaluate() -> dict:
        scores = predict(engine, eval_examples, len(label_names), cfg.batch_size, tokenizer.pad_token_id, rt)
        targets = [e["label"] for e in eval_examples]
        target_tensor = torch.tensor(targets, dtype=torch.float if regression else torch.long)
        weights = class_weights.cpu() if class_weights is not None else None
        loss_sum = (regression_loss_sum(scores[:, 0], target_tensor, loss_name) if regression else
                    classification_loss_sum(scores, target_tensor, loss_name, cfg.label_smoothing, weights,
                                            cfg.focal_gamma))
        metrics = {"eval_loss": loss_sum.item() / len(targets)}
        if regression:
            metrics.update(regression_metrics(targets, scores[:, 0].tolist()))
            metrics["baseline_mean"] = mean_baseline(train_targets, targets)
        else:
            metrics.update(classification_metrics(targets, scores.argmax(-1).tolist(), label_names))
            metrics["baseline_majority"] = majority_baseline(train_targets, targets, len(labels))
        return metrics

    def log_eval(step, metrics):
        keys = ("mse", "mae", "pearson", "spearman") if regression else ("accuracy", "macro_f1")
        log.log(step, {"eval_loss": metrics["eval_loss"], **{f"eval_{k}": metrics[k] for k in keys}}, echo=False)
        log.info(f"step {step}/{total_steps} | eval_loss {metrics['eval_loss']:.4f} | " +
                 " | ".join(f"{k} {metrics[k]:.4f}" for k in keys))

    # ---- training loop
    def micro_batches():  # the endless stream of this rank's batches, epoch after epoch
        epoch = 0
        while True:
            yield from plan(epoch)
            epoch += 1

    stream = micro_batches()
    for _ in range(start_step * cfg.grad_accum):  # resume: skip what was already trained on
        next(stream)
    if eval_examples and start_step == 0:
        log_eval(0, evaluate())
    engine.train()
    train_seconds, tokens_seen, losses = 0.0, 0, []
    stop, preempted, path = catch_stop_signals(), False, None  # SIGTERM / Ctrl-C: checkpoint, then exit
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        chunk = [[train_examples[i] for i in next(stream)] for _ in range(cfg.grad_accum)]
        n_examples, n_tokens = all_reduce_sum([sum(len(c) for c in chunk),
                                               sum(len(e["input_ids"]) for c in chunk for e in c)], rt)
        loss_sum = 0.0
        for i, examples in enumerate(chunk):
            batch = {k: v.to(rt.device) for k, v in collate_left_padded(examples, tokenizer.pad_token_id).items()}
            targets = torch.tensor([e["label"] for e in examples], dtype=torch.float if regression else torch.long,
                                   device=rt.device)
            micro_loss = step_loss_sum(engine(**batch), targets)
            loss_sum += micro_loss.detach().double()  # stays on the device: no wait per micro-batch
            if i == len(chunk) - 1:  # engine.step() updates at this one: read the step's losses once, before it
                # summed over the ranks first: a nan on any rank stops every rank, none is left waiting in backward
                (loss_sum,) = all_reduce_sum([float(loss_sum)], rt)
                step_is_finite(step, loss_sum, 0.0, "stop", out)
            # mean over the examples of the whole step on all ranks: scale_wrt_gas=False stops DeepSpeed dividing by
            # grad_accum again, and its gradient reduction averages over ranks, hence * world_size
            engine.backward(micro_loss * rt.world_size / n_examples, scale_wrt_gas=False)
            engine.step()  # steps optimizer and schedule (and clips) only after the grad_accum-th micro-batch
        loss = loss_sum / n_examples
        dt = time.perf_counter() - t0
        train_seconds += dt
        tokens_seen += int(n_tokens)
        losses.append(loss)
        log.advance()
        if step % cfg.log_every == 0 or step == total_steps:
            grad_norm = engine.get_global_grad_norm()  # of the whole step's gradient, before clipping
            log.log(step, {"loss": loss, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": None if grad_norm is None else float(grad_norm),
                           "tokens_per_s": n_tokens / dt, **memory_gb(rt.device)})
        if eval_examples and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != total_steps:
            log_eval(step, evaluate())
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
        results = evaluate()
        log_eval(total_steps, results)
        if rt.is_main:
            (out / "eval_results.json").write_text(json.dumps({"step": total_steps, **results}, indent=2) + "\n")
            key = "mse" if regression else "accuracy"
            base = results["baseline_mean" if regression else "baseline_majority"][key]
            log.info(f"eval     {key} {results[key]:.4f} vs baseline ({'mean' if regression else 'majority class'}) "
                     f"{base:.4f}; full report in {out / 'eval_results.json'}")
    if predict_records:
        examples, _ = build(predict_records, require_label=False)
        scores = predict(engine, examples, len(label_names), cfg.batch_size, tokenizer.pad_token_id, rt)
        if rt.is_main:
            with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
                for e, s in zip(examples, scores):
                    row = ({"prediction": s[0].item()} if regression else
                           {"prediction": labels[int(s.argmax())],
                            "probabilities": dict(zip(label_names, torch.softmax(s, -1).tolist()))})
                    f.write(json.dumps({cfg.text_field: e["text"], **row}, ensure_ascii=False) + "\n")
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
