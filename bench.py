"""
Benchmarks: our model.py against transformers (and peft), on the machine at hand, one JSON line per measurement.
Every line names the machine (CPU model, the vector instructions its kernels run on, cores, threads, GPU) and the
versions of torch, transformers and peft. To time an AVX2 machine's kernels on an AVX-512 one, cap all three libraries:
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 OMP_NUM_THREADS=1 python bench.py
(the instructions only: a core that runs AVX-512 as two 256-bit halves, as AMD's Zen 4 does, runs AVX2 code about as
fast, so this does not reproduce an older AVX2-only core such as Zen 3).

On a CPU (shape "smol"): the smol world's base model, data/smol/smol-llava-base (SmolLM2-135M + a small CLIP):
1. greedy decoding, ours (static KV cache) vs transformers' generate, at batch 1 and at batch_size, and the
   roofline of a decode step (bytes of weights and KV cache read, FLOPs, against the measured bandwidth and matmul
   speed);
2. one LoRA training step (r=16 on q/k/v/o, AdamW, loss on the last 64 tokens), ours vs transformers + peft;
3. one step of sft.py's safety stage (config/smol_sft.py's LoRA, sft.py's loss, right-padded rows of the safety
   data's lengths): ours, ours with the decoder on the padding too (no unpadded_logits), that on MKL matmuls
   (model.ONEDNN off: neither oneDNN nor unpadding), and transformers + peft.
Timings are the best of `repeats` runs, ours and theirs alternating, so that both sides of a ratio see the same
machine load; run with OMP_NUM_THREADS=1 on a shared machine.

On a GPU (shape "7b"), random weights of the real shapes (nothing is downloaded), family "llava" (the default):
1. model.py vs transformers' LlavaForConditionalGeneration on the same LLaVA-1.5-7B-shaped weights, bf16:
   logits at ICET-5 and at the default layer, greedy generation speed (ours vs transformers' generate, with its
   dynamic and its static cache), and the HBM roofline of a decode step.
2. One L-PPO iteration with the settings of config/llava15_l5.py (batch_size overrides its batch size): 7B policy +
   GPT-2-large-shaped reward model, its time split (rollout / scoring / reference+values / update) and peak memory.
   With --fsdp=True under torchrun on a machine with several GPUs, only this iteration, its policy sharded over the
   ranks by FSDP2 as lppo.py's fsdp=True shards it, each rank rolling out batch_size rows; rank 0 reports it, with the
   largest peak memory of any rank:  torchrun --standalone --nproc_per_node=8 bench.py --fsdp=True
Families "llava_next" (llava-v1.6-vicuna-7b shapes: anyres crops of a 480x640 photo, 2,340 image tokens) and
"mllama" (Llama-3.2-11B-Vision shapes: 4 tiles of 560 px) on the same footing: our logits against transformers'
LlavaNextForConditionalGeneration / MllamaForConditionalGeneration on the same weights, and greedy generation speed
(ours vs transformers' generate, dynamic and static cache); "all" runs llava_next, mllama, then llava.
shape "tiny": the GPU benchmark's code on tiny shapes (the parity tests' configs for llava_next and mllama), a smoke
test of this script on any machine, float32, where the logits must agree to rounding and the tokens exactly.

Run: python bench.py [--batch_size=64 --max_new_tokens=128 --shape=tiny --family=mllama ...]
"""
import gc
import json
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version

import torch

import model
from common import InputError
from lppo import (compute_gae, compute_rewards, masked_whiten, ppo_update, score_rollout)
from model import VLM, CLIPConfig, LlamaConfig, VLMConfig, add_lora, config_to_hf, from_hf_key, linear, rope_inv_freq
from model import (LLAVA_NEXT_PINPOINTS, MllamaConfig, MllamaTextConfig, MllamaVisionConfig, MllamaVLM, anyres_grid,
                   image_token_count, mllama_config_to_hf, mllama_cross_attention_mask, mllama_from_hf_key, speed_up)
from reward import GPT2Config, RewardModel

