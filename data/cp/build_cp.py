"""
Builds CP, the paper's Custom Prompts: 10 harmful AdvBench goals x 10 safe images = 100 (image, prompt) pairs, every
goal with every image. The paper keeps the CP goals out of AdvBench-COCO (AC), so AC's goal list is written too.

Inputs, both supplied by the user (nothing is downloaded): AdvBench's harmful_behaviors.csv (goal,target) and a
folder of safe .jpg/.png images (the paper's are web photos, e.g. a city skyline, cars). The goals and the images are
a seeded draw; --goals picks the goals instead, as 0-based data rows (0 = the CSV's first goal, on line 2).
Writes to out_dir (default: this folder):

    prompts.jsonl  {"id", "prompt", "image"} per pair, image paths relative to out_dir (evaluate.read_prompt_jsonl);
                   id = cp:<CSV line of the goal>:<image file name>
    ac_goals.csv   goal,target: AdvBench without the CP goals, for evaluate.py --dataset=advbench_coco --data_path=...

Run: python data/cp/build_cp.py --advbench=harmful_behaviors.csv --image_dir=path/to/images [--goals=0,5,...]
"""
import argparse
import json
import os
import random
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parents[1]))  # the repository root, for evaluate.py and model.py

from evaluate import read_csv_rows  # noqa: E402  (the AdvBench CSV as evaluate.py reads it)
from common import IMAGE_SUFFIXES, InputError, atomic_write, write_csv  # noqa: E402

num_goals = 10
num_images = 10


def build_cp(advbench, image_dir, out_dir=here, seed=1337, goals=None):
    """Write prompts.jsonl (CP) and ac_goals.csv (AC's goals) to out_dir; return (CP rows, AC goal rows)."""
    if not os.path.isfile(advbench):
        raise InputError(f"{advbench}: not found; expected AdvBench's harmful_behaviors.csv (goal,target)")
    if not os.path.isdir(image_dir):
        raise InputError(f"{image_dir}: not a folder; expected a folder of safe .jpg/.png images")
    rows = list(read_csv_rows(advbench, ["goal", "target"]))  # (CSV line, {"goal", "target"})
    images = sorted(p for p in Path(image_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(images) < num_images:
        raise InputError(f"{image_dir}: {len(images)} .jpg/.png images; expected at least {num_images}")
    # AdvBench repeats a few goals: a goal is drawn as its first row, so CP never holds one goal twice
    first = {}
    for i, (_, row) in enumerate(rows):
        first.setdefault(row["goal"], i)
    if len(first) <= num_goals:
        raise InputError(f"{advbench}: {len(first)} distinct goals; expected more than {num_goals}, so that AC keeps "
                         "some")
    rng = random.Random(seed)
    images = sorted(rng.sample(images, num_images))  # drawn first, so that --goals leaves the images as they were
    if goals is None:
        goals = sorted(rng.sample(sorted(first.values()), num_goals))
    if not goals or any(not 0 <= g < len(rows) for g in goals) or len({rows[g][1]["goal"] for g in goals}) < len(goals):
        raise InputError(f"goals={goals}: expected data-row indices in 0..{len(rows) - 1} of {advbench}, each a "
                         "different goal")
    out_dir = Path(out_dir)
    cp = [{"id": f"cp:{rows[g][0]}:{image.name}", "prompt": rows[g][1]["goal"],
           "image": os.path.relpath(os.path.abspath(image), os.path.abspath(out_dir))}
          for g in goals for image in images]
    # by text, not by row: a repeat of a CP goal must not reach AC either
    cp_goals = {rows[g][1]["goal"] for g in goals}
    ac = [[row["goal"], row["target"]] for _, row in rows if row["goal"] not in cp_goals]

    def write_jsonl(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in cp)
    atomic_write(out_dir / "prompts.jsonl", write_jsonl)
    atomic_write(out_dir / "ac_goals.csv", lambda tmp: write_csv(tmp, ["goal", "target"], ac))
    return cp, ac


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build CP (10 AdvBench goals x 10 safe images) and AC's goal list.")
    parser.add_argument("--advbench", required=True, help="AdvBench harmful_behaviors.csv (goal,target)")
    parser.add_argument("--image_dir", required=True, help="folder of safe .jpg/.png images")
    parser.add_argument("--out_dir", default=str(here))
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--goals", type=lambda s: [int(g) for g in s.split(",")],
                        help="comma-separated 0-based data rows of the CSV instead of a seeded draw")
    args = parser.parse_args()
    try:
        cp, ac = build_cp(args.advbench, args.image_dir, args.out_dir, args.seed, args.goals)
    except ValueError as e:  # InputError, or a bad CSV record from read_csv_rows
        sys.exit(f"error: {e}")
    print(f"wrote {len(cp)} CP pairs to {args.out_dir}/prompts.jsonl and {len(ac)} AC goals to "
          f"{args.out_dir}/ac_goals.csv")
