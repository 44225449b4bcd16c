"""The S3 wire protocol, below everything that speaks S3: SigV4/2, aws-chunked, checksums, XML."""
