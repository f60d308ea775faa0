"""Print the path of one of the test suite's tiny trained models, building it on first use.

Offline stand-ins for hub models in these examples (no Hugging Face hub needed):

    uv run --no-sync python examples/tiny_model.py sentiment      # sequence classification
    uv run --no-sync python examples/tiny_model.py ner            # token classification
    uv run --no-sync python examples/tiny_model.py masked_lm      # fill mask
    uv run --no-sync python examples/tiny_model.py t5             # text2text generation
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _support.tiny_models import model_path

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(model_path(sys.argv[1]))
