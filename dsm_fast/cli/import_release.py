"""``dsm-fast import-release``: a checkpoint of the paper's released code as a dsm_fast run folder."""
from __future__ import annotations

from .common import Formatter, examples


def add_import_release(sub) -> None:
    p = sub.add_parser("import-release", help="turn a checkpoint of the paper's released code into a dsm_fast run",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast import-release model.pth.tar --out runs/paper-colour --data data/imagenet64",
                           "dsm-fast eval runs/paper-colour --images all --train-images 50000",
                           "dsm-fast sample runs/paper-colour --count 16"),
                       description="Reads a model.pth.tar of FlorentinGuth/DualScoreMatching (commit c84182f) without "
                                   "running any code from it (torch's weights_only unpickler; the release's own "
                                   "classes, e.g. argparse.Namespace, become inert records, any other global refuses "
                                   "the file), maps its 85 UNet tensors onto the paper preset (colour or grayscale "
                                   "from the first convolution) and writes a run folder that eval, sample, denoise, "
                                   "dimensionality, atlas and generalization read. Only the release's energy models "
                                   "(EnergyModel, inner-product conversion) are accepted; a file of another "
                                   "architecture is refused, naming the first tensor that does not fit.")
    p.add_argument("checkpoint", help="the release's model.pth.tar (a torch.save archive)")
    p.add_argument("--out", required=True, help="the run folder to write (absent or empty)")
    p.add_argument("--data", default="demo",
                   help="data recorded in the run's config, e.g. a prepared ImageNet64 folder (eval --data overrides)")


def run_import_release(args) -> int:
    from ..tools.release_import import import_release

    info = import_release(args.checkpoint, args.out, args.data)
    kind = "colour" if info["channels"] == 3 else "grayscale"
    losses = ", ".join(f"{split} loss {info[split + '_perf']['loss']:.4f}" for split in ("train", "test")
                       if "loss" in info[split + "_perf"])
    print(f"imported {info['tensors']} tensors ({kind}, release step {info['step']:,}{', ' + losses if losses else ''})"
          f" into {args.out}")
    return 0


COMMANDS = {"import-release": (add_import_release, run_import_release)}
