"""model.py's Llama 3.2 Vision (mllama) against transformers: vision encoder, cross-attention decoder, logits,
generation, preprocessing and saving, in float32 on tiny random checkpoints.

The image-layer convention is Meta's (model.py, the mllama section): tap i of the local ViT reads h_i, its state
after i layers. transformers 5 reads h_{i+1} (its encoder no longer returns its input), so the parity references
below run transformers with the local encoder made input-first again (meta_taps); one test shows the plain
transformers 5 output is exactly ours with every tap moved one layer later. Tolerance: max abs diff <= 1e-4.
"""

import json
import os
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import tiny
from common import InputError
from model import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VLM, MllamaVLM, add_lora, encode_batch, left_pad, load_tokenizer,
                   lora_disabled, merge_lora, mllama_cross_attention_mask, mllama_preprocess_image)

TOL = 1e-4
VOCAB = 128
IMAGE = 128        # <|image|>: one past lm_head's vocabulary, an extra embedding row, as in the real checkpoints
PAD = 121
TILE = 14          # tiles of 14x14 pixels, 2x2 patches of 7, so 5 tokens per tile (padded to 8)
N_TILES = {1: 1, 2: 2, 5: 2, 6: 4}  # aspect ratio id -> tiles: 1x1, 1x2, 2x1 and 2x2
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# three shapes: cross-attention layers first, in the middle, last and adjacent; taps early and late; GQA or not
CONFIGS = {
    "a": dict(cross=[1, 3], text_layers=5, local=5, taps=[1, 3], kv=2),
    # tied in the config, never in transformers: embed_tokens has 8 rows more than lm_head
    "b": dict(cross=[0], text_layers=3, local=4, taps=[0, 2, 3], kv=4, tie=True),
    "c": dict(cross=[2, 4, 5], text_layers=6, local=3, taps=[2], kv=2, rope=None),
}


def tiny_mllama_config(cross, text_layers, local, taps, kv, tie=False, rope=LLAMA3_ROPE):
    from transformers import MllamaConfig
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=local, num_global_layers=2, attention_heads=4,
                  image_size=TILE, patch_size=7, max_num_tiles=4, intermediate_layers_indices=taps,
                  vision_output_dim=32 * (1 + len(taps)))
    text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=text_layers, num_attention_heads=4,
                num_key_value_heads=kv, vocab_size=VOCAB, cross_attention_layers=cross, max_position_embeddings=256,
                rms_norm_eps=1e-5, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie,
                **({"rope_parameters": rope} if rope else {}))
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE, tie_word_embeddings=tie)


def make_tiny_mllama(path, seed=0, name="a"):
    """Save a random MllamaForConditionalGeneration to `path` and return it (float32, eval mode)."""
    from transformers import MllamaForConditionalGeneration
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(tiny_mllama_config(**CONFIGS[name])).eval()
    with torch.no_grad():  # init leaves gates at 0, norms at 1, biases at 0: perturb them so that they are tested too
        for n, p in model.named_parameters():
            if "gate" in n and "proj" not in n:
                p.copy_(torch.randn_like(p))
            elif "norm" in n or n.endswith(".bias") or "embedding" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


@contextmanager
def meta_taps(hf, stop=None):
    """transformers with its local ViT input-first again, hidden_states = (h_0, ..., h_L) as in transformers 4.x and
    Meta's code; with stop=l the ICET reference: only local layers 1..l run and h_l stands for every later state."""
    from transformers.modeling_outputs import BaseModelOutput
    enc = hf.model.vision_model.transformer
    L = len(enc.layers)

    def forward(hidden_states, attention_mask=None, **kwargs):
        states = [hidden_states]
        for layer in enc.layers[:L if stop is None else stop]:
            hidden_states = layer(hidden_states, attention_mask=attention_mask)
            states.append(hidden_states)
        states += [hidden_states] * (L + 1 - len(states))
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=tuple(states))

    enc.forward = forward
    try:
        yield hf
    finally:
        del enc.forward


def images(n_rows=2, n_images=1, seed=0):
    """Random tiles (B, images, 4, 3, TILE, TILE) with aspect ratio ids and the masks of their valid tiles."""
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(n_rows, n_images, 4, 3, TILE, TILE, generator=g)
    ids = torch.tensor([[[1, 6, 2, 5][(r + i) % 4] for i in range(n_images)] for r in range(n_rows)])
    n_tiles = torch.tensor([[N_TILES[int(a)] for a in row] for row in ids])
    mask = (torch.arange(4) < n_tiles[..., None]).long()
    return pv, ids, mask


