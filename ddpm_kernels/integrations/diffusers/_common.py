"""What the fused diffusers schedulers share: the stock noise draw, the stock step's output built directly, and
the base class with the backend choice, the in-kernel noise switch and the one-warning-per-cause fallback to the
stock code path."""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from ... import _native

# devices on which diffusers' randn_tensor is exactly torch.randn(shape, generator, device, dtype)
_PLAIN_RANDN_DEVICES = ("cpu", "cuda")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


# The model output dtypes the sigma-table drop-ins hand the op directly, with the float32 sigma table (the step
# computes in float32 and rounds once); others (float64) take the stock arithmetic's dtype first.
_DIRECT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _device(device) -> torch.device:
    """A cache key for a device: "cuda" and "cuda:0" (what tensors report) are the same device."""
    if type(device) is not torch.device:
        device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _randn(shape, generator, device: torch.device, dtype: torch.dtype, as_dtype=None) -> torch.Tensor:
    """diffusers' ``randn_tensor(shape, generator, device, dtype)``: the same numbers and generator state
    (then cast to ``as_dtype`` when given, the dtype the fused op takes). Its common case (no generator, or one
    generator on the tensor's device) is one ``torch.randn`` call, taken here directly to skip the helper's
    per-call Python."""
    noise = None
    if device.type in _PLAIN_RANDN_DEVICES and (generator is None or type(generator) is torch.Generator):
        try:
            noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        except RuntimeError:
            pass  # a generator of another device (refused before drawing): the helper draws where it lives
    if noise is None:
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    return noise if as_dtype is None or noise.dtype == as_dtype else noise.to(as_dtype)


