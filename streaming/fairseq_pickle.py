"""Read fairseq `.pt` checkpoints without fairseq: a restricted unpickler for `torch.load`.

A fairseq checkpoint is a pickle that references fairseq classes (`fairseq.data.dictionary.Dictionary` in
`task_state`, meters in `extra_state`), sometimes omegaconf containers (`cfg` of older checkpoints) or an
`argparse.Namespace` (legacy `args`). None of them is needed to run the model, and fairseq must not be installed.

`RestrictedUnpickler.find_class` therefore resolves globals in three ways and no other:
  * `fairseq.*`, `omegaconf.*` and `argparse.Namespace` -> an inert stand-in class (made here, never imported)
    that absorbs whatever the pickle feeds it (constructor args, `__setstate__` state, dict/list items) and
    exposes it as plain data;
  * an explicit allow-list of the torch / collections / numpy globals a torch checkpoint needs (tensor and
    parameter rebuild functions, storages, dtypes, `OrderedDict`, numpy array reconstruction...), plus a few
    inert builtin types and `typing.Any` (omegaconf metadata pickles type references such as `typing.Any`);
  * anything else (`os.system`, `builtins.eval`, `subprocess.Popen`, `torch.hub.load`...) raises
    `UnpicklingRefused` naming the module, the name and the file.

`plain_data(obj)` turns the stand-ins of config containers (omegaconf DictConfig/ListConfig/value nodes,
`Namespace`) into ordinary dicts/lists/values so cfg fields can be read.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import pickle
import types
import typing
import zipfile
from collections import Counter, OrderedDict, defaultdict, deque
from pathlib import Path
from typing import Any

from streaming.load_errors import unreadable

# Globals replaced by inert stand-ins: whole module trees, and single (module, name) pairs.
STANDIN_MODULE_PREFIXES: tuple[str, ...] = ("fairseq", "omegaconf")
STANDIN_GLOBALS: frozenset[tuple[str, str]] = frozenset({("argparse", "Namespace")})


class UnpicklingRefused(pickle.UnpicklingError):
    """The pickle references a global that is neither allow-listed nor replaced by a stand-in."""

    def __init__(self, module: str, name: str, source: str):
        self.module, self.name, self.source = module, name, source
        super().__init__(
            f"{source}: refusing to unpickle global {module}.{name}: only torch tensor/storage rebuild functions, "
            f"collections containers, numpy array globals and inert stand-ins for fairseq.*, omegaconf.* and "
            f"argparse.Namespace are allowed in a checkpoint"
        )


# ----------------------------------------------------------------------------------------------------------------
# Inert stand-ins


class InertStandIn:
    """Instance of a class that could not (and must not) be imported. Holds the pickled payload as plain data.

    Pickle builds objects by calling the class (REDUCE: `cls(*args)`), `cls.__new__(cls, *args)` (NEWOBJ), then
    `__setstate__(state)` (BUILD), `obj[key] = value` (SETITEMS) or `obj.append(x)` (APPENDS). All of that is
    recorded; nothing runs.
    """

    standin_module: typing.ClassVar[str] = "?"
    standin_name: typing.ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = object.__new__(cls)
        object.__setattr__(obj, "standin_args", tuple(args))
        object.__setattr__(obj, "standin_kwargs", dict(kwargs))
        object.__setattr__(obj, "standin_state", None)
        object.__setattr__(obj, "standin_items", {})
        object.__setattr__(obj, "standin_list", [])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # arguments were recorded by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "standin_state", state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.standin_items[key] = value

    def append(self, value: Any) -> None:
        self.standin_list.append(value)

    def extend(self, values: Any) -> None:
        self.standin_list.extend(values)

    @property
    def standin_dict(self) -> dict:
        """The pickled instance attributes: a dict state, or the dict half of a (dict, slots) state."""
        state = self.standin_state
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            merged = dict(state[0] or {})
            if isinstance(state[1], dict):
                merged.update(state[1])
            return merged
        return state if isinstance(state, dict) else {}

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not found normally: read them from the pickled attribute dict.
        if name.startswith("__") or name.startswith("standin_"):
            raise AttributeError(name)
        attrs = self.standin_dict
        if name in attrs:
            return attrs[name]
        raise AttributeError(f"stand-in for {self.standin_module}.{self.standin_name} has no attribute {name!r}")

    def __getitem__(self, key: Any) -> Any:
        if key in self.standin_items:
            return self.standin_items[key]
        return self.standin_dict[key]

    def __repr__(self) -> str:
        keys = sorted(map(str, self.standin_dict))[:8]
        return f"<inert {self.standin_module}.{self.standin_name} args={len(self.standin_args)} attrs={keys}>"


_STANDIN_CLASSES: dict[tuple[str, str], type] = {}


def standin_class(module: str, name: str) -> type:
    """The (cached) inert stand-in class for `module.name`."""
    key = (module, name)
    cls = _STANDIN_CLASSES.get(key)
    if cls is None:
        cls = type(
            name.replace(".", "_"),
            (InertStandIn,),
            {"standin_module": module, "standin_name": name, "__module__": __name__,
             "__qualname__": f"StandIn[{module}.{name}]"},
        )
        _STANDIN_CLASSES[key] = cls
    return cls


def is_standin(obj: Any, qualified_name: str | None = None) -> bool:
    """True for a stand-in instance (optionally: for that `module.name`, or just `name`)."""
    if not isinstance(obj, InertStandIn):
        return False
    if qualified_name is None:
        return True
    full = f"{obj.standin_module}.{obj.standin_name}"
    return qualified_name in (full, obj.standin_name)


def plain_data(obj: Any) -> Any:
    """Recursively turn config containers (and their stand-ins) into dicts, lists and plain values.

    omegaconf DictConfig/ListConfig keep their children in `_content`, value nodes keep theirs in `_val`;
    `argparse.Namespace` keeps attributes in its state; an enum-like stand-in built from one value is that value.
    Other stand-ins (e.g. a fairseq Dictionary) are returned as they are.
    """
    if isinstance(obj, InertStandIn):
        attrs = obj.standin_dict
        if "_content" in attrs:
            return plain_data(attrs["_content"])
        if "_val" in attrs:
            return plain_data(attrs["_val"])
        if obj.standin_name == "Namespace":
            return {k: plain_data(v) for k, v in attrs.items()}
        if not attrs and not obj.standin_items and len(obj.standin_args) == 1:
            value = obj.standin_args[0]
            if isinstance(value, (str, int, float, bool)) or value is None:
                return value
        return obj
    if isinstance(obj, dict):
        return {k: plain_data(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain_data(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain_data(v) for v in obj)
    return obj


def resolve_interpolations(cfg: Any, root: Any | None = None, _depth: int = 0) -> Any:
    """Replace omegaconf-style absolute interpolations ("${task.normalize}") in plain cfg data by their values.

    Pickled DictConfigs keep interpolations unresolved; fairseq resolves them when it loads a checkpoint.
    Unresolvable references are left as they are (the caller's type checks then name the field)."""
    root = cfg if root is None else root
    if isinstance(cfg, dict):
        return {k: resolve_interpolations(v, root, _depth) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [resolve_interpolations(v, root, _depth) for v in cfg]
    if isinstance(cfg, str) and cfg.startswith("${") and cfg.endswith("}") and _depth < 8:
        node: Any = root
        for part in cfg[2:-1].split("."):
            if not isinstance(node, dict) or part not in node:
                return cfg
            node = node[part]
        return resolve_interpolations(node, root, _depth + 1)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# The allow-list


def _numpy_multiarray() -> types.ModuleType:
    try:
        return importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module("numpy.core.multiarray")


def _numpy_numeric() -> types.ModuleType:
    try:
        return importlib.import_module("numpy._core.numeric")
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module("numpy.core.numeric")


_ALLOWED: dict[tuple[str, str], Any] | None = None


def allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object for every global a torch checkpoint may reference (built once, lazily)."""
    global _ALLOWED
    if _ALLOWED is not None:
        return _ALLOWED
    import codecs

    import numpy as np
    import torch

    allowed: dict[tuple[str, str], Any] = {}
    # tensors, parameters, storages
    for fn in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
               "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, fn):
            allowed[("torch._utils", fn)] = getattr(torch._utils, fn)
    allowed[("torch.nn.parameter", "Parameter")] = torch.nn.Parameter
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch", "device")] = torch.device
    allowed[("torch", "Tensor")] = torch.Tensor
    allowed[("torch.storage", "UntypedStorage")] = torch.storage.UntypedStorage
    allowed[("torch", "UntypedStorage")] = torch.UntypedStorage
    allowed[("torch.storage", "TypedStorage")] = torch.storage.TypedStorage
    for dtype, storage_name in torch.storage._dtype_to_storage_type_map().items():
        allowed[("torch", str(dtype).split(".", 1)[1])] = dtype
        allowed[("torch", storage_name)] = torch.serialization.StorageType(storage_name)
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    # containers
    allowed[("collections", "OrderedDict")] = OrderedDict
    allowed[("collections", "Counter")] = Counter
    allowed[("collections", "defaultdict")] = defaultdict
    allowed[("collections", "deque")] = deque
    # numpy arrays and scalars (numpy 1.x pickles say numpy.core, numpy 2.x say numpy._core)
    multiarray, numeric = _numpy_multiarray(), _numpy_numeric()
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        if hasattr(numeric, "_frombuffer"):
            allowed[(mod, "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # bytes under protocol 2, and inert builtin types (omegaconf metadata pickles type references)
    allowed[("_codecs", "encode")] = codecs.encode
    for t in (set, frozenset, bytearray, complex, slice, dict, list, tuple, int, float, str, bool, bytes, object):
        allowed[("builtins", t.__name__)] = t
    allowed[("typing", "Any")] = typing.Any
    _ALLOWED = allowed
    return allowed


def resolve_global(module: str, name: str, source: str = "<pickle>") -> Any:
    """What `find_class(module, name)` returns: a stand-in, an allow-listed object, or `UnpicklingRefused`."""
    # Protocol-2 pickles written by Python 3 name builtins the Python 2 way (`__builtin__.dict`); the default
    # find_class translates them, so ours must too.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    top = module.split(".", 1)[0]
    if top in STANDIN_MODULE_PREFIXES or (module, name) in STANDIN_GLOBALS:
        return standin_class(module, name)
    obj = allowed_globals().get((module, name))
    if obj is None:
        raise UnpicklingRefused(module, name, source)
    return obj


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` goes through `resolve_global`. `source` names the file in errors."""

    source: str = "<pickle>"

    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name, self.source)


def restricted_pickle_module(source: str = "<pickle>") -> types.ModuleType:
    """A module-like object for `torch.load(pickle_module=...)` whose Unpickler is restricted and names `source`."""
    mod = types.ModuleType("speechgpt_rt_restricted_pickle")

    class _Unpickler(RestrictedUnpickler):
        pass

    _Unpickler.source = source

    def load(file, **kwargs):
        return _Unpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs):
        import io

        return _Unpickler(io.BytesIO(data), **kwargs).load()

    mod.Unpickler = _Unpickler
    mod.load = load
    mod.loads = loads
    mod.UnpicklingError = pickle.UnpicklingError
    return mod


def load_fairseq_checkpoint(path: str | Path, *, mmap: bool | None = None) -> dict:
    """`torch.load` a fairseq checkpoint on CPU with the restricted unpickler (fairseq not installed).

    `mmap=None` memory-maps zip-format checkpoints (torch >= 1.6) and reads legacy ones into memory.
    The file is trusted only as far as the allow-list goes: no global outside it can be resolved.
    An empty, truncated or non-checkpoint file raises `streaming.load_errors.UnreadableFile` naming it.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: fairseq checkpoint not found")
    if mmap is None:
        mmap = zipfile.is_zipfile(path)
    try:
        state = torch.load(
            path,
            map_location="cpu",
            pickle_module=restricted_pickle_module(str(path)),
            weights_only=False,
            mmap=mmap,
        )
    except UnpicklingRefused:
        raise  # already names the file and the refused global
    except Exception as exc:  # noqa: BLE001 - EOFError, RuntimeError (zip), UnpicklingError...: the file is broken
        raise unreadable(path, "torch checkpoint", exc) from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a fairseq checkpoint dict at the top level, got {type(state).__name__}")
    return state