def prompt(n_rows=2, n_images=1, seed=0, lengths=(7, 4)):
    """Left-padded rows [BOS, text, <|image|> per image with text between, text] and their cross_attention_mask."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(n_rows):
        n = lengths[r % len(lengths)]
        text = torch.randint(3, 100, (n + 3 * n_images,), generator=g).tolist()
        row = [1] + text[:n]
        for i in range(n_images):
            row += [IMAGE] + text[n + 3 * i:n + 3 * i + 3]
        rows.append(row)
    ids, mask = left_pad(rows, PAD)
    return ids, mask


def maxdiff(a, b):
    d = (a.float() - b.float()).abs().max().item()
    if os.environ.get("PARITY_LOG"):
        with open(os.environ["PARITY_LOG"], "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                                "max_abs_diff": d}) + "\n")
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_mllama")
    return path, make_tiny_mllama(path)


def batch(n_rows=2, n_images=1, seed=0):
    ids, mask = prompt(n_rows, n_images, seed)
    pv, ar_ids, ar_mask = images(n_rows, n_images, seed)
    n_tiles = ar_mask.sum(-1).tolist()
    cam = mllama_cross_attention_mask(ids, IMAGE, n_tiles, 4)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask,
                cross_attention_mask=cam)


# ---------------------------------------------------------------------------- vision encoder

def test_loads_as_mllama_with_transformers_module_names(ckpt):
    path, hf = ckpt
    vlm = VLM.from_pretrained(path)
    assert isinstance(vlm, MllamaVLM)
    ours = set(vlm.state_dict())
    theirs = {k.replace("model.", "", 1) if k.startswith("model.") else k for k in hf.state_dict()}
    assert ours == theirs


@pytest.mark.parametrize("layer", [None, 0, 1, 3, -2, 5, -6])
def test_vision_features_match_transformers_with_meta_taps_at_every_image_layer(ckpt, layer):
    path, hf = ckpt
    vlm = VLM.from_pretrained(path)
    pv, ar_ids, ar_mask = images()
    stop = None if layer is None else layer % 6
    with torch.no_grad(), meta_taps(hf, stop):
        ref = hf.model.vision_model(pv, ar_ids, ar_mask).last_hidden_state
    ours = vlm.vision_features(pv, layer, ar_ids, ar_mask)
    assert ours.shape == ref.shape == (2, 1, 4, 5, 96)
    assert maxdiff(ours, ref) <= TOL


def test_plain_transformers_5_reads_each_tap_one_layer_later(ckpt):
    """The off-by-one of transformers 5: its output is ours with every tap i moved to i + 1."""
    path, hf = ckpt
    vlm = VLM.from_pretrained(path)
    pv, ar_ids, ar_mask = images()
    with torch.no_grad():
        plain = hf.model.vision_model(pv, ar_ids, ar_mask).last_hidden_state
        with meta_taps(hf):
            meta = hf.model.vision_model(pv, ar_ids, ar_mask).last_hidden_state
    assert maxdiff(plain[..., 32:], meta[..., 32:]) > 1e-2  # the taps differ, the global output does not
    assert maxdiff(plain[..., :32], meta[..., :32]) == 0
    vlm.config.vision.intermediate_layers_indices = [2, 4]  # the checkpoint's [1, 3], one later
    assert maxdiff(vlm.vision_features(pv, None, ar_ids, ar_mask), plain) <= TOL


def test_early_exit_runs_only_the_local_layers_needed_and_all_global_layers(ckpt):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    ran = []
    for name, enc in (("local", vlm.vision_model.transformer), ("global", vlm.vision_model.global_transformer)):
        for i, block in enumerate(enc.layers):
            block.register_forward_hook(lambda m, a, o, i=i, name=name: ran.append((name, i)))
    pv, ar_ids, ar_mask = images()
    for layer in range(6):
        ran.clear()
        vlm.vision_features(pv, layer, ar_ids, ar_mask)
        assert ran == [("local", i) for i in range(layer)] + [("global", 0), ("global", 1)]


def test_per_row_image_layers_equal_one_layer_at_a_time(ckpt):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    pv, ar_ids, ar_mask = images(3, seed=2)
    mixed = vlm.vision_features(pv, [0, 4, -3], ar_ids, ar_mask)
    for i, layer in enumerate([0, 4, -3]):
        alone = vlm.vision_features(pv[i:i + 1], layer, ar_ids[i:i + 1], ar_mask[i:i + 1])
        assert maxdiff(mixed[i], alone[0]) < 1e-5
    assert maxdiff(mixed[0], vlm.vision_features(pv[:1], 4, ar_ids[:1], ar_mask[:1])[0]) > 1e-2


# ---------------------------------------------------------------------------- logits of the whole model

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_at_several_image_layers(tmp_path, name):
    hf = make_tiny_mllama(tmp_path, seed=1, name=name)
    vlm = VLM.from_pretrained(tmp_path)
    L = CONFIGS[name]["local"]
    n_images = 2 if name == "c" else 1  # config c: two images per prompt, each seen by the text after it
    b = batch(n_images=n_images, seed=1)
    b.pop("attention_mask")  # unpadded rows: transformers' plain forward counts positions from the padding
    for layer in [None, 0, 1, -2]:
        stop = None if layer is None else layer % (L + 1)
        with torch.no_grad(), meta_taps(hf, stop):
            ref = hf(**b).logits
        with torch.no_grad():
            ours = vlm(b["input_ids"], pixel_values=b["pixel_values"], image_layer=layer,
                       aspect_ratio_ids=b["aspect_ratio_ids"], aspect_ratio_mask=b["aspect_ratio_mask"],
                       cross_attention_mask=b["cross_attention_mask"])
        assert ours.shape == ref.shape == (2, b["input_ids"].shape[1], VOCAB)
        assert maxdiff(ours, ref) <= TOL, (layer, maxdiff(ours, ref))
    with torch.no_grad():  # text only: the cross-attention layers are skipped, in both
        assert maxdiff(vlm(b["input_ids"]), hf(input_ids=b["input_ids"]).logits) <= TOL


def test_cross_attention_mask_decides_which_tokens_see_the_image(ckpt):
    path, hf = ckpt
    vlm = VLM.from_pretrained(path)
    b = batch(seed=4)
    b.pop("attention_mask")
    late = b["cross_attention_mask"].clone()
    late[:, :-2] = 0  # the image seen by the last two tokens only
    for cam in (b["cross_attention_mask"], late):
        with torch.no_grad(), meta_taps(hf):
            ref = hf(**{**b, "cross_attention_mask": cam}).logits
        with torch.no_grad():
            ours = vlm(b["input_ids"], b["pixel_values"], aspect_ratio_ids=b["aspect_ratio_ids"],
                       aspect_ratio_mask=b["aspect_ratio_mask"], cross_attention_mask=cam)
        assert maxdiff(ours, ref) <= TOL
    with torch.no_grad():
        assert maxdiff(ours[:, -4:-2], vlm(**b)[:, -4:-2]) > 1e-3


def test_left_padded_batch_equals_each_prompt_alone(ckpt):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    b = batch(seed=5)
    with torch.no_grad():
        full = vlm(b["input_ids"], b["pixel_values"], 2, b["attention_mask"], aspect_ratio_ids=b["aspect_ratio_ids"],
                   aspect_ratio_mask=b["aspect_ratio_mask"], cross_attention_mask=b["cross_attention_mask"])
        for i in range(2):
            n = int(b["attention_mask"][i].sum())
            alone = vlm(b["input_ids"][i:i + 1, -n:], b["pixel_values"][i:i + 1], 2,
                        aspect_ratio_ids=b["aspect_ratio_ids"][i:i + 1],
                        aspect_ratio_mask=b["aspect_ratio_mask"][i:i + 1],
                        cross_attention_mask=b["cross_attention_mask"][i:i + 1, -n:])
            assert maxdiff(full[i, -n:], alone[0]) <= TOL


# ---------------------------------------------------------------------------- generation

@pytest.mark.parametrize("layer", [None, 2])
def test_greedy_generation_equals_transformers_generate(ckpt, layer):
    path, hf = ckpt
    vlm = VLM.from_pretrained(path)
    b = batch(seed=3)
    ours, _ = vlm.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], layer, max_new_tokens=16,
                           eos_token_id=2, aspect_ratio_ids=b["aspect_ratio_ids"],
                           aspect_ratio_mask=b["aspect_ratio_mask"], cross_attention_mask=b["cross_attention_mask"])
    with meta_taps(hf, layer):
        ref = hf.generate(**b, do_sample=False, max_new_tokens=16, eos_token_id=2, pad_token_id=PAD)
    T0 = b["input_ids"].shape[1]
    assert ours.shape[1] >= 12
    assert torch.equal(ours, ref[:, T0:T0 + ours.shape[1]])


def test_sampled_logprobs_equal_training_forward_logprobs(ckpt):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    b = batch(seed=6)
    img = {k: b[k] for k in ("aspect_ratio_ids", "aspect_ratio_mask")}
    toks, lps = vlm.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], 1, max_new_tokens=8,
                             temperature=0.8, return_logprobs=True, generator=torch.Generator().manual_seed(0),
                             cross_attention_mask=b["cross_attention_mask"], **img)
    full = torch.cat([b["input_ids"], toks], 1)
    cam = b["cross_attention_mask"]
    cam = torch.cat([cam, cam[:, -1:].expand(-1, toks.shape[1], -1, -1)], 1)  # new tokens see what the last one saw
    with torch.no_grad():
        logits = vlm(full, b["pixel_values"], 1, torch.cat([b["attention_mask"], torch.ones_like(toks)], 1),
                     cross_attention_mask=cam, **img)
    T0 = b["input_ids"].shape[1]
    ref = torch.log_softmax(logits[:, T0 - 1:-1] / 0.8, -1).gather(-1, toks[..., None])[..., 0]
    assert maxdiff(lps, ref) <= TOL


# ---------------------------------------------------------------------------- LoRA, value head, saving

def test_lora_adapts_only_the_language_model_and_merges_back(ckpt):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    b = batch(seed=7)
    kw = {k: v for k, v in b.items() if k != "input_ids"}
    with torch.no_grad():
        base = vlm(b["input_ids"], **kw)
        add_lora(vlm, targets=("q_proj", "v_proj"), r=4, alpha=8)
        vlm.add_value_head()
        trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith(("language_model.", "value_head.")) for n in trainable)
        assert any(".cross_attn.q_proj.lora_A" in n for n in trainable)
        for n, p in vlm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
        adapted, hidden = vlm(b["input_ids"], **kw, return_hidden=True)
        assert maxdiff(adapted, base) > 1e-3 and vlm.values(hidden).shape == b["input_ids"].shape
        with lora_disabled(vlm):
            assert maxdiff(vlm(b["input_ids"], **kw), base) == 0
        merge_lora(vlm)
        assert maxdiff(vlm(b["input_ids"], **kw), adapted) <= TOL


def test_peft_adapter_folder_loads_in_transformers_and_peft_with_the_same_logits(ckpt, tmp_path):
    from peft import PeftModel
    from transformers import MllamaForConditionalGeneration
    from model import save_peft_adapter
    path, hf = ckpt
    vlm = VLM.from_pretrained(path)
    add_lora(vlm, targets=("q_proj", "v_proj", "down_proj"), r=4, alpha=8)
    with torch.no_grad():
        for n, p in vlm.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.2)
    save_peft_adapter(vlm, tmp_path / "peft", base_model=str(path))
    b = batch(seed=9)
    b.pop("attention_mask")
    with torch.no_grad():
        base = hf(**b).logits
        fresh = MllamaForConditionalGeneration.from_pretrained(path).eval()  # peft adapts the model it is given
        ref = PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()(**b).logits
        vlm.config.vision.intermediate_layers_indices = [2, 4]  # plain transformers 5 taps one layer later
        assert maxdiff(vlm(**b), ref) <= TOL and maxdiff(ref, base) > 1e-3


@pytest.mark.parametrize("layout", ["hub", "new", "sharded"])
def test_every_key_layout_loads_and_save_pretrained_is_read_back_by_transformers(ckpt, tmp_path, layout):
    from transformers import MllamaForConditionalGeneration
    path, hf = ckpt
    src = tmp_path / "src"
    src.mkdir()
    sd = load_file(path / "model.safetensors")
    # transformers writes the hub's layout
    assert "vision_model.layernorm_pre.weight" in sd and "language_model.lm_head.weight" in sd
    if layout == "new":  # the names transformers >= 4.52 keeps in memory
        sd = {("lm_head." + k[len("language_model.lm_head."):] if k.startswith("language_model.lm_head.") else
               "model.language_model." + k[len("language_model.model."):] if k.startswith("language_model.model.") else
               "model." + k): v for k, v in sd.items()}
        assert {"model.language_model.norm.weight", "model.vision_model.class_embedding", "lm_head.weight"} <= set(sd)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text((path / "config.json").read_text())
    if layout == "sharded":
        tiny.shard(src)
    vlm = VLM.from_pretrained(src)
    vlm.save_pretrained(tmp_path / "out")
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(load_file(path / "model.safetensors"))
    back = MllamaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    b = batch(seed=8)
    b.pop("attention_mask")
    with torch.no_grad():
        assert maxdiff(back(**b).logits, hf(**b).logits) == 0
        assert maxdiff(VLM.from_pretrained(tmp_path / "out")(**b), vlm(**b)) == 0


# ---------------------------------------------------------------------------- preprocessing and the prompt batch

def image_processor():
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    return MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=4, resample=2,
                                   image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("size", [(9, 9), (14, 14), (30, 11), (11, 40), (25, 31), (60, 60), (5, 90)])
def test_preprocessing_equals_mllama_image_processor(mode, size):
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA").convert(mode)
    ref = image_processor()(images=[[img]], return_tensors="pt")
    tiles, ar_id, n = mllama_preprocess_image(img, TILE, 4)
    assert tiles.shape == ref["pixel_values"][0, 0].shape == (4, 3, TILE, TILE)
    assert maxdiff(tiles, ref["pixel_values"][0, 0]) <= 1e-5
    assert ar_id == int(ref["aspect_ratio_ids"][0, 0])
    assert (torch.arange(4) < n).long().tolist() == ref["aspect_ratio_mask"][0, 0].tolist()


def test_cross_attention_mask_equals_the_processors_for_several_images():
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)
    rows = [[1, 5, IMAGE, 6, 7, IMAGE, IMAGE, 8, 9], [PAD, PAD, IMAGE, 1, 5, 6, 7, 8, 9],
            [1, IMAGE, 5, 6, 7, 8, 9, IMAGE, 4]]
    n_tiles = [[2, 1, 4], [3], [1, 4]]
    ref = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(r, IMAGE) for r in rows],
                                                       n_tiles, 4, len(rows[0]))
    ours = mllama_cross_attention_mask(torch.tensor(rows), IMAGE, n_tiles, 4)
    assert ours.tolist() == ref.tolist() and ours.sum() > 0


def make_tokenizer(path):
    """tiny's word-level tokenizer with <|image|> at IMAGE and a chat template that writes BOS itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, VOCAB + 8)]
    words[IMAGE], words[PAD] = "<|image|>", "<pad>"
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<|image|>"], padding_side="left")
    fast.chat_template = ("{% for m in messages %}<s> w10 {{ m['content'] }} w11{% endfor %}"
                          "{% if add_generation_prompt %} w12{% endif %}")
    fast.save_pretrained(path)
    return fast


