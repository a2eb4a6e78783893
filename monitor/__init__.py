"""The monitor peer (Prometheus exporter, Grafana dashboard): not built yet, see the issue tracker (issue 3).
It will read the trainers' progress records defined in ``swarm.records``."""
