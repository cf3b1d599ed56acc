"""``densenet train``: run a recipe, any setting overridden by its flag or ``--set KEY=VALUE``
(both parsed by ``densenet.train.config.parse_value``), resume with ``--resume``."""

from __future__ import annotations

import argparse
import logging

from densenet.choices import AMP_MODES, RECIPES
from densenet.cli.common import accept_negative_lists, add_data_args, print_report

# TrainConfig fields with a flag of their own (text parsed as the field's type)
FLAGS = {
    "model": "architecture (see `densenet info`)",
    "data": "cifar10, cifar100, svhn, or a folder with train/ and val/ class folders",
    "epochs": "epochs",
    "batch_size": "global batch size (over all processes)",
    "lr": "initial learning rate",
    "weight_decay": "weight decay",
    "drop_rate": "dropout after each convolution but the first",
    "image_size": "training and evaluation crop size, pixels",
    "weights": "start from these weights (DEFAULT, a file, or none)",
    "in_channels": "input channels (1: grayscale); pretrained RGB stem kernels are adapted "
    "(default: 3 for images, the volumes' own for volumes)",
    "volume_size": "volumes (NIfTI .nii/.nii.gz or .npy files) for a 3D model: resample each to "
    "D,H,W voxels",
    "window": "volumes: clip to LOW,HIGH (e.g. a CT window: -1000,400) and scale to [0, 1] "
    "instead of z-scoring each",
    "labels": "multi-label: a CSV of file (relative to --data) and 0/1 label columns",
    "val_labels": "the validation images' CSV, when --labels has no split column",
    "pos_weight": "auto: weigh each label's positives by negatives / positives",
    "seed": "random seed",
    "accumulate": "micro-batches per optimizer step (gradient accumulation)",
    "out": "output folder (default runs/RECIPE)",
    "workers": "data loading processes per training process",
    "device": "auto (GPU when present), cpu, cuda...",
    "amp": "autocast: auto is bf16 on GPUs that have it, else none",
    "checkpoint_every_steps": "also checkpoint every N steps inside epochs",
    "max_unreadable": "fail an epoch when more than this fraction of its training images "
    "cannot be read",
}
SWITCHES = {
    "compile": "torch.compile the model",
    "memory_efficient": "memory-efficient blocks (--set memory_efficient=triton: with the fused "
    "Triton kernels on CUDA)",
    "sync_bn": "SyncBatchNorm across processes (GPU)",
    "deterministic": "reproducible",
    "allow_empty_classes": "accept class folders without training images (refused otherwise)",
}


class RecipeHelp(argparse.Action):
    """``--help``: given after ``--recipe R``, each setting's help ends with R's value."""

    def __init__(
        self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None
    ):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        name = getattr(namespace, "recipe", None)
        if name in RECIPES:  # its values: the training code is imported for them
            from densenet.train.config import RECIPES as SETTINGS

            recipe = SETTINGS[name]
            for action in parser._actions:
                if action.dest in FLAGS or action.dest in SWITCHES:
                    value = getattr(recipe, action.dest)
                    action.help = f"{action.help} (recipe {recipe.recipe}: {value})"
        parser.print_help()
        parser.exit()


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        add_help=False,
        help="train with one of the paper's recipes; resume after any crash",
        description="Train a DenseNet or RDNet. Recipes: cifar10, cifar10+, cifar100, cifar100+, "
        "svhn, imagenet (the paper's, section 4.2), rdnet (RDNet's: AdamW, cosine, warm-up, "
        "stochastic depth, label smoothing) and finetune (official weights, new classifier). "
        "Every recipe value can be overridden with its flag or --set KEY=VALUE; the resolved "
        "configuration is written to OUT/config.json. Multi-GPU / multi-node: "
        "torchrun --nproc-per-node N -m densenet train ...",
    )
    p.add_argument(
        "-h",
        "--help",
        action=RecipeHelp,
        help="show this help (after --recipe R: with R's values) and exit",
    )
    p.add_argument(
        "--recipe", required=True, choices=list(RECIPES), help="the settings to start from"
    )
    for name, text in FLAGS.items():
        choices = AMP_MODES if name == "amp" else None
        p.add_argument("--" + name.replace("_", "-"), dest=name, choices=choices, help=text)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    for name, text in SWITCHES.items():
        p.add_argument("--" + name.replace("_", "-"), action="store_true", default=None, help=text)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default: on GPU")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other setting"
    )
    add_data_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    accept_negative_lists(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from densenet.infer.runtime import torchrun_ranks
    from densenet.train import make_config, parse_override, train
    from densenet.train.config import parse_value

    overrides = {n: parse_value(n, getattr(args, n)) for n in FLAGS if getattr(args, n) is not None}
    overrides.update({n: True for n in SWITCHES if getattr(args, n)})
    if args.channels_last is not None:
        overrides["channels_last"] = args.channels_last
    overrides.update(data_root=args.data_root, download=not args.no_download)
    if args.no_progress:
        overrides["progress"] = False
    overrides.update(parse_override(item) for item in args.set)
    config = make_config(args.recipe, **overrides)
    main_process = torchrun_ranks().rank == 0
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING, format="%(message)s"
    )
    summary = train(config, resume=args.resume)
    if not main_process:
        return 0
    print_report(summary, args.json)
    if not args.json and "top1_error" in summary.get("test", {}):
        test = summary["test"]
        print(f"test: top-1 error {test['top1_error']:.3f}%  top-5 error {test['top5_error']:.3f}%")
    return 0
