"""What the table-driven solver drop-ins share (UniPC, LCM): the stock schedule's host copies, its coefficient
table built once per (begin index, config) in float64 and kept per device, the history ring and last-sample
buffers allocated once per shape, and the `ddpm_kernels.solvers.solver_step` call with the sync-free step
index. See docs/design.md, "Multistep solvers"."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ... import _native
from ..._layout import dense_format, empty_in_format
from ...solvers import new_history, solver_step, table_step_server
from ._common import _device, _FusedBase, _host_copy, _is_real, _StepIndex, kind_of, tracked


def threshold_unsupported(config) -> Optional[str]:
    """Why the fused step cannot threshold as the stock config asks (None when it can): the op takes a ratio
    in [0, 1] and a positive finite maximum (below 1 it is the bound, as torch's clamp makes it in stock)."""
    ratio, max_value = config.dynamic_thresholding_ratio, config.sample_max_value
    if _is_real(ratio) and 0 <= ratio <= 1 and _is_real(max_value) and 0 < max_value < math.inf:
        return None
    return (f"dynamic_thresholding_ratio={ratio!r}, sample_max_value={max_value!r}: the fused thresholding takes a "
            "ratio in [0, 1] and a positive finite sample_max_value")


class _Schedule:
    """The stock schedule as the fused step reads it: the ``timesteps`` tensor (and its version) with host
    copies for the first step's index lookup, the host copies of the table sources, why the fused step cannot
    take the schedule (None when it can), the coefficient tables per (begin index, config key) and their copies
    per device (``last``: the last one a step took, with its begin index, config key and device);
    ``fingerprint``: the host copies' values, which the tables are a function of (with the key)."""

    __slots__ = ("timesteps", "sources", "versions", "root", "host_timesteps", "host_array", "host_sources", "stock",
                 "tables", "devices", "steps", "fingerprint", "last")

# Built host tables a drop-in keeps across set_timesteps calls (a pipeline sets the same schedule for every
# generation; a table costs tens of microseconds a row to build).
_BUILT_LIMIT = 8


def _versions(tensors) -> tuple:
    return tuple(getattr(t, "_version", None) for t in tensors)


class _Config:
    """What a step reads from the config, checked again when the config object (``register_to_config``
    replaces it) or one of its entries changes (``scheduler.config.name = value`` goes through: diffusers'
    ``FrozenDict`` does not refuse it, and pipelines do it), or the drop-in's own settings (``_dk_settings()``):
    why the fused step cannot take it (``reason``, None when it can), the table's config key (``key``), the
    ring size (``slots``) and the drop-in's own per-step values (``extra``, ``_dk_step_config()``)."""

    __slots__ = ("config", "entries", "settings", "reason", "key", "slots", "extra")


def _same_entries(entries: dict, config) -> bool:
    """Whether ``config``'s attributes are still ``entries`` (a shallow copy: an unchanged entry is the same
    object, compared by identity first; a value whose ``==`` is not a bool counts as changed)."""
    try:
        return bool(entries == config.__dict__)
    except (TypeError, ValueError, RuntimeError):
        return False


class _SolverDropIn(_StepIndex, _FusedBase):
    """The common step of the solver drop-ins. A subclass names the tensors its table is built from
    (``_dk_source_names``), builds the float64 table from their host copies (``_dk_build(schedule, begin)``) for
    a config (``_dk_config_key()``, the options the table depends on), says what the fused step does not take
    (``_dk_unsupported``) and the ring size (``_dk_slots``)."""

    _dk_source_names = ()

    # ------------------------------------------------------------------ schedule
    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.__dict__["_dk_begin_"] = None
        self.__dict__.pop("_dk_lane_", None)
        self._dk_tables()  # the host copies now (set_timesteps may read the device), so that steps never do

    def _dk_tables(self) -> _Schedule:
        schedule = self.__dict__.get("_dk_schedule_")
        ts = tracked(self, "timesteps")
        if schedule is not None and schedule.timesteps is ts and schedule.versions[0] == getattr(ts, "_version", None):
            # the same tensors, unchanged (the common case, without building tuples)
            for name, source, version in zip(self._dk_source_names, schedule.sources, schedule.versions[1:]):
                current = tracked(self, name)
                if current is not source or getattr(current, "_version", None) != version:
                    break
            else:
                return schedule
        sources = tuple(tracked(self, name) for name in self._dk_source_names)
        return self._dk_new_schedule(ts, sources)

    def _dk_config(self) -> _Config:
        """The checked config (`_Config`), rebuilt when the config object, one of its entries or the drop-in's
        settings change."""
        config, settings = self._internal_dict, self._dk_settings()
        checked = self.__dict__.get("_dk_config_")
        if (
            checked is None
            or checked.config is not config
            or not _same_entries(checked.entries, config)
            or checked.settings != settings
        ):
            checked = _Config()
            checked.config, checked.entries, checked.settings = config, dict(config.__dict__), settings
            checked.reason = self._dk_unsupported()
            ok = checked.reason is None
            checked.key = self._dk_config_key() if ok else None
            checked.slots = self._dk_slots if ok else 0
            checked.extra = self._dk_step_config() if ok else None
            self.__dict__["_dk_config_"] = checked
        return checked

    def _dk_new_schedule(self, ts, sources) -> _Schedule:
        schedule = _Schedule()
        schedule.timesteps, schedule.sources, schedule.versions = ts, sources, _versions((ts,) + sources)
        schedule.tables, schedule.devices, schedule.last = {}, {}, None
        schedule.stock, schedule.root, schedule.host_array, schedule.host_sources = None, None, None, None
        schedule.steps, schedule.fingerprint = 0, None
        schedule.host_timesteps = _host_copy(ts)
        bad = [name for name, s in zip(self._dk_source_names, sources)
               if not (isinstance(s, torch.Tensor) and s.ndim == 1 and s.is_floating_point() and s.shape[0] >= 1)]
        if bad:
            schedule.stock = f"{', '.join(bad)} is not a 1-D float tensor"
        elif not (isinstance(ts, torch.Tensor) and ts.ndim == 1 and ts.shape[0] >= 1):
            schedule.stock = "the timesteps are not a 1-D tensor"
        else:
            schedule.root = ts if ts._base is None else ts._base
            schedule.host_array = schedule.host_timesteps.numpy()
            previous = self.__dict__.get("_dk_schedule_")
            # a source that is the previous schedule's tensor at the same version (LCM's alphas_cumprod: set_timesteps
            # keeps it) keeps its host copy and its bytes; the others are copied
            kept = previous.sources if previous is not None and previous.stock is None else ()
            copies, source_bytes = [], []
            for i, s in enumerate(sources):
                if i < len(kept) and kept[i] is s and previous.versions[i + 1] == s._version:
                    copies.append(previous.host_sources[i])
                    source_bytes.append(previous.fingerprint[3][i])
                else:
                    copies.append(_host_copy(s).double().numpy())
                    source_bytes.append(copies[-1].tobytes())
            schedule.host_sources = tuple(copies)
            schedule.steps = self._dk_steps(schedule)
            schedule.fingerprint = (schedule.steps, schedule.host_array.dtype.str, schedule.host_array.tobytes(),
                                    tuple(source_bytes))
            if previous is not None and previous.fingerprint == schedule.fingerprint:
                # the same values (a pipeline sets the same schedule for every generation): its tables, host and
                # device, are this schedule's, so the steps' checked calls on them stay valid across loops
                schedule.tables, schedule.devices = previous.tables, previous.devices
        self.__dict__["_dk_schedule_"] = schedule
        return schedule

    def _dk_table(self, schedule: _Schedule, begin: int, device: torch.device) -> torch.Tensor:
        """The float64 table for a loop starting at ``begin`` on ``device``: built on the host once per (begin,
        config), copied to the device once (from pinned memory without waiting on a CUDA device). Called by a
        step after `_dk_prepare`, whose `_dk_config` it reads."""
        config_key = self.__dict__["_dk_config_"].key  # (checked this step: `_dk_prepare`)
        last = schedule.last
        if last is not None and last[0] == begin and last[1] is config_key and last[2] == device:
            return last[3]  # the table of the last step (a loop's steps: no tuple hashed)
        key = (begin, config_key)
        table = schedule.devices.get((key, device))
        if table is None:
            host = schedule.tables.get(key)
            if host is None:
                host = schedule.tables[key] = self._dk_built(schedule, key, begin)
            if device.type == "cuda":
                pinned = host.pin_memory()
                table = pinned.to(device, non_blocking=True)
                schedule.tables[key] = pinned  # kept alive until the copy is done
            else:
                table = host.to(device)
            schedule.devices[(key, device)] = table
        schedule.last = (begin, config_key, device, table)
        return table

    def _dk_built(self, schedule: _Schedule, key: tuple, begin: int) -> torch.Tensor:
        """The host table of ``key`` on ``schedule``: taken from the tables this drop-in built for the same
        values (its last `_BUILT_LIMIT` ones) or built now. Never written to (the CPU copy is the table)."""
        built = self.__dict__.setdefault("_dk_built_", {})
        full = (schedule.fingerprint, key)
        host = built.get(full)
        if host is None:
            host = torch.from_numpy(self._dk_build(schedule, begin))
            if len(built) >= _BUILT_LIMIT:
                built.pop(next(iter(built)))
            built[full] = host
        return host

    # ------------------------------------------------------------------ buffers
    def _dk_buffers(self, sample: torch.Tensor, slots: int):
        """The history ring and the last-sample buffer for samples like ``sample``, allocated once per shape,
        dtype, device and ring size, in the memory format the kernels run ``sample`` in. A sample whose layout,
        dtype or device changes within a loop (a permuted first sample, row-major results after it; a step in
        another precision) moves the state into the new buffers with its values (converted as ``copy_``
        converts): the ring's history and the last sample are never lost between steps of one shape."""
        key = (sample.shape, sample.dtype, sample.device, slots)
        fmt = dense_format(sample)
        cached = self.__dict__.get("_dk_buffers_")
        if cached is None or cached[0] != key:
            history = new_history(sample, slots) if slots else None
            last = empty_in_format(sample, fmt)
            if cached is not None and cached[0][0] == key[0] and cached[0][3] == slots:
                if slots:
                    history.copy_(cached[1])
                last.copy_(cached[2])
            cached = self.__dict__["_dk_buffers_"] = (key, history, last, fmt)
        elif cached[3] is not fmt:
            history = new_history(sample, slots).copy_(cached[1]) if slots else None
            cached = self.__dict__["_dk_buffers_"] = (key, history, empty_in_format(sample, fmt).copy_(cached[2]), fmt)
        return cached[1], cached[2]

    # ------------------------------------------------------------------ step
    def _dk_prepare(self, model_output, timestep, sample):
        """``(schedule, index, begin)`` for the fused step, or None when the stock step is to take the call
        (nothing changed then but a first step's index, which the stock step would set the same)."""
        if self.num_inference_steps is None or not self._dk_inputs_ok(model_output, sample, min_ndim=2):
            return None
        reason = self._dk_config().reason
        if reason is not None:
            self._dk_stock("config", reason)
            return None
        schedule = self._dk_tables()
        if schedule.stock is not None:
            self._dk_stock("table", schedule.stock)
            return None
        if self._step_index is None:
            self._init_step_index(timestep)
        index = self._step_index
        steps = schedule.steps
        if not ((type(index) is int or isinstance(index, np.integer)) and 0 <= index < steps):
            self._dk_stock("step_index", f"step index {index!r} is not a step of the {steps}-step schedule")
            return None
        begin = self.__dict__.get("_dk_begin_")
        if begin is None or begin > index:
            begin = self.__dict__["_dk_begin_"] = int(index)
        return schedule, int(index), begin

    def _dk_solver_step(self, schedule, index, begin, model_output, sample, last=None, noise=None, generator=None,
                        **options):
        """One `solver_step` on the stock step's operands in their promoted dtype; returns ``(prev_sample,
        last_sample)`` (the buffer the step wrote ``x_c`` into: ``last``, else the scheduler's own)."""
        dtype = torch.promote_types(sample.dtype, model_output.dtype)
        x = sample if sample.dtype == dtype else sample.to(dtype)
        device = _device(x.device)
        history = None
        slots = self.__dict__["_dk_config_"].slots  # (checked this step: `_dk_prepare`)
        if last is None or slots:
            history, own_last = self._dk_buffers(x, slots)
            last = own_last if last is None else last
        prev = self._dk_solve(x, model_output, self._dk_table(schedule, begin, device), index, history, last, noise,
                              generator, **options)
        return prev, last

    def _dk_solve(self, x, model_output, table, index: int, history, last, noise=None, generator=None, **options):
        """`solver_step` on operands the drop-in built (``index``: the Python step index), then the step index
        advanced (`_dk_advance`). A plain call (no generator, no option but ``clip_range``, one dtype, noise and
        last sample like the sample, plain tensors of which no gradient is asked) that repeats the last checked
        plain call on its table, index tensor, ring, backend, options, and its sample's shape, dtype and device
        skips the checks that call made: the server resolved for it (`solvers.table_step_server`) makes the
        step and advances the index tensor in the same call (docs/design.md, "Host overhead")."""
        tensor = self._dk_index_tensor(index, x.shape[0], x.device)
        backend = self.fused_backend
        clip = options.get("clip_range")
        shape, dtype, device = x.shape, x.dtype, x.device
        plain = (generator is None and len(options) == (clip is not None) and type(x) is torch.Tensor
                 and type(model_output) is torch.Tensor and model_output.dtype == dtype
                 and (noise is None or (type(noise) is torch.Tensor and noise.dtype == dtype and noise.shape == shape
                                        and noise.device == device
                                        and not (noise.requires_grad and torch.is_grad_enabled())))
                 and (last is None or (type(last) is torch.Tensor and last.dtype == dtype and last.shape == shape
                                       and last.device == device))
                 and not ((x.requires_grad or model_output.requires_grad) and torch.is_grad_enabled()))
        if plain:
            variant = (backend, clip, noise is not None, last is not None, shape, dtype, device)
            checked = self.__dict__.get("_dk_checked_")
            if (checked is not None and checked[0] is table and checked[1] is tensor and checked[2] is history
                    and checked[3] == variant and model_output.shape == shape and model_output.device == device):
                entry = self.__dict__["_dk_index_"]  # (its value is index: `_dk_index_tensor` returned its tensor)
                prev = checked[4](x, model_output, table, tensor, history, last, noise, index + 1)
                entry[1] = index + 1
                self._step_index = self._step_index + 1
                self.__dict__["_dk_plain_"] = index
                return prev
        prev = solver_step(x, model_output, table, tensor, history, last, noise, generator, backend, **options)
        if plain:
            checked = self.__dict__.get("_dk_checked_")
            server = checked[4] if checked is not None and checked[3] == variant else (
                table_step_server(backend, x, clip, noise is not None))
            self.__dict__["_dk_checked_"] = (table, tensor, history, variant, server)
        self.__dict__["_dk_plain_"] = index if plain else None
        self._dk_advance()
        return prev

    # ------------------------------------------------------------------ direct steps
    def _dk_keep_lane(self, index: int, schedule, begin: int, ring, last) -> None:
        """After a fused step at ``index`` whose solver call was plain (`_dk_solve`): its `_DirectLane`, for the
        next steps of the loop (a drop-in's ``_dk_continues``)."""
        solved = self.__dict__.get("_dk_checked_")
        if self.__dict__.get("_dk_plain_") != index or solved is None or solved[2] is not ring:
            return
        lane = _DirectLane()
        lane.checked, lane.schedule, lane.begin, lane.table, lane.ring, lane.last, lane.solved = (
            self.__dict__["_dk_config_"], schedule, begin, solved[0], ring, last, solved)
        names = ("timesteps",) + self._dk_source_names
        lane.sources = tuple(zip(names, (schedule.timesteps,) + schedule.sources, schedule.versions))
        # a tensor of the checked call's kind (shape, dtype, device; one element of storage), which the compiled
        # check compares a step's operands with (`_native.same_kind`)
        variant = solved[3]
        lane.kind, lane.noise = kind_of(variant[4], variant[5], variant[6]), None
        self.__dict__["_dk_lane_"] = lane

    def _dk_lane_holds(self, lane, model_output, sample, index) -> bool:
        """Whether a step at ``index`` (the Python step index) can take the last plain fused step's `_DirectLane`
        without the checks that step made (`_dk_prepare`, the checked solver call): the sample and model output
        plain tensors of its shape, dtype and device of which no gradient is asked; the backend, the config
        (entries compared as `_dk_config` compares them) and the schedule's tensors unchanged; ``index`` a step
        of the schedule, the one the index tensor holds; the checked call still the lane's. What else a step
        reads (its ring, warm-up, noise) the drop-in's ``_dk_continues`` checks."""
        solved = lane.solved
        variant = solved[3]  # (backend, clip, noise given, last given, shape, dtype, device)
        kind = lane.kind
        if not (
            (_native.same_kind(kind, sample, model_output) if kind is not None else (
                type(sample) is torch.Tensor
                and type(model_output) is torch.Tensor
                and sample.dtype is variant[5]
                and model_output.dtype is variant[5]
                and sample.shape == variant[4]
                and model_output.shape == variant[4]
                and sample.device == variant[6]
                and model_output.device == variant[6]
                and not ((sample.requires_grad or model_output.requires_grad) and torch.is_grad_enabled())))
            and self.fused_backend == variant[0]
            and self.__dict__.get("_dk_checked_") is solved
        ):
            return False
        if self._dk_config() is not lane.checked or self.__dict__.get("_dk_schedule_") is not lane.schedule:
            return False
        # the schedule's tensors unchanged (what `_dk_tables` checks, on the attributes themselves: a tensor
        # replaced, by an inference tensor say, is another object)
        attributes = self.__dict__
        for name, tensor, version in lane.sources:
            if attributes.get(name) is not tensor or tensor._version != version:
                return False
        entry = attributes.get("_dk_index_")
        return index < lane.schedule.steps and entry is not None and entry[0] is solved[1] and entry[1] == index

    def _dk_served(self, lane, model_output, sample, last=None, noise=None) -> torch.Tensor:
        """The solver call of a step the drop-in's ``_dk_continues`` accepted: the lane's server on its table,
        index tensor and state (``last``: the last-sample buffer of this step, else the lane's; ``noise``: the
        step's, given or not as the checked call's, or the other way: LCM's last step draws none, through the
        same call's server without or with noise, kept with the checked call), the index advanced in the same
        call (Python's and the device's)."""
        index = self._step_index
        solved = lane.solved
        server = solved[4]
        variant = solved[3]
        if variant[2] is (noise is None):
            other = self.__dict__.get("_dk_other_")
            if other is None or other[0] is not solved:
                other = self.__dict__["_dk_other_"] = (
                    solved, table_step_server(variant[0], sample, variant[1], noise is not None))
            server = other[1]
        prev = server(sample, model_output, lane.table, solved[1], lane.ring, lane.last if last is None else last,
                      noise, index + 1)
        self.__dict__["_dk_index_"][1] = index + 1
        self._step_index = index + 1
        self.__dict__["_dk_plain_"] = index
        return prev

    # ------------------------------------------------------------------ per solver
    def _dk_steps(self, schedule: _Schedule) -> int:
        return schedule.host_array.shape[0]

    def _dk_unsupported(self) -> Optional[str]:
        return None

    def _dk_settings(self) -> tuple:
        """The drop-in's own attributes (not config entries) that `_dk_unsupported` and `_dk_config_key` read, as
        values compared with ``==`` (copies of mutable ones)."""
        return ()

    def _dk_step_config(self):
        """The per-step values a drop-in derives from its (supported) config, kept in `_dk_config`."""
        return None

    _dk_slots = 0


class _SigmaSolverDropIn(_SolverDropIn):
    """A solver drop-in whose table is built from the scheduler's ``sigmas`` (DPM-Solver(++), UniPC): a step
    reads ``sigmas[i]`` and ``sigmas[i + 1]``, so the table has as many steps as the timesteps and the sigmas
    both allow. A drop-in builds its table from those sigmas in ``_dk_sigma_table(sigmas, flow_sigmas=,
    begin_index=)``."""

    _dk_source_names = ("sigmas",)

    def _dk_steps(self, schedule: _Schedule) -> int:
        return min(schedule.host_array.shape[0], schedule.host_sources[0].shape[0] - 1)

    def _dk_build(self, schedule: _Schedule, begin: int) -> np.ndarray:
        return self._dk_sigma_table(schedule.host_sources[0][: schedule.steps + 1],
                                    flow_sigmas=bool(self.config.use_flow_sigmas), begin_index=begin)


class _DirectLane:
    """What the last plain fused step of a solver drop-in used (its ``_dk_continues``): the checked config
    (`_Config`), the schedule and its tensors with their versions (``sources``: ``(attribute, tensor, version)``),
    the begin index, the device table, the ring, the last-sample buffer (None without) and the checked solver
    call (`_SolverDropIn._dk_solve`'s record: table, index tensor, ring, variant, server) with a tensor of its
    operands' kind (``kind``, None without the compiled library) and the buffer its steps draw their noise into
    (``noise``, `_common.lane_randn`)."""

    __slots__ = ("checked", "schedule", "sources", "begin", "table", "ring", "last", "solved", "kind", "noise")


class _RingHistory:
    """The stock history lists of a multistep drop-in whose ring holds them (DPM-Solver++, UniPC): after a fused
    step (``_dk_ring_used`` True, ``_dk_last`` its step index) ``model_outputs`` lists views of the ring's entries,
    oldest first, as the stock step would have listed them (`_dk_history`); a list assigned from outside (the
    stock code's resets, a user's) is kept as it is until the next fused step. A loop that hands over to the
    stock step in its middle first copies the history into plain lists (`_dk_hand_over`), which the stock steps
    then update as theirs."""

    def _dk_history(self, entry):
        """``entry(slot or None, steps back)`` for each of the last ``solver_order`` steps, oldest first."""
        order, last = self.config.solver_order, self.__dict__["_dk_last"]
        values = [None] * order
        buffers = self.__dict__.get("_dk_buffers_")
        slots = self._dk_slots
        if not slots or buffers is None or buffers[0][-1] != slots:  # no ring at the first order
            return values
        ring = buffers[1]
        for j in range(min(self.lower_order_nums, ring.shape[0])):  # the step j steps before the last
            values[order - 1 - j] = entry(ring[(last - j) % ring.shape[0]], last - j)
        return values

    @property
    def model_outputs(self):
        """The converted model outputs of the last steps, oldest first, as the stock list (views of the ring)."""
        if self.__dict__.get("_dk_ring_used") is not True:
            return self.__dict__.get("_dk_model_outputs")
        return self._dk_history(lambda slot, index: slot)

    @model_outputs.setter
    def model_outputs(self, value):
        # the stock code resets it in __init__ / set_timesteps; a list set from outside is kept as it is (the
        # stock step never reads an entry older than its warm-up either, and neither does the fused one)
        self.__dict__["_dk_model_outputs"] = value
        self.__dict__["_dk_ring_used"] = False

    def _dk_hand_over(self) -> None:
        """Before the stock step takes over the rest of a loop: the ring's history as the stock list."""
        if self.__dict__.get("_dk_ring_used") is True:
            self.model_outputs = list(self.model_outputs)

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        for key in ("_dk_stock_loop", "_dk_last"):
            self.__dict__.pop(key, None)

    def _dk_prepare(self, model_output, timestep, sample):
        """``(schedule, index, begin)`` for the fused step, or None when the stock step is to take the call: the
        ring does not hold the outputs the stock step would read (a step index moved within the loop, outputs set
        from outside). The stock order follows ``lower_order_nums`` (the steps taken, capped at the order): the
        table is that of a loop that started that many steps ago, kept while it gives the same order."""
        prepared = super()._dk_prepare(model_output, timestep, sample)
        if prepared is None:
            return None
        schedule, index, _ = prepared
        order, slots = self.config.solver_order, self.__dict__["_dk_config_"].slots
        taken = min(self.lower_order_nums, order)
        if slots and taken and (self.__dict__.get("_dk_ring_used") is not True
                                or (slots > 1 and index != self.__dict__.get("_dk_last", -2) + 1)):
            # the ring holds the outputs of the fused steps, entry j steps back in slot (index - j) % slots
            self._dk_stock("history", "the earlier outputs or the step index were set from outside the loop, so "
                           "the ring does not hold the outputs the stock step would read")
            return None
        begin = self.__dict__.get("_dk_begin_")
        if begin is None or min(index - begin, order) != taken:
            begin = self.__dict__["_dk_begin_"] = index - min(taken, index)
        return schedule, index, begin

    def _dk_continues(self, lane, model_output, sample) -> bool:
        """Whether this step continues the loop of the last plain fused step (its `_DirectLane`) on operands of
        the kind it checked (`_dk_lane_holds`), with the step index the next one after it, the warm-up where that
        step left it, the ring and the last-sample buffer still the ones it used and the loop not handed to the
        stock step."""
        index = self._step_index
        if not (
            type(index) is int
            and index == self.__dict__.get("_dk_last", -2) + 1
            and self.__dict__.get("_dk_ring_used") is True
            and not self.__dict__.get("_dk_stock_loop")
            and self._dk_lane_holds(lane, model_output, sample, index)
        ):
            return False
        order = self.config.solver_order
        buffers = self.__dict__.get("_dk_buffers_")
        return (
            min(index - lane.begin, order) == min(self.lower_order_nums, order)
            and self.__dict__.get("_dk_begin_") == lane.begin
            and (lane.ring is None or (buffers is not None and buffers[1] is lane.ring))
            and (lane.last is None or (buffers is not None and buffers[2] is lane.last))
        )

    def _dk_served(self, lane, model_output, sample, last=None, noise=None) -> torch.Tensor:
        index = self._step_index
        prev = super()._dk_served(lane, model_output, sample, last, noise)
        self.__dict__["_dk_last"] = index
        return prev

