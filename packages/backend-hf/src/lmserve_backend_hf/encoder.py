"""The torch forward pass behind lmserve_core's EncoderBackend protocol, with LoRA adapters
(PEFT's mixed-adapter batches: each row of a batch with its request's adapter, or the base)."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lmserve_backend_hf.lora import BASE, PeftAdapters
from lmserve_core.errors import InvalidInput
from lmserve_core.lora import LoRAAdapter


class TorchEncoder:
    """Runs a transformers model on numpy inputs; returns logits or hidden states."""

    def __init__(
        self, model: Any, *, device: torch.device, output: str, lora: bool = False
    ) -> None:
        """``lora``: serve LoRA adapters (``add_adapter``), heads (``modules_to_save``) too."""
        self.model = model
        self.device = device
        self.output = output
        # Only pass what forward() accepts (DistilBERT takes no token_type_ids).
        self.accepts = set(inspect.signature(model.forward).parameters)
        self._lora = PeftAdapters(model, device=device, heads=True) if lora else None
        # The batcher's worker thread runs forward passes; adapter changes must not overlap one.
        self._lock = threading.Lock()

    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.forward_with_adapters(inputs, None)

    def forward_with_adapters(
        self, inputs: Mapping[str, np.ndarray], adapters: Sequence[LoRAAdapter | None] | None
    ) -> np.ndarray:
        """``adapters``: one per row (None: the base model), all in one forward pass."""
        tensors = {
            name: torch.from_numpy(array).to(self.device)
            for name, array in inputs.items()
            if name in self.accepts
        }
        with self._lock, torch.inference_mode():
            lora = self._lora
            if lora is not None and adapters is not None:
                keys = [BASE if a is None else lora.key(a) for a in adapters]
                lora.current = lora.row_adapters(keys)
            try:
                out = self.model(**tensors)
            finally:
                if lora is not None:
                    lora.current = None
            result = getattr(out, self.output)
            return result.float().cpu().numpy()  # type: ignore[no-any-return]

    # --- lmserve_core.lora.AdapterBackend ---------------------------------------------
    async def add_adapter(self, adapter: LoRAAdapter) -> None:
        """Read the adapter off the batcher's thread; only putting it into the model waits for
        the forward pass in flight."""
        lora = self._require_lora()
        prepared = await asyncio.to_thread(lora.prepare, adapter)

        def install() -> None:
            with self._lock:
                lora.install(prepared)

        await asyncio.to_thread(install)

    async def remove_adapter(self, adapter: LoRAAdapter) -> None:
        lora = self._require_lora()

        def remove() -> None:
            with self._lock:
                lora.remove(adapter)

        await asyncio.to_thread(remove)

    def _require_lora(self) -> PeftAdapters:
        if self._lora is None:
            raise InvalidInput("this model was started without --enable_lora", param="model")
        return self._lora

    def check_health(self) -> None:
        """An in-process model is healthy while it is loaded."""

    def close(self) -> None:
        self.model = None
