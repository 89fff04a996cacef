"""
Reward model r(x, y): a decoder with a scalar head read at the last token, trained on preference pairs with the
Bradley-Terry loss (Eq. 4). It reads text only, the prompt and the response in HH-RLHF format, never the image.
Two backbones: GPT-2, the paper's ("we use the reward model GPT2 architectures", trained on HH-RLHF), and the
Llama decoder of model.py, for the smol world's reward model (SmolLM2 with a head, see config/smol_rm.py).
Checkpoints are transformers' GPT2ForSequenceClassification / LlamaForSequenceClassification folders.

The top of this file holds the reusable parts: the loss, HH-RLHF transcript handling, a GPT-2 tokenizer built with
tiktoken from a checkpoint's own vocab.json and merges.txt, and the RewardModel. The training program, main(), is
at the bottom, after its default config:

    python reward.py config/smol_rm.py                             # the smol world's RM, ~N minutes on 2 CPU cores
    torchrun --standalone --nproc_per_node=8 reward.py config/gpt2_hh_rm.py   # the paper's GPT-2 on HH-RLHF
"""

import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (DEVICE, DTYPE, InputError, atomic_folder, atomic_save_safetensors, autocast, average_gradients,
                    check_writable_dir, compute_init, get_lr, read_json, read_jsonl, run_stage, strict_compile)
from model import (LENGTH_BUCKET, VLM, LlamaModel, LoRALinear, VLMConfig, add_lora, build_mask, config_from_hf,
                   config_to_hf, load_tokenizer, load_weights, pick_config, resolve_checkpoint, rope_inv_freq, round_up,
                   speed_up)

# -----------------------------------------------------------------------------
# Bradley-Terry loss


def bradley_terry_loss(chosen_scores, rejected_scores):
    """Mean -log σ(r_chosen - r_rejected), and the fraction of pairs ranked the right way round."""
    margin = chosen_scores - rejected_scores
    loss = -F.logsigmoid(margin).mean()  # Eq. 4: L_RM = −E log σ(r(x, y_w) − r(x, y_l))
    accuracy = (margin > 0).float().mean()  # a tie counts as wrong: the model has not ranked the pair
    return loss, accuracy

# -----------------------------------------------------------------------------
# HH-RLHF transcripts: "\n\nHuman: ...\n\nAssistant: ...", possibly several turns

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


def split_hh(transcript):
    """Split an HH transcript at its last Assistant turn into (prompt, response); inverse of format_hh."""
    # the last Assistant turn is the response being judged; earlier turns stay in the prompt as context
    i = transcript.rfind(ASSISTANT)
    if not transcript.startswith(HUMAN) or i < 0:
        raise ValueError(f"HH transcript should start with {HUMAN!r} and contain {ASSISTANT!r}, "
                         f"got {transcript[:60]!r}")
    prompt = transcript[len(HUMAN):i].removeprefix(" ")
    response = transcript[i + len(ASSISTANT):].removeprefix(" ")
    return prompt, response


def format_hh(prompt, response):
    """The HH-RLHF text the reward model was trained on, for a prompt and a response."""
    return f"{HUMAN} {prompt}{ASSISTANT} {response}"


def read_preference_jsonl(path, hh=False):
    """Read HH-RLHF style {"chosen": str, "rejected": str} lines (.jsonl, or .jsonl.gz as Anthropic ships them)
    into a list of (chosen, rejected) pairs; hh=True also checks that each text is an HH transcript."""
    pairs = []
    for lineno, record in read_jsonl(path):
        for key in ("chosen", "rejected"):
            if not isinstance(record.get(key), str):
                raise InputError(f"{path}:{lineno}: key {key!r} should be a string, got {record.get(key)!r:.60}")
            if hh:
                try:
                    split_hh(record[key])
                except ValueError as e:
                    raise InputError(f"{path}:{lineno}: {key!r} is not an HH-RLHF transcript: {e}") from None
        # an identical pair carries no preference, and would pull the loss towards log 2 for nothing
        if record["chosen"] == record["rejected"]:
            raise InputError(f"{path}:{lineno}: 'chosen' and 'rejected' are identical")
        pairs.append((record["chosen"], record["rejected"]))
    if not pairs:
        raise InputError(f"{path}: no preference pairs, expected one JSON object per line")
    return pairs

