"""
smol-VQA: seeded procedural images with short-answer questions, the smol world's stand-in for VQA-v2.

Six question types, each with a fixed set of one-word answers:

    color     "What color is the shape?"                  red green blue yellow purple orange   (chance 1/6)
    shape     "What shape is it?"                         circle square triangle                (chance 1/3)
    size      "Is the shape small or large?"              small large                           (chance 1/2)
    position  "Is the shape on the left or the right?"    left right                            (chance 1/2)
    count     "How many shapes are there?"                1 2 3 4                               (chance 1/4)
    letter    "What letter is shown?"                     A B C D E F G H K X                   (chance 1/10)

An example is drawn from (seed, split, index) alone, so the train and test splits never share an image, and
any example can be drawn again without the others. Answers are scored with evaluate.py's VQA-v2 accuracy (one
human answer repeated ten times, so a prediction is right or wrong).

    python data/smol/vqa.py          # writes vqa_{train,mix,val,test}.jsonl and their images under data/smol/vqa/
"""
import hashlib
import os
import random

from PIL import Image, ImageDraw, ImageFont

SIZE = 96
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30),
          "purple": (140, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
LETTERS = tuple("ABCDEFGHKX")
QUESTIONS = {
    "color": ("What color is the shape?", tuple(COLORS)),
    "shape": ("What shape is it?", SHAPES),
    "size": ("Is the shape small or large?", ("small", "large")),
    "position": ("Is the shape on the left or the right?", ("left", "right")),
    "count": ("How many shapes are there?", ("1", "2", "3", "4")),
    "letter": ("What letter is shown?", LETTERS),
}
# the instruction LLaVA-1.5 appends to short-answer questions
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def example_rng(seed, split, index):
    """The random stream of one example, determined by (seed, split, index) alone."""
    return random.Random(int.from_bytes(hashlib.sha256(repr((seed, split, index)).encode()).digest()[:8], "little"))


def draw_shape(draw, shape, box, color):
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)


def background(rng):
    """A pale, slightly noisy background, so that no answer can be read off a single pixel value."""
    base = tuple(rng.randrange(200, 256) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), base)
    draw = ImageDraw.Draw(img)
    for _ in range(20):
        x, y = rng.randrange(SIZE), rng.randrange(SIZE)
        shade = tuple(max(0, c - rng.randrange(10, 30)) for c in base)
        draw.point((x, y), fill=shade)
    return img


def make_example(rng, qtype):
    """(image, question, answer) of question type qtype."""
    img = background(rng)
    draw = ImageDraw.Draw(img)
    color = rng.choice(tuple(COLORS))
    if qtype == "letter":
        letter = rng.choice(LETTERS)
        font = ImageFont.load_default(size=rng.randrange(44, 60))
        cx, cy = SIZE / 2 + rng.randrange(-8, 9), SIZE / 2 + rng.randrange(-8, 9)
        draw.text((cx, cy), letter, fill=COLORS[color], font=font, anchor="mm")
        answer = letter
    elif qtype == "count":
        n = rng.randrange(1, 5)
        cells = rng.sample(range(9), n)  # at most one shape per cell of a 3 x 3 grid: shapes never overlap
        shape = rng.choice(SHAPES)
        for cell in cells:
            side = rng.randrange(14, 22)
            x0 = (cell % 3) * 32 + rng.randrange(0, 32 - side)
            y0 = (cell // 3) * 32 + rng.randrange(0, 32 - side)
            draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLORS[color])
        answer = str(n)
    else:
        shape = rng.choice(SHAPES)
        large = rng.random() < 0.5
        side = rng.randrange(34, 44) if large else rng.randrange(12, 18)
        left = rng.random() < 0.5
        # the shape lies wholly in its half, so "left or right" always has an answer
        x0 = rng.randrange(2, SIZE // 2 - side - 1) if left else rng.randrange(SIZE // 2 + 1, SIZE - side - 2)
        y0 = rng.randrange(2, SIZE - side - 2)
        draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLORS[color])
        answer = {"color": color, "shape": shape, "size": "large" if large else "small",
                  "position": "left" if left else "right"}[qtype]
    return img, QUESTIONS[qtype][0], answer


def draw_split(seed, split, n):
    """n examples of a split, question types in turn: [(image, qtype, question, answer)]."""
    types = list(QUESTIONS)
    out = []
    for i in range(n):
        qtype = types[i % len(types)]
        img, question, answer = make_example(example_rng(seed, split, i), qtype)
        out.append((img, qtype, question, answer))
    return out


def write_split(out_dir, seed, split, n):
    """Write n examples as PNGs and a JSONL of {"id", "image", "prompt", "response", "answers", "type"} (image paths
    relative to the JSONL): sft.py trains on it, evaluate.py and lppo.py score it; return the JSONL path."""
    import json
    image_dir = os.path.join(out_dir, f"{split}_images")
    os.makedirs(image_dir, exist_ok=True)
    rows = []
    for i, (img, qtype, question, answer) in enumerate(draw_split(seed, split, n)):
        name = f"{split}_images/{i:05d}.png"
        img.save(os.path.join(out_dir, name))
        # VQA-v2's ten human answers, all agreeing, so a prediction scores 1 or 0; stored normalized (lower case),
        # as VQA-v2 stores them, since the metric normalizes only the prediction
        rows.append({"id": f"{split}:{i}", "image": name, "prompt": question + SHORT_ANSWER, "response": answer,
                     "answers": [answer.lower()] * 10, "type": qtype})
    path = os.path.join(out_dir, f"vqa_{split}.jsonl")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)
    return path


# train: the visual-instruction stage; mix: mixed into the safety stage, so that it keeps the model's sight; val:
# what lppo.py watches during training and any choice is made on; test: held out, scored once (evaluate.py)
SPLITS = {"train": 1800, "mix": 360, "val": 100, "test": 300}

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    for split, n in SPLITS.items():
        print(f"smol-VQA: wrote {write_split(os.path.join(here, 'vqa'), 0, split, n)} ({n} examples)")
