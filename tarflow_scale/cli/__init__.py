"""Console scripts: each parses arguments, assembles a config and calls one library function."""
