"""Rendering: the run's report and the sweep's page (HTML, Markdown), their figures and the terminal text.

Import from the module that does the job: ``run_page`` (a run's report), ``sweep_page`` (a sweep's),
``plots``, ``evidence_plot`` (the evidence at a glance) and ``sweep_plots``
(figures, matplotlib), ``text`` (the terminal report), ``readers``
(the analysis document), ``sections``, ``typeset``, ``layout`` and ``files`` beneath them.
"""
