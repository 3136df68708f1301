"""The ``meddiff`` command line: ``train`` (centralized baseline), ``sample``, ``evaluate``,
``train-encoder`` and ``plot``.

The installed ``meddiff`` script is :func:`sim.cli.main`, which adds the commands that need the
higher packages (``data split``) to this parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from configs import ConfigError, load_config, with_fields


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, default=None, help="experiment YAML (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")


def _radius(text: str) -> tuple[float, float]:
    """``--lesion-radius MIN,MAX`` (pixels) as a pair of floats."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX in pixels, e.g. 2,5; got {text!r}") from None
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 0 < MIN <= MAX, got {text!r}")
    return lo, hi


def cmd_train(args: argparse.Namespace) -> int:
    # loaded on demand: the CLI parses arguments and answers --help without importing torch
    from meddiff.recipes.centralized import train_centralized
    from meddiff.recipes.sites import load_manifest, public_dataset

    cfg = load_config(args.config, args.overrides)
    dataset = public_dataset(load_manifest(args.public_split), cfg) if args.public_split else None
    train_centralized(cfg, progress=not args.no_progress, dataset=dataset)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    # loaded on demand: the CLI parses arguments and answers --help without importing torch
    from meddiff.recipes.build import sample_spacing
    from meddiff.recipes.restore import codec_from_checkpoint, model_from_checkpoint
    from meddiff.device import resolve_device
    from meddiff.outputs import write_pairs, write_samples
    from meddiff.recipes.masks import masks_to_sample
    from meddiff.recipes.sample import sample_images

    device = resolve_device(args.device)
    model, cfg, ckpt = model_from_checkpoint(args.checkpoint, use_ema=not args.no_ema, device=device)
    codec = codec_from_checkpoint(ckpt, cfg, source=str(args.checkpoint))
    cfg = with_fields(cfg, {"sampler.name": args.sampler, "sampler.num_inference_steps": args.steps,
                            "sampler.eta": args.eta, "sampler.guidance_scale": args.guidance_scale})
    y = None
    if args.class_label is not None:
        if not cfg.model.num_classes:
            raise ConfigError("--class-label needs a class-conditional checkpoint (model.num_classes > 0)")
        if not 0 <= args.class_label < cfg.model.num_classes:
            raise ConfigError(f"--class-label must be in 0..{cfg.model.num_classes - 1}")
        y = torch.full((args.num,), args.class_label, dtype=torch.long)
    asked = [f for f, v in (("--masks", args.masks), ("--lesion-rules", args.lesion_rules or None),
                            ("--lesion-radius", args.lesion_radius), ("--brain-masks", args.brain_masks)) if v is not None]
    if asked and not cfg.model.cond_channels:
        raise ConfigError(f"{', '.join(asked)} need(s) a mask-conditioned checkpoint (model.cond_channels > 0)")
    masks = None
    if cfg.model.cond_channels:  # one image per given mask, per mask of the held-out bank, or per rule-placed tumour
        masks = masks_to_sample(cfg, args.num, seed=args.seed, path=args.masks, rules=args.lesion_rules,
                                radius=args.lesion_radius, brain_path=args.brain_masks)
        y = None if y is None else y[:1].expand(len(masks))
    num = args.num if masks is None else len(masks)
    samples = sample_images(model, cfg, num=num, device=device, seed=args.seed, y=y, progress=not args.no_progress,
                            codec=codec, masks=masks)
    out = args.out or Path(args.checkpoint).resolve().parent.parent / "samples"
    stem = f"sample_{cfg.sampler.name}{cfg.sampler.num_inference_steps}_seed{args.seed}"
    written = write_samples(samples, out, stem, spacing=sample_spacing(cfg))
    if masks is not None:
        written.update(write_pairs(samples, masks, out, stem, spacing=sample_spacing(cfg)))
    for kind, path in written.items():
        print(f"[meddiff] wrote {kind}: {path}")
    return 0


