"""DCGAN training: configuration (config), models, precision, the GAN step (step) and loop (loop),
DeepSpeed engines (engines) and the compiled step (compiled), checkpoints (checkpoint,
checkpoint_io, checkpoint_nets) and a rank's RNG and loss-scaler state (rank_state), metrics
(metrics, telemetry) and FID during training (quality)."""
