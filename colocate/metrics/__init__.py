"""Prometheus metrics for a device and its services.

samples.py and rejections.py are plain Python, used by the service and supervisor
processes; catalog.py, exporter.py and endpoint.py turn samples into Prometheus
series and are the only modules that import prometheus_client.
"""