def test_encode_batch_equals_mllama_processor(ckpt, tmp_path):
    from transformers import MllamaProcessor
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    make_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(20, 45), (30, 12)]]
    prompts = ["w5 w6 w7 w8", "w9"]
    ours = encode_batch(tok, vlm.config, prompts, ims)
    assert ours["input_ids"][0].tolist() == [1, 10, IMAGE, 5, 6, 7, 8, 11, 12]
    texts = [f"<s> w10 <|image|>{p} w11 w12" for p in prompts]
    ref = MllamaProcessor(image_processor(), tok)(images=[[im] for im in ims], text=texts, padding=True,
                                                   add_special_tokens=False, return_tensors="pt")
    for k in ("input_ids", "attention_mask", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
        assert ours[k].tolist() == ref[k].tolist(), k
    assert maxdiff(ours["pixel_values"], ref["pixel_values"]) <= 1e-5
    cut = encode_batch(tok, vlm.config, prompts, ims, max_len=7)  # the first prompt loses the start of its text
    assert cut["input_ids"][0].tolist() == [1, 10, IMAGE, 7, 8, 11, 12]
    assert cut["cross_attention_mask"][0, :, 0, 0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    text_only = encode_batch(tok, vlm.config, prompts)
    assert text_only["input_ids"][0].tolist() == [1, 10, 5, 6, 7, 8, 11, 12] and text_only["pixel_values"] is None
    with torch.no_grad():
        ours_logits = vlm(**ours, image_layer=2)
    assert ours_logits.shape == (2, 9, VOCAB) and torch.isfinite(ours_logits).all()


def test_generate_responses_answers_mllama_prompts_with_their_images(ckpt, tmp_path):
    """The stages' generation loop runs mllama unchanged: encode_batch's extra inputs reach generate."""
    from model import generate_responses, load_image
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    make_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    rng = np.random.default_rng(1)
    rows = []
    for i, (h, w) in enumerate([(20, 45), (30, 12)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"prompt": f"w{5 + i} w9", "image": str(tmp_path / f"{i}.png")})
    texts = generate_responses(vlm, tok, rows, layer=[1, 4], max_new_tokens=6)
    b = encode_batch(tok, vlm.config, [r["prompt"] for r in rows], [load_image(r["image"]) for r in rows])
    toks, _ = vlm.generate(**b, image_layer=[1, 4], max_new_tokens=6, eos_token_id=tok.eos_token_id)
    assert texts == [tok.decode(row[:row.index(2)] if 2 in row else row, skip_special_tokens=True)
                     for row in toks.tolist()]
    assert all(texts)


# ---------------------------------------------------------------------------- bad input: one clear line each

def test_bad_inputs_are_one_line_errors(ckpt, tmp_path):
    path, _ = ckpt
    vlm = VLM.from_pretrained(path)
    b = batch()
    with pytest.raises(InputError, match="need the cross_attention_mask"):
        vlm(b["input_ids"], pixel_values=b["pixel_values"], aspect_ratio_ids=b["aspect_ratio_ids"])
    with pytest.raises(InputError, match="need their aspect_ratio_ids"):
        vlm(b["input_ids"], pixel_values=b["pixel_values"], cross_attention_mask=b["cross_attention_mask"])
    with pytest.raises(InputError, match=r"expected \(batch, images, tiles"):
        vlm(b["input_ids"], pixel_values=b["pixel_values"][:, 0], aspect_ratio_ids=b["aspect_ratio_ids"],
            cross_attention_mask=b["cross_attention_mask"])
    with pytest.raises(InputError, match=r"image layer 6 is out of range .* \(expected -6..5"):
        vlm.vision_features(b["pixel_values"], 6, b["aspect_ratio_ids"])
    with pytest.raises(InputError, match=r"cross_attention_mask has shape \(2, 3, 1, 4\)"):
        vlm(b["input_ids"], pixel_values=b["pixel_values"], aspect_ratio_ids=b["aspect_ratio_ids"],
            cross_attention_mask=b["cross_attention_mask"][:, :3])
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_config"]["vision_output_dim"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="vision_output_dim is 100, expected hidden_size"):
        VLM.from_pretrained(tmp_path)


HUB_CONFIG = {  # meta-llama/Llama-3.2-11B-Vision-Instruct's config.json, in transformers 4.45's spelling
    "architectures": ["MllamaForConditionalGeneration"], "image_token_index": 128256, "model_type": "mllama",
    "text_config": {"cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "hidden_size": 4096,
                    "intermediate_size": 14336, "max_position_embeddings": 131072, "model_type": "mllama_text_model",
                    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
                    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                    "rope_theta": 500000.0, "vocab_size": 128256, "bos_token_id": 128000,
                    "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128004, "tie_word_embeddings": False},
    "vision_config": {"attention_heads": 16, "hidden_act": "gelu", "hidden_size": 1280, "image_size": 560,
                      "intermediate_layers_indices": [3, 7, 15, 23, 30], "intermediate_size": 5120, "max_num_tiles": 4,
                      "model_type": "mllama_vision_model", "norm_eps": 1e-5, "num_channels": 3, "num_global_layers": 8,
                      "num_hidden_layers": 32, "patch_size": 14, "vision_output_dim": 7680,
                      "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]},
}


def test_the_11b_config_builds_every_weight_of_transformers_with_the_same_shape():
    """On the meta device, no memory: the real model's tensor names and shapes equal transformers' one for one."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    from model import mllama_config_from_hf, mllama_from_hf_key
    cfg = mllama_config_from_hf(HUB_CONFIG)
    assert cfg.text.rope_scaling["rope_type"] == "llama3" and cfg.text.head_dim == 128 and cfg.pad_token_id == 128004
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in MllamaVLM(cfg).state_dict().items()}
        hf = MllamaForConditionalGeneration(MllamaConfig(**HUB_CONFIG))
    theirs = {mllama_from_hf_key(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours == theirs
    assert 10.6e9 < sum(np.prod(s) for s in ours.values()) < 10.7e9
