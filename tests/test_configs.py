"""Every file in config/ sets only keys its stage knows, with values of the types the stage expects, so that
`python stage.py config/x.py` fails on no config line (the configurator would stop it with one line)."""
import importlib
import os
import sys

import pytest

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)

# each config file and the stage script it is written for
STAGE = {
    "gpt2_hh_rm": "reward", "smol_rm": "reward",
    "llama32v_eval": "evaluate", "llava_next_eval": "evaluate", "smol_eval": "evaluate",
    "llama32v_l5": "lppo", "llava15_l5": "lppo", "llava_next_l5": "lppo", "smol_lppo": "lppo", "smol_lppo_all": "lppo",
    "llava15_sft_l5": "sft", "llava_next_sft_l5": "sft", "smol_sft": "sft", "smol_sft_all": "sft",
    "smol_sft_full": "sft", "smol_sft_l1": "sft", "smol_vision": "sft",
    "smol_extract": "extract",
}


def test_every_config_file_names_its_stage():
    names = {f[:-3] for f in os.listdir(os.path.join(root, "config")) if f.endswith(".py")}
    assert names == set(STAGE)


@pytest.mark.parametrize("name", sorted(STAGE))
def test_a_config_sets_only_its_stages_keys_with_the_expected_types(name, monkeypatch):
    monkeypatch.chdir(root)  # a config may exec another by its path from the repository root
    settings = {}
    exec(open(os.path.join("config", name + ".py")).read(), {}, settings)
    stage = importlib.import_module(STAGE[name])
    unknown = set(settings) - set(stage.config_keys)
    assert not unknown, f"config/{name}.py: keys {sorted(unknown)} are not {STAGE[name]}.py config keys"
    widened = getattr(stage, "CONFIG_TYPES", {})
    for key, value in settings.items():
        default = getattr(stage, key)
        allowed = widened.get(key) or ((int, float) if isinstance(default, float) else (type(default),))
        assert default is None or isinstance(value, allowed), \
            f"config/{name}.py: {key} = {value!r}, expected {' or '.join(t.__name__ for t in allowed)}"
