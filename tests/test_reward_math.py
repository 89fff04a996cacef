import json
import math

import pytest
import torch

import tiny
from reward import bradley_terry_loss, format_hh, gpt2_tiktoken_encoding, read_preference_jsonl, split_hh

# -----------------------------------------------------------------------------
# Bradley-Terry loss


def test_bradley_terry_loss_and_accuracy_on_hand_computed_pairs():
    # margins 0, ln 3, −ln 3: −log σ(0) = ln 2, −log σ(ln 3) = ln(4/3), −log σ(−ln 3) = ln 4
    chosen = torch.tensor([1.0, math.log(3), 0.0])
    rejected = torch.tensor([1.0, 0.0, math.log(3)])
    loss, accuracy = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4 / 3) + math.log(4)) / 3)
    assert accuracy.item() == pytest.approx(1 / 3)  # the tie counts as wrong


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    # ∂L/∂r_c = −σ(−m)/N: with m = 0 and N = 2 that is −0.25
    chosen = torch.zeros(2, requires_grad=True)
    rejected = torch.zeros(2, requires_grad=True)
    bradley_terry_loss(chosen, rejected)[0].backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.25, -0.25]))
    torch.testing.assert_close(rejected.grad, torch.tensor([0.25, 0.25]))

# -----------------------------------------------------------------------------
# HH-RLHF transcripts


def test_hh_split_takes_the_last_assistant_turn_and_format_inverts_it():
    transcript = ("\n\nHuman: How do I bake bread?\n\nAssistant: Do you have yeast?"
                  "\n\nHuman: Yes.\n\nAssistant: Then mix flour, water and yeast.")
    prompt, response = split_hh(transcript)
    assert prompt == "How do I bake bread?\n\nAssistant: Do you have yeast?\n\nHuman: Yes."
    assert response == "Then mix flour, water and yeast."
    assert format_hh(prompt, response) == transcript
    assert split_hh(format_hh("Tell me a joke.", "")) == ("Tell me a joke.", "")


def test_hh_split_refuses_text_that_is_not_a_transcript():
    with pytest.raises(ValueError, match="Assistant"):
        split_hh("\n\nHuman: no answer here")
    with pytest.raises(ValueError, match="Human"):
        split_hh("Assistant: hello")


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_preference_reader_returns_pairs_and_skips_blank_lines(tmp_path):
    good = {"chosen": format_hh("hi", "hello"), "rejected": format_hh("hi", "go away")}
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(good), "", json.dumps(good)])
    assert read_preference_jsonl(path) == [(good["chosen"], good["rejected"])] * 2


@pytest.mark.parametrize("bad_line,message", [
    ('{"chosen": "a", "rejected": ', "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"chosen": "a"}', "'rejected'"),
    ('{"chosen": 3, "rejected": "b"}', "'chosen'"),
    ('{"chosen": "same", "rejected": "same"}', "identical"),
])
def test_preference_reader_errors_name_the_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"chosen": "a", "rejected": "b"})
    path = write_lines(tmp_path / "pairs.jsonl", [good, good, bad_line])
    with pytest.raises(ValueError, match=message) as info:
        read_preference_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ") and "\n" not in str(info.value)


def test_preference_reader_refuses_an_empty_file(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no preference pairs") as info:
        read_preference_jsonl(path)
    assert str(path) in str(info.value)

# -----------------------------------------------------------------------------
# GPT-2 tokenizer with tiktoken

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog didn't care; it's lazy.",
    "They're sure we'll win, I'd say, and you've seen I'm right.",
    "Numbers: 12345, 3.14159, 2024-11-06, and 1,000,000 people.",
    "Human: How do I bake bread?\n\nAssistant: Mix flour, water, yeast, and salt.",
    "Unicode: naïve café, Straße, 日本語のテキスト, Ελληνικά, emoji 🙂🚀.",
    "    indented code\n\tfor i in range(10):\n\t\tprint(i)   # trailing   spaces   ",
]

SAMPLES = [
    "Hello world",
    "It's what they're saying: we'll see, I'd've thought, you've I'm he'd.",
    "naïve café 日本語 🙂🚀 Ελληνικά Straße",
    "3.14159 and 1,000,000 and 2024-11-06 and 007",
    "  multiple   spaces\n\n\ttabs\t\t and trailing   ",
    "\n\nHuman: What's up?\n\nAssistant: Not much.<|endoftext|>",
    "<|endoftext|>start<|endoftext|> end",
    "unseen words: zyxwvut qqqq ÆØÅ ☃",
    "",
]


@pytest.fixture(scope="module")
def tiny_gpt2_folder(tmp_path_factory):
    """A byte-level BPE trained on CORPUS, saved as GPT-2's vocab.json + merges.txt."""
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tiny.make_gpt2_tokenizer(folder, CORPUS, vocab_size=500)
    return folder


def test_tiktoken_encoding_matches_transformers_gpt2_tokenizer(tiny_gpt2_folder):
    from transformers import GPT2TokenizerFast
    hf = GPT2TokenizerFast.from_pretrained(str(tiny_gpt2_folder))
    enc = gpt2_tiktoken_encoding(tiny_gpt2_folder)
    # the test is only meaningful if the byte tokens are not simply ids 0..255 in byte order, as in real GPT-2
    vocab = json.loads((tiny_gpt2_folder / "vocab.json").read_text(encoding="utf-8"))
    assert [enc.encode_single_token(bytes([b])) for b in range(256)] != list(range(256))
    assert enc.eot_token == vocab["<|endoftext|>"] == hf.convert_tokens_to_ids("<|endoftext|>")
    for text in SAMPLES + CORPUS:
        ids = enc.encode(text, allowed_special="all")
        assert ids == hf(text)["input_ids"], text
        assert enc.decode(ids) == text


def test_tiktoken_encoding_needs_vocab_and_merges(tiny_gpt2_folder, tmp_path):
    (tmp_path / "vocab.json").write_text((tiny_gpt2_folder / "vocab.json").read_text(encoding="utf-8"))
    with pytest.raises(FileNotFoundError, match="merges.txt") as info:
        gpt2_tiktoken_encoding(tmp_path)
    assert "\n" not in str(info.value)


def test_tiktoken_encoding_refuses_merges_out_of_id_order(tiny_gpt2_folder, tmp_path):
    lines = (tiny_gpt2_folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    first = 1 if lines[0].startswith("#version") else 0
    lines[first], lines[first + 1] = lines[first + 1], lines[first]
    (tmp_path / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    (tmp_path / "vocab.json").write_text((tiny_gpt2_folder / "vocab.json").read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match=f"merges.txt:{first + 2}: "):
        gpt2_tiktoken_encoding(tmp_path)