def cmd_train_encoder(args: argparse.Namespace) -> int:
    # loaded on demand: the CLI parses arguments and answers --help without importing torch
    from meddiff.recipes.build import build_image_dataset
    from meddiff.evaluate.encoders import save_encoder, train_domain_encoder

    cfg = load_config(args.config, args.overrides)
    if cfg.model.spatial_dims != 2:
        raise ConfigError("the domain encoder is 2-D; evaluate 3-D models slice-wise")
    dataset = build_image_dataset(cfg)
    num_classes = cfg.model.num_classes or int(max(int(y) for _, y in dataset)) + 1
    model, info = train_domain_encoder(dataset, in_channels=cfg.image_channels, num_classes=num_classes,
                                       steps=args.steps, seed=cfg.train.seed, progress=not args.no_progress)
    path = save_encoder(args.out, model, image_size=cfg.data.image_size, dataset=f"{cfg.data.dataset}:{cfg.data.path}",
                        info=info)
    print(f"[meddiff] domain encoder: {info['steps']} steps, train accuracy {info['train_accuracy_last_50_steps']:.3f}; wrote {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.task == "segmentation":
        return _evaluate_segmentation(args)
    if args.task == "translation":
        return _evaluate_translation(args)
    if args.checkpoint is None or args.synthetic is not None:
        raise ConfigError("--task quality scores a checkpoint: give --checkpoint (--synthetic is for --task segmentation)")
    # loaded on demand: the CLI parses arguments and answers --help without importing torch
    from meddiff.recipes.evaluation import evaluate_checkpoint

    out = args.out or Path(args.checkpoint).resolve().parent.parent / "eval"
    report = evaluate_checkpoint(args.checkpoint, out_dir=out, encoder=args.encoder, encoder_weights=args.encoder_weights,
                                 data_path=args.data, num_samples=args.num, device=args.device, seed=args.seed,
                                 progress=not args.no_progress)
    print(f"[meddiff] FID {report['fid']:.3f}, precision {report['precision']:.3f}, recall {report['recall']:.3f}, "
          f"MIA AUC {report['membership_inference']['mia_auc']:.3f}, near-duplicates "
          f"{report['memorization']['near_duplicates']}; wrote {out / 'eval.md'}")
    return 0


def _evaluate_translation(args: argparse.Namespace) -> int:
    from meddiff.recipes.translation_eval import evaluate_translation, translation_table  # on demand: no torch for --help

    if args.checkpoint is None:
        raise ConfigError("--task translation scores a translation checkpoint: give --checkpoint")
    report = evaluate_translation(checkpoint=args.checkpoint, baseline=args.baseline, out_dir=args.out,
                                  num_test=args.num_real_test, samples=args.samples, device=args.device, seed=args.seed,
                                  ddim_steps=args.ddim_steps, data_path=args.data)
    print(translation_table(report) + f"[meddiff] wrote {Path(report['out_dir']) / 'translation.json'}")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from meddiff.recipes.translation_eval import run_translate  # on demand: no torch for --help

    done = run_translate(args.checkpoint, args.input, args.out, samples=args.samples, device=args.device, seed=args.seed,
                         progress=not args.no_progress, ddim_steps=args.ddim_steps)
    print(f"[meddiff] translated {len(done)} file(s) into {args.out}, {sum(t for _, t in done) / len(done):.1f}s each")
    return 0


def _add_translate_parser(sub) -> None:
    p = sub.add_parser("translate", help="translate source images (NIfTI file or folder, or an .npz of 2-D sources) with "
                                         "a translation checkpoint; NIfTI outputs keep the input's affine and shape")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--input", required=True, type=Path, help="a NIfTI file, a folder of them, or an .npz (array 'source')")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--samples", type=int, default=1, help="diffusion: the mean of this many DDIM samples")
    p.add_argument("--ddim-steps", type=int, default=None, help="diffusion: DDIM steps (default: the checkpoint's sampler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_translate)


def _evaluate_segmentation(args: argparse.Namespace) -> int:
    # loaded on demand: the CLI parses arguments and answers --help without importing torch
    from meddiff.recipes.segmentation import evaluate_segmentation, segmentation_table

    report = evaluate_segmentation(checkpoint=args.checkpoint, synthetic=args.synthetic, out_dir=args.out, data_path=args.data,
                                   real_fraction=args.real_fraction, steps=args.seg_steps, num_samples=args.num,
                                   num_test=args.num_real_test, segmenter=args.segmenter, guidance_scale=args.guidance_scale,
                                   ddim_steps=args.ddim_steps, device=args.device, seed=args.seed,
                                   progress=not args.no_progress)
    print(segmentation_table(report))
    print(f"[meddiff] wrote {Path(report['out_dir']) / 'segmentation.json'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    # loaded on demand: the CLI parses arguments and answers --help without importing torch
    from meddiff.recipes.runs import plot_run

    path = plot_run(args.run_dir)
    print(f"[meddiff] wrote {path}")
    return 0


def _add_mask_args(p: argparse.ArgumentParser) -> None:
    """``meddiff sample``'s options for mask-conditioned models: given masks, or rule-placed tumours."""
    p.add_argument("--masks", type=Path, default=None,
                   help="mask-conditioned models: .npz (array 'masks' [N, K, *S]) or folder of .npy masks; one image "
                        "per mask, written with its mask (default: --num masks from the held-out phantom mask bank, "
                        "or, for other datasets, tumours placed by rules)")
    p.add_argument("--lesion-rules", action="store_true",
                   help="place --num tumours by rules (brain, enhancing rim, necrotic core, oedema halo) even for phantoms")
    p.add_argument("--lesion-radius", type=_radius, default=None, metavar="MIN,MAX",
                   help="tumour-core radius range in pixels (voxels) of rule-placed tumours (default: side/20,side/10)")
    p.add_argument("--brain-masks", type=Path, default=None, metavar="NPY",
                   help="brain masks ([*S] or [B, *S] .npy) to place rule-made tumours in (default: the held-out "
                        "phantom brains, or random ellipses)")


def _add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="quality, diversity, memorization and membership-inference report of a checkpoint, "
                                        "or (--task segmentation) the segmentation utility of generated image+mask pairs")
    p.add_argument("--task", choices=("quality", "segmentation", "translation"), default="quality",
                   help="quality: FID, precision/recall, memorization, MIA; segmentation: Dice of segmenters trained on "
                        "real, synthetic and real + synthetic pairs, and mask fidelity; translation: SSIM, PSNR, MS-SSIM, "
                        "MAE of a translation checkpoint (and --baseline) on held-out pairs")
    p.add_argument("--baseline", type=Path, default=None, help="translation: a second checkpoint (the regression baseline)")
    p.add_argument("--samples", type=int, default=4, help="translation: DDIM samples averaged (also scored: 1 sample)")
    p.add_argument("--ddim-steps", type=int, default=None, help="translation, segmentation: DDIM steps (default: the checkpoint's sampler)")
    p.add_argument("--guidance-scale", type=float, default=None, help="segmentation: mask guidance of the generated pairs (default: the checkpoint's)")
    p.add_argument("--checkpoint", type=Path, default=None, help="model checkpoint (segmentation: a mask-conditioned one)")
    p.add_argument("--synthetic", type=Path, default=None, metavar="NPZ",
                   help="segmentation: generated pairs (arrays 'images', 'masks', as `meddiff sample --masks` writes) "
                        "instead of generating from --checkpoint")
    p.add_argument("--real-fraction", type=float, default=1.0, help="segmentation: share of the real training pairs used")
    p.add_argument("--seg-steps", type=int, default=1000, help="segmentation: training steps of every segmenter")
    p.add_argument("--num-real-test", type=int, default=256, help="segmentation/translation: held-out phantom pairs to test on (BraTS-layout data: 20%% of patients)")
    p.add_argument("--segmenter", default=None, help="segmentation: a saved real-data segmenter for mask fidelity")
    p.add_argument("--data", default=None, help="dataset file (default: the checkpoint's data.path); translation: a BraTS-layout "
                   "cohort of other patients, all of them scored")
    p.add_argument("--encoder", default="domain", help="domain | inception | pixels | random_projection")
    p.add_argument("--encoder-weights", default=None, help="encoder file (domain: from train-encoder; inception: a local .pth)")
    p.add_argument("--num", type=int, default=256, help="samples to generate")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/eval, or the --synthetic file's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)


def build_parser(extend=None) -> argparse.ArgumentParser:
    """The ``meddiff`` parser; ``extend(subparsers)`` lets higher packages (``sim``) add commands."""
    parser = argparse.ArgumentParser(prog="meddiff", description="Federated, private diffusion models for medical images.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="centralized training (the baseline for federated runs)")
    _add_config_args(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--public-split", type=Path, default=None, metavar="MANIFEST",
                   help="train on a split manifest's public patients (partition.public_fraction): pre-training")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples from a checkpoint (PNG grid + .npy, NIfTI for 3-D)")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--num", type=int, default=16, help="number of samples")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/samples)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None)
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--class-label", type=int, default=None, help="class to generate (conditional models)")
    _add_mask_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA weights")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sample)

    _add_evaluate_parser(sub)
    _add_translate_parser(sub)

    p = sub.add_parser("train-encoder", help="train the domain encoder (a small classifier) on a dataset's real images")
    _add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="encoder file to write")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_encoder)

    p = sub.add_parser("plot", help="plot loss, epsilon and FID against round for a federated run")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_plot)
    if extend is not None:
        extend(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, extend=None) -> int:
    args = build_parser(extend).parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:  # DataError is a ValueError
        print(f"meddiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"meddiff {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
