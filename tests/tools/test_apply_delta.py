"""tools/apply_delta.py: apply(make(base, target)) rebuilds the target bit for bit, with a grown vocabulary and in
fp32 and bf16; a wrong base and an incompatible target are refused."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.tools.conftest import load_tool

apply_delta = load_tool("apply_delta")
GROWN_VOCAB = 2048 + 64


@pytest.fixture(scope="module")
def targets(tiny_dir, tmp_path_factory):
    """The tiny Llama fine-tuned in spirit: every weight but layer 0's perturbed, 64 new vocabulary rows; in fp32
    and in bf16."""
    from common.model import load_model

    model = load_model(tiny_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers.0." not in name:
                p.add_(torch.randn(p.shape, generator=generator) * p.std() * 0.1)
    model.resize_token_embeddings(GROWN_VOCAB, mean_resizing=False)
    folder = tmp_path_factory.mktemp("targets")
    model.save_pretrained(folder / "fp32")
    model.to(torch.bfloat16).save_pretrained(folder / "bf16")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, folder / "fp32" / name)
    return folder


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and apply_delta.same_bits(a, b)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_apply_of_make_rebuilds_the_target_exactly(dtype, targets, tmp_path, capsys):
    target = targets / dtype
    apply_delta.main(["make", "--base=tiny", f"--target={target}", f"--out={tmp_path / 'delta'}"])
    manifest = json.loads((tmp_path / "delta" / "delta.json").read_text())
    kinds = {name: entry["kind"] for name, entry in manifest["tensors"].items()}
    assert kinds["model.embed_tokens.weight"] == kinds["lm_head.weight"] == "grown"
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "same"  # untouched (bf16: the base's cast) -> not stored
    assert kinds["model.layers.1.mlp.down_proj.weight"] == "delta"
    apply_delta.main(["apply", "--base=tiny", f"--delta={tmp_path / 'delta'}", f"--out={tmp_path / 'rebuilt'}"])
    expected, rebuilt = load_file(target / "model.safetensors"), load_file(tmp_path / "rebuilt" / "model.safetensors")
    assert expected.keys() == rebuilt.keys()
    assert [n for n in expected if not same_bits(expected[n], rebuilt[n])] == []
    assert rebuilt["lm_head.weight"].shape[0] == GROWN_VOCAB
    assert (tmp_path / "rebuilt" / "config.json").read_text() == (target / "config.json").read_text()
    if dtype == "fp32":
        assert (tmp_path / "rebuilt" / "tokenizer.json").is_file()
    assert "rebuilt 39 tensors" in capsys.readouterr().out


def test_a_wrong_base_is_refused(targets, tiny_dir, tmp_path, capsys):
    apply_delta.main(["make", "--base=tiny", f"--target={targets / 'fp32'}", f"--out={tmp_path / 'delta'}"])
    other = shutil.copytree(tiny_dir, tmp_path / "other-base")  # same config and file names, one weight changed
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"][0] += 1
    from safetensors.torch import save_file

    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        apply_delta.main(["apply", f"--base={other}", f"--delta={tmp_path / 'delta'}", f"--out={tmp_path / 'x'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith(f"error: --base={other} is not the model this delta "
                                                            "was made from: model.safetensors has sha256")
    assert not (tmp_path / "x").exists()


def test_an_incompatible_target_is_refused(targets, tmp_path, capsys):
    target = shutil.copytree(targets / "fp32", tmp_path / "deeper")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 8}))
    with pytest.raises(SystemExit) as exit_info:
        apply_delta.main(["make", "--base=tiny", f"--target={target}", f"--out={tmp_path / 'delta'}"])
    assert exit_info.value.code == 2
    assert "different architectures (num_hidden_layers 4 vs 8)" in capsys.readouterr().err


def test_exact_delta_widens_until_the_target_comes_back_bit_for_bit():
    base = torch.tensor([1.0, 2.0])
    close = torch.tensor([1.0 + 2**-23, 2.5])  # fp32 holds target - base exactly
    assert apply_delta.exact_delta(base, close).dtype == torch.float32
    far = torch.tensor([1.5 * 2**-30, 2.0])  # 1 - 1.5 * 2^-30 needs 31 bits: fp64
    delta = apply_delta.exact_delta(base, far)
    assert delta.dtype == torch.float64 and same_bits(apply_delta.rebuild(base, delta, torch.float32), far)
    assert apply_delta.exact_delta(base, torch.tensor([2**-60, 2.0])) is None  # beyond fp64 too: stored whole
    bf16_base, bf16_target = torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.tensor([1.0078125, 2.0],
                                                                                          dtype=torch.bfloat16)
    assert apply_delta.exact_delta(bf16_base, bf16_target).dtype == torch.bfloat16  # as small as the target
