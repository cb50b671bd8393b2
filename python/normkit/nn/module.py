"""The small Module / Parameter base of normkit's layers, in PyTorch's vocabulary.

A layer keeps what its backward needs from the last forward; ``backward(dy)`` returns the input
gradient and accumulates parameter gradients into ``param.grad``. normkit is not an autograd
framework: a container's backward runs its children's backwards in reverse order.
"""
from collections import OrderedDict

import numpy as np

from .._backend import array_module, on_array_device, parse_device, to_device


class Parameter:
    """A learnable array: ``.data`` (NumPy or CuPy array) and ``.grad`` (array or None).

    Parameters
    ----------
    data : numpy.ndarray or cupy.ndarray
        The values, held as they are (not copied); ``.grad`` starts None.
    """

    def __init__(self, data):
        self.data = data
        self.grad = None

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.data, dtype=dtype)

    def __repr__(self):
        return f"Parameter containing:\n{self.data!r}"


def _as_numpy(value):
    """A state_dict value as an array: arrays pass through, torch tensors are converted."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor, without importing torch
        return value.detach().cpu().numpy()
    return value


def _checked_value(key, value, target):
    """A state_dict value for `target`, checked: numeric, of target's shape, integral for integer
    targets."""
    value = _as_numpy(value)
    xp = array_module(value) if type(value).__module__.split(".")[0] == "cupy" else np
    arr = xp.asarray(value) if value is not None else None
    if arr is None or arr.dtype.kind not in "biuf":
        kind = type(value).__name__ if arr is None else f"{type(value).__name__} of {arr.dtype}"
        raise TypeError(f"load_state_dict: {key} must be a numeric array or tensor, got {kind}")
    if tuple(arr.shape) != tuple(target.shape):
        raise RuntimeError(f"load_state_dict: {key} has shape {tuple(arr.shape)}, "
                           f"expected {tuple(target.shape)}")
    integral = arr.dtype.kind != "f" or bool(xp.all(arr == xp.round(arr)))
    if target.dtype.kind in "iu" and not integral:
        raise ValueError(f"load_state_dict: {key} is an integer buffer ({target.dtype}), got the "
                         f"non-integral value(s) {arr}")
    return arr


class Module:
    """Base class of layers: parameters, buffers and submodules registered by assignment."""

    def __init_subclass__(cls, **kwargs):
        # A layer's forward and backward run on their input's device (CuPy's current device may
        # be another): the layer's own arithmetic (running statistics, gradient accumulation)
        # allocates and launches there, as the functional ops do.
        super().__init_subclass__(**kwargs)
        for name in ("forward", "backward"):
            if name in cls.__dict__:
                setattr(cls, name, on_array_device(cls.__dict__[name]))

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # --- registration ----------------------------------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError("call Module.__init__() before assigning attributes")
        if isinstance(value, Parameter):
            self._forget(name)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._forget(name)
            self._modules[name] = value
        elif name in self._buffers:
            self._buffers[name] = value
        elif name in self._parameters:  # a registered parameter slot takes a Parameter or None
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to parameter {name!r} "
                                f"(use a Parameter or None)")
            self._parameters[name] = None
        else:
            object.__setattr__(self, name, value)

    def _forget(self, name):
        for table in (self._parameters, self._buffers, self._modules):
            table.pop(name, None)
        self.__dict__.pop(name, None)

    def __getattr__(self, name):
        for table in ("_parameters", "_buffers", "_modules"):
            entries = self.__dict__.get(table)
            if entries is not None and name in entries:
                return entries[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def register_parameter(self, name, param):
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"parameter {name!r} must be a Parameter or None")
        self.__dict__.pop(name, None)
        self._parameters[name] = param

    def register_buffer(self, name, array, persistent=True):
        self.__dict__.pop(name, None)
        self._buffers[name] = array
        if persistent:
            self._non_persistent.discard(name)
        else:
            self._non_persistent.add(name)

    # --- running --------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def backward(self, dy):
        raise NotImplementedError(f"{type(self).__name__} has no backward")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def train(self, mode=True):
        object.__setattr__(self, "training", bool(mode))
        for child in self._modules.values():
            child.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self, set_to_none=True):
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad[...] = 0

    # --- traversal ------------------------------------------------------------------------------
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return (m for _, m in self.named_modules())

    def named_children(self):
        return iter(self._modules.items())

    def children(self):
        return iter(self._modules.values())

    def _named_entries(self, table, prefix, recurse):
        modules = self.named_modules(prefix) if recurse else [(prefix, self)]
        for module_prefix, module in modules:
            for name, value in getattr(module, table).items():
                if value is not None:
                    yield (f"{module_prefix}.{name}" if module_prefix else name), value

    def named_parameters(self, prefix="", recurse=True):
        return self._named_entries("_parameters", prefix, recurse)

    def parameters(self, recurse=True):
        return (p for _, p in self.named_parameters(recurse=recurse))

    def named_buffers(self, prefix="", recurse=True):
        return self._named_entries("_buffers", prefix, recurse)

    def buffers(self, recurse=True):
        return (b for _, b in self.named_buffers(recurse=recurse))

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self, prefix=""):
        """Parameters and persistent buffers by dotted name, as torch names them. The values are
        the layer's own arrays (not copies), as in PyTorch."""
        out = OrderedDict()
        for name, p in self._parameters.items():
            if p is not None:
                out[prefix + name] = p.data
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent:
                out[prefix + name] = b
        for name, child in self._modules.items():
            out.update(child.state_dict(prefix + name + "."))
        return out

    def _upgrade_state_dict(self, state_dict, prefix):
        """Hook for layers whose older checkpoints lack entries; fills them in ``state_dict``."""

    def load_state_dict(self, state_dict, strict=True):
        """Copies ``state_dict`` (arrays or torch tensors) into this module's arrays, in place.
        As in PyTorch, missing or unexpected keys (with ``strict``) and shape mismatches are a
        RuntimeError naming them; a value that is not numeric (or not integral, for an integer
        buffer such as num_batches_tracked) is a TypeError / ValueError naming its key. Every
        value is checked before anything is written.

        Parameters
        ----------
        state_dict : mapping
            Keys as ``state_dict()`` names them; values NumPy/CuPy arrays or torch tensors.
        strict : bool
            Whether missing and unexpected keys are an error.

        Returns
        -------
        (missing, unexpected) : lists of str
        """
        state_dict = OrderedDict(state_dict)
        for prefix, module in self.named_modules():
            module._upgrade_state_dict(state_dict, prefix + "." if prefix else "")
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise RuntimeError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        checked = [(target, _checked_value(key, state_dict[key], target))
                   for key, target in own.items() if key in state_dict]
        for target, value in checked:
            xp = array_module(target)
            target[...] = xp.asarray(value).astype(target.dtype, copy=False)
        return missing, unexpected

    # --- placement ------------------------------------------------------------------------------
    def to(self, device=None, dtype=None):
        """Moves parameters and buffers to ``device`` ('cpu' -> NumPy, 'cuda' -> CuPy) and casts
        floating ones to ``dtype``. Integer buffers (num_batches_tracked) keep their dtype."""
        if device is not None:
            parse_device(device)
        if dtype is not None and np.dtype(dtype).kind != "f":
            raise TypeError(f"Module.to: dtype must be a floating dtype, got {np.dtype(dtype)}")

        def convert(a):
            if device is not None:
                a = to_device(a, device)
            if dtype is not None and a.dtype.kind == "f":
                a = a.astype(dtype, copy=False)
            return a

        for module in self.modules():
            for p in module._parameters.values():
                if p is not None:
                    p.data = convert(p.data)
                    if p.grad is not None:
                        p.grad = convert(p.grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = convert(b)
        return self

    def cpu(self):
        return self.to("cpu")

    def cuda(self):
        return self.to("cuda")

    def double(self):
        return self.to(dtype=np.float64)

    def float(self):
        return self.to(dtype=np.float32)

    # --- printing -------------------------------------------------------------------------------
    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"  ({name}): " + repr(child).replace("\n", "\n  ")
                 for name, child in self._modules.items()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + (")" if not lines else "\n" + "\n".join(lines) + "\n)")


class Sequential(Module):
    """Runs its modules in order; backward runs their backwards in reverse.

    Parameters
    ----------
    *modules : Module
        The modules, registered as children "0", "1", ... in order.
    """

    def __init__(self, *modules):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def backward(self, dy):
        for m in reversed(list(self._modules.values())):
            dy = m.backward(dy)
        return dy
