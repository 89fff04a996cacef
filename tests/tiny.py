"""Tiny random llava checkpoints, built with transformers and saved to a folder: the parity tests' ground truth."""

import json
import os

import torch
from safetensors.torch import load_file, save_file

VOCAB = 128
IMAGE_TOKEN = 120
PAD_TOKEN = 121


def tiny_llava_config(layers=4, gqa=True, strategy="default", feature_layer=-2, tie=False, rope=None, image_size=28):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                              image_size=image_size, patch_size=7, projection_dim=16)
    text = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2 if gqa else 4, vocab_size=VOCAB, max_position_embeddings=256,
                       rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                       **({"rope_parameters": rope} if rope else {}))
    n = (image_size // 7) ** 2 + (strategy == "full")
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, pad_token_id=PAD_TOKEN,
                       vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                       image_seq_length=n, tie_word_embeddings=tie)


def make_tiny_llava(path, seed=0, **kw):
    """Save a random LlavaForConditionalGeneration to `path` and return it (float32, eval mode)."""
    from transformers import LlavaForConditionalGeneration
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**kw)).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0; perturb them so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias") or "class_embedding" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


# transformers 5 writes `vision_tower.*`; llava-hf on disk has `vision_tower.vision_model.*`; transformers
# 4.52..4.5x in memory (and checkpoints saved from it by third parties) use `model.*` and a top-level lm_head.
def rewrite_layout(path, layout):
    """Rename the keys of `path`/model.safetensors into one of the layouts found in the wild."""
    sd = load_file(os.path.join(path, "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower."):]
        if layout == "new":
            k = (k.replace("language_model.model.", "model.language_model.", 1)
                  .replace("language_model.lm_head.", "lm_head.", 1))
            if k.startswith(("vision_tower.", "multi_modal_projector.")) or k == "image_newline":
                k = "model." + k
        out[k] = v
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def shard(path, n=2):
    """Split model.safetensors into n shards with a model.safetensors.index.json, as large checkpoints come."""
    sd = load_file(os.path.join(path, "model.safetensors"))
    keys = sorted(sd)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n]}
        save_file(part, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    os.remove(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def make_tiny_tokenizer(path, chat_template=None):
    """A word-level tokenizer over VOCAB ids with <image> at IMAGE_TOKEN, saved next to a tiny checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, IMAGE_TOKEN)] + ["<image>", "<pad>"]
    words += [f"x{i}" for i in range(len(words), VOCAB)]
    words[100:102] = ["USER:", "ASSISTANT:"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast


def make_gpt2_tokenizer(folder, corpus, vocab_size):
    """A byte-level BPE trained on `corpus`, saved as GPT-2's vocab.json + merges.txt; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # the full byte alphabet, or bytes absent from the corpus would have no token
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus * 3, trainer)
    os.makedirs(folder, exist_ok=True)
    tokenizer.model.save(str(folder))
    return tokenizer.get_vocab_size()


def tiny_llava_next_config(text="llama", sliding_window=None, pinpoints=((28, 56), (56, 28), (56, 56)), image_size=28,
                           layers=4, feature_layer=-2, strategy="default"):
    """A LlavaNextConfig as tiny_llava_config's, with a Llama or a Mistral text model and anyres canvases."""
    from transformers import LlavaNextConfig, MistralConfig
    base = tiny_llava_config(layers=layers, image_size=image_size)
    text_config = base.text_config
    if text == "mistral":
        text_config = MistralConfig(**{k: getattr(text_config, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id")},
            sliding_window=sliding_window)
    return LlavaNextConfig(vision_config=base.vision_config, text_config=text_config, image_token_index=IMAGE_TOKEN,
                           pad_token_id=PAD_TOKEN, vision_feature_layer=feature_layer,
                           vision_feature_select_strategy=strategy, image_grid_pinpoints=[list(p) for p in pinpoints])


def make_tiny_llava_next(path, seed=0, **kw):
    """Save a random LlavaNextForConditionalGeneration to `path` and return it (float32, eval mode)."""
    from transformers import LlavaNextForConditionalGeneration
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(tiny_llava_next_config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias") or "class_embedding" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model
