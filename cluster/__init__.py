"""Places trainer workers on machines: the `dcgan` command line and, later, Ray orchestration."""
