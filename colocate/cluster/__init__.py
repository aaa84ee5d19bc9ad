"""The cluster layer: supervisors, deployments, placement, status (Ray lives here)."""
