"""Imported at start-up by every server process the tests launch (their ``PYTHONPATH``).

It hides scikit-learn and SciPy, which lmserve does not depend on: they are in the test
environment only because sentence-transformers (the tests' reference scores) needs them.
Where they are importable, every transformers model load imports ``sklearn.metrics`` (for
assisted generation) and ``scipy.optimize`` (for object-detection losses): 3-4 s of each
server start on this machine. Hidden, the servers import what a production install has.
"""

import sys

for _package in ("sklearn", "scipy"):
    sys.modules[_package] = None  # type: ignore[assignment]  # find_spec() is None; import fails
