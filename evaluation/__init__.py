"""The paper's evaluations of a trained DCGAN, apart from training: samples and image grids (images),
D's features + a linear L2-SVM (features), FID / KID (fid), latent walks and vector arithmetic
(latent), the labelled image sets they read (datasets), and the `dcgan sample` / `dcgan eval`
commands (commands).

The library modules take nets, latent codes and plain values and never import `trainer`, so
trainer/ can use them while it trains (sample grids, FID); only `commands` reads checkpoints
through trainer/.
"""
