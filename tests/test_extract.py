import json
import math

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import extract
from extract import (fit_mahalanobis, frechet_distance, gaussian_fit, layer_statistics, linear_cka,
                     mahalanobis_distance, mean_pairwise_cosine, norm_ratio, paired_cosine)


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
    text = gaussian(d=4, seed=3) * 0.5
    features = {1: x + 10.0, 2: 2.0 * x, 3: x}  # 3 is the default layer
    rows = {r["layer"]: r for r in layer_statistics(features, 3, text)}
    assert rows[3]["cos_default"] == pytest.approx(1.0) and rows[3]["fd_default"] == pytest.approx(0.0, abs=1e-9)
    assert rows[2]["cka_default"] == pytest.approx(1.0) and rows[2]["norm_default"] == pytest.approx(2.0)
    assert rows[2]["cos_default"] == pytest.approx(1.0)
    assert rows[1]["fd_default"] == pytest.approx(4 * 100.0)
    assert rows[3]["ood"] == pytest.approx(3 * math.sqrt(2 * math.pi) / 4, rel=0.03)  # E|chi_4| in distribution
    assert rows[1]["ood"] > 5 * rows[3]["ood"]
    assert rows[3]["norm_text"] == pytest.approx(2.0, rel=0.05)
    assert rows[3]["fd_text"] == pytest.approx(4 * 0.25, rel=0.1)  # stds 1 vs 0.5 in each of 4 dims


def test_extract_saves_every_layer_in_one_pass_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    from tiny import make_tiny_llava
    from model import VLM, load_image, preprocess_image
    make_tiny_llava(str(tmp_path / "vlm"), layers=3)
    (tmp_path / "images").mkdir()
    for i, color in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (30, 40), color).save(tmp_path / "images" / f"{i}.png")
    for k, v in dict(init_from=str(tmp_path / "vlm"), image_dir=str(tmp_path / "images"), batch_size=2, device="cpu",
                     dtype="float32", save_dtype="float32", out_dir=str(tmp_path / "out")).items():
        monkeypatch.setattr(extract, k, v)
    extract.main()

    vlm = VLM.from_pretrained(str(tmp_path / "vlm"))
    pixels = torch.stack([preprocess_image(load_image(tmp_path / "images" / f"{i}.png"), vlm.config.vision.image_size)
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
    assert Image.open(tmp_path / "out" / "statistics.png").size == (4 * 380, 2 * 280)
