"""The functional test: the model run with every head's QK operator replaced by its reconstruction.

``layers`` (the model's own query/key layers and factors), ``targets`` (reconstruction targets,
numpy only), ``writing`` (targets written back as weights), ``divergence`` (KL and entropy of a
changed attention call), ``passes`` (the forward passes) and ``evidence`` (the entry points).
Importers name the module they need (``targets`` stays free of torch). See docs/method/functional_test.md.
"""
