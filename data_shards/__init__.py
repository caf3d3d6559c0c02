"""Sources -> WebDataset shards with a manifest -> loaders that stream them to every rank, and the
`dcgan data` commands (convert, dedup, sample-lsun, verify)."""
