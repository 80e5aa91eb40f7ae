"""Searching on Ray Tune: the run state every Tune run shares, the one Tuner builder, sweeps and
ablations (engine), robust searches, leaderboards, and the MLflow callbacks that log them."""
