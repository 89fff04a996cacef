"""model.py's LLaVA-NeXT against transformers' LlavaNextForConditionalGeneration: anyres crops, un-padding and
image_newline packing, the Mistral sliding window, every image layer, preprocessing, generation and key layouts.

Tolerance: max abs difference <= 1e-4 on logits (observed: exactly 0 in float32 on one thread).
Towers are 28 or 42 px with 7-px patches, so the base view is 16 or 36 tokens and the canvases are a few crops.
"""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import tiny
from model import (VLM, add_lora, anyres_grid, config_from_hf, encode_batch, image_token_count, left_pad,
                   load_tokenizer, lora_disabled, merge_lora, preprocess_anyres)
from test_model import maxdiff, one_line_error

TOL = 1e-4

# vicuna-like (Llama text), Mistral text with a window far shorter than the prompts, and a 42-px tower with other
# canvases (1x1, 1x3, 3x1 and 2x2 crops)
CONFIGS = {
    "llama": dict(),
    "mistral": dict(text="mistral", sliding_window=12),
    "pinpoints": dict(image_size=42, pinpoints=((42, 42), (42, 126), (126, 42), (84, 84)), layers=3, feature_layer=-1),
}
# (height, width): wide, tall, square, small, and one exactly on a canvas
SIZES = [(20, 50), (61, 33), (30, 30), (9, 14), (56, 28)]


def crops_of(vlm, sizes, seed=0):
    """Random pixel_values (B, most crops, 3, S, S); as in a processed batch, fewer crops are zero-padded."""
    g = torch.Generator().manual_seed(seed)
    n = [1 + math.prod(anyres_grid(vlm.config, h, w)) for h, w in sizes]
    S = vlm.config.vision.image_size
    pv = torch.randn(len(sizes), max(n), 3, S, S, generator=g)
    for i, k in enumerate(n):
        pv[i, k:] = 0
    return pv


