"""The tensors of a TorchScript archive, read without running any of its code.

A TorchScript file (``torch.jit.save``) is a zip archive with one top folder ``<root>/``:

- ``<root>/data.pkl``: the module tree as a pickle: each module an object of a ``__torch__.*``
  class whose attributes are its parameters, buffers, settings and submodules;
- ``<root>/data/<key>``: the raw bytes of each tensor storage, referred to from the pickle;
- ``<root>/code/...``: the module's TorchScript source (not read here), ``constants.pkl``,
  ``version``, ``byteorder``.

``torch.jit.load`` would compile and run that code, and ``pickle`` would import and call
whatever the file names. Here ``data.pkl`` is interpreted by a small machine of our own that
knows a handful of pickle instructions and an allow-list of names: module classes become
inert records of their attributes, tensors are rebuilt from the storages, and anything else
(any other global, any other call) is refused with :class:`ModelFileError`. The tensors are
named by their attribute paths, as in the module's ``state_dict`` (``encoder.conv1.weight``).
"""

from __future__ import annotations

import os
import pickletools
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from TransferSegLib.errors import ModelFileError
from TransferSegLib.samples import sha256_of

# The module tree of the largest published models is a few hundred kB; a bigger one is not
# a TorchScript module description (and would be parsed into memory whole).
_MAX_PICKLE_BYTES = 64 << 20

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

_STORAGE_KEY = re.compile(r"^[0-9A-Za-z_]+$")


# --- what the pickle may build ------------------------------------------------------------------

@dataclass
class ScriptObject:
    """An inert stand-in for a TorchScript module (or class) object: its type name and the
    attributes the pickle gave it. Nothing of the class is imported or run."""

    type_name: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _ScriptClass:
    name: str


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Function:
    """An allow-listed callable the pickle may REDUCE with."""

    name: str
    call: Callable[..., Any]


class _Refused(Exception):
    """The pickle asks for something outside the allow-list; the message says what."""


class _Damaged(_Refused):
    """The pickle data cannot be parsed (truncated or corrupt)."""


def _build_list(values: Any) -> list:
    if not isinstance(values, list):
        raise _Refused("a typed list built from something other than a list")
    return list(values)


def _restore_type_tag(value: Any, type_name: Any = None) -> Any:
    return value  # the tag only tells TorchScript the static type of a list or dict


def _ordered_dict(*args: Any) -> dict:
    if args:
        raise _Refused("an OrderedDict built with arguments")
    return {}


