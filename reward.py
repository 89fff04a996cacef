"""
Reward model r(x, y): a GPT-2 with a scalar head, trained on HH-RLHF preference pairs with the Bradley-Terry loss
(Eq. 4). It reads text only: the prompt and the response, never the image.

The top of this file holds the pure parts: the loss, HH-RLHF transcript handling, and a GPT-2 tokenizer built with
tiktoken from a checkpoint's own vocab.json and merges.txt.
"""

import json
import os

import tiktoken
import torch.nn.functional as F

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


def read_preference_jsonl(path):
    """Read HH-RLHF style {"chosen": str, "rejected": str} lines into a list of (chosen, rejected) pairs."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'chosen' and 'rejected', "
                                 f"got {type(record).__name__}")
            for key in ("chosen", "rejected"):
                if not isinstance(record.get(key), str):
                    raise ValueError(f"{path}:{lineno}: key {key!r} should be a string, got {record.get(key)!r:.60}")
            # an identical pair carries no preference, and would pull the loss towards log 2 for nothing
            if record["chosen"] == record["rejected"]:
                raise ValueError(f"{path}:{lineno}: 'chosen' and 'rejected' are identical")
            pairs.append((record["chosen"], record["rejected"]))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs, expected one JSON object per line")
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
