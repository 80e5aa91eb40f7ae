"""Specs: the YAML files a user writes (sweeps and ablations, robust searches, leaderboards),
loaded and validated once at the edge, and the input checks the CLI and the API share."""
