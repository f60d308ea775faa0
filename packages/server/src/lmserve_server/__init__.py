"""lmserve-server: Hugging Face models over OpenAI, KServe V1 and Open Inference Protocol V2.

Three ways in:

- the ``lmserve`` command (``lmserve serve``, ``lmserve serve-ray``, ``lmserve export``);
- :func:`build`: lmserve's routes as a sub-application of your own FastAPI app, with a
  lifespan that loads the model (see :mod:`lmserve_server.embed`)::

      lm = build(ServeSettings(model_dir="/models/sst2"))
      app = FastAPI(lifespan=lm.lifespan)      # or enter lm.lifespan() in your own lifespan
      app.mount("/lm", lm.app)

- :func:`create_app` with a :class:`ModelHost`: the FastAPI application ``lmserve serve`` runs,
  for those who manage the model's lifecycle themselves.

Names are imported on first use, so ``import lmserve_server`` (and the ``lmserve`` command's
start) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmserve_core.lazy import lazy_getattr

if TYPE_CHECKING:
    from lmserve_core.model_host import ModelHost, ModelState
    from lmserve_core.settings import Backend, ServeSettings
    from lmserve_core.tasks import Task
    from lmserve_server.app import create_app
    from lmserve_server.embed import LmserveApp, build

__all__ = [
    "Backend",
    "LmserveApp",
    "ModelHost",
    "ModelState",
    "ServeSettings",
    "Task",
    "build",
    "create_app",
]

_WHERE = {
    "Backend": "lmserve_core.settings",
    "ServeSettings": "lmserve_core.settings",
    "Task": "lmserve_core.tasks",
    "create_app": "lmserve_server.app",
    "LmserveApp": "lmserve_server.embed",
    "build": "lmserve_server.embed",
    "ModelHost": "lmserve_core.model_host",
    "ModelState": "lmserve_core.model_host",
}


__getattr__ = lazy_getattr(__name__, _WHERE)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
