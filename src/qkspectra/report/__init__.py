"""Rendering: the run's report (HTML, Markdown), the sweep's page, the figures and the terminal text."""
