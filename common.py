"""
The plumbing that the stage scripts share (nanochat's common.py): DDP setup and teardown, gradient averaging and FSDP2
sharding, the precision context, named seeds, the learning-rate schedule, readers of JSON and JSONL input files, atomic
writes, and result tables and plots. Only what two or more stages use lives here; a stage's own helpers live in that
stage.
"""

import csv
import functools
import gzip
import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager, nullcontext

import torch
from PIL import Image, ImageDraw, ImageFont


class InputError(ValueError):
    """A problem with what the user gave us (a file, a key, a value); its message is one line."""



# -----------------------------------------------------------------------------
# Compute: one script runs under `python` and `torchrun` (nanoGPT's DDP idiom), precision is one context

# the stages' defaults: the GPU when there is one, bf16 where it is supported
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def compute_init(device):
    """(ddp, rank, local_rank, world_size, device): the same script runs under `python` and under `torchrun`, where
    each rank gets its own GPU. TF32 matmuls are allowed on CUDA."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        return False, 0, 0, 1, device
    import torch.distributed as dist
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    rank, local_rank, world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    return True, rank, local_rank, world_size, device


def compute_cleanup():
    """Destroy the process group, if there is one, while the interpreter is still whole. main()'s frame is gone by
    now; collecting the reference cycles of its modules (FSDP2's state holds the group) lets the group's gloo threads
    be joined here. Left to the interpreter's exit, a thread still alive aborts the process (SIGABRT, "terminate
    called without an active exception") after the run has finished, and torchrun reports the rank as failed."""
    import gc
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def run_stage(main):
    """Run a stage's main(): a bad input, or a run stopped to keep its last good state, ends in one line, `error: ...`,
    and exit status 1. Under torchrun the process group is torn down here, on every way out of main()."""
    import sys
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
    finally:
        compute_cleanup()


# -----------------------------------------------------------------------------
# Several ranks, one idiom in every stage: each rank runs forward and backward on its share of the batch, then
# average_gradients leaves the mean gradient on every rank (what DDP computes, in one all-reduce after the last
# micro-batch), so every rank takes the same step. With fsdp = True, FSDP2 (torch's fully_shard) shards the weights
# over the ranks instead, and its backward pass averages the gradients into the shards itself (docs/fsdp.md).

FSDP_REFUSES = {  # settings that need what sharding takes away
    "compile": "the compiled decode step and training forward are built for whole weights, not sharded ones",
    "save_merged": "merging the adapters into the weights needs every weight whole on one rank",
    "merge_at_end": "merging the adapters into the weights needs every weight whole on one rank",
}


def average_gradients(params):
    """Replace each rank's gradients of `params` by their mean over the ranks. Nothing to do in one process, nor for a
    parameter that FSDP2 shards (a DTensor): its backward pass averaged the gradient already."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in params if not isinstance(p, DTensor)]
    for p in params:
        if p.grad is None:  # no gradient on this rank (a module its batch did not use): it still joins the mean
            p.grad = torch.zeros_like(p)
    for dtype in dict.fromkeys(p.grad.dtype for p in params):  # in the same order on every rank
        grads = [p.grad for p in params if p.grad.dtype == dtype]
        flat = torch.cat([g.flatten() for g in grads])  # one all-reduce, not one per tensor
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(mean.view_as(g))


def shard_model(vlm, fsdp, world_size, device, **settings):
    """With fsdp, shard `vlm` in place with FSDP2 over the ranks: one unit per decoder layer, one for the image encoder
    (ICET's early exit runs a different number of its blocks on each rank, so it gathers as a whole), and the root
    for the rest (embeddings, projector, lm_head, value head). Call it after add_lora and before making the optimizer,
    which must see the sharded parameters. `settings` are the stage's, checked against FSDP_REFUSES."""
    if not fsdp:
        return vlm
    if world_size < 2:
        raise InputError(f"fsdp=True shards the model over the ranks, but this run has {world_size}; expected torchrun "
                         "with --nproc_per_node of 2 or more (or fsdp=False)")
    for key, value in settings.items():
        if value:
            raise InputError(f"fsdp=True with {key}={value!r}: {FSDP_REFUSES[key]}; expected {key}=False")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    mesh = init_device_mesh(device.split(":")[0], (world_size,))
    # mllama's cross-attention computes the image's keys and values (kv) once, outside its layer's forward
    cross = [m for m in vlm.modules() if callable(getattr(type(m), "kv", None))]
    vision = vlm.vision_model if hasattr(vlm, "vision_model") else vlm.vision_tower
    for unit in [*cross, vision, *vlm.language_model.layers, vlm]:  # inner units first, the root last
        fully_shard(unit, mesh=mesh)
    for m in cross:
        register_fsdp_forward_method(m, "kv")
    # the root's weights are gathered by these entry points too, and kept until the backward pass (FSDP2's root
    # heuristic), so response_logits and the value head may read them after hidden_states returns
    for name in ("hidden_states", "generate"):
        register_fsdp_forward_method(vlm, name)
    # the ranks decode in lockstep, each step gathering every layer with the others: no rank may stop before the
    # rest, so generate never asks whether its rows have ended (it still cuts the tokens drawn after they all did)
    vlm.generate = functools.partial(vlm.generate, check_every=math.inf)
    return vlm


def trained_state(model, optimizer):
    """(weights, optimizer state) of the parameters that train, as full CPU tensors keyed by parameter name: gathered
    from the shards to rank 0 under FSDP2 (other ranks get empty dicts), so every rank must call it. A checkpoint in
    this form resumes under DDP or FSDP2 and on any number of ranks."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from torch.utils._pytree import tree_map
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)
    # copies: in one process on the CPU these would be the live tensors, which the next step changes
    return tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, state)


def load_trained_state(model, optimizer, weights, optimizer_state):
    """Load trained_state's output (read on every rank) into the model and optimizer, sharding it under FSDP2."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, strict=False)  # only the trained parameters are in `weights`
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


@contextmanager
def whole_trained_weights(model, weights):
    """While inside, the trained parameters of an FSDP2 model are the whole tensors `weights` (trained_state's, on
    rank 0) instead of this rank's shards, so that adapter files are written from them; the shards come back after."""
    from torch.distributed.tensor import DTensor
    swapped = []
    for name, p in list(model.named_parameters()):
        if isinstance(p, DTensor) and name in weights:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            swapped.append((module, attr, p))
            module._parameters[attr] = torch.nn.Parameter(weights[name].to(p.device), requires_grad=False)
    try:
        yield model
    finally:
        for module, attr, p in swapped:
            module._parameters[attr] = p


def autocast(device, dtype):
    """The precision context: plain float32 on the CPU; on CUDA, matmuls in `dtype` while the weights LoRA trains
    stay float32."""
    if not device.startswith("cuda"):
        return nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.amp.autocast(device_type="cuda", dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])


def strict_compile(recompile_limit=32):
    """Make a recompile storm fail loudly instead of falling back to eager without a word."""
    torch._dynamo.config.recompile_limit = recompile_limit
    torch._dynamo.config.fail_on_recompile_limit_hit = True



# -----------------------------------------------------------------------------
# Named randomness and the learning-rate schedule

def seed_for(*key):
    """A seed determined by `key` alone, e.g. ("rollout", seed, rank, iteration): every random draw of a run is
    named, so a resumed run draws exactly what the uninterrupted run drew."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1


def generator_for(*key, device="cpu"):
    """A torch.Generator seeded with seed_for(*key)."""
    return torch.Generator(device=device).manual_seed(seed_for(*key))


def get_lr(it, lr, warmup_iters, decay_iters, min_lr):
    """Linear warmup, then cosine decay from lr to min_lr at decay_iters (nanoGPT's schedule)."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)



# -----------------------------------------------------------------------------
# Reading input files: one-line errors that name the file and line

def read_json(path):
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path):
    """[(line number, object)] of a JSONL file; a missing file or a line that is not a JSON object is an InputError
    naming the file and line. Blank lines are skipped."""
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    rows = []
    with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{n}: expected a JSON object, got a JSON {type(obj).__name__}")
            rows.append((n, obj))
    return rows


def read_prompt_jsonl(path, image_root=""):
    """The project's prompt sets: one {"prompt": str, "image": path or null, "id": optional} per line, image paths
    relative to image_root (default: the file's folder). A row without an id is named file-stem:line. A VQA set
    also gives each row its human "answers" (a list of strings), and may name its question "type"."""
    root = image_root or os.path.dirname(str(path))
    rows = []
    for n, obj in read_jsonl(path):
        if not (isinstance(obj.get("prompt"), str) and isinstance(obj.get("image"), (str, type(None)))):
            raise InputError(f"{path}:{n}: expected a string 'prompt' and a string or null 'image', got "
                             f"{json.dumps(obj)[:80]}")
        answers = obj.get("answers")
        if answers is not None and not (isinstance(answers, list) and answers and all(isinstance(a, str)
                                                                                     for a in answers)):
            raise InputError(f"{path}:{n}: 'answers' is {answers!r:.60}, expected a list of strings")
        stem = os.path.splitext(os.path.basename(str(path)))[0]
        row = {"id": str(obj.get("id", f"{stem}:{n}")), "prompt": obj["prompt"],
               "image": os.path.normpath(os.path.join(root, obj["image"])) if obj.get("image") else None}
        rows.append({**row, "answers": answers, "type": obj.get("type")} if answers else row)
    return rows


def load_resume_checkpoint(path, config, must_match, device):
    """The checkpoint at `path` for --resume, read as data only (weights_only: unpickling arbitrary objects would run
    code from the file), refused when a setting in `must_match` differs from `config`, which would not continue the
    same run."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no checkpoint to resume from (run once without --resume)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: not a checkpoint of this project ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]})") from None
    for k in must_match:
        if ckpt["config"].get(k) != config[k]:
            raise InputError(f"{path}: {k} was {ckpt['config'].get(k)!r}, now {config[k]!r}; --resume needs the same "
                             "value (or a new out_dir)")
    return ckpt



# -----------------------------------------------------------------------------
# Atomic writes: a crash at any moment leaves the old file or folder or the new one, never half of one

def _write_error(path, e):
    """A failed write (disk full, read-only folder, no permission) as one line naming the file."""
    return InputError(f"{path}: could not be written ({e.strerror or type(e).__name__}); the previous version, if "
                      "any, is untouched")


def atomic_write(path, write):
    """Run write(tmp) on a temporary file beside `path`, then rename it to `path`: a crash or Ctrl-C at any moment
    leaves either the old file or the new one, never half of one, and no temporary file behind."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the mode a plain open() would
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):  # after a successful rename there is nothing left to remove
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def atomic_save_safetensors(tensors, path, metadata=None):
    from safetensors.torch import save_file
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_torch_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable_dir(path):
    """Create folder `path` if needed and prove it takes a file, so a bad out_dir fails at start-up, not at the
    first checkpoint an hour later."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"out_dir={path!r} is a file; expected a folder (or a path that does not exist yet)")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".tmp-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"out_dir={path!r} is not writable ({e.strerror or type(e).__name__}); expected a folder "
                         "this process can write") from None


@contextmanager
def atomic_folder(path):
    """Yield a temporary folder beside `path`; when the block ends, it replaces `path` as a whole. On an error the
    temporary folder is removed and `path` is untouched."""
    import shutil
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def replace_dir(tmp, path):
    """Move the finished folder `tmp` to `path`; an older `path` is moved aside first, then deleted.
    mkdtemp made `tmp` 0700; it gets the mode a plain mkdir would have given it."""
    import shutil
    os.chmod(tmp, 0o777 & ~_umask())
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)) or ".", prefix=".old-")
        os.replace(path, os.path.join(old, "x"))
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old)


def copy_tokenizer_files(src, dst):
    """Everything in checkpoint folder src but weights and config.json: tokenizer, chat template, processor config."""
    import shutil
    for name in sorted(os.listdir(src)):
        if os.path.isfile(os.path.join(src, name)) and not name.startswith(("model", "config.json", ".")):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))



# -----------------------------------------------------------------------------
# Result files: tables and plots

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # the image files a folder of images is read for


def markdown_table(header, rows):
    """A Markdown table; None prints as "-", a float with two decimals."""
    fmt = lambda v: "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]) + "\n"


def write_csv(path, header, rows):
    """A CSV file; None is an empty cell."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


