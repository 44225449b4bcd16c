"""The S3 front end: request authentication, body decoding, checksums, handlers."""
