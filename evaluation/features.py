"""The paper's representation-learning protocol (section 5.1): D's features + a linear L2-SVM.

Every LeakyReLU output of D's convolutional stack is max-pooled to a 4 x 4 grid, flattened and
concatenated (sum over layers of channels x 16 dimensions: 7,168 for ndf = 64 at 32x32) and
classified by a one-vs-rest linear SVM with the squared hinge loss (an L2-SVM). D's BatchNorm
statistics are first recomputed on real training images (`recalibrated`). Every feature set
gets the same choices by k-fold cross-validation on training labels only, at the training size
the final fit uses: per-feature standardisation or one scale, and C from a grid widened past any
end it picks. Baselines: the same SVM on raw pixels, and on randomly initialised Ds (several seeds).

The SVM solves exactly sklearn LinearSVC's problem (squared hinge, intercept_scaling = 1, so the
bias is regularised like a weight), per class k with y_ik in {-1, +1}:

    min_w  0.5 ||w||^2 + C sum_i max(0, 1 - y_ik w . [x_i, 1])^2

but LinearSVC (liblinear, float64, one core) needs 10-350 s per fit on 1,000-5,000 x 7,168
standardised features here, and the protocol needs hundreds of fits. This solver runs L-BFGS
on dense float32 matrices for all classes at once; with fewer samples than dimensions it
solves the same problem in an n-dimensional basis of the training rows (the optimal w lies in
their span: a Cholesky factor of the Gram matrix has the same inner products), which makes the
1,000-label fits milliseconds-cheap. tests/test_eval.py checks it against LinearSVC.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch import nn

from common.atomic import atomic_write_bytes
from evaluation.datasets import LabelledImages, load_fashion_mnist, load_mnist_split, to_model_range
from evaluation.errors import EvalError

GRID = 4
# C = c / feature dimension: both preprocessings give rows a mean squared norm of about the dimension,
# so the same c means the same balance of margin and fit for 1,024 pixels and 7,168 D features. A
# decade grid, widened past its ends whenever cross-validation picks an end (EDGE_STEPS times at most)
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
EDGE_STEPS = 3
# each feature set gets the preprocessing that suits it, chosen with C by the same cross-validation:
# per-feature standardisation, or one scale for all (relative scales kept: raw pixels near the
# border are almost always -1, and standardising them blows their rare values up to hundreds)
PREPROCESSINGS = ("standardised", "scaled")


# --- features ------------------------------------------------------------------------------------
def layer_widths(discriminator: nn.Module) -> list[int]:
    """Channels of each LeakyReLU output in D.features (the layers whose features are pooled).

    `discriminator`: a DCGAN D, whose `features` is its convolutional stack (an nn.Sequential).
    """
    widths, channels = [], 0
    for module in discriminator.features:
        if isinstance(module, nn.Conv2d):
            channels = module.out_channels
        elif isinstance(module, nn.LeakyReLU):
            widths.append(channels)
    return widths


def feature_dim(discriminator: nn.Module) -> int:
    return sum(layer_widths(discriminator)) * GRID * GRID


@torch.no_grad()
def discriminator_features(discriminator: nn.Module, pixels: np.ndarray, batch_size: int = 500,
                           device: torch.device | str = "cpu") -> np.ndarray:
    """uint8 (N, C, R, R) -> float32 (N, feature_dim): every LeakyReLU output, max-pooled to 4 x 4.

    D runs in eval mode, so BatchNorm uses its running statistics and a feature does not depend
    on the rest of the batch.
    """
    was_training = discriminator.training
    discriminator.eval().to(device)
    out = np.empty((len(pixels), feature_dim(discriminator)), dtype=np.float32)
    try:
        for start in range(0, len(pixels), batch_size):
            x = to_model_range(pixels[start:start + batch_size]).to(device)
            pooled = []
            for module in discriminator.features:
                x = module(x)
                if isinstance(module, nn.LeakyReLU):
                    pooled.append(F.adaptive_max_pool2d(x, GRID).flatten(1))
            out[start:start + len(x)] = torch.cat(pooled, 1).float().cpu().numpy()
    finally:
        discriminator.train(was_training)
    return out


@torch.no_grad()
def recalibrated(discriminator: nn.Module, pixels: np.ndarray, batch_size: int = 500,
                 device: torch.device | str = "cpu") -> nn.Module:
    """A copy of D whose BatchNorm running statistics are recomputed on real images `pixels`.

    The statistics a trained D keeps are a moving average over its training forwards: one on real
    images and two on G's samples per step (D's forward inside G's update runs in train mode too;
    freezing parameters does not freeze buffers), so they describe mostly fakes. Features of real
    images should be normalised as a D normalises real data: here each BatchNorm's statistics are
    reset and rebuilt as the cumulative average (momentum None) over batches of `pixels` in train
    mode. The weights are untouched; the copy is returned in eval mode.
    """
    net = copy.deepcopy(discriminator).to(device)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    net.train()
    for start in range(0, len(pixels), batch_size):
        net.features(to_model_range(pixels[start:start + batch_size]).to(device))
    return net.eval()


def pixel_features(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, C, R, R) -> float32 (N, C*R*R) in [-1, 1]: the raw-pixel baseline."""
    return to_model_range(pixels).flatten(1).numpy()


