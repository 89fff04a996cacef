"""
Supervised fine-tuning (SFT) of the VLM's language model with LoRA, on (image, prompt, response) examples.

The projector is fed the CLIP hidden state of `image_layer` (None: the checkpoint's default, an int, or a list
with one layer drawn per example), so the same script makes the aligned smol default model (safety SFT at the
default layer) and the layer-wise SFT baseline the paper is compared against (SFT at an early layer l).
The loss is the next-token cross-entropy of the response tokens and the EOS after them; the prompt, the image
tokens and the padding are masked out (label -100).

    python sft.py config/smol_sft.py                               # one process
    torchrun --standalone --nproc_per_node=8 sft.py config/llava15_sft_l5.py
    python sft.py config/smol_sft.py --resume                      # continue from out_dir/ckpt.pt
"""

import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (DEVICE, DTYPE, InputError, atomic_torch_save, autocast, average_gradients, check_writable_dir,
                    compute_init, copy_tokenizer_files, generator_for, get_lr, load_resume_checkpoint,
                    load_trained_state, read_jsonl, run_stage, seed_for, shard_model, strict_compile,
                    trained_state, whole_trained_weights)
from model import (LENGTH_BUCKET, VLM, add_lora, encode_images, encode_prompt, example_image_tokens, fit_prompt,
                   image_tokens_vary, load_image, load_tokenizer, merge_lora, resolve_checkpoint, round_up, save_lora)

IGNORE_INDEX = -100  # the label of a token that is not trained on (F.cross_entropy's ignore_index)

# -----------------------------------------------------------------------------
# Data: JSONL rows -> token ids and labels -> padded batches


def read_sft_jsonl(paths):
    """Rows {"image", "image_size", "prompt", "response", "where"} of one JSONL file, or several separated by commas.

    An image path is relative to its JSONL file's folder; image_size is its (height, width). A row whose "image" is
    null (or absent) is a text-only conversation, as LLaVA-1.5 mixes ShareGPT's into its visual-instruction stage.
    Every problem is an InputError naming file and line.
    """
    rows = []
    for path in [p.strip() for p in paths.split(",") if p.strip()]:
        for n, row in read_jsonl(path):
            where = f"{path}:{n}"
            for key in ("image", "prompt", "response"):
                if not isinstance(row.get(key), str) and not (key == "image" and row.get(key) is None):
                    got = "missing" if key not in row else f"{row[key]!r}"
                    raise InputError(f"{where}: field {key!r} is {got}, expected a string"
                                     + (" (or null: no image)" if key == "image" else ""))
            image = row.get("image") and os.path.join(os.path.dirname(path), row["image"])
            if image and not os.path.isfile(image):
                raise InputError(f"{where}: image file {image} not found")
            rows.append({"image": image, "prompt": row["prompt"], "response": row["response"], "where": where})
    if not rows:
        raise InputError(f"{paths}: no examples; expected JSON lines "
                         "{\"image\": ..., \"prompt\": ..., \"response\": ...}")
    first_use, sizes = {}, {None: None}
    for row in rows:
        if row["image"]:
            first_use.setdefault(row["image"], row["where"])
    for image, where in first_use.items():  # every image opens now, not as a batch needs it hours later
        try:
            sizes[image] = load_image(image).size[::-1]
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    for row in rows:  # a LLaVA-NeXT image's token count depends on its size
        row["image_size"] = sizes[row["image"]]
    return rows


def build_example(tok, cfg, prompt, response, max_len, image=True):
    """(input_ids, labels, n_cut): the prompt with its image tokens, then the response and EOS, labelled.

    `image` is the number of image tokens (True: the config's fixed count; LLaVA-NeXT: image_token_count of the
    example's image). A sequence longer than max_len loses the first n_cut tokens of the prompt's text (the request's
    end, usually the question, is kept); the image tokens are never cut: if they do not fit, InputError.
    """
    target = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    try:
        ids, n_cut = fit_prompt(tok, cfg, prompt, max_len - len(target), image)
    except InputError:
        need = len(encode_prompt(tok, cfg, "", image)) + len(target)
        raise InputError(f"the image tokens, chat template and response need {need} tokens, more than the context "
                         f"length {max_len}, even with the whole prompt cut") from None
    return ids + target, [IGNORE_INDEX] * len(ids) + target, n_cut