# -----------------------------------------------------------------------------
# GPT-2 tokenizer, from the checkpoint's files

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other symbols, each with at most one leading space
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"


def bytes_to_unicode():
    """GPT-2's table from each byte to a printable character, which is how vocab.json spells bytes."""
    # printable Latin-1 bytes stand for themselves; the rest (control chars, space, ...) are moved to 256 and up
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def gpt2_tiktoken_encoding(folder):
    """A tiktoken Encoding equal to the GPT-2 BPE tokenizer in folder/vocab.json + folder/merges.txt."""
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    for p in (vocab_path, merges_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: missing; a GPT-2 tokenizer needs vocab.json and merges.txt in {folder}")
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        merge_lines = f.read().split("\n")
    if ENDOFTEXT not in vocab:
        raise ValueError(f"{vocab_path}: no {ENDOFTEXT!r} entry, expected a GPT-2 vocabulary")
    special_tokens = {ENDOFTEXT: vocab.pop(ENDOFTEXT)}

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {}
    for token, token_id in vocab.items():
        if any(c not in byte_of for c in token):
            raise ValueError(f"{vocab_path}: entry {token!r} is not in GPT-2's byte-level alphabet")
        ranks[bytes(byte_of[c] for c in token)] = token_id
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{vocab_path}: no token for bytes {missing[:8]}, expected all 256 bytes")

    # tiktoken merges the adjacent pair whose result has the lowest rank, HF the pair listed first in merges.txt;
    # with rank = id the two agree if the id of each merge's result grows down the file (GPT-2: id = 256 + index)
    # and every other token is a single byte
    merged, last_id = set(), -1
    for lineno, line in enumerate(merge_lines, start=1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        pair = line.split()
        token_id = vocab.get("".join(pair)) if len(pair) == 2 else None
        if token_id is None or token_id <= last_id:
            raise ValueError(f"{merges_path}:{lineno}: merge {line!r} gives id {token_id} after id {last_id}, "
                             f"expected a token of vocab.json with ids increasing down the file")
        merged.add("".join(pair))
        last_id = token_id
    extra = [t for t in vocab if len(t) > 1 and t not in merged]
    if extra:
        raise ValueError(f"{vocab_path}: tokens {extra[:5]} come from no merge in {merges_path}")
    return tiktoken.Encoding(name=f"gpt2:{os.path.abspath(folder)}", pat_str=GPT2_SPLIT_PATTERN,
                             mergeable_ranks=ranks, special_tokens=special_tokens)

# -----------------------------------------------------------------------------
# GPT-2 (Radford et al. 2019): the backbone of the paper's reward model (RewardModel puts a scalar head on it).
# Module names are Hugging Face's (wte, wpe, h.N.ln_1, attn.c_attn, ...). HF stores GPT-2's linears as Conv1D
# with weights [in, out]; ours are nn.Linear, [out, in], so those four weights are transposed on load and save.

GPT2_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int = 0                      # 0: 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"

    def __post_init__(self):
        self.n_inner = self.n_inner or 4 * self.n_embd


def gpt2_config_from_hf(d, where="config.json"):
    """A GPT2Config from a transformers GPT-2 config.json, refusing the options our GPT-2 does not implement."""
    if d.get("model_type") != "gpt2":
        raise InputError(f"{where}: model_type is {d.get('model_type')!r}, expected 'gpt2'")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        if d.get(key, ok) != ok:
            raise InputError(f"{where}: {key}={d[key]!r} is not supported, expected {ok!r}")
    cfg = pick_config(GPT2Config, d, where)
    if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise InputError(f"{where}: activation_function {cfg.activation_function!r} is not supported, "
                         "expected 'gelu_new'")
    return cfg


def gpt2_config_to_hf(cfg):
    return {**asdict(cfg), "model_type": "gpt2"}


class GPT2Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, mask):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class GPT2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.n_inner)
        self.c_proj = nn.Linear(cfg.n_inner, cfg.n_embd)
        # gelu_new is the tanh approximation of GELU; plain "gelu" is the exact (erf) one
        self.approximate = "none" if cfg.activation_function == "gelu" else "tanh"

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class GPT2Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)  # learned absolute positions
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(self, x, position_ids, mask):
        """Run token embeddings x (B, T, D) at positions (B, T) under a boolean mask, as LlamaModel does;
        return the final-normed hidden states."""
        x = x + self.wpe(position_ids)
        for block in self.h:
            x = block(x, mask)
        return self.ln_f(x)