def _stock_timestep(timestep) -> bool:
    """Whether the stock step refuses ``timestep`` as an integer (``isinstance(timestep, (int, torch.IntTensor,
    torch.LongTensor))``, its own test); a float tensor, what pipelines pass, is answered without the legacy
    tensor types' slow instance check."""
    if type(timestep) is torch.Tensor and timestep.is_floating_point():
        return False
    return isinstance(timestep, (int, torch.IntTensor, torch.LongTensor))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside this package (the user's
    ``step`` call), however deep inside the package it is raised."""
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
        frame, level = frame.f_back, level + 1
    return level


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _output_maker(cls):
    """A function building ``cls(**fields)`` from the field values in order, the stock step's output.

    diffusers' ``BaseOutput`` is an OrderedDict dataclass whose ``__init__`` / ``__post_init__`` (field
    introspection, overridden ``__setattr__`` / ``__setitem__``) cost more per step than the rest of the
    scheduler's Python. The same object is built here by setting its items and attributes directly; a check
    when this module loads compares it with the constructor's (type, items, attributes) and keeps the
    constructor if anything differs (another diffusers version's output class)."""
    od_new, od_setitem = OrderedDict.__new__, OrderedDict.__setitem__
    try:
        names = tuple(f.name for f in dataclasses.fields(cls))
    except TypeError:
        names = ()

    if len(names) == 1:  # (the flow step's output: a loop's setup would cost as much as the rest)
        (only,) = names

        def direct(value):
            out = od_new(cls)
            od_setitem(out, only, value)
            out.__dict__[only] = value
            return out
    else:
        def direct(*values):
            out = od_new(cls)
            attributes = out.__dict__
            for name, value in zip(names, values):
                od_setitem(out, name, value)
                attributes[name] = value
            return out

    def constructor(*values):
        return cls(**dict(zip(names, values)))

    try:
        values = tuple(torch.full((1,), float(i)) for i in range(len(names)))
        expected, got = constructor(*values), direct(*values)
        same = (
            bool(names)
            and type(got) is type(expected)
            and list(got.keys()) == list(expected.keys()) == list(names)
            and all(got[k] is expected[k] for k in expected.keys())
            and got.__dict__.keys() == expected.__dict__.keys()
            and all(got.__dict__[k] is expected.__dict__[k] for k in expected.__dict__)
            and got.to_tuple()[0] is values[0]
        )
    except Exception:  # noqa: BLE001  (any difference: keep the constructor)
        same = False
    return direct if same else constructor


class _FusedBase:
    """The fused schedulers' common switches and their fallback to the stock code path."""

    #: backend for the fused ops ("auto", "reference", "triton", "cuda", "cpu")
    fused_backend: str = "auto"
    #: let the backend generate the step noise in-kernel instead of drawing it as the stock scheduler does
    in_kernel_noise: bool = False

    _stock_name = ""  # the stock class, for messages
    _make_output = None  # builds the stock step's output dataclass from its field values in order

    # per-loop caches holding resolved serving functions (closures over compiled operators) and the noise buffer:
    # not pickled
    _dk_transient = ("_dk_lane_", "_dk_checked_", "_dk_other_", "_dk_noise_")

    def __getstate__(self):
        """The state to pickle or copy: without the per-loop caches (`_dk_transient`: the `_Lane` and the checked
        solver call with their serving functions, the same call's other server, the noise buffer), which the next
        step rebuilds through its full checks."""
        state = self.__dict__.copy()
        for key in self._dk_transient:
            state.pop(key, None)
        return state

    def __init_subclass__(cls, output=None, **kwargs):
        """A drop-in names the stock step's output class (``class Fused...(..., StockScheduler, output=...)``):
        its `_make_output` (`_output_maker`) and `_stock_name` (its last base, the stock class) follow."""
        super().__init_subclass__(**kwargs)
        if output is not None:
            cls._make_output = staticmethod(_output_maker(output))
            cls._stock_name = cls.__bases__[-1].__name__

    def _dk_warn(self, cause: str, message: str) -> None:
        """One warning per scheduler and cause: a sampling loop would otherwise repeat it every step."""
        warned = self.__dict__.setdefault("_dk_warned", set())
        if cause not in warned:
            warned.add(cause)
            warnings.warn(f"{type(self).__name__}: {message}", RuntimeWarning, stacklevel=_caller_stacklevel())

    def _dk_stock(self, cause: str, message: str) -> None:
        self._dk_warn(cause, f"{message}; this takes the stock {self._stock_name} code path")

    def _dk_inputs_ok(self, model_output, sample, min_ndim: int = 1, expected_shape=None,
                      expected: str = "the model output of the sample's shape") -> bool:
        """Whether the fused op takes ``model_output`` and ``sample`` as the stock step would: floating tensors
        on one device, the sample with at least ``min_ndim`` dims, the model output of shape
        ``expected_shape(sample)`` (default: the sample's; None: none fits). Else one warning, ``expected`` saying
        what the step takes, and the stock step runs. So does a step asked for a gradient (the model output or
        sample requires grad, grad mode on): the stock step's result keeps the autograd graph, while the fused
        steps are sampling ops, run without one."""
        if torch.is_grad_enabled() and (getattr(model_output, "requires_grad", False)
                                        or getattr(sample, "requires_grad", False)):
            self._dk_stock("grad", "the model output or the sample requires grad: the stock step keeps the autograd "
                           "graph (the fused steps run without one)")
            return False
        want = None
        if isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor) and sample.ndim >= min_ndim:
            want = sample.shape if expected_shape is None else expected_shape(sample)
            if (
                model_output.shape == want
                and model_output.device == sample.device
                and sample.is_floating_point()
                and model_output.is_floating_point()
            ):
                return True

        def shape(x):
            return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__

        self._dk_stock(
            "inputs",
            f"a model output {shape(model_output)} for a sample {shape(sample)} is not what the fused step takes "
            f"(floating tensors on one device, a sample of at least {min_ndim} dims, the model output of shape "
            f"{None if want is None else tuple(want)}: {expected})",
        )
        return False

    def _dk_output(self, result: tuple, return_dict: bool):
        """The stock step's return value: the tuple ``result``, or the output dataclass built from it."""
        return self._make_output(*result) if return_dict else result

    def _dk_randn(self, shape, generator, device: torch.device, dtype: torch.dtype, as_dtype=None) -> torch.Tensor:
        """`_randn`'s noise (the stock ``randn_tensor`` draw: the same numbers and generator state) for a fused step
        that hands it to the op and keeps no reference to it. No generator, or one ``torch.Generator`` on
        ``device``: drawn into a buffer the scheduler keeps per shape, dtype and device (``torch.randn`` is
        ``torch.empty`` then ``normal_``, the same draw), which saves the allocation and most of ``torch.randn``'s
        argument parsing (docs/design.md, "Host overhead"); else `_randn`."""
        if device.type in _PLAIN_RANDN_DEVICES and (
                generator is None or (type(generator) is torch.Generator and generator.device == device)):
            key = (shape, dtype, device)
            kept = self.__dict__.get("_dk_noise_")
            if kept is None or kept[0] != key:
                with torch.inference_mode(False):  # a normal tensor, drawn into in and out of inference mode
                    kept = self.__dict__["_dk_noise_"] = (key, torch.empty(shape, dtype=dtype, device=device))
            noise = kept[1].normal_(generator=generator)
            return noise if as_dtype is None or dtype == as_dtype else noise.to(as_dtype)
        return _randn(shape, generator, device, dtype, as_dtype)

    def _dk_kernel_generator(self, generator):
        """``(True, generator for the op)`` when the step noise is to be generated in the kernel (``in_kernel_noise``
        and no generator or a single one), else ``(False, None)``: the noise is drawn as the stock step draws it."""
        if not self.in_kernel_noise:
            return False, None
        if isinstance(generator, list):
            if len(generator) != 1 or generator[0] is None:
                return False, None
            generator = generator[0]
        return True, generator


