"""Energy networks: the paper's UNet, the energy wrappers and the radial model for analytic data."""
from ..config import ENERGIES
from .edm2 import PRESETS as EDM2_PRESETS
from .edm2 import EDM2Preset, EDM2UNet
from .energy import RadialEnergy, UNetEnergy, denoise, energy_and_scores, sum_per_sample
from .gaussian import GaussianStartEnergy
from .unet import PRESETS as PAPER_PRESETS
from .unet import EnergyUNet, UNetPreset

PRESETS = {**PAPER_PRESETS, **EDM2_PRESETS}  # every UNet preset, by --model name

__all__ = [
    "PRESETS",
    "EDM2Preset",
    "EDM2UNet",
    "EnergyUNet",
    "GaussianStartEnergy",
    "RadialEnergy",
    "UNetEnergy",
    "UNetPreset",
    "build_model",
    "denoise",
    "energy_and_scores",
    "parameter_count",
    "sum_per_sample",
]


def parameter_count(model) -> int:
    """Number of trainable parameters (a ZeRO-3 partitioned parameter counts its full size, ``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def build_model(name: str, channels: int = 3, dim: int = 1000, radial_offset: float = 0.0, energy: str = "paper"):
    """An energy model by name: a UNet preset (``paper``, ``small``, ``tiny``; ``edm2-s``, ``edm2-xs``, ``edm2-tiny``)
    or ``radial`` (vectors of ``dim``, initial mis-normalization ``radial_offset``). ``energy``: 'paper' (U = ½⟨y, f_θ(y, t)⟩) or 'gaussian' (the
    Gaussian start of model/gaussian.py, UNet presets only)."""
    if energy not in ENERGIES:
        raise ValueError(f"unknown energy {energy!r}; choose from {', '.join(ENERGIES)}")
    if name == "radial":
        model = RadialEnergy(dim, time_offset=radial_offset)
    elif name in PRESETS:
        model = UNetEnergy(channels, name) if energy == "paper" else GaussianStartEnergy(channels, name)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join([*PRESETS, 'radial'])}")
    return model
