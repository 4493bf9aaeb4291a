"""State-dict names of the paper's released code (FlorentinGuth/DualScoreMatching, commit c84182f) ↔ dsm_fast's.

The released UNet (its networks/unet.py, group size 1) holds each block as one sequence conv, norm, GELU, conv, …,
so layer l of a block is entry 3l (the convolution) and 3l + 1 (the normalization); its decoder list is indexed by
scale (0 = outermost) while ours lists the decoder deepest scale first. Names after the wrapper prefixes
(``network.``, ``module.``) are stripped, for a UNet of S = len(widths) − 1 scales:

    release                                              dsm_fast (UNetEnergy)
    noise_var_embedding.time_embed.0.{weight,bias}       unet.embedding.fc1.{weight,bias}
    noise_var_embedding.time_embed.2.{weight,bias}       unet.embedding.fc2.{weight,bias}
    encoder.s.{3l}.weight                                unet.encoder.s.l.conv.weight
    encoder.s.{3l+1}.weight                              unet.encoder.s.l.norm_act.gain
    encoder.s.{3l+1}.conditioning_embedding.{w,b}        unet.encoder.s.l.norm_act.modulation.{w,b}
    middle_block.…                                       unet.middle.l.…
    decoder.{S−1−i}.…                                    unet.decoder.i.l.…

Shapes are the same on both sides (85 tensors, 8,649,856 numbers for the colour paper preset). Only names and
shapes live here; reading a checkpoint file safely is the importer's job.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..model import UNetEnergy

RELEASE_REPOSITORY = "FlorentinGuth/DualScoreMatching"
RELEASE_COMMIT = "c84182f"
WRAPPER_PREFIXES = ("network.", "module.")
FIRST_CONV = "encoder.0.0.weight"


class ReleaseMismatch(ValueError):
    """A state dict that does not match the architecture; the message names the first mismatching tensor."""


def _layer_names(conv: str, norm: str, ours: str, has_norm: bool) -> list[tuple[str, str]]:
    """(release, ours) name pairs of one layer: release entries ``conv`` (3l) and ``norm`` (3l + 1), ours ``ours``."""
    pairs = [(f"{conv}.weight", f"{ours}.conv.weight")]
    if has_norm:
        pairs += [(f"{norm}.weight", f"{ours}.norm_act.gain"),
                  (f"{norm}.conditioning_embedding.weight", f"{ours}.norm_act.modulation.weight"),
                  (f"{norm}.conditioning_embedding.bias", f"{ours}.norm_act.modulation.bias")]
    return pairs


def key_map(preset: str = "paper", channels: int = 3) -> dict[str, str]:
    """Release name → dsm_fast name for every tensor of the preset's UNetEnergy, in dsm_fast's state-dict order."""
    with torch.device("meta"):
        model = UNetEnergy(channels, preset)
    unet = model.unet
    pairs = [(f"noise_var_embedding.time_embed.{2 * i}.{p}", f"unet.embedding.fc{i + 1}.{p}")
             for i in range(2) for p in ("weight", "bias")]

    def block(release_prefix: str, ours_prefix: str, layers) -> None:
        for l, layer in enumerate(layers):
            pairs.extend(_layer_names(f"{release_prefix}.{3 * l}", f"{release_prefix}.{3 * l + 1}",
                                      f"{ours_prefix}.{l}", layer.norm_act is not None))

    for s, layers in enumerate(unet.encoder):
        block(f"encoder.{s}", f"unet.encoder.{s}", layers)
    block("middle_block", "unet.middle", unet.middle)
    scales = len(unet.decoder)
    for i, layers in enumerate(unet.decoder):
        block(f"decoder.{scales - 1 - i}", f"unet.decoder.{i}", layers)
    mapping = dict(pairs)
    assert list(mapping.values()) == list(model.state_dict()), "release key map out of step with UNetEnergy"
    return mapping


def expected_shapes(preset: str = "paper", channels: int = 3) -> dict[str, tuple[int, ...]]:
    """dsm_fast name → shape of every tensor of the preset's UNetEnergy (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in UNetEnergy(channels, preset).state_dict().items()}


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the released wrappers' leading ``network.`` / ``module.`` segments (any number, any order) from names."""
    out = {}
    for name, value in state_dict.items():
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = value
    return out


def infer_channels(release_state_dict: Mapping[str, torch.Tensor]) -> int:
    """Image channels (3 colour, 1 grayscale) from the first convolution's input channels."""
    state = strip_prefixes(release_state_dict)
    if FIRST_CONV not in state or getattr(state[FIRST_CONV], "ndim", 0) != 4:
        raise ReleaseMismatch(f"no first convolution {FIRST_CONV!r} (a 4-d tensor) in the state dict")
    return int(state[FIRST_CONV].shape[1])


def from_release(release_state_dict: Mapping[str, torch.Tensor], preset: str = "paper",
                 channels: int | None = None) -> dict[str, torch.Tensor]:
    """A released state dict (prefixes allowed) → a state dict that ``UNetEnergy(channels, preset)`` loads.

    ``channels`` defaults to :func:`infer_channels`. Raises :class:`ReleaseMismatch` naming the first tensor that
    is missing, has the wrong shape (in dsm_fast's order), or is unexpected (in the file's order).
    """
    state = strip_prefixes(release_state_dict)
    channels = infer_channels(state) if channels is None else channels
    mapping, shapes = key_map(preset, channels), expected_shapes(preset, channels)
    where = f"the {preset} preset ({channels} channel{'s' if channels != 1 else ''})"
    out = {}
    for release, ours in mapping.items():
        if release not in state:
            raise ReleaseMismatch(f"tensor {release!r} (dsm_fast {ours}) is missing; {where} needs it")
        shape = tuple(getattr(state[release], "shape", ()))
        if shape != shapes[ours]:
            raise ReleaseMismatch(f"tensor {release!r} has shape {shape}; {where} expects {shapes[ours]} ({ours})")
        out[ours] = state[release]
    extra = [name for name in state if name not in mapping]
    if extra:
        raise ReleaseMismatch(f"tensor {extra[0]!r} is not part of {where} ({len(extra)} unexpected in all)")
    return out


def to_release(state_dict: Mapping[str, torch.Tensor], preset: str = "paper", channels: int = 3,
               prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse: a UNetEnergy state dict → the released UNet's names (``prefix`` prepended, e.g. 'network.')."""
    mapping = key_map(preset, channels)
    return {prefix + release: state_dict[ours] for release, ours in mapping.items()}
