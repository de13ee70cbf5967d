"""Differential privacy: sample-level DP-SGD on every client (opacus), client-level DP for the
averaging methods, and the accountant that turns either into (epsilon, delta).

Kept import-light: ``flora.config`` reads :mod:`flora.privacy.config` without loading torch or
opacus. The modules:

- ``config``: the ``[privacy]`` section (:class:`PrivacyConfig`), pure settings;
- ``accounting``: noise for a target epsilon and epsilon spent, through opacus' accountants;
- ``dp_sgd``: per-example clipping and Gaussian noise in a client's local training (opacus'
  ``GradSampleModule`` and ``DPOptimizer`` on the injected LoRA), and Poisson batches;
- ``client_level``: DP-FedAvg's pieces, the client's clipped update and the server's noise.
"""