PLOT_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def line_plot(panels, path, columns=None):
    """Panels in a grid (one row unless `columns`) in one PNG, drawn with PIL: each {"title", "series": {name:
    [(x, y), ...]}, "mark": x or None (a dashed vertical line, e.g. at the default layer)}."""
    W, H = 380, 280  # one panel
    columns = columns or len(panels)
    image = Image.new("RGB", (W * columns, H * math.ceil(len(panels) / columns)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)  # Pillow's own FreeType font; at its default size 10 spaces vanish
    for k, panel in enumerate(panels):
        x0, y0 = (k % columns) * W, (k // columns) * H
        left, top, right, bottom = x0 + 76, y0 + 44, x0 + W - 12, y0 + H - 36
        draw.text((x0 + W // 2, y0 + 12), panel["title"], fill="black", font=font, anchor="mm")
        points = [(x, y) for pts in panel["series"].values() for x, y in pts if y is not None]
        if not points:
            continue
        x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
        y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
        x_hi = max(x_hi, x_lo + 1)
        pad = (y_hi - y_lo) * 0.08 if y_hi - y_lo > 1e-9 else max(1.0, abs(y_hi) * 0.1)  # a flat line sits mid-panel
        y_lo, y_hi = y_lo - pad, y_hi + pad
        px = lambda x: left + (x - x_lo) / (x_hi - x_lo) * (right - left)
        py = lambda y: bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)
        draw.rectangle([left, top, right, bottom], outline="black")
        decimals = max(0, 1 - math.floor(math.log10((y_hi - y_lo) / 4)))  # enough to tell neighbouring ticks apart
        for j in range(5):
            y = y_lo + (y_hi - y_lo) * j / 4
            draw.line([left - 4, py(y), left, py(y)], fill="black")
            draw.text((left - 6, py(y)), f"{y:.{decimals}f}", fill="black", font=font, anchor="rm")
        step = max(1, math.ceil((x_hi - x_lo) / 8))
        for x in range(math.ceil(x_lo), math.floor(x_hi) + 1, step):
            draw.line([px(x), bottom, px(x), bottom + 4], fill="black")
            draw.text((px(x), bottom + 6), str(x), fill="black", font=font, anchor="mt")
        draw.text(((left + right) // 2, y0 + H - 10), "image-encoder layer", fill="black", font=font, anchor="mm")
        if panel.get("mark") is not None:
            for y in range(int(top), int(bottom), 8):
                draw.line([px(panel["mark"]), y, px(panel["mark"]), min(y + 4, bottom)], fill=(128, 128, 128))
        for i, (name, pts) in enumerate(panel["series"].items()):
            color = PLOT_COLORS[i % len(PLOT_COLORS)]
            xy = [(px(x), py(y)) for x, y in pts if y is not None]
            if len(xy) > 1:
                draw.line(xy, fill=color, width=2)
            for x, y in xy:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
            # the legend goes in a row above the panel, where it can hide no data
            x = left + 90 * i
            draw.line([x, y0 + 30, x + 16, y0 + 30], fill=color, width=2)
            draw.text((x + 20, y0 + 30), name, fill="black", font=font, anchor="lm")
    image.save(path)
