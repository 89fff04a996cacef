"""
Benchmarks on a GPU with random weights of the real shapes (nothing is downloaded):

1. model.py vs transformers' LlavaForConditionalGeneration on the same LLaVA-1.5-7B-shaped weights, bf16:
   logits at ICET-5 and at the default layer, and greedy generation speed (ours vs transformers' generate).
2. One L-PPO iteration with the settings of config/llava15_l5.py: 7B policy + GPT-2-large-shaped reward
   model, its time split (rollout / scoring / reference+values / update) and peak memory.

Run: python bench.py [--batch_size=16 --max_new_tokens=128 ...]   (prints one JSON line per measurement)
"""
import json
import os
import time

import torch

from lppo import (compute_gae, compute_rewards, masked_whiten, ppo_update, score_rollout)
from model import (VLM, VLMConfig, CLIPConfig, LlamaConfig, GPT2Config, add_lora, config_to_hf, from_hf_key,
                   rope_inv_freq)
from reward import RewardModel

batch_size = 16
max_new_tokens = 128
prompt_text_tokens = 40         # text tokens around the 576 image tokens
image_layer = 5
seed = 0
shape = "7b"                    # "7b": LLaVA-1.5-7B + GPT-2-large; "tiny": a smoke test of this script on any machine
precision = "bfloat16"          # of the weights on the GPU; float32 makes the logits comparison exact up to kernels
parity_only = False             # stop after the logits comparison
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = getattr(torch, precision) if device == "cuda" else torch.float32
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = precision != "float32"  # TF32 would blur a float32 comparison
gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"


def report(**kw):
    print(json.dumps({"gpu": gpu, **kw}), flush=True)


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


# -----------------------------------------------------------------------------
# LLaVA-1.5-7B shapes: CLIP ViT-L/14-336 + Vicuna-7B, random weights made by transformers on the GPU
cfg = VLMConfig(vision=CLIPConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=336, patch_size=14),
                text=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
                image_token_id=32000, pad_token_id=32001)
if shape == "tiny":
    cfg.vision = CLIPConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                            image_size=336, patch_size=14)
    cfg.text = LlamaConfig(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4)
from transformers import LlavaConfig, LlavaForConditionalGeneration
hf_cfg = LlavaConfig.from_dict(config_to_hf(cfg))
torch.set_default_dtype(dtype)
with torch.device(device):
    hf = LlavaForConditionalGeneration(hf_cfg).eval()
torch.set_default_dtype(torch.float32)
# ours shares every tensor with transformers' model: no second copy of the 7B weights
with torch.device("meta"):
    vlm = VLM(cfg)
sd = {from_hf_key(k): v for k, v in hf.state_dict().items() if "post_layernorm" not in k}
missing, unexpected = vlm.load_state_dict(sd, strict=False, assign=True)
assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
vlm.language_model.inv_freq = rope_inv_freq(cfg.text).to(device)
vlm.eval()
report(what="weights", params_b=sum(p.numel() for p in hf.parameters()) / 1e9,
       mem_gb=torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None)

# a batch: BOS, some text, 576 image tokens, some text (all rows the same length here)
g = torch.Generator().manual_seed(seed)
T_text = prompt_text_tokens
ids = torch.randint(3, 32000, (batch_size, T_text + 1), generator=g)
ids[:, 0] = 1
ids = torch.cat([ids[:, :6], torch.full((batch_size, cfg.image_seq_length), 32000), ids[:, 6:]], 1).to(device)
mask = torch.ones_like(ids)
pixels = torch.randn(batch_size, 3, 336, 336, generator=g).to(device, dtype)

# 1a. logits parity (float32 parity on tiny checkpoints is also tested on CPU in tests/test_model.py)
with torch.no_grad():
    for layer in (image_layer, -2):
        ours = vlm(ids[:2], pixel_values=pixels[:2], image_layer=layer).float()
        ref = hf(input_ids=ids[:2], pixel_values=pixels[:2], vision_feature_layer=layer).logits.float()
        report(what=f"logits_{precision}", image_layer=layer, max_abs_diff=(ours - ref).abs().max().item(),
               logit_scale=ref.abs().max().item(), argmax_agree=(ours.argmax(-1) == ref.argmax(-1)).float().mean().item())

if parity_only:
    raise SystemExit
