"""
Draws the smol world's images: 24 small, benign, procedurally generated PNGs (gradients, stripes, shapes).
They stand in for the photos that the paper pairs with its prompts; the same seed always draws the same files.
Run: python data/smol/make_images.py
"""
import os
import random

from PIL import Image, ImageDraw

size = 128
num_images = 24
out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images")


def random_color(rng):
    return tuple(rng.randrange(256) for _ in range(3))


def gradient(rng):
    a, b = random_color(rng), random_color(rng)
    img = Image.new("RGB", (size, size))
    horizontal = rng.random() < 0.5
    for i in range(size):
        t = i / (size - 1)
        c = tuple(round(x + (y - x) * t) for x, y in zip(a, b))
        box = (i, 0, i, size) if horizontal else (0, i, size, i)
        ImageDraw.Draw(img).rectangle(box, fill=c)
    return img


def stripes(rng):
    img = Image.new("RGB", (size, size), random_color(rng))
    draw, width, color = ImageDraw.Draw(img), rng.randrange(6, 20), random_color(rng)
    for x in range(-size, 2 * size, 2 * width):  # diagonal bands
        draw.polygon([(x, 0), (x + width, 0), (x + width - size, size), (x - size, size)], fill=color)
    return img


def checkerboard(rng):
    img = Image.new("RGB", (size, size), random_color(rng))
    draw, cell, color = ImageDraw.Draw(img), rng.choice([8, 16, 32]), random_color(rng)
    for i in range(0, size, cell):
        for j in range(0, size, cell):
            if (i // cell + j // cell) % 2 == 0:
                draw.rectangle((i, j, i + cell - 1, j + cell - 1), fill=color)
    return img


def rings(rng):
    img = Image.new("RGB", (size, size), random_color(rng))
    draw, colors = ImageDraw.Draw(img), [random_color(rng) for _ in range(3)]
    cx, cy = rng.randrange(32, 96), rng.randrange(32, 96)
    for k, r in enumerate(range(90, 0, -10)):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colors[k % 3])
    return img


def shapes(rng):
    img = Image.new("RGB", (size, size), random_color(rng))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randrange(3, 8)):
        x, y, w, h = rng.randrange(size), rng.randrange(size), rng.randrange(12, 60), rng.randrange(12, 60)
        kind = rng.choice(["rectangle", "ellipse", "triangle"])
        if kind == "rectangle":
            draw.rectangle((x, y, x + w, y + h), fill=random_color(rng))
        elif kind == "ellipse":
            draw.ellipse((x, y, x + w, y + h), fill=random_color(rng))
        else:
            draw.polygon([(x, y + h), (x + w, y + h), (x + w // 2, y)], fill=random_color(rng))
    return img


painters = [gradient, stripes, checkerboard, rings, shapes, shapes]

if __name__ == "__main__":
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(1337)
    for i in range(num_images):
        painters[i % len(painters)](rng).save(os.path.join(out_dir, f"{i:02d}.png"), optimize=True)
    total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"wrote {num_images} images to {out_dir} ({total / 1024:.1f} KB)")
