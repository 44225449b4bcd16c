"""S3 operation names, as S3 names them, from the method, the path's shape and subresources.

Used as the bounded ``operation`` label of the request metrics and in the access log, for
the requests clients send and for those the proxy sends to its backend. Bucket and key
names never appear: only which of them the path has.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Final

# (scope, method) -> ((subresource, name), ...) checked in order, then the default
_SUB: Final[dict[tuple[str, str], tuple[tuple[tuple[str, str], ...], str]]] = {
    ("bucket", "GET"): (
        (
            ("list-type", "ListObjectsV2"),
            ("uploads", "ListMultipartUploads"),
            ("versions", "ListObjectVersions"),
            ("location", "GetBucketLocation"),
            ("versioning", "GetBucketVersioning"),
            ("tagging", "GetBucketTagging"),
            ("cors", "GetBucketCors"),
            ("lifecycle", "GetBucketLifecycleConfiguration"),
            ("policyStatus", "GetBucketPolicyStatus"),
            ("policy", "GetBucketPolicy"),
            ("acl", "GetBucketAcl"),
            ("encryption", "GetBucketEncryption"),
            ("ownershipControls", "GetBucketOwnershipControls"),
            ("publicAccessBlock", "GetPublicAccessBlock"),
            ("logging", "GetBucketLogging"),
            ("notification", "GetBucketNotificationConfiguration"),
            ("accelerate", "GetBucketAccelerateConfiguration"),
            ("requestPayment", "GetBucketRequestPayment"),
            ("website", "GetBucketWebsite"),
            ("object-lock", "GetObjectLockConfiguration"),
            ("replication", "GetBucketReplication"),
        ),
        "ListObjects",
    ),
    ("bucket", "PUT"): (
        (
            ("versioning", "PutBucketVersioning"),
            ("tagging", "PutBucketTagging"),
            ("cors", "PutBucketCors"),
            ("lifecycle", "PutBucketLifecycleConfiguration"),
            ("policy", "PutBucketPolicy"),
            ("acl", "PutBucketAcl"),
            ("encryption", "PutBucketEncryption"),
            ("ownershipControls", "PutBucketOwnershipControls"),
            ("publicAccessBlock", "PutPublicAccessBlock"),
            ("logging", "PutBucketLogging"),
            ("notification", "PutBucketNotificationConfiguration"),
            ("accelerate", "PutBucketAccelerateConfiguration"),
            ("requestPayment", "PutBucketRequestPayment"),
            ("website", "PutBucketWebsite"),
            ("object-lock", "PutObjectLockConfiguration"),
            ("replication", "PutBucketReplication"),
        ),
        "CreateBucket",
    ),
    ("bucket", "DELETE"): (
        (
            ("tagging", "DeleteBucketTagging"),
            ("cors", "DeleteBucketCors"),
            ("lifecycle", "DeleteBucketLifecycle"),
            ("policy", "DeleteBucketPolicy"),
            ("encryption", "DeleteBucketEncryption"),
            ("ownershipControls", "DeleteBucketOwnershipControls"),
            ("publicAccessBlock", "DeletePublicAccessBlock"),
            ("website", "DeleteBucketWebsite"),
            ("replication", "DeleteBucketReplication"),
        ),
        "DeleteBucket",
    ),
    ("bucket", "HEAD"): ((), "HeadBucket"),
    ("bucket", "POST"): ((("delete", "DeleteObjects"),), "PostObject"),
    ("object", "GET"): (
        (
            ("uploadId", "ListParts"),
            ("tagging", "GetObjectTagging"),
            ("acl", "GetObjectAcl"),
            ("attributes", "GetObjectAttributes"),
            ("retention", "GetObjectRetention"),
            ("legal-hold", "GetObjectLegalHold"),
            ("torrent", "GetObjectTorrent"),
        ),
        "GetObject",
    ),
    ("object", "HEAD"): ((), "HeadObject"),
    ("object", "PUT"): (
        (
            ("tagging", "PutObjectTagging"),
            ("acl", "PutObjectAcl"),
            ("retention", "PutObjectRetention"),
            ("legal-hold", "PutObjectLegalHold"),
        ),
        "PutObject",
    ),
    ("object", "DELETE"): (
        (("uploadId", "AbortMultipartUpload"), ("tagging", "DeleteObjectTagging")),
        "DeleteObject",
    ),
    ("object", "POST"): (
        (
            ("uploads", "CreateMultipartUpload"),
            ("uploadId", "CompleteMultipartUpload"),
            ("restore", "RestoreObject"),
            ("select", "SelectObjectContent"),
        ),
        "UnknownObjectPost",
    ),
}


def operation_name(
    method: str,
    *,
    bucket: bool,
    key: bool,
    query: Collection[str],
    headers: Mapping[str, str] | None = None,
) -> str:
    """The S3 name of a request: ``method``, whether the path names a bucket and a key,
    the query's parameter names, and (for copies) the headers."""
    method = method.upper()
    if not bucket:
        return "ListBuckets" if method == "GET" else "UnknownServiceOperation"
    copy = headers is not None and "x-amz-copy-source" in headers
    if key and method == "PUT" and "partNumber" in query and "uploadId" in query:
        return "UploadPartCopy" if copy else "UploadPart"
    rules = _SUB.get(("object" if key else "bucket", method))
    if rules is None:
        return "UnknownOperation"
    subresources, default = rules
    for sub, name in subresources:
        if sub in query:
            return name
    if key and method == "PUT" and copy:
        return "CopyObject"
    return default