def on_host(tensor: torch.Tensor) -> bool:
    """Whether reading ``tensor``'s values costs no device synchronization (tests replace it to prove that no
    step reads the device)."""
    return tensor.device.type == "cpu"


def tracked(owner, name: str):
    """``owner.name``, made a normal tensor first when it is an inference tensor: one created under
    ``torch.inference_mode`` (a pipeline call wrapped in it runs ``set_timesteps`` there) keeps no version
    counter, which the drop-ins' cached tables are checked against. The clone holds the same values and replaces
    the attribute, so the stock code reads it too; in-place changes to it are then seen."""
    t = getattr(owner, name, None)
    if isinstance(t, torch.Tensor) and t.is_inference():
        with torch.inference_mode(False):
            t = t.clone()
        setattr(owner, name, t)
    return t


def _host_copy(x):
    if not isinstance(x, torch.Tensor):
        return None
    return x if on_host(x) else x.detach().cpu()  # a table replaced on a device is read once


class SigmaTables:
    """The schedule of a sigma-table drop-in as the fused calls read it: the ``timesteps`` and ``sigmas`` tensors
    it was built from (and their versions), host copies of both (the timesteps also as a numpy array), the
    timesteps' storage base (``root``), why the fused step cannot take the table (``stock``, None when it can)
    and the per-device copies (``devices``). A drop-in adds its own fields in a subclass."""

    __slots__ = ("timesteps", "t_version", "sigmas", "s_version", "root", "host_timesteps", "host_array",
                 "host_sigmas", "stock", "devices")


class _Lane:
    """What the last fused step of a table-driven drop-in checked, for the next steps of its schedule
    (`_StepIndex._dk_lane`): its ``tables``, the device sigma table ``sigmas`` the op read, the step index entry
    ``index`` (``[tensor, value, batch, device]``, `_StepIndex._dk_index_tensor`), the table's step count ``last``,
    and ``server``, a drop-in's own per-lane cache (None until it sets one). ``kind``: a tensor of the operands'
    kind (shape, dtype, device; one element of storage) that the compiled check compares the next operands with
    (`_native.same_kind`), set by the first step the lane takes and reset when the operands change kind (a
    sample and model output of one dtype; None without the compiled library); ``noise``: the buffer of that kind
    the lane's steps draw into (`lane_randn`)."""

    __slots__ = ("tables", "sigmas", "index", "last", "server", "kind", "noise")


