"""Every recipe on its default run (tiny random-init Llama, bundled data), one after the other, and a table of what
each took and reached: the "about a minute on 2 CPU cores" promise, checked.

    python bench/recipe_defaults.py                       # all recipes
    python bench/recipe_defaults.py sft/qlora cls/qlora   # some

Each recipe runs as a user runs it (`bash <recipe>/run.sh --output_dir=<tmp> --report_to=none`), so the wall time
includes start-up, data preparation and model loading (but not one-time work already cached on this machine: the
tiny model, the tiny GPTQ model, DeepSpeed's compiled CPU Adam). Peak memory is the recipe's own report (process RSS
on CPU, max allocated on a GPU). The result column is the final eval metric next to the untrained / baseline value.
"""
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_SCRIPTS = [p for kind in ("sft", "cls", "pretrain", "rlhf") for p in (REPO / kind).glob("*/run.sh")]
RECIPES = sorted(str(p.parent.relative_to(REPO)) for p in RUN_SCRIPTS)


def result_summary(out: Path, rows: list[dict]) -> str:
    """The headline eval figure of a finished run against where it started or its baseline."""
    results = out / "eval_results.json"
    if results.is_file():
        r = json.loads(results.read_text())
        if "accuracy" in r:
            return f"accuracy {r['accuracy']:.2f} (majority {r['baseline_majority']['accuracy']:.2f})"
        if "mse" in r:
            return f"mse {r['mse']:.3f} (mean baseline {r['baseline_mean']['mse']:.3f})"
        if "eval_reward_accuracy" in r:  # rlhf/dpo-qlora: held-out reward accuracy before and after
            return f"reward accuracy {r['at_start']['eval_reward_accuracy']:.2f} -> {r['eval_reward_accuracy']:.2f}"
        if "pairwise_accuracy" in r:
            return f"pairwise accuracy {r['pairwise_accuracy']:.2f} (chance 0.50)"
    evals = [row["eval_loss"] for row in rows if "eval_loss" in row]
    if len(evals) > 1:
        return f"eval loss {evals[0]:.2f} -> {evals[-1]:.2f}"
    train = [row["loss"] for row in rows if "loss" in row]  # no eval set on the default: the training loss
    return f"train loss {train[0]:.2f} -> {train[-1]:.2f}" if train else "-"


def run(recipe: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        start = time.perf_counter()
        proc = subprocess.run(["bash", str(REPO / recipe / "run.sh"), f"--output_dir={out}", "--report_to=none"],
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            return {"recipe": recipe, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        done = re.search(r"done: (\d+) steps in ([\d.]+)s, ([\d,]+) tok/s, peak mem ([\d.]+) GB", proc.stdout)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {"recipe": recipe, "steps": int(done[1]), "train_s": float(done[2]),
                "tok_s": int(done[3].replace(",", "")), "mem_gb": float(done[4]), "wall_s": wall,
                "result": result_summary(out, rows)}


def main():
    recipes = sys.argv[1:] or RECIPES
    print(f"{'recipe':<32}{'steps':>6}{'train s':>9}{'tok/s':>8}{'peak GB':>9}{'wall s':>8}  result")
    for recipe in recipes:
        r = run(recipe)
        if "error" in r:
            print(f"{recipe:<32} FAILED: {r['error']}")
            continue
        print(f"{recipe:<32}{r['steps']:>6}{r['train_s']:>9.1f}{r['tok_s']:>8,}{r['mem_gb']:>9.2f}{r['wall_s']:>8.1f}  "
              f"{r['result']}", flush=True)


if __name__ == "__main__":
    main()
