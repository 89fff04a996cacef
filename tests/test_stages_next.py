"""sft.py on LLaVA-NeXT (anyres) on a tiny random checkpoint: each example carries its own image's token count, a
collated batch of images of different sizes gives transformers' loss, a short run's loss falls at one image layer and
at drawn layers, the merged folder differs from the base in the language model only, and compile=True is refused."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import sft
import tiny
from common import InputError
from model import VLM, encode_images, image_token_count, load_image, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(20, 50), (61, 33), (30, 30), (9, 14)]  # (height, width): wide, tall, square and small, 4 token counts
PROMPTS = ["w5 w30 w60", "w6 w31", "w7 w32 w61 w62", "w8"]
RESPONSES = ["w40 w41 w42 w43", "w50 w51", "w60 w61 w62", "w70 w71 w72 w73 w74"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random llava_next checkpoint with its tokenizer, four images of different sizes and an SFT JSONL."""
    d = tmp_path_factory.mktemp("next_world")
    tiny.make_tiny_llava_next(d / "policy")
    # the random head 10 times larger: with std 0.02 it bounds every logit to about +-1, too flat to learn from
    weights = load_file(d / "policy" / "model.safetensors")
    head = next(k for k in weights if k.endswith("lm_head.weight"))
    save_file({**weights, head: weights[head] * 10}, d / "policy" / "model.safetensors", metadata={"format": "pt"})
    tiny.make_tiny_tokenizer(d / "policy")
    (d / "images").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / "images" / f"{i}.png")
    with open(d / "sft.jsonl", "w") as f:
        for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
            f.write(json.dumps({"image": f"images/{i}.png", "prompt": p, "response": r}) + "\n")
    return d


