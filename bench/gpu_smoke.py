"""The GPU smoke's plan, runner and summary table; bench/gpu_smoke.sh is the command (it installs the carried wheels
first). Every step runs in its own process group under its own time limit: a step that fails, hangs or lacks its
package is a row of the table, and the smoke goes on.

    python bench/gpu_smoke.py --dry-run             # the plan: every step, its time limit, its command; runs nothing
    python bench/gpu_smoke.py --only=b,c            # parts a (recipes), a2 (padding tests on CUDA), b (1B), c (8B), d

Phases run one after the other; within a phase the lanes run at the same time (the tiny recipe runs share the GPU
and the 16 cores), the steps of a lane one after the other. A phase lasts at most its longest lane's total of time
limits; those bounds add up to at most BUDGET_S. Runs' own folders go under --work (outside $OUT: at most 8 files
come back from the GPU machine); $OUT gets summary.md and results.json (and smoke.log from gpu_smoke.sh).
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 505  # the steps' share of the smoke's 560 s (gpu_smoke.sh: 45 for the wheel install, 10 for versions)
PEAK_NOMINAL = 989e12  # H100 SXM bf16 dense, datasheet
PEAK_MEASURED = 798e12  # an 8192^3 bf16 matmul on this project's H100 (docs of the GPU machine)
PARTS = ("a", "a2", "b", "c", "d")
RECIPE_STEPS = 4  # optimizer steps of each recipe's default run
TAIL_LINES = 80  # of each step's output copied into the log
SEQ = 2048
CONFIG_1B = REPO / "common" / "model_configs" / "llama3.2-1b.json"  # the shape of bench/gpu_models.py make-1b

# (recipe folder, row name, extra options, Python packages it needs, time limit in seconds, lane)
RECIPES = (
    ("sft/full-ft-deepspeed-offload", "sft/full-ft-deepspeed-offload", (), ("deepspeed",), 100, 1),
    ("cls/full-ft-deepspeed-offload", "cls/full-ft-deepspeed-offload", (), ("deepspeed",), 45, 1),
    ("pretrain/deepspeed", "pretrain/deepspeed --zero_stage=3", ("--zero_stage=3",), ("deepspeed",), 40, 1),
    ("pretrain/deepspeed", "pretrain/deepspeed", (), ("deepspeed",), 65, 2),
    ("sft/qlora", "sft/qlora", (), ("bitsandbytes",), 40, 2),
    ("cls/qlora", "cls/qlora", (), ("bitsandbytes",), 40, 2),
    ("cls/reward-qlora", "cls/reward-qlora", (), ("bitsandbytes",), 40, 2),
    ("sft/peft-int4", "sft/peft-int4", (), ("gptqmodel", "optimum"), 75, 3),
    ("cls/peft-int4", "cls/peft-int4", (), ("gptqmodel", "optimum"), 50, 3),
    ("sft/fsdp-qlora", "sft/fsdp-qlora", (), ("bitsandbytes",), 60, 3),
    ("pretrain/fsdp", "pretrain/fsdp", (), (), 45, 4),
    ("rlhf/dpo-qlora", "rlhf/dpo-qlora", (), ("bitsandbytes",), 40, 5),
    ("rlhf/grpo-qlora", "rlhf/grpo-qlora", (), ("bitsandbytes",), 60, 5),
    # the plain sft/qlora row runs Liger's kernels where liger-kernel is installed (--liger=auto): this one without
    ("sft/qlora", "sft/qlora --liger=off", ("--liger=off",), ("bitsandbytes",), 40, 5),
    ("sft/qlora", "sft/qlora --packing", ("--packing",), ("bitsandbytes",), 40, 5),
)


@dataclass
class Step:
    name: str  # the row's name
    part: str  # one of PARTS (--only selects by it)
    limit_s: int  # killed (with its children) after this many seconds
    cmd: list[str]
    kind: str = "plain"  # how its row is read: recipe, pytest, peers, pretrain_mfu, qlora, plain
    needs: tuple[str, ...] = ()  # Python packages; one missing: the row says "not carried", nothing runs
    after: tuple[str, ...] = ()  # steps that must have succeeded first (else: skipped)
    run_dir: str = ""  # recipe / pretrain_mfu: the run's output_dir (metrics.jsonl); peers: its --json
    env: dict = field(default_factory=dict)


@dataclass
class Row:
    step: str
    status: str  # ok, failed, timeout, not carried, skipped
    rc: int | None = None
    seconds: float | None = None
    loss: str = "-"
    memory: str = "-"  # peak GB allocated / reserved
    tok_s: str = "-"
    note: str = ""


# ---------------------------------------------------------------------------------------------------------------
# The plan


def recipe_step(folder, name, extra, needs, limit, work: Path) -> Step:
    run_dir = work / "runs" / name.replace("/", "_").replace(" --", "_").replace("=", "")
    cmd = ["bash", f"{folder}/run.sh", f"--max_steps={RECIPE_STEPS}", f"--output_dir={run_dir}", "--report_to=none",
           "--overwrite", "--log_every=1", *extra]
    return Step(name, "a", limit, cmd, "recipe", needs, run_dir=str(run_dir), env={"OMP_NUM_THREADS": "3"})


def build_plan(work: Path, python: str = "python") -> list[list[list[Step]]]:
    """Phases, each a list of lanes, each a list of steps."""
    model_1b, data_2048 = work / "models" / "llama3.2-1b", work / "data" / "sft_2048.jsonl"
    lanes: dict[int, list[Step]] = {1: [], 2: [], 3: [], 4: [], 5: []}
    for folder, name, extra, needs, limit, lane in RECIPES:
        lanes[lane].append(recipe_step(folder, name, extra, needs, limit, work))
    lanes[4] = [
        Step("make 1B (random, bf16, on the GPU)", "b", 55,
             [python, "bench/gpu_models.py", "make-1b", str(model_1b)]),
        Step("long SFT data (2,048 tokens)", "b", 30,
             [python, "bench/gpu_models.py", "long-sft", str(data_2048), f"--seq_len={SEQ}", "--examples=256"]),
        *lanes[4],
        Step("padding + label-mask tests on CUDA", "a2", 55,
             [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/common/test_data_padding.py"], "pytest",
             env={"LLAMA_RECIPES_TEST_DEVICE": "cuda"}),
    ]
    peers_json = work / "peers_sft_1b.json"
    peers = Step("peers 1B: sft/qlora vs Trainer + peft", "b", 140,
                 [python, "bench/peers.py", "--family=sft", f"--model_path={model_1b}", f"--data_path={data_2048}",
                  f"--seq_len={SEQ}", "--batch_size=4", "--steps=6", "--rounds=2", "--contenders=ours,hf",
                  "--gradient_checkpointing=true", f"--json={peers_json}"],
                 "peers", ("bitsandbytes",), ("make 1B (random, bf16, on the GPU)", "long SFT data (2,048 tokens)"),
                 run_dir=str(peers_json))
    fsdp_dir = work / "runs" / "pretrain_fsdp_1b"
    fsdp = Step("pretrain/fsdp 1B full training", "b", 55,
                ["bash", "pretrain/fsdp/run.sh", f"--init_from={model_1b}", "--tokenizer_path=", f"--seq_len={SEQ}",
                 "--batch_size=4", "--grad_accum=1", "--max_steps=12", "--log_every=1",
                 "--gradient_checkpointing=false", f"--output_dir={fsdp_dir}", "--report_to=none", "--overwrite"],
                "pretrain_mfu", (), ("make 1B (random, bf16, on the GPU)",), run_dir=str(fsdp_dir))
    qlora_8b = Step("QLoRA 8B (NF4 layer by layer), seq 2048, batch 1", "c", 75,
                    [python, "bench/gpu_models.py", "qlora", "--shape=llama3-8b", f"--seq_len={SEQ}", "--steps=4",
                     "--checkpointing=true,false"], "qlora", ("bitsandbytes",))
    qlora_65b = Step("QLoRA 65B peak memory, seq 2048, batch 1", "d", 50,
                     [python, "bench/gpu_models.py", "qlora", "--shape=65b", f"--seq_len={SEQ}", "--steps=2",
                      "--checkpointing=true"], "qlora", ("bitsandbytes",))
    return [[lanes[1], lanes[2], lanes[3], lanes[4], lanes[5]], [[peers]], [[fsdp]], [[qlora_8b]], [[qlora_65b]]]


def select(plan, parts: set[str]):
    """The plan with only the steps of `parts`, and the steps those need; empty lanes and phases dropped."""
    names = {s.name for phase in plan for lane in phase for s in lane if s.part in parts}
    for phase in plan:
        for lane in phase:
            for s in lane:
                if s.name in names:
                    names.update(s.after)
    kept = [[[s for s in lane if s.name in names] for lane in phase] for phase in plan]
    return [[lane for lane in phase if lane] for phase in kept if any(phase)]


def phase_bound(phase) -> int:
    return max(sum(s.limit_s for s in lane) for lane in phase)


def plan_bound(plan) -> int:
    """The longest the steps can take: the phases' bounds added up."""
    return sum(phase_bound(phase) for phase in plan)


