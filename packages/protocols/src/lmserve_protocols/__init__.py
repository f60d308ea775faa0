"""Wire schemas of lmserve: pydantic models only, no behaviour.

- :mod:`lmserve_protocols.v1`     KServe V1 (``:predict``)
- :mod:`lmserve_protocols.v2`     Open Inference Protocol V2 (REST JSON)
- :mod:`lmserve_protocols.openai` OpenAI Embeddings and model listing
"""

__version__ = "0.1.0"