class Standardiser:
    """Per-feature mean and standard deviation of the training rows (constant features: scale 1)."""

    name = "standardised"

    def __init__(self, train: np.ndarray, chunk: int = 4096):
        # two passes in float64 over row chunks: exact enough, and no float64 copy of the whole matrix
        data = torch.from_numpy(train)
        mean = sum(part.double().sum(0) for part in data.split(chunk)) / len(data)
        var = sum(((part.double() - mean) ** 2).sum(0) for part in data.split(chunk)) / len(data)
        std = var.sqrt().float()
        self.mean = mean.float()
        self.scale = torch.where(std > 1e-8, std, torch.ones_like(std))

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(x) - self.mean) / self.scale


class GlobalScale:
    """One scale for every feature: the training rows' root mean square (their mean squared norm
    becomes the dimension, as after standardising), no shift. The SVM sees the features as they
    are, up to a constant that the C grid would absorb anyway."""

    name = "scaled"

    def __init__(self, train: np.ndarray, chunk: int = 4096):
        data = torch.from_numpy(train)
        mean_square = sum(part.double().square().sum() for part in data.split(chunk)) / max(data.numel(), 1)
        self.scale = float(mean_square.sqrt()) or 1.0

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x) / self.scale


def preprocessing(name: str, train: np.ndarray) -> Standardiser | GlobalScale:
    return {"standardised": Standardiser, "scaled": GlobalScale}[name](train)


# --- the L2-SVM ----------------------------------------------------------------------------------
def _signs(y: torch.Tensor, classes: int) -> torch.Tensor:
    signs = torch.full((len(y), classes), -1.0)
    signs[torch.arange(len(y)), y] = 1.0
    return signs


def _lbfgs(z: torch.Tensor, signs: torch.Tensor, c: float, w0: torch.Tensor | None, tol: float,
           max_iter: int) -> tuple[torch.Tensor, int]:
    """min_W 0.5 ||W||^2 + C sum max(0, 1 - S * (Z W))^2, divided by C n for a scale-free tolerance.

    The gradient is written out: autograd's X^T @ G for this shape is ~6x slower than (G^T X)^T.
    """
    n = z.shape[0]
    reg = 1.0 / (c * n)
    w = (torch.zeros(z.shape[1], signs.shape[1]) if w0 is None else w0.clone()).requires_grad_(True)
    optimiser = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        with torch.no_grad():
            margin = (1 - signs * (z @ w)).clamp_min_(0)
            loss = 0.5 * reg * (w * w).sum() + (margin * margin).sum() / n
            w.grad = reg * w + ((-2.0 / n) * signs * margin).t().matmul(z).t()
        return loss

    optimiser.step(closure)
    return w.detach(), int(optimiser.state[w]["n_iter"])


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1)], 1)


