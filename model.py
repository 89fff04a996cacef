"""
The networks of a LLaVA-style vision-language model, in plain PyTorch, and their loading.

    image -> CLIP ViT (stop after `image_layer` blocks) -> projector -> image tokens
    text  -> embed_tokens ---------------------------------------------> text tokens
    [text tokens with image tokens spliced in] -> Llama decoder -> lm_head -> next-token logits

The default LLaVA-1.5 feature is the CLIP hidden state after 23 of 24 blocks (`vision_feature_layer=-2`).
The ICET vulnerability (Image enCoder Early-exiT) is what happens when the projector is fed the hidden
state of an earlier layer l instead: `vlm(input_ids, pixel_values, image_layer=l)`. Early exit is real
here: asking for layer l runs only the first l CLIP blocks.

Weights come from Hugging Face llava checkpoints (safetensors, any of the three key layouts that exist), LLaVA-1.5
and LLaVA-NeXT (anyres: several crops of an image, every one read at `image_layer`; Vicuna or Mistral text);
only the weights are read, every module below is our own. Module names follow Hugging Face's so that
checkpoint keys map onto them by stripping a prefix.

Read it top to bottom along the LLaVA-1.5 path: CLIP tower with its early exit, projector, Llama decoder with a KV
cache, LoRA, then the VLM that joins them, with the PPO value head and one `generate`. After it: LLaVA-NeXT's anyres,
scoring sampled tokens, checkpoint files, the tokenizer, prompt and image preprocessing. Two fenced sections close the
file: Llama 3.2 Vision (reached only through VLM.from_pretrained), and the speed path (oneDNN matmuls, fused
projections, packed decode weights, the unpadded training forward, compiled decoding) that from_pretrained swaps in
with one call, speed_up. The plumbing the stage scripts share (DDP, atomic writes, file readers, seeds, tables) is in
common.py.
"""

import getpass
import json
import math
import os
import platform
import tempfile
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.distributed.tensor import DTensor

from common import InputError, atomic_folder, atomic_save_safetensors, read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# -----------------------------------------------------------------------------
# Configuration: the few fields we need (config_from_hf reads them from a Hugging Face config.json)

@dataclass
class CLIPConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 0          # 0: same as num_attention_heads (no grouped-query attention)
    head_dim: int = 0                     # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = None             # None, or {"rope_type": "llama3" | "linear", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int = None            # Mistral: each token sees itself and the sliding_window - 1 before it

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class VLMConfig:
    vision: CLIPConfig = field(default_factory=CLIPConfig)
    text: LlamaConfig = field(default_factory=LlamaConfig)
    image_token_id: int = 32000
    pad_token_id: int = 0
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"   # "default" drops the CLS token, "full" keeps it
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    image_grid_pinpoints: list = None     # LLaVA-NeXT: the [height, width] canvases of anyres; None for LLaVA-1.5

    @property
    def image_seq_length(self):
        """Image tokens per image: one per patch, plus the CLS token for the "full" strategy. For LLaVA-NeXT this is the
        base view alone; an image's whole count depends on its size (image_token_count)."""
        n = (self.vision.image_size // self.vision.patch_size) ** 2
        return n + (self.vision_feature_select_strategy == "full")


# -----------------------------------------------------------------------------
# CLIP ViT vision tower, with early exit at any layer

class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, patches, D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch: no mask
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the checkpoint's spelling
        self.encoder = CLIPEncoder(cfg)
        # post_layernorm exists in checkpoints but only normalises the pooled CLS output, which LLaVA never uses.

    def forward(self, pixel_values, layers):
        """Hidden states {l: (B, 1+patches, D)} after l blocks for each l in `layers` (0 = after pre_layrnorm)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        out = {0: x} if 0 in layers else {}
        for i, block in enumerate(self.encoder.layers[:max(layers)]):  # the early exit: later blocks never run
            x = block(x)
            if i + 1 in layers:
                out[i + 1] = x
        return out


class Projector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu: vision width -> text width, exact (erf) GELU between two linears."""

    def __init__(self, cfg):
        super().__init__()
        bias = cfg.multimodal_projector_bias
        self.linear_1 = nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size, bias=bias)
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=bias)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))


# -----------------------------------------------------------------------------
# Llama decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, static KV cache

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 and cast back before the scale, as the reference implementation does
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(cfg):
    """Rotary inverse frequencies theta^(-2i/d), with Llama 3's wavelength-banded rescaling if configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    if rs["rope_type"] == "linear":
        return inv_freq / rs["factor"]
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache(nn.Module):
    """Preallocated keys and values for every layer; fixed shapes keep a compiled decode step from recompiling."""

    def __init__(self, n_layers, batch, n_kv_head, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (n_layers, batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, layer, pos, k, v):
        """Write k, v (B, H, T, hd) at cache positions `pos` (T,), return the layer's whole cache."""
        self.k[layer].index_copy_(2, pos, k)
        self.v[layer].index_copy_(2, pos, v)
        return self.k[layer], self.v[layer]


class LlamaAttention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=b)

    def qkv(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            # the mask's key axis says how many cache positions are in use: a decode step attends to those only
            k, v = cache.update(self.layer_idx, cache_pos, k, v)
            k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        # grouped-query attention: each key/value head serves n_head // n_kv_head query heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class LlamaLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_mask(key_valid, q_pos, k_pos, window=None):
    """Boolean (B, 1, Tq, Tk) mask: causal, no padding keys, and each query always sees itself.
    With a sliding `window` (Mistral), a query sees only the keys less than `window` positions back.

    Seeing itself keeps left-padding rows (which have no valid key) finite: a fully masked row would turn
    into NaN, and NaN times a zero attention weight is still NaN in every later layer.
    """
    causal = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        causal = causal & (k_pos[None, :] > q_pos[:, None] - window)
    mask = (causal[None] & key_valid[:, None, :]) | (k_pos[None, :] == q_pos[:, None])[None]
    return mask[:, None]


class LlamaModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, x, position_ids, mask, cache=None, cache_pos=None):
        """Run embeddings x (B, T, D) at positions (B, T) under a boolean mask; return the final-normed states."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim): the same rotation for every head
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, cache_pos)
        return self.norm(x)


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021): W x + (alpha / r) * B A x, with B = 0 at the start so the model is unchanged

class LoRALinear(nn.Module):
    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        self.base = base
        self.r, self.scale = r, alpha / r
        p = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=p.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=p.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the same init as nn.Linear, and as peft
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + F.linear(F.linear(self.dropout(x), a) * self.scale, b)  # scaled at rank r: the thinnest point

    def merged_weight(self):
        return self.base.weight + (self.lora_B @ self.lora_A * self.scale).to(self.base.weight.dtype)


def add_lora(model, targets=("q_proj", "k_proj", "v_proj", "o_proj"), r=8, alpha=16, dropout=0.0):
    """Wrap the linears named in `targets` with LoRA and freeze everything else but a value head. In a VLM only the
    language model is adapted (CLIP has q_proj/k_proj/v_proj too); any other module is adapted throughout."""
    for p in model.parameters():
        p.requires_grad_(False)
    root = model.language_model if isinstance(model, VLM) else model
    n = 0
    for module in list(root.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                wrap = getattr(child, "lora_class", LoRALinear)  # a linear of speed_up's brings its own
                setattr(module, child_name, wrap(child, r, alpha, dropout))
                n += 1
    if n == 0:
        names = sorted({name for name, m in root.named_modules() if isinstance(m, nn.Linear) for name in
                        [name.rpartition(".")[2]]})
        raise InputError(f"LoRA targets {list(targets)} match no linear layer (expected names from {', '.join(names)})")
    if getattr(model, "value_head", None) is not None:
        model.value_head.requires_grad_(True)
    model.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets)}
    return model


def lora_modules(vlm):
    return [m for m in vlm.modules() if isinstance(m, LoRALinear)]


@contextmanager
def lora_disabled(vlm):
    """The base model, adapters switched off: PPO's reference policy shares every weight with the policy."""
    mods = lora_modules(vlm)
    for m in mods:
        m.enabled = False
    try:
        yield vlm
    finally:
        for m in mods:
            m.enabled = True


