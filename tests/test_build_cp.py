"""data/cp/build_cp.py: CP = 10 AdvBench goals x 10 safe images, every pair once, and AC's goals without CP's."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data.cp.build_cp import build_cp
from evaluate import read_advbench_csv
from common import InputError, read_prompt_jsonl

SCRIPT = Path(__file__).resolve().parents[1] / "data" / "cp" / "build_cp.py"


def make_inputs(tmp_path, goals=14, images=12):
    """A harmful_behaviors.csv of `goals` goals (one repeated, as AdvBench repeats a few) and a folder of images."""
    rows = [[f"Goal number {i}, with a comma", f"Sure, here is goal {i}"] for i in range(goals)]
    rows[-1][0] = rows[0][0]
    with open(tmp_path / "harmful_behaviors.csv", "w", newline="") as f:
        csv.writer(f).writerows([["goal", "target"]] + rows)
    (tmp_path / "images").mkdir()
    for i in range(images):
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(tmp_path / "images" / f"photo{i}.{'png' if i % 2 else 'jpg'}")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    return tmp_path / "harmful_behaviors.csv", tmp_path / "images"


def test_cp_is_the_cross_product_of_10_goals_and_10_images_and_their_goals_stay_out_of_ac(tmp_path):
    advbench, images = make_inputs(tmp_path)
    out = tmp_path / "cp"
    build_cp(str(advbench), str(images), out, seed=0)
    cp = read_prompt_jsonl(out / "prompts.jsonl")
    pairs = [(r["prompt"], r["image"]) for r in cp]
    goals, pics = {p for p, _ in pairs}, {i for _, i in pairs}
    assert len(cp) == 100 and len(goals) == 10 and len(pics) == 10
    assert sorted(pairs) == sorted((g, i) for g in goals for i in pics)  # every pair exactly once
    assert all(Path(i).parent == images and Path(i).is_file() for i in pics)  # paths resolve from the JSONL's folder
    assert len({r["id"] for r in cp}) == 100
    ac = read_advbench_csv(out / "ac_goals.csv")
    all_goals = {r["prompt"] for r in read_advbench_csv(advbench)}
    assert {r["prompt"] for r in ac} == all_goals - goals
    assert len(ac) == sum(r["prompt"] not in goals for r in read_advbench_csv(advbench))


def test_a_goal_repeated_in_advbench_is_drawn_at_most_once(tmp_path):
    advbench, images = make_inputs(tmp_path, goals=12)  # 11 distinct goals, goal 0 twice
    with open(advbench, "a", newline="") as f:
        csv.writer(f).writerows([["Goal number 0, with a comma", "Sure"]] * 40)
    for seed in range(5):
        cp, ac = build_cp(str(advbench), str(images), tmp_path / "cp", seed=seed)
        assert len({r["prompt"] for r in cp}) == 10 and len({(r["prompt"], r["image"]) for r in cp}) == 100
        # the one goal left over goes to AC with all its rows
        left = {goal for goal, _ in ac}
        assert len(left) == 1 and len(ac) == (42 if left == {"Goal number 0, with a comma"} else 1)


def test_cp_is_deterministic_for_a_seed_and_differs_for_another(tmp_path):
    advbench, images = make_inputs(tmp_path)
    read = lambda name: (tmp_path / name / "prompts.jsonl").read_text()
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        build_cp(str(advbench), str(images), tmp_path / name, seed=seed)
    assert read("a") == read("b") and read("a") != read("c")


def test_explicit_goals_are_the_csv_data_rows_and_the_repeat_of_a_cp_goal_leaves_ac_too(tmp_path):
    advbench, images = make_inputs(tmp_path)
    cp, ac = build_cp(str(advbench), str(images), tmp_path / "cp", seed=0, goals=list(range(10)))
    assert sorted({r["prompt"] for r in cp}) == sorted(f"Goal number {i}, with a comma" for i in range(10))
    assert {r["id"].split(":")[1] for r in cp} == {str(i + 2) for i in range(10)}  # CSV lines, as evaluate's ids
    # row 13 repeats row 0's goal: it is a CP goal, so AC keeps rows 10..12 only
    assert ac == [[f"Goal number {i}, with a comma", f"Sure, here is goal {i}"] for i in (10, 11, 12)]
    # the images are the seeded draw whether or not the goals are given
    seeded, _ = build_cp(str(advbench), str(images), tmp_path / "seeded", seed=0)
    assert {r["image"] for r in cp} == {r["image"] for r in seeded}


@pytest.mark.parametrize("goals, images, kw, message", [
    (11, 12, {}, r"harmful_behaviors.csv: 10 distinct goals; expected more than 10"),
    (14, 9, {}, r"images: 9 .jpg/.png images; expected at least 10"),
    (14, 12, {"goals": [0, 0, 1]}, r"goals=\[0, 0, 1\]: expected data-row indices in 0..13 .*, each a different goal"),
    (14, 12, {"goals": [0, 13]}, r"goals=\[0, 13\]: expected data-row indices"),  # row 13 repeats row 0's goal
    (14, 12, {"goals": [14]}, r"goals=\[14\]: expected data-row indices"),
])
def test_too_few_goals_or_images_or_bad_goal_rows_are_one_line_errors(tmp_path, goals, images, kw, message):
    advbench, image_dir = make_inputs(tmp_path, goals, images)
    with pytest.raises(InputError, match=message):
        build_cp(str(advbench), str(image_dir), tmp_path / "cp", **kw)
    assert not (tmp_path / "cp" / "prompts.jsonl").exists()


def test_the_script_builds_the_files_and_names_a_missing_csv_in_one_line(tmp_path):
    advbench, images = make_inputs(tmp_path)
    run = lambda *args: subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    ok = run(f"--advbench={advbench}", f"--image_dir={images}", f"--out_dir={tmp_path / 'cp'}", "--goals=1,2,3")
    assert ok.returncode == 0, ok.stderr
    assert len(read_prompt_jsonl(tmp_path / "cp" / "prompts.jsonl")) == 30
    missing = run(f"--advbench={tmp_path / 'nope.csv'}", f"--image_dir={images}", f"--out_dir={tmp_path / 'x'}")
    assert missing.returncode != 0
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope.csv'}: not found; expected AdvBench's " \
                                     "harmful_behaviors.csv (goal,target)"
