"""DCGAN training: configuration, models, the GAN step and loop, engines, checkpoints, metrics."""
