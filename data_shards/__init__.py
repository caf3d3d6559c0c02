"""Sources -> WebDataset shards with a manifest -> loaders that stream them to every rank."""
