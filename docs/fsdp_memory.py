"""
The memory table of docs/fsdp.md: what one rank of an 8-GPU L-PPO run holds, under DDP and under FSDP2, for four
models, computed from their configs' shapes (no weights are read: each model is built by model.py on the meta device,
LoRA and value head added as lppo.py adds them, and its parameters counted).

    python docs/fsdp_memory.py          # prints the Markdown table

Per rank, in GB (1e9 bytes), with P parameters, p of them trained (LoRA + value head), N ranks, bf16 weights:
  weights      DDP: 2P. FSDP2: 2P/N for the shards, plus the root unit gathered whole (embeddings, lm_head, projector:
               FSDP2 keeps the root gathered from forward to backward), plus two of the largest other unit gathered
               at once (the one running and the one prefetched).
  adapters     p float32 weights and their float32 gradients, 8p bytes; FSDP2: 8p/N.
  optimizer    AdamW's two float32 moments, 8p bytes; FSDP2: 8p/N.
  KV cache     generation of batch_size rollouts of prompt + max_new_tokens tokens: 2 (k, v) x 2 bytes x layers x
               tokens x kv_heads x head_dim; mllama adds its cross-attention layers' keys and values of the image's
               tile tokens. The same under DDP and FSDP2.
  activations  a training micro-batch (no activation checkpointing): 2 bytes x (8 hidden + 3 intermediate) per token
               per decoder layer (the norms' inputs and outputs, q, k, v, the attention output, SwiGLU's gate, up and
               their product; flash attention keeps no T x T scores, and frozen linears keep no inputs), mllama's cross
               layers also their image keys and values, plus the float32 response logits three times over (logits,
               their log-softmax, its gradient). The frozen image encoder keeps nothing. The same under DDP and FSDP2.
  reward model GPT-2-large in float32 (the configs' reward model), replicated.
A rank fits when its total is at most 72 GB: 90% of an 80 GB GPU, the rest left to the CUDA context, the caching
allocator's fragmentation and temporaries. These are estimates (the activations within perhaps 30%), not measurements.
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import (LLAVA_NEXT_PINPOINTS, VLM, CLIPConfig, LlamaConfig, MllamaConfig, MllamaTextConfig,  # noqa: E402
                   MllamaVisionConfig, MllamaVLM, VLMConfig, add_lora, image_token_count)

RANKS = 8
GPU_GB = 80
FITS_GB = 0.9 * GPU_GB
PROMPT_TEXT_TOKENS = 64           # the text of a prompt around its image tokens (RedTeam-2K's prompts are shorter)
REWARD_MODEL_PARAMS = 774_030_080  # GPT-2-large with a scalar head (1280 + 1 more)
CLIP_L_336 = CLIPConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=336, patch_size=14)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

# name: (config of model.py, the L-PPO config that runs it)
MODELS = {
    "LLaVA-1.5-7B": (VLMConfig(vision=CLIP_L_336, text=LlamaConfig(vocab_size=32064, max_position_embeddings=4096),
                               image_token_id=32000, pad_token_id=32001), "config/llava15_l5.py"),
    "LLaVA-NeXT-34B": (VLMConfig(vision=CLIP_L_336,
                                 text=LlamaConfig(vocab_size=64064, hidden_size=7168, intermediate_size=20480,
                                                  num_hidden_layers=60, num_attention_heads=56, num_key_value_heads=8,
                                                  rope_theta=5e6, max_position_embeddings=4096),
                                 image_token_id=64000, pad_token_id=0, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS),
                       "config/llava_next34b_l5.py"),
    "Llama-3.2-11B-Vision": (MllamaConfig(vision=MllamaVisionConfig(),
                                          text=MllamaTextConfig(vocab_size=128256, hidden_size=4096,
                                                                intermediate_size=14336, num_hidden_layers=40,
                                                                num_key_value_heads=8, rope_theta=5e5,
                                                                rope_scaling=LLAMA3_ROPE,
                                                                max_position_embeddings=131072)),
                             "config/llama32v_l5.py"),
    "Llama-3.2-90B-Vision": (MllamaConfig(vision=MllamaVisionConfig(),
                                          text=MllamaTextConfig(vocab_size=128256, hidden_size=8192,
                                                                intermediate_size=28672, num_hidden_layers=100,
                                                                num_attention_heads=64, num_key_value_heads=8,
                                                                rope_theta=5e5, rope_scaling=LLAMA3_ROPE,
                                                                max_position_embeddings=131072,
                                                                cross_attention_layers=list(range(3, 100, 5)))),
                             "config/llama32v90b_l5.py"),
}


def run_settings(path):
    """The settings of an lppo.py config file, as the configurator would leave them (configs exec their parents)."""
    settings, cwd = {}, os.getcwd()
    os.chdir(ROOT)
    try:
        exec(open(path).read(), {}, settings)
    finally:
        os.chdir(cwd)
    return settings


def count(cfg, settings):
    """Parameter counts of the model that lppo.py trains: all, trained, the root unit's, the largest other unit's."""
    with torch.device("meta"):
        vlm = (MllamaVLM if isinstance(cfg, MllamaConfig) else VLM)(cfg)
        vlm.add_value_head()
        add_lora(vlm, targets=settings["lora_targets"], r=settings["lora_r"], alpha=settings["lora_alpha"])
    n = lambda m: sum(p.numel() for p in m.parameters())
    vision = vlm.vision_model if isinstance(cfg, MllamaConfig) else vlm.vision_tower
    units = [vision, *vlm.language_model.layers]
    return {"all": n(vlm), "trained": sum(p.numel() for p in vlm.parameters() if p.requires_grad),
            "root": n(vlm) - sum(n(u) for u in units), "largest_unit": max(n(u) for u in units)}


def per_rank(cfg, settings, counts):
    """{column: GB} of one rank, under DDP and under FSDP2."""
    text, mllama = cfg.text, isinstance(cfg, MllamaConfig)
    if mllama:  # one <|image|> token in the text; the image enters through the cross-attention layers
        image_tokens = 1
        image_states = cfg.vision.max_num_tiles * cfg.vision.num_patches
        n_cross = len(set(text.cross_attention_layers))
    else:  # the image's tokens in the text, the most any image gets (LLaVA-NeXT: its largest anyres canvas)
        canvases = cfg.image_grid_pinpoints or [[cfg.vision.image_size] * 2]
        image_tokens, image_states, n_cross = max(image_token_count(cfg, h, w) for h, w in canvases), 0, 0
    n_self = text.num_hidden_layers - n_cross
    new = settings["max_new_tokens"]
    seq = PROMPT_TEXT_TOKENS + image_tokens + new
    kv_row = text.num_key_value_heads * text.head_dim * 2 * 2  # k and v, bf16, one token of one layer
    kv = settings["batch_size"] * (n_self * seq + n_cross * image_states) * kv_row
    micro = settings["micro_batch_size"]
    act = micro * (text.num_hidden_layers * seq * 2 * (8 * text.hidden_size + 3 * text.intermediate_size)
                   + n_cross * image_states * kv_row + new * text.vocab_size * 4 * 3)
    shared = {"KV cache": kv, "activations": act, "reward model": 4 * REWARD_MODEL_PARAMS}
    ddp = {"weights": 2 * counts["all"], "adapters": 8 * counts["trained"], "optimizer": 8 * counts["trained"],
           **shared}
    fsdp = {"weights": 2 * counts["all"] / RANKS + 2 * counts["root"] + 2 * 2 * counts["largest_unit"],
            "adapters": 8 * counts["trained"] / RANKS, "optimizer": 8 * counts["trained"] / RANKS, **shared}
    return {way: {k: v / 1e9 for k, v in gb.items()} for way, gb in (("DDP", ddp), ("FSDP2", fsdp))}


def table():
    """The Markdown table of docs/fsdp.md."""
    columns = ["weights", "adapters", "optimizer", "KV cache", "activations", "reward model"]
    lines = ["| model (parameters) | config: rollouts, micro-batch | sharding | " + " | ".join(columns)
             + " | total | fits 8x80 GB |", "|" + "---|" * (len(columns) + 5)]
    for name, (cfg, path) in MODELS.items():
        settings = run_settings(path)
        counts = count(cfg, settings)
        for way, gb in per_rank(cfg, settings, counts).items():
            total = sum(gb.values())
            cells = [f"{gb[c]:.2f}" if gb[c] < 1 else f"{gb[c]:.1f}" for c in columns]
            lines.append(f"| {name} ({counts['all'] / 1e9:.2f}B) | `{path}`: {settings['batch_size']}, "
                         f"{settings['micro_batch_size']} | {way} | " + " | ".join(cells)
                         + f" | {total:.1f} | {'yes' if total <= FITS_GB else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
