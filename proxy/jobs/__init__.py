"""Key lifecycle jobs: ``verify``, ``rewrap``, ``encrypt-existing`` (see each module)."""

from proxy.jobs.common import JobContext, JobOptions, JobProgress
from proxy.jobs.encrypt_existing import encrypt_existing
from proxy.jobs.rewrap import rewrap
from proxy.jobs.verify import verify

JOBS = {"verify": verify, "rewrap": rewrap, "encrypt-existing": encrypt_existing}

__all__ = [
    "JOBS",
    "JobContext",
    "JobOptions",
    "JobProgress",
    "encrypt_existing",
    "rewrap",
    "verify",
]
