import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import extract
from extract import (fit_mahalanobis, frechet_distance, gaussian_fit, layer_statistics, linear_cka,
                     mahalanobis_distance, mean_pairwise_cosine, norm_ratio, paired_cosine)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gaussian(n=4000, d=6, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_features_are_at_distance_zero():
    x = gaussian()
    assert paired_cosine(x, x) == pytest.approx(1.0)
    assert norm_ratio(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert frechet_distance(*gaussian_fit(x), *gaussian_fit(x)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_a_shift_is_the_squared_shift():
    x = gaussian()
    shift = torch.tensor([3.0, 0, 4.0, 0, 0, 0], dtype=torch.float64)  # |shift|^2 = 25, the covariance unchanged
    assert frechet_distance(*gaussian_fit(x), *gaussian_fit(x + shift)) == pytest.approx(25.0)
    assert linear_cka(x, x + shift) == pytest.approx(1.0)  # centering removes a shift


def test_frechet_distance_closed_form_for_diagonal_covariances():
    # |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    a, b = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64)
    mu = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    assert frechet_distance(torch.zeros(3, dtype=torch.float64), torch.diag(a), mu, torch.diag(b)) == \
        pytest.approx(5.0 + 1.0 + 0.0 + 4.0)


def test_cka_is_invariant_to_rotation_and_scale_and_known_for_a_dropped_direction():
    x = gaussian()
    q, _ = torch.linalg.qr(gaussian(6, 6, seed=1))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)
    # two centered orthonormal columns against the first alone: |Y'X|^2 = 1, |X'X| = sqrt(2), |Y'Y| = 1
    cols = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64) / 2
    assert linear_cka(cols, cols[:, :1]) == pytest.approx(1 / math.sqrt(2))
    assert linear_cka(x, gaussian(seed=2)) < 0.05  # independent features


def test_cosines_and_norm_ratio_on_known_vectors():
    e = torch.eye(2, dtype=torch.float64)
    assert paired_cosine(e, torch.stack([e[0], -e[1]])) == pytest.approx(0.0)  # 1 and -1
    assert mean_pairwise_cosine(e, e[:1]) == pytest.approx(0.5)  # cos(e1, e1) = 1, cos(e2, e1) = 0
    assert norm_ratio(3 * e, e) == pytest.approx(3.0)


def test_mahalanobis_distance_counts_standard_deviations():
    a, b = 2.0, 0.5
    # symmetric points: mean 0, unbiased covariance diag(2a^2/3, 2b^2/3)
    x = torch.tensor([[a, 0], [-a, 0], [0, b], [0, -b]], dtype=torch.float64)
    mu, precision = fit_mahalanobis(x, shrinkage=0.0)
    sx, sy = math.sqrt(2 * a * a / 3), math.sqrt(2 * b * b / 3)
    points = torch.tensor([[2 * sx, 0], [0, 3 * sy]], dtype=torch.float64)
    expected = torch.tensor([2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(mahalanobis_distance(points, mu, precision), expected)


def test_layer_statistics_rank_a_shifted_layer_as_out_of_distribution():
    x = gaussian(d=4)
    fit = gaussian(d=4, seed=5)  # default-layer features of the other half of the images
    text = gaussian(d=4, seed=3) * 0.5
    features = {1: x + 10.0, 2: 2.0 * x, 3: x}  # 3 is the default layer
    rows = {r["layer"]: r for r in layer_statistics(fit, features, 3, text, 0.01)}
    assert rows[3]["cos_default"] == pytest.approx(1.0) and rows[3]["fd_default"] < 0.05  # two samples of one law
    assert rows[2]["cka_default"] == pytest.approx(1.0) and rows[2]["norm_default"] == pytest.approx(2.0)
    assert rows[2]["cos_default"] == pytest.approx(1.0)
    assert rows[1]["fd_default"] == pytest.approx(4 * 100.0, rel=0.02)
    assert rows[3]["ood"] == pytest.approx(3 * math.sqrt(2 * math.pi) / 4, rel=0.03)  # E|chi_4| in distribution
    assert rows[1]["ood"] > 5 * rows[3]["ood"]
    assert rows[3]["norm_text"] == pytest.approx(2.0, rel=0.05)
    assert rows[3]["fd_text"] == pytest.approx(4 * 0.25, rel=0.1)  # stds 1 vs 0.5 in each of 4 dims


def in_distribution_band(rows, default_layer):
    """Is the default layer's FD and OOD within the spread of the other layers' (all from its own distribution)?"""
    others = [r for r in rows if r["layer"] != default_layer]
    default = next(r for r in rows if r["layer"] == default_layer)
    # few tokens per dimension, so that scoring the fitted tokens themselves would show: in-sample Mahalanobis
    # distances are ~10% smaller than out-of-sample ones here, and the in-sample FD is 0
    return all(min(r[key] for r in others) * (1 - tol) <= default[key] <= max(r[key] for r in others) * (1 + tol)
               for key, tol in (("fd_default", 0.5), ("ood", 0.05)))


def test_default_layer_is_scored_on_other_images_than_its_fit_so_it_is_no_closer_than_layers_like_it():
    # every layer an independent draw from the default layer's distribution: none should look more in distribution
    features = {layer: gaussian(100, 16, seed=layer) for layer in range(6)}
    text = gaussian(100, 16, seed=20)
    assert in_distribution_band(layer_statistics(gaussian(100, 16, seed=10), features, 2, text, 0.01), 2)
    # the check can fail: fitted on the very tokens it scores, the default layer looks closer to home than it is
    assert not in_distribution_band(layer_statistics(features[2], features, 2, text, 0.01), 2)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from tiny import make_tiny_llava
    path = tmp_path_factory.mktemp("vlm")
    make_tiny_llava(str(path), layers=3)
    return path


def make_images(folder, colors=("red", "green", "blue")):
    folder.mkdir()
    for i, color in enumerate(colors):
        Image.new("RGB", (30, 40), color).save(folder / f"{i}.png")
    return folder


def configure(monkeypatch, **settings):
    for k, v in dict(batch_size=2, device="cpu", dtype="float32", save_dtype="float32", **settings).items():
        monkeypatch.setattr(extract, k, v)


def test_extract_saves_every_layer_in_one_pass_on_a_tiny_checkpoint(tiny_vlm, tmp_path, monkeypatch):
    from model import VLM, load_image, preprocess_image
    images = make_images(tmp_path / "images")
    configure(monkeypatch, init_from=str(tiny_vlm), image_dir=str(images), out_dir=str(tmp_path / "out"))
    extract.main()

    vlm = VLM.from_pretrained(str(tiny_vlm))
    pixels = torch.stack([preprocess_image(load_image(images / f"{i}.png"), vlm.config.vision.image_size)
                          for i in range(3)])
    with safe_open(str(tmp_path / "out" / "features.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["layer_0", "layer_1", "layer_2", "layer_3"]
        for layer in range(1, 4):
            torch.testing.assert_close(f.get_tensor(f"layer_{layer}"), vlm.vision_features(pixels, layer=layer))
    stats = json.loads((tmp_path / "out" / "statistics.json").read_text())
    assert [r["layer"] for r in stats["layers"]] == [0, 1, 2, 3] and stats["default_layer"] == 2
    default = stats["layers"][2]
    assert default["cos_default"] == pytest.approx(1.0) and default["cka_default"] == pytest.approx(1.0)
    assert "| 2 (default) | 1.00 |" in (tmp_path / "out" / "statistics.md").read_text()
    with Image.open(tmp_path / "out" / "statistics.png") as plot:  # a PNG that opens, with something drawn on it
        assert plot.format == "PNG" and len(plot.convert("RGB").getcolors(plot.width * plot.height)) > 1


def test_default_layer_is_fitted_on_one_half_of_the_images_and_scored_on_the_other(tiny_vlm, tmp_path, monkeypatch):
    images = make_images(tmp_path / "images", ["red", "green", "blue", "white", "black"])
    configure(monkeypatch, init_from=str(tiny_vlm), image_dir=str(images), out_dir=str(tmp_path / "out"))
    extract.main()
    stats = json.loads((tmp_path / "out" / "statistics.json").read_text())
    fit, scored = stats["fit_images"], stats["scored_images"]
    assert (len(fit), len(scored)) == (2, 3) and sorted(fit + scored) == [str(images / f"{i}.png") for i in range(5)]
    # the default layer's distances are out of sample (another image is not at distance 0) and reported as the floor
    default = stats["layers"][2]
    assert stats["noise_floor"] == {"fd_default": default["fd_default"], "ood": default["ood"]}
    assert default["fd_default"] > 0
    md = (tmp_path / "out" / "statistics.md").read_text()
    assert f"| noise floor | - | - | - | {default['fd_default']:.2f} | - | - | - | {default['ood']:.2f} |" in md
    assert (tmp_path / "out" / "statistics.csv").read_text().splitlines()[-1].startswith("noise floor,,,,")


def test_a_run_that_fails_while_writing_leaves_the_previous_results_whole(tiny_vlm, tmp_path, monkeypatch):
    from common import InputError
    out = tmp_path / "out"
    configure(monkeypatch, init_from=str(tiny_vlm), image_dir=str(make_images(tmp_path / "images")), out_dir=str(out))
    extract.main()
    # features.safetensors is left out: its metadata comes in a different order each time it is written
    results = lambda: {f: (out / f).read_bytes() for f in os.listdir(out) if f != "features.safetensors"}
    before = results()

    def disk_full(path, header, rows):
        with open(path, "w") as f:
            f.write("layer,")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(extract, "write_csv", disk_full)
    with pytest.raises(InputError, match="statistics.csv: could not be written"):
        extract.main()
    assert results() == before and len(os.listdir(out)) == 5  # and no temporary file left


@pytest.mark.parametrize("case, message", [
    ("missing image_dir", "images': folder not found"),
    ("corrupt image", "bad.png: not a readable image"),
    ("one image", "1 .jpg or .png images; expected at least 2"),
    ("out_dir is a file", "is a file; expected a folder"),
])
def test_bad_input_is_one_error_line_and_exit_1_before_the_model_loads(tmp_path, case, message):
    images, out = tmp_path / "images", tmp_path / "out"
    if case != "missing image_dir":
        make_images(images, ["red"] if case == "one image" else ["red", "green"])
    if case == "corrupt image":
        (images / "bad.png").write_bytes(b"not a png")
    if case == "out_dir is a file":
        out.write_text("")
    # run from another folder: extract.py finds its configurator next to itself; the model does not exist, so
    # each error must come before it is loaded
    p = subprocess.run([sys.executable, os.path.join(ROOT, "extract.py"), f"--init_from={tmp_path / 'no-model'}",
                        f"--image_dir={images}", f"--out_dir={out}", "--device=cpu", "--dtype=float32"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.splitlines() == [p.stderr.strip()], p.stderr
    assert p.stderr.startswith("error: ") and message in p.stderr