# -----------------------------------------------------------------------------
# The reward model: a GPT-2 or Llama decoder, and a linear head read at each row's last real token

# what a checkpoint folder's tokenizer may consist of; save_pretrained copies whichever exist
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def llama_config_from_hf(d, where):
    """model.LlamaConfig from a Llama config.json, parsed as the text_config of a llava config (one parser for both)."""
    return config_from_hf({"model_type": "llava", "text_config": {**d, "model_type": "llama"}}, where).text


def right_pad(seqs, pad_id, device="cpu", multiple=1):
    """Stack ragged id lists into (B, T) input_ids and attention_mask, padding on the right; T is the longest list
    rounded up to a multiple of `multiple` (compile pads to buckets, so that shapes repeat)."""
    T = round_up(max(len(s) for s in seqs), multiple)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


class RewardModel(nn.Module):
    """r(x, y) = w · h_last: transformers' GPT2ForSequenceClassification or LlamaForSequenceClassification."""

    def __init__(self, model_type, config, pad_token_id=None):
        super().__init__()
        self.model_type, self.config, self.pad_token_id = model_type, config, pad_token_id
        if model_type == "gpt2":
            self.backbone, width, self.max_length = GPT2Model(config), config.n_embd, config.n_positions
        else:
            self.backbone, width = LlamaModel(config), config.hidden_size
            self.max_length = config.max_position_embeddings
        # transformers calls it `score`; here score() is the method that scores text. Kept in float32.
        self.head = nn.Linear(width, 1, bias=False, dtype=torch.float32)
        self.tokenizer, self.bos, self.source = None, [], None  # set by from_pretrained
        self.truncation_noticed = False

    def blocks(self):
        return self.backbone.h if self.model_type == "gpt2" else self.backbone.layers

    def forward(self, input_ids, attention_mask=None):
        """Scores (B,) float32 read at each row's last real token. Without attention_mask, as in transformers,
        padding is wherever input_ids equal pad_token_id."""
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_token_id) if self.pad_token_id is not None else \
                torch.ones_like(input_ids)
        real = attention_mask.bool()
        B, T = input_ids.shape
        idx = torch.arange(T, device=input_ids.device)
        # positions count real tokens only, so a row scores the same whichever side it is padded on
        position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)
        embed = self.backbone.wte if self.model_type == "gpt2" else self.backbone.embed_tokens
        hidden = self.backbone(embed(input_ids), position_ids, build_mask(real, idx, idx))
        last = (idx * real).argmax(-1)  # the rightmost real token
        with torch.autocast(input_ids.device.type, enabled=False):  # a scalar reward deserves float32
            return self.head(hidden[torch.arange(B, device=input_ids.device), last].float()).squeeze(-1)

    def tokens(self, text):
        """Token ids of text, without special tokens."""
        if isinstance(self.tokenizer, tiktoken.Encoding):
            return self.tokenizer.encode(text, allowed_special="all")  # "<|endoftext|>" is one token, as in HF
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_hh(self, prompt, response):
        """Token ids of format_hh(prompt, response); a transcript over max_length loses the start of its prompt."""
        ids = self.bos + self.tokens(format_hh(prompt, response))
        if len(ids) <= self.max_length:
            return ids
        if not self.truncation_noticed:
            print(f"reward: a transcript of {len(ids)} tokens is longer than max_length={self.max_length}; the start "
                  "of its prompt is dropped to fit (and the end of a response too long on its own). Said once.")
            self.truncation_noticed = True
        head, body = self.bos + self.tokens(HUMAN), self.tokens(" " + prompt)
        tail = self.tokens(f"{ASSISTANT} {response}")
        keep = max(self.max_length - len(head) - len(tail), 0)
        return (head + body[len(body) - keep:] + tail)[:self.max_length]

    @torch.no_grad()
    def score_tokens(self, seqs, batch_size=16):
        """Scores (N,) float32 of token-id lists, right-padded in batches of similar length."""
        device = self.head.weight.device
        scores = torch.empty(len(seqs), dtype=torch.float32, device=device)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        pad = 0 if self.pad_token_id is None else self.pad_token_id
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            scores[rows] = self(*right_pad([seqs[j] for j in rows], pad, device))
        return scores

    def score(self, prompts, responses, batch_size=16):
        """r(x, y) of each (prompt, response) in HH format: (B,) float32 on the model's device."""
        if len(prompts) != len(responses):
            raise InputError(f"reward: got {len(prompts)} prompts and {len(responses)} responses, expected one each")
        return self.score_tokens([self.encode_hh(p, r) for p, r in zip(prompts, responses)], batch_size)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, init_head=False):
        """Load a GPT2/LlamaForSequenceClassification folder. With init_head, also start a reward model from a
        language model without a head (GPT-2, Llama, or a llava folder's language model): the head starts at zero."""
        path = resolve_checkpoint(path)
        where = os.path.join(path, "config.json")
        d = read_json(where)
        model_type, archs = d.get("model_type"), d.get("architectures") or []
        if not init_head and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise InputError(f"{where}: architectures {archs} has no reward head, expected "
                             "GPT2ForSequenceClassification or LlamaForSequenceClassification "
                             "(train one with reward.py)")
        if model_type == "llava":
            vlm = VLM.from_pretrained(path, device, dtype)
            with torch.device("meta"):
                rm = cls("llama", vlm.config.text, vlm.config.pad_token_id)
            rm.backbone = vlm.language_model  # the llava's decoder itself, no second copy
            rm.head = nn.Linear(vlm.config.text.hidden_size, 1, bias=False, device=device, dtype=torch.float32)
            nn.init.zeros_(rm.head.weight)
        elif model_type in ("gpt2", "llama"):
            if model_type == "gpt2":
                # GPT-2 has no pad token of its own; reward models pad with EOS, and so does transformers' example
                cfg, pad = gpt2_config_from_hf(d, where), d.get("pad_token_id", d.get("eos_token_id"))
            else:
                cfg, pad = llama_config_from_hf(d, where), d.get("pad_token_id")
            with torch.device("meta"):
                rm = cls(model_type, cfg, pad)
            load_reward_weights(rm, path, device, dtype, init_head)
            speed_up(rm.backbone)  # model.py's CPU speed path; the head stays a plain float32 nn.Linear
        else:
            raise InputError(f"{where}: model_type {model_type!r} is not supported, expected 'gpt2' or 'llama' "
                             "(a reward model or a language model), or 'llava' (its language model)")
        rm.source = path
        if rm.model_type == "gpt2":
            try:
                rm.tokenizer = gpt2_tiktoken_encoding(path)
            except (FileNotFoundError, ValueError) as e:
                raise InputError(str(e)) from None
        else:
            rm.tokenizer = load_tokenizer(path)
            rm.bos = rm.tokenizer("")["input_ids"]  # whatever the tokenizer puts in front of every text (BOS or none)
        return rm.eval()

    def hf_config(self):
        if self.model_type == "gpt2":
            d, arch = gpt2_config_to_hf(self.config), "GPT2ForSequenceClassification"
        else:
            d, arch = config_to_hf(VLMConfig(text=self.config))["text_config"], "LlamaForSequenceClassification"
            d["tie_word_embeddings"] = False  # there is no lm_head to tie
        return {**d, "architectures": [arch], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
                "pad_token_id": self.pad_token_id}

    def save_pretrained(self, path, extra_files=None):
        """Write a transformers *ForSequenceClassification folder: config.json, model.safetensors and the tokenizer
        files, atomically. LoRA adapters are folded into the saved weights; the model itself is left as is.
        extra_files: {name: JSON-able object} written into the folder too."""
        prefix = "transformer." if self.model_type == "gpt2" else "model."
        sd = {}
        for key, t in merged_state_dict(self).items():
            if key == "head.weight":
                sd["score.weight"] = t
                continue
            hf_key = prefix + key.removeprefix("backbone.")
            sd[hf_key] = t.t() if self.model_type == "gpt2" and hf_key.endswith(GPT2_CONV1D_WEIGHTS) else t
        with atomic_folder(path) as tmp:
            atomic_save_safetensors({k: v.detach().contiguous().cpu() for k, v in sd.items()},
                                    os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            for name, obj in {"config.json": self.hf_config(), **(extra_files or {})}.items():
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(obj, f, indent=2)
            for name in TOKENIZER_FILES:
                if self.source and os.path.isfile(os.path.join(self.source, name)):
                    shutil.copy(os.path.join(self.source, name), tmp)


def load_reward_weights(rm, path, device, dtype, init_head):
    """Load a GPT-2 or Llama checkpoint into rm (built on the meta device) with model.py's loader."""
    prefix = "transformer." if rm.model_type == "gpt2" else "model."

    def rename(key):
        if key == "lm_head.weight":
            return None  # the language-model head is not part of a reward model
        # GPT2Model checkpoints have bare keys, the *LMHeadModel / *ForSequenceClassification ones a prefix
        return "head.weight" if key == "score.weight" else "backbone." + key.removeprefix(prefix)

    expected = [k for k in rm.state_dict() if not (init_head and k == "head.weight")]
    try:
        loaded = load_weights(rm, path, rename, device, dtype, expected=expected, float32=("head.weight",),
                              transpose=GPT2_CONV1D_WEIGHTS if rm.model_type == "gpt2" else ())
    except InputError as e:
        if re.search(r"score\.weight has shape \((?!1,)", str(e)):  # a classifier with several labels
            raise InputError(f"{e} (a reward model has one output, num_labels=1)") from None
        raise
    if "head.weight" not in loaded:  # a language model: every text scores 0 at first
        rm.head = nn.Linear(rm.head.in_features, 1, bias=False, device=device, dtype=torch.float32)
        nn.init.zeros_(rm.head.weight)
    if rm.model_type == "llama":  # the rotary table is computed, not stored: rebuild it on the real device
        rm.backbone.inv_freq = rope_inv_freq(rm.config).to(device)


def merged_state_dict(module):
    """module.state_dict() with every LoRA adapter folded into its base weight, under the base layer's names."""
    sd = {k.replace(".base.", "."): v for k, v in module.state_dict().items() if ".lora_" not in k}
    for name, m in module.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"{name}.weight"] = m.merged_weight()
    return sd