def merge_lora(vlm):
    """Fold every adapter into its base weight and remove the LoRA wrappers."""
    for module in list(vlm.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight.copy_(child.merged_weight())
                setattr(module, name, child.base)
    vlm.lora_config = None
    return vlm


# -----------------------------------------------------------------------------
# Sampling: one token per row, greedy or from the (nucleus of the) softmax at a temperature

def sample_token(logits, temperature, top_p, generator=None, logprob=True):
    """Draw one token per row from float32 logits (B, V); return it and its log-probability (greedy with
    logprob=False: None, as argmax needs no normalisation)."""
    if temperature == 0:
        tok = logits.argmax(-1)
        if not logprob:
            return tok, None
        # the chosen token's logit minus logsumexp: no (B, V) log_softmax for the one value per row that is kept
        return tok, logits.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(logits, -1)
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    if top_p < 1.0:
        # nucleus: keep the smallest set of most-likely tokens whose mass reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


# -----------------------------------------------------------------------------
# The VLM: vision tower + projector + Llama decoder (+ an optional value head for PPO)

class VLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.vision_tower = CLIPVisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg)
        if cfg.image_grid_pinpoints is not None:  # LLaVA-NeXT: the learned token that ends each row of an image's grid
            self.image_newline = nn.Parameter(torch.empty(cfg.text.hidden_size))
        self.language_model = LlamaModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.value_head = None
        self.lora_config = None

    # the keyword inputs beyond pixel_values that this family's forward, hidden_states and generate take for its
    # images, as encode_batch returns them; per_token_inputs among them have a token axis (dim 1) beside input_ids'
    per_token_inputs = ()

    @property
    def image_inputs(self):
        return ("image_sizes",) if self.config.image_grid_pinpoints is not None else ()

    def add_value_head(self):
        """A scalar value per token for PPO's critic, read off the decoder's final hidden state."""
        p = self.lm_head.weight
        self.value_head = nn.Linear(self.config.text.hidden_size, 1, device=p.device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        return self.value_head

    def values(self, hidden):
        """(B, T) float32 values; the head runs in float32 even when the decoder runs in bf16."""
        return self.value_head(hidden.float()).squeeze(-1)

    def image_layer_index(self, layer):
        """Map a hidden_states index (None = checkpoint default, negative counts from the end) to 0..L."""
        L = self.config.vision.num_hidden_layers
        layer = self.config.vision_feature_layer if layer is None else int(layer)
        if not -(L + 1) <= layer <= L:
            raise InputError(f"image layer {layer} is out of range for a {L}-layer vision tower "
                             f"(expected {-(L + 1)}..{L}, or None for the default {self.config.vision_feature_layer})")
        return layer % (L + 1)

    def vision_features(self, pixel_values, layer=None, image_sizes=None):
        """(B, N, D_vision) hidden state of CLIP layer `layer` (int, or one per image), CLS dropped for 'default'.
        LLaVA-NeXT, pixel_values (B, crops, 3, H, W) with image_sizes (B, 2): one row per crop of every image, in order
        (anyres_crops), each at its image's layer."""
        B = pixel_values.shape[0]
        per_image = isinstance(layer, (list, tuple)) or (torch.is_tensor(layer) and layer.ndim == 1)
        layers = [self.image_layer_index(l) for l in layer] if per_image else [self.image_layer_index(layer)] * B
        if len(layers) != B:
            raise InputError(f"got {len(layers)} image layers for {B} images; expected one per image")
        if self.config.image_grid_pinpoints is not None:
            pixel_values, layers = anyres_crops(self.config, pixel_values, image_sizes, layers)
        p = self.vision_tower.embeddings.patch_embedding.weight
        hs = self.vision_tower(pixel_values.to(p.dtype), set(layers))
        x = hs[layers[0]] if len(hs) == 1 else torch.stack([hs[l][i] for i, l in enumerate(layers)])
        return x[:, 1:] if self.config.vision_feature_select_strategy == "default" else x

    def embed(self, input_ids, pixel_values=None, image_layer=None, image_sizes=None):
        """Token embeddings with the image-token positions replaced by projected layer-`image_layer` features."""
        x = self.language_model.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        # the count is data: torch.compile would break its graph here, so the compiled training forward (sft.py) skips
        # the check; its batches are built with exactly image_seq_length image tokens per image (fit_prompt)
        n = None if torch.compiler.is_compiling() else int(is_image.sum())
        if pixel_values is None:
            if n:
                raise InputError(f"input_ids hold {n} image tokens but no pixel_values were given")
            return x
        feats = self.multi_modal_projector(self.vision_features(pixel_values, image_layer, image_sizes))
        if self.config.image_grid_pinpoints is not None:
            feats = pack_anyres(self.config, feats, image_sizes, self.image_newline)
            if n is not None and n != feats.shape[0]:
                raise InputError(f"input_ids hold {n} image tokens, expected {feats.shape[0]} for images of sizes "
                                 f"{torch.as_tensor(image_sizes).tolist()} (expand <image> to image_token_count "
                                 "tokens per image, see encode_batch)")
            return x.masked_scatter(is_image[..., None], feats.to(x.dtype))
        if n is not None and n != feats.shape[0] * feats.shape[1]:
            raise InputError(f"input_ids hold {n} image tokens, expected {feats.shape[0]} images x {feats.shape[1]} "
                             "(expand <image> to config.image_seq_length tokens per image, see encode_batch)")
        return x.masked_scatter(is_image[..., None], feats.to(x.dtype))

    def hidden_states(self, input_ids, pixel_values=None, image_layer=None, attention_mask=None, image_sizes=None):
        """The decoder's final (normed) hidden states (B, T, D), image tokens taken from layer `image_layer`.

        With padding, pass attention_mask: positions then count from each row's first real token,
        so a left-padded row gives the same result as that row alone. LLaVA-NeXT also needs image_sizes.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.decoder_states(self.embed(input_ids, pixel_values, image_layer, image_sizes), attention_mask)

    def decoder_states(self, x, attention_mask):
        """hidden_states after the embedding: the decoder on embeddings x (B, T, D); with padding, positions count
        from each row's first real token."""
        T = x.shape[1]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        idx = torch.arange(T, device=x.device)
        window = self.config.text.sliding_window
        return self.language_model(x, position_ids, build_mask(attention_mask.bool(), idx, idx, window))

    def response_logits(self, hidden):
        """Logits for generated tokens: the image placeholder can never be a response token, since the next
        forward pass would splice image features into its slot, so it gets probability 0."""
        logits = self.lm_head(hidden)
        return logits.index_fill(-1, torch.tensor([self.config.image_token_id], device=logits.device), float("-inf"))

    def forward(self, input_ids, pixel_values=None, image_layer=None, attention_mask=None, return_hidden=False,
                logits_at=None, image_sizes=None):
        """Next-token logits (B, T, V); with return_hidden also the final hidden states (B, T, D).
        With `logits_at`, a (B, T) bool mask, only the logits at those positions, (N, V): training needs them only
        where a label follows, and the vocabulary head over every image and prompt position is costly. Under
        torch.compile pass flat indices into the B*T positions instead (a long tensor): N is then a fixed shape."""
        hidden = self.hidden_states(input_ids, pixel_values, image_layer, attention_mask, image_sizes)
        if logits_at is None:
            logits = self.lm_head(hidden)
        else:
            at = hidden[logits_at] if logits_at.dtype == torch.bool else hidden.flatten(0, 1)[logits_at]
            logits = self.lm_head(at)
        return (logits, hidden) if return_hidden else logits

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_layer=None, max_new_tokens=64,
                 temperature=0.0, top_p=1.0, eos_token_id=None, return_logprobs=False, generator=None, check_every=1,
                 **image_inputs):
        """Sample continuations of a left-padded batch with a static KV cache; the one generation loop of every family,
        each of which supplies its prefill (image_inputs: the family's, e.g. LLaVA-NeXT's image_sizes).

        Returns (tokens, logprobs): tokens (B, n) are the new tokens, n <= max_new_tokens, with
        pad_token_id after each row's first EOS (the EOS itself kept). logprobs (B, n) float32 are the
        log-probabilities of the chosen tokens under softmax(response_logits / temperature), the same quantity
        a training step recomputes (top_p only narrows which tokens may be drawn); temperature 0 is greedy
        and scores under softmax(logits). logprobs is None unless return_logprobs.
        Whether every row has ended is asked every `check_every` tokens: on a GPU the question waits for the device
        (a compiled decode step asks every 8); the tokens drawn after the last row ended are cut.
        """
        B = input_ids.shape[0]
        dev = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []), device=dev)
        logits, decode = self.prefill(input_ids, attention_mask, pixel_values, image_layer, max_new_tokens,
                                      **image_inputs)
        tokens, logprobs, all_done = [], [], []
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for t in range(max_new_tokens):
            tok, lp = sample_token(logits, temperature, top_p, generator, return_logprobs)
            tok = torch.where(done, torch.full_like(tok, self.config.pad_token_id), tok)
            tokens.append(tok)
            if return_logprobs:
                logprobs.append(torch.where(done, torch.zeros_like(lp), lp))
            done = done | torch.isin(tok, eos)
            all_done.append(done.all())
            if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(all_done[-1])):
                break
            logits = decode(tok)
        n = len(tokens) - max(int(torch.stack(all_done).sum()) - 1, 0)  # up to the first step after which all ended
        tokens = torch.stack(tokens[:n], 1)
        return tokens, (torch.stack(logprobs[:n], 1) if return_logprobs else None)

    def prefill(self, input_ids, attention_mask, pixel_values, image_layer, max_new_tokens, image_sizes=None):
        """Run the prompt into a new KV cache with room for max_new_tokens more. Returns the float32 next-token logits
        (B, V) and decode(tok): one more token per row, tok (B,), in; the logits after it out."""
        B, T0 = input_ids.shape
        dev = input_ids.device
        cfg = self.config.text
        S = T0 + max_new_tokens
        x = self.embed(input_ids, pixel_values, image_layer, image_sizes)
        window = cfg.sliding_window
        cache = KVCache(cfg.num_hidden_layers, B, cfg.num_key_value_heads, S, cfg.head_dim, x.dtype, dev)
        key_valid = torch.zeros(B, S, dtype=torch.bool, device=dev)
        key_valid[:, :T0] = attention_mask.bool()
        k_pos = torch.arange(S, device=dev)
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        prompt_pos = k_pos[:T0]
        hidden = self.language_model(x, pos, build_mask(key_valid[:, :T0], prompt_pos, prompt_pos, window), cache,
                                     prompt_pos)
        pos, n = pos[:, -1:], T0  # the last token's rotary positions, and the cache positions in use

        def decode(tok):
            nonlocal pos, n
            pos, n = pos + 1, n + 1  # this token's
            cur = k_pos[n - 1:n]
            key_valid[:, n - 1] = True
            # the keys so far are all before this token: no causal mask to build, only padding (and a window)
            mask = key_valid[:, None, None, :n] if window is None else \
                build_mask(key_valid[:, :n], cur, k_pos[:n], window)
            h = self.language_model(self.language_model.embed_tokens(tok[:, None]), pos, mask, cache, cur)
            return self.response_logits(h[:, -1]).float()

        return self.response_logits(hidden[:, -1]).float(), decode

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, fast=True):
        """Load a llava checkpoint folder (or hub id, when online) without ever holding two copies of the weights.
        fast=False keeps the plain modules above, without the speed path (speed_up) that every stage runs.

        A plain Llama checkpoint (the Llama Guard judge) loads as a VLM without an image side: only the decoder and
        lm_head get weights, the vision tower and projector stay on the meta device and must never be called."""
        path = resolve_checkpoint(path)
        where = os.path.join(path, "config.json")
        d = read_json(where)
        if d.get("model_type") == "mllama":
            return MllamaVLM.from_pretrained(path, device, dtype, fast)
        text_only = d.get("model_type") == "llama"
        if text_only:
            d = {"model_type": "llava", "text_config": d, "pad_token_id": d.get("pad_token_id")}
        cfg = config_from_hf(d, where)
        if text_only:
            cfg.image_token_id = -1  # no image token: every id is text
        with torch.device("meta"):
            model = cls(cfg)
        tied = cfg.text.tie_word_embeddings
        to_ours = (lambda k: "language_model." + k[6:] if k.startswith("model.") else k) if text_only else from_hf_key
        rename = lambda k: None if tied and to_ours(k) == "lm_head.weight" else to_ours(k)
        expected = [k for k in model.state_dict() if not (tied and k == "lm_head.weight")
                    and (not text_only or k.startswith(("language_model.", "lm_head.")))]
        load_weights(model, path, rename, device, dtype, expected=expected)
        if tied:
            model.lm_head.weight = model.language_model.embed_tokens.weight
        # the rotary buffer is computed, not stored: rebuild it on the real device
        model.language_model.inv_freq = rope_inv_freq(cfg.text).to(device)
        model.source_path = path  # where the tokenizer lives, also when `path` was a hub id
        return (speed_up(model) if fast else model).eval()  # the speed path, at the end of this file

    def save_pretrained(self, path):
        """Write a llava-hf checkpoint folder (on-disk key layout of llava-hf/llava-1.5-7b-hf), atomically."""
        if lora_modules(self):
            raise InputError("merge_lora(vlm) before save_pretrained: a llava checkpoint has no place for adapters")
        sd = {}
        for k, v in self.state_dict().items():
            if k.startswith("value_head.") or (k == "lm_head.weight" and self.config.text.tie_word_embeddings):
                continue
            sd[to_hf_key(k)] = v.detach().contiguous().cpu()
        with atomic_folder(path) as tmp:
            atomic_save_safetensors(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config_to_hf(self.config), f, indent=2)


# -----------------------------------------------------------------------------
# LLaVA-NeXT's anyres: besides a squashed base view, the image is resized onto the best-fitting canvas of
# image_grid_pinpoints, cut into tower-sized crops, and the crops' features are stitched back into one grid, the
# canvas's padding removed and an image_newline token ending each row. Every rule here is transformers' own
# (select_best_resolution, get_anyres_image_grid_shape, unpad_image, pack_image_features), rounding included.

def select_best_resolution(height, width, pinpoints):
    """The [height, width] canvas that keeps most of the image's pixels and, among those, wastes the fewest."""
    best, best_key = None, None
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (kept, -(w * h - kept))
        if best_key is None or key > best_key:  # strict: the first of equal canvases wins
            best, best_key = (h, w), key
    return best


def anyres_grid(cfg, height, width):
    """(rows, cols) of tower-sized crops that a height x width image is cut into."""
    h, w = select_best_resolution(height, width, cfg.image_grid_pinpoints)
    return h // cfg.vision.image_size, w // cfg.vision.image_size


def unpad_offsets(height, width, grid_h, grid_w):
    """(top, left): rows and columns of a grid_h x grid_w feature grid to cut from each side, the padding that centred
    a height x width image on its canvas."""
    if width / height > grid_w / grid_h:
        return (grid_h - int(round(height * (grid_w / width), 7))) // 2, 0
    return 0, (grid_w - int(round(width * (grid_h / height), 7))) // 2


def image_token_count(cfg, height, width):
    """Image tokens of one height x width image: cfg.image_seq_length for LLaVA-1.5; for LLaVA-NeXT the base view's,
    plus the un-padded grid's, plus one image_newline per grid row."""
    if cfg.image_grid_pinpoints is None:
        return cfg.image_seq_length
    side = cfg.vision.image_size // cfg.vision.patch_size
    rows, cols = anyres_grid(cfg, height, width)
    top, left = unpad_offsets(height, width, rows * side, cols * side)
    grid_h, grid_w = rows * side - 2 * top, cols * side - 2 * left
    return side * side + grid_h * (grid_w + 1)


def anyres_crops(cfg, pixel_values, image_sizes, layers):
    """The crops of every image (base view first; the zero crops that pad a batch dropped) as one (crops, 3, H, W)
    batch, and the image layer of each crop: its image's."""
    if image_sizes is None or pixel_values.ndim != 5:
        missing = "" if image_sizes is not None else ", no image_sizes"
        raise InputError(f"LLaVA-NeXT takes pixel_values (B, crops, 3, H, W) and image_sizes (B, 2); got pixel_values "
                         f"of shape {tuple(pixel_values.shape)}{missing}")
    sizes = torch.as_tensor(image_sizes).tolist()
    if len(sizes) != pixel_values.shape[0]:
        raise InputError(f"got {len(sizes)} image_sizes for {pixel_values.shape[0]} images; expected one each")
    n = [1 + math.prod(anyres_grid(cfg, h, w)) for h, w in sizes]
    if max(n) > pixel_values.shape[1]:
        raise InputError(f"an image of size {sizes[n.index(max(n))]} needs {max(n)} crops, pixel_values has "
                         f"{pixel_values.shape[1]} (preprocess with encode_batch or preprocess_anyres)")
    crops = torch.cat([pv[:k] for pv, k in zip(pixel_values, n)])
    return crops, [layer for layer, k in zip(layers, n) for _ in range(k)]


def pack_anyres(cfg, feats, image_sizes, newline):
    """(tokens, D) image tokens of a batch, image after image, from the projected crop features (crops, N, D): each
    image's base view, then its crops stitched into one feature grid, un-padded, image_newline ending each row."""
    side = cfg.vision.image_size // cfg.vision.patch_size
    out, i = [], 0
    for height, width in torch.as_tensor(image_sizes).tolist():
        rows, cols = anyres_grid(cfg, height, width)
        grid = feats[i + 1:i + 1 + rows * cols].view(rows, cols, side, side, -1)
        grid = grid.permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, -1)  # crop rows side by side
        top, left = unpad_offsets(height, width, rows * side, cols * side)
        grid = grid[top:rows * side - top, left:cols * side - left]
        grid = torch.cat([grid, newline.to(grid.dtype).expand(grid.shape[0], 1, -1)], dim=1)
        out += [feats[i], grid.flatten(0, 1)]
        i += 1 + rows * cols
    return torch.cat(out)


def image_crops(cfg, image, tokens_per_crop):
    """(crops, 3, S, S) CLIP inputs of one image and the indices, into its flattened (crops * tokens_per_crop) crop
    tokens, of those the LM reads: LLaVA-1.5's one view, all of it; LLaVA-NeXT's anyres crops, base view first."""
    if cfg.image_grid_pinpoints is None:
        return preprocess_image(image, cfg.vision.image_size)[None], torch.arange(tokens_per_crop)
    crops, size = preprocess_anyres(image, cfg.vision.image_size, cfg.image_grid_pinpoints)
    # pack the tokens' own indices as the model packs features; image_newline, marked -1, is dropped
    index = torch.arange(len(crops) * tokens_per_crop, dtype=torch.float64).view(len(crops), tokens_per_crop, 1)
    packed = pack_anyres(cfg, index, [size], torch.tensor([-1.0], dtype=torch.float64))[:, 0]
    return crops, packed[packed >= 0].long()