def describe_plan(plan) -> str:
    lines = []
    for p, phase in enumerate(plan, 1):
        together = ", its lanes at the same time" if len(phase) > 1 else ""
        lines.append(f"phase {p} (at most {phase_bound(phase)} s{together})")
        for k, lane in enumerate(phase, 1):
            for s in lane:
                needs = f" | needs {', '.join(s.needs)}" if s.needs else ""
                env = "".join(f"{key}={value} " for key, value in s.env.items())
                lines.append(f"  [lane {k}] {s.name} | part {s.part} | limit {s.limit_s} s{needs}")
                lines.append(f"      $ {env}{' '.join(s.cmd)}")
    n_steps = sum(len(lane) for phase in plan for lane in phase)
    lines.append(f"{n_steps} steps; at most {plan_bound(plan)} s in all (budget {BUDGET_S} s for the steps)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Reading a finished step


def missing_packages(needs) -> list[str]:
    return [name for name in needs if importlib.util.find_spec(name) is None]


ERROR_LINE = re.compile(r"^(\w[\w.]*(Error|Exception)\b|E\s|FAILED|error:|.*\bfailed\b)", re.IGNORECASE)


def last_error_line(output: str) -> str:
    """The last line that reads like an error (else the last line), shortened for a table cell."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    error = next((line for line in reversed(lines) if ERROR_LINE.match(line)), lines[-1] if lines else "")
    return error[:200].replace("|", "/")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peak(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return max(values) if values else None


def memory_cell(alloc: float | None, reserved: float | None) -> str:
    if alloc is None:
        return "-"
    reserved_text = f"{reserved:.2f}" if reserved is not None else "-"
    return f"{alloc:.2f} / {reserved_text}"


def recipe_fields(run_dir: Path) -> dict:
    """loss first -> last and peak GB allocated / reserved from a run's metrics.jsonl (the step rows)."""
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    if not steps:
        return {"note": "no step in metrics.jsonl"}
    loss = f"{steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}"
    return {"loss": loss, "memory": memory_cell(peak(steps, "mem_gb"), peak(steps, "mem_reserved_gb"))}


def train_flops_per_token(config: dict, seq_len: int) -> float:
    """6 x the parameters in matrix multiplies (q, k, v, o, gate, up, down per layer, and the LM head; the embedding
    lookup is no multiply) + the attention term 12 x layers x (heads x head_dim) x seq_len (scores and their use,
    forward and backward, causal masking not discounted): common.pretrain_data.flops_per_token, the recipes' own."""
    h, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    q, kv = heads * head_dim, config.get("num_key_value_heads", heads) * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config["intermediate_size"]
    matmul_params = layers * per_layer + h * config["vocab_size"]
    return 6 * matmul_params + 12 * layers * q * seq_len


def mfu(tok_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: the FLOPs the model needs per second at this rate over the GPU's peak."""
    return tok_s * flops_per_token / peak_flops


def pretrain_mfu_fields(run_dir: Path, shape_path: Path) -> dict:
    """tok/s per GPU (median of the steps after the first two: warm-up) and MFU against both peaks, the FLOPs per
    token from the model's config.json at `shape_path` and the smoke's sequence length."""
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    if not steps:
        return {"note": "no step in metrics.jsonl"}
    later = [r for r in steps if r["step"] > 2] or steps
    tok_s = statistics.median(r["tokens_per_s_per_gpu"] for r in later)
    per_token = train_flops_per_token(json.loads(shape_path.read_text()), SEQ)
    own_mfu = statistics.median(r.get("mfu") or 0.0 for r in later)
    note = (f"MFU {mfu(tok_s, per_token, PEAK_NOMINAL):.1%} of 989 TFLOP/s nominal, "
            f"{mfu(tok_s, per_token, PEAK_MEASURED):.1%} of 798 measured; {per_token / 1e9:.2f} GFLOP/token "
            f"(6 x matmul params + 12 x layers x q_dim x {SEQ}); the recipe's own mfu {own_mfu:.1%}")
    return {"loss": f"{steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}", "tok_s": f"{tok_s:,.0f}",
            "memory": memory_cell(peak(steps, "mem_gb"), peak(steps, "mem_reserved_gb")), "note": note}


def peers_rows(step: Step, row: Row) -> list[Row]:
    """One row per contender from peers.py's --json: median tok/s, peak allocated / reserved, ours / this."""
    path = Path(step.run_dir)
    if not path.is_file():
        return [row]
    medians = json.loads(path.read_text())["sft"]["medians"]
    ours = medians.get("ours", {}).get("tok_s")
    rows = []
    for name, m in medians.items():
        ratio = f"ours / this {ours / m['tok_s']:.2f}x" if ours else ""
        rows.append(Row(f"{step.name}: {name}", row.status, row.rc, row.seconds, f"final {m['final_loss']:.4f}",
                        memory_cell(m["mem_gb"], m.get("reserved_gb")), f"{m['tok_s']:,.0f}",
                        f"{ratio}; {m['rounds']} rounds, useful tokens {m['useful']:.3f}"))
    return rows or [row]


def qlora_rows(step: Step, row: Row, output: str) -> list[Row]:
    results = [json.loads(line[len("RESULT "):]) for line in output.splitlines() if line.startswith("RESULT ")]
    rows = []
    for r in results:
        gc = "checkpointing on" if r["checkpointing"] else "checkpointing off"
        note = f"estimate {r['estimate_gb']:.2f} GB (tools/estimate_memory.py)"
        if r["shape"] == "65b" and r["peak_alloc_gb"] is not None:
            note += f"; the promise: 2 x 24 GB, split evenly {r['peak_alloc_gb'] / 2:.1f} GB a card + context"
        rows.append(Row(f"{step.name}, {gc}", row.status, row.rc, row.seconds,
                        f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}",
                        memory_cell(r["peak_alloc_gb"], r["peak_reserved_gb"]), f"{r['tok_s']:,.0f}", note))
    return rows or [row]


def pytest_note(output: str) -> str:
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return summary[-1].strip("= ") if summary else ""


def step_rows(step: Step, row: Row, output: str) -> list[Row]:
    """The finished step's rows: the plain row with what its kind adds. A measurement that failed or ran out of time
    part way keeps the rows it finished (a qlora setting, the peers' rounds), then its own row with the error."""
    if step.kind in ("peers", "qlora"):
        measured = peers_rows(step, row) if step.kind == "peers" else qlora_rows(step, row, output)
        finished = [r for r in measured if r is not row]
        return finished + [row] if row.status != "ok" and finished else measured
    if step.kind == "recipe":
        fields = recipe_fields(Path(step.run_dir))
    elif step.kind == "pretrain_mfu":
        fields = pretrain_mfu_fields(Path(step.run_dir), CONFIG_1B)
    elif step.kind == "pytest":
        fields = {"note": pytest_note(output)}
    else:
        fields = {}
    failed_note = row.note
    for key, value in fields.items():
        setattr(row, key, value)
    if failed_note:
        row.note = f"{failed_note}; {row.note}" if fields.get("note") else failed_note
    return [row]


def summary_table(rows: list[Row]) -> str:
    lines = ["| step | status | exit | s | loss first -> last | peak GB alloc / reserved | tok/s | note |",
             "|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        rc = "-" if r.rc is None else str(r.rc)
        seconds = "-" if r.seconds is None else f"{r.seconds:.0f}"
        cells = (r.step, r.status, rc, seconds, r.loss, r.memory, r.tok_s, r.note.replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Running


class Runner:
    """Runs the plan's steps, prints each step's command and output tail as it finishes, collects the rows."""

    def __init__(self, budget_s: int = BUDGET_S):
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.lock = threading.Lock()
        self.done: dict[str, str] = {}  # step name -> status
        self.rows: dict[str, list[Row]] = {}

    def say(self, text: str):
        with self.lock:
            print(text, flush=True)

    def run_step(self, step: Step) -> list[Row]:
        missing = missing_packages(step.needs)
        blocked = [name for name in step.after if self.done.get(name) != "ok"]
        left = self.budget_s - (time.monotonic() - self.start)
        if missing:
            row = Row(step.name, "not carried", note=f"{', '.join(missing)} not installed")
        elif blocked:
            row = Row(step.name, "skipped", note=f"needs {', '.join(blocked)}")
        elif left < min(step.limit_s, 15):
            row = Row(step.name, "skipped", note=f"no time left ({left:.0f} s of the budget)")
        else:
            return self.execute(step, min(step.limit_s, left))
        self.say(f"== [{step.name}] {row.status}: {row.note}")
        return [row]

    def execute(self, step: Step, limit: float) -> list[Row]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
        stale = Path(step.run_dir) if step.run_dir else None  # an earlier smoke's results must not pass for these
        if stale is not None and stale.is_dir():
            shutil.rmtree(stale)
        elif stale is not None:
            stale.unlink(missing_ok=True)
        began = time.monotonic()
        try:
            proc = subprocess.Popen(step.cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as e:
            self.say(f"== [{step.name}] could not start: {e}")
            return [Row(step.name, "failed", note=f"could not start: {e}")]
        chunks = []
        reader = threading.Thread(target=lambda: chunks.extend(proc.stdout), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
        reader.join(timeout=5)
        seconds = time.monotonic() - began
        output = b"".join(chunks).decode(errors="replace")
        if rc == 124:
            last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")[:200]
            row = Row(step.name, "timeout", rc, seconds, note=f"killed after {limit:.0f} s; its last line: {last}")
        elif rc != 0:
            row = Row(step.name, "failed", rc, seconds, note=last_error_line(output))
        else:
            row = Row(step.name, "ok", rc, seconds)
        tail = "\n".join(output.splitlines()[-TAIL_LINES:])
        self.say(f"== [{step.name}] {row.status} (exit {rc}, {seconds:.0f} s of {limit:.0f}) $ {' '.join(step.cmd)}\n"
                 f"{tail}\n== [{step.name}] end")
        try:
            return step_rows(step, row, output)
        except (OSError, ValueError, KeyError, TypeError) as e:  # its results unreadable: the row says so
            row.note = f"{row.note}; results unreadable: {type(e).__name__}: {e}".lstrip("; ")
            return [row]

    def run_lane(self, lane: list[Step]):
        for step in lane:
            rows = self.run_step(step)
            with self.lock:
                self.done[step.name] = rows[0].status
                self.rows[step.name] = rows

    def run(self, plan) -> list[Row]:
        for phase in plan:
            threads = [threading.Thread(target=self.run_lane, args=(lane,)) for lane in phase]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        order = [s.name for phase in plan for lane in phase for s in lane]
        return [row for name in order for row in self.rows[name]]


def print_versions():
    """torch, CUDA, the GPU and the packages the recipes need, as installed (for the log)."""
    import importlib.metadata

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"torch {torch.__version__} | cuda {torch.version.cuda} | {gpu}")
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "gptqmodel", "optimum",
                 "liger-kernel", "flash-attn"):
        try:
            print(f"  {name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"  {name}: not installed")


def parse_parts(text: str) -> set[str]:
    parts = {p.strip() for p in text.split(",") if p.strip()}
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part {', '.join(unknown)}; expected a comma list of "
                                         f"{', '.join(PARTS)}")
    return parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--only", type=parse_parts, default=set(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_smoke_out", help="summary.md and results.json")
    p.add_argument("--work", default=os.environ.get("SMOKE_WORK", "/tmp/gpu_smoke_work"),
                   help="the runs' folders, models and data (not brought back)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--versions", action="store_true", help="print torch, the GPU and the packages' versions; exit")
    args = p.parse_args(argv)
    if args.versions:
        print_versions()
        return 0
    plan = select(build_plan(Path(args.work).resolve(), args.python), args.only)
    print(describe_plan(plan), flush=True)
    if args.dry_run:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = Runner().run(plan)
    table = summary_table(rows)
    (out / "summary.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print(f"\nsummary ({out / 'summary.md'}):\n{table}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
