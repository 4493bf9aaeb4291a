"""Energy networks: the paper's UNet, the energy wrappers and the radial model for analytic data."""
from .energy import RadialEnergy, UNetEnergy, denoise, energy_and_scores, sum_per_sample
from .unet import PRESETS, EnergyUNet, UNetPreset

__all__ = [
    "PRESETS",
    "EnergyUNet",
    "RadialEnergy",
    "UNetEnergy",
    "UNetPreset",
    "build_model",
    "denoise",
    "energy_and_scores",
    "sum_per_sample",
]


def build_model(name: str, channels: int = 3, dim: int = 1000, radial_offset: float = 0.0):
    """An energy model by name: a UNet preset (``paper``, ``small``, ``tiny``) or ``radial`` (vectors of ``dim``,
    initial mis-normalization ``radial_offset``)."""
    if name == "radial":
        model = RadialEnergy(dim, time_offset=radial_offset)
    elif name in PRESETS:
        model = UNetEnergy(channels, name)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join([*PRESETS, 'radial'])}")
    return model
