"""A second device emulated on the CPU: finds the tensors a GPU run would mix with host tensors, and the
host reads of device data, without a GPU.

CUDA refuses an operation whose tensors lie on two devices, except a 0-dim CPU tensor (a scalar); and
``.item()``, ``.tolist()``, ``.cpu()`` and friends of a device tensor make the host wait for the device.
Inside :class:`EmulatedDevice` every tensor made for the run's device (a factory call given ``device=``,
or ``.to(device)``) is marked as a device tensor, and so is every result of an operation on one; an
operation that meets a device tensor and an unmarked tensor of one or more dimensions is recorded as a
mix, at the line of lpm that asked for it, and a host read of a device tensor likewise as a read. The
run itself computes on the CPU as usual, so its numbers are the CPU run's.

It is an emulation by rules: a tensor that lpm moves to the host with ``.to(device)`` where ``device``
is the CPU would be marked as on the device (lpm moves to the host with ``.cpu()``), and the CPU indices
that CUDA accepts in advanced indexing (``x[cpu_index]``) are recorded as mixes too.
"""

from __future__ import annotations

import collections
import traceback
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

#: methods that read a tensor's values on the host
HOST_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__array__"}
#: operations whose output size depends on the values: a GPU waits to learn it (bincount reads the
#: largest key; boolean indexing and one-argument where run nonzero); assigning a Python number to
#: elements waits too (below)
WAITS = {"bincount", "nonzero", "unique", "unique_consecutive", "masked_select", "argwhere"}
#: operations that refuse even a 0-dim host tensor beside device tensors
JOINS = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"}
#: methods whose result is on the host whatever their input
TO_HOST = {"cpu", "numpy", "tolist", "item"}


def _where() -> str:
    """The innermost line of lpm (not of the tests) on the stack."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/lpm/" in path and "/tests/" not in path and "site-packages" not in path:
            return f"{path.rsplit('/lpm/', 1)[-1]}:{frame.lineno} ({frame.name})"
    return "?"


class EmulatedDevice(TorchFunctionMode):
    """Marks device tensors, records mixes and host reads (see the module)."""

    def __init__(self):
        super().__init__()
        self._marked: dict[int, weakref.ref] = {}
        self.mixes: collections.Counter[str] = collections.Counter()
        self.reads: collections.Counter[str] = collections.Counter()
        self.read_log: list[str] = []  # every host read in order (for per-step counts)

    def marked(self, t: object) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._marked.get(id(t))
        return ref is not None and ref() is t

    def mark(self, t: object) -> None:
        if isinstance(t, torch.Tensor) and not self.marked(t):
            key = id(t)
            self._marked[key] = weakref.ref(t, lambda _, key=key: self._marked.pop(key, None))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        out = func(*args, **kwargs)
        if name in ("__set__", "dim", "size", "numel", "data_ptr"):
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [self.marked(t) for t in inputs]
        waits = name in WAITS or (name == "repeat_interleave" and kwargs.get("output_size") is None)
        waits |= name == "where" and len(args) + len(kwargs) == 1
        waits |= name in ("__getitem__", "__setitem__", "index_put_", "index_put") and any(
            t.dtype == torch.bool for t in inputs[1:]
        )
        # x[i] = 0.5 on one element copies the number from the host (a GPU's sync debug mode reports it;
        # x[i:j] = 0.5 fills instead)
        if name == "__setitem__" and len(args) == 3 and isinstance(args[2], int | float | bool):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            waits |= all(isinstance(i, int) for i in index) and len(index) == args[0].dim()
        if name in ("numpy", "__array__") and inputs and on_device[0]:  # a GPU refuses: .cpu() first
            self.mixes[f"{name} of a device tensor at {_where()}"] += 1
        if (name in HOST_READS or waits) and inputs and on_device[0]:
            where = _where()
            self.reads[f"{name} at {where}"] += 1
            self.read_log.append(where)
        if name in TO_HOST:  # on the CPU .cpu() returns the tensor itself; a GPU would return a copy
            return out.clone() if name == "cpu" and out is args[0] else out
        to_device = name == "to" and any(
            isinstance(a, torch.device | str) for a in [*args[1:], *kwargs.values()]
        )
        if to_device and out is args[0]:  # likewise .to(device): a copy on the device, not the host tensor
            out = out.clone()
        to_device |= kwargs.get("device") is not None and name != "to"
        if any(on_device) and not all(on_device):
            joins = name in JOINS  # these take no host scalar beside device tensors
            host = [t for t, d in zip(inputs, on_device, strict=True) if not d and (t.dim() > 0 or joins)]
            if host and not to_device:
                shapes = ", ".join(str(tuple(t.shape)) for t in host)
                self.mixes[f"{name} at {_where()}: host tensor(s) {shapes}"] += 1
        if to_device or any(on_device):
            for t in tree_flatten(out)[0]:
                self.mark(t)
        return out
