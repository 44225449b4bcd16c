"""Objects without an envelope on an encrypted path: legacy plaintext, or ciphertext whose
envelope went missing (which is never served as plaintext)."""

from __future__ import annotations

from collections.abc import Mapping

from proxy import crypto
from proxy.backend.client import BackendClient, parse_error
from proxy.errors import FormatError, S3Error
from proxy.layer.bodies import read_prefix
from proxy.layer.decision import KeyPolicy
from proxy.layer.envelopes import EnvelopeStore
from proxy.layer.ranges import http_time
from proxy.metrics import Metrics


class LegacyChecks:
    """The legacy-plaintext decisions of ``ObjectLayer``."""

    backend: BackendClient
    policy: KeyPolicy
    metrics: Metrics
    envelopes: EnvelopeStore

    def _expected_encrypted(self, bucket: str, key: str, stored: Mapping[str, str]) -> bool:
        """Whether the policy expects this stored object (its response headers) encrypted."""
        modified = http_time(stored.get("last-modified", ""))
        return self.policy.may_be_encrypted(bucket, key, modified, stored)

    async def _check_legacy(
        self,
        bucket: str,
        key: str,
        stored_size: int,
        stored: Mapping[str, str],
        query: tuple[tuple[str, str], ...] = (),
    ) -> bool:
        """May an object without an envelope be served as stored? True if it is legacy.

        Returns whether the policy expected this object encrypted (a legacy plaintext
        object), raising when it must not be served: strict mode refuses legacy objects, and
        on an encrypted path a body that may be v1 ciphertext is never served as plaintext,
        whichever envelope store: its envelope went missing (a backend that dropped the
        metadata, a sidecar lost or not yet written), and serving it as stored would be
        silent corruption. With sidecar envelopes every size a v1 body can have is refused
        (a sidecar can be written just after its object); with metadata envelopes the first
        stored segment's header is looked at too (one small extra GET for such objects).
        """
        if not self._expected_encrypted(bucket, key, stored):
            if not self.policy.decide(bucket, key, stored).encrypt:
                return False  # a passthrough path: not legacy
            # Older than the moment encryption took effect on its path: legacy plaintext.
            if self.policy.strict:
                raise _strict_refusal()
            return True
        if self.policy.strict:
            raise _strict_refusal()
        try:
            crypto.plaintext_size(stored_size)
        except FormatError:
            return True  # cannot be ours: stored as sent
        if self.envelopes.kind == "sidecar" or crypto.looks_like_v1(
            await self._first_bytes(bucket, key, stored, query), stored_size
        ):
            self.metrics.integrity_failures.inc()
            raise missing_envelope()
        return True

    async def _first_bytes(
        self, bucket: str, key: str, stored: Mapping[str, str], query: tuple[tuple[str, str], ...]
    ) -> bytes:
        """The first stored segment header of the object version whose headers are ``stored``."""
        hdrs = {"range": f"bytes=0-{crypto.HEADER_SIZE - 1}"}
        if stored.get("etag"):
            hdrs["if-match"] = stored["etag"]
        resp = await self.backend.request("GET", bucket, key, query=query, headers=hdrs)
        try:
            if resp.status == 412:
                raise S3Error(
                    "InternalError", "the object changed while it was read; try again", 500
                )
            if resp.status not in (200, 206):
                raise parse_error(resp.status, await resp.read())
            return await read_prefix(resp, crypto.HEADER_SIZE)
        finally:
            resp.close()


def missing_envelope() -> S3Error:
    return S3Error(
        "InternalError",
        "the envelope of this object is missing: its body is stored as cmek-proxy ciphertext "
        "but no envelope was found (metadata stripped, or sidecar lost); it is not served",
        500,
    )


def _strict_refusal() -> S3Error:
    return S3Error(
        "AccessDenied",
        "strict mode: this object is stored unencrypted on a path that requires encryption",
        403,
    )
