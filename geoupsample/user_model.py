"""The user's own trained segmentation model: an ONNX file or a TorchScript archive.

:class:`SegmentationModel` runs a batch ``[B, C, H, W]`` float32 through the model and returns
its output ``[B, K, H / r, W / r]`` (``r`` the model's output stride: 1 for a full-resolution
segmentation head, 4 for SegFormer-like heads). What the model takes is read from it where it
says (an ONNX graph's input and output shapes: fixed or dynamic sizes, a fixed batch) and
otherwise found by running it once on a small input (:meth:`SegmentationModel.probe`).

Nothing is unpickled: ONNX is a protobuf graph, TorchScript an archive of code and tensors that
``torch.jit.load`` reads without running Python pickles of arbitrary classes. A full pickled
PyTorch model (``torch.save(model)``) or a bare weights file is refused with the way to export
it.

A model travels to dask.distributed workers as its file's bytes (pickling the runtime session
is impossible); each process builds its session or module once, on first use, with as many
threads as torch uses there.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from geoupsample.inputs import InputError

#: How to export a model this module can run (said when a file is something else).
EXPORT_HINT = (
    "export the model with torch.onnx.export(model, example, 'model.onnx', dynamo=False, "
    "dynamic_axes={'input': {0: 'batch', 2: 'height', 3: 'width'}}) or "
    "torch.jit.script(model).save('model.pt') (or torch.jit.trace), and pass that file"
)
#: Formats :func:`load_model` reads.
FORMATS = ("onnx", "torchscript")


@dataclass(frozen=True)
class ModelSignature:
    """What a model says it takes and gives (``None``: not fixed, or not said).

    Attributes:
        bands: input channels ``C``.
        input_size: fixed ``(H, W)`` of the input, or None for any size.
        batch: a fixed batch size (ONNX graphs exported with batch 1), or None.
        classes: output channels ``K``.
        output_size: fixed ``(h, w)`` of the output.
    """

    bands: int | None = None
    input_size: tuple[int, int] | None = None
    batch: int | None = None
    classes: int | None = None
    output_size: tuple[int, int] | None = None

    @property
    def stride(self) -> int | None:
        """Input pixels per output pixel along each axis, when both sizes are fixed."""
        if self.input_size is None or self.output_size is None:
            return None
        ry = self.input_size[0] / self.output_size[0]
        rx = self.input_size[1] / self.output_size[1]
        if ry != rx or ry != int(ry) or ry < 1:
            raise InputError(f"the model maps {self.input_size} pixels to {self.output_size}: "
                             "its output must be its input's grid, or that grid coarsened by a "
                             "whole number along both axes")
        return int(ry)


def _fixed(dim: Any) -> int | None:
    return int(dim) if isinstance(dim, (int, np.integer)) and dim > 0 else None


def detect_format(data: bytes, name: str) -> str:
    """``"onnx"`` or ``"torchscript"`` for a model file's bytes; :class:`InputError` for a
    pickled PyTorch model, a weights file or anything else (saying how to export one)."""
    if data[:2] == b"PK":  # a zip archive: TorchScript, or torch.save's format
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except zipfile.BadZipFile:
            names = []
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            raise InputError(
                f"{name} is a pickled PyTorch object (torch.save of a model or of its state "
                "dict), which this tool does not unpickle: loading it would run arbitrary code "
                f"and needs the model's Python class; {EXPORT_HINT}")
        raise InputError(f"{name} is a zip archive but not a TorchScript model; {EXPORT_HINT}")
    if data[:1] == b"\x80":  # pickle protocol 2+: torch.save's legacy format
        raise InputError(f"{name} is a Python pickle (a legacy torch.save file), which this tool "
                         f"does not unpickle; {EXPORT_HINT}")
    if len(data) > 8 and data[8:9] == b"{":  # safetensors: u64 header length, then JSON
        raise InputError(f"{name} is a safetensors weights file, not a model; {EXPORT_HINT}")
    return "onnx"


class SegmentationModel:
    """A loaded ONNX or TorchScript model (see the module docstring).

    Attributes:
        name: the file's name (for messages and tags).
        format: ``"onnx"`` or ``"torchscript"``.
        digest: a digest of the file's bytes (resume journals).
        signature: what the model says it takes (:class:`ModelSignature`).
        device: ``"cpu"`` or a CUDA device (ONNX: the CUDA execution provider where
            onnxruntime has it, else the CPU).
    """

    def __init__(self, data: bytes, name: str, device: str | None = None) -> None:
        self.name = name
        self.format = detect_format(data, name)
        self.digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        self.device = _device(device)
        self._data = data
        self._runtime: Any = None
        self._lock = threading.Lock()
        self.signature = self._read_signature()

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | None = None) -> SegmentationModel:
        """Read and check a model file; :class:`InputError` if it does not exist or is not an
        ONNX or TorchScript model."""
        p = os.fspath(path)
        if not os.path.exists(p):
            raise InputError(f"model file {p} not found; pass the path of an ONNX (.onnx) or "
                             "TorchScript (.pt) model")
        if os.path.isdir(p):
            raise InputError(f"{p} is a folder; pass the model file itself (.onnx or .pt)")
        with open(p, "rb") as f:
            data = f.read()
        return cls(data, os.path.basename(p), device)

    # --- pickling: the bytes travel, the runtime is rebuilt ---------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runtime"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        s = self.signature
        size = "any size" if s.input_size is None else f"{s.input_size[0]}x{s.input_size[1]}"
        return (f"SegmentationModel({self.name}, {self.format}, {s.bands} bands in, {size}, "
                f"{s.classes} classes out, device={self.device})")

    # --- the runtime ---------------------------------------------------------------------
    def runtime(self) -> Any:
        """The onnxruntime session or TorchScript module, built once per process."""
        if self._runtime is None:
            with self._lock:
                if self._runtime is None:
                    self._runtime = self._build()
        return self._runtime

    def _build(self) -> Any:
        if self.format == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = max(1, torch.get_num_threads())
            options.inter_op_num_threads = 1
            providers = ["CPUExecutionProvider"]
            if self.device.startswith("cuda") and (
                    "CUDAExecutionProvider" in ort.get_available_providers()):
                providers.insert(0, "CUDAExecutionProvider")
            try:
                return ort.InferenceSession(self._data, options, providers=providers)
            except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types
                raise InputError(f"{self.name} is not an ONNX or TorchScript model (onnxruntime: "
                                 f"{str(err).strip()[:300]}); {EXPORT_HINT}") from None
        try:
            with warnings.catch_warnings():  # torch 2.9+ says TorchScript is deprecated
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(io.BytesIO(self._data), map_location=self.device)
        except Exception as err:  # noqa: BLE001 - any failure means an unreadable archive
            raise InputError(f"{self.name} could not be read as a TorchScript model ({err}); "
                             f"{EXPORT_HINT}") from None
        return module.eval()

    def _read_signature(self) -> ModelSignature:
        if self.format != "onnx":
            self.runtime()  # reads the archive: a broken one fails here, not at the first tile
            return ModelSignature()
        session = self.runtime()
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1:
            raise InputError(f"{self.name} takes {len(inputs)} inputs; a segmentation model "
                             "takes one image batch [batch, bands, height, width]")
        shape_in, shape_out = list(inputs[0].shape), list(outputs[0].shape)
        if len(shape_in) != 4 or len(shape_out) != 4:
            raise InputError(f"{self.name} maps {shape_in} to {shape_out}; a segmentation model "
                             "maps [batch, bands, height, width] to [batch, classes, height, "
                             "width]")
        if "float" not in inputs[0].type or "16" in inputs[0].type:
            raise InputError(f"{self.name} takes {inputs[0].type}; export it with a float32 "
                             "input")
        size_in = (_fixed(shape_in[2]), _fixed(shape_in[3]))
        size_out = (_fixed(shape_out[2]), _fixed(shape_out[3]))
        return ModelSignature(
            bands=_fixed(shape_in[1]),
            input_size=size_in if None not in size_in else None,  # type: ignore[arg-type]
            batch=_fixed(shape_in[0]),
            classes=_fixed(shape_out[1]),
            output_size=size_out if None not in size_out else None,  # type: ignore[arg-type]
        )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """``[B, C, H, W]`` float32 -> the model's output ``[B, K, h, w]`` float32."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if self.format == "onnx":
            session = self.runtime()
            name = session.get_inputs()[0].name
            out = session.run(None, {name: x})[0]
        else:
            module = self.runtime()
            with torch.inference_mode():
                out = module(torch.from_numpy(x).to(self.device))
            if isinstance(out, (tuple, list)):
                out = out[0]
            elif isinstance(out, dict):  # e.g. torchvision segmentation models: {"out": ...}
                out = out.get("out", next(iter(out.values())))
            out = out.detach().float().cpu().numpy()
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != 4 or out.shape[0] != x.shape[0]:
            raise InputError(f"{self.name} returned an array of shape {out.shape} for an input "
                             f"of {x.shape}; a segmentation model returns [batch, classes, "
                             "height, width]")
        return out

    def probe(self, bands: int, size: tuple[int, int]) -> tuple[int, int]:
        """Run the model once on zeros ``[1, bands, *size]``: ``(classes, output stride)``.

        Raises :class:`InputError` saying what the model takes when it refuses the input (a
        band count other than its own, a size it cannot take)."""
        s = self.signature
        if s.bands is not None and s.bands != bands:
            raise InputError(f"{self.name} takes {s.bands} bands but {bands} were chosen: give "
                             f"--bands with {s.bands} of the scene's bands, in the order the model "
                             "was trained on")
        try:
            out = self(np.zeros((s.batch or 1, bands, *size), np.float32))
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001 - the runtimes raise their own types
            text = str(err).strip().splitlines()
            detail = text[-1][:300] if text else type(err).__name__
            raise InputError(
                f"{self.name} refused a {bands}-band {size[0]}x{size[1]} input ({detail}): "
                "check that --bands gives the bands it was trained on, and --input-size (a "
                "size it takes)") from None
        h, w = out.shape[2:]
        if size[0] % h or size[1] % w or size[0] // h != size[1] // w:
            raise InputError(f"{self.name} maps a {size[0]}x{size[1]} input to {h}x{w}: its "
                             "output must be its input's grid, or that grid coarsened by a whole "
                             "number along both axes")
        return int(out.shape[1]), size[0] // h


def _device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(torch.device(device))


def load_model(path: str | os.PathLike[str] | SegmentationModel,
               device: str | None = None) -> SegmentationModel:
    """A :class:`SegmentationModel` from a path (or the model itself)."""
    if isinstance(path, SegmentationModel):
        return path
    return SegmentationModel.load(path, device)
