"""``dsm-fast data prepare|verify``: ImageNet64 into memory-mappable arrays, and their re-check."""
from __future__ import annotations

from .common import Formatter, examples


def add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare and verify ImageNet64 (official files or image folders)",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast data prepare --src downloads/ --out data/imagenet64",
                           "dsm-fast data verify data/imagenet64",
                           "dsm-fast train --data data/imagenet64 --loader auto"),
                       description="prepare: read the official downsampled-ImageNet 64×64 files (train_data_batch_1…10 "
                                   "and val_data, pickled or _npz, loose or in Imagenet64_*.zip) or train/ and val/ "
                                   "folders of images (box-resized to 64×64), validate them, and write one memory-"
                                   "mappable uint8 (N, 3, 64, 64) .npy per split with labels and a manifest (sha256). "
                                   "verify: re-check a prepared folder against its manifest.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    prep = actions.add_parser("prepare", help="official files or image folders → a prepared dataset folder",
                              formatter_class=Formatter, epilog=examples(
                                  "dsm-fast data prepare --src downloads/ --out data/imagenet64",
                                  "dsm-fast data prepare --src downloads/ --out data/imagenet64-part --train-files 1,2"))
    prep.add_argument("--src", required=True, help="folder with the official files/zips, or with train/ and val/")
    prep.add_argument("--out", required=True, help="the prepared dataset folder (written atomically)")
    prep.add_argument("--train-files", metavar="N,N,...", help="prepare a partial ImageNet64 for prototyping from "
                      "these official train batches only, e.g. 1,2 (recorded in the manifest; by default all ten "
                      "must be there)")
    prep.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    check = actions.add_parser("verify", help="re-check a prepared dataset against its manifest",
                               formatter_class=Formatter, epilog=examples("dsm-fast data verify data/imagenet64"))
    check.add_argument("folder", help="a prepared dataset folder")
    check.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_data(args) -> int:
    from ..data.imagenet64 import parse_train_files, verify
    from ..data.prepare import prepare

    if args.action == "prepare":
        train_files = parse_train_files(args.train_files) if args.train_files else None
        manifest, written = prepare(args.src, args.out, progress=args.progress, train_files=train_files)
        print(f"{'prepared' if written else 'up to date, nothing to do'}: {args.out} ({describe(manifest)})")
    else:
        manifest = verify(args.folder, progress=args.progress)
        print(f"ok: {args.folder} matches its manifest ({describe(manifest)})")
    return 0


def describe(manifest: dict) -> str:
    """'train 35, val 4 images' and, for a partial dataset, which train batches it holds."""
    from ..data.imagenet64 import partial_note

    counts = ", ".join(f"{split} {entry['count']:,}" for split, entry in manifest["splits"].items())
    note = partial_note(manifest)
    return f"{counts} images{'; ' + note if note else ''}"


COMMANDS = {"data": (add_data, run_data)}
