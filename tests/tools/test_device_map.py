"""--device_map=auto in the tools that load a model (generate, evaluate, evaluate_mcq): without a GPU a one-line error
before any weight is read; with GPUs (their count stubbed: the plan runs on the meta device, nothing touches CUDA)
the layers are planned over them in order, and a model that does not fit under --max_memory_per_gpu is a one-line
error naming what would spill."""
import pytest
import torch

from tests.conftest import REPO, run_script
from tests.tools.conftest import load_tool

TOOLS = {"generate": ["--prompts=data/sft/eval.jsonl", "--out=answers.jsonl"],
         "evaluate": ["--data=data/sft/eval.jsonl", "--exact_match=false"],
         "evaluate_mcq": ["--data=data/mcq/en"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_auto_without_a_gpu_is_one_line(tool, tmp_path):
    args = [a.replace("data/", f"{REPO}/data/").replace("answers.jsonl", str(tmp_path / "answers.jsonl"))
            for a in TOOLS[tool]]
    proc = run_script(REPO / "tools" / f"{tool}.py", "--model=tiny", "--device_map=auto", *args, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --device_map=auto needs GPUs")
    assert not (tmp_path / "answers.jsonl").exists()


class Planned(Exception):
    """Raised instead of loading: the device map from_pretrained was given."""


@pytest.fixture
def two_gpus(monkeypatch):
    """Two GPUs as far as the planning asks (their count, the tools' device); from_pretrained records the plan it
    is given and stops there."""
    import transformers

    import common.inference

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for module in [common.inference, *(load_tool(name) for name in TOOLS)]:
        if hasattr(module, "inference_device"):
            monkeypatch.setattr(module, "inference_device", lambda: torch.device("cuda", 0))

    def record(*args, device_map=None, **kwargs):
        raise Planned(device_map)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record)


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_auto_plans_the_layers_over_the_gpus_in_order(tool, two_gpus, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(Planned) as planned:
        load_tool(tool).main(["--model=tiny", "--device_map=auto", "--max_memory_per_gpu=12MiB", "--dtype=float32",
                              *TOOLS[tool]])
    plan = planned.value.args[0]
    layers = [plan[f"model.layers.{i}"] for i in range(4)]
    assert set(plan.values()) == {0, 1} and layers == sorted(layers)  # 16 MiB of fp32 weights: on both, in order
    assert plan["model.embed_tokens"] == 0


def test_a_model_that_does_not_fit_is_one_line(two_gpus, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_code:
        load_tool("generate").main(["--model=tiny", "--device_map=auto", "--max_memory_per_gpu=2MiB",
                                    "--dtype=float32", *TOOLS["generate"]])
    assert exit_code.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: the model does not fit on 2 GPU(s) with 2, 2 MiB allowed per GPU")
    assert "would be offloaded to CPU/disk" in error