# -----------------------------------------------------------------------------
# Scoring what was sampled: the same temperature as sample_token, so that a rollout's logprobs and the ones PPO
# trains on agree


def first_eos_mask(tokens, eos_id):
    """(B, T) mask that is 1 up to and including each row's first EOS, and a (B,) bool: did the row have an EOS."""
    is_eos = (tokens == eos_id).long()
    # number of EOS strictly before t; the response is everything before the first EOS and that EOS itself
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos
    return (eos_before == 0).long(), is_eos.any(dim=1)


def logprobs_from_logits(logits, tokens, temperature=1.0):
    """log π(token_t) under softmax(logits / temperature)."""
    # old, reference and new logprobs must all see the sampling temperature, or the ratio and KL are off at step 0
    logits = logits.float() / temperature
    # gather minus logsumexp skips building a full (B, T, V) log_softmax tensor
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits, temperature=1.0):
    """Entropy of softmax(logits / temperature) per position."""
    logits = logits.float() / temperature
    # H = -Σ p·log p, where a token with p = 0 (a -inf logit, e.g. the suppressed image token) adds 0, not NaN
    logp = F.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def response_heads(vlm, hidden, tokens, temperature, with_values=True):
    """Logprobs, entropies and values (B, n) of response tokens (B, n), from the decoder's hidden states (B, n, D) one
    position before each: the one scoring of lppo.response_forward."""
    logits = vlm.response_logits(hidden)
    return (logprobs_from_logits(logits, tokens, temperature), entropy_from_logits(logits.detach(), temperature),
            vlm.values(hidden) if with_values else None)


# -----------------------------------------------------------------------------
# Checkpoint files: config.json, key layouts, safetensors shards, LoRA adapter files

def pick_config(cls, d, where):
    """Build dataclass `cls` from the keys of dict `d` it knows; everything else in `d` is ignored."""
    known = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in known and v is not None}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise InputError(f"{where}: {e}") from None


# transformers' MistralConfig defaults where they differ from Llama's: a saved config.json leaves defaults out
MISTRAL_DEFAULTS = {"intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
                    "sliding_window": 4096}


# LlavaNextConfig's default anyres canvases, [height, width], for a 336-px tower
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def config_from_hf(d, where="config.json"):
    """Translate a transformers LlavaConfig or LlavaNextConfig dict (4.x or 5.x spelling) into a VLMConfig."""
    if d.get("model_type") not in ("llava", "llava_next"):
        raise InputError(f"{where}: model_type is {d.get('model_type')!r}, expected 'llava' or 'llava_next' "
                         "(LLaVA-1.5 or LLaVA-NeXT style checkpoints, e.g. llava-hf/llava-1.5-7b-hf)")
    tc = dict(d.get("text_config") or {})
    if tc.get("model_type") == "mistral":
        tc = {**MISTRAL_DEFAULTS, **tc}
    else:
        tc.pop("sliding_window", None)  # only Mistral's attention reads it
    if tc.get("model_type", "llama") not in ("llama", "mistral"):
        raise InputError(f"{where}: text_config.model_type {tc['model_type']!r} is not supported, expected 'llama'")
    # transformers 5 moved rope_theta and rope_scaling into one dict, rope_parameters.
    rope = dict(tc.get("rope_parameters") or tc.get("rope_scaling") or {})
    tc["rope_theta"] = rope.pop("rope_theta", tc.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3", "linear"):
        raise InputError(f"{where}: rope type {rope_type!r} is not supported, expected default, llama3 or linear")
    tc["rope_scaling"] = None if rope_type == "default" else {**rope, "rope_type": rope_type}
    tc["tie_word_embeddings"] = bool(tc.get("tie_word_embeddings", False) or d.get("tie_word_embeddings", False))
    text = pick_config(LlamaConfig, tc, f"{where} text_config")
    if text.hidden_act != "silu":
        raise InputError(f"{where}: text_config.hidden_act {text.hidden_act!r} is not supported, expected 'silu'")
    vision = pick_config(CLIPConfig, d.get("vision_config") or {}, f"{where} vision_config")
    if vision.hidden_act not in ("quick_gelu", "gelu"):
        raise InputError(f"{where}: vision_config.hidden_act {vision.hidden_act!r} is not supported")
    layer = d.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise InputError(f"{where}: vision_feature_layer {layer!r} is a list; only a single layer is supported")
    pad = d.get("pad_token_id", tc.get("pad_token_id"))
    cfg = VLMConfig(
        vision=vision, text=text,
        image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
        pad_token_id=0 if pad is None else pad,
        vision_feature_layer=layer,
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
        projector_hidden_act=d.get("projector_hidden_act", "gelu"),
        multimodal_projector_bias=d.get("multimodal_projector_bias", True),
    )
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise InputError(f"{where}: vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}, "
                         "expected 'default' or 'full'")
    if cfg.projector_hidden_act != "gelu":
        raise InputError(f"{where}: projector_hidden_act {cfg.projector_hidden_act!r} is not supported, expected 'gelu'")
    if d["model_type"] == "llava_next":
        cfg.image_grid_pinpoints = check_pinpoints(d.get("image_grid_pinpoints") or LLAVA_NEXT_PINPOINTS,
                                                   vision.image_size, where)
        if cfg.vision_feature_select_strategy != "default":
            # the CLS token does not fit the crop grid: transformers' LlavaNextModel fails on "full" too
            raise InputError(f"{where}: vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} with "
                             "model_type 'llava_next', expected 'default'")
    return cfg


def check_pinpoints(pinpoints, tile, where):
    """image_grid_pinpoints as a list of [height, width], each a multiple of the tower's image size `tile`."""
    ok = isinstance(pinpoints, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(
        isinstance(v, int) and v > 0 and v % tile == 0 for v in p) for p in pinpoints)
    if not (ok and pinpoints):
        raise InputError(f"{where}: image_grid_pinpoints {str(pinpoints)[:80]}, expected a list of [height, width] "
                         f"pairs, each a multiple of vision_config.image_size {tile}")
    return [list(p) for p in pinpoints]


def config_to_hf(cfg):
    """The inverse of config_from_hf: a config.json that transformers reads as a LlavaConfig or LlavaNextConfig."""
    text = asdict(cfg.text)
    rope = text.pop("rope_scaling") or {"rope_type": "default"}
    text.update(model_type="llama", rope_theta=text["rope_theta"], rope_scaling=None if rope["rope_type"] == "default" else rope)
    if text.pop("sliding_window") is not None:  # Llama has no sliding window; Mistral is Llama with one
        text.update(model_type="mistral", sliding_window=cfg.text.sliding_window)
    out = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "text_config": text, "vision_config": {**asdict(cfg.vision), "model_type": "clip_vision_model"},
        "image_token_index": cfg.image_token_id, "pad_token_id": cfg.pad_token_id,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "image_seq_length": cfg.image_seq_length, "projector_hidden_act": cfg.projector_hidden_act,
        "multimodal_projector_bias": cfg.multimodal_projector_bias,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }
    if cfg.image_grid_pinpoints is not None:
        out.update(architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next",
                   image_grid_pinpoints=cfg.image_grid_pinpoints)
    return out


# Every prefix a llava checkpoint key may carry, mapped to our module names. Order matters: longest first.
KEY_PREFIXES = [
    ("model.language_model.", "language_model."),        # transformers >= 4.52 in memory
    ("language_model.model.", "language_model."),        # llava-hf on disk (transformers < 4.52 and its saves)
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),               # LLaVA-NeXT, transformers >= 4.52 in memory
]
# Present in checkpoints, never used here: CLIP's pooled-output norm, and buffers that are computed, not learned
# (GPT-2's causal-mask tables, Llama's RoPE table, position ids), which older versions saved.
IGNORED_KEY_ENDINGS = ("post_layernorm.weight", "post_layernorm.bias", "position_ids", "rotary_emb.inv_freq",
                       ".attn.bias", ".attn.masked_bias")


