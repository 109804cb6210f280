"""common/pipeline.py without processes: where the stages split the layers (against every possible split), the
names a stage's tensors have in a Hugging Face checkpoint, and reading only some tensors of a sharded checkpoint."""
import itertools

import pytest
import torch

from common.config import UserError
from common.model import read_safetensors_subset
from common.pipeline import hf_llama_name, pipeline_stage_layers


def largest_stage(bounds, layer, first, last) -> int:
    sizes = [(b - a) * layer for a, b in bounds]
    sizes[0] += first
    sizes[-1] += last
    return max(sizes)


@pytest.mark.parametrize("n_layers,pp,layer,first,last", [(7, 3, 10, 25, 25), (12, 4, 218, 131, 131),
                                                          (9, 2, 5, 40, 3), (30, 5, 7, 0, 60)])
def test_balanced_split_is_the_best_of_every_split(n_layers, pp, layer, first, last):
    bounds = pipeline_stage_layers(n_layers, pp, layer, first, last)
    assert bounds[0][0] == 0 and bounds[-1][1] == n_layers and len(bounds) == pp
    assert all(a < b and b == c for (a, b), (c, _) in zip(bounds, bounds[1:] + [(bounds[-1][1], None)]))
    best = min(largest_stage([(sum(cuts[:i]), sum(cuts[:i + 1])) for i in range(pp)], layer, first, last)
               for cuts in itertools.product(range(1, n_layers), repeat=pp) if sum(cuts) == n_layers)
    assert largest_stage(bounds, layer, first, last) == best


def test_explicit_split_and_mistakes():
    assert pipeline_stage_layers(30, 3, 1, 0, 0, "12,10,8") == [(0, 12), (12, 22), (22, 30)]
    for explicit, pp in (("10,10", 3), ("10,10,11", 3), ("0,15,15", 3), ("a,b,c", 3)):
        with pytest.raises(UserError, match="--stage_layers"):
            pipeline_stage_layers(30, pp, 1, 0, 0, explicit)
    with pytest.raises(UserError, match="--pp=5: expected 1 to 4 stages"):
        pipeline_stage_layers(4, 5, 1, 0, 0)


def test_stage_names_map_to_the_checkpoint_names():
    assert hf_llama_name("layers.12.mlp.up_proj.weight") == "model.layers.12.mlp.up_proj.weight"
    assert hf_llama_name("embed_tokens.weight") == "model.embed_tokens.weight"
    assert hf_llama_name("norm.weight") == "model.norm.weight"
    assert hf_llama_name("lm_head.weight") == "lm_head.weight"


def test_reads_only_the_named_tensors_of_a_sharded_checkpoint(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_size="1MB")  # several shards and an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    names = ["model.layers.3.mlp.down_proj.weight", "lm_head.weight", "model.embed_tokens.weight"]
    state = read_safetensors_subset(tmp_path, names)
    assert sorted(state) == sorted(names)
    for name in names:
        torch.testing.assert_close(state[name], tiny_model.state_dict()[name], atol=0, rtol=0)
    with pytest.raises(UserError, match="no tensor model.layers.9.mlp.down_proj.weight"):
        read_safetensors_subset(tmp_path, ["model.layers.9.mlp.down_proj.weight"])
    with pytest.raises(UserError, match="no model.safetensors"):
        read_safetensors_subset(tmp_path / "nothing", names)