def prompt_rows(vlm, sizes, seed=0):
    """[BOS, text..., the image's tokens..., text...] for each image size, text of different lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, (h, w) in enumerate(sizes):
        text = torch.randint(3, 100, (3 + 2 * i,), generator=g).tolist()
        rows.append([1] + text[:2] + [tiny.IMAGE_TOKEN] * image_token_count(vlm.config, h, w) + text[2:])
    return rows


def hf_layer(layer):
    """transformers' vision_feature_layer for our image_layer: transformers 5.24 ignores an int 0 (it is falsy), so
    layer 0 goes in as the one-element list [0], which selects the same hidden state."""
    return {} if layer is None else {"vision_feature_layer": [0] if layer == 0 else layer}


@pytest.fixture(scope="module", params=list(CONFIGS))
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny_next_{request.param}")
    hf = tiny.make_tiny_llava_next(path, **CONFIGS[request.param])
    return path, hf


def test_logits_match_transformers_llava_next_at_every_image_layer_and_aspect_ratio(ckpt):
    path, hf = ckpt
    vlm = VLM.from_pretrained(path)
    L = vlm.config.vision.num_hidden_layers
    sizes = SIZES
    pv, rows = crops_of(vlm, sizes), prompt_rows(vlm, sizes)
    # None and the checkpoint's default, the patch embeddings (0), an early layer, and a negative index (= layer 2)
    for layer in [None, vlm.config.vision_feature_layer, 0, 1, -(L - 1)]:
        for i, row in enumerate(rows):
            ids, size = torch.tensor([row]), torch.tensor([sizes[i]])
            with torch.no_grad():
                ours = vlm(ids, pixel_values=pv[i:i + 1], image_layer=layer, image_sizes=size)
                ref = hf(input_ids=ids, pixel_values=pv[i:i + 1], image_sizes=size, **hf_layer(layer)).logits
            assert maxdiff(ours, ref) <= TOL, (layer, sizes[i])


def test_left_padded_batch_of_different_sizes_equals_each_image_alone(ckpt):
    path, hf = ckpt
    vlm = VLM.from_pretrained(path)
    pv, rows = crops_of(vlm, SIZES, seed=1), prompt_rows(vlm, SIZES, seed=1)
    ids, mask = left_pad(rows, tiny.PAD_TOKEN)
    sizes = torch.tensor(SIZES)
    with torch.no_grad():
        batch = vlm(ids, pixel_values=pv, image_layer=1, attention_mask=mask, image_sizes=sizes)
        for i, row in enumerate(rows):
            alone = hf(input_ids=torch.tensor([row]), pixel_values=pv[i:i + 1], image_sizes=sizes[i:i + 1],
                       vision_feature_layer=1).logits
            assert maxdiff(batch[i, -len(row):], alone[0]) <= TOL


def test_the_sliding_window_is_applied_and_matters(tmp_path):
    hf = tiny.make_tiny_llava_next(tmp_path, **CONFIGS["mistral"])
    vlm = VLM.from_pretrained(tmp_path)
    assert vlm.config.text.sliding_window == 12
    rows = prompt_rows(vlm, SIZES[:1])
    assert len(rows[0]) > 3 * 12
    ids, pv, size = torch.tensor(rows), crops_of(vlm, SIZES[:1]), torch.tensor(SIZES[:1])
    with torch.no_grad():
        windowed = vlm(ids, pixel_values=pv, image_sizes=size)
        assert maxdiff(windowed, hf(input_ids=ids, pixel_values=pv, image_sizes=size).logits) <= TOL
        vlm.config.text.sliding_window = None
        assert maxdiff(vlm(ids, pixel_values=pv, image_sizes=size), windowed) > 1e-3


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_greedy_generation_equals_transformers_generate(tmp_path, name):
    hf = tiny.make_tiny_llava_next(tmp_path, **CONFIGS[name])
    vlm = VLM.from_pretrained(tmp_path)
    sizes = SIZES[:3]
    pv, rows = crops_of(vlm, sizes, seed=3), prompt_rows(vlm, sizes, seed=3)
    ids, mask = left_pad(rows, tiny.PAD_TOKEN)
    image_sizes = torch.tensor(sizes)
    ours, _ = vlm.generate(ids, mask, pixel_values=pv, image_layer=2, max_new_tokens=16, eos_token_id=2,
                           image_sizes=image_sizes)
    ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=image_sizes,
                      vision_feature_layer=2, do_sample=False, max_new_tokens=16, eos_token_id=2,
                      pad_token_id=tiny.PAD_TOKEN)
    assert ours.shape[1] >= 12
    assert torch.equal(ours, ref[:, ids.shape[1]:ids.shape[1] + ours.shape[1]])


def test_vision_features_are_the_crops_hidden_states_and_exit_early(ckpt):
    path, hf = ckpt
    vlm = VLM.from_pretrained(path)
    sizes = SIZES[:2]
    pv = crops_of(vlm, sizes)
    n = [1 + math.prod(anyres_grid(vlm.config, h, w)) for h, w in sizes]
    with torch.no_grad():
        ref = hf.model.vision_tower(torch.cat([pv[0, :n[0]], pv[1, :n[1]]]), output_hidden_states=True).hidden_states
    ran = []
    for i, block in enumerate(vlm.vision_tower.encoder.layers):
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    for layer in range(len(ref)):
        ran.clear()
        feats = vlm.vision_features(pv, layer, image_sizes=torch.tensor(sizes))
        assert feats.shape[0] == sum(n) and maxdiff(feats, ref[layer][:, 1:]) <= TOL
        assert ran == list(range(layer))
    mixed = vlm.vision_features(pv, [1, 2], image_sizes=torch.tensor(sizes))  # one layer per image, for all its crops
    assert maxdiff(mixed[:n[0]], ref[1][:n[0], 1:]) < 1e-5 and maxdiff(mixed[n[0]:], ref[2][n[0]:, 1:]) < 1e-5


def test_token_counts_and_packing_equal_transformers_at_llava_v1_6_scale(tmp_path):
    """The real geometry (336-px tower, 14-px patches, LlavaNextConfig's default canvases) over many image sizes:
    image_token_count equals the processor's count, and pack_anyres equals LlavaNextModel.pack_image_features."""
    from types import SimpleNamespace
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextModel, LlavaNextProcessor
    from model import pack_anyres
    hf_cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14))
    cfg = config_from_hf(hf_cfg.to_dict())
    tiny.make_tiny_tokenizer(tmp_path)
    proc = LlavaNextProcessor(image_processor=next_processor(cfg), tokenizer=load_tokenizer(tmp_path), patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(1, 2500, 2)) for _ in range(300)] + [(336, 672), (1, 1000), (480, 640)]
    for h, w in sizes:
        assert image_token_count(cfg, h, w) == proc._get_number_of_features(h, w, 336, 336) - 1, (h, w)
    newline = torch.randn(4)
    for h, w in sizes[::10]:
        crops = torch.randn(1 + math.prod(anyres_grid(cfg, h, w)), 576, 4)
        ref, _ = LlavaNextModel.pack_image_features(SimpleNamespace(config=hf_cfg), [crops], torch.tensor([[h, w]]),
                                                    "default", newline)
        assert torch.equal(pack_anyres(cfg, crops, [(h, w)], newline), ref[0]), (h, w)