def tokenize_examples(rows, tok, cfg, max_len):
    """build_example for every row, with its own image's token count (model.example_image_tokens); says once how
    many prompts were cut to fit max_len."""
    examples, n_cut = [], 0
    for row in rows:
        try:
            image = example_image_tokens(cfg, row["image_size"])
            ids, labels, cut = build_example(tok, cfg, row["prompt"], row["response"], max_len, image)
        except InputError as e:
            raise InputError(f"{row['where']}: {e}") from None
        examples.append({"input_ids": ids, "labels": labels, "image": row["image"]})
        n_cut += cut > 0
    if n_cut:
        print(f"note: {n_cut} of {len(rows)} prompts are longer than the context length {max_len}; "
              "their text was cut from the left (image tokens and responses are kept whole)")
    return examples


def collate(examples, pad_id, multiple=1):
    """Right-pad examples into (B, T) input_ids, labels (-100 on padding) and attention_mask; T is the longest
    example rounded up to a multiple of `multiple` (compile pads to buckets, so that shapes repeat)."""
    T = round_up(max(len(e["input_ids"]) for e in examples), multiple)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return input_ids, labels, mask


def count_targets(examples):
    """How many tokens of these examples carry a label (response tokens and EOS)."""
    return sum(len(e["labels"]) - e["labels"].count(IGNORE_INDEX) for e in examples)


def target_positions(labels):
    """(B, T) bool: the positions whose next token is labelled; the loss needs the logits there and nowhere else."""
    # logits at position t predict token t+1
    return F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)


def sft_loss(logits, labels, n_target):
    """Summed next-token cross-entropy of the labelled tokens, divided by n_target (labelled tokens in the step).
    `logits` is (B, T, V), or (N, V) when the model computed them at target_positions(labels) only."""
    at = target_positions(labels)
    if logits.dim() == 3:
        logits = logits[at]
    return F.cross_entropy(logits.float(), labels[:, 1:][at[:, :-1]], reduction="sum") / n_target


def target_index(labels, multiple):
    """(K,) flat indices of target_positions(labels) and (K,) the label that follows each, both padded to a multiple
    of `multiple` (index 0, label IGNORE_INDEX): the fixed-shape logits_at and targets of a compiled forward."""
    at = target_positions(labels).flatten().nonzero()[:, 0]
    pad = round_up(max(len(at), 1), multiple) - len(at)
    following = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()[at]
    return F.pad(at, (0, pad)), F.pad(following, (0, pad), value=IGNORE_INDEX)


def bucketed_sft_loss(net, input_ids, images, layers, mask, labels, n_target, bucket=LENGTH_BUCKET):
    """sft_loss of net(...) with `compile`: the logits at a bucketed number of flat positions, not at a bool mask,
    whose data-dependent row count would break the graph. labels (on the CPU: no device sync) pick the positions."""
    at, targets = target_index(labels, bucket)
    logits = net(input_ids, image_layer=layers, attention_mask=mask, logits_at=at.to(input_ids.device), **images)
    return F.cross_entropy(logits.float(), targets.to(input_ids.device), reduction="sum") / n_target


# -----------------------------------------------------------------------------
# Randomness named by (seed, step) keys (common.seed_for): a resumed run draws exactly what the uninterrupted run drew

def batch_indices(n, step, size, seed):
    """Dataset indices of optimizer step `step`: the next `size` entries of a stream of per-epoch shuffles."""
    perms, out = {}, []
    for pos in range(step * size, (step + 1) * size):
        epoch = pos // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=generator_for("data", seed, epoch))
        out.append(int(perms[epoch][pos % n]))
    return out


def draw_layers(image_layer, size, seed, step):
    """One image layer per example: image_layer itself, or uniform draws from it when it is a list."""
    if not isinstance(image_layer, (list, tuple)):
        return [image_layer] * size
    g = generator_for("layer", seed, step)
    return [image_layer[int(i)] for i in torch.randint(len(image_layer), (size,), generator=g)]


# -----------------------------------------------------------------------------
# default config values: SFT of the smol base model; config/*.py and --key=value override them