def choose_trainable(rm, train_mode, last_k_blocks=1, lora_r=8, lora_alpha=16, lora_targets=()):
    """Freeze rm but for what train_mode trains, and return those parameters. Always the head; "last_k" also the
    last k blocks and the final norm; "lora" also LoRA adapters on the backbone's linears named in lora_targets."""
    blocks = rm.blocks()
    if train_mode not in ("head", "last_k", "lora"):
        raise InputError(f"train_mode={train_mode!r}, expected 'head', 'last_k' or 'lora'")
    if train_mode == "last_k" and not 1 <= last_k_blocks <= len(blocks):
        raise InputError(f"last_k_blocks={last_k_blocks}, expected 1..{len(blocks)} (the backbone's blocks)")
    rm.requires_grad_(False)
    if train_mode == "lora":  # add_lora leaves the adapters the backbone's only trainable weights
        add_lora(rm.backbone, lora_targets, lora_r, lora_alpha, 0.0)
    rm.head.requires_grad_(True)
    if train_mode == "last_k":
        blocks[len(blocks) - last_k_blocks:].requires_grad_(True)
        (rm.backbone.ln_f if rm.model_type == "gpt2" else rm.backbone.norm).requires_grad_(True)
    return [p for p in rm.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# default config values: the smol world's reward model (config/smol_rm.py; config/gpt2_hh_rm.py is the paper's);
# config/*.py and --key=value override them (configurator.py)
# I/O
init_from = "data/smol/smol-llava-base"     # a reward model folder, a GPT-2 or Llama LM, or a llava folder
train_file = "data/smol/prefs_train.jsonl"  # HH-RLHF JSONL {"chosen", "rejected"}, .jsonl or .jsonl.gz
test_file = "data/smol/prefs_test.jsonl"    # held out: scored, never trained on
out_dir = "out/smol-rm"                     # the reward model folder, rewritten at every eval
# what trains: always the head; "last_k" also the last last_k_blocks blocks, "lora" also LoRA adapters
train_mode = "last_k"
last_k_blocks = 4
lora_r = 8
lora_alpha = 16
lora_targets = []                           # [] = attention projections (q/k/v/o_proj; GPT-2: c_attn, c_proj)
max_length = 0                              # tokens per transcript, prompt cut from the left; 0 = the context
# optimization
batch_size = 8                              # pairs per rank per micro step
gradient_accumulation_steps = 1
max_iters = 100
learning_rate = 1e-4
min_lr = 1e-5                               # cosine decay to min_lr at max_iters, after warmup_iters
warmup_iters = 5
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# logging
eval_interval = 25
eval_batch_size = 16
log_interval = 5
# system
device = DEVICE                             # "cuda" when there is a GPU
dtype = DTYPE                               # "bfloat16" where supported, else "float32"
compile = False                             # torch.compile the training forward on bucketed lengths
seed = 1337
config_keys = [k for k, v in globals().items() if not k.startswith("_") and not k.isupper()
               and isinstance(v, (int, float, bool, str, list, type(None)))]
# what the configurator checks before any work is done
POSITIVE = ("last_k_blocks", "lora_r", "lora_alpha", "batch_size", "gradient_accumulation_steps", "max_iters",
            "learning_rate", "eval_interval", "eval_batch_size", "log_interval")
CHOICES = {"train_mode": ("head", "last_k", "lora"), "dtype": ("float32", "bfloat16")}
# -----------------------------------------------------------------------------


def main():
    """Bradley-Terry training on preference pairs, with the held-out pairwise accuracy at every eval."""
    config = {k: globals()[k] for k in config_keys}
    ddp, rank, local_rank, world_size, dev = compute_init(device)
    master = rank == 0
    print0 = print if master else (lambda *a, **k: None)
    ctx = autocast(dev, dtype)  # float32 weights; on CUDA the matmuls run in dtype, the head stays float32
    torch.manual_seed(seed)  # the same head and LoRA initialisation in every process

    # data and model (the smol world's: python data/smol/world.py builds them)
    if master:
        check_writable_dir(out_dir)
    train_pairs = read_preference_jsonl(train_file, hh=True)
    test_pairs = read_preference_jsonl(test_file, hh=True)
    rm = RewardModel.from_pretrained(init_from, device=dev, init_head=True)
    if max_length:
        rm.max_length = max_length
    targets = lora_targets or (["c_attn", "c_proj"] if rm.model_type == "gpt2" else
                               ["q_proj", "k_proj", "v_proj", "o_proj"])
    params = choose_trainable(rm, train_mode, last_k_blocks, lora_r, lora_alpha, targets)
    # each pair as two token-id lists: (chosen transcript, rejected transcript)
    train = [(rm.encode_hh(*split_hh(c)), rm.encode_hh(*split_hh(r))) for c, r in train_pairs]
    test = [(rm.encode_hh(*split_hh(c)), rm.encode_hh(*split_hh(r))) for c, r in test_pairs]
    global_batch = batch_size * gradient_accumulation_steps * world_size
    if len(train) < global_batch:
        raise InputError(f"{train_file}: {len(train)} pairs, fewer than one batch of {global_batch} "
                         "(batch_size x gradient_accumulation_steps x ranks)")
    n_trainable = sum(p.numel() for p in params)
    print0(f"reward: {rm.model_type} backbone from {init_from}, training {train_mode} "
           f"({n_trainable / 1e6:.2f}M of {sum(p.numel() for p in rm.parameters()) / 1e6:.2f}M parameters); "
           f"{len(train)} train pairs, {len(test)} held-out; {max_iters} iters = "
           f"{max_iters * global_batch / len(train):.1f} epochs")

    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay)
    if compile:
        strict_compile()
    model = torch.compile(rm, fullgraph=True, dynamic=False) if compile else rm
    pad_id = 0 if rm.pad_token_id is None else rm.pad_token_id

    def held_out():
        """BT loss, pairwise accuracy and mean scores on the held-out pairs, each rank scoring its share."""
        rm.eval()
        mine = test[rank::world_size]
        with ctx:
            c = rm.score_tokens([p[0] for p in mine], eval_batch_size)
            r = rm.score_tokens([p[1] for p in mine], eval_batch_size)
        rm.train()
        sums = torch.stack([-F.logsigmoid(c - r).sum(), (c > r).float().sum(), c.sum(), r.sum(),
                            torch.tensor(float(len(mine)), device=c.device)])
        if ddp:
            torch.distributed.all_reduce(sums)
        n = sums[4].item()
        return {"loss": sums[0].item() / n, "accuracy": sums[1].item() / n,
                "mean_chosen": sums[2].item() / n, "mean_rejected": sums[3].item() / n}

    def batches():
        """Endless global batches of pair indices: a fresh permutation each epoch, the same on every rank."""
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(len(train), generator=g).tolist()
            for i in range(0, len(perm) - global_batch + 1, global_batch):
                yield perm[i:i + global_batch]

    # training loop
    rm.train()
    stream = batches()
    t_start = time.time()
    bar = tqdm(total=max_iters, desc="reward", disable=not master, dynamic_ncols=True)
    log = bar.write if master else (lambda *a, **k: None)
    for it in range(max_iters + 1):
        if (it % eval_interval == 0 and it > 0) or it == max_iters:
            stats = held_out()
            if not math.isfinite(stats["loss"]):
                bar.close()
                raise InputError(f"iteration {it}: held-out loss {stats['loss']}; stopped before saving, {out_dir} "
                                 "holds the last good reward model")
            log(f"iter {it}: held-out accuracy {stats['accuracy']:.2%}, BT loss {stats['loss']:.4f}, "
                f"mean score chosen {stats['mean_chosen']:+.3f} rejected {stats['mean_rejected']:+.3f}")
            if master:
                record = {"iter": it, "max_iters": max_iters, "finished": it == max_iters, "held_out": stats,
                          "train_seconds": round(time.time() - t_start, 1), "config": config}
                rm.save_pretrained(out_dir, extra_files={"reward_train.json": record})
        if it == max_iters:
            break
        t0 = time.time()
        lr = get_lr(it, learning_rate, warmup_iters, max_iters, min_lr)  # cosine decay to min_lr at max_iters
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(stream)
        for micro in range(gradient_accumulation_steps):
            start = (micro * world_size + rank) * batch_size
            mine = batch[start:start + batch_size]
            ids, mask = right_pad([train[i][0] for i in mine] + [train[i][1] for i in mine], pad_id, dev,
                                  LENGTH_BUCKET if compile else 1)
            with ctx:
                scores = model(ids, mask)
                loss, accuracy = bradley_terry_loss(scores[:len(mine)], scores[len(mine):])  # Eq. 4
            (loss / gradient_accumulation_steps).backward()
        # the mean gradient over the ranks, the same on every rank, and the loss is reduced too: a divergence stops
        # every rank here, before the step, so the reward model last saved in out_dir stays the last finite one
        average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
        loss_now = loss.detach().clone()
        if ddp:
            torch.distributed.all_reduce(loss_now)
        if not (torch.isfinite(loss_now) and torch.isfinite(grad_norm)):
            bar.close()
            raise InputError(f"iteration {it}: loss {loss_now.item() / world_size}, gradient norm {grad_norm.item()}; "
                             f"stopped before the optimizer step, {out_dir} holds the last good reward model")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        if it % log_interval == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{accuracy.item():.2f}")
            log(f"iter {it}: loss {loss.item():.4f}, batch accuracy {accuracy.item():.2f}, lr {lr:.2e}, "
                f"{(time.time() - t0) * 1000:.0f} ms/iter")
    bar.close()
    print0(f"reward: trained in {time.time() - t_start:.0f}s; saved to {out_dir}")


if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    run_stage(main)
