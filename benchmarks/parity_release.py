"""dsm_fast against the paper's released code, live: the same numbers, and the training step timed side by side.

    python benchmarks/parity_release.py --release-src ~/DualScoreMatching            # parity, then speed
    python benchmarks/parity_release.py --release-src ~/DualScoreMatching --skip-speed --write-fixture F.json

``--release-src`` is a checkout of FlorentinGuth/DualScoreMatching (commit c84182f); its modules are imported from
there at run time (none of its code is in this repository). It needs einops; torchvision only serves its data
loaders, so an inert stand-in takes its place when it is not installed. The released model moves itself to CUDA
whenever a GPU is visible, so both sides run on CUDA there, else on the CPU.

1. Parity: the recipe of dsm_fast/tools/parity.py (seeded float64 weights of the paper network, 2 images of 16×16,
   t ∈ {1e-9, 1e-4, 1e-2, 1, 1e3}) through the release's EnergyModel and loss (main.compute_metrics, with the
   paper runs' args.json settings) and through each dsm_fast route; prints the worst relative error per quantity,
   exits 1 above 1e-10. ``--write-fixture`` stores the release's numbers: tests/fixtures/parity_release.json.
2. Speed: one training step (forward, loss, backward, Adam) by the release's own ``main.training_step`` and by
   dsm_fast's routes on the same batch and device, float32; median ms/step and ratios.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import importlib
import json
import statistics
import sys
import types
from pathlib import Path

import torch

from dsm_fast.losses import sample_noise_levels
from dsm_fast.model import UNetEnergy
from dsm_fast.tools import parity, release
from dsm_fast.tools.bench import step_function, time_steps

TOLERANCE = 1e-10
PAPER_NETWORK = {"num_scales": 3, "group_size": 1, "num_layers_encoder_block": 3, "num_layers_mid_block": 3,
                 "num_layers_decoder_block": 3}  # the released runs' args.json network_kwargs
PAPER_LOSS = {"mse_var_exponent": -1.0, "noise_score_var_exponent": 0.0, "train_noise_score": 1.0}  # ditto


def _torchvision_stand_in() -> None:
    """Inert modules named torchvision(.datasets, .transforms.v2): every public attribute is an empty class."""
    def empty_class(attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {})

    def module(name: str) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__getattr__ = empty_class
        sys.modules[name] = m
        return m

    root, transforms = module("torchvision"), module("torchvision.transforms")
    root.datasets, root.transforms, transforms.v2 = module("torchvision.datasets"), transforms, module(
        "torchvision.transforms.v2")


class Release:
    """The released code's model and training step, imported from a checkout."""

    def __init__(self, src: Path):
        if not (src / "networks" / "normalization.py").is_file():
            raise SystemExit(f"parity_release: {src} is not a checkout of {release.RELEASE_REPOSITORY}")
        sys.path.insert(0, str(src))
        try:
            importlib.import_module("torchvision")
        except ImportError:
            _torchvision_stand_in()
        self.main = importlib.import_module("main")
        self.networks, self.noise = importlib.import_module("networks"), importlib.import_module("noise")
        self.data, self.trackers = importlib.import_module("data"), importlib.import_module("trackers")

    def model(self, state_dict: dict, channels: int, size: int, dtype: torch.dtype):
        """(EnergyModel, context for main.compute_metrics/training_step) holding dsm_fast's ``state_dict``."""
        info = self.data.DatasetInfo(spatial_size=size, num_channels=channels, mean=0.5, variance=0.25)
        unet = self.networks.UNet(info, **PAPER_NETWORK)
        net = self.networks.Reparameterization(unet, dataset_info=info, conversion="inner_product").to(dtype)
        net.load_state_dict(release.to_release(state_dict, "paper", channels, prefix="network."))
        covariance = self.noise.IdentityCovariance()
        model = self.networks.EnergyModel(network=net, dataset_info=info, noise_covariance=covariance)
        ctx = types.SimpleNamespace(args=types.SimpleNamespace(**PAPER_LOSS), dataset_info=info, model=model,
                                    noise_covariance=covariance, time_tracker=self.trackers.TimeTracker())
        return model, ctx

    def batch(self, ctx, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
        level = self.noise.NoiseLevel(ctx.dataset_info, variance=t)
        return self.noise.Batch(noise_level=level, clean=x, noisy=x + t.sqrt()[:, None, None, None] * eps)

    def evaluator(self, model, ctx) -> parity.Evaluate:
        network = model.network.module if hasattr(model.network, "module") else model.network
        names = release.key_map("paper", ctx.dataset_info.num_channels)

        def evaluate(x, eps, t):
            batch = self.batch(ctx, x, t, eps)
            out = model(self.networks.ModelInput(noisy=batch.noisy, noise_level=batch.noise_level))
            metrics = self.main.compute_metrics(ctx, batch, out)
            network.zero_grad(set_to_none=True)
            metrics["loss"].mean().backward()
            grads = {names[k.removeprefix("network.")]: p.grad for k, p in network.named_parameters()}
            return (out.energy, out.data_score, out.noise_score, metrics["denoising_mse"] / t,
                    metrics["norm_mse"] / 4, grads)  # norm_mse is 4 × the time term (the release's convention)

        return evaluate


def fixture_facts(rel: Release) -> dict:
    """The release's state-dict names and shapes (colour, grayscale) and its initial weights under seed 0."""
    facts = {"state_dict": {}, "init_seed0_colour": {}}
    for label, channels in (("colour", 3), ("grayscale", 1)):
        unet = rel.networks.UNet(rel.data.DatasetInfo(64, channels, 0.5, 0.25), **PAPER_NETWORK)
        facts["state_dict"][label] = [[k, list(v.shape)] for k, v in unet.state_dict().items()]
    torch.manual_seed(0)
    unet = rel.networks.UNet(rel.data.DatasetInfo(64, 3, 0.5, 0.25), **PAPER_NETWORK)
    facts["init_seed0_colour"] = {k: [v.double().sum().item(), v.double().norm().item()]
                                  for k, v in unet.state_dict().items()}
    return facts


def run_parity(rel: Release, device: torch.device, routes: list[str], fixture: Path | None) -> int:
    recipe = parity.RECIPE
    model, ctx = rel.model(parity.perturbed_state_dict(recipe), recipe["channels"], recipe["size"], torch.float64)
    expected = parity.digest(rel.evaluator(model, ctx), recipe, device=device)
    if fixture is not None:
        record = {"release": parity.release_source(), "recipe": recipe,
                  "generated": {"command": "python benchmarks/parity_release.py --release-src CHECKOUT --skip-speed "
                                           f"--write-fixture {fixture}", "torch": torch.__version__,
                                "device": device.type, "date": datetime.date.today().isoformat()},
                  **fixture_facts(rel), "levels": expected}
        fixture.parent.mkdir(parents=True, exist_ok=True)
        fixture.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {fixture}")
    failed = 0
    for route in routes:
        report = parity.compare(parity.digest(parity.route_evaluator(parity.recipe_model(recipe, device), route),
                                              recipe, device=device), expected, recipe)
        err, where = parity.worst(report)
        failed += err >= TOLERANCE
        print(f"{route:>13}: worst relative error {err:.2e} at {where}")
        for level, rows in report.items():
            print(f"{'':>15}t={level:<6} " + "  ".join(f"{k} {v[0]:.1e}" for k, v in rows.items()))
    return failed


def run_speed(rel: Release, device: torch.device, routes: list[str], batch_size: int, size: int, steps: int,
              warmup: int) -> None:
    torch.manual_seed(0)
    template = UNetEnergy(3, "paper").to(device)
    g = torch.Generator(device).manual_seed(0)
    x = torch.rand(batch_size, 3, size, size, generator=g, device=device)
    t = sample_noise_levels(batch_size, 1e-9, 1e3, g, device)
    eps = torch.randn(x.shape, generator=g, device=device)

    model, ctx = rel.model(template.state_dict(), 3, size, torch.float32)
    ctx.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = rel.batch(ctx, x, t, eps)
    rows = {"release (main.training_step)": lambda: rel.main.training_step(ctx, batch)}
    for route in routes:
        step, _ = step_function(route, copy.deepcopy(template), "fp32")
        rows[f"dsm_fast {route}"] = functools.partial(step, x, t, eps)
    print(f"training step, paper network, batch {batch_size} × 3 × {size}², float32, {device.type}, "
          f"torch {torch.__version__}: median of {steps} after {warmup} warm-up")
    medians = {}
    for name, call in rows.items():
        time_steps(call, [()] * warmup, device)
        medians[name] = statistics.median(time_steps(call, [()] * steps, device))
    base = medians["release (main.training_step)"]
    for name, ms in medians.items():
        print(f"  {name:<30} {ms:10.1f} ms/step   release / this = {base / ms:5.2f}×")


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--release-src", type=Path, required=True, help="checkout of the released code")
    p.add_argument("--write-fixture", type=Path, help="store the release's parity numbers in this JSON file")
    p.add_argument("--routes", default="reference,functional,fused-torch" + (",fused-triton" if cuda else ""),
                   help="dsm_fast routes to check for parity (default: all that run here in reasonable time)")
    p.add_argument("--speed-routes", default="reference,fused", help="dsm_fast routes to time")
    p.add_argument("--batch-size", type=int, default=128 if cuda else 4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20 if cuda else 3)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args(argv)
    rel = Release(args.release_src.expanduser())
    device = torch.device("cuda" if cuda else "cpu")
    failed = 0
    if not args.skip_parity:
        failed = run_parity(rel, device, [r for r in args.routes.split(",") if r], args.write_fixture)
    if not args.skip_speed:
        run_speed(rel, device, [r for r in args.speed_routes.split(",") if r], args.batch_size, args.image_size,
                  args.steps, args.warmup)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
