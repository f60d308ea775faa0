"""A python-based Triton backend named ``onnxruntime``: runs ``model.onnx`` with ONNX Runtime.

The ``nvidia-pytriton`` wheel ships a real ``tritonserver`` with only the python backend.
Placed as ``<backend-directory>/onnxruntime/model.py`` (next to ``<backend-directory>/python``
with ``libtriton_python.so``, ``triton_python_backend_stub`` and
``triton_python_backend_utils.py``), this file makes Triton serve an unmodified
``platform: "onnxruntime_onnx"`` model repository, as written by ``lmserve export``: Triton maps
that platform to the backend ``onnxruntime`` and, finding no ``libtriton_onnxruntime.so`` but a
``model.py``, runs it through the python backend.

It runs inside Triton's python stub interpreter (the test venv with ``onnxruntime`` and
``numpy<2``), never in the lmserve environment: it imports nothing from lmserve.

Behaviour, as far as the tests need it, follows Triton's own ONNX Runtime backend:

- the file is ``<model>/<version>/<default_model_filename or model.onnx>``;
- inputs and outputs are bound by the names in the model configuration, outputs are cast to
  the configured data types;
- requests of the same input shapes (what Triton's dynamic batcher merges) run as one batch
  when the model has ``max_batch_size`` > 0, the rest run one by one;
- the ``intra_op_thread_count`` / ``inter_op_thread_count`` parameters set ONNX Runtime's
  thread pools (default 1 each here: tests share a small machine).
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _parameter(config, key, default):
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return int(value) if value not in (None, "") else default


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        filename = self.config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{self.name}: no ONNX file at {path}")

        options = ort.SessionOptions()
        options.intra_op_num_threads = _parameter(self.config, "intra_op_thread_count", 1)
        options.inter_op_num_threads = _parameter(self.config, "inter_op_thread_count", 1)
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )

        self.batching = int(self.config.get("max_batch_size", 0)) > 0
        self.inputs = [
            (i["name"], pb_utils.triton_string_to_numpy(i["data_type"]))
            for i in self.config["input"]
        ]
        self.outputs = [
            (o["name"], pb_utils.triton_string_to_numpy(o["data_type"]))
            for o in self.config["output"]
        ]
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n, _ in self.inputs if n not in graph_inputs]
        missing += [n for n, _ in self.outputs if n not in graph_outputs]
        if missing:
            raise pb_utils.TritonModelException(
                f"{self.name}: the ONNX graph has no tensor named {', '.join(missing)} "
                f"(inputs {sorted(graph_inputs)}, outputs {sorted(graph_outputs)})"
            )

    def execute(self, requests):
        responses = [None] * len(requests)
        feeds = []
        for index, request in enumerate(requests):
            try:
                feeds.append((index, self._feed(request)))
            except ValueError as exc:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))

        # Group requests whose inputs have the same shapes after the batch axis.
        groups = {}
        for index, feed in feeds:
            key = tuple(a.shape[1:] if self.batching else a.shape for a in feed.values())
            if not self.batching:
                key = (key, index)  # no batch axis: nothing to concatenate
            groups.setdefault(key, []).append((index, feed))

        for members in groups.values():
            try:
                results = self._run([feed for _, feed in members])
            except Exception as exc:  # ONNX Runtime's message goes back to the client
                error = pb_utils.TritonError(f"{self.name}: ONNX Runtime failed: {exc}")
                for index, _ in members:
                    responses[index] = pb_utils.InferenceResponse(error=error)
                continue
            for (index, _), outputs in zip(members, results, strict=True):
                tensors = [pb_utils.Tensor(name, value) for name, value in outputs.items()]
                responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def _feed(self, request):
        feed = {}
        for name, dtype in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"{self.name}: missing input {name!r}")
            feed[name] = np.ascontiguousarray(tensor.as_numpy(), dtype=dtype)
        return feed

    def _run(self, feeds):
        """Run the feeds as one batch; return each feed's outputs, split back."""
        if len(feeds) == 1:
            merged = feeds[0]
        else:
            merged = {n: np.concatenate([f[n] for f in feeds], axis=0) for n, _ in self.inputs}
        names = [n for n, _ in self.outputs]
        values = self.session.run(names, merged)
        values = [
            np.asarray(v, dtype=dtype) for v, (_, dtype) in zip(values, self.outputs, strict=True)
        ]
        if len(feeds) == 1:
            return [dict(zip(names, values, strict=True))]
        sizes = [len(next(iter(f.values()))) for f in feeds]
        bounds = np.cumsum(sizes)[:-1]
        split = [np.split(v, bounds, axis=0) for v in values]
        return [
            {n: np.ascontiguousarray(split[k][i]) for k, n in enumerate(names)}
            for i in range(len(feeds))
        ]

    def finalize(self):
        self.session = None
