"""LVM's MUSE VQGAN tokenizer as a `diffusers.VQModel`.

LVM's tokenizer on the Hub (`Emma02/vqvae_ckpts`) is an open-muse `VQGANModel` saved as
`config.json` + a pickled `pytorch_model.bin`. Its architecture is the one aMUSEd's VQ uses,
so it maps one-to-one onto `diffusers.VQModel`; this module renames the keys (the key map of
diffusers' `scripts/convert_amused.py`, re-derived here for any number of levels and blocks)
and loads the result strictly.

Key map, MUSE -> diffusers (n = len(channel_mult); R = num_res_blocks):

    {encoder,decoder}.conv_in / conv_out          -> unchanged
    {encoder,decoder}.norm_out                    -> {encoder,decoder}.conv_norm_out
    {encoder,decoder}.mid.block_{1,2}.<p>         -> {encoder,decoder}.mid_block.resnets.{0,1}.<p>
    encoder.down.{i}.block.{j}.<p>   (j < R)      -> encoder.down_blocks.{i}.resnets.{j}.<p>
    encoder.down.{i}.downsample.conv (i < n-1)    -> encoder.down_blocks.{i}.downsamplers.0.conv
    decoder.up.{i}.block.{j}.<p>     (j < R+1)    -> decoder.up_blocks.{n-1-i}.resnets.{j}.<p>
    decoder.up.{i}.upsample.conv     (i > 0)      -> decoder.up_blocks.{n-1-i}.upsamplers.0.conv
    quant_conv, post_quant_conv, quantize.embedding -> unchanged
    inside a resnet: nin_shortcut -> conv_shortcut; norm1/conv1/norm2/conv2 unchanged

MUSE numbers its decoder levels by resolution (up.0 is the full-resolution level, run last);
diffusers numbers them in execution order, hence n-1-i. MUSE's decoder has R+1 resnets per
level and its encoder R, exactly like diffusers' `layers_per_block=R`.

LVM's real config (hidden_channels 128, channel_mult [1, 2, 2, 4, 6], num_res_blocks 2,
no attention, z_channels 64, quantized_embed_dim 64, 8192 codes, resolution 256) converts to

    VQModel(in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5,
            block_out_channels=(128, 256, 256, 512, 768), layers_per_block=2, act_fn="silu",
            latent_channels=64, vq_embed_dim=64, num_vq_embeddings=8192, norm_num_groups=32,
            sample_size=256, norm_type="group", mid_block_add_attention=False,
            lookup_from_codebook=True, force_upcast=True)

i.e. 146,244,675 parameters = 585 MB in float32, the size of the Hub file; f16: a 256x256 RGB
image in [0, 1] -> 16x16 = 256 codes. `sample_size` is the image side (this project's tokenizer
reads it as such; aMUSEd's own config stores 32 there, which diffusers does not use).

The VQ must stay float32: LVM's VQGAN produces NaNs in float16 (`force_upcast=True` records
that, and `load_muse_vqgan` returns a float32 model).

Pixel range: a MUSE VQGAN reads RGB in [0, 1] as is and writes [0, 1] (`MUSE_PIXEL_RANGE`), not the
[-1, 1] of most diffusers VAEs. LVM feeds it `np.array(image) / 255` and nothing more
(ytongbai/LVM evaluation/vqlm_demo/utils.py `read_image_to_tensor`) and clamps the decoded output
to [0, 1] (inference.py `generate_once`); open-muse encodes `transforms.ToTensor()` images without
a Normalize (training/data.py, pipeline_muse.py) and clips decodes to [0, 1] (pipeline_muse.py
`to_pil_image`); diffusers' aMUSEd pipelines use `VaeImageProcessor(do_normalize=False)`.

Pickles are only ever read with `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import json
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "pytorch_model.bin"

# MUSE's GroupNorms are hard-coded to 32 groups. `norm_num_groups` is NOT a MUSE field: it is an
# extension honoured here so that tests can use tiny configs with fewer than 32 channels.
MUSE_NORM_GROUPS = 32

# Fields of open-muse's `VQGANModel.__init__`: the first 13 are all that open-muse main (muse/
# modeling_taming_vqgan.py) and LVM's copy (evaluation/vqlm_demo/vqvae_muse.py) have; the last 4
# come from open-muse's `vqgan-finetuning` branch (an asymmetric decoder) and are accepted only at
# values that describe the encoder's mirror image (see muse_config_to_vqmodel_kwargs).
_MUSE_FIELDS = {
    "resolution", "num_channels", "hidden_channels", "channel_mult", "num_res_blocks",
    "attn_resolutions", "no_attn_mid_block", "z_channels", "num_embeddings", "quantized_embed_dim",
    "dropout", "resample_with_conv", "commitment_cost",
    "decoder_res_blocks", "extra_mid_res_blocks", "decoder_hidden_channels", "decoder_channel_mult",
}
_EXTENSION_FIELDS = {"norm_num_groups"}

# What a MUSE VQGAN reads and writes (see the module docstring): RGB in [0, 1], no rescale.
MUSE_PIXEL_RANGE = (0.0, 1.0)

# open-muse's defaults for the fields LVM's config might leave out.
_MUSE_DEFAULTS = {
    "resolution": 256, "num_channels": 3, "hidden_channels": 128, "channel_mult": (1, 1, 2, 2, 4),
    "num_res_blocks": 2, "attn_resolutions": (16,), "no_attn_mid_block": False, "z_channels": 256,
    "num_embeddings": 1024, "quantized_embed_dim": 256, "dropout": 0.0, "resample_with_conv": True,
    "commitment_cost": 0.25,
}

# What LVM's `Emma02/vqvae_ckpts/config.json` describes (see the module docstring).
LVM_MUSE_CONFIG = {
    "resolution": 256, "num_channels": 3, "hidden_channels": 128, "channel_mult": [1, 2, 2, 4, 6],
    "num_res_blocks": 2, "attn_resolutions": [], "no_attn_mid_block": True, "z_channels": 64,
    "num_embeddings": 8192, "quantized_embed_dim": 64, "dropout": 0.0, "resample_with_conv": True,
    "commitment_cost": 0.25,
}


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

def _field(cfg: dict, name: str):
    return cfg[name] if name in cfg else _MUSE_DEFAULTS[name]


def _shape_params(cfg: dict) -> tuple[int, int]:
    """(number of levels, encoder resnets per level) of a MUSE config."""
    return len(_field(cfg, "channel_mult")), int(_field(cfg, "num_res_blocks"))


def muse_config_to_vqmodel_kwargs(muse_config: dict) -> dict:
    """`diffusers.VQModel` init kwargs equivalent to a MUSE `VQGANModel` config.

    Raises ValueError for a config that VQModel cannot express (attention blocks, a decoder
    that differs from the encoder, channel_mult not starting at 1, resampling without conv,
    channel counts not divisible by the GroupNorm group count) or that has unknown fields.
    """
    if not isinstance(muse_config, dict):
        raise ValueError(f"MUSE config must be a dict, got {type(muse_config).__name__}")
    cfg = {k: v for k, v in muse_config.items() if not k.startswith("_")}
    unknown = sorted(set(cfg) - _MUSE_FIELDS - _EXTENSION_FIELDS)
    if unknown:
        raise ValueError(f"MUSE config has unknown field(s) {unknown}; cannot tell what they change")

    hidden = int(_field(cfg, "hidden_channels"))
    mult = [int(m) for m in _field(cfg, "channel_mult")]
    n_levels, n_res = _shape_params(cfg)
    resolution = int(_field(cfg, "resolution"))
    if not mult:
        raise ValueError("MUSE config: channel_mult is empty")
    if mult[0] != 1:
        # MUSE's conv_in outputs hidden_channels, VQModel's outputs block_out_channels[0].
        raise ValueError(f"MUSE config: channel_mult must start with 1 to map onto VQModel, got {mult}")
    if n_res < 1:
        raise ValueError(f"MUSE config: num_res_blocks must be >= 1, got {n_res}")
    if not _field(cfg, "resample_with_conv"):
        raise ValueError("MUSE config: resample_with_conv=False (pooling / no-conv upsampling) is not supported")
    if not _field(cfg, "no_attn_mid_block"):
        raise ValueError("MUSE config: mid-block attention (no_attn_mid_block=False) is not supported; "
                         "LVM's VQGAN has none")
    level_res = {resolution // 2 ** i for i in range(n_levels)}
    attn_hit = sorted(level_res & {int(r) for r in (_field(cfg, "attn_resolutions") or ())})
    if attn_hit:
        raise ValueError(f"MUSE config: attention at resolution(s) {attn_hit} (attn_resolutions) is not supported")
    for name, same in (("decoder_res_blocks", n_res), ("decoder_hidden_channels", hidden),
                       ("decoder_channel_mult", mult)):
        value = cfg.get(name)
        if value is not None and (list(value) if isinstance(value, (list, tuple)) else value) != same:
            raise ValueError(f"MUSE config: {name}={value!r} (a decoder unlike the encoder) is not supported")
    if cfg.get("extra_mid_res_blocks"):
        raise ValueError("MUSE config: extra_mid_res_blocks is not supported")

    block_out = tuple(hidden * m for m in mult)
    groups = int(cfg.get("norm_num_groups", MUSE_NORM_GROUPS))
    bad = [c for c in block_out if c % groups]
    if groups < 1 or bad:
        raise ValueError(f"MUSE config: channels {list(block_out)} are not all divisible by "
                         f"{groups} GroupNorm groups (MUSE uses 32; set norm_num_groups for tiny test configs)")
    z_channels = int(_field(cfg, "z_channels"))
    return {
        "in_channels": int(_field(cfg, "num_channels")),
        "out_channels": int(_field(cfg, "num_channels")),
        "down_block_types": ("DownEncoderBlock2D",) * n_levels,
        "up_block_types": ("UpDecoderBlock2D",) * n_levels,
        "block_out_channels": block_out,
        "layers_per_block": n_res,
        "act_fn": "silu",
        "latent_channels": z_channels,
        "vq_embed_dim": int(_field(cfg, "quantized_embed_dim")),
        "num_vq_embeddings": int(_field(cfg, "num_embeddings")),
        "norm_num_groups": groups,
        "sample_size": resolution,
        "norm_type": "group",
        "mid_block_add_attention": False,
        "lookup_from_codebook": True,
        "force_upcast": True,
    }


# --------------------------------------------------------------------------------------------
# key map: one table of (MUSE template, diffusers template, validity check) used both ways
# --------------------------------------------------------------------------------------------
# Fields: {part} encoder|decoder, {wb} weight|bias, {rp} resnet parameter, {mid} mid resnet,
# {i} level as MUSE numbers it, {u} decoder level as diffusers numbers it (= n-1-i), {j} resnet.

_IDX = r"(?:0|[1-9][0-9]*)"
_FIELD_RE = {
    "muse": {"part": "encoder|decoder", "wb": "weight|bias", "rp": "norm1|conv1|norm2|conv2|nin_shortcut",
             "mid": "1|2", "i": _IDX, "u": _IDX, "j": _IDX},
    "diffusers": {"part": "encoder|decoder", "wb": "weight|bias", "rp": "norm1|conv1|norm2|conv2|conv_shortcut",
                  "mid": "0|1", "i": _IDX, "u": _IDX, "j": _IDX},
}

_RULES = [
    # (MUSE template, diffusers template, valid(i, j, n_levels, n_res) in MUSE numbering)
    ("{part}.conv_in.{wb}", "{part}.conv_in.{wb}", None),
    ("{part}.conv_out.{wb}", "{part}.conv_out.{wb}", None),
    ("{part}.norm_out.{wb}", "{part}.conv_norm_out.{wb}", None),
    ("{part}.mid.block_{mid}.{rp}.{wb}", "{part}.mid_block.resnets.{mid}.{rp}.{wb}", None),
    ("encoder.down.{i}.block.{j}.{rp}.{wb}", "encoder.down_blocks.{i}.resnets.{j}.{rp}.{wb}",
     lambda i, j, n, r: i < n and j < r),
    ("encoder.down.{i}.downsample.conv.{wb}", "encoder.down_blocks.{i}.downsamplers.0.conv.{wb}",
     lambda i, j, n, r: i < n - 1),
    ("decoder.up.{i}.block.{j}.{rp}.{wb}", "decoder.up_blocks.{u}.resnets.{j}.{rp}.{wb}",
     lambda i, j, n, r: 0 <= i < n and j < r + 1),
    ("decoder.up.{i}.upsample.conv.{wb}", "decoder.up_blocks.{u}.upsamplers.0.conv.{wb}",
     lambda i, j, n, r: 0 < i < n),
    ("quant_conv.{wb}", "quant_conv.{wb}", None),
    ("post_quant_conv.{wb}", "post_quant_conv.{wb}", None),
    ("quantize.embedding.weight", "quantize.embedding.weight", None),
]


def _template_regex(template: str, side: str) -> re.Pattern:
    pattern, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        pattern += re.escape(template[pos:m.start()]) + f"(?P<{m.group(1)}>{_FIELD_RE[side][m.group(1)]})"
        pos = m.end()
    return re.compile(pattern + re.escape(template[pos:]))


_COMPILED = [
    {"muse": _template_regex(m, "muse"), "diffusers": _template_regex(d, "diffusers"),
     "templates": {"muse": m, "diffusers": d}, "valid": valid}
    for m, d, valid in _RULES
]

_RP = {"nin_shortcut": "conv_shortcut"}
_RP_BACK = {v: k for k, v in _RP.items()}


def _to_muse_fields(fields: dict, side: str, n_levels: int) -> dict:
    """Field values in MUSE's convention (levels numbered by resolution, mid 1/2)."""
    f = dict(fields)
    if side == "diffusers":
        if "rp" in f:
            f["rp"] = _RP_BACK.get(f["rp"], f["rp"])
        if "mid" in f:
            f["mid"] = str(int(f["mid"]) + 1)
        if "u" in f:
            f["i"] = str(n_levels - 1 - int(f.pop("u")))
    return f


