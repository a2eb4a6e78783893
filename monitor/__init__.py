"""The monitor peer's Prometheus side, kept light (no transformers, no bitsandbytes).

- ``metrics``: every metric name, type and help text (the one place a dashboard takes names from).
- ``collector``: the DHT snapshot poller, monotonic counters, the scrape-time collector and the HTTP server.
- ``checkpoints``: downloads, evaluates and saves the swarm's state (imported only with ``--checkpoint-dir``: it
  needs torch and transformers).
- ``dashboard``: reads the Grafana dashboard (``grafana/``) and lists its queries, for the tests.
- ``prometheus.yml``, ``docker-compose.yml``, ``grafana/provisioning``: the set-up users copy.

The runnable role is ``peers/monitor.py`` (``swarm monitor``).
"""
