"""flora on Flower (flwr 1.41, Message API): thin apps over the same core as the embedded runtime.

- ``flora.flower.server_app:app``: the ServerApp; it runs the core's round loop
  (``flora.engine.RunCore.play``) on ``FlowerRuntime`` (runtime.py): tasks to Messages, replies
  to results
- ``flora.flower.client_app:app``: the ClientApp; client.py runs ``flora.client.client_round``
  on the node's base, kept between messages by ``flora.node_state``
- records.py: the message schema; sim.py: ``flora run --runtime flower-sim``

Only this package imports flwr. See docs/flower.md for simulation, deployment and TLS.
"""