class _Unpickler:
    """A pickle interpreter for TorchScript's ``data.pkl`` that never imports or calls code
    named by the file: only the instructions and names below are understood."""

    def __init__(self, data: bytes, load_storage: Callable[[str, torch.dtype, int], torch.Tensor]):
        self.data = data
        self.load_storage = load_storage
        self.storages: dict[str, torch.Tensor] = {}
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}

    # allow-list: (module, name) -> what the GLOBAL pushes
    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptClass(f"{module}.{name}")
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): self.rebuild_tensor,
            ("collections", "OrderedDict"): _ordered_dict,
            ("torch.jit._pickle", "build_intlist"): _build_list,
            ("torch.jit._pickle", "build_floatlist"): _build_list,
            ("torch.jit._pickle", "build_doublelist"): _build_list,
            ("torch.jit._pickle", "build_boollist"): _build_list,
            ("torch.jit._pickle", "build_tensorlist"): _build_list,
            ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
        }
        if (module, name) not in allowed:
            raise _Refused(f"the Python name {module}.{name}")
        return _Function(f"{module}.{name}", allowed[module, name])

    def persistent_load(self, pid: Any) -> torch.Tensor:
        """A storage reference ('storage', type, key, location, numel) -> a flat tensor."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"a persistent reference {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType):
            raise _Refused("a storage of an unknown type")
        if not (isinstance(key, str) and _STORAGE_KEY.match(key)):
            raise _Refused(f"a storage with the key {str(key)[:40]!r}")
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise _Refused(f"a storage of {numel!r} elements")
        if key not in self.storages:
            self.storages[key] = self.load_storage(key, kind.dtype, numel)
        storage = self.storages[key]
        if storage.dtype != kind.dtype or storage.numel() != numel:
            raise _Refused(f"a storage {key} used with two different types or sizes")
        return storage

    @staticmethod
    def rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                       hooks: Any, metadata: Any = None) -> torch.Tensor:
        if not isinstance(storage, torch.Tensor):
            raise _Refused("a tensor without a storage")
        numbers = [offset, *_ints(size), *_ints(stride)]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in numbers):
            raise _Refused("a tensor with a negative or non-integer offset, size or stride")
        if len(size) != len(stride):
            raise _Refused("a tensor whose size and stride differ in length")
        if hooks != {}:
            raise _Refused("a tensor with backward hooks")
        if 0 not in size:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
            if last >= storage.numel():
                raise _Refused("a tensor reaching past the end of its storage")
        return storage.as_strided(tuple(size), tuple(stride), offset)

    def pop_mark(self) -> list[Any]:
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def run(self) -> Any:
        try:
            for opcode, arg, _pos in pickletools.genops(self.data):
                done, value = self.step(opcode.name, arg)
                if done:
                    return value
        except _Refused:
            raise
        except (ValueError, IndexError, KeyError, TypeError, AttributeError) as error:
            raise _Damaged(f"{type(error).__name__}: {error}") from None
        raise _Damaged("the pickle data has no end")

    def step(self, name: str, arg: Any) -> tuple[bool, Any]:
        stack = self.stack
        if name in ("PROTO", "FRAME"):
            if name == "PROTO" and arg > 5:
                raise _Refused(f"pickle protocol {arg}")
        elif name == "STOP":
            return True, stack.pop()
        elif name == "MARK":
            self.marks.append(stack)
            self.stack = []
        elif name in ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG",
                      "BINFLOAT", "FLOAT", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
                      "UNICODE"):
            stack.append(arg)
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            items = tuple(stack[-count:])
            del stack[-count:]
            if len(items) != count:
                raise _Refused("a tuple of missing items")
            stack.append(items)
        elif name == "TUPLE":
            stack = self.pop_mark()
            self.stack.append(tuple(stack))
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "APPEND":
            value = stack.pop()
            _expect(stack[-1], list).append(value)
        elif name == "APPENDS":
            items = self.pop_mark()
            _expect(self.stack[-1], list).extend(items)
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            _expect(stack[-1], dict)[_key(key)] = value
        elif name == "SETITEMS":
            items = self.pop_mark()
            target = _expect(self.stack[-1], dict)
            if len(items) % 2:
                raise _Refused("a dict with a key but no value")
            for key, value in zip(items[::2], items[1::2], strict=True):
                target[_key(key)] = value
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            self.memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(self.memo[arg])
        elif name == "GLOBAL":
            module, _, attribute = str(arg).partition(" ")
            stack.append(self.find_class(module, attribute))
        elif name == "STACK_GLOBAL":
            attribute, module = stack.pop(), stack.pop()
            if not (isinstance(module, str) and isinstance(attribute, str)):
                raise _Refused("a global named by something other than text")
            stack.append(self.find_class(module, attribute))
        elif name == "NEWOBJ":
            args, cls = stack.pop(), stack.pop()
            if not isinstance(cls, _ScriptClass) or args != ():
                raise _Refused(f"an object of {_describe(cls)}")
            stack.append(ScriptObject(cls.name))
        elif name == "REDUCE":
            args, function = stack.pop(), stack.pop()
            if not isinstance(function, _Function) or not isinstance(args, tuple):
                raise _Refused(f"a call to {_describe(function)}")
            stack.append(function.call(*args))
        elif name == "BUILD":
            state = stack.pop()
            target = stack[-1]
            if not isinstance(target, ScriptObject):
                raise _Refused(f"a state set on {_describe(target)}")
            if isinstance(state, dict):
                target.attributes.update(state)
            else:  # a class with its own __setstate__: keep the state, never call anything
                target.attributes["__state__"] = state
        elif name == "BINPERSID":
            stack.append(self.persistent_load(stack.pop()))
        else:
            raise _Refused(f"the pickle instruction {name}")
        return False, None


def _ints(values: Any) -> list[Any]:
    if not isinstance(values, (tuple, list)):
        raise _Refused("a tensor whose size or stride is not a tuple")
    return list(values)


def _key(key: Any) -> Any:
    if not isinstance(key, (str, int, float, bool, type(None), tuple)):
        raise _Refused(f"a dict key of type {type(key).__name__}")
    return key


def _expect(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise _Refused(f"items added to {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    if isinstance(value, _ScriptClass):
        return f"the class {value.name}"
    if isinstance(value, _Function):
        return value.name
    return f"a {type(value).__name__}"


# --- the archive -------------------------------------------------------------------------------

def _safe_names(archive: zipfile.ZipFile, path: Path) -> list[str]:
    names = archive.namelist()
    for name in names:
        parts = PurePosixPath(name).parts
        if (name.startswith(("/", "\\")) or "\\" in name or ".." in parts
                or re.match(r"^[A-Za-z]:", name)):
            raise ModelFileError(
                f"{path} holds an archive member with an unsafe path ({name[:120]!r}); "
                "refusing to read it. Re-download the file from its publisher."
            )
    return names


def _root(names: list[str], path: Path) -> str:
    pickles = [name for name in names if PurePosixPath(name).parts[1:] == ("data.pkl",)]
    if len(pickles) != 1:
        legacy = any(name.endswith("model.json") for name in names)
        kind = "an old (PyTorch < 1.4) TorchScript file" if legacy else "not a TorchScript file"
        raise ModelFileError(
            f"{path} is {kind}: it has {len(pickles)} '<folder>/data.pkl' members, not one."
        )
    return PurePosixPath(pickles[0]).parts[0]


def read_torchscript_tensors(
    path: str | os.PathLike, expected_sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive: {attribute path: tensor}.

    Nothing in the file is run: see the module docstring. Names are the attribute paths from
    the root module (``down0.block1.double_conv.0.weight``); tensors are independent,
    contiguous CPU copies in the file's dtype. With ``expected_sha256`` the file must have
    that digest (checked before anything is read). Raises :class:`ModelFileError` for a
    missing, corrupt or refused file; the message names what was refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"TorchScript file {path} does not exist; check the path.")
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256.lower():
            raise ModelFileError(
                f"{path} has sha256 {actual}, not the pinned {expected_sha256}; it is not the "
                "published file (corrupt or replaced). Delete it and fetch it again."
            )
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is not a TorchScript archive (not a zip file).")
    try:
        with zipfile.ZipFile(path) as archive:
            return _read_archive(archive, path)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ModelFileError(f"{path} is a damaged TorchScript archive ({error}).") from None


def _read_archive(archive: zipfile.ZipFile, path: Path) -> dict[str, torch.Tensor]:
    names = _safe_names(archive, path)
    root = _root(names, path)
    byteorder = f"{root}/byteorder"
    if byteorder in names and archive.read(byteorder).strip() != b"little":
        raise ModelFileError(f"{path} stores big-endian tensors, which TransferSeg cannot read.")
    info = archive.getinfo(f"{root}/data.pkl")
    if info.file_size > _MAX_PICKLE_BYTES:
        raise ModelFileError(f"{path}: its module description is {info.file_size} bytes, too "
                             "large for a TorchScript module; is it the right file?")

    def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        member = f"{root}/data/{key}"
        if member not in names:
            raise _Refused(f"a storage {key} that the archive does not hold")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if archive.getinfo(member).file_size != numel * itemsize:
            raise _Refused(f"a storage {key} whose size is not {numel} x {itemsize} bytes")
        raw = bytearray(archive.read(member))
        return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)

    try:
        tree = _Unpickler(archive.read(info), load_storage).run()
    except _Damaged as damage:
        raise ModelFileError(f"{path} is damaged: its module description cannot be parsed "
                             f"({str(damage)[:200]}); download it again.") from None
    except _Refused as refused:
        raise ModelFileError(
            f"{path} cannot be read safely: it uses {refused}, which TransferSeg never runs "
            "or accepts in a weights file; use the file published by the model's authors."
        ) from None
    if not isinstance(tree, ScriptObject):
        raise ModelFileError(
            f"{path} does not describe a TorchScript module (its data is a "
            f"{type(tree).__name__}); a plain PyTorch weights file needs another importer."
        )
    tensors: dict[str, torch.Tensor] = {}
    try:
        _collect(tree, "", tensors, set())
    except RecursionError:
        raise ModelFileError(f"{path} nests its modules too deeply to be a real model.") from None
    if not tensors:
        raise ModelFileError(f"{path} holds no tensors; is it a weights file?")
    return tensors


def _collect(
    node: ScriptObject, prefix: str, into: dict[str, torch.Tensor], seen: set[int]
) -> None:
    if id(node) in seen:  # a module reachable twice (shared submodule): name it once
        return
    seen.add(id(node))
    for name, value in node.attributes.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, torch.Tensor):
            into[prefix + name] = value.clone(memory_format=torch.contiguous_format)
        elif isinstance(value, ScriptObject):
            _collect(value, f"{prefix}{name}.", into, seen)