init_from = "data/smol/smol-llava-base"  # llava checkpoint folder (or a hub id such as llava-hf/llava-1.5-7b-hf)
data = "data/smol/sft_train.jsonl"  # JSONL of {"image" (null: text only), "prompt", "response"}; several: a,b
val_data = ""  # optional held-out JSONL of the same form: its loss is printed at every eval
image_layer = None  # CLIP layer fed to the projector: None (the checkpoint's default), an int, or a list to draw from
# LoRA on the language model; the vision tower stays frozen, the projector too unless train_projector
train_projector = False  # also train the projector, as LLaVA's feature-alignment stage does
# with train_projector: bound the projected image tokens' scale. A token whose RMS passes projector_rms_ratio times the
# RMS of the text embeddings adds projector_rms_weight * log(rms / bound)^2 to the loss (0: no bound)
projector_rms_ratio = 0.0
projector_rms_weight = 1.0
lora_r = 16
lora_alpha = 32
lora_dropout = 0.0
lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
# optimization: AdamW, warmup then cosine decay
batch_size = 4  # examples per micro-batch per process
gradient_accumulation_steps = 1
learning_rate = 2e-4
min_lr = 2e-5
max_iters = 200
warmup_iters = 10
lr_decay_iters = 0  # 0: max_iters (fix it to --resume a run into a longer one on the same schedule)
weight_decay = 0.0
grad_clip = 1.0  # 0: no clipping
# I/O
out_dir = "out/sft"
eval_interval = 100  # checkpoint (and val loss) every this many iterations, and at the end
log_interval = 10
resume = False  # continue from out_dir/ckpt.pt
merge_at_end = False  # fold the adapters into the weights and write a full llava checkpoint folder
merged_dir = ""  # where merge_at_end writes it; "": out_dir/merged
# system
seed = 1337
device = DEVICE                             # "cuda" when there is a GPU
dtype = DTYPE                               # "bfloat16" where supported, else "float32"
compile = False  # torch.compile the training forward, lengths padded to buckets (see model.py: torch.compile)
fsdp = False  # shard the model over the ranks with FSDP2 (docs/fsdp.md); else every rank holds all of it
config_keys = [k for k, v in globals().items() if not k.startswith("_") and not k.isupper()
               and isinstance(v, (int, float, bool, str, list, type(None)))]
# what the configurator checks before any work is done
CONFIG_TYPES = {"image_layer": (type(None), int, list)}
POSITIVE = ("lora_r", "lora_alpha", "batch_size", "gradient_accumulation_steps", "learning_rate", "max_iters",
            "eval_interval", "log_interval")