batch_size = 0                  # 0: config/llava15_l5.py's 16 for "7b" and "tiny", 8 for "smol"; else this many rows
max_new_tokens = 0              # 0: 128 for "7b" and "tiny", 64 for "smol"
prompt_text_tokens = 40         # text tokens around the image tokens
image_layer = 5
seed = 0
shape = ""                      # "7b": LLaVA-1.5-7B + GPT-2-large; "smol": smol_path vs transformers and peft;
                                # "tiny": a smoke test of the "7b" code on any machine; "": "7b" on a GPU, else "smol"
smol_path = "data/smol/smol-llava-base"
repeats = 3                     # each timing is the best of this many runs
precision = "bfloat16"          # of the weights on the GPU; float32 makes the logits comparison exact up to kernels
parity_only = False             # stop after the logits comparison
fsdp = False                    # shape "7b" under torchrun: the L-PPO iteration alone, the policy sharded by FSDP2
family = "llava"                # shapes "7b"/"tiny": "llava" (LLaVA-1.5 and the L-PPO iteration), "llava_next", "mllama",
                                # or "all" (each in turn)
CHOICES = {"family": ("llava", "llava_next", "mllama", "all")}
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())

device = "cuda" if torch.cuda.is_available() else "cpu"
shape = shape or ("7b" if device == "cuda" else "smol")
rank, world_size = 0, 1
if fsdp:  # compute_init makes cuda:LOCAL_RANK each rank's "cuda"; a bad launch is shard_model's one-line error
    from common import compute_init, shard_model
    _, rank, _, world_size, _ = compute_init(device)
    if family != "llava" or shape == "smol":
        raise InputError(f"--fsdp=True benchmarks the L-PPO iteration of --family=llava at --shape=7b (or tiny); "
                         f"got --family={family} --shape={shape}")
batch_size = batch_size or (8 if shape == "smol" else 16)
max_new_tokens = max_new_tokens or (64 if shape == "smol" else 128)
dtype = getattr(torch, precision) if device == "cuda" else torch.float32
if shape == "smol" and family != "llava":
    raise InputError(f"--family={family} runs at --shape=7b or --shape=tiny; the smol world is LLaVA-1.5 only")
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = precision != "float32"  # TF32 would blur a float32 comparison


