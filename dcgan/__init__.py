"""The `dcgan` command: assembles the commands each package registers (dcgan/cli.py).

It sits above every package, so it is the one place that may hand one package's objects to
another: evaluation's commands read checkpoints through the trainer's reader, passed in here.
"""