CHOICES = {"dtype": ("float32", "bfloat16")}
# resuming with any of these changed would not continue the same run
RESUME_MUST_MATCH = ("init_from", "data", "image_layer", "train_projector", "projector_rms_ratio",
                     "projector_rms_weight", "lora_r", "lora_alpha", "lora_dropout",
                     "lora_targets", "batch_size", "gradient_accumulation_steps", "learning_rate", "min_lr",
                     "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "seed")


def main():
    config = {k: globals()[k] for k in config_keys}
    ddp, rank, local_rank, world_size, dev = compute_init(device)
    master = rank == 0
    ctx = autocast(dev, dtype)  # frozen weights in dtype, LoRA weights in float32, matmuls in dtype on CUDA
    if projector_rms_ratio and (compile or not train_projector):
        raise InputError(f"projector_rms_ratio={projector_rms_ratio} bounds a projector that trains, in the eager "
                         "forward; expected train_projector=True and compile=False")
    if compile and isinstance(image_layer, (list, tuple)):
        raise InputError(f"compile=True with image_layer={image_layer}: every batch's draw of layers would compile "
                         "anew; expected an int or None (or compile=False)")

    if master:
        check_writable_dir(out_dir)
    rows = read_sft_jsonl(data)
    val_rows = read_sft_jsonl(val_data) if val_data else []
    path = resolve_checkpoint(init_from)
    tok = load_tokenizer(path)
    if compile and image_tokens_vary(path):
        raise InputError(f"compile=True with the LLaVA-NeXT checkpoint {init_from}: each image's size sets its crops "
                         "and image tokens, so every batch would compile anew; expected compile=False")
    vlm = VLM.from_pretrained(path, device=dev, dtype=getattr(torch, dtype))
    cfg = vlm.config
    for layer in image_layer if isinstance(image_layer, (list, tuple)) else [image_layer]:
        vlm.image_layer_index(layer)  # an out-of-range layer fails here, not after the first step
    if compile and any(r["image"] is None for r in rows):
        raise InputError(f"compile=True with text-only rows in {data}: a batch's number of images would change its "
                         "shapes, so it would compile anew; expected compile=False")
    if fsdp and any(r["image"] is None for r in rows):
        raise InputError(f"fsdp=True with text-only rows in {data}: a rank whose batch has no image would skip the "
                         "image encoder's gather that the other ranks wait in; expected an image in every row")
    train = tokenize_examples(rows, tok, cfg, cfg.text.max_position_embeddings)
    val = tokenize_examples(val_rows, tok, cfg, cfg.text.max_position_embeddings)
    torch.manual_seed(seed)  # the same LoRA initialisation in every process
    add_lora(vlm, lora_targets, lora_r, lora_alpha, lora_dropout)
    if train_projector:
        vlm.multi_modal_projector.requires_grad_(True)
    text_rms = vlm.language_model.embed_tokens.weight.detach().float().pow(2).mean(-1).sqrt().mean()
    shard_model(vlm, fsdp, world_size, dev, compile=compile, merge_at_end=merge_at_end)
    params = [p for p in vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=weight_decay)

    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    iter_num = 0
    if resume:
        ckpt = load_resume_checkpoint(ckpt_path, config, RESUME_MUST_MATCH, dev)
        load_trained_state(vlm, optimizer, ckpt["adapter"], ckpt["optimizer"])
        iter_num = ckpt["iter_num"]
        if master:
            print(f"resuming from {ckpt_path} at iteration {iter_num}")
    if master:
        os.makedirs(out_dir, exist_ok=True)
        n_trained = sum(p.numel() for p in params)
        print(f"{len(train)} examples, {n_trained / 1e6:.2f}M trained parameters "
              f"(LoRA{' and the projector' if train_projector else ''}), "
              f"{batch_size * gradient_accumulation_steps * world_size} examples per step")

    if compile:
        strict_compile()
    model = torch.compile(vlm, fullgraph=True, dynamic=False) if compile else vlm
    # a model with an unpadded forward skips collate's right padding (FastVLM.unpadded_logits: the same loss, no work
    # for the padding); others (mllama's decoder) and a sliding window (Mistral) take the padded forward
    skip_padding = {"unpadded": True} if hasattr(vlm, "unpadded_logits") and cfg.text.sliding_window is None else {}

    projected = []  # the projector's outputs of the forward pass at hand, kept by a hook for the scale bound
    if projector_rms_ratio:
        vlm.multi_modal_projector.register_forward_hook(lambda module, args, out: projected.append(out))

    def scale_penalty():
        """The bound on the projected tokens' scale: the square of how far, in log, each token's RMS passes
        projector_rms_ratio x the text embeddings' RMS, averaged over the tokens (0 inside the bound)."""
        feats = torch.cat([p.reshape(-1, p.shape[-1]) for p in projected])
        projected.clear()
        over = torch.log(feats.float().pow(2).mean(-1).sqrt() / (projector_rms_ratio * text_rms)).clamp(min=0)
        return projector_rms_weight * over.pow(2).mean()

    def forward_loss(net, examples, layers, n_target):
        input_ids, labels, mask = collate(examples, cfg.pad_token_id, LENGTH_BUCKET if compile else 1)
        # text-only rows have no image tokens: the images, and their layers, are those of the other rows, in order
        seen = [i for i, e in enumerate(examples) if e["image"]]
        layers = [layers[i] for i in seen]
        images = encode_images(vlm, [load_image(examples[i]["image"]) for i in seen], input_ids[seen]) if seen else {}
        images = {k: v.to(dev) for k, v in images.items()}  # pixel_values and the family's own inputs
        with ctx:
            if compile:
                loss = bucketed_sft_loss(net, input_ids.to(dev), images, layers, mask.to(dev), labels, n_target)
                return loss, int(mask.sum())
            labels = labels.to(dev)
            logits = net(input_ids.to(dev), image_layer=layers, attention_mask=mask.to(dev),
                         logits_at=target_positions(labels), **images, **skip_padding)
            loss = sft_loss(logits, labels, n_target)
            if projector_rms_ratio and images:  # each micro-batch's share of the step's mean penalty
                loss = loss + scale_penalty() * len(seen) / (batch_size * gradient_accumulation_steps)
            return loss, int(mask.sum())

    @torch.no_grad()
    def val_loss():
        vlm.eval()
        n_target = count_targets(val)
        total = 0.0
        for i in range(0, len(val), batch_size):
            chunk = val[i:i + batch_size]
            layers = draw_layers(image_layer, len(chunk), seed, ("val", i))  # the same draws at every eval
            total += forward_loss(vlm, chunk, layers, n_target)[0].item()
        vlm.train()
        return total

    def save_checkpoint(it):
        weights, optimizer_state = trained_state(vlm, optimizer)  # every rank: FSDP2 gathers them to rank 0
        if master:
            with whole_trained_weights(vlm, weights):  # what the later stages load (--adapter=...)
                save_lora(vlm, os.path.join(out_dir, "adapter.safetensors"))
            ckpt = {"adapter": weights, "optimizer": optimizer_state, "iter_num": it, "config": config}
            atomic_torch_save(ckpt, ckpt_path)  # a crash mid-write leaves the previous checkpoint intact

    step_size = batch_size * gradient_accumulation_steps  # examples per process per step
    decay_iters = lr_decay_iters or max_iters
    vlm.train()
    t0, tokens = time.time(), 0
    pbar = tqdm(range(iter_num, max_iters), initial=iter_num, total=max_iters, desc="sft", disable=not master)
    for it in pbar:
        lr = get_lr(it, learning_rate, warmup_iters, decay_iters, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(seed_for("dropout", seed, rank, it))  # LoRA dropout masks, the same on resume
        # this process's share of the step's global batch, and the image layer of each example
        mine = slice(rank * step_size, (rank + 1) * step_size)
        step_idx = batch_indices(len(train), it, step_size * world_size, seed)
        idx = step_idx[mine]
        layers = draw_layers(image_layer, step_size * world_size, seed, it)[mine]
        # the loss is a mean over every target token of the step on all ranks; the ranks' gradients are averaged,
        # so each rank's summed loss is scaled by world_size / (the step's targets on all ranks)
        n_target = count_targets([train[i] for i in step_idx]) / world_size
        loss_sum = 0.0
        for micro in range(gradient_accumulation_steps):
            s = slice(micro * batch_size, (micro + 1) * batch_size)
            loss, n_tok = forward_loss(model, [train[i] for i in idx[s]], layers[s], n_target)
            loss.backward()
            loss_sum += loss.item()
            tokens += n_tok * world_size
        # the gradients are the same on every rank after this all-reduce, and so is the reduced loss: a divergence
        # stops every rank here, before the step and before any checkpoint could be overwritten
        average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
        if ddp:
            loss_t = torch.tensor(loss_sum, device=dev)
            torch.distributed.all_reduce(loss_t)
            loss_sum = loss_t.item() / world_size
        if not (math.isfinite(loss_sum) and torch.isfinite(grad_norm)):
            pbar.close()
            raise InputError(f"iteration {it + 1}: loss {loss_sum}, gradient norm {grad_norm.item()}; stopped before "
                             f"the optimizer step, {ckpt_path} holds the last good state")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if master and ((it + 1) % log_interval == 0 or it + 1 == max_iters):
            tok_s = tokens / (time.time() - t0)
            pbar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tok_s:.0f}")
            tqdm.write(f"iter {it + 1}: loss {loss_sum:.4f}, lr {lr:.2e}, {tok_s:.0f} tokens/s")
            t0, tokens = time.time(), 0
        if (master or fsdp) and ((it + 1) % eval_interval == 0 or it + 1 == max_iters):  # FSDP2: every rank joins
            val_text = f"iter {it + 1}: val loss {val_loss():.4f}\n" if val else ""
            save_checkpoint(it + 1)
            if master:
                tqdm.write(f"{val_text}iter {it + 1}: saved {ckpt_path} and adapter.safetensors")
    pbar.close()

    if master and merge_at_end:
        target = merged_dir or os.path.join(out_dir, "merged")
        merge_lora(vlm)
        vlm.save_pretrained(target)
        copy_tokenizer_files(path, target)
        print(f"merged the adapters into {target} (a llava checkpoint folder with {init_from}'s tokenizer)")


if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    run_stage(main)
