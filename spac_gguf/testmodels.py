"""Moved to `spac_gguf.testing.models`. This alias is kept only while tests/test_gpu.py (run on the
GPU machine) still imports `spac_gguf.testmodels`; delete it once that import is switched."""
from .testing.models import *  # noqa: F403 - the moved module's public names, unchanged