class SvmPath:
    """L2-SVM fits of one training set for an ascending list of C, each warm-started from the last.

    With fewer rows than half the dimensions it works in the rows' basis: K = X X^T (+1 for the
    bias) = L L^T, so the rows of L have the rows' inner products; W_L for L gives
    beta = L^-T W_L and decision scores K(x, rows) beta for any x.
    """

    def __init__(self, x: torch.Tensor, y: np.ndarray, classes: int, tol: float = 1e-3, max_iter: int = 1000,
                 gram: torch.Tensor | None = None):
        self.x, self.classes, self.tol, self.max_iter = x, classes, tol, max_iter
        self.signs = _signs(torch.as_tensor(y, dtype=torch.int64), classes)
        self.dual = gram is not None or 2 * len(x) < x.shape[1]
        self.iterations: list[int] = []
        if self.dual:
            k = (x @ x.t() + 1 if gram is None else gram).double()
            jitter = 1e-6 * float(k.diagonal().mean())
            self.chol = torch.linalg.cholesky(k + jitter * torch.eye(len(k), dtype=k.dtype))
            self.z = self.chol.float()
        else:
            self.z = _with_bias(x)
        self._w: torch.Tensor | None = None

    def fit(self, c: float) -> torch.Tensor:
        """Weights (dim + 1, classes) in feature space (bias last), or beta (n, classes) when dual."""
        self._w, iters = _lbfgs(self.z, self.signs, c, self._w, self.tol, self.max_iter)
        self.iterations.append(iters)
        if not self.dual:
            return self._w
        return torch.linalg.solve_triangular(self.chol.t(), self._w.double(), upper=True).float()

    def feature_weights(self, coef: torch.Tensor) -> torch.Tensor:
        return _with_bias(self.x).t().matmul(coef) if self.dual else coef


