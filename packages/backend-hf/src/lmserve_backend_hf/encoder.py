"""The torch forward pass behind lmserve_core's EncoderBackend protocol."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


class TorchEncoder:
    """Runs a transformers model on numpy inputs; returns logits or hidden states."""

    def __init__(self, model: Any, *, device: torch.device, output: str) -> None:
        self.model = model
        self.device = device
        self.output = output
        # Only pass what forward() accepts (DistilBERT takes no token_type_ids).
        self.accepts = set(inspect.signature(model.forward).parameters)

    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        tensors = {
            name: torch.from_numpy(array).to(self.device)
            for name, array in inputs.items()
            if name in self.accepts
        }
        with torch.inference_mode():
            out = self.model(**tensors)
            result = getattr(out, self.output)
            return result.float().cpu().numpy()  # type: ignore[no-any-return]

    def check_health(self) -> None:
        """An in-process model is healthy while it is loaded."""

    def close(self) -> None:
        self.model = None
