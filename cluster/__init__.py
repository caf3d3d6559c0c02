"""Runs training on machines: `dcgan train` on a Ray worker group or torchrun ranks, `dcgan monitor`
(Prometheus for the runs), and `cli`, the `dcgan` command that assembles every package's commands."""