# 1b. greedy generation, no early stop: ours (static KV cache) vs transformers' generate
with torch.no_grad():
    vlm.generate(ids, mask, pixel_values=pixels, image_layer=image_layer, max_new_tokens=4)  # warm-up
    (ours_tok, _), t_ours = timed(lambda: vlm.generate(ids, mask, pixel_values=pixels, image_layer=image_layer,
                                                       max_new_tokens=max_new_tokens))
    hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, vision_feature_layer=image_layer,
                max_new_tokens=4, do_sample=False)
    ref_tok, t_hf = timed(lambda: hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                              vision_feature_layer=image_layer, max_new_tokens=max_new_tokens,
                                              min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                              pad_token_id=32001))
ref_tok = ref_tok[:, ids.shape[1]:]
n = min(ours_tok.shape[1], ref_tok.shape[1])
report(what="generate", batch=batch_size, prompt_len=ids.shape[1], new_tokens=max_new_tokens,
       ours_s=t_ours, ours_tok_per_s=batch_size * max_new_tokens / t_ours,
       transformers_s=t_hf, transformers_tok_per_s=batch_size * max_new_tokens / t_hf,
       same_tokens_frac=(ours_tok[:, :n] == ref_tok[:, :n]).float().mean().item())
del hf, ref_tok
if device == "cuda":
    torch.cuda.empty_cache()

# -----------------------------------------------------------------------------
# 2. one L-PPO iteration with config/llava15_l5.py's settings
settings = {}
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "llava15_l5.py")).read(), {}, settings)
B, mb, micro = min(settings["batch_size"], batch_size), settings["minibatch_size"], settings["micro_batch_size"]
mb, micro = min(mb, B), min(micro, B)
gpt2_large = GPT2Config(n_embd=1280, n_layer=36, n_head=20) if shape == "7b" else GPT2Config(n_embd=64, n_layer=2, n_head=4)
with torch.device(device):
    rm = RewardModel("gpt2", gpt2_large, pad_token_id=50256).to(dtype)
    rm.head.float()
with torch.no_grad():
    for p in rm.parameters():
        p.normal_(std=0.02)
vlm.add_value_head()
torch.manual_seed(seed)
add_lora(vlm, targets=settings["lora_targets"], r=settings["lora_r"], alpha=settings["lora_alpha"])
params = [p for p in vlm.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=settings["learning_rate"], eps=1e-5, fused=device == "cuda")
ctx = torch.amp.autocast(device, dtype=dtype, enabled=device == "cuda")
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
ro = {"input_ids": ids[:B], "attention_mask": mask[:B], "pixel_values": pixels[:B], "layers": torch.full((B,), image_layer)}
gen = torch.Generator(device=device).manual_seed(seed)
t0 = time.perf_counter()
with torch.no_grad(), ctx:
    (tokens, _), t_roll = timed(lambda: vlm.generate(ro["input_ids"], ro["attention_mask"], ro["pixel_values"], ro["layers"],
                                                     settings["max_new_tokens"], settings["temperature"], generator=gen))
ro["tokens"] = tokens
ro["mask"] = torch.ones_like(tokens)  # random weights never say EOS: every response is full length, the worst case
rm_ids = torch.randint(0, 50256, (B, 60 + tokens.shape[1]), device=device)  # a text-only HH transcript
with torch.no_grad(), ctx:
    scores, t_score = timed(lambda: rm(rm_ids))
(ro["old_logprobs"], ro["old_values"], ref_lp), t_ref = timed(lambda: score_rollout(vlm, ro, settings["temperature"],
                                                                                    micro, ctx))
rewards, kl = compute_rewards(scores.float(), ro["old_logprobs"], ref_lp, ro["mask"], settings["kl_coef"])
adv, ro["returns"] = compute_gae(rewards, ro["old_values"], ro["mask"], 1.0, 0.95)
ro["advantages"] = masked_whiten(adv, ro["mask"])
_, t_update = timed(lambda: ppo_update(vlm, opt, ro, ppo_epochs=settings["ppo_epochs"], minibatch_size=mb,
                                       micro_batch_size=micro, clip_eps=0.2, clip_eps_v=0.2, vf_coef=0.1, grad_clip=1.0,
                                       temperature=settings["temperature"],
                                       generator=torch.Generator().manual_seed(seed), ctx=ctx))
report(what="lppo_iteration", config="config/llava15_l5.py", rollouts=B, new_tokens=tokens.shape[1],
       seq_len=ids.shape[1] + tokens.shape[1], ppo_epochs=settings["ppo_epochs"], rollout_s=t_roll, score_s=t_score,
       ref_and_values_s=t_ref, update_s=t_update, total_s=time.perf_counter() - t0,
       peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