def _from_muse_fields(f: dict, side: str, n_levels: int) -> dict:
    out = dict(f)
    if side == "diffusers":
        if "rp" in out:
            out["rp"] = _RP.get(out["rp"], out["rp"])
        if "mid" in out:
            out["mid"] = str(int(out["mid"]) - 1)
        if "i" in out:
            out["u"] = str(n_levels - 1 - int(out["i"]))
    return out


def _rename_key(key: str, src: str, dst: str, n_levels: int, n_res: int) -> str | None:
    for rule in _COMPILED:
        m = rule["muse" if src == "muse" else "diffusers"].fullmatch(key)
        if m is None:
            continue
        fields = _to_muse_fields(m.groupdict(), src, n_levels)
        if rule["valid"] is not None:
            i, j = int(fields.get("i", 0)), int(fields.get("j", 0))
            if not rule["valid"](i, j, n_levels, n_res):
                return None
        template = rule["templates"][dst]
        return template.format(**_from_muse_fields(fields, dst, n_levels))
    return None


def _rename_state_dict(state_dict, muse_config: dict, src: str, dst: str) -> dict:
    if not isinstance(state_dict, dict):
        raise ValueError(f"state dict must be a mapping of key -> tensor, got {type(state_dict).__name__}")
    n_levels, n_res = _shape_params(muse_config)
    out: dict = OrderedDict()
    unknown, source_of = [], {}
    for key, value in state_dict.items():
        new = _rename_key(key, src, dst, n_levels, n_res) if isinstance(key, str) else None
        if new is None:
            unknown.append(key)
            continue
        if new in source_of:  # cannot happen with this table; guards "each key used exactly once"
            raise ValueError(f"keys {source_of[new]!r} and {key!r} both map to {new!r}")
        source_of[new] = key
        out[new] = value
    if unknown:
        hint = " (attention blocks are not supported)" if any("attn" in str(k) for k in unknown) else ""
        shown = ", ".join(repr(k) for k in unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise ValueError(f"{src} state dict: key(s) not understood for a {n_levels}-level, "
                         f"{n_res}-resnet VQGAN{hint}: {shown}")
    return out


def muse_to_diffusers(state_dict, muse_config: dict) -> dict:
    """Rename every key of a MUSE `VQGANModel` state dict to `diffusers.VQModel`'s layout.

    Tensors are passed through untouched (same objects). Raises ValueError naming every key
    that is not part of a MUSE VQGAN of this config's shape.
    """
    return _rename_state_dict(state_dict, muse_config, "muse", "diffusers")


def diffusers_to_muse(state_dict, muse_config: dict) -> dict:
    """The exact inverse of `muse_to_diffusers`."""
    return _rename_state_dict(state_dict, muse_config, "diffusers", "muse")


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{folder}: missing {CONFIG_NAME} (a MUSE VQGAN folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _read_weights(folder: Path) -> dict:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(f"{folder}: missing {WEIGHTS_NAME} (a MUSE VQGAN folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
        reason = detail.group(1).strip() if detail else str(exc).splitlines()[0]
        raise ValueError(f"{path}: refused to unpickle with weights_only=True, it holds more than tensors "
                         f"({reason})") from None
    except Exception as exc:  # noqa: BLE001 - corrupt / truncated / not a torch file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: could not read ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (key -> tensor), got {type(state).__name__}")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: entries that are not tensors: {not_tensors[:8]}")
    return state


def _check_against(model_state: dict, converted: dict, where: str) -> None:
    missing = [k for k in model_state if k not in converted]
    unexpected = [k for k in converted if k not in model_state]
    wrong = [f"{k} {tuple(converted[k].shape)} != {tuple(v.shape)}" for k, v in model_state.items()
             if k in converted and tuple(converted[k].shape) != tuple(v.shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            problems.append(f"{len(items)} {label}: " + ", ".join(items[:4]) + (", ..." if len(items) > 4 else ""))
    if problems:
        raise ValueError(f"{where}: state dict does not match the config's VQModel ({'; '.join(problems)})")


def load_muse_vqgan(folder):
    """Load a MUSE VQGAN folder (`config.json` + `pytorch_model.bin`) as a float32, eval
    `diffusers.VQModel`. The pickle is read with `weights_only=True`; weights load strictly.
    Raises ValueError (one line) for a missing file, a refused pickle or a mismatching state dict.
    """
    from diffusers import VQModel

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    config = _read_config(folder)
    kwargs = muse_config_to_vqmodel_kwargs(config)
    converted = muse_to_diffusers(_read_weights(folder), config)

    # Build without allocating random weights (the real model is 585 MB), then adopt the tensors.
    with torch.device("meta"):
        model = VQModel(**kwargs)
    _check_against(model.state_dict(), converted, str(folder / WEIGHTS_NAME))
    model.load_state_dict(converted, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # pragma: no cover - VQModel has no non-persistent buffers today
        raise ValueError(f"{folder}: tensors left uninitialised after loading: {leftover[:4]}")
    return model.to(torch.float32).eval()