def kind_of(shape, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """A tensor of this shape, dtype and device with one element of storage, for `_native.same_kind`; None
    without the compiled library."""
    if _native.same_kind is None:
        return None
    return torch.empty((), dtype=dtype, device=device).expand(shape)


def lane_randn(scheduler, lane, generator, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scheduler._dk_randn(like.shape, generator, like.device, dtype)`` for a step a lane took, whose noise
    has the lane's kind: drawn into the buffer `_dk_randn` keeps, which the lane holds after its first draw (the
    same numbers and generator state), without the buffer's lookup."""
    noise = lane.noise
    if noise is not None and (generator is None or (type(generator) is torch.Generator
                                                    and generator.device == noise.device)):
        return noise.normal_(generator=generator)
    noise = scheduler._dk_randn(like.shape, generator, like.device, dtype)
    kept = scheduler.__dict__.get("_dk_noise_")
    if kept is not None and kept[1] is noise:
        lane.noise = noise
    return noise


class _StepIndex:
    """The sigma table and step index of a table-driven drop-in, kept without reading the device.

    The table (`_dk_tables`) is a `SigmaTables` of ``_dk_table_class``, rebuilt when ``timesteps`` or ``sigmas``
    is replaced or changed in place; ``_dk_fill_tables`` sets the drop-in's own fields. The step index is a
    Python int exactly as the stock scheduler keeps it, mirrored by an int64 (B,) tensor on the sample's device
    that the fused op reads and that is advanced there after each step. The first index comes from the host copy
    of the timesteps."""

    _dk_table_class = SigmaTables

    def _dk_tables(self) -> SigmaTables:
        tables = self.__dict__.get("_dk_tables_")
        ts, sg = tracked(self, "timesteps"), tracked(self, "sigmas")
        if (
            tables is None
            or tables.timesteps is not ts
            or tables.sigmas is not sg
            or tables.t_version != getattr(ts, "_version", None)
            or tables.s_version != getattr(sg, "_version", None)
        ):
            tables = self._dk_new_tables(_host_copy(ts), _host_copy(sg))
        return tables

    def _dk_fused_tables(self) -> Optional[SigmaTables]:
        """`_dk_tables` when the fused step takes the table, else None after the one warning."""
        tables = self._dk_tables()
        if tables.stock is not None:
            self._dk_stock("table", tables.stock)
            return None
        return tables

    def _dk_new_tables(self, host_timesteps, host_sigmas) -> SigmaTables:
        """The tables of the current ``timesteps`` and ``sigmas`` with these host copies of them: the fused step
        takes a 1-D float32 sigma table of at least 2 sigmas and 1-D float timesteps."""
        tables = self._dk_table_class()
        ts, sg = tracked(self, "timesteps"), tracked(self, "sigmas")
        tables.timesteps, tables.sigmas = ts, sg
        tables.t_version, tables.s_version = getattr(ts, "_version", None), getattr(sg, "_version", None)
        tables.host_timesteps, tables.host_sigmas = host_timesteps, host_sigmas
        tables.devices = {}
        tables.stock, tables.root, tables.host_array = None, None, None
        if not (isinstance(sg, torch.Tensor) and sg.dtype == torch.float32 and sg.ndim == 1 and sg.shape[0] >= 2):
            what = (f"{sg.dtype} tensor of shape {tuple(sg.shape)}" if isinstance(sg, torch.Tensor)
                    else type(sg).__name__)
            tables.stock = f"the sigma table is a {what}, not a 1-D float32 tensor of at least 2 sigmas"
        elif not (isinstance(ts, torch.Tensor) and ts.ndim == 1 and ts.dtype.is_floating_point):
            tables.stock = "the timesteps are not a 1-D float tensor"
        else:
            tables.root = ts if ts._base is None else ts._base
            tables.host_array = host_timesteps.numpy()
        self._dk_fill_tables(tables)
        self.__dict__["_dk_tables_"] = tables
        self.__dict__.pop("_dk_lane_", None)
        return tables

    def _dk_fill_tables(self, tables: SigmaTables) -> None:
        """The drop-in's own fields of ``tables`` (``tables.stock`` None: the fused step takes the table)."""

    def _dk_view_index(self, timestep, tables) -> Optional[int]:
        """The position in ``timesteps`` of a 0-d view of it (what iterating it yields), read from the view's
        storage offset, never from the device; None for any other timestep."""
        if not (isinstance(timestep, torch.Tensor) and timestep.ndim == 0 and tables.root is not None
                and timestep._base is tables.root):
            return None
        ts = tables.timesteps
        stride = ts.stride(0)
        if timestep.dtype != ts.dtype or stride <= 0:
            return None
        index, rest = divmod(timestep.storage_offset() - ts.storage_offset(), stride)
        return index if not rest and 0 <= index < tables.host_array.shape[0] else None

    def _init_step_index(self, timestep) -> None:
        """The stock first step index, found in the host copy of the timesteps when the timestep's value is
        known on the host (a view of ``timesteps``, a Python number, a CPU tensor); else the stock lookup (one
        device read)."""
        if self.begin_index is None:
            tables = self._dk_tables()
            if tables.stock is None:
                index = self._dk_view_index(timestep, tables)
                if index is not None:
                    # index_for_timestep's rule on the host array: the second match when the value occurs twice
                    matches = np.flatnonzero(tables.host_array == tables.host_array[index])
                    if matches.size:  # (a NaN timestep matches nothing: the stock lookup raises its error)
                        self._step_index = int(matches[1] if matches.size > 1 else matches[0])
                        return
                if _is_real(timestep) or (isinstance(timestep, torch.Tensor) and on_host(timestep)):
                    self._step_index = self.index_for_timestep(timestep, tables.host_timesteps)
                    return
        super()._init_step_index(timestep)

    def _dk_index_tensor(self, index: int, batch: int, device: torch.device) -> torch.Tensor:
        """The (B,) int64 step index on ``device``, kept between steps and advanced there (`_dk_advance`); another
        index (a new loop) is written into the same tensor, so that a solver drop-in's checked call on it stays
        valid across loops (an inference tensor, which a copy made under inference mode holds, is replaced
        outside inference mode instead: it takes no in-place write there)."""
        cached = self.__dict__.get("_dk_index_")
        if (cached is not None and cached[2] == batch and cached[3] == device
                and (cached[1] == index or not cached[0].is_inference() or torch.is_inference_mode_enabled())):
            if cached[1] != index:
                cached[0].fill_(index)
                cached[1] = index
            return cached[0]
        with torch.inference_mode(False):  # a normal tensor, advanced in place in and out of inference mode
            tensor = torch.full((batch,), index, dtype=torch.long, device=device)
        self.__dict__["_dk_index_"] = [tensor, index, batch, device]
        return tensor

    def _dk_table_index(self, index: int, sample: torch.Tensor, tables: SigmaTables, sigmas: torch.Tensor):
        """`_dk_index_tensor` for a fused step on ``sigmas``, the device copy of ``tables``' sigma table, after the
        full checks; the step's `_Lane` is kept for the next steps (`_dk_lane`)."""
        tensor = self._dk_index_tensor(index, sample.shape[0], sample.device)
        lane = _Lane()
        lane.tables, lane.sigmas, lane.index = tables, sigmas, self.__dict__["_dk_index_"]
        lane.last, lane.server, lane.kind, lane.noise = sigmas.shape[0] - 1, None, None, None
        self.__dict__["_dk_lane_"] = lane
        return tensor

    def _dk_lane(self, model_output, timestep, sample) -> Optional[_Lane]:
        """The `_Lane` of the last fused step when this call continues its schedule on the operands it checked,
        else None (the full checks run): ``sample`` and ``model_output`` plain tensors of one shape, on that step's
        device with its batch size, no gradient asked of them; a float timestep (the stock step refuses integer
        ones); ``timesteps`` and ``sigmas`` the same tensors, unchanged; the step index a Python int, the one the
        index tensor holds, and a step of the table. What else a drop-in's step depends on (dtypes, config
        entries, arguments) it checks itself on every call, so a config changed in place is honoured."""
        lane = self.__dict__.get("_dk_lane_")
        if lane is None:
            return None
        tables, entry = lane.tables, lane.index
        index, ts, sg = self._step_index, self.timesteps, self.sigmas
        if (
            type(index) is int
            and index == entry[1]  # (>= 0: the index tensor was made for a checked index)
            and index < lane.last
            and ts is tables.timesteps
            and sg is tables.sigmas
            and ts._version == tables.t_version
            and sg._version == tables.s_version
            and type(sample) is torch.Tensor
            and type(model_output) is torch.Tensor
            and (type(timestep) is float or (type(timestep) is torch.Tensor and timestep.is_floating_point()))
        ):
            kind = lane.kind
            if kind is not None and _native.same_kind(kind, sample, model_output):
                return lane  # (operands of the kind the lane's last step took: one C call)
            if not ((sample.requires_grad or model_output.requires_grad) and torch.is_grad_enabled()):
                shape, device = sample.shape, entry[3]
                if (len(shape) and shape[0] == entry[2] and model_output.shape == shape and sample.device == device
                        and model_output.device == device):
                    if sample.dtype is model_output.dtype:  # (a mixed call keeps the kind: the next may match it)
                        lane.kind, lane.noise = kind_of(shape, sample.dtype, device), None
                    return lane
        return None

    def _dk_advance(self) -> None:
        index = self._step_index = self._step_index + 1
        cached = self.__dict__.get("_dk_index_")
        if cached is not None and cached[1] + 1 == index:
            # the new value written on the device (a scalar fill: no host read, and cheaper than add_(1))
            cached[0].fill_(index)
            cached[1] = index
