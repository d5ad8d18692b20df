"""The python-backend model of a subgrad Triton repository: subgrad's torch-free runtime inside Triton.

``subgrad package --backend python`` writes this file as ``<name>/1/model.py``, beside ``model.onnx``
and ``subgrad_runtime.py`` (a verbatim copy of ``subgrad/export/runtime.py``), so the repository needs
only onnxruntime, numpy and Pillow in the server's Python, not subgrad or torch.

Each request carries exactly one of two inputs (both ``optional`` in config.pbtxt):

* the ONNX graph's own input (same name, dtype and per-item dims as ``model.onnx``), fed unchanged;
* ``image_bytes`` (``TYPE_STRING``, dims ``[1]``): one encoded JPEG or PNG file per batch item, decoded
  and preprocessed by ``Predictor``'s code (``load_image``, ``ModelInfo.prepare``).

Triton's dynamic batcher hands ``execute`` several requests at once; the valid ones of each input kind
run as one ``session.run`` and are split back.  A request that cannot be answered (no input or both,
corrupt image bytes) gets its own INVALID_ARG error; the others in the batch are answered normally.

The stub that runs this file is an embedded Python that ignores ``PYTHONPATH``; ``subgrad serve`` names
the serving environment's site-packages in ``SUBGRAD_SITE_PACKAGES`` (os.pathsep-separated), added
before anything is imported.  In NVIDIA's containers the variable is unset and the stub's own Python is
used as is.
"""

import os
import pathlib
import site
import sys

for _entry in filter(None, os.environ.get("SUBGRAD_SITE_PACKAGES", "").split(os.pathsep)):
    site.addsitedir(_entry)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # subgrad_runtime.py beside this file

import numpy as np  # noqa: E402

if __name__ == "subgrad.export.triton_python_model":  # imported from the installed package
    from . import runtime
else:  # loaded by Triton's stub from the model folder (as a module of package "1")
    import subgrad_runtime as runtime  # noqa: E402

#: Name of the encoded-image input (the packager writes the same name into config.pbtxt).
IMAGE_INPUT = "image_bytes"


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils  # exists only inside the server's stub

        self.pb = pb_utils
        folder = pathlib.Path(args["model_repository"]) / args["model_version"]
        self.predictor = runtime.Predictor(folder / "model.onnx")
        self.input_name = self.predictor.info.input_name
        self.output_name = self.predictor.output_name

    def _error(self, message):
        return self.pb.InferenceResponse(error=self.pb.TritonError(message, self.pb.TritonError.INVALID_ARG))

    def _pixels(self, encoded):
        """uint8 NHWC pixels of a [batch, 1] array of encoded image files (runtime.ImageError if one fails)."""
        info = self.predictor.info
        images = [runtime.load_image(bytes(item), info.height, info.width) for item in encoded.reshape(-1)]
        return np.stack(images)

    def execute(self, requests):
        responses = [None] * len(requests)
        batches = {"tensor": [], "image": []}  # kind -> [(request index, model input)]
        for index, request in enumerate(requests):
            tensor = self.pb.get_input_tensor_by_name(request, self.input_name)
            encoded = self.pb.get_input_tensor_by_name(request, IMAGE_INPUT)
            if (tensor is None) == (encoded is None):
                responses[index] = self._error(
                    f"send exactly one of the inputs {self.input_name!r} (the model's "
                    f"tensor) and {IMAGE_INPUT!r} (encoded JPEG/PNG files)"
                )
            elif tensor is not None:
                batches["tensor"].append((index, tensor.as_numpy()))
            else:
                try:
                    pixels = self._pixels(encoded.as_numpy())
                except runtime.ImageError as exc:
                    responses[index] = self._error(f"{IMAGE_INPUT}: {exc}")
                    continue
                batches["image"].append((index, self.predictor.preprocess(pixels)))
        for entries in batches.values():
            if not entries:
                continue
            feed = np.concatenate([x for _, x in entries])
            logits = self.predictor.session.run([self.output_name], {self.input_name: feed})[0]
            start = 0
            for index, x in entries:
                part = logits[start : start + len(x)]
                start += len(x)
                responses[index] = self.pb.InferenceResponse([self.pb.Tensor(self.output_name, part)])
        return responses
