"""Benchmark harness for cmek-proxy.

Measures the backend directly, cmek-proxy in front of it, and a peer (``rclone serve s3``
over an rclone ``crypt`` remote) side by side with one async SigV4 load generator.
Entry point: ``python -m benchmarks.run``; see ``benchmarks/README.md``.
"""
