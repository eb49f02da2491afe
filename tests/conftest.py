"""Test-session set-up shared by every test folder."""

import os
import tempfile

# A developer's own tune cache (zili tune) changes block size, threads and kernel choices, and with
# them the numerics; tests start from the defaults unless a test points this elsewhere itself.
os.environ["ZILI_TUNE_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="zili-test-tune-"), "tune.json")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The start-up calibration of packed-matmul kernels (zili.layers.quant_calibration) costs seconds per
# engine and its choice depends on timing: tests get the fixed defaults unless they ask for it.
os.environ["ZILI_CALIBRATE"] = "0"
# Compiling the decode step (zili.engine.compiled_decode) costs seconds per engine; only the tests
# about it ask for it (enforce_eager=False), the rest run the eager path.
os.environ["ZILI_ENFORCE_EAGER"] = "1"
# zili's data directory (the governance database, zili.governance.db) is a fresh one per test session:
# keys a developer created in their own database must not turn on key checks in the test servers.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="zili-test-data-")
os.environ.pop("ZILI_DATABASE_URL", None)
os.environ.pop("ZILI_ADMIN_KEY", None)