def from_hf_key(key, prefixes=None):
    """A checkpoint's key -> our module name, by the first matching prefix of `prefixes` (llava's by default)."""
    for old, new in KEY_PREFIXES if prefixes is None else prefixes:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def to_hf_key(key):
    """Our name -> llava-hf's on-disk name (what transformers 4.x and 5.x both read)."""
    if key.startswith("language_model."):
        return "language_model.model." + key[len("language_model."):]
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("vision_tower."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def resolve_checkpoint(path):
    """A local folder as is; a hub id (owner/name) downloaded with huggingface_hub when the machine is online."""
    path = str(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise InputError(f"{path}: expected a checkpoint folder, found a file")
    if path.count("/") != 1 or path.startswith((".", "/")):
        raise InputError(f"{path}: checkpoint folder not found")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"])
    except Exception as e:
        raise InputError(f"{path}: not a local folder, and downloading it from the Hugging Face hub failed "
                         f"({type(e).__name__}). On a machine with network run `hf download {path} --local-dir "
                         f"checkpoints/{path.split('/')[-1]}`, copy that folder here and pass its path") from None


@contextmanager
def _open_safetensors(path):
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    try:
        f = safe_open(path, framework="pt", device="cpu")
    except Exception as e:
        raise InputError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    yield f


def checkpoint_shards(path):
    """The safetensors files of a checkpoint folder: the index's shards, or the single model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index}: no 'weight_map' object")
        shards = sorted(set(weight_map.values()))
        for s in shards:
            if not os.path.isfile(os.path.join(path, s)):
                raise InputError(f"{index}: shard {s} is listed but missing from {path}")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise InputError(f"{path}: no model.safetensors or model.safetensors.index.json "
                         "(only safetensors checkpoints are supported)")
    return [single]


def _listing(keys, n=8):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def load_weights(module, path, rename, device, dtype, expected=None, transpose=(), float32=()):
    """Copy the tensors of checkpoint folder `path` into `module` (built on the meta device), one tensor at a time,
    so a 7B model never exists twice in memory. The one loader of the VLM, the reward model and the judge.

    rename(checkpoint key) -> the module's key, or None for a tensor the module does not use. `expected`: the keys
    that must be found (default: all of module.state_dict()); any other key of the module stays as it is. Keys ending
    in `transpose` are transposed (GPT-2's Conv1D), keys in `float32` are kept in float32."""
    own = module.state_dict()
    expected = set(own) if expected is None else set(expected)
    loaded, unexpected = {}, []
    for shard in checkpoint_shards(path):
        with _open_safetensors(shard) as f:
            for ckpt_key in f.keys():
                key = None if ckpt_key.endswith(IGNORED_KEY_ENDINGS) else rename(ckpt_key)
                if key is None:
                    continue
                if key not in own:
                    unexpected.append(ckpt_key)
                    continue
                t = f.get_tensor(ckpt_key)
                if transpose and ckpt_key.endswith(transpose):
                    t = t.t()
                if t.shape != own[key].shape:
                    raise InputError(f"{shard}: {ckpt_key} has shape {tuple(t.shape)}, expected "
                                     f"{tuple(own[key].shape)} from config.json")
                loaded[key] = t.to(device=device, dtype=torch.float32 if key in float32 else dtype)
    if unexpected:
        raise InputError(f"{path}: unexpected weights {_listing(unexpected)}")
    missing = expected - set(loaded)
    if missing:
        raise InputError(f"{path}: missing weights {_listing(missing)}")
    module.load_state_dict(loaded, strict=False, assign=True)
    return loaded


def lora_state_dict(vlm):
    return {k: v.detach() for k, v in vlm.state_dict().items() if ".lora_A" in k or ".lora_B" in k}


def save_lora(vlm, path):
    """Save adapters (and the value head, if any) as one safetensors file, atomically."""
    sd = lora_state_dict(vlm)
    if vlm.value_head is not None:
        sd.update({f"value_head.{k}": v.detach() for k, v in vlm.value_head.state_dict().items()})
    meta = {"lora_config": json.dumps(vlm.lora_config)}
    atomic_save_safetensors({k: v.contiguous().cpu() for k, v in sd.items()}, path, metadata=meta)


def save_peft_adapter(vlm, folder, base_model=""):
    """Write the adapters as a PEFT LoRA folder (adapter_model.safetensors + adapter_config.json), so that
    transformers + peft users can load them onto LlavaForConditionalGeneration."""
    cfg = vlm.lora_config
    sd = {}
    for k, v in lora_state_dict(vlm).items():
        # ours: language_model.layers.0.self_attn.q_proj.lora_A -> peft: ...q_proj.lora_A.weight on the HF module tree
        module, _, which = k.rpartition(".")
        sd[f"base_model.model.model.{module}.{which}.weight"] = v.contiguous().cpu()
    adapter_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(base_model),
        "r": cfg["r"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"], "bias": "none",
        # a regex, so that the vision tower's q_proj/k_proj/v_proj are not adapted too
        "target_modules": rf".*language_model.*\.({'|'.join(cfg['targets'])})",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None,
    }
    with atomic_folder(folder) as tmp:
        atomic_save_safetensors(sd, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(adapter_config, f, indent=2)


def load_lora(vlm, path):
    """Load adapters saved by save_lora, adding them (and a value head) to `vlm` first if it has none."""
    with _open_safetensors(path) as f:
        lcfg = json.loads((f.metadata() or {}).get("lora_config", "null"))
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if lcfg is None:
        raise InputError(f"{path}: not a LoRA adapter written by save_lora (no lora_config metadata)")
    if any(k.startswith("value_head.") for k in sd) and vlm.value_head is None:
        vlm.add_value_head()
    if not lora_modules(vlm):
        add_lora(vlm, lcfg["targets"], lcfg["r"], lcfg["alpha"], lcfg["dropout"])
    own = vlm.state_dict()
    for k, v in sd.items():
        if k not in own:
            raise InputError(f"{path}: adapter key {k} does not exist in this model")
        if own[k].shape != v.shape:
            raise InputError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        with torch.no_grad():
            own[k].copy_(v)
    return vlm


# -----------------------------------------------------------------------------
# Tokenizer, prompt and images

def load_tokenizer(path):
    """The checkpoint folder's own tokenizer, from local files only."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise InputError(f"{path}: no usable tokenizer files (tokenizer.json or tokenizer.model; "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def format_prompt(tokenizer, prompt, image=True):
    """The user turn, ready for the assistant's reply: the checkpoint's chat template if it has one,
    else LLaVA-1.5's `USER: <image>\\n{prompt} ASSISTANT:`."""
    text = ("<image>\n" if image else "") + prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return f"USER: {text} ASSISTANT:"


def encode_prompt(tokenizer, cfg, prompt, image=True):
    """Token ids of one formatted prompt, `<image>` expanded to cfg.image_seq_length image tokens, or to `image` of
    them when it is a count (a LLaVA-NeXT image's depends on its size: image_token_count)."""
    if isinstance(cfg, MllamaConfig):
        return mllama_encode_prompt(tokenizer, cfg, prompt, image)
    n_image = cfg.image_seq_length if image is True else int(image)
    image_tok = tokenizer.convert_ids_to_tokens(cfg.image_token_id)
    text = format_prompt(tokenizer, prompt, image).replace("<image>", image_tok * n_image)
    # a chat template writes its own special tokens; the plain LLaVA prompt needs the tokenizer's BOS
    ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
    n = sum(i == cfg.image_token_id for i in ids)
    if n != n_image:
        raise InputError(f"tokenizer turned <image> into {n} image tokens, expected {n_image} "
                         f"(is {image_tok!r} = id {cfg.image_token_id} a special token of this tokenizer?)")
    return ids


def fit_prompt(tokenizer, cfg, prompt, max_len, image=True):
    """(ids, n_cut): encode_prompt's ids, the prompt's text cut from the left by n_cut tokens until they fit max_len.

    The request's end, usually the question, is kept; the image tokens and chat template are never cut: if they
    alone do not fit, InputError."""
    ids, n_cut = encode_prompt(tokenizer, cfg, prompt, image), 0
    while len(ids) > max_len:
        text = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not text:
            raise InputError(f"the image tokens and chat template need {len(ids)} tokens, more than the "
                             f"{max_len} left for the prompt, even with the whole prompt cut")
        over = min(len(ids) - max_len, len(text))
        prompt, n_cut = tokenizer.decode(text[over:]), n_cut + over
        ids = encode_prompt(tokenizer, cfg, prompt, image)
    return ids, n_cut


def left_pad(seqs, pad_id, device="cpu"):
    """Stack ragged id lists into (B, T) input_ids and attention_mask, padding on the left."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
    return ids.to(device), mask.to(device)


def encode_batch(tokenizer, cfg, prompts, images=None, device="cpu", pad_to_square=False, max_len=None):
    """A left-padded batch of prompts (each with its image, or text-only if images is None); with max_len, a
    longer prompt loses the start of its text (fit_prompt). For LLaVA-NeXT also image_sizes, and pixel_values are
    each image's anyres crops, (B, crops, 3, H, W), zero crops padding the batch, as LlavaNextImageProcessor pads;
    for mllama, mllama_encode_batch."""
    if isinstance(cfg, MllamaConfig):
        return mllama_encode_batch(tokenizer, cfg, prompts, images, device, max_len)
    if images is not None and len(images) != len(prompts):
        raise InputError(f"got {len(images)} images for {len(prompts)} prompts; expected one each")
    n_image = [0] * len(prompts) if images is None else [image_token_count(cfg, im.height, im.width) for im in images]
    if max_len is None:
        seqs = [encode_prompt(tokenizer, cfg, p, image=n) for p, n in zip(prompts, n_image)]
    else:
        seqs = [fit_prompt(tokenizer, cfg, p, max_len, image=n)[0] for p, n in zip(prompts, n_image)]
    input_ids, mask = left_pad(seqs, cfg.pad_token_id, device)
    batch = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": None}
    if images is not None and cfg.image_grid_pinpoints is not None:
        if pad_to_square:
            raise InputError("pad_to_square is LLaVA-1.5's; a LLaVA-NeXT checkpoint expects its anyres crops")
        batch.update({k: v.to(device) for k, v in anyres_pixel_values(cfg, images).items()})
    elif images is not None:
        batch["pixel_values"] = torch.stack(
            [preprocess_image(im, cfg.vision.image_size, pad_to_square) for im in images]).to(device)
    return batch


def anyres_pixel_values(cfg, images):
    """{"pixel_values": (B, crops, 3, H, W), "image_sizes": (B, 2)} of LLaVA-NeXT images: each image's anyres crops,
    zero crops padding the batch to its largest count, as LlavaNextImageProcessor pads."""
    views = [preprocess_anyres(im, cfg.vision.image_size, cfg.image_grid_pinpoints) for im in images]
    n = max(v.shape[0] for v, _ in views)
    padded = [F.pad(v, (0, 0, 0, 0, 0, 0, 0, n - v.shape[0])) for v, _ in views]
    return {"pixel_values": torch.stack(padded), "image_sizes": torch.tensor([size for _, size in views])}


def load_image(path):
    """Open an image file as PIL, with a one-line error naming the file if it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found") from None
    except Exception as e:
        raise InputError(f"{path}: not a readable image ({type(e).__name__})") from None


def to_rgb(image):
    """Any PIL mode to RGB; transparency is composited onto white, as transformers does."""
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image, size, pad_to_square=False):
    """PIL image -> (3, size, size) float32 CLIP input, identical to transformers' CLIPImageProcessor.

    Shortest edge resized to `size` (bicubic), center crop, x/255, CLIP mean/std. pad_to_square first
    pastes the image centred on a square of the mean colour, as the original LLaVA-1.5 did for training.
    """
    image = to_rgb(image)
    if pad_to_square and image.width != image.height:
        side = max(image.size)
        bg = Image.new("RGB", (side, side), tuple(int(m * 255) for m in OPENAI_CLIP_MEAN))
        bg.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = bg
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    image = image.resize((size, new_long) if w <= h else (new_long, size), resample=Image.BICUBIC)
    top, left = (image.height - size) // 2, (image.width - size) // 2
    x = np.asarray(image, dtype=np.float32)[top:top + size, left:left + size] * (1 / 255)
    x = (x - np.array(OPENAI_CLIP_MEAN, dtype=np.float32)) / np.array(OPENAI_CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def preprocess_anyres(image, size, pinpoints):
    """PIL image -> ((crops, 3, size, size) float32, (height, width)), identical to transformers'
    LlavaNextImageProcessor: the base view (the whole image squashed to size x size), then the image resized to fit
    the best canvas of `pinpoints` (aspect kept), centred on black, and cut into size x size crops, row by row."""
    image = to_rgb(image)
    width, height = image.size
    canvas_h, canvas_w = select_best_resolution(height, width, pinpoints)
    if canvas_w / width < canvas_h / height:  # the width fills the canvas
        new_w, new_h = canvas_w, min(math.ceil(height * (canvas_w / width)), canvas_h)
    else:
        new_w, new_h = min(math.ceil(width * (canvas_h / height)), canvas_w), canvas_h
    canvas = Image.new("RGB", (canvas_w, canvas_h))
    canvas.paste(image.resize((new_w, new_h), resample=Image.BICUBIC),
                 ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2))
    views = [image.resize((size, size), resample=Image.BICUBIC)]
    views += [canvas.crop((x, y, x + size, y + size))
              for y in range(0, canvas_h, size) for x in range(0, canvas_w, size)]
    return torch.stack([preprocess_image(v, size) for v in views]), (height, width)


@torch.no_grad()
def generate_responses(vlm, tok, rows, layer=None, max_new_tokens=64, temperature=0.0, top_p=1.0, batch_size=16,
                       generator=None, max_len=None, ctx=None, return_finished=False):
    """The model's response text to each {"prompt", "image": path or None} row, decoded up to its first EOS.

    `layer` is the image layer of every row (None: the checkpoint's default) or a list, one per row; temperature 0
    is greedy. With return_finished, also whether each response ended with EOS rather than running out of tokens."""
    texts, finished = [], []
    eos = tok.eos_token_id
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        images = [load_image(r["image"]) for r in chunk] if chunk[0]["image"] else None
        batch = encode_batch(tok, vlm.config, [r["prompt"] for r in chunk], images,
                             device=vlm.lm_head.weight.device, max_len=max_len)
        layers = layer[i:i + batch_size] if isinstance(layer, (list, tuple)) else layer
        with ctx or nullcontext():
            tokens, _ = vlm.generate(**batch, image_layer=layers, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, eos_token_id=eos, generator=generator)
        for row in tokens.tolist():
            # generate pads after EOS with pad_token_id, a real token in some vocabularies: cut at the EOS
            end = row.index(eos) if eos in row else len(row)
            texts.append(tok.decode(row[:end], skip_special_tokens=True))
            finished.append(eos in row)
    return (texts, finished) if return_finished else texts


# -----------------------------------------------------------------------------
# The image inputs of a batch travel as one dict: pixel_values and the family's own inputs (vlm.image_inputs, e.g.
# LLaVA-NeXT's image_sizes, mllama's aspect_ratio_ids, aspect_ratio_mask and cross_attention_mask), as encode_batch
# and encode_images make them. Stages pass the dict on as keyword arguments, unread, except that a per-token input
# follows the text when tokens are appended to the prompt.

def batch_images(vlm, batch):
    """{name: tensor} of the image inputs in `batch` (pixel_values and the family's own), as keyword arguments."""
    return {k: batch[k] for k in ("pixel_values", *vlm.image_inputs) if batch.get(k) is not None}


def extend_per_token(vlm, images, n):
    """images with each per-token input (B, T, ...) extended by n positions, copies of its last: tokens appended to a
    prompt see what the prompt's last token saw, as they did when generate produced them."""
    return {k: torch.cat([v, v[:, -1:].expand(-1, n, *v.shape[2:])], 1) if k in vlm.per_token_inputs else v
            for k, v in images.items()}


def encode_images(vlm, images, input_ids):
    """The image inputs {"pixel_values", **extras} of a batch whose token ids (B, T), one image per row, are already
    made (SFT appends responses before padding): what encode_batch gives beside the ids (LLaVA-NeXT: image_sizes)."""
    cfg = vlm.config
    if isinstance(cfg, MllamaConfig):
        return mllama_encode_images(cfg, images, input_ids)
    if cfg.image_grid_pinpoints is not None:  # each row holds its own image's count of image tokens
        for i, (row, im) in enumerate(zip(input_ids, images)):
            n, need = int((row == cfg.image_token_id).sum()), image_token_count(cfg, im.height, im.width)
            if n != need:
                raise InputError(f"encode_images: row {i} holds {n} image tokens, its {im.height}x{im.width} image "
                                 f"needs {need} (expand <image> to image_token_count of the row's own image)")
        return anyres_pixel_values(cfg, images)
    return {"pixel_values": torch.stack([preprocess_image(im, cfg.vision.image_size) for im in images])}


def example_image_tokens(cfg, image_size):
    """encode_prompt's `image` for one example whose image is image_size (height, width), or None for a text-only
    one: 0 without an image, LLaVA-NeXT's image_token_count of that size, True (the fixed count) otherwise."""
    if image_size is None:
        if isinstance(cfg, MllamaConfig):
            raise InputError("a row without an image; expected an image with every row for a Llama 3.2 Vision model "
                             "(text-only rows are for the llava family)")
        return 0
    return image_token_count(cfg, *image_size) if getattr(cfg, "image_grid_pinpoints", None) is not None else True


def image_tokens_vary(path):
    """Whether the checkpoint folder at path gives each image as many tokens as its size makes (LLaVA-NeXT's anyres),
    read from its config.json alone, before any weights load."""
    return read_json(os.path.join(path, "config.json")).get("model_type") == "llava_next"


@torch.no_grad()
def layer_features(vlm, images, layers):
    """Every one of `layers`' image features of these PIL images, as the projector reads them, from one vision pass:
    ({layer: (crops, tokens, D)}, crops per image, rows, valid). Each image is one crop for LLaVA-1.5 and its anyres
    crops for LLaVA-NeXT; rows[i] indexes image i's flattened (crops * tokens) tokens that the LM reads. valid (B,
    tokens) marks the tokens of real tiles for Llama 3.2 Vision (mllama_layer_features), and is None otherwise."""
    if isinstance(vlm, MllamaVLM):
        return mllama_layer_features(vlm, images, layers)
    cfg = vlm.config
    drop_cls = cfg.vision_feature_select_strategy == "default"
    batch = [image_crops(cfg, im, (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + (not drop_cls))
             for im in images]
    p = vlm.vision_tower.embeddings.patch_embedding.weight
    hs = vlm.vision_tower(torch.cat([crops for crops, _ in batch]).to(p.device, p.dtype), set(layers))
    return ({l: h[:, 1:] if drop_cls else h for l, h in hs.items()}, [len(crops) for crops, _ in batch],
            [rows for _, rows in batch], None)


# -----------------------------------------------------------------------------
# Prompt sets: every image opened once at start-up, and the room a prompt has beside its response

def open_images(rows):
    """Open every image of a prompt set once: a missing or corrupt file is one line naming it and its prompt, at
    start-up instead of hours into a run."""
    first_use = {}
    for row in rows:
        if row["image"]:
            first_use.setdefault(row["image"], row["id"])
    for path, row_id in first_use.items():
        try:
            load_image(path)
        except InputError as e:
            raise InputError(f"prompt {row_id}: {e}") from None


def prompt_room(tok, cfg, prompts, max_new_tokens, image=True):
    """How many tokens a prompt may take beside a response of max_new_tokens in the context. Says once how many of
    `prompts` are longer: those lose the start of their text (fit_prompt), never their image tokens."""
    max_len = cfg.text.max_position_embeddings - max_new_tokens
    if max_len <= 0:
        raise InputError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the context of "
                         f"{cfg.text.max_position_embeddings} tokens; expected fewer")
    n_cut = sum(fit_prompt(tok, cfg, p, max_len, image)[1] > 0 for p in sorted(set(prompts)))
    if n_cut:
        print(f"note: {n_cut} prompts are longer than the {max_len} tokens the context leaves beside the response; "
              "their text is cut from the left (image tokens are kept whole)")
    return max_len


# =============================================================================
# Llama 3.2 Vision (model_type "mllama"): a tiled ViT whose features reach the Llama decoder through gated
# cross-attention layers, instead of being spliced into the token sequence. Reached only through
# VLM.from_pretrained, which hands an mllama checkpoint to MllamaVLM.from_pretrained.
#
#   image -> tiles (MllamaImageProcessor) -> patch conv + gated tile/position embeddings -> layernorm_pre
#         -> local ViT (h_0..h_L, taps at intermediate_layers_indices) -> layernorm_post + post-tile embedding
#         -> global ViT (gated layers) -> [global out, taps] -> multi_modal_projector -> cross-attention states
#   text  -> Llama decoder in which the layers listed in cross_attention_layers attend to those states
#
# The ICET image layer of mllama is a layer of the local ViT: see MllamaVisionModel.
# =============================================================================

@dataclass
class MllamaVisionConfig:
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32           # the local ViT; ICET image layers index its hidden states
    num_global_layers: int = 8
    attention_heads: int = 16
    image_size: int = 560                 # one tile's side
    patch_size: int = 14
    num_channels: int = 3
    max_num_tiles: int = 4
    norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    vision_output_dim: int = 7680         # hidden_size * (1 + len(intermediate_layers_indices))
    intermediate_layers_indices: list = field(default_factory=lambda: [3, 7, 15, 23, 30])
    supported_aspect_ratios: list = field(default_factory=lambda: [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2],
                                                                   [3, 1], [4, 1]])

    @property
    def num_patches(self):
        """Tokens per tile: one per patch and the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class MllamaTextConfig(LlamaConfig):
    cross_attention_layers: list = field(default_factory=lambda: [3, 8, 13, 18, 23, 28, 33, 38])


@dataclass
class MllamaConfig:
    vision: MllamaVisionConfig = field(default_factory=MllamaVisionConfig)
    text: MllamaTextConfig = field(default_factory=MllamaTextConfig)
    image_token_id: int = 128256          # <|image|>, one per image; an embedding row but no lm_head row
    pad_token_id: int = 128004
    vision_feature_layer: int = -1        # image_layer None: the whole local ViT


def mllama_config_from_hf(d, where="config.json"):
    """Translate a transformers MllamaConfig dict (4.x or 5.x spelling) into an MllamaConfig."""
    tc = dict(d.get("text_config") or {})
    tc.pop("head_dim", None)  # mllama's head_dim is always hidden_size // num_attention_heads
    # the text side is a Llama decoder: config_from_hf reads its fields, rope included, and refuses what we lack
    text = config_from_hf({"model_type": "llava", "text_config": {**tc, "model_type": "llama"}}, where).text
    # embed_tokens has 8 rows more than lm_head, so transformers never ties them, whatever the config says
    text.tie_word_embeddings = False
    text = MllamaTextConfig(**asdict(text), cross_attention_layers=list(tc.get("cross_attention_layers") or
                                                                         MllamaTextConfig().cross_attention_layers))
    vc = dict(d.get("vision_config") or {})
    vc.setdefault("attention_heads", vc.get("num_attention_heads"))
    vision = pick_config(MllamaVisionConfig, vc, f"{where} vision_config")
    if vision.hidden_act != "gelu":
        raise InputError(f"{where}: vision_config.hidden_act {vision.hidden_act!r} is not supported, expected 'gelu'")
    taps = len(vision.intermediate_layers_indices)
    if vision.vision_output_dim != vision.hidden_size * (1 + taps):
        raise InputError(f"{where}: vision_config.vision_output_dim is {vision.vision_output_dim}, expected "
                         f"hidden_size * (1 + {taps} intermediate layers) = {vision.hidden_size * (1 + taps)}")
    if bad := [i for i in text.cross_attention_layers if not 0 <= i < text.num_hidden_layers]:
        raise InputError(f"{where}: text_config.cross_attention_layers {bad} lie outside "
                         f"0..{text.num_hidden_layers - 1}")
    pad = tc.get("pad_token_id", d.get("pad_token_id"))
    image_token = d.get("image_token_index", d.get("image_token_id", 128256))
    return MllamaConfig(vision=vision, text=text, image_token_id=image_token, pad_token_id=128004 if pad is None else pad)


def mllama_config_to_hf(cfg):
    """The inverse of mllama_config_from_hf: a config.json dict that transformers reads as an MllamaConfig."""
    text = asdict(cfg.text)
    rope = text.pop("rope_scaling") or {"rope_type": "default"}
    text.pop("head_dim")
    text.update(model_type="mllama_text_model", pad_token_id=cfg.pad_token_id,
                rope_scaling=None if rope["rope_type"] == "default" else rope)
    return {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
            "text_config": text, "vision_config": {**asdict(cfg.vision), "model_type": "mllama_vision_model"},
            "image_token_index": cfg.image_token_id, "tie_word_embeddings": False}


class MllamaPrecomputedAspectRatioEmbedding(nn.Module):
    """One learned vector per tile slot and aspect ratio, added to every token of the tile, gated by tanh(gate)."""

    def __init__(self, cfg):
        super().__init__()
        self.max_num_tiles = cfg.max_num_tiles
        self.embedding = nn.Embedding(len(cfg.supported_aspect_ratios) + 1, cfg.max_num_tiles * cfg.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, aspect_ratio_ids):
        """x (N, tiles, tokens, D), aspect_ratio_ids (N,)."""
        e = self.embedding(aspect_ratio_ids).view(x.shape[0], self.max_num_tiles, 1, x.shape[-1])
        return x + e * self.gate.tanh()


class MllamaPrecomputedPositionEmbedding(nn.Module):
    """Per-token positions, blended by one gate with a per-aspect-ratio table over every tile and token."""

    def __init__(self, cfg):
        super().__init__()
        self.max_num_tiles, self.num_patches = cfg.max_num_tiles, cfg.num_patches
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.empty(cfg.num_patches, cfg.hidden_size))
        self.tile_embedding = nn.Embedding(len(cfg.supported_aspect_ratios) + 1,
                                           cfg.max_num_tiles * cfg.num_patches * cfg.hidden_size)

    def forward(self, x, aspect_ratio_ids):
        g = self.gate.tanh()
        tile = self.tile_embedding(aspect_ratio_ids).view(x.shape[0], self.max_num_tiles, self.num_patches, -1)
        return x + (1 - g) * self.embedding + g * tile


class MllamaVisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.attention_heads
        D = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D, bias=False) for _ in range(4))

    def forward(self, x, mask):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MllamaVisionMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class MllamaVisionEncoderLayer(nn.Module):
    """A pre-norm ViT block; in the global ViT each residual branch is scaled by tanh of a learned gate."""

    def __init__(self, cfg, is_gated):
        super().__init__()
        self.self_attn = MllamaVisionAttention(cfg)
        self.mlp = MllamaVisionMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if is_gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))
        self.is_gated = is_gated

    def forward(self, x, mask):
        a = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * a if self.is_gated else a)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * m if self.is_gated else m)


class MllamaVisionEncoder(nn.Module):
    def __init__(self, cfg, n_layers, is_gated):
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionEncoderLayer(cfg, is_gated) for _ in range(n_layers))


def allow_all_if_none(mask):
    """A boolean attention mask whose rows without any allowed key allow every key instead: what an additive mask of
    finfo.min does (it shifts a whole row equally), where a boolean row of False would give NaN."""
    return mask | ~mask.any(-1, keepdim=True)


class MllamaVisionModel(nn.Module):
    """Llama 3.2 Vision's image encoder: tiles -> local ViT -> global ViT, with taps of the local ViT.

    image_layer, the ICET layer l, indexes the LOCAL ViT's hidden states h_0..h_L: h_0 is its input (after
    layernorm_pre and the padding of each tile to a multiple of 8 tokens), h_l the output of local layer l; negatives
    count from the end, None is the whole encoder (l = L). The intermediate taps follow Meta's reference code: tap i
    reads h_i, the input of local layer i+1 (transformers 4.x, TGI and vLLM do the same; transformers 5.x reads
    h_{i+1}, because its encoder stopped returning its input: off by one against the code the weights were trained
    with). Early exit at l: local layers l+1..L never run; h_l stands in for the local ViT's output and goes
    unchanged through layernorm_post, the post-tile embedding and the global ViT; every tap i > l takes h_l, taps
    i <= l read h_i.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.gated_positional_embedding = MllamaPrecomputedPositionEmbedding(cfg)
        self.pre_tile_positional_embedding = MllamaPrecomputedAspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = MllamaPrecomputedAspectRatioEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(cfg.hidden_size)   # eps 1e-5, whatever norm_eps says, as transformers
        self.layernorm_post = nn.LayerNorm(cfg.hidden_size)
        self.transformer = MllamaVisionEncoder(cfg, cfg.num_hidden_layers, is_gated=False)
        self.global_transformer = MllamaVisionEncoder(cfg, cfg.num_global_layers, is_gated=True)

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask, layers):
        """Features (B, images, tiles, tokens, vision_output_dim) of pixel_values (B, images, tiles, C, H, W), with
        the local ViT stopped after layers[b] blocks for the images of row b."""
        B, N, T, C, H, W = pixel_values.shape
        D, P = self.cfg.hidden_size, self.cfg.num_patches
        ar_ids = aspect_ratio_ids.reshape(B * N)
        x = self.patch_embedding(pixel_values.reshape(B * N * T, C, H, W)).flatten(2).transpose(1, 2)
        x = self.pre_tile_positional_embedding(x.reshape(B * N, T, P - 1, D), ar_ids)
        x = torch.cat([self.class_embedding.expand(B * N * T, 1, D), x.reshape(B * N * T, P - 1, D)], dim=1)
        x = self.layernorm_pre(self.gated_positional_embedding(x.reshape(B * N, T, P, D), ar_ids))
        # each tile is padded to a multiple of 8 tokens; the tiles of one image attend to each other
        Pp = P + (-P) % 8
        x = F.pad(x, (0, 0, 0, Pp - P)).reshape(B * N, T * Pp, D)
        # Meta's mask (kept by transformers and vLLM): only pairs of two invalid tokens (pad tokens, padding tiles)
        # are blocked, so valid tokens do see the padding
        invalid = (aspect_ratio_mask.reshape(B * N, T, 1) == 0) | (torch.arange(Pp, device=x.device) >= P)
        invalid = invalid.reshape(B * N, T * Pp)
        mask = allow_all_if_none(~(invalid[:, :, None] & invalid[:, None, :]))[:, None]
        # the local ViT runs up to the deepest layer asked for, keeping the states that an output or a tap needs
        per_image = [int(l) for l in layers for _ in range(N)]
        taps, L = self.cfg.intermediate_layers_indices, self.cfg.num_hidden_layers
        keep = {min(j, l) for j in [*taps, L] for l in per_image}
        states = {0: x}
        for i, block in enumerate(self.transformer.layers[:max(per_image)]):  # the early exit: later blocks never run
            x = block(x, mask)
            if i + 1 in keep:
                states[i + 1] = x

        def state(j):
            """h_min(j, l) of every image, l where its local ViT stopped: its output for j = L, else tap j."""
            if len(set(per_image)) == 1:
                return states[min(j, per_image[0])]
            return torch.stack([states[min(j, l)][n] for n, l in enumerate(per_image)])

        x = self.layernorm_post(state(L))
        x = self.post_tile_positional_embedding(x.reshape(B * N, T, Pp, D), ar_ids).reshape(B * N, T * Pp, D)
        for block in self.global_transformer.layers:
            x = block(x, mask)
        # the taps are interleaved channel-major (element d * n_taps + k), the order the projector's weight expects
        inter = torch.stack([state(i) for i in taps], dim=-1).reshape(B * N, T * Pp, D * len(taps))
        out = torch.cat([x, inter], dim=-1).reshape(B, N, T, Pp, -1)
        return out[:, :, :, :P]


