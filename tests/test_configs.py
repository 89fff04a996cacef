"""Every file in config/ passes its stage's own configurator (known keys, the expected types, positive counts,
allowed choices), so that `python stage.py config/x.py` fails on no config line; and config/smol_lppo.py, which
spells out lppo.py's defaults, still equals them."""
import importlib
import os
import sys

import pytest

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)

# each config file and the stage script it is written for
STAGE = {
    "gpt2_hh_rm": "reward", "smol_rm": "reward",
    "llama32v_eval": "evaluate", "llava_next_eval": "evaluate", "smol_eval": "evaluate", "smol_test": "evaluate",
    "smol_sweep": "evaluate", "smol_compare": "evaluate",
    "llama32v_l5": "lppo", "llava15_l5": "lppo", "llava_next_l5": "lppo", "smol_lppo": "lppo", "smol_lppo_all": "lppo",
    "llava_next34b_l5": "lppo", "llama32v90b_l5": "lppo",
    "llava15_sft_l5": "sft", "llava_next_sft_l5": "sft", "smol_sft": "sft", "smol_sft_all": "sft",
    "smol_sft_full": "sft", "smol_sft_l1": "sft", "smol_vision": "sft", "smol_sft_converged": "sft",
    "smol_sft_matched": "sft",
    "smol_extract": "extract",
}


def test_every_config_file_names_its_stage():
    names = {f[:-3] for f in os.listdir(os.path.join(root, "config")) if f.endswith(".py")}
    assert names == set(STAGE)


def stage_settings(name, monkeypatch):
    """The stage module's globals after the configurator has run on config/<name>.py, as `python stage.py
    config/<name>.py` would: unknown keys, wrong types, non-positive counts and bad choices stop it with one line."""
    monkeypatch.chdir(root)  # a config may exec another by its path from the repository root
    monkeypatch.setattr(sys, "argv", [STAGE[name] + ".py", os.path.join("config", name + ".py")])
    namespace = dict(vars(importlib.import_module(STAGE[name])))
    try:
        exec(open(os.path.join(root, "configurator.py")).read(), namespace)
    except SystemExit as e:
        pytest.fail(str(e.code))
    return namespace


@pytest.mark.parametrize("name", sorted(STAGE))
def test_a_config_passes_its_stages_configurator(name, monkeypatch):
    stage_settings(name, monkeypatch)


def test_the_smol_lppo_config_spells_out_lppos_defaults(monkeypatch):
    # config/smol_lppo.py is `python lppo.py` with no config: a default changed in one must change in the other
    settings, lppo = stage_settings("smol_lppo", monkeypatch), importlib.import_module("lppo")
    differ = {k: (settings[k], getattr(lppo, k)) for k in lppo.config_keys if settings[k] != getattr(lppo, k)}
    assert not differ, f"config/smol_lppo.py differs from lppo.py's defaults (config, default): {differ}"