def test_llava_v1_6_geometry_end_to_end_from_the_processor(tmp_path):
    """llava-v1.6's geometry at tiny width: a 336-px tower of 14-px patches, the default canvases, photos of real
    sizes through LlavaNextImageProcessor, ~2,000-token prompts; our logits equal transformers'."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    base = tiny.tiny_llava_next_config()
    vision = CLIPVisionConfig(**{**base.vision_config.to_dict(), "image_size": 336, "patch_size": 14})
    hf_cfg = LlavaNextConfig(vision_config=vision, text_config=base.text_config, image_token_index=tiny.IMAGE_TOKEN,
                             pad_token_id=tiny.PAD_TOKEN)
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(hf_cfg).save_pretrained(tmp_path)
    hf = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()  # random image_newline, saved and read
    vlm = VLM.from_pretrained(tmp_path)
    assert vlm.config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    for i, (h, w) in enumerate([(480, 640), (1000, 300)]):
        ref = next_processor(vlm.config)(images=random_image((h, w), seed=i), return_tensors="pt")
        n = image_token_count(vlm.config, h, w)
        ids = torch.tensor([[1, 5] + [tiny.IMAGE_TOKEN] * n + [6, 7]])
        with torch.no_grad():
            ours = vlm(ids, pixel_values=ref["pixel_values"], image_layer=3, image_sizes=ref["image_sizes"])
            theirs = hf(input_ids=ids, **ref, vision_feature_layer=3).logits
        assert n > 1500 and maxdiff(ours, theirs) <= TOL, (h, w)


# ---------------------------------------------------------------------------- preprocessing and prompts

def random_image(size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed + sum(size))
    return Image.fromarray(rng.integers(0, 256, (size[0], size[1], 4), dtype=np.uint8), "RGBA").convert(mode)


def next_processor(cfg):
    from transformers import LlavaNextImageProcessor
    S = cfg.vision.image_size
    return LlavaNextImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                   image_grid_pinpoints=cfg.image_grid_pinpoints)


@pytest.mark.parametrize("name", ["llama", "pinpoints"])
@pytest.mark.parametrize("size", SIZES + [(101, 29), (29, 150), (84, 84)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_preprocessing_equals_llava_next_image_processor(name, size, mode):
    cfg = config_from_hf(tiny.tiny_llava_next_config(**CONFIGS[name]).to_dict())
    img = random_image(size, mode)
    ref = next_processor(cfg)(images=img, return_tensors="pt")
    ours, image_size = preprocess_anyres(img, cfg.vision.image_size, cfg.image_grid_pinpoints)
    assert ours.shape == ref["pixel_values"][0].shape and ours.shape[0] == 1 + math.prod(anyres_grid(cfg, *size))
    assert image_size == tuple(ref["image_sizes"][0].tolist()) == size
    assert maxdiff(ours, ref["pixel_values"][0]) <= 1e-5


def test_encode_batch_equals_llava_next_processor_and_gives_transformers_logits(tmp_path):
    """Prompt ids (<image> expanded to each image's feature count), padded crops and image_sizes as the processor
    makes them; fed to both models, the same logits."""
    from transformers import LlavaNextProcessor
    hf = tiny.make_tiny_llava_next(tmp_path, **CONFIGS["mistral"])
    tiny.make_tiny_tokenizer(tmp_path)
    vlm, tok = VLM.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    images = [random_image(s, seed=i) for i, s in enumerate([(20, 50), (61, 33), (9, 14)])]
    prompts = ["w5 w6 w7", "w9", "w11 w12"]
    batch = encode_batch(tok, vlm.config, prompts, images)
    # llava-hf's processor_config.json sets num_additional_image_tokens=1 (the CLS token the "default" strategy drops)
    proc = LlavaNextProcessor(image_processor=next_processor(vlm.config), tokenizer=tok, patch_size=7,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    texts = [f"USER: <image>\n{p} ASSISTANT:" for p in prompts]
    ref = proc(images=images, text=texts, return_tensors="pt", padding=True)
    for i, (h, w) in enumerate([im.size[::-1] for im in images]):
        ours_row = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        assert torch.equal(ours_row, ref["input_ids"][i][ref["attention_mask"][i].bool()])
        assert int((ours_row == tiny.IMAGE_TOKEN).sum()) == image_token_count(vlm.config, h, w)
    assert torch.equal(batch["image_sizes"], ref["image_sizes"])
    assert maxdiff(batch["pixel_values"], ref["pixel_values"]) <= 1e-5
    with torch.no_grad():
        ours = vlm(**batch, image_layer=-3)
        for i in range(len(prompts)):
            row = batch["input_ids"][i:i + 1, batch["attention_mask"][i].bool()]
            alone = hf(input_ids=row, pixel_values=batch["pixel_values"][i:i + 1],
                       image_sizes=batch["image_sizes"][i:i + 1], vision_feature_layer=-3).logits
            assert maxdiff(ours[i, -row.shape[1]:], alone[0]) <= TOL


# ---------------------------------------------------------------------------- checkpoints, LoRA, value head

@pytest.mark.parametrize("layout", ["hub", "new", "sharded"])
def test_every_checkpoint_key_layout_loads_and_save_pretrained_round_trips(tmp_path, layout):
    hf = tiny.make_tiny_llava_next(tmp_path / "in", **CONFIGS["mistral"])
    tiny.rewrite_layout(tmp_path / "in", "new" if layout == "new" else "llava-hf")
    if layout == "sharded":
        tiny.shard(tmp_path / "in")
    keys = set()
    for f in os.listdir(tmp_path / "in"):
        if f.endswith(".safetensors"):
            keys |= set(load_file(tmp_path / "in" / f))
    assert ("model.image_newline" in keys) == (layout == "new") and ("image_newline" in keys) == (layout != "new")
    vlm = VLM.from_pretrained(tmp_path / "in")
    pv, rows = crops_of(vlm, SIZES[:1]), prompt_rows(vlm, SIZES[:1])
    ids, size = torch.tensor(rows), torch.tensor(SIZES[:1])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pv, image_sizes=size, vision_feature_layer=1).logits
        assert maxdiff(vlm(ids, pixel_values=pv, image_layer=1, image_sizes=size), ref) <= TOL
    vlm.save_pretrained(tmp_path / "out")
    from transformers import LlavaNextForConditionalGeneration
    back = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert back.config.text_config.sliding_window == 12
    assert back.config.image_grid_pinpoints == hf.config.image_grid_pinpoints
    ours_again = VLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert maxdiff(back(input_ids=ids, pixel_values=pv, image_sizes=size, vision_feature_layer=1).logits, ref) == 0
        assert maxdiff(ours_again(ids, pixel_values=pv, image_layer=1, image_sizes=size), ref) <= TOL


def test_lora_value_head_and_merge_work_on_llava_next(tmp_path):
    tiny.make_tiny_llava_next(tmp_path, **CONFIGS["mistral"])
    vlm = VLM.from_pretrained(tmp_path)
    pv, rows = crops_of(vlm, SIZES[:2]), prompt_rows(vlm, SIZES[:2])
    ids, mask = left_pad(rows, tiny.PAD_TOKEN)
    kw = dict(pixel_values=pv, attention_mask=mask, image_sizes=torch.tensor(SIZES[:2]))
    with torch.no_grad():
        base = vlm(ids, **kw)
        add_lora(vlm, targets=("q_proj", "v_proj"), r=4, alpha=8)
        vlm.add_value_head()
        assert maxdiff(vlm(ids, **kw), base) == 0
        for name, p in vlm.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.2)
        logits, hidden = vlm(ids, **kw, return_hidden=True)
        assert maxdiff(logits, base) > 1e-3 and vlm.values(hidden).shape == ids.shape
        with lora_disabled(vlm):
            assert maxdiff(vlm(ids, **kw), base) == 0
        merge_lora(vlm)
        assert maxdiff(vlm(ids, **kw), logits) <= TOL


# ---------------------------------------------------------------------------- bad input: one clear line each

def test_full_strategy_and_bad_pinpoints_are_refused(tmp_path):
    hf = tiny.make_tiny_llava_next(tmp_path, strategy="full")
    with pytest.raises(RuntimeError):  # transformers cannot pack the CLS token into the crop grid either
        hf.model.get_image_features(torch.zeros(1, 3, 3, 28, 28), torch.tensor([[20, 50]]))
    one_line_error(VLM.from_pretrained, tmp_path, match="vision_feature_select_strategy 'full' with model_type "
                                                        "'llava_next', expected 'default'")
    tiny.make_tiny_llava_next(tmp_path, pinpoints=((28, 50),))
    one_line_error(VLM.from_pretrained, tmp_path, match=r"image_grid_pinpoints \[\[28, 50\]\], expected .* multiple "
                                                        "of vision_config.image_size 28")


def test_missing_image_sizes_and_wrong_token_count_are_named(tmp_path):
    tiny.make_tiny_llava_next(tmp_path)
    vlm = VLM.from_pretrained(tmp_path)
    pv, rows = crops_of(vlm, SIZES[:1]), prompt_rows(vlm, SIZES[:1])
    one_line_error(vlm, torch.tensor(rows), pixel_values=pv, match="LLaVA-NeXT takes pixel_values .* no image_sizes")
    one_line_error(vlm, torch.tensor(rows), pixel_values=pv, image_sizes=torch.tensor([(61, 33)]),
                   match=r"needs 5 crops, pixel_values has 3")
    one_image_token_less = rows[0][:3] + rows[0][4:]
    one_line_error(vlm, torch.tensor([one_image_token_less]), pixel_values=pv, image_sizes=torch.tensor(SIZES[:1]),
                   match=r"image tokens, expected \d+ for images of sizes \[\[20, 50\]\]")


# ---------------------------------------------------------------------------- the stages on a NeXT checkpoint

def test_extract_keeps_every_crop_and_scores_the_tokens_the_lm_reads(tmp_path, monkeypatch):
    import json
    from safetensors import safe_open
    import extract
    from model import load_image
    tiny.make_tiny_llava_next(tmp_path / "vlm", layers=3)
    (tmp_path / "images").mkdir()
    sizes = [(20, 50), (61, 33), (30, 30), (9, 14)]
    for i, (h, w) in enumerate(sizes):
        random_image((h, w), seed=i).save(tmp_path / "images" / f"{i}.png")
    for k, v in dict(init_from=str(tmp_path / "vlm"), image_dir=str(tmp_path / "images"), out_dir=str(tmp_path / "out"),
                     batch_size=3, device="cpu", dtype="float32", save_dtype="float32", limit=0).items():
        monkeypatch.setattr(extract, k, v)
    extract.main()

    vlm = VLM.from_pretrained(tmp_path / "vlm")
    images = [load_image(tmp_path / "images" / f"{i}.png") for i in range(len(sizes))]
    batch = encode_batch(tiny.make_tiny_tokenizer(tmp_path / "vlm"), vlm.config, ["w5"] * len(images), images)
    with safe_open(str(tmp_path / "out" / "features.safetensors"), "pt") as f:
        crops = json.loads(f.metadata()["crops_per_image"])
        assert crops == [1 + math.prod(anyres_grid(vlm.config, h, w)) for h, w in sizes]
        for layer in range(4):
            ours = vlm.vision_features(batch["pixel_values"], layer, image_sizes=batch["image_sizes"])
            assert maxdiff(f.get_tensor(f"layer_{layer}"), ours) <= 1e-5
    stats = json.loads((tmp_path / "out" / "statistics.json").read_text())
    # the tokens scored are the image tokens of the prompts but the image_newlines, one per grid row
    with torch.no_grad():
        packed = vlm.embed(batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"])
    packed = packed[batch["input_ids"] == tiny.IMAGE_TOKEN]
    newlines = int((packed == vlm.image_newline).all(-1).sum())
    assert stats["fit_tokens"] + stats["scored_tokens"] == len(packed) - newlines
    assert stats["layers"][2]["cos_default"] == pytest.approx(1.0)


def test_evaluate_generates_each_layer_as_the_model_does_alone(tmp_path, monkeypatch):
    import json
    import evaluate
    from model import load_image
    tiny.make_tiny_llava_next(tmp_path / "vlm", layers=3, **CONFIGS["mistral"])
    tiny.make_tiny_tokenizer(tmp_path / "vlm")
    (tmp_path / "images").mkdir()
    for i, size in enumerate([(20, 50), (61, 33)]):
        random_image(size, seed=i).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "cp.jsonl").write_text("".join(json.dumps({"image": f"images/{i}.png", "prompt": p}) + "\n"
                                               for i, p in enumerate(["w5 w6 w7", "w8 w9"])))
    for k, v in dict(init_from=str(tmp_path / "vlm"), data_path=str(tmp_path / "cp.jsonl"), max_new_tokens=4,
                     batch_size=3, device="cpu", dtype="float32", out_dir=str(tmp_path / "out")).items():
        monkeypatch.setattr(evaluate, k, v)
    evaluate.main()
    rows = [json.loads(line) for line in (tmp_path / "out" / "responses.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["layer"]) for r in rows) == sorted((f"cp:{n}", l) for n in (1, 2) for l in (1, 2, 3))
    vlm, tok = VLM.from_pretrained(tmp_path / "vlm"), load_tokenizer(tmp_path / "vlm")
    for row in rows:
        enc = encode_batch(tok, vlm.config, [row["prompt"]], [load_image(tmp_path / "out" / row["image"])])
        tokens, _ = vlm.generate(**enc, image_layer=row["layer"], max_new_tokens=4, eos_token_id=tok.eos_token_id)
        assert row["response"] == evaluate.decode_until_eos(tok, tokens, [tok.eos_token_id])[0]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [g["layers"] for g in summary["groups"]] == ["1-1", "2-2", "3-3", ""]


def test_lppo_scores_a_next_rollout_as_it_was_sampled(tmp_path):
    """L-PPO's response_forward (old, reference and new logprobs) on a NeXT rollout: image_sizes travel in the
    rollout, and the sampled tokens get the logprobs they were drawn with."""
    import lppo
    from model import first_eos_mask
    tiny.make_tiny_llava_next(tmp_path, **CONFIGS["mistral"])
    tiny.make_tiny_tokenizer(tmp_path)
    vlm, tok = VLM.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    add_lora(vlm, targets=("q_proj", "v_proj"), r=4, alpha=8)
    vlm.add_value_head()
    ro = encode_batch(tok, vlm.config, ["w5 w6", "w7"], [random_image((20, 50)), random_image((61, 33), seed=1)])
    ro["layers"] = torch.tensor([1, 3])
    tokens, sampled = vlm.generate(ro["input_ids"], ro["attention_mask"], ro["pixel_values"], ro["layers"], 8, 1.0,
                                   eos_token_id=2, image_sizes=ro["image_sizes"], return_logprobs=True,
                                   generator=torch.Generator().manual_seed(0))
    ro["mask"], _ = first_eos_mask(tokens, 2)
    ro["tokens"] = tokens.masked_fill(ro["mask"] == 0, tiny.PAD_TOKEN)
    with torch.no_grad():
        logprobs, _, values = lppo.response_forward(vlm, ro, 1.0)
    assert maxdiff(logprobs * ro["mask"], sampled * ro["mask"]) <= TOL and values.shape == tokens.shape
