"""Key lifecycle jobs: ``verify``, ``rewrap``, ``encrypt-existing``, ``inventory``, and
``gc`` of the proxy's own state (see each module)."""

from proxy.control.jobs.common import JobContext, JobOptions, JobProgress
from proxy.control.jobs.encrypt_existing import encrypt_existing
from proxy.control.jobs.gc import gc
from proxy.control.jobs.inventory import inventory
from proxy.control.jobs.rewrap import rewrap
from proxy.control.jobs.verify import verify

JOBS = {
    "verify": verify,
    "rewrap": rewrap,
    "encrypt-existing": encrypt_existing,
    "inventory": inventory,
    "gc": gc,
}

__all__ = [
    "JOBS",
    "JobContext",
    "JobOptions",
    "JobProgress",
    "encrypt_existing",
    "gc",
    "inventory",
    "rewrap",
    "verify",
]