def package_version(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_name():
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo has them (a bare "AMD EPYC" may be
    a Zen 3 or a Zen 4 core)."""
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        if "model name" in info:
            return f"{info['model name']} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"
    return platform.processor() or platform.machine()


def isa():
    """The vector instructions the CPU kernels run on: ATen's choice (ATEN_CPU_CAPABILITY may lower it), and the caps
    that oneDNN (ONEDNN_MAX_CPU_ISA) and MKL (MKL_ENABLE_INSTRUCTIONS) were given, if any."""
    caps = {"aten": torch.backends.cpu.get_cpu_capability()}
    caps.update({name: os.environ[var] for name, var in (("onednn_max", "ONEDNN_MAX_CPU_ISA"),
                                                         ("mkl", "MKL_ENABLE_INSTRUCTIONS")) if var in os.environ})
    return caps


MACHINE = {"cpu": cpu_name(), "isa": isa(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "torch": torch.__version__,
           "transformers": package_version("transformers"), "peft": package_version("peft")}


def report(**kw):
    if rank == 0:
        print(json.dumps({**kw, **MACHINE}), flush=True)


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def best_of(fns):
    """{name: (first output, best seconds)} of each function run `repeats` times, the functions taking turns."""
    out = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            o, t = timed(fn)
            out[name] = (out.get(name, (o,))[0], min(t, out.get(name, (None, t))[1]))
    return out


# -----------------------------------------------------------------------------
# The roofline of a decode step: it must read every weight of the decoder and the head once, and the keys and values
# of every position so far; it does 2 FLOPs per weight per row, plus attention. Whichever takes longer at the
# machine's measured read bandwidth and matmul speed bounds the tokens per second.

def machine_speed():
    """(bytes/s that a sum over a large tensor reads; FLOP/s of a large matmul in `dtype`, through model.linear)."""
    big = torch.ones(2 ** 28 if device == "cuda" else 2 ** 26, device=device)
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    speed = best_of({"read": lambda: big.sum(), "matmul": lambda: linear(a, a)})
    return big.numel() * 4 / speed["read"][1], 2 * 2048 ** 3 / speed["matmul"][1]


def report_roofline(vlm, batch, context, tok_per_s, bandwidth, flops):
    """Print the bound of a decode step at `batch` rows over `context` cached positions, next to the measured speed."""
    text = vlm.config.text
    weights = [p for n, p in vlm.language_model.named_parameters() if not n.startswith("embed_tokens")]
    weights.append(vlm.lm_head.weight)
    w_bytes = sum(p.numel() * p.element_size() for p in weights)
    kv_bytes = 2 * text.num_hidden_layers * batch * text.num_key_value_heads * text.head_dim * context * \
        weights[0].element_size()
    step_flops = 2 * batch * sum(p.numel() for p in weights) + \
        4 * text.num_hidden_layers * batch * text.num_attention_heads * text.head_dim * context
    memory_s, compute_s = (w_bytes + kv_bytes) / bandwidth, step_flops / flops
    report(what="decode_roofline", batch=batch, context=context, weight_bytes=w_bytes, kv_bytes=kv_bytes,
           flops=step_flops, read_gb_per_s=bandwidth / 1e9, matmul_gflop_per_s=flops / 1e9,
           bound="memory" if memory_s > compute_s else "compute", bound_tok_per_s=batch / max(memory_s, compute_s),
           ours_tok_per_s=tok_per_s, ours_frac_of_bound=tok_per_s * max(memory_s, compute_s) / batch)


# -----------------------------------------------------------------------------
# smol on a CPU: ours vs transformers' generate, a LoRA step vs peft's, and sft.py's step

def smol_batch(cfg, B, T, n_label, g):
    """B rows of T random tokens with cfg.image_seq_length image tokens after the first five, the last n_label
    labelled, and B random images."""
    ids = torch.randint(3, cfg.image_token_id, (B, T), generator=g)
    ids[:, 0] = 1
    ids[:, 5:5 + cfg.image_seq_length] = cfg.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, T - n_label:] = ids[:, T - n_label:]
    pixels = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ids, labels, torch.ones_like(ids), pixels


def training_steps(vlm, hf, ids, labels, mask, pixels):
    """{"ours": step, "ours_padded": step, "peft": step}: forward, backward and AdamW step on the same batch. Ours
    computes the vocabulary head only where a label follows and the decoder only on the real tokens (sft.py's step),
    ours_padded the decoder on the padding too (sft.py's step without unpadded_logits); transformers computes the
    vocabulary head everywhere (its labels= loss)."""
    from sft import sft_loss, target_positions
    n_target = int((labels[:, 1:] != -100).sum())
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for name, m in (("ours", vlm), ("peft", hf))}

    def step(name, loss_fn):
        loss = loss_fn()
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return loss.item()

    ours_logits = lambda unpadded: vlm(ids, pixels, None, mask, logits_at=target_positions(labels), unpadded=unpadded)
    return {"ours": lambda: step("ours", lambda: sft_loss(ours_logits(True), labels, n_target)),
            "ours_padded": lambda: step("ours", lambda: sft_loss(ours_logits(False), labels, n_target)),
            "peft": lambda: step("peft", lambda: hf(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                                                    labels=labels).loss)}


def smol_bench():
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration
    from sft import collate
    if not os.path.isfile(os.path.join(smol_path, "config.json")):
        raise InputError(f"{smol_path}: no smol checkpoint folder; data/smol/world.py builds it (or pass --smol_path)")
    vlm = VLM.from_pretrained(smol_path)
    hf = LlavaForConditionalGeneration.from_pretrained(smol_path, dtype=torch.float32).eval()
    cfg = vlm.config
    g = torch.Generator().manual_seed(seed)
    bandwidth, flops = machine_speed()

    # 1. greedy decoding, every row the same prompt length, no early stop
    for B in sorted({1, batch_size}):
        ids, _, mask, pixels = smol_batch(cfg, B, 1 + prompt_text_tokens + cfg.image_seq_length, 0, g)
        with torch.no_grad():
            r = best_of({
                "ours": lambda: vlm.generate(ids, mask, pixels, max_new_tokens=max_new_tokens)[0],
                "transformers": lambda: hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                                    max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                                    do_sample=False, eos_token_id=None,
                                                    pad_token_id=cfg.pad_token_id)[:, ids.shape[1]:]})
        (ours_tok, t_ours), (ref_tok, t_hf) = r["ours"], r["transformers"]
        report(what="smol_generate", batch=B, prompt_len=ids.shape[1], new_tokens=max_new_tokens,
               ours_tok_per_s=B * max_new_tokens / t_ours, transformers_tok_per_s=B * max_new_tokens / t_hf,
               speedup=t_hf / t_ours, same_tokens_frac=(ours_tok == ref_tok).float().mean().item())
        report_roofline(vlm, B, ids.shape[1] + max_new_tokens // 2, B * max_new_tokens / t_ours, bandwidth, flops)

    # 2. one LoRA training step, r=16 on the attention projections, ours vs peft
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    ids, labels, mask, pixels = smol_batch(cfg, batch_size, 124 + 64, 64, g)
    add_lora(vlm.train(), targets, r=16, alpha=32)
    peft_target = rf".*language_model.*\.({'|'.join(targets)})"  # as save_peft_adapter writes it
    hf = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, target_modules=peft_target)).train()
    r = best_of(training_steps(vlm, hf, ids, labels, mask, pixels))
    n_tok = ids.numel()
    report(what="smol_lora_step", batch=batch_size, seq_len=ids.shape[1], labelled=64, lora_r=16, targets=targets,
           ours_tok_per_s=n_tok / r["ours"][1], peft_tok_per_s=n_tok / r["peft"][1],
           speedup=r["peft"][1] / r["ours"][1],
           ours_first_loss=r["ours"][0], peft_first_loss=r["peft"][0])

    # 3. sft.py's step with config/smol_sft.py's LoRA, on rows of the safety data's lengths (86-146 tokens, 2-66
    # labelled), right-padded by sft.collate
    settings = {}
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "smol_sft.py")).read(), {}, settings)
    B = settings["batch_size"]
    lengths = torch.randint(86, 147, (B,), generator=g).tolist()
    examples = []
    for n in lengths:
        row_ids, row_labels, _, _ = smol_batch(cfg, 1, n, int(torch.randint(2, 67, (), generator=g)), g)
        examples.append({"input_ids": row_ids[0].tolist(), "labels": row_labels[0].tolist()})
    ids, labels, mask = collate(examples, cfg.pad_token_id)
    pixels = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    vlm = VLM.from_pretrained(smol_path).train()
    add_lora(vlm, settings["lora_targets"], settings["lora_r"], settings["lora_alpha"])
    hf = hf.unload()
    peft_target = rf".*language_model.*\.({'|'.join(settings['lora_targets'])})"
    hf = get_peft_model(hf, LoraConfig(r=settings["lora_r"], lora_alpha=settings["lora_alpha"],
                                       target_modules=peft_target)).train()
    steps = training_steps(vlm, hf, ids, labels, mask, pixels)

    def ours_mkl():
        model.ONEDNN = False
        try:
            return steps["ours_padded"]()
        finally:
            model.ONEDNN = True

    r = best_of({"ours": steps["ours"], "ours_padded": steps["ours_padded"], "ours_mkl": ours_mkl,
                 "peft": steps["peft"]})
    report(what="smol_sft_step", config="config/smol_sft.py", batch=B, seq_len=ids.shape[1],
           labelled=int((labels != -100).sum()), padding_frac=1 - mask.float().mean().item(), ours_s=r["ours"][1],
           ours_padded_s=r["ours_padded"][1], ours_mkl_s=r["ours_mkl"][1], peft_s=r["peft"][1],
           speedup_vs_padded=r["ours_padded"][1] / r["ours"][1], speedup_vs_mkl=r["ours_mkl"][1] / r["ours"][1],
           speedup_vs_peft=r["peft"][1] / r["ours"][1])


# -----------------------------------------------------------------------------
# LLaVA-NeXT and Llama 3.2 Vision: ours against transformers on the same random weights, logits and greedy generation

def build_pair(hf_cls, hf_cfg, ours_cls, cfg, rename):
    """transformers' model with random weights in `dtype` on `device`, and ours on the very same tensors."""
    torch.set_default_dtype(dtype)
    with torch.device(device):
        hf = hf_cls(hf_cfg).eval()
    torch.set_default_dtype(torch.float32)
    # ours shares every tensor with transformers' model: no second copy of the 7B weights
    with torch.device("meta"):
        vlm = ours_cls(cfg)
    sd = {rename(k): v for k, v in hf.state_dict().items() if "post_layernorm" not in k}
    missing, unexpected = vlm.load_state_dict(sd, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # a tied head is the embedding
    vlm.language_model.inv_freq = rope_inv_freq(cfg.text).to(device)
    speed_up(vlm)  # as from_pretrained does
    report(what="weights", family=family_name(vlm), params_b=sum(p.numel() for p in hf.parameters()) / 1e9,
           mem_gb=torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None)
    return hf, vlm.eval()


def family_name(vlm):
    if isinstance(vlm, MllamaVLM):
        return "mllama"
    return "llava" if vlm.config.image_grid_pinpoints is None else "llava_next"


def report_parity(vlm, ours, ref, **kw):
    report(what=f"logits_{str(dtype).removeprefix('torch.')}", family=family_name(vlm), **kw,
           max_abs_diff=(ours.float() - ref.float()).abs().max().item(), logit_scale=ref.float().abs().max().item(),
           argmax_agree=(ours.argmax(-1) == ref.argmax(-1)).float().mean().item())


def compare_generate(vlm, hf, ids, mask, ours_kw, hf_kw):
    """Greedy generation of max_new_tokens for every row (no early stop): ours vs transformers' generate with its
    dynamic and its static cache (on a GPU transformers compiles the static one on the first call of a shape, so each
    side is warmed up at full length first), one JSON line."""
    greedy = dict(input_ids=ids, attention_mask=mask, **hf_kw, max_new_tokens=max_new_tokens,
                  min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=vlm.config.pad_token_id)
    ours_fn = lambda: vlm.generate(ids, mask, **ours_kw, max_new_tokens=max_new_tokens)[0]
    with torch.no_grad():
        ours_fn()
        ours_tok, t_ours = timed(ours_fn)
        hf.generate(**greedy)
        ref_tok, t_hf = timed(lambda: hf.generate(**greedy))
        hf.generate(**greedy, cache_implementation="static")
        static_tok, t_static = timed(lambda: hf.generate(**greedy, cache_implementation="static"))
    ref_tok, static_tok = ref_tok[:, ids.shape[1]:], static_tok[:, ids.shape[1]:]
    n, B = ours_tok.shape[1], ids.shape[0]
    report(what="generate", family=family_name(vlm), batch=B, prompt_len=ids.shape[1], new_tokens=max_new_tokens,
           ours_s=t_ours, ours_tok_per_s=B * max_new_tokens / t_ours,
           transformers_s=t_hf, transformers_tok_per_s=B * max_new_tokens / t_hf,
           transformers_static_s=t_static, transformers_static_tok_per_s=B * max_new_tokens / t_static,
           speedup=t_hf / t_ours, speedup_vs_static=t_static / t_ours,
           same_tokens_frac=(ours_tok == ref_tok[:, :n]).float().mean().item(),
           same_tokens_frac_static=(ours_tok == static_tok[:, :n]).float().mean().item())


def llava_next_bench():
    """llava-v1.6-vicuna-7b's shapes: CLIP ViT-L/14-336, its five anyres canvases, Vicuna-7B; every row a 480x640
    photo (a 2x2 grid of crops and the base view: 5 crops, 2,340 image tokens). Tiny: tests/test_model_next.py's."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    if shape == "tiny":
        # 8 layers (the tests have 4), so that image_layer 5 exists and differs from -2
        cfg = VLMConfig(vision=CLIPConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
                                          image_size=28, patch_size=7),
                        text=LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                         max_position_embeddings=256),
                        image_token_id=120, pad_token_id=121, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
        size, vocab_text = (21, 28), 100  # 480x640 scaled to the 28-px tower
    else:
        cfg = VLMConfig(vision=CLIPConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=336, patch_size=14),
                        text=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
                        image_token_id=32000, pad_token_id=32001, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
        size, vocab_text = (480, 640), 32000
    hf, vlm = build_pair(LlavaNextForConditionalGeneration, LlavaNextConfig.from_dict(config_to_hf(cfg)), VLM, cfg,
                         from_hf_key)
    # BOS, five words, the image's tokens, the rest of the text: every row the same length, so no padding
    g = torch.Generator().manual_seed(seed)
    n_image = image_token_count(cfg, *size)
    text = torch.randint(3, vocab_text, (batch_size, prompt_text_tokens), generator=g)
    ids = torch.cat([torch.ones(batch_size, 1, dtype=torch.long), text[:, :5],
                     torch.full((batch_size, n_image), cfg.image_token_id), text[:, 5:]], 1).to(device)
    mask = torch.ones_like(ids)
    rows, cols = anyres_grid(cfg, *size)
    S = cfg.vision.image_size
    pixels = torch.randn(batch_size, 1 + rows * cols, 3, S, S, generator=g).to(device, dtype)
    sizes = torch.tensor([size] * batch_size, device=device)
    with torch.no_grad():
        for layer in (image_layer, -2):
            ours = vlm(ids[:2], pixel_values=pixels[:2], image_layer=layer, image_sizes=sizes[:2])
            ref = hf(input_ids=ids[:2], pixel_values=pixels[:2], image_sizes=sizes[:2], vision_feature_layer=layer).logits
            report_parity(vlm, ours, ref, image_layer=layer, prompt_len=ids.shape[1])
    if not parity_only:
        # ours never generates the image placeholder (its next forward would splice image features into it, see
        # VLM.response_logits); transformers would: it is told to suppress it too
        compare_generate(vlm, hf, ids, mask, dict(pixel_values=pixels, image_sizes=sizes, image_layer=image_layer),
                         dict(pixel_values=pixels, image_sizes=sizes, vision_feature_layer=image_layer,
                              suppress_tokens=[cfg.image_token_id]))


def mllama_bench():
    """Llama-3.2-11B-Vision's shapes: a 32-layer local and 8-layer global ViT, 1280 wide, taps [3, 7, 15, 23, 30],
    4 tiles of 560 px per image; a 40-layer text model, 4096 wide, cross-attention at [3, 8, ..., 38]. Tiny:
    tests/test_model_mllama.py's config "a". transformers has no early exit of the vision model, so the logits are
    compared with the whole local ViT (image_layer None), and so is generation."""
    from transformers import MllamaConfig as HFMllamaConfig, MllamaForConditionalGeneration
    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16 if shape == "tiny" else 8192}
    if shape == "tiny":
        cfg = MllamaConfig(vision=MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                                     num_global_layers=2, attention_heads=4, image_size=14, patch_size=7,
                                                     vision_output_dim=96, intermediate_layers_indices=[1, 3]),
                           text=MllamaTextConfig(vocab_size=128, hidden_size=48, intermediate_size=96,
                                                 num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                                                 rms_norm_eps=1e-5, max_position_embeddings=256,
                                                 rope_theta=500000.0, rope_scaling=llama3_rope,
                                                 cross_attention_layers=[1, 3]),
                           image_token_id=128, pad_token_id=121)
        bos, eos, vocab_text = 1, 2, 100
    else:
        cfg = MllamaConfig(text=MllamaTextConfig(vocab_size=128256, intermediate_size=14336, num_hidden_layers=40,
                                                 num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                                                 rope_scaling=llama3_rope, max_position_embeddings=131072))
        bos, eos, vocab_text = 128000, [128001, 128008, 128009], 128000
    hf_cfg = mllama_config_to_hf(cfg)
    hf_cfg["text_config"].update(bos_token_id=bos, eos_token_id=eos)  # transformers' defaults lie outside a tiny vocab
    hf_cfg = HFMllamaConfig(**hf_cfg)
    hf, vlm = build_pair(MllamaForConditionalGeneration, hf_cfg, MllamaVLM, cfg, mllama_from_hf_key)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the init's zero gates would shut the image out of the text: the comparison must see it
        for name, p in hf.named_parameters():
            if "gate" in name and "proj" not in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p))
    # transformers 5 reads vision tap i after i + 1 local layers, Meta's code and ours after i (tests/
    # test_model_mllama.py): against transformers 5 ours runs with every tap one layer later
    if int(package_version("transformers").split(".")[0]) >= 5:
        vlm.config.vision.intermediate_layers_indices = [i + 1 for i in cfg.vision.intermediate_layers_indices]
    # BOS, <|image|>, text: every row one image of 4 tiles (a 2x2 canvas), the same length, no padding
    ids = torch.cat([torch.tensor([[bos, cfg.image_token_id]]).expand(batch_size, 2),
                     torch.randint(3, vocab_text, (batch_size, prompt_text_tokens), generator=g)], 1)
    tiles, S = cfg.vision.max_num_tiles, cfg.vision.image_size
    images = dict(pixel_values=torch.randn(batch_size, 1, tiles, 3, S, S, generator=g).to(device, dtype),
                  aspect_ratio_ids=torch.full((batch_size, 1), cfg.vision.supported_aspect_ratios.index([2, 2]) + 1,
                                              device=device),
                  aspect_ratio_mask=torch.ones(batch_size, 1, tiles, dtype=torch.long, device=device),
                  cross_attention_mask=mllama_cross_attention_mask(ids, cfg.image_token_id, [[tiles]] * batch_size,
                                                                   tiles).to(device))
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    two = {k: v[:2] for k, v in images.items()}
    with torch.no_grad():
        ours = vlm(ids[:2], **two)
        ref = hf(input_ids=ids[:2], **two).logits
    report_parity(vlm, ours, ref, image_layer=None, prompt_len=ids.shape[1],
                  cross_tokens=tiles * cfg.vision.num_patches)
    if not parity_only:
        compare_generate(vlm, hf, ids, mask, images, images)


if shape == "smol":
    smol_bench()
    raise SystemExit
for name, bench in (("llava_next", llava_next_bench), ("mllama", mllama_bench)):
    if family in (name, "all"):
        bench()
        gc.collect()  # one family's 7-11B weights must be gone before the next family's are made
        if device == "cuda":
            torch.cuda.empty_cache()
if family not in ("llava", "all"):
    raise SystemExit


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
hf, vlm = build_pair(LlavaForConditionalGeneration, LlavaConfig.from_dict(config_to_hf(cfg)), VLM, cfg, from_hf_key)

# a batch: BOS, some text, 576 image tokens, some text (all rows the same length here)
g = torch.Generator().manual_seed(seed)
T_text = prompt_text_tokens
ids = torch.randint(3, 32000, (batch_size, T_text + 1), generator=g)
ids[:, 0] = 1
ids = torch.cat([ids[:, :6], torch.full((batch_size, cfg.image_seq_length), 32000), ids[:, 6:]], 1).to(device)
mask = torch.ones_like(ids)
pixels = torch.randn(batch_size, 3, 336, 336, generator=g).to(device, dtype)

if not fsdp:  # under FSDP2 the L-PPO iteration alone: every rank would run transformers' whole model too
    # 1a. logits parity (float32 parity on tiny checkpoints is also tested on CPU in tests/test_model.py)
    with torch.no_grad():
        for layer in (image_layer, -2):
            ours = vlm(ids[:2], pixel_values=pixels[:2], image_layer=layer).float()
            ref = hf(input_ids=ids[:2], pixel_values=pixels[:2], vision_feature_layer=layer).logits.float()
            report(what=f"logits_{str(dtype).removeprefix('torch.')}", image_layer=layer,
                   max_abs_diff=(ours - ref).abs().max().item(), logit_scale=ref.abs().max().item(),
                   argmax_agree=(ours.argmax(-1) == ref.argmax(-1)).float().mean().item())

    if parity_only:
        raise SystemExit
    # 1b. greedy generation, no early stop: ours (static KV cache) vs transformers' generate, with its default
    # dynamic cache and with its static one (which transformers compiles on the first call of a shape: it warms up at
    # full length)
    hf_greedy = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, vision_feature_layer=image_layer,
                     max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                     pad_token_id=32001)
    with torch.no_grad():
        vlm.generate(ids, mask, pixel_values=pixels, image_layer=image_layer, max_new_tokens=4)  # warm-up
        (ours_tok, _), t_ours = timed(lambda: vlm.generate(ids, mask, pixel_values=pixels, image_layer=image_layer,
                                                           max_new_tokens=max_new_tokens))
        hf.generate(**{**hf_greedy, "max_new_tokens": 4, "min_new_tokens": 4})
        ref_tok, t_hf = timed(lambda: hf.generate(**hf_greedy))
        hf.generate(**hf_greedy, cache_implementation="static")
        static_tok, t_static = timed(lambda: hf.generate(**hf_greedy, cache_implementation="static"))
    ref_tok, static_tok = ref_tok[:, ids.shape[1]:], static_tok[:, ids.shape[1]:]
    n = min(ours_tok.shape[1], ref_tok.shape[1])
    report(what="generate", batch=batch_size, prompt_len=ids.shape[1], new_tokens=max_new_tokens,
           ours_s=t_ours, ours_tok_per_s=batch_size * max_new_tokens / t_ours,
           transformers_s=t_hf, transformers_tok_per_s=batch_size * max_new_tokens / t_hf,
           transformers_static_s=t_static, transformers_static_tok_per_s=batch_size * max_new_tokens / t_static,
           speedup=t_hf / t_ours, speedup_vs_static=t_static / t_ours,
           same_tokens_frac=(ours_tok[:, :n] == ref_tok[:, :n]).float().mean().item(),
           same_tokens_frac_static=(ours_tok[:, :n] == static_tok[:, :n]).float().mean().item())
    report_roofline(vlm, batch_size, ids.shape[1] + max_new_tokens // 2, batch_size * max_new_tokens / t_ours,
                    *machine_speed())
    del hf, ref_tok, static_tok
    if device == "cuda":
        torch.cuda.empty_cache()
else:
    del hf

# -----------------------------------------------------------------------------
# 2. one L-PPO iteration with config/llava15_l5.py's settings
settings = {}
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "llava15_l5.py")).read(), {}, settings)
B, mb, micro = batch_size, settings["minibatch_size"], settings["micro_batch_size"]  # batch_size, not the config's
mb, micro = min(mb, B), min(micro, B)
gpt2_large = GPT2Config(n_embd=1280, n_layer=36, n_head=20) if shape == "7b" else GPT2Config(n_embd=64, n_layer=2, n_head=4)
with torch.device(device):
    rm = RewardModel("gpt2", gpt2_large, pad_token_id=50256).to(dtype)
    rm.head.float()
    speed_up(rm.backbone)  # as RewardModel.from_pretrained does
with torch.no_grad():
    for p in rm.parameters():
        p.normal_(std=0.02)
vlm.add_value_head()
torch.manual_seed(seed)
add_lora(vlm, targets=settings["lora_targets"], r=settings["lora_r"], alpha=settings["lora_alpha"])
if fsdp:
    shard_model(vlm, True, world_size, device)
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
peak = torch.tensor(float(torch.cuda.max_memory_allocated() if device == "cuda" else 0), device=device)
if fsdp:
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)  # the rank that needs the most
report(what="lppo_iteration", config="config/llava15_l5.py", rollouts=B * world_size, ranks=world_size,
       sharding="FSDP2" if fsdp else None, new_tokens=tokens.shape[1], seq_len=ids.shape[1] + tokens.shape[1],
       ppo_epochs=settings["ppo_epochs"], rollout_s=t_roll, score_s=t_score, ref_and_values_s=t_ref,
       update_s=t_update, total_s=time.perf_counter() - t0,
       peak_mem_gb=peak.item() / 2**30 if device == "cuda" else None)
if fsdp:
    torch.distributed.destroy_process_group()
