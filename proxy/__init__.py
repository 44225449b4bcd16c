"""cmek-proxy: a transparent encrypting S3 sidecar with customer-managed keys."""

__version__ = "0.1.0"
