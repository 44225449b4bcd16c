"""The backend object store client: streaming, SigV4-signed S3 requests."""
