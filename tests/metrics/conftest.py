"""The deployment tests' Ray session, shared rather than started twice."""
from tests.deployment.conftest import ray_session  # noqa: F401