class MllamaTextCrossAttention(nn.Module):
    """Text queries attend to the image's projected features; q and k RMS-normalised per head, no rotary."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def kv(self, states):
        """Keys and values (B, kv heads, S, head_dim) of cross-attention states (B, S, D): computed once per image."""
        B, S, _ = states.shape
        k = self.k_norm(self.k_proj(states).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2))
        return k, self.v_proj(states).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)

    def forward(self, x, kv, mask):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2))
        y = F.scaled_dot_product_attention(q, *kv, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MllamaCrossAttentionDecoderLayer(nn.Module):
    """Flamingo-style gated cross-attention block: both residual branches scaled by tanh of a gate that starts at 0.
    Text rows that may see no image get no MLP update (transformers zeroes the MLP branch only, and so do we)."""

    def __init__(self, cfg):
        super().__init__()
        self.cross_attn = MllamaTextCrossAttention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = LlamaMLP(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, kv, mask, row_mask):
        x = x + self.cross_attn_attn_gate.tanh() * self.cross_attn(self.input_layernorm(x), kv, mask)
        return x + self.cross_attn_mlp_gate.tanh() * row_mask * self.mlp(self.post_attention_layernorm(x))


class MllamaTextModel(nn.Module):
    """The Llama decoder with cross-attention layers at cfg.cross_attention_layers in the one list of layers."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size + 8, cfg.hidden_size)  # 8 more rows: <|image|> and spares
        cross = set(cfg.cross_attention_layers)
        # self-attention layers are numbered without the cross layers: their index is their KV-cache slot
        self.layers = nn.ModuleList(MllamaCrossAttentionDecoderLayer(cfg) if i in cross else
                                    LlamaLayer(cfg, i - sum(j < i for j in cross))
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def cross_kv(self, states):
        """{layer index: (k, v)} of the cross-attention states (B, S, D) for every cross-attention layer."""
        return {i: layer.cross_attn.kv(states) for i, layer in enumerate(self.layers)
                if isinstance(layer, MllamaCrossAttentionDecoderLayer)}

    def forward(self, x, position_ids, mask, cross=None, cache=None, cache_pos=None):
        """Run embeddings x (B, T, D) at positions (B, T); cross = (kv, mask, row_mask) or None, when the
        cross-attention layers are skipped (no image, as in transformers). Return the final-normed states."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, MllamaCrossAttentionDecoderLayer):
                if cross is not None:
                    x = layer(x, cross[0][i], cross[1], cross[2])
            else:
                x = layer(x, cos, sin, mask, cache, cache_pos)
        return self.norm(x)


def mllama_cross_mask(cross_attention_mask, num_patches, dtype):
    """(mask, row_mask) from the processor's cross_attention_mask (B, T, images, tiles), 1 where a text token may
    see a tile: a boolean (B, 1, T, images*tiles*num_patches) mask, and (B, T, 1) which is 0 on rows that may see no
    tile. Those rows attend to every tile, as transformers' additive mask makes them; their MLP update is zeroed."""
    B, T = cross_attention_mask.shape[:2]
    allowed = cross_attention_mask.bool().repeat_interleave(num_patches, dim=3).reshape(B, T, -1)
    return allow_all_if_none(allowed)[:, None], allowed.any(-1, keepdim=True).to(dtype)


class MllamaVLM(VLM):
    """Llama 3.2 Vision with VLM's interface: the same forward, hidden_states, generate, LoRA, value head and saving;
    images come as tiles with aspect_ratio_ids, aspect_ratio_mask and the cross_attention_mask (mllama_encode_batch).
    image_layer is a layer of the local ViT, with Meta's taps (MllamaVisionModel says exactly what runs)."""

    image_inputs = ("aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
    per_token_inputs = ("cross_attention_mask",)

    def __init__(self, cfg):
        nn.Module.__init__(self)  # not VLM.__init__: there is no CLIP tower here
        self.config = cfg
        self.vision_model = MllamaVisionModel(cfg.vision)
        self.multi_modal_projector = nn.Linear(cfg.vision.vision_output_dim, cfg.text.hidden_size)
        self.language_model = MllamaTextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.value_head = None
        self.lora_config = None

    def vision_features(self, pixel_values, layer=None, aspect_ratio_ids=None, aspect_ratio_mask=None):
        """(B, images, tiles, tokens, vision_output_dim): the vision model's output with the local ViT stopped at
        `layer` (int, or one per row of the batch)."""
        if pixel_values.ndim != 6:
            raise InputError(f"mllama pixel_values have shape {tuple(pixel_values.shape)}, expected (batch, images, "
                             "tiles, channels, height, width) as mllama_encode_batch makes them")
        B, N, T = pixel_values.shape[:3]
        if aspect_ratio_ids is None:
            raise InputError("mllama pixel_values need their aspect_ratio_ids (see mllama_encode_batch)")
        if aspect_ratio_mask is None:
            aspect_ratio_mask = torch.ones(B, N, T, dtype=torch.long, device=pixel_values.device)
        per_row = isinstance(layer, (list, tuple)) or (torch.is_tensor(layer) and layer.ndim == 1)
        layers = [self.image_layer_index(l) for l in layer] if per_row else [self.image_layer_index(layer)] * B
        if len(layers) != B:
            raise InputError(f"got {len(layers)} image layers for a batch of {B}; expected one per row")
        p = self.vision_model.patch_embedding.weight
        return self.vision_model(pixel_values.to(p.dtype), aspect_ratio_ids, aspect_ratio_mask, layers)

    def cross_inputs(self, input_ids, pixel_values, image_layer, aspect_ratio_ids, aspect_ratio_mask,
                     cross_attention_mask, dtype):
        """(kv, mask, row_mask) for the text model's cross-attention layers, or None without an image."""
        if pixel_values is None:
            return None
        if cross_attention_mask is None:
            raise InputError("mllama pixel_values need the cross_attention_mask of which tokens see which tiles "
                             "(see mllama_encode_batch)")
        feats = self.vision_features(pixel_values, image_layer, aspect_ratio_ids, aspect_ratio_mask)
        B = feats.shape[0]
        states = self.multi_modal_projector(feats).reshape(B, -1, self.config.text.hidden_size).to(dtype)
        if cross_attention_mask.shape[:2] != input_ids.shape or cross_attention_mask.shape[2:] != feats.shape[1:3]:
            raise InputError(f"cross_attention_mask has shape {tuple(cross_attention_mask.shape)}, expected "
                             f"{(*input_ids.shape, *feats.shape[1:3])} (batch, tokens, images, tiles)")
        return (self.language_model.cross_kv(states),
                *mllama_cross_mask(cross_attention_mask, self.config.vision.num_patches, dtype))

    def hidden_states(self, input_ids, pixel_values=None, image_layer=None, attention_mask=None, aspect_ratio_ids=None,
                      aspect_ratio_mask=None, cross_attention_mask=None):
        """The decoder's final (normed) hidden states (B, T, D); with padding, pass attention_mask (see VLM)."""
        x = self.language_model.embed_tokens(input_ids)
        cross = self.cross_inputs(input_ids, pixel_values, image_layer, aspect_ratio_ids, aspect_ratio_mask,
                                  cross_attention_mask, x.dtype)
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        idx = torch.arange(T, device=input_ids.device)
        return self.language_model(x, position_ids, build_mask(attention_mask.bool(), idx, idx), cross)

    def response_logits(self, hidden):
        """<|image|> (id vocab_size) has no lm_head row, so it can never be generated: no suppression needed."""
        return self.lm_head(hidden)

    def forward(self, input_ids, pixel_values=None, image_layer=None, attention_mask=None, return_hidden=False,
                logits_at=None, aspect_ratio_ids=None, aspect_ratio_mask=None, cross_attention_mask=None):
        """Next-token logits (B, T, V), as VLM.forward, for a batch from mllama_encode_batch."""
        hidden = self.hidden_states(input_ids, pixel_values, image_layer, attention_mask, aspect_ratio_ids,
                                    aspect_ratio_mask, cross_attention_mask)
        logits = self.lm_head(hidden if logits_at is None else hidden[logits_at])
        return (logits, hidden) if return_hidden else logits

    def prefill(self, input_ids, attention_mask, pixel_values, image_layer, max_new_tokens, aspect_ratio_ids=None,
                aspect_ratio_mask=None, cross_attention_mask=None):
        """VLM.prefill for mllama: the image's keys and values are computed once for every cross-attention layer,
        and each new token sees the tiles the prompt's last token saw (as transformers extends the mask)."""
        B, T0 = input_ids.shape
        dev = input_ids.device
        cfg = self.config.text
        S = T0 + max_new_tokens
        x = self.language_model.embed_tokens(input_ids)
        cross = self.cross_inputs(input_ids, pixel_values, image_layer, aspect_ratio_ids, aspect_ratio_mask,
                                  cross_attention_mask, x.dtype)
        n_self = cfg.num_hidden_layers - len(set(cfg.cross_attention_layers))
        cache = KVCache(n_self, B, cfg.num_key_value_heads, S, cfg.head_dim, x.dtype, dev)
        key_valid = torch.zeros(B, S, dtype=torch.bool, device=dev)
        key_valid[:, :T0] = attention_mask.bool()
        k_pos = torch.arange(S, device=dev)
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.language_model(x, pos, build_mask(key_valid, k_pos[:T0], k_pos), cross, cache, k_pos[:T0])
        if cross is not None:
            cross = (cross[0], cross[1][:, :, -1:], cross[2][:, -1:])
        pos, n = pos[:, -1:], T0

        def decode(tok):
            nonlocal pos, n
            pos, n = pos + 1, n + 1
            cur = k_pos[n - 1:n]
            key_valid[:, n - 1] = True
            h = self.language_model(self.language_model.embed_tokens(tok[:, None]), pos,
                                    build_mask(key_valid, cur, k_pos), cross, cache, cur)
            return self.response_logits(h[:, -1]).float()

        return self.response_logits(hidden[:, -1]).float(), decode

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, fast=True):
        """Load an mllama checkpoint folder (hub layout, or the one transformers >= 4.52 keeps in memory; single or
        sharded), built on the meta device so that the weights exist once."""
        path = resolve_checkpoint(path)
        where = os.path.join(path, "config.json")
        cfg = mllama_config_from_hf(read_json(where), where)
        with torch.device("meta"):
            model = cls(cfg)
        load_weights(model, path, mllama_from_hf_key, device, dtype)
        model.language_model.inv_freq = rope_inv_freq(cfg.text).to(device)
        model.source_path = path
        return (speed_up(model) if fast else model).eval()

    def save_pretrained(self, path):
        """Write an mllama checkpoint folder in the hub's key layout (meta-llama/Llama-3.2-11B-Vision), atomically."""
        if lora_modules(self):
            raise InputError("merge_lora(vlm) before save_pretrained: an mllama checkpoint has no place for adapters")
        sd = {mllama_to_hf_key(k): v.detach().contiguous().cpu() for k, v in self.state_dict().items()
              if not k.startswith("value_head.")}
        with atomic_folder(path) as tmp:
            atomic_save_safetensors(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(mllama_config_to_hf(self.config), f, indent=2)


# Every prefix an mllama checkpoint key may carry, mapped to our module names: the hub's layout (what transformers
# 4.x and 5.x write) and the one transformers >= 4.52 keeps in memory.
MLLAMA_KEY_PREFIXES = [
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


def mllama_from_hf_key(key):
    return from_hf_key(key, MLLAMA_KEY_PREFIXES)


def mllama_to_hf_key(key):
    """Our name -> the hub's on-disk name."""
    if key.startswith("language_model."):
        return "language_model.model." + key[len("language_model."):]
    if key.startswith("lm_head."):
        return "language_model." + key
    return key


def mllama_aspect_ratios(max_num_tiles):
    """Every (tiles high, tiles wide) with at most max_num_tiles tiles, in the order aspect_ratio_ids count (from 1)."""
    return [(h, w) for h in range(1, max_num_tiles + 1) for w in range(1, max_num_tiles + 1) if h * w <= max_num_tiles]


def mllama_canvas(height, width, max_num_tiles, tile):
    """MllamaImageProcessor's choice of tile grid (tiles high, tiles wide) for an image: the grid needing the least
    upscaling, else the least downscaling; ties go to the smallest canvas."""
    scales = []
    for h, w in mllama_aspect_ratios(max_num_tiles):
        scales.append((min(h * tile / height, w * tile / width), h * w, (h, w)))
    up = [s for s in scales if s[0] >= 1]
    best = min(s[0] for s in up) if up else max(s[0] for s in scales)
    return min((s for s in scales if s[0] == best), key=lambda s: s[1])[2]


def mllama_preprocess_image(image, tile, max_num_tiles, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """PIL image -> (tiles (max_num_tiles, 3, tile, tile) float32, aspect_ratio_id, number of tiles), identical to
    transformers' MllamaImageProcessor: resized (bilinear) without distortion to fit the chosen grid of tiles, padded
    bottom and right with black, rescaled and normalised, cut into tiles row by row, then zero tiles up to
    max_num_tiles."""
    image = to_rgb(image)
    h_tiles, w_tiles = mllama_canvas(image.height, image.width, max_num_tiles, tile)
    # the size that fits the canvas, never below one tile per side (the processor's get_image_size_fit_to_canvas)
    target_w = min(max(image.width, tile), w_tiles * tile)
    target_h = min(max(image.height, tile), h_tiles * tile)
    scale_h, scale_w = target_h / image.height, target_w / image.width
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.floor(image.height * scale_w) or 1, target_h)
    else:
        new_h, new_w = target_h, min(math.floor(image.width * scale_h) or 1, target_w)
    x = np.zeros((h_tiles * tile, w_tiles * tile, 3), dtype=np.float32)
    x[:new_h, :new_w] = np.asarray(image.resize((new_w, new_h), resample=Image.BILINEAR), dtype=np.float32)
    x = (x * (1 / 255) - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    tiles = x.reshape(h_tiles, tile, w_tiles, tile, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, tile, tile)
    out = torch.zeros(max_num_tiles, 3, tile, tile)
    out[:len(tiles)] = torch.from_numpy(np.ascontiguousarray(tiles))
    return out, mllama_aspect_ratios(max_num_tiles).index((h_tiles, w_tiles)) + 1, len(tiles)


def mllama_cross_attention_mask(input_ids, image_token_id, n_tiles, max_num_tiles):
    """The processor's cross_attention_mask (B, T, images, max_num_tiles) for left-padded input_ids (B, T): from
    each <|image|> token on, the text sees that image's tiles, until the next image token (a run of consecutive image
    tokens all stay visible to the text after the run). n_tiles[b][i]: the tiles of image i of row b."""
    B, T = input_ids.shape
    mask = torch.zeros(B, T, max(len(n) for n in n_tiles), max_num_tiles, dtype=torch.long)
    for b, (row, tiles) in enumerate(zip(input_ids.tolist(), n_tiles)):
        locs = [i for i, t in enumerate(row) if t == image_token_id]
        ends = locs[1:] + [T]
        for k in range(len(locs) - 2, -1, -1):  # consecutive image tokens: each sees as far as the last of the run
            if ends[k] == locs[k] + 1:
                ends[k] = ends[k + 1]
        for i, (start, end) in enumerate(zip(locs, ends)):
            mask[b, start:end, i, :tiles[i]] = 1
    return mask


def mllama_encode_prompt(tokenizer, cfg, prompt, image=True):
    """encode_prompt for mllama: one <|image|> token right before the text, as in Meta's prompt format, not expanded
    (the image enters through cross-attention)."""
    image_tok = tokenizer.convert_ids_to_tokens(cfg.image_token_id)
    text = format_prompt(tokenizer, prompt, image).replace("<image>\n", image_tok)
    ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
    n = sum(i == cfg.image_token_id for i in ids)
    if n != image:
        raise InputError(f"tokenizer turned the prompt into {n} image tokens, expected {int(image)} "
                         f"(is {image_tok!r} = id {cfg.image_token_id} a special token of this tokenizer?)")
    return ids


def mllama_encode_batch(tokenizer, cfg, prompts, images=None, device="cpu", max_len=None):
    """encode_batch for mllama: the prompts (cut to max_len as fit_prompt does), each image as tiles with its
    aspect_ratio_ids and aspect_ratio_mask, and the processor's cross_attention_mask."""
    if max_len is None:
        seqs = [encode_prompt(tokenizer, cfg, p, image=images is not None) for p in prompts]
    else:
        seqs = [fit_prompt(tokenizer, cfg, p, max_len, image=images is not None)[0] for p in prompts]
    input_ids, mask = left_pad(seqs, cfg.pad_token_id)
    batch = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": None, "aspect_ratio_ids": None,
             "aspect_ratio_mask": None, "cross_attention_mask": None}
    if images is not None:
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} images for {len(prompts)} prompts; expected one each")
        batch.update(mllama_encode_images(cfg, images, input_ids))
    return {k: None if v is None else v.to(device) for k, v in batch.items()}


def mllama_encode_images(cfg, images, input_ids):
    """One image per row of input_ids (B, T) as tiles, with its aspect_ratio_ids, aspect_ratio_mask and the
    processor's cross_attention_mask for those ids."""
    v = cfg.vision
    tiles, ar_ids, n_tiles = zip(*[mllama_preprocess_image(im, v.image_size, v.max_num_tiles) for im in images])
    ar_mask = (torch.arange(v.max_num_tiles) < torch.tensor(n_tiles)[:, None]).long()
    return {"pixel_values": torch.stack(tiles)[:, None], "aspect_ratio_ids": torch.tensor(ar_ids)[:, None],
            "aspect_ratio_mask": ar_mask[:, None],
            "cross_attention_mask": mllama_cross_attention_mask(input_ids, cfg.image_token_id, [[n] for n in n_tiles],
                                                                v.max_num_tiles)}


@torch.no_grad()
def mllama_layer_features(vlm, images, layers):
    """layer_features for Llama 3.2 Vision: what its projector reads with the local ViT stopped at each layer
    (MllamaVisionModel), one vision pass per layer, as an early exit changes everything after it. Each image is one
    block of tiles x tokens, whose padding tiles' tokens valid marks False and rows leaves out."""
    ids = torch.full((len(images), 1), vlm.config.image_token_id)  # one image token per row: its cross mask is unused
    inputs = mllama_encode_images(vlm.config, images, ids)
    dev = vlm.lm_head.weight.device
    pixels, ar_ids, ar_mask = (inputs[k].to(dev) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"))
    feats = {l: vlm.vision_features(pixels, l, ar_ids, ar_mask).flatten(1, 3) for l in layers}
    valid = ar_mask[:, 0, :, None].expand(-1, -1, vlm.config.vision.num_patches).flatten(1).bool().cpu()
    return feats, [1] * len(images), [v.nonzero()[:, 0] for v in valid], valid


# =============================================================================
# Speed: what makes the networks above fast without changing what they compute. One call, speed_up(model), swaps it
# into a loaded model (VLM.from_pretrained and the reward model's loader make it): every nn.Linear runs `linear`,
# on oneDNN on the CPU where that is the faster, q/k/v and gate/up become one matmul each where their weights are
# packed, generate packs its weights for the batch once, and a right-padded training batch may run its decoder on the
# real tokens only (forward(unpadded=True)).
# Opt-in, behind a `compile` flag: a compiled decode step (compile_decode) and compiled, bucketed training forwards.
# =============================================================================

# -----------------------------------------------------------------------------
# Linear layers whose CPU matmuls run on oneDNN. PyTorch's CPU builds send a float32 nn.Linear to MKL's sgemm; oneDNN
# (also bundled with PyTorch) is faster for a decode step's few rows, from weights it packed once for them, on AVX2
# and AVX-512 alike. For the many rows of a training step it is faster with AVX-512 only (bench.py's sft.py step,
# padded: 1.14x over MKL on an AVX-512 core, 0.82x on the same core capped to AVX2), so on an AVX2 CPU those stay on
# MKL. The choice follows the machine (its ISA), never a setting; the results agree to float32 rounding.


def onednn_avx512():
    """Whether oneDNN's float32 kernels run on AVX-512 here: ATen finds it (ATEN_CPU_CAPABILITY may cap it) and
    ONEDNN_MAX_CPU_ISA, if set, allows it."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and (cap == "ALL" or "AVX512" in cap or "AMX" in cap
                                                                       or "AVX10" in cap)


# measured on x86-64 only (elsewhere PyTorch's own BLAS choice stands); bench.py switches it off to time MKL
ONEDNN = torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
ONEDNN_UNPACKED = ONEDNN and onednn_avx512()  # the unpacked weights of a training step or prefill on oneDNN too
PACKED = {}  # ids of weights packed together -> (weakrefs to them, their versions and addresses, rows, packed copy)
ACTIVE = {}  # id(weight), or id(module) for its FUSED projections -> packed copy, while packed_weights() is entered


def packed_copy(weights, rows):
    """The weights stacked along their output axis, reordered by oneDNN for inputs of about `rows` rows; reordered
    once and reused for as long as they live and are unchanged. Every in-place write (an optimizer step, merge_lora's
    copy_, load_state_dict) bumps a weight's _version, and moving it (.to(), .data = ...) changes its address; either
    repacks. A write through w.data is not seen: it has its own version counter (nothing here writes weights so)."""
    key = tuple(id(w) for w in weights)
    state = [(w._version, w.data_ptr()) for w in weights]
    entry = PACKED.get(key)
    if entry is not None and all(r() is w for r, w in zip(entry[0], weights)) and entry[1:3] == (state, rows):
        return entry[3]
    stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
    packed = torch.ops.mkldnn._reorder_linear_weight(stacked.detach(), rows)
    # the copy goes when a weight goes: the callback drops it (a dead weight's id may be reused by a new tensor)
    drop = lambda _: PACKED.pop(key, None)
    PACKED[key] = ([weakref.ref(w, drop) for w in weights], state, rows, packed)
    return packed


def use_onednn(x):
    """Whether `linear` takes the oneDNN path for input x: float32 on a CPU whose PyTorch has oneDNN, outside
    torch.compile (which picks its own kernels); never for an FSDP2 shard (a DTensor), which packed_weights skips."""
    return ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling() \
        and not isinstance(x, DTensor)


@contextmanager
def packed_weights(modules, rows):
    """While inside, `linear` multiplies by copies of the Linear weights of `modules` that oneDNN has reordered for
    inputs of about `rows` rows, instead of reordering them at every call. A decode step of a few rows is bound by
    reading the weights, and at 8 rows it runs ~1.5x faster this way (at 1 row there is no gain, so nothing is packed).
    A module's FUSED projections of one input (q, k and v; gate and up), when all plain bias-free Linears, are stacked
    into one matmul (`project`): fewer, larger matmuls, ~5% faster. The copies are kept between calls (packed_copy):
    a second copy of those weights for as long as they live, which saves reordering them at every generate call.
    No-grad only."""
    outer = dict(ACTIVE)
    if rows > 1:
        fused = set()
        for module in modules:
            for m in module.modules():
                linears = [getattr(m, name) for name in getattr(m, "FUSED", ())]
                if linears and all(type(l) is Linear and l.bias is None and use_onednn(l.weight) for l in linears):
                    ACTIVE[id(m)] = packed_copy([l.weight for l in linears], rows)
                    fused.update(id(l) for l in linears)
        ACTIVE.update({id(m.weight): packed_copy([m.weight], rows) for module in modules for m in module.modules()
                       if isinstance(m, Linear) and id(m) not in fused and use_onednn(m.weight)})
    try:
        yield
    finally:
        ACTIVE.clear()
        ACTIVE.update(outer)


def project(module, x, *linears):
    """[linear(x) for linear in linears], in one matmul by the stacked copy that packed_weights made for module's FUSED
    projections, where it made one."""
    if id(module) in ACTIVE and use_onednn(x) and not torch.is_grad_enabled():
        y = torch.ops.mkldnn._linear_pointwise(x, ACTIVE[id(module)], None, "none", [], "")
        return y.split([l.out_features for l in linears], -1)
    return [l(x) for l in linears]


class OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b through oneDNN, with the backward pass through oneDNN too; x is kept for backward only when
    W is trained (a frozen base weight under LoRA needs only W for the input's gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # dL/dx = g W, a linear layer with weight W^T
            grad_x = torch.ops.mkldnn._linear_pointwise(grad, weight.t(), None, "none", [], "")
        if ctx.needs_input_grad[1]:  # dL/dW = g^T x, with its shorter side as rows: for LoRA's thin A and B that
            g, x = grad.flatten(0, -2), x.flatten(0, -2)  # is several times faster
            grad_w = g.t() @ x if g.shape[1] <= x.shape[1] else (x.t() @ g).t()
        if ctx.needs_input_grad[2]:
            grad_b = grad.flatten(0, -2).sum(0)
        return grad_x, grad_w, grad_b


def linear(x, weight, bias=None):
    """F.linear: on oneDNN where use_onednn says so, by weight's packed copy inside packed_weights, and by the weight
    itself where oneDNN has AVX-512 (ONEDNN_UNPACKED). One row (a decode step at batch 1) on one thread stays on MKL:
    there oneDNN's unpacked matmul is the slower, by about 10% over a decode (bench.py's batch-1 line, AVX-512 and
    AVX2 alike); on two threads or more oneDNN's is the faster."""
    if not use_onednn(x):
        return F.linear(x, weight, bias)
    if id(weight) in ACTIVE and not torch.is_grad_enabled():
        return torch.ops.mkldnn._linear_pointwise(x, ACTIVE[id(weight)], bias, "none", [], "")
    if not ONEDNN_UNPACKED or (x.numel() == x.shape[-1] and torch.get_num_threads() == 1):
        return F.linear(x, weight, bias)
    return OneDNNLinear.apply(x, weight, bias)


class OneDNNLoRALinear(LoRALinear):
    """LoRALinear whose adapter matmuls run `linear` too: add_lora wraps a sped-up Linear in it (Linear.lora_class)."""

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + linear(linear(self.dropout(x), a) * self.scale, b)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that runs `linear`."""
    lora_class = OneDNNLoRALinear

    def forward(self, x):
        return linear(x, self.weight, self.bias)


# -----------------------------------------------------------------------------
# The speed path of the Llama decoder and the VLM, and speed_up, which swaps it in

class FusedLlamaAttention(LlamaAttention):
    """LlamaAttention with q, k and v in one matmul where packed_weights stacked them (`project`), and a forward of
    unpadded rows."""
    FUSED = ("q_proj", "k_proj", "v_proj")  # projections of the same input that packed_weights may stack

    def qkv(self, x):
        return project(self, x, self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=None):
        if x.dim() == 2:
            return self.forward_unpadded(x, cos, sin, mask)
        return super().forward(x, cos, sin, mask, cache, cache_pos)

    def forward_unpadded(self, x, cos, sin, lengths):
        """x (N, D): the tokens of rows of these lengths, one row after another, no padding (FastVLM.unpadded_logits).
        Each row attends causally within itself: is_causal lets SDPA skip the masked half that a padded mask makes
        it compute, which more than pays for one call per row."""
        N = x.shape[0]
        q, k, v = project(self, x, self.q_proj, self.k_proj, self.v_proj)
        q, k, v = q.view(N, self.n_head, -1), k.view(N, self.n_kv_head, -1), v.view(N, self.n_kv_head, -1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # each row as a batch of one (B, H, T, hd): SDPA's flash kernel, not the slower math one it picks for 3-D inputs
        rows = [F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in qkv), is_causal=True,
                                               enable_gqa=self.n_kv_head != self.n_head)[0].transpose(0, 1)
                for qkv in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
        return self.o_proj(torch.cat(rows).reshape(N, -1))

class FusedLlamaMLP(LlamaMLP):
    """LlamaMLP with gate and up in one matmul where packed_weights stacked them."""
    FUSED = ("gate_proj", "up_proj")

    def forward(self, x):
        gate, up = project(self, x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class FastVLM(VLM):
    """VLM whose generate packs the decoder's weights for its batch (or runs compile_decode's compiled step), and whose
    forward can skip the padding of right-padded rows (unpadded=True)."""

    @torch.no_grad()
    def generate(self, input_ids, *args, **kwargs):
        """VLM.generate. Each decode step reads every weight for a few rows: on oneDNN, weights packed once for the
        batch are faster (packed_weights), for the prompt's B * T0 rows too, with the same values. After
        compile_decode(self, ...), the same tokens from the compiled decode step (prefill_static), which asks whether
        every row has ended only every 8 tokens."""
        if getattr(self, "decode_step", None) is not None:
            return super().generate(input_ids, *args, **{"check_every": 8, **kwargs})
        with packed_weights([self.language_model, self.lm_head], input_ids.shape[0]):
            return super().generate(input_ids, *args, **kwargs)

    def prefill(self, *args, **kwargs):
        if getattr(self, "decode_step", None) is not None:
            return prefill_static(self, *args, **kwargs)
        return super().prefill(*args, **kwargs)

    def decoder_states(self, x, attention_mask):
        """VLM.decoder_states; after compile_scoring, compiled, on x and attention_mask right-padded to a multiple of
        its bucket. The padding comes after every real position and is masked, so the real positions' states are
        those of the eager decoder up to float32 rounding (the padded matmuls are longer)."""
        compiled = getattr(self, "compiled_states", None)
        if compiled is None:
            return super().decoder_states(x, attention_mask)
        T = x.shape[1]
        pad = round_up(T, self.scoring_bucket) - T
        return compiled(self, F.pad(x, (0, 0, 0, pad)), F.pad(attention_mask, (0, pad)))[:, :T]

    def forward(self, input_ids, pixel_values=None, image_layer=None, attention_mask=None, return_hidden=False,
                logits_at=None, image_sizes=None, unpadded=False):
        """VLM.forward; unpadded=True: the same (N, V) logits of right-padded rows from unpadded_logits, which skips
        the padding."""
        if unpadded:
            if return_hidden:
                raise InputError("unpadded=True gives the logits only; expected return_hidden=False")
            return self.unpadded_logits(input_ids, pixel_values, image_layer, attention_mask, logits_at, image_sizes)
        return super().forward(input_ids, pixel_values, image_layer, attention_mask, return_hidden, logits_at,
                               image_sizes)

    def unpadded_logits(self, input_ids, pixel_values, image_layer, attention_mask, logits_at, image_sizes=None):
        """forward(..., logits_at=logits_at) of right-padded rows (sft.collate's), with the decoder run on the real
        tokens only, one row after another: no layer does any work for padding (about a fifth of the tokens of a
        batch of the safety data). The same logits up to float32 rounding."""
        B, T = input_ids.shape
        keep = attention_mask.bool()
        lengths = keep.sum(1)
        if not torch.equal(keep, torch.arange(T, device=keep.device) < lengths[:, None]):
            raise InputError("unpadded forward: attention_mask is not right padding; expected each row's 1s first, "
                             "then only 0s (sft.collate)")
        if logits_at is None or logits_at.dtype != torch.bool or bool((logits_at & ~keep).any()):
            raise InputError("unpadded forward: expected logits_at, a (B, T) bool mask of real (unpadded) tokens")
        if self.config.text.sliding_window is not None:
            raise InputError(f"unpadded forward: the decoder has a sliding window of {self.config.text.sliding_window}"
                             "; expected none (run the padded forward)")
        x = self.embed(input_ids, pixel_values, image_layer, image_sizes)[keep]
        positions = torch.arange(T, device=keep.device).expand(B, T)[keep]
        hidden = self.language_model(x, positions, lengths.tolist())
        return self.lm_head(hidden[logits_at[keep]])


def speed_up(model):
    """Swap the speed path into `model` in place and return it: the same parameters and state dict, the same numbers
    up to float32 rounding. Call it once, on a loaded model, before add_lora and add_value_head (whose layers then stay
    as they are made). Of an mllama model only the Llama layers change: its own layers run as they are."""
    roots = [model]
    if isinstance(model, MllamaVLM):
        roots = [m for m in model.modules() if type(m) in (LlamaAttention, LlamaMLP)]
    for m in [m for root in roots for m in root.modules()]:
        if type(m) is nn.Linear:
            m.__class__ = Linear  # only forward changes
        elif type(m) is LlamaAttention:
            m.__class__ = FusedLlamaAttention
        elif type(m) is LlamaMLP:
            m.__class__ = FusedLlamaMLP
        elif type(m) is VLM:
            m.__class__ = FastVLM
    return model


# -----------------------------------------------------------------------------
# torch.compile: a compiled decode step (gpt-fast's decode_one_token) and what keeps compiled code compiled once.
# Dynamo guards on every shape, Python value and module flag a compiled function reads; a guard that fails recompiles,
# and past torch._dynamo.config.recompile_limit it silently runs eager. So the KV cache has one fixed size, the
# per-token mask is computed from tensors instead of built in Python, and the training forwards pad their lengths to
# multiples of LENGTH_BUCKET (lppo.py, sft.py, reward.py with --compile).
#
# On a GPU:  compile_decode(vlm, batch_size, max_len), then vlm.generate(...) as always. The decode step runs as CUDA
# graphs (mode="reduce-overhead"); the first call compiles (about a minute), later calls replay. On a CPU it compiles
# to C++ with inductor, which is how the tests check it gives the eager tokens.

LENGTH_BUCKET = 64

# PyTorch's cache of compiled code is not keyed by ATEN_CPU_CAPABILITY: a decode step compiled uncapped and loaded again
# under ATEN_CPU_CAPABILITY=avx2 (how bench.py and the tests time an AVX2 machine's kernels) gave NaN logits on two
# threads and a segmentation fault on one (torch 2.13). A capped process keeps a cache of its own, unless the user
# chose one (torch writes its default into TORCHINDUCTOR_CACHE_DIR once it has looked).
INDUCTOR_CACHE = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")  # torch's default
if os.environ.get("ATEN_CPU_CAPABILITY") and os.environ.get("TORCHINDUCTOR_CACHE_DIR", INDUCTOR_CACHE) == INDUCTOR_CACHE:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{INDUCTOR_CACHE}_{os.environ['ATEN_CPU_CAPABILITY'].lower()}"


def round_up(n, multiple):
    return -(-n // multiple) * multiple


class DecodeCache(KVCache):
    """The KVCache of compile_decode, allocated once at a fixed (batch, max_len): the compiled step always sees the
    same shapes, and under CUDA graphs the same addresses. `valid` (batch, max_len) is False on left padding."""

    def __init__(self, cfg, batch, max_len, dtype, device):
        super().__init__(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype, device)
        self.register_buffer("valid", torch.ones(batch, max_len, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("k_pos", torch.arange(max_len, device=device), persistent=False)


def decode_one_token(vlm, tok, pos, cache_pos):
    """Float32 next-token logits (B, V) after one token per row, tok (B,) at rotary positions pos (B, 1), written to
    cache slot cache_pos (1,). The mask is computed from tensors (a row sees its valid keys up to cache_pos): every
    step of every generate call has the same shapes and Python values, so this compiles once."""
    cache, lm = vlm.decode_cache, vlm.language_model
    mask = (cache.valid & (cache.k_pos <= cache_pos))[:, None, None]
    h = lm(lm.embed_tokens(tok[:, None]), pos, mask, cache, cache_pos)
    return vlm.response_logits(h[:, -1]).float()


def compile_decode(vlm, batch_size, max_len, mode=None):
    """Make vlm.generate run a compiled decode step over a static KV cache of batch_size rows x max_len positions
    (prompt + new tokens); any smaller batch and shorter prompt reuse it. mode None: "reduce-overhead" (CUDA graphs)
    on a GPU, inductor's default elsewhere. Call it after add_lora: adapters are part of the compiled step."""
    if isinstance(vlm.config, MllamaConfig):
        raise InputError("compile_decode: the compiled decode step is for llava and llava_next checkpoints; an mllama "
                         "model generates eagerly (compile=False)")
    if not isinstance(vlm, FastVLM):
        raise InputError("compile_decode: expected a model from VLM.from_pretrained (or one given to speed_up), whose "
                         "generate runs the compiled step")
    window = vlm.config.text.sliding_window
    if window is not None and max_len > window:
        raise InputError(f"compile_decode: max_len={max_len} is longer than the sliding window of {window}; the "
                         "compiled step has no window, expected max_len <= sliding_window")
    emb = vlm.language_model.embed_tokens.weight
    vlm.decode_cache = DecodeCache(vlm.config.text, batch_size, max_len, emb.dtype, emb.device)
    for buf in vlm.decode_cache.buffers():
        torch._dynamo.mark_static_address(buf)  # CUDA graphs then write the cache in place, never into a copy
    mode = mode or ("reduce-overhead" if emb.device.type == "cuda" else "default")
    vlm.decode_step = torch.compile(decode_one_token, mode=mode, fullgraph=True, dynamic=False)
    return vlm


def prefill_static(vlm, input_ids, attention_mask, pixel_values, image_layer, max_new_tokens, image_sizes=None):
    """VLM.prefill on the compiled step: the prompt in one eager call into compile_decode's cache, then decode(tok) is
    one call of vlm.decode_step, without a host sync. The same sampling, in the same order: the same tokens and
    logprobs."""
    cache, cfg = vlm.decode_cache, vlm.config
    (B, T0), (Bc, S) = input_ids.shape, cache.valid.shape
    if B > Bc or T0 + max_new_tokens > S:
        raise InputError(f"generate: {B} prompts of {T0} tokens + max_new_tokens={max_new_tokens} do not fit the "
                         f"compiled KV cache of {Bc} rows x {S} positions; expected a larger compile_decode(vlm, "
                         "batch_size, max_len)")
    # rows B..Bc are filler that keeps the shapes fixed: all-valid zero embeddings, never read
    x = F.pad(vlm.embed(input_ids, pixel_values, image_layer, image_sizes), (0, 0, 0, 0, 0, Bc - B))
    cache.valid.fill_(True)
    cache.valid[:, :T0] = F.pad(attention_mask, (0, 0, 0, Bc - B), value=1).bool()
    pos = (cache.valid[:, :T0].long().cumsum(-1) - 1).clamp(min=0)
    prompt_pos = cache.k_pos[:T0]
    hidden = vlm.language_model(x, pos, build_mask(cache.valid, prompt_pos, cache.k_pos), cache, prompt_pos)
    pos, cache_pos = pos[:, -1:], cache.k_pos[T0 - 1:T0].clone()

    def decode(tok):
        nonlocal pos, cache_pos
        pos, cache_pos = pos + 1, cache_pos + 1
        torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed: CUDA graphs may reuse them
        return vlm.decode_step(vlm, F.pad(tok, (0, Bc - B), value=cfg.pad_token_id), pos, cache_pos)[:B]

    return vlm.response_logits(hidden[:B, -1]).float(), decode


def compile_scoring(vlm, backend="inductor", bucket=LENGTH_BUCKET):
    """Make vlm.hidden_states run its decoder compiled, on lengths padded to multiples of `bucket` (FastVLM.
    decoder_states): lppo.response_forward then scores and trains on rollouts of any length with a few graphs. The
    image side stays eager, with its checks and each row's own layer."""
    if not isinstance(vlm, FastVLM):
        raise InputError("compile_scoring: expected a model from VLM.from_pretrained (or one given to speed_up), whose "
                         "decoder_states runs the compiled decoder")
    vlm.compiled_states = torch.compile(VLM.decoder_states, backend=backend, fullgraph=True, dynamic=False)
    vlm.scoring_bucket = bucket
    return vlm


def compile_rollouts(vlm, batch_size, max_len):
    """lppo.py's `compile`: generate on a compiled decode step (compile_decode), and score and train with a compiled
    decoder (compile_scoring). lppo.response_forward stays as it is: the model runs its compiled pieces."""
    compile_decode(vlm, batch_size, max_len)
    return compile_scoring(vlm)
