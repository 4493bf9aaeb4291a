"""Energy networks: the paper's UNet, the energy wrappers and the radial model for analytic data."""
from .energy import RadialEnergy, UNetEnergy, denoise, energy_and_scores, sum_per_sample
from .unet import PRESETS, EnergyUNet, UNetPreset

__all__ = [
    "PRESETS", "EnergyUNet", "RadialEnergy", "UNetEnergy", "UNetPreset", "denoise", "energy_and_scores",
    "sum_per_sample",
]