def decision_scores(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return x @ weights[:-1] + weights[-1]


def _cv_accuracy(xs: torch.Tensor, ys: np.ndarray, classes: int, cs: Sequence[float], folds: int, seed: int,
                 gram: torch.Tensor | None) -> dict[float, float]:
    """Mean k-fold validation accuracy for each C (the same folds for every C: seeded)."""
    scores: dict[float, list[float]] = {c: [] for c in cs}
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, val in splitter.split(np.zeros(len(ys)), ys):
        sub_gram = gram[train][:, train] if gram is not None else None
        path = SvmPath(xs[train], ys[train], classes, gram=sub_gram)
        for c in sorted(cs):
            coef = path.fit(c)
            if gram is not None:
                scores_val = gram[val][:, train] @ coef
            else:
                scores_val = decision_scores(xs[val], path.feature_weights(coef))
            scores[c].append(float((scores_val.argmax(1).numpy() == ys[val]).mean()))
    return {c: float(np.mean(v)) for c, v in scores.items()}


def select_c(x: torch.Tensor, y: np.ndarray, classes: int, c_grid: Sequence[float], folds: int, seed: int,
             cv_limit: int = 0) -> tuple[float, dict[float, float]]:
    """The C with the best mean k-fold accuracy (ties: the smaller C) on training rows only.

    Where the best C is an end of the grid, the grid grows by a decade past that end (EDGE_STEPS
    times at most), so the choice is not the grid's edge. With `cv_limit`, the folds come from a
    seeded random subset of that many training rows (0: all, the size the final fit uses).
    """
    index = np.arange(len(y))
    if cv_limit and len(y) > cv_limit:
        index = np.sort(np.random.default_rng(seed).choice(len(y), cv_limit, replace=False))
    xs, ys = x[index], y[index]
    fewest = np.bincount(ys, minlength=classes).min()
    if fewest < folds:
        raise EvalError(f"{folds}-fold cross-validation needs at least {folds} examples of every class; "
                        f"{len(ys)} training labels hold {fewest} of one (give more labels or fewer --folds)")
    gram = xs @ xs.t() + 1 if 2 * len(xs) * (folds - 1) < folds * xs.shape[1] else None
    means = _cv_accuracy(xs, ys, classes, c_grid, folds, seed, gram)
    for _ in range(EDGE_STEPS):
        grid = sorted(means)
        best = max(grid, key=lambda c: means[c])
        inner = grid[1] if best == grid[0] else grid[-2] if best == grid[-1] else None
        # an end that merely ties its neighbour is a plateau (tiny Cs all give the class-mean direction)
        if inner is None or len(grid) == 1 or means[best] <= means[inner]:
            break
        means.update(_cv_accuracy(xs, ys, classes, [best / 10 if best == grid[0] else best * 10], folds, seed,
                                  gram))
    best = max(sorted(means), key=lambda c: means[c])
    return best, means


def train_and_test(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   classes: int, c_grid: Sequence[float], folds: int, seed: int, cv_limit: int = 0,
                   preprocessings: Sequence[str] = PREPROCESSINGS) -> dict[str, Any]:
    """Preprocessing and C by cross-validation on the training rows, then one fit on all of them;
    test accuracy. Features are raw (N, dim) float32; each preprocessing is fitted on `train_x`."""
    started = time.perf_counter()
    dim = train_x.shape[1]
    scaled_grid = [c / dim for c in c_grid]
    chosen: dict[str, tuple[Any, float, dict[float, float]]] = {}
    for name in preprocessings:
        prep = preprocessing(name, train_x)
        chosen[name] = (prep, *select_c(prep(train_x), train_y, classes, scaled_grid, folds, seed, cv_limit))
    name = max(preprocessings, key=lambda n: chosen[n][2][chosen[n][1]])  # ties: the first listed
    prep, c, _ = chosen[name]
    path = SvmPath(prep(train_x), train_y, classes)
    weights = path.feature_weights(path.fit(c))
    accuracy = float((decision_scores(prep(test_x), weights).argmax(1).numpy() == test_y).mean())
    cv = {n: {f"{k * dim:.3g}": v for k, v in sorted(chosen[n][2].items())} for n in preprocessings}
    return {"accuracy": accuracy, "error": 1 - accuracy, "preprocessing": name, "C": c, "c": round(c * dim, 6),
            "cv_accuracy": cv, "train": len(train_y), "test": len(test_y), "lbfgs_iterations": path.iterations[-1],
            "seconds": round(time.perf_counter() - started, 2)}


# --- the protocol --------------------------------------------------------------------------------
def labelled_subsets(labels: np.ndarray, n_labels: int, n_subsets: int, seed: int) -> list[np.ndarray]:
    """`n_subsets` class-balanced random subsets of `n_labels` indices into `labels`, seeded.

    Each class gets n_labels // classes; the remainder goes to randomly chosen classes.
    """
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == k) for k in classes]
    subsets = []
    for i in range(n_subsets):
        rng = np.random.default_rng([seed, i])
        counts = np.full(len(classes), n_labels // len(classes))
        counts[rng.choice(len(classes), n_labels % len(classes), replace=False)] += 1
        if any(c > len(members) for c, members in zip(counts, by_class, strict=True)):
            raise EvalError(f"{n_labels} labels ask for more examples of a class than the training set has")
        picked = [rng.choice(members, c, replace=False) for c, members in zip(counts, by_class, strict=True)]
        subsets.append(np.sort(np.concatenate(picked)))
    return subsets


@dataclass
class FeatureEvalOptions:
    labels: int = 1000
    subsets: int = 10
    train_limit: int = 10_000  # 0: all 60,000 Fashion-MNIST training images for the all-labels row
    test_limit: int = 0  # 0: all 10,000 Fashion-MNIST test images; else a seeded random subset (quick runs)
    mnist_train: int = 8000  # of the package's 10,000 digits; the rest are the test set
    folds: int = 3
    cv_limit: int = 0  # C is chosen on at most this many training rows (0: all, the size of the final fit)
    c_grid: tuple[float, ...] = C_GRID
    seed: int = 0
    random_seeds: int = 3  # random-D baselines, initialised from seed, seed + 1, ...
    bn_images: int = 10_000  # real training images D's BatchNorm statistics are recomputed on (0: D's own)
    batch_size: int = 500
    sources: tuple[str, ...] = ("trained D", "random D", "raw pixels")
    fashion_root: str | None = None
    mnist_root: str | None = None


@dataclass
class _Data:
    fashion_train: LabelledImages
    fashion_test: LabelledImages
    mnist_train: LabelledImages
    mnist_test: LabelledImages
    full_index: np.ndarray
    subsets: list[np.ndarray]
    needed: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.needed = np.unique(np.concatenate([self.full_index, *self.subsets]))


def _random_subset(n: int, limit: int, seed: int) -> np.ndarray:
    if not limit or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _load_data(resolution: int, channels: int, opts: FeatureEvalOptions) -> _Data:
    mnist_train, mnist_test = load_mnist_split(resolution, channels, opts.mnist_train, opts.seed, opts.mnist_root)
    train = load_fashion_mnist("train", resolution, channels, opts.fashion_root)
    test = load_fashion_mnist("test", resolution, channels, opts.fashion_root)
    test = test.subset(_random_subset(len(test), opts.test_limit, opts.seed))
    full = _random_subset(len(train), opts.train_limit, opts.seed)
    subsets = labelled_subsets(train.labels, opts.labels, opts.subsets, opts.seed) if opts.subsets else []
    return _Data(train, test, mnist_train, mnist_test, full, subsets)


def _evaluate_source(extract: Callable[[np.ndarray], np.ndarray], data: _Data, opts: FeatureEvalOptions,
                     log: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    # features only of the training images some task uses; position of image i in `pool`: where[i]
    pool = extract(data.fashion_train.images[data.needed])
    where = np.full(len(data.fashion_train), -1)
    where[data.needed] = np.arange(len(data.needed))
    test = extract(data.fashion_test.images)
    extract_s = time.perf_counter() - started
    classes = 10
    result: dict[str, Any] = {"dim": int(pool.shape[1])}

    result["fashion_all"] = train_and_test(
        pool[where[data.full_index]], data.fashion_train.labels[data.full_index], test, data.fashion_test.labels,
        classes, opts.c_grid, opts.folds, opts.seed, opts.cv_limit)
    log(f"  fashion, {len(data.full_index)} labels: {result['fashion_all']['accuracy']:.4f}")

    runs = []
    for i, subset in enumerate(data.subsets):
        runs.append(train_and_test(pool[where[subset]], data.fashion_train.labels[subset], test,
                                   data.fashion_test.labels, classes, opts.c_grid, opts.folds, opts.seed + i))
    if runs:
        accs = np.array([r["accuracy"] for r in runs])
        std = float(accs.std(ddof=1)) if len(accs) > 1 else 0.0
        result["fashion_labels"] = {"accuracy": float(accs.mean()), "accuracy_std": std,
                                    "error": float(1 - accs.mean()), "runs": runs, "labels": opts.labels}
        log(f"  fashion, {opts.labels} labels x {len(runs)}: {accs.mean():.4f} +- {std:.4f}")

    started_mnist = time.perf_counter()
    mnist_train, mnist_test = extract(data.mnist_train.images), extract(data.mnist_test.images)
    extract_s += time.perf_counter() - started_mnist
    result["mnist_transfer"] = train_and_test(mnist_train, data.mnist_train.labels, mnist_test,
                                              data.mnist_test.labels, classes, opts.c_grid, opts.folds, opts.seed,
                                              opts.cv_limit)
    log(f"  MNIST transfer: {result['mnist_transfer']['accuracy']:.4f}")
    result["extract_s"] = round(extract_s, 1)
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


def run_feature_eval(opts: FeatureEvalOptions, resolution: int, channels: int, *, trained: nn.Module | None = None,
                     random_d: Callable[[], nn.Module] | None = None, checkpoint: str | Path | None = None,
                     ndf: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The table's numbers for each source in `opts.sources`, on images at `resolution` and `channels`.

    `trained`: the trained D (the "trained D" row); `random_d`: builds a freshly initialised D of
    the same architecture (the "random D" row), called under torch.manual_seed(opts.seed) in a
    forked RNG, so the baseline follows the protocol's seed. `checkpoint` and `ndf` are recorded
    in the report.
    """
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = _load_data(resolution, channels, opts)
    real = data.fashion_train.images[_random_subset(len(data.fashion_train), opts.bn_images, opts.seed + 1)] \
        if opts.bn_images else None

    def d_features(net: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
        net = recalibrated(net, real, opts.batch_size, device) if real is not None else net
        return lambda p: discriminator_features(net, p, opts.batch_size, device)

    extractors: dict[str, list[Callable[[np.ndarray], np.ndarray]]] = {"raw pixels": [pixel_features]}
    if trained is not None:
        extractors["trained D"] = [d_features(trained)]
    if random_d is not None:
        extractors["random D"] = []
        for k in range(opts.random_seeds):
            with torch.random.fork_rng():
                torch.manual_seed(opts.seed + k)
                extractors["random D"].append(d_features(random_d()))
    unknown = set(opts.sources) - set(extractors)
    if unknown:
        raise EvalError(f"feature sources {sorted(unknown)} unavailable (a trained D needs a checkpoint)")

    report: dict[str, Any] = {
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "model": {"resolution": resolution, "channels": channels, "ndf": ndf},
        "protocol": {**{k: v for k, v in asdict(opts).items() if k not in ("fashion_root", "mnist_root")},
                     "fashion_train_used": len(data.full_index), "fashion_test_used": len(data.fashion_test),
                     "mnist_test": len(data.mnist_test), "grid": GRID,
                     "c": "c_grid / feature dimension, chosen by stratified k-fold CV on training labels, "
                          "the grid widened past an end the CV picks",
                     "preprocessing": "standardised or scaled (one RMS scale), chosen with C by the same CV; "
                                      "fitted on each task's training rows",
                     "batchnorm": f"D's statistics recomputed on {len(real):,} real training images"
                                  if real is not None else "D's own running statistics"},
        "sources": {},
    }
    for name in opts.sources:
        runs = []
        for k, extract in enumerate(extractors[name]):
            log(f"{name}:" if len(extractors[name]) == 1 else f"{name}, seed {opts.seed + k}:")
            runs.append(_evaluate_source(extract, data, opts, log))
        report["sources"][name] = runs[0] if len(runs) == 1 else across_seeds(runs)
    report["total_s"] = round(time.perf_counter() - started, 1)
    return report


def across_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One source's results over several initialisations: each task's mean and std over the seeds
    (for the few-label task, over the seeds' means), the runs kept under "seeds"."""
    result: dict[str, Any] = {"dim": runs[0]["dim"], "seeds": runs}
    for task in ("fashion_all", "fashion_labels", "mnist_transfer"):
        if task in runs[0]:
            accs = np.array([r[task]["accuracy"] for r in runs])
            result[task] = {"accuracy": float(accs.mean()), "accuracy_std": float(accs.std(ddof=1)),
                            "error": float(1 - accs.mean()), "over": f"{len(runs)} seeds"}
    result["extract_s"] = round(sum(r["extract_s"] for r in runs), 1)
    result["total_s"] = round(sum(r["total_s"] for r in runs), 1)
    return result


def _percent(x: float) -> str:
    return f"{100 * x:.2f}"


def _cell(task: dict[str, Any]) -> str:
    spread = f" ± {_percent(task['accuracy_std'])}" if "accuracy_std" in task else ""
    return f"{_percent(task['accuracy'])}{spread} % ({_percent(task['error'])} % err)"


def markdown_table(report: dict[str, Any]) -> str:
    protocol = report["protocol"]
    columns = [f"Fashion-MNIST, {protocol['fashion_train_used']:,} labels",
               f"Fashion-MNIST, {protocol['labels']:,} labels (mean ± std of {protocol['subsets']} subsets)",
               f"MNIST transfer ({protocol['mnist_train']:,} train)"]
    lines = ["| features | dim | " + " | ".join(columns) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for name, r in report["sources"].items():
        cells = [_cell(r[task]) if task in r else "-" for task in ("fashion_all", "fashion_labels", "mnist_transfer")]
        seeds = f" (mean ± std of {len(r['seeds'])} seeds)" if "seeds" in r else ""
        lines.append(f"| {name}{seeds} | {r['dim']:,} | " + " | ".join(cells) + " |")
    lines.append("")
    limit = f" (at most {protocol['cv_limit']:,} rows)" if protocol["cv_limit"] else ""
    lines.append(f"Test accuracy (error) on {protocol['fashion_test_used']:,} Fashion-MNIST and "
                 f"{protocol['mnist_test']:,} MNIST test images. Linear L2-SVM; preprocessing (standardised "
                 f"or one scale) and C = c / dim (c from {list(protocol['c_grid'])}, widened past an end when "
                 f"picked) by {protocol['folds']}-fold CV on training labels{limit}. "
                 f"{protocol.get('batchnorm', '')}. Total {report['total_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: str | Path, stem: str = "features") -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{stem}.json", out / f"{stem}.md"
    atomic_write_bytes(paths[0], json.dumps(report, indent=1).encode())
    atomic_write_bytes(paths[1], markdown_table(report).encode())
    return paths
