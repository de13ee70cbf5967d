"""flora on Flower (flwr 1.41, Message API): thin apps over the same core as the embedded runtime.

- ``flora.flower.server_app:app``: the ServerApp; ``FloraStrategy`` (strategy.py) drives
  ``flora.server.Server`` through Flower's four strategy hooks
- ``flora.flower.client_app:app``: the ClientApp; client.py runs ``flora.training.train_client``
  on the node's base, kept between messages by state.py
- records.py: the message schema; sim.py: ``flora run --runtime flower-sim``

Only this package imports flwr. See docs/flower.md for simulation, deployment and TLS.
"""
