"""Workflows: ``run`` (one model into one folder), ``sweep`` (many models) and the Dask cluster they use."""
