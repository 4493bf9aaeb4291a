"""Loading what an analysis reads: a trained run's energy (EMA or not, DiffCLF-wrapped if it was trained so) and
the images or samples it is evaluated on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig


@dataclass
class LoadedRun:
    model: nn.Module
    cfg: TrainConfig
    checkpoint: Path
    step: int
    device: torch.device
    dtype: torch.dtype

    @property
    def clean_t(self) -> float:
        """The noise level of 'clean' log p: 0 for images, t_min for the analytic data (see evaluate.py)."""
        from ..evaluate import clean_noise_level

        return clean_noise_level(self.cfg)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample the run models: (gsm_dim,) for the analytic data, else (C, H, W)."""
        cfg = self.cfg
        return (cfg.gsm_dim,) if cfg.data == "gsm" else (cfg.channels, cfg.image_size, cfg.image_size)


def load_run(path: str | Path, device: str = "auto", ema: bool = False) -> LoadedRun:
    """The energy of a run folder (its newest checkpoint) or of one checkpoint folder, in eval mode."""
    from ..checkpoint import evaluated_weights, load_checkpoint, resolve_checkpoint
    from ..config import compute_dtype, config_from_run, resolve_device
    from ..diffclf import with_free_energies
    from ..model import build_model

    checkpoint = resolve_checkpoint(path)
    cfg = config_from_run(checkpoint.parent.parent, device=device)
    device = resolve_device(cfg.device)
    weights, state, ema_weights = load_checkpoint(checkpoint, map_location=device)
    dim = cfg.gsm_dim if cfg.data == "gsm" else cfg.image_size
    model = with_free_energies(build_model(cfg.model, channels=cfg.channels, dim=dim, energy=cfg.energy), cfg)
    dtype = compute_dtype(cfg)
    model.to(device, dtype)
    model.load_state_dict(evaluated_weights(checkpoint, weights, ema_weights, ema))
    model.eval()
    return LoadedRun(model, cfg, checkpoint, int(state["step"]), device, dtype)


def evaluation_images(cfg: TrainConfig, source: str | None, n: int, seed: int = 0,
                      spread: bool = False) -> torch.Tensor:
    """Up to n samples as float64: images in [0, 1] from a folder / .npy (``source``), else the run's held-out
    split (demo test photographs, the ImageNet64 val split, or fresh GSM draws); the first n, or with ``spread``
    n evenly spaced over the whole set (neighbouring held-out patches come from the same part of one photograph)."""
    from ..config import ConfigError
    from ..data import image_split, make_test_data
    from ..data.images import load_images

    if n <= 0:
        raise ConfigError("the number of images must be positive")
    if source is None and (cfg.data == "gsm" or not spread):
        return make_test_data(cfg, n, seed=seed)[0].double()
    if source is not None and cfg.data == "gsm":
        raise ConfigError("a run on the GSM data is evaluated on fresh GSM draws, not on image files")
    images = image_split(cfg, "test") if source is None else load_images(source, cfg.channels, cfg.image_size)
    rows = np.unique(np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(np.int64)) if spread else (
        slice(0, n))
    return torch.from_numpy(np.array(images[rows])).double() / 255.0


def log_probabilities(run: LoadedRun, x: torch.Tensor, seed: int = 0, batch_size: int = 64) -> tuple[np.ndarray, float]:
    """(log p(x) = −U(x, t) − C per sample in nats, C) with C by the t_max protocol of evaluate.py; t = run.clean_t.
    For the analytic data p_{t_max} is taken as N(0, (t_max + v) I), v the samples' variance per dimension."""
    from ..evaluate import evaluate_nll

    variance = float(x.var(dim=0).mean()) if run.cfg.data == "gsm" else 0.0
    result = evaluate_nll(run.model, x, False, run.cfg.t_max, data_variance=variance, seed=seed,
                          batch_size=batch_size, t_eval=run.clean_t)
    return result["log_p"], result["log_normalizer"]
