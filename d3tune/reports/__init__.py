"""Reports: one rendering layer (tables, figures, self-contained HTML) for sweeps and ablations,
robust searches and leaderboards."""
