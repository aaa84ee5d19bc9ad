from tests.deployment.conftest import ray_session  # noqa: F401  (the shared Ray)
