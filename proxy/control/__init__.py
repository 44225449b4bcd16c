"""The control plane: policy, encryption specs, audit, lifecycle jobs, the admin API."""
