"""model.py against transformers: every module, every image layer, every key layout, in float32.

Tolerance: max abs difference <= 1e-4 on logits and hidden states (observed differences are ~1e-6 or exactly 0).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import model
import tiny
from common import InputError
from model import (VLM, add_lora, encode_batch, load_image, load_lora, load_tokenizer, lora_disabled, merge_lora,
                   preprocess_image, save_lora)

TOL = 1e-4

ROOT = Path(__file__).resolve().parents[1]


def pixels(n=2, seed=0, size=28):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def prompt_ids(n_text=(5, 3), seed=0, strategy="default"):
    """Rows of [BOS, text..., image tokens..., text...] with different lengths, as a list of id lists."""
    g = torch.Generator().manual_seed(seed)
    n_img = 16 + (strategy == "full")
    rows = []
    for n in n_text:
        text = torch.randint(3, 100, (n + 2,), generator=g).tolist()
        rows.append([1] + text[:n] + [tiny.IMAGE_TOKEN] * n_img + text[n:])
    return rows


def maxdiff(a, b):
    d = (a.float() - b.float()).abs().max().item()
    if os.environ.get("PARITY_LOG"):  # the closing note's per-test numbers: PARITY_LOG=file pytest tests/test_model.py
        with open(os.environ["PARITY_LOG"], "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "max_abs_diff": d}) + "\n")
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    hf = tiny.make_tiny_llava(path)
    tiny.make_tiny_tokenizer(path)
    return path, hf


def test_clip_hidden_state_matches_transformers_at_every_layer(ckpt):
    path, hf = ckpt
    vlm = VLM.from_pretrained(path)
    pv = pixels()
    with torch.no_grad():
        ref = hf.model.vision_tower(pv, output_hidden_states=True).hidden_states
        L = vlm.config.vision.num_hidden_layers
        assert len(ref) == L + 1
        for layer in range(-(L + 1), L + 1):
            ours = vlm.vision_tower(pv, {layer % (L + 1)})[layer % (L + 1)]
            assert maxdiff(ours, ref[layer]) <= TOL, layer
            assert maxdiff(vlm.vision_features(pv, layer), ref[layer][:, 1:]) <= TOL, layer


def test_early_exit_runs_only_the_first_l_blocks(ckpt):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    ran = []
    for i, block in enumerate(vlm.vision_tower.encoder.layers):
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    for layer in range(0, 5):
        ran.clear()
        vlm.vision_features(pixels(), layer)
        assert ran == list(range(layer))


@pytest.mark.parametrize("gqa", [True, False])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_logits_match_transformers_llava_at_several_image_layers(tmp_path, gqa, strategy):
    hf = tiny.make_tiny_llava(tmp_path, gqa=gqa, strategy=strategy)
    vlm = VLM.from_pretrained(tmp_path)
    ids = torch.tensor(prompt_ids((4, 4), strategy=strategy))
    pv = pixels()
    # layer 0 is covered by -5 (= 0 for a 4-layer tower): transformers 5.24 fails on vision_feature_layer=0 itself
    for layer in [1, 2, -2, 4, -5]:
        with torch.no_grad():
            ref = hf(input_ids=ids, pixel_values=pv, vision_feature_layer=layer).logits
            ours = vlm(ids, pixel_values=pv, image_layer=layer)
        assert maxdiff(ours, ref) <= TOL, (layer, maxdiff(ours, ref))
    # None means the checkpoint's own vision_feature_layer (-2)
    with torch.no_grad():
        assert maxdiff(vlm(ids, pixel_values=pv), hf(input_ids=ids, pixel_values=pv).logits) <= TOL


@pytest.mark.parametrize("layout", ["llava-hf", "new", "sharded"])
def test_every_checkpoint_key_layout_loads_to_the_same_logits(tmp_path, layout):
    hf = tiny.make_tiny_llava(tmp_path)
    tiny.rewrite_layout(tmp_path, "new" if layout == "new" else "llava-hf")
    if layout == "sharded":
        tiny.shard(tmp_path)
    keys = set()
    for f in os.listdir(tmp_path):
        if f.endswith(".safetensors"):
            keys |= set(load_file(tmp_path / f))
    assert ("model.language_model.norm.weight" in keys) == (layout == "new")
    assert ("vision_tower.vision_model.pre_layrnorm.weight" in keys) == (layout != "new")
    vlm = VLM.from_pretrained(tmp_path)
    ids, pv = torch.tensor(prompt_ids((4, 4))), pixels()
    with torch.no_grad():
        assert maxdiff(vlm(ids, pixel_values=pv, image_layer=1),
                       hf(input_ids=ids, pixel_values=pv, vision_feature_layer=1).logits) <= TOL


def test_tied_embeddings_and_llama3_rope_match_transformers(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    hf = tiny.make_tiny_llava(tmp_path, tie=True, rope=rope)
    vlm = VLM.from_pretrained(tmp_path)
    assert vlm.lm_head.weight is vlm.language_model.embed_tokens.weight
    ids, pv = torch.tensor(prompt_ids((30, 30))), pixels()  # long enough to reach the rescaled frequencies
    with torch.no_grad():
        assert maxdiff(vlm(ids, pixel_values=pv), hf(input_ids=ids, pixel_values=pv).logits) <= TOL


def test_left_padded_batch_equals_each_prompt_alone(ckpt):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    rows = prompt_ids((9, 2))
    from model import left_pad
    ids, mask = left_pad(rows, tiny.PAD_TOKEN)
    pv = pixels()
    with torch.no_grad():
        batch = vlm(ids, pixel_values=pv, image_layer=1, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = vlm(torch.tensor([row]), pixel_values=pv[i:i + 1], image_layer=1)
            assert maxdiff(batch[i, -len(row):], alone[0]) <= TOL


def test_per_image_layers_equal_one_layer_at_a_time(ckpt):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    pv = pixels(3)
    mixed = vlm.vision_features(pv, [1, 4, -2])
    # float32: a batch of 3 and a batch of 1 may take different BLAS paths (2.4e-7 apart with 2 threads)
    for i, layer in enumerate([1, 4, -2]):
        assert maxdiff(mixed[i], vlm.vision_features(pv[i:i + 1], layer)[0]) < 1e-5
    assert maxdiff(mixed[0], vlm.vision_features(pv[:1], 4)[0]) > 1e-2  # and the layers really differ


def test_greedy_generation_equals_transformers_generate(ckpt):
    path, hf = ckpt
    vlm = VLM.from_pretrained(path)
    rows = prompt_ids((6, 2), seed=3)
    from model import left_pad
    ids, mask = left_pad(rows, tiny.PAD_TOKEN)
    pv = pixels(seed=3)
    ours, _ = vlm.generate(ids, mask, pixel_values=pv, image_layer=2, max_new_tokens=20, eos_token_id=2)
    ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, vision_feature_layer=2, do_sample=False,
                      max_new_tokens=20, eos_token_id=2, pad_token_id=tiny.PAD_TOKEN)
    assert ours.shape[1] >= 16
    assert torch.equal(ours, ref[:, ids.shape[1]:ids.shape[1] + ours.shape[1]])
    for i, row in enumerate(rows):  # each prompt alone gives the same tokens
        alone, _ = vlm.generate(torch.tensor([row]), pixel_values=pv[i:i + 1], image_layer=2, max_new_tokens=20,
                                eos_token_id=2)
        n = alone.shape[1]
        assert torch.equal(alone[0], ours[i, :n])


def test_generation_stops_each_row_at_eos_and_pads_after_it(ckpt):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    rows = prompt_ids((6, 2), seed=5)
    from model import left_pad
    ids, mask = left_pad(rows, tiny.PAD_TOKEN)
    free, _ = vlm.generate(ids, mask, pixel_values=pixels(), max_new_tokens=12)
    eos = int(free[0, 3])  # pretend the 4th greedy token of row 0 is EOS
    toks, _ = vlm.generate(ids, mask, pixel_values=pixels(), max_new_tokens=12, eos_token_id=eos)
    first = (free[0] == eos).nonzero()[0].item()
    assert toks[0, first] == eos and (toks[0, first + 1:] == tiny.PAD_TOKEN).all()


def test_sampled_logprobs_equal_training_forward_logprobs(ckpt):
    """Rollout and training must score a sampled token identically, temperature included."""
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    rows = prompt_ids((6, 2), seed=1)
    from model import left_pad
    ids, mask = left_pad(rows, tiny.PAD_TOKEN)
    pv = pixels()
    for temperature, top_p in [(0.7, 1.0), (1.3, 0.9), (0.0, 1.0)]:
        g = torch.Generator().manual_seed(0)
        toks, lps = vlm.generate(ids, mask, pixel_values=pv, image_layer=1, max_new_tokens=10,
                                 temperature=temperature, top_p=top_p, return_logprobs=True, generator=g)
        full = torch.cat([ids, toks], 1)
        full_mask = torch.cat([mask, torch.ones_like(toks)], 1)
        with torch.no_grad():
            logits = vlm(full, pixel_values=pv, image_layer=1, attention_mask=full_mask)
        logits = logits.index_fill(-1, torch.tensor([tiny.IMAGE_TOKEN]), float("-inf"))  # as response_logits
        logits = logits[:, ids.shape[1] - 1:-1] / (temperature or 1.0)
        ref = torch.log_softmax(logits.float(), -1).gather(-1, toks[..., None])[..., 0]
        assert maxdiff(lps, ref) <= TOL


def test_sampling_is_reproducible_under_a_seeded_generator(ckpt):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    ids = torch.tensor(prompt_ids((4,)))
    a, _ = vlm.generate(ids, pixel_values=pixels(1), temperature=1.0, max_new_tokens=8,
                        generator=torch.Generator().manual_seed(7))
    b, _ = vlm.generate(ids, pixel_values=pixels(1), temperature=1.0, max_new_tokens=8,
                        generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------- LoRA and the value head

def test_fresh_adapters_leave_outputs_unchanged_and_disabled_adapters_give_the_base_model(ckpt):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    ids, pv = torch.tensor(prompt_ids((4,))), pixels(1)
    with torch.no_grad():
        base = vlm(ids, pixel_values=pv)
        add_lora(vlm, targets=("q_proj", "v_proj", "gate_proj"), r=4, alpha=8)
        assert maxdiff(vlm(ids, pixel_values=pv), base) == 0
        for name, p in vlm.named_parameters():
            if "lora_B" in name:
                p.normal_()
        changed = vlm(ids, pixel_values=pv)
        assert maxdiff(changed, base) > 1e-3
        with lora_disabled(vlm):
            assert maxdiff(vlm(ids, pixel_values=pv), base) == 0
        assert maxdiff(vlm(ids, pixel_values=pv), changed) == 0


def test_merged_adapters_equal_unmerged_and_save_load_round_trips(ckpt, tmp_path):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    add_lora(vlm, targets=("q_proj", "k_proj", "down_proj"), r=4, alpha=16)
    vlm.add_value_head()
    with torch.no_grad():
        for name, p in vlm.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    ids, pv = torch.tensor(prompt_ids((4,))), pixels(1)
    with torch.no_grad():
        unmerged, hidden = vlm(ids, pixel_values=pv, return_hidden=True)
        values = vlm.values(hidden)
    save_lora(vlm, tmp_path / "adapter.safetensors")
    other = load_lora(VLM.from_pretrained(path), tmp_path / "adapter.safetensors")
    with torch.no_grad():
        logits, hidden = other(ids, pixel_values=pv, return_hidden=True)
        assert maxdiff(logits, unmerged) == 0 and maxdiff(other.values(hidden), values) == 0
        merge_lora(vlm)
        assert not any("lora" in n for n, _ in vlm.named_parameters())
        assert maxdiff(vlm(ids, pixel_values=pv), unmerged) <= TOL


def test_only_lora_and_value_head_parameters_require_grad(ckpt):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    vlm.add_value_head()
    add_lora(vlm, targets=("q_proj", "v_proj"))
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("value_head.") for n in trainable)
    assert {"value_head.weight", "value_head.bias"} <= trainable
    assert sum(".lora_A" in n for n in trainable) == 2 * vlm.config.text.num_hidden_layers


def test_value_head_runs_in_float32_on_a_bfloat16_model(ckpt):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path, dtype=torch.bfloat16)
    vlm.add_value_head()
    _, hidden = vlm(torch.tensor(prompt_ids((4,))), pixel_values=pixels(1), return_hidden=True)
    assert hidden.dtype == torch.bfloat16 and vlm.values(hidden).dtype == torch.float32


def test_save_pretrained_is_read_back_by_transformers(ckpt, tmp_path):
    path, hf = ckpt
    from transformers import LlavaForConditionalGeneration
    vlm = VLM.from_pretrained(path)
    vlm.save_pretrained(tmp_path / "out")
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids, pv = torch.tensor(prompt_ids((4,))), pixels(1)
    with torch.no_grad():
        assert maxdiff(back(input_ids=ids, pixel_values=pv).logits, hf(input_ids=ids, pixel_values=pv).logits) == 0


# ---------------------------------------------------------------------------- tokenizer, prompt, images

def test_prompt_is_llava_template_with_image_tokens_expanded(ckpt):
    path, _ = ckpt
    vlm, tok = VLM.from_pretrained(path), load_tokenizer(path)
    batch = encode_batch(tok, vlm.config, ["w5 w6 w7", "w9"], images=[Image.new("RGB", (30, 40))] * 2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 1 + 1 + 16 + 3 + 1) and mask[1].tolist()[:2] == [0, 0]
    assert ids[0].tolist() == [1, 100] + [tiny.IMAGE_TOKEN] * 16 + [5, 6, 7, 101]
    assert (ids[1, :2] == tiny.PAD_TOKEN).all()
    assert batch["pixel_values"].shape == (2, 3, 28, 28)


def test_chat_template_is_used_when_the_tokenizer_has_one(tmp_path):
    tiny.make_tiny_llava(tmp_path)
    tiny.make_tiny_tokenizer(tmp_path, chat_template="{% for m in messages %}w10 {{ m['content'] }} w11{% endfor %}"
                                                     "{% if add_generation_prompt %} w12{% endif %}")
    vlm, tok = VLM.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    ids = encode_batch(tok, vlm.config, ["w5"], images=[Image.new("RGB", (28, 28))])["input_ids"]
    assert ids[0].tolist() == [10] + [tiny.IMAGE_TOKEN] * 16 + [5, 11, 12]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA"])
@pytest.mark.parametrize("size", [(37, 53), (101, 29), (28, 28)])
def test_preprocessing_equals_clip_image_processor(mode, size):
    from transformers import CLIPImageProcessor
    proc = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    rng = np.random.default_rng(sum(size))
    arr = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA").convert(mode)
    ref = proc(images=img, return_tensors="pt")["pixel_values"][0]
    ours = preprocess_image(img, 24)
    assert ours.shape == ref.shape == (3, 24, 24)
    assert maxdiff(ours, ref) <= 1e-5


def test_pad_to_square_centres_the_image_on_the_mean_colour():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    x = preprocess_image(img, 20, pad_to_square=True)
    mean_pixel = preprocess_image(Image.new("RGB", (4, 4), (122, 116, 104)), 20)[:, 0, 0]
    assert torch.allclose(x[:, 0, 10], mean_pixel, atol=1e-2)  # top band: padding
    assert torch.allclose(x[:, 10, 10], preprocess_image(img, 20)[:, 10, 10], atol=1e-2)  # middle: the image


# ---------------------------------------------------------------------------- bad input: one clear line each

def one_line_error(fn, *args, match, **kw):
    with pytest.raises(InputError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_folder_config_and_shard_are_named(tmp_path, ckpt):
    one_line_error(VLM.from_pretrained, tmp_path / "nope", match="not found")
    one_line_error(VLM.from_pretrained, tmp_path, match="config.json: file not found")
    tiny.make_tiny_llava(tmp_path)
    tiny.shard(tmp_path)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    one_line_error(VLM.from_pretrained, tmp_path, match="shard model-00002-of-00002.safetensors is listed but missing")


def test_offline_hub_id_says_what_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = one_line_error(VLM.from_pretrained, "llava-hf/llava-1.5-7b-hf", match="hf download llava-hf/llava-1.5-7b-hf")
    assert "--local-dir" in msg


def test_unsupported_model_type_is_refused(tmp_path):
    tiny.make_tiny_llava(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    one_line_error(VLM.from_pretrained, tmp_path, match="model_type is 'qwen2_vl', expected 'llava' or 'llava_next'")


def test_missing_unexpected_and_misshapen_weights_are_listed(tmp_path):
    tiny.make_tiny_llava(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    norm = "language_model.model.norm.weight"
    save_file({k: v for k, v in sd.items() if k != norm}, f)
    one_line_error(VLM.from_pretrained, tmp_path, match=f"missing weights language_model.norm.weight")
    save_file({**sd, "language_model.model.extra.weight": torch.zeros(2)}, f)
    one_line_error(VLM.from_pretrained, tmp_path, match="unexpected weights language_model.model.extra.weight")
    save_file({**sd, norm: torch.zeros(7)}, f)
    one_line_error(VLM.from_pretrained, tmp_path, match=r"norm.weight has shape \(7,\), expected \(48,\)")


def test_corrupt_safetensors_is_named(tmp_path):
    tiny.make_tiny_llava(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    one_line_error(VLM.from_pretrained, tmp_path, match="model.safetensors: not a readable safetensors file")


def test_unreadable_image_and_out_of_range_layer_are_named(tmp_path, ckpt):
    one_line_error(load_image, tmp_path / "missing.png", match="missing.png: image file not found")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    one_line_error(load_image, tmp_path / "bad.png", match="bad.png: not a readable image")
    vlm = VLM.from_pretrained(ckpt[0])
    one_line_error(vlm.vision_features, pixels(), 5, match=r"image layer 5 is out of range .* \(expected -5..4")
    one_line_error(vlm.vision_features, pixels(), -6, match="out of range")


def test_peft_adapter_folder_loads_in_transformers_and_peft_with_the_same_logits(ckpt, tmp_path):
    """Users of transformers + peft get exactly our policy from the adapter folder lppo.py writes."""
    from peft import PeftModel
    from model import save_peft_adapter
    path, hf = ckpt
    vlm = VLM.from_pretrained(path)
    add_lora(vlm, targets=("q_proj", "v_proj", "down_proj"), r=4, alpha=8)
    with torch.no_grad():
        for name, p in vlm.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.2)
    save_peft_adapter(vlm, tmp_path / "peft", base_model=str(path))
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj")) and "lora" not in n]
    assert adapted and all("language_model" in n for n in adapted if hasattr(peft_model.get_submodule(n), "lora_A"))
    ids, pv = torch.tensor(prompt_ids((4,))), pixels(1)
    with torch.no_grad():
        ours = vlm(ids, pixel_values=pv, image_layer=2)
        ref = peft_model(input_ids=ids, pixel_values=pv, vision_feature_layer=2).logits
    assert maxdiff(ours, ref) <= TOL
    base_vlm = VLM.from_pretrained(path)
    with torch.no_grad():
        assert maxdiff(base_vlm(ids, pixel_values=pv, image_layer=2), ours) > 1e-3  # the adapter really acts


def test_the_image_placeholder_is_never_generated(ckpt):
    """A sampled <image> id would be filled with image features in the next forward pass: it is suppressed."""
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    head = torch.nn.Linear(48, tiny.VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(vlm.lm_head.weight)
        head.bias.zero_()
        head.bias[tiny.IMAGE_TOKEN] = 1e4  # without suppression every token would be <image>
    vlm.lm_head = head
    ids = torch.tensor(prompt_ids((4,)))
    for temperature in (0.0, 1.0):
        toks, lps = vlm.generate(ids, pixel_values=pixels(1), max_new_tokens=6, temperature=temperature,
                                 return_logprobs=True, generator=torch.Generator().manual_seed(0))
        assert (toks != tiny.IMAGE_TOKEN).all() and torch.isfinite(lps).all()


def test_saved_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    """Checkpoints are written to a temp file and renamed; the temp file's private 0600 mode must not leak."""
    import stat
    from common import atomic_save_safetensors, replace_dir
    mask = os.umask(0o022)
    try:
        atomic_save_safetensors({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
        folder = tmp_path / "tmpdir"
        folder.mkdir(mode=0o700)
        replace_dir(str(folder), str(tmp_path / "done"))
    finally:
        os.umask(mask)
    assert stat.S_IMODE(os.stat(tmp_path / "a.safetensors").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "done").st_mode) == 0o755


def test_logits_at_selected_positions_equal_the_full_logits_there(ckpt):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    ids, pv = torch.tensor(prompt_ids((4,)) * 2), pixels(2)
    at = torch.zeros(ids.shape, dtype=torch.bool)
    at[0, -3:], at[1, -1] = True, True
    with torch.no_grad():
        full, some = vlm(ids, pixel_values=pv), vlm(ids, pixel_values=pv, logits_at=at)
    assert some.shape == (4, full.shape[-1]) and maxdiff(some, full[at]) == 0


def test_a_ctrl_c_after_the_rename_leaves_the_new_file_and_no_error_about_the_temp_file(tmp_path, monkeypatch):
    import common
    real_replace = os.replace

    def replace_then_interrupt(src, dst):  # the signal lands right after the rename succeeded
        real_replace(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(common.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        common.atomic_save_safetensors({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    monkeypatch.undo()
    assert torch.equal(load_file(tmp_path / "a.safetensors")["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["a.safetensors"]


@pytest.mark.parametrize("errno_, words", [(28, "No space left on device"), (30, "Read-only file system")])
def test_a_failed_write_is_one_line_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, errno_, words):
    import common
    path = tmp_path / "a.safetensors"
    common.atomic_save_safetensors({"w": torch.ones(2)}, str(path))

    def half_written(tensors, filename, metadata=None):  # a disk that fills up halfway through the file
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr("safetensors.torch.save_file", half_written)
    with pytest.raises(InputError) as e:
        common.atomic_save_safetensors({"w": torch.zeros(2)}, str(path))
    assert str(e.value) == f"{path}: could not be written ({words}); the previous version, if any, is untouched"
    assert torch.equal(load_file(path)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_a_failed_folder_save_leaves_the_old_folder_and_no_temp_folder(ckpt, tmp_path, monkeypatch):
    import model
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    vlm.save_pretrained(str(tmp_path / "out"))
    before = sorted(os.listdir(tmp_path / "out"))
    monkeypatch.setattr(model, "config_to_hf", lambda cfg: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(InputError, match="out: could not be written"):
        vlm.save_pretrained(str(tmp_path / "out"))
    assert os.listdir(tmp_path) == ["out"] and sorted(os.listdir(tmp_path / "out")) == before


def test_check_writable_dir_refuses_a_file_and_an_unwritable_folder(tmp_path, monkeypatch):
    import common
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="is a file; expected a folder"):
        common.check_writable_dir(str(tmp_path / "f"))
    common.check_writable_dir(str(tmp_path / "new" / "deeper"))  # created on the way
    assert os.listdir(tmp_path / "new" / "deeper") == []

    def read_only(*args, **kwargs):  # root ignores chmod, so the refusal is simulated
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(common.tempfile, "mkstemp", read_only)
    with pytest.raises(InputError, match=r"is not writable \(Read-only file system\)"):
        common.check_writable_dir(str(tmp_path))


# -----------------------------------------------------------------------------
# The speed path (model.speed_up, which from_pretrained calls) against the plain modules of the reading path

def test_the_speed_path_computes_what_the_plain_modules_compute(ckpt):
    """speed_up changes how, not what: generated tokens and their logprobs, logits, and a LoRA step's gradients of
    from_pretrained's model equal those of the plain modules (fast=False), up to float32 rounding."""
    from model import FastVLM, left_pad
    path, _ = ckpt
    ids, mask = left_pad(prompt_ids((5, 3, 7), seed=1), tiny.PAD_TOKEN)
    pv = pixels(3, seed=1)
    runs = []
    for fast in (True, False):
        torch.manual_seed(0)
        vlm = VLM.from_pretrained(path, fast=fast)
        assert isinstance(vlm, FastVLM) == fast and (type(vlm.lm_head) is torch.nn.Linear) != fast
        tokens, logprobs = vlm.generate(ids, mask, pixel_values=pv, image_layer=2, max_new_tokens=8, temperature=1.0,
                                        return_logprobs=True, generator=torch.Generator().manual_seed(0))
        add_lora(vlm, targets=("q_proj", "v_proj", "up_proj"), r=4, alpha=8)
        with torch.no_grad():
            for name, p in vlm.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
        logits = vlm(ids, pixel_values=pv, image_layer=[1, 2, 3], attention_mask=mask)
        logits[mask.bool()].logsumexp(-1).sum().backward()
        runs.append([tokens, logprobs, logits] + [p.grad for p in vlm.parameters() if p.requires_grad])
    assert torch.equal(runs[0][0], runs[1][0]) and len(runs[0]) == 3 + 3 * 2 * 2
    for ours, ref in zip(runs[0][1:], runs[1][1:]):
        assert maxdiff(ours, ref) <= TOL


# -----------------------------------------------------------------------------
# The oneDNN path of every linear layer on the CPU (model.linear)

needs_onednn = pytest.mark.skipif(not model.ONEDNN, reason="model.linear uses oneDNN on x86-64 PyTorch with oneDNN only")


@needs_onednn
@pytest.mark.parametrize("contiguous", [True, False])
def test_onednn_linear_equals_f_linear_in_values_and_every_gradient(contiguous, monkeypatch):
    monkeypatch.setattr(model, "ONEDNN_UNPACKED", True)  # oneDNN's unpacked kernels, whatever this CPU's ISA
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 20, generator=g) if contiguous else torch.randn(3, 20, 7, generator=g).transpose(1, 2)
    w, b = torch.randn(11, 20, generator=g), torch.randn(11, generator=g)
    grad = torch.randn(3, 7, 11, generator=g)
    results = []
    for fn in (model.linear, torch.nn.functional.linear):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = fn(*leaves)
        y.backward(grad)
        results.append([y] + [t.grad for t in leaves])
    assert model.use_onednn(x) and y.grad_fn.name() != results[0][0].grad_fn.name()  # the two paths differ
    for ours, ref in zip(*results):
        assert maxdiff(ours, ref) <= TOL


@needs_onednn
def test_a_lora_training_step_on_onednn_equals_the_one_on_f_linear(ckpt, monkeypatch):
    path, _ = ckpt
    ids, pv = torch.tensor(prompt_ids((4, 4))), pixels(2)
    at = torch.zeros(ids.shape, dtype=torch.bool)
    at[:, -3:] = True
    runs = []
    monkeypatch.setattr(model, "ONEDNN_UNPACKED", True)  # oneDNN's unpacked kernels, whatever this CPU's ISA
    for onednn in (True, False):
        monkeypatch.setattr(model, "ONEDNN", onednn)
        torch.manual_seed(0)
        vlm = add_lora(VLM.from_pretrained(path), targets=("q_proj", "o_proj", "up_proj"), r=4, alpha=8)
        with torch.no_grad():
            for name, p in vlm.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
        logits = vlm(ids, pixel_values=pv, logits_at=at)
        logits.logsumexp(-1).sum().backward()
        runs.append([logits] + [p.grad for p in vlm.parameters() if p.requires_grad])
    assert len(runs[0]) == 1 + 3 * 2 * 2  # logits, then A and B of three adapters in each of two layers
    for ours, ref in zip(*runs):
        assert maxdiff(ours, ref) <= TOL


@needs_onednn
def test_the_matmul_path_follows_the_machine(monkeypatch):
    """A training step's matmuls (unpacked weights, many rows) run on oneDNN only where its kernels have AVX-512:
    capped to AVX2 (either library's cap) they stay on MKL. Packed decode weights run on oneDNN either way."""
    code = "import model, torch; print(model.ONEDNN_UNPACKED, torch.backends.cpu.get_cpu_capability())"
    caps = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
    run = lambda env: subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                                     env={**{k: v for k, v in os.environ.items() if k not in caps}, **env}).stdout.split()
    assert run({"ONEDNN_MAX_CPU_ISA": "AVX2"})[0] == run({"ATEN_CPU_CAPABILITY": "avx2"})[0] == "False"
    unpacked, isa = run({})
    assert unpacked == str(isa == "AVX512")  # uncapped: the CPU's own ISA decides
    x, w = torch.randn(8, 16, requires_grad=True), torch.randn(4, 16)
    for unpacked, kernel in ((True, "OneDNNLinearBackward"), (False, "MmBackward0")):
        monkeypatch.setattr(model, "ONEDNN_UNPACKED", unpacked)
        assert model.linear(x, w).grad_fn.name() == kernel


@needs_onednn
def test_generation_on_packed_onednn_weights_equals_generation_on_f_linear(ckpt, monkeypatch):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    ids, pv = torch.tensor(prompt_ids((4, 4, 4))), pixels(3)
    packed_calls = []
    reorder = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight",
                        lambda w, rows: packed_calls.append(rows) or reorder(w, rows))
    runs = []
    for onednn in (True, False):
        monkeypatch.setattr(model, "ONEDNN", onednn)
        runs.append(vlm.generate(ids, pixel_values=pv, max_new_tokens=6, temperature=1.0, return_logprobs=True,
                                 generator=torch.Generator().manual_seed(0)))
    n_packed = 4 * vlm.config.text.num_hidden_layers + 1  # q-k-v, o, gate-up, down in each layer, and the head
    assert packed_calls == [3] * n_packed and model.ACTIVE == {}  # packed for generate, used only there
    assert torch.equal(runs[0][0], runs[1][0]) and maxdiff(runs[0][1], runs[1][1]) <= TOL


@needs_onednn
def test_packed_weights_are_kept_between_calls_and_repacked_when_a_weight_changes(ckpt, monkeypatch):
    """A stale packed copy would silently generate from old weights: after each way a weight changes (a training step
    on it, merge_lora, load_state_dict), generation on the kept copies must equal generation on f.linear."""
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    n_layers = vlm.config.text.num_hidden_layers
    ids, pv = torch.tensor(prompt_ids((4, 4, 4))), pixels(3)
    packed_calls = []
    reorder = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight",
                        lambda w, rows: packed_calls.append(rows) or reorder(w, rows))

    def logprobs_packed_and_f_linear():
        out = []
        for onednn in (True, False):
            monkeypatch.setattr(model, "ONEDNN", onednn)
            out.append(vlm.generate(ids, pixel_values=pv, max_new_tokens=6, temperature=1.0, return_logprobs=True,
                                    generator=torch.Generator().manual_seed(0)))
        assert torch.equal(out[0][0], out[1][0]) and maxdiff(out[0][1], out[1][1]) <= TOL
        return out[0][1]

    def sgd_step_on_a_base_weight():
        q = vlm.language_model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
        q.grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
        torch.optim.SGD([q], lr=1.0).step()
        q.requires_grad_(False)

    def add_trained_adapters():
        add_lora(vlm, targets=("v_proj", "down_proj"), r=4, alpha=8)
        with torch.no_grad():
            for name, p in vlm.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))

    n_packed = 4 * n_layers + 1  # q-k-v, o, gate-up and down stacked as packed_weights stacks them, and the head
    before = logprobs_packed_and_f_linear()
    assert len(packed_calls) == n_packed
    # each change, how many copies it must pack, and whether it changes what is generated: where it does, a stale copy
    # would differ from f.linear. A v_proj adapter unstacks q, k and v (the adapters run unpacked); down_proj's base
    # weight is unchanged by its adapter; merging changes v's and down's base weights, and stacks q, k, v again
    for change, n_repacked, moves in [(lambda: None, 0, False), (sgd_step_on_a_base_weight, 1, True),
                                      (add_trained_adapters, 3 * n_layers, True),
                                      (lambda: merge_lora(vlm), 2 * n_layers, False),
                                      (lambda: vlm.load_state_dict(VLM.from_pretrained(path).state_dict()), n_packed,
                                       True)]:
        n_calls = len(packed_calls)
        change()
        after = logprobs_packed_and_f_linear()
        assert len(packed_calls) - n_calls == n_repacked
        assert (maxdiff(after, before) > 1e-3) == moves
        before = after
