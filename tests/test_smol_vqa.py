"""smol-VQA: seeded, balanced over its question types, and its held-out images are never training images."""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "smol"))

import vqa  # noqa: E402

from evaluate import vqa_accuracy  # noqa: E402
from common import read_prompt_jsonl  # noqa: E402


def digest(img):
    return hashlib.sha256(img.tobytes()).hexdigest()


def test_an_example_depends_only_on_seed_split_and_index():
    a, b = vqa.draw_split(0, "train", 12), vqa.draw_split(0, "train", 12)
    assert [digest(x[0]) for x in a] == [digest(x[0]) for x in b] and [x[1:] for x in a] == [x[1:] for x in b]
    assert [digest(x[0]) for x in vqa.draw_split(1, "train", 12)] != [digest(x[0]) for x in a]


def test_every_answer_is_one_of_its_types_answers_and_the_types_take_turns():
    examples = vqa.draw_split(0, "test", 120)
    for i, (img, qtype, question, answer) in enumerate(examples):
        assert qtype == list(vqa.QUESTIONS)[i % len(vqa.QUESTIONS)]
        assert (question, answer in vqa.QUESTIONS[qtype][1]) == (vqa.QUESTIONS[qtype][0], True)
        assert img.size == (vqa.SIZE, vqa.SIZE)
    # every answer of every type occurs: no type is secretly constant
    for qtype, (_, answers) in vqa.QUESTIONS.items():
        seen = {a for _, q, _, a in vqa.draw_split(0, "train", 600) if q == qtype}
        assert seen == set(answers), qtype


def test_no_two_splits_share_an_image():
    """The splits as the world writes them (vqa.SPLITS): training, mix, validation and test images all differ."""
    assert set(vqa.SPLITS) == {"train", "mix", "val", "test"}
    images = {split: {digest(x[0]) for x in vqa.draw_split(0, split, n)} for split, n in vqa.SPLITS.items()}
    for a in images:
        for b in images:
            assert a == b or not images[a] & images[b], (a, b)


def test_written_split_reads_back_as_a_vqa_set_that_scores_its_own_answers(tmp_path):
    path = vqa.write_split(str(tmp_path), 0, "test", 12)
    rows = read_prompt_jsonl(path)
    assert len(rows) == 12 and all(Path(r["image"]).is_file() for r in rows)
    assert {r["type"] for r in rows} == set(vqa.QUESTIONS)
    responses = [json.loads(line)["response"] for line in open(path)]  # what sft.py trains on
    for r, response in zip(rows, responses):
        assert vqa_accuracy(response, r["answers"]) == 1.0  # "H" and "h" alike
        assert vqa_accuracy("not an answer", r["answers"]) == 0.0
        assert r["prompt"].endswith(vqa.SHORT_ANSWER)


def test_tower_pretraining_changes_only_the_tower_and_keeps_the_checkpoint_loadable(tmp_path, monkeypatch):
    import torch

    import pretrain_vision
    from model import VLM
    import tiny
    tiny.make_tiny_llava(tmp_path / "base")
    tiny.make_tiny_tokenizer(tmp_path / "base")
    for name, value in (("base_dir", str(tmp_path / "base")), ("out_dir", str(tmp_path / "out")), ("steps", 3),
                        ("batch_size", 6), ("eval_examples", 12)):
        monkeypatch.setattr(pretrain_vision, name, value)
    pretrain_vision.main()
    before, after = (VLM.from_pretrained(tmp_path / d).state_dict() for d in ("base", "out"))
    tower = [k for k in before if k.startswith("vision_tower.")]
    assert tower and any(not torch.equal(before[k], after[k]) for k in tower)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in tower)
    assert (tmp_path / "out" / "tokenizer.json").is_file()  # the folder is a whole checkpoint


def test_the_world_builder_runs_a_stage_with_its_config_and_refuses_an_unknown_key(tmp_path, monkeypatch):
    import pytest
    import sft

    from data.smol import world
    from common import InputError
    seen = {}
    monkeypatch.setattr(sft, "main", lambda: seen.update(max_iters=sft.max_iters, merged_dir=sft.merged_dir))
    for key in sft.config_keys:  # every setting the config changes is restored after the test
        monkeypatch.setattr(sft, key, getattr(sft, key))
    world.run_with_config("sft", "smol_vision")
    assert seen == {"max_iters": 225, "merged_dir": "data/smol/smol-llava-vision"}
    monkeypatch.setattr(world, "root", str(tmp_path))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "bad.py").write_text("max_iter = 3\n")
    with pytest.raises(InputError, match="config/bad.py: unknown config key 'max_iter' for sft.py"):
        world.run_with_config("sft", "bad")
