"""
Builds the whole smol world, in order, each stage once: what exists is kept, what is missing is made.

    1. base      data/smol/smol-llava-base/            SmolLM2-135M-Instruct + an untrained CLIP tower   (prepare.py)
    2. smol-VQA  data/smol/vqa/                        procedural images with questions                (vqa.py)
    3. tower     data/smol/smol-llava-vision-tower/    the tower pretrained to see them        (pretrain_vision.py)
    4. vision    data/smol/smol-llava-vision/          projector + LoRA: the LM reads the images (sft.py, smol_vision)
    5. safety    data/smol/sft_train.jsonl, smol-llava/  refusals taught at the default layer, half-way (sft.py, smol_sft)
    6. rewards   data/smol/prefs_*.jsonl, out/smol-rm/  preference pairs and the reward model (reward.py, smol_rm)

Every stage runs in this process, with its config file, as `python stage.py config/...` would run it.

Training stages 3-6 takes about an hour on a 2-core CPU, so the repository ships what they trained as small pieces
(data/smol/pieces.py): by default the policy smol-llava/ and the reward model out/smol-rm/ are assembled from those
in seconds, and only --from_scratch trains them (then `python data/smol/pieces.py export` rewrites the pieces).

    python data/smol/world.py                  # base + smol-VQA, then the shipped policy and reward model
    python data/smol/world.py --from_scratch   # every stage trained here
"""
import importlib
import json
import os
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(os.path.dirname(here))
sys.path.insert(0, root)

from common import InputError, run_stage  # noqa: E402


def run_with_config(stage, config):
    """Run stage's main() (sft or reward) with the settings of config/<config>.py."""
    module = importlib.import_module(stage)
    settings = {}
    exec(open(os.path.join(root, "config", config + ".py")).read(), {}, settings)
    for key, value in settings.items():
        if key not in module.config_keys:  # as the configurator would refuse it
            raise InputError(f"config/{config}.py: unknown config key {key!r} for {stage}.py")
        setattr(module, key, value)
    module.main()


def built(*paths):
    return all(os.path.exists(os.path.join(root, p)) for p in paths)


def reward_model_done(reward_dir):
    path = os.path.join(root, reward_dir, "reward_train.json")
    return os.path.exists(path) and json.load(open(path)).get("finished")


def build(reward_dir="out/smol-rm", from_scratch=False):
    """Make every missing piece of the smol world; return the policy's and the reward model's folders."""
    from data.smol import build_preferences, build_sft, pieces, prepare, pretrain_vision, vqa
    shipped = not from_scratch and reward_dir == "out/smol-rm" and all(
        os.path.isfile(os.path.join(root, pieces.pieces_dir, name)) for name in pieces.PIECES)
    cwd = os.getcwd()
    os.chdir(root)  # the configs name their files relative to the repository root
    try:
        steps = [
            ("base", lambda: built("data/smol/smol-llava-base/config.json"), prepare.prepare),
            ("smol-VQA", lambda: built(*(f"data/smol/vqa/vqa_{s}.jsonl" for s in vqa.SPLITS)),
             lambda: [vqa.write_split(os.path.join(here, "vqa"), 0, s, n) for s, n in vqa.SPLITS.items()]),
        ]
        shipped_steps = [
            ("policy, from data/smol/pieces", lambda: built("data/smol/smol-llava/config.json"),
             lambda: pieces.assemble("smol-llava.safetensors")),
            ("reward model, from data/smol/pieces", lambda: reward_model_done(reward_dir),
             lambda: pieces.assemble("smol-rm.safetensors")),
        ]
        trained_steps = [
            ("tower", lambda: built("data/smol/smol-llava-vision-tower/config.json"), pretrain_vision.main),
            ("vision", lambda: built("data/smol/smol-llava-vision/config.json"),
             lambda: run_with_config("sft", "smol_vision")),
            ("safety data", lambda: built("data/smol/sft_train.jsonl"), build_sft.build_smol_sft),
            ("safety", lambda: built("data/smol/smol-llava/config.json"), lambda: run_with_config("sft", "smol_sft")),
            ("preferences", lambda: built("data/smol/prefs_train.jsonl", "data/smol/prefs_test.jsonl"),
             build_preferences.build_preferences),
            ("reward model", lambda: reward_model_done(reward_dir), lambda: run_with_config("reward", "smol_rm")),
        ]
        steps += shipped_steps if shipped else trained_steps
        for i, (name, done, make) in enumerate(steps, 1):
            if done():
                print(f"smol world {i}/{len(steps)} {name}: ready")
                continue
            t0 = time.time()
            print(f"smol world {i}/{len(steps)} {name}: building")
            make()
            print(f"smol world {i}/{len(steps)} {name}: built in {time.time() - t0:.0f}s")
    finally:
        os.chdir(cwd)
    return "data/smol/smol-llava", reward_dir


if __name__ == "__main__":
    args = sys.argv[1:]
    if args not in ([], ["--from_scratch"]):
        raise SystemExit(f"usage: python data/smol/world.py [--from_scratch] (got {' '.join(args)})")
    run_stage(lambda: build(from_scratch=bool(args)))
