"""Where the tests find the checkout and the shared data slice, wherever a test file sits."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "dashboard" / "app.py"
#: ``shared/`` lies beside the checkout (as in CI); absent elsewhere.
SHARED_DATA = REPO.parent / "shared" / "data"
