"""common/optim.py: the learning rate a run gets when --lr is not given."""
import pytest

from common.config import UserError
from common.optim import resolve_lr


def test_default_lr_is_the_real_base_rate_unless_the_model_is_tiny():
    real = resolve_lr(None, "/models/Llama-2-7b-hf", real_base_lr=2e-4, tiny_lr=1e-3)
    tiny = resolve_lr(None, "tiny", real_base_lr=2e-4, tiny_lr=1e-3)
    assert real.value == 2e-4 and "real base" in real.description
    assert tiny.value == 1e-3 and tiny.description == "1.0e-03 (tiny model; a real base gets 2.0e-04)"


@pytest.mark.parametrize("model_path", ["tiny", "/models/Llama-2-7b-hf"])
def test_a_given_lr_wins_over_both_defaults(model_path):
    lr = resolve_lr(3e-5, model_path, real_base_lr=2e-4, tiny_lr=1e-3)
    assert lr.value == 3e-5 and lr.description == "3.0e-05 (--lr)"


@pytest.mark.parametrize("bad", [0.0, -1e-4, float("nan")])
def test_a_non_positive_lr_is_a_config_error(bad):
    with pytest.raises(UserError, match="--lr="):
        resolve_lr(bad, "tiny", real_base_lr=2e-4, tiny_lr=1e-3)