def use_config(monkeypatch, **overrides):
    """Set sft.py's config globals, as configurator.py would, for an in-process main()."""
    settings = dict(batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, min_lr=1e-2, warmup_iters=0,
                    eval_interval=1000, log_interval=1, device="cpu", dtype="float32",
                    lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    for k, v in {**settings, **overrides}.items():
        assert k in sft.config_keys, k
        monkeypatch.setattr(sft, k, v)


def test_each_example_has_its_own_images_token_count_and_cutting_keeps_them_whole(world, capsys):
    vlm, tok = VLM.from_pretrained(world / "policy"), load_tokenizer(world / "policy")
    rows = sft.read_sft_jsonl(str(world / "sft.jsonl"))
    assert [r["image_size"] for r in rows] == SIZES
    counts = [image_token_count(vlm.config, h, w) for h, w in SIZES]
    assert len(set(counts)) == len(SIZES)  # four sizes, four different counts: a shared count would be wrong
    examples = sft.tokenize_examples(rows, tok, vlm.config, 256)
    for e, n, response in zip(examples, counts, RESPONSES):
        assert e["input_ids"].count(tiny.IMAGE_TOKEN) == n
        target = [int(w[1:]) for w in response.split()] + [tok.eos_token_id]
        assert [l for l in e["labels"] if l != sft.IGNORE_INDEX] == target
    # room for the third example's image, template, response and one word of its prompt: three words are cut
    full = len(examples[2]["input_ids"])
    cut = sft.tokenize_examples(rows[2:3], tok, vlm.config, full - 3)[0]
    assert cut["input_ids"].count(tiny.IMAGE_TOKEN) == counts[2] and len(cut["input_ids"]) == full - 3
    assert "cut from the left" in capsys.readouterr().out
    with pytest.raises(InputError, match=rf"sft.jsonl:3: the image tokens, chat template and response need "
                                         rf"{full - 4} tokens, more than the context length {full - 5}"):
        sft.tokenize_examples(rows[2:3], tok, vlm.config, full - 5)


def test_loss_of_a_collated_batch_equals_transformers_llava_next_loss(world):
    """Our forward on the batch sft.py collates (right-padded, crops padded to the largest count, image_sizes), one
    image layer per example, against LlavaNextForConditionalGeneration's loss of each example at its layer, summed
    with the examples' target counts as weights (transformers takes one layer for a whole batch)."""
    from transformers import LlavaNextForConditionalGeneration
    hf = LlavaNextForConditionalGeneration.from_pretrained(world / "policy").eval()
    vlm, tok = VLM.from_pretrained(world / "policy"), load_tokenizer(world / "policy")
    examples = sft.tokenize_examples(sft.read_sft_jsonl(str(world / "sft.jsonl")), tok, vlm.config, 256)
    input_ids, labels, mask = sft.collate(examples, vlm.config.pad_token_id)
    images = encode_images(vlm, [load_image(e["image"]) for e in examples], input_ids)
    assert images["image_sizes"].tolist() == [list(s) for s in SIZES]
    assert images["pixel_values"].shape[:2] == (4, 5)  # the tall image's 1 + 2x2 crops; the others zero-padded
    n_target = sft.count_targets(examples)
    for layers in ([2, 2, 2, 2], [1, 3, 2, -1]):
        with torch.no_grad():
            logits = vlm(input_ids, images["pixel_values"], layers, mask, logits_at=sft.target_positions(labels),
                         image_sizes=images["image_sizes"])
            ours = sft.sft_loss(logits, labels, n_target)
            ref = 0.0
            for i, e in enumerate(examples):
                n = len(e["input_ids"])
                out = hf(input_ids=input_ids[i:i + 1, :n], pixel_values=images["pixel_values"][i:i + 1],
                         image_sizes=images["image_sizes"][i:i + 1], labels=labels[i:i + 1, :n],
                         vision_feature_layer=layers[i])
                ref += out.loss.item() * sft.count_targets([e]) / n_target
        assert abs(ours.item() - ref) <= 1e-5, (layers, ours.item(), ref)
    # a batch of the wrong token counts is refused before any forward, naming the row and the image
    counts = [image_token_count(vlm.config, h, w) for h, w in SIZES]
    with pytest.raises(InputError, match=rf"encode_images: row 0 holds {counts[0]} image tokens, its 9x14 image "
                                         rf"needs {counts[3]} \(expand <image>"):
        encode_images(vlm, [load_image(e["image"]) for e in examples[::-1]], input_ids)


@pytest.mark.parametrize("image_layer", [2, [1, 3, -1]])
def test_sft_loss_falls_and_the_merged_folder_changes_only_the_language_model(world, tmp_path, monkeypatch, capsys,
                                                                            image_layer):
    from transformers import LlavaNextForConditionalGeneration
    seen = []
    original = VLM.vision_features

    def spy(self, pixel_values, layer=None, image_sizes=None):
        seen.append(([self.image_layer_index(l) for l in layer], image_sizes.tolist()))
        return original(self, pixel_values, layer, image_sizes)
    monkeypatch.setattr(VLM, "vision_features", spy)
    use_config(monkeypatch, init_from=str(world / "policy"), data=str(world / "sft.jsonl"), image_layer=image_layer,
               max_iters=25, out_dir=str(tmp_path / "out"), merge_at_end=True, merged_dir=str(tmp_path / "merged"))
    sft.main()
    losses = [float(x) for x in re.findall(r"iter \d+: loss ([0-9.]+)", capsys.readouterr().out)]
    assert len(losses) == 25 and sum(losses[-3:]) / 3 < 0.3 * sum(losses[:3]) / 3, losses
    # every micro-batch reached the tower with its examples' layers and their own images' sizes
    drawn = [sft.draw_layers(image_layer, 4, sft.seed, step) for step in range(25)]
    order = [sft.batch_indices(len(SIZES), step, 4, sft.seed) for step in range(25)]
    base, merged = VLM.from_pretrained(world / "policy"), VLM.from_pretrained(tmp_path / "merged")
    assert seen == [([base.image_layer_index(l) for l in d[m:m + 2]], [list(SIZES[i]) for i in o[m:m + 2]])
                    for d, o in zip(drawn, order) for m in (0, 2)]
    assert merged.config.image_grid_pinpoints == base.config.image_grid_pinpoints
    changed = {k.split(".")[0] for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed == {"language_model"}
    LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "merged")  # transformers reads it too


def test_compile_with_llava_next_is_refused_in_one_line(world, tmp_path, monkeypatch):
    use_config(monkeypatch, init_from=str(world / "policy"), data=str(world / "sft.jsonl"), compile=True,
               out_dir=str(tmp_path))
    with pytest.raises(InputError) as e:
        sft.main()
    assert "\n" not in str(e.value)
    assert re.fullmatch(r"compile=True with the LLaVA-NeXT checkpoint .*policy: each image's size sets its crops and "
                        r"image tokens, so every batch would compile anew; expected compile=False", str(e.value))


def test_the_llava_next_sft_config_runs_sft_py(world, tmp_path):
    """config/llava_next_sft_l5.py through sft.py's configurator, on the tiny world (whose tower has 4 layers, not 24,
    and whose machine is a CPU): every key is one sft.py knows, and the run merges a llava_next folder."""
    p = subprocess.run([sys.executable, "sft.py", "config/llava_next_sft_l5.py", f"--init_from={world / 'policy'}",
                        f"--data={world / 'sft.jsonl'}", "--image_layer=3", "--max_iters=1", "--batch_size=2",
                        "--gradient_accumulation_steps=2", "--device=cpu", "--dtype=float32",
                        f"--out_dir={tmp_path / 'out'}", f"--merged_dir={tmp_path / 'merged'}"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "iter 1: loss" in p.stdout
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "llava_next"
