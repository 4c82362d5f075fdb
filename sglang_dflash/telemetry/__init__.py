"""Telemetry: step and acceptance statistics, Prometheus histograms, per-request records."""
