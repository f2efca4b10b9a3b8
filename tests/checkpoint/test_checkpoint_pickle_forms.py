"""DCP `.metadata` reads on every Python (issue 28): CPython 3.11.0-3.11.4 pickle an Enum
member by name, `getattr(EnumClass, "NAME")`, the others by value, `EnumClass(value)`. The
allow-listing unpickler accepts both forms for the enums DCP's metadata holds, at every
pickle protocol, whichever form the running Python writes itself, and refuses every other
use of `getattr`. The pickles are made here (a dispatch_table forces the form, literals
pin the exact bytes), so these tests mean the same on any Python."""

import copyreg
import enum
import io
import pathlib
import pickle
import sys

import pytest
import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner

from runtime.safe_dcp import (_ALLOWED_ENUMS, MetadataUnpickler, UnsafeCheckpointError,
                              read_metadata_file)

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)
MEMBERS = [m for cls in _ALLOWED_ENUMS for m in cls]
MEM_FORMATS = [torch.contiguous_format, torch.channels_last, torch.preserve_format]
META = "torch.distributed.checkpoint.metadata"


def dumps(obj, protocol: int, form: str) -> bytes:
    """`obj` pickled with every allow-listed enum member written by `form` ("name": as
    Python 3.11.0-3.11.4 write it; "value": as 3.10 and 3.11.5+ do)."""
    def by_name(member):
        return getattr, (type(member), member.name)

    def by_value(member):
        return type(member), (member.value,)

    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol)
    pickler.dispatch_table = {**copyreg.dispatch_table,  # keeps torch's own (torch.layout)
                              **{cls: by_name if form == "name" else by_value for cls in _ALLOWED_ENUMS}}
    pickler.dump(obj)
    return buf.getvalue()


def safe_loads(data: bytes):
    return MetadataUnpickler(io.BytesIO(data), "test/.metadata").load()


def metadata_with_every_member() -> dcp_metadata.Metadata:
    """A Metadata whose tensors carry every memory format (so every _MEM_FORMAT_ENCODING
    member), plus the other objects a real save writes."""
    tensors = {
        f"t{i}": dcp_metadata.TensorStorageMetadata(
            properties=dcp_metadata.TensorProperties(dtype=torch.bfloat16, memory_format=fmt),
            size=torch.Size([4, 2]),
            chunks=[dcp_metadata.ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([4, 2]))])
        for i, fmt in enumerate(MEM_FORMATS)}
    return dcp_metadata.Metadata(state_dict_metadata={**tensors, "b": dcp_metadata.BytesStorageMetadata()},
                                 planner_data={"t0": ("t0",)}, version="1.0.0")


def test_every_enum_in_dcp_metadata_is_allow_listed():
    """A torch that adds an enum to DCP's metadata module fails here, not in a user's job."""
    defined = {obj for obj in vars(dcp_metadata).values()
               if isinstance(obj, type) and issubclass(obj, enum.Enum) and obj.__module__ == META}
    assert defined == set(_ALLOWED_ENUMS)
    assert {m.name for m in MEMBERS} >= {"TORCH_CONTIGUOUS_FORMAT", "TORCH_CHANNELS_LAST",
                                         "TORCH_PRESERVE_FORMAT"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("form", ["name", "value"])
def test_every_member_loads_in_both_forms(protocol, form):
    for member in MEMBERS:
        data = dumps(member, protocol, form)
        assert (b"getattr" in data) == (form == "name"), data  # the form we meant
        assert pickle.loads(data) is member  # control: valid bytes for plain pickle
        assert safe_loads(data) is member


# Protocols 0/1 write dataclasses through copyreg._reconstructor, which DCP never does (it
# pickles with the default protocol, 4 or 5): the loader refuses those, members load above.
@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("form", ["name", "value"])
def test_full_metadata_file_in_both_forms(tmp_path, protocol, form):
    original = metadata_with_every_member()
    path = tmp_path / ".metadata"
    path.write_bytes(dumps(original, protocol, form))
    loaded = read_metadata_file(path)
    assert loaded == original
    assert [t.properties.memory_format for k, t in sorted(loaded.state_dict_metadata.items())
            if k != "b"] == MEM_FORMATS


def test_the_form_this_python_writes_itself(tmp_path):
    """What `pickle.dumps` writes here (by name on CPython 3.11.0-3.11.4, CPython gh-105332;
    the container test runs this on the image's 3.11.2) loads too."""
    data = pickle.dumps(metadata_with_every_member())
    by_name = b"getattr" in data
    if sys.implementation.name == "cpython":
        assert by_name == ((3, 11, 0) <= sys.version_info[:3] < (3, 11, 5)), sys.version
    (tmp_path / ".metadata").write_bytes(data)
    assert read_metadata_file(tmp_path / ".metadata") == metadata_with_every_member()


# The exact bytes Python 3.11.2 writes for `_MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST` at
# protocol 2 (GLOBAL "__builtin__ getattr") and at 4 (STACK_GLOBAL "builtins getattr").
LITERALS = {
    "proto2": (b"\x80\x02c__builtin__\ngetattr\nctorch.distributed.checkpoint.metadata\n"
               b"_MEM_FORMAT_ENCODING\nX\x13\x00\x00\x00TORCH_CHANNELS_LAST\x86R."),
    "proto4": (b"\x80\x04\x8c\x08builtins\x8c\x07getattr\x93\x8c%torch.distributed.checkpoint."
               b"metadata\x8c\x14_MEM_FORMAT_ENCODING\x93\x8c\x13TORCH_CHANNELS_LAST\x86R."),
    # protocol 0 INST and OBJ: the other opcodes that call a global
    "inst": (b"(ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n"
             b"VTORCH_CHANNELS_LAST\ni__builtin__\ngetattr\n."),
    "obj": (b"(c__builtin__\ngetattr\nctorch.distributed.checkpoint.metadata\n"
            b"_MEM_FORMAT_ENCODING\nVTORCH_CHANNELS_LAST\no."),
}


@pytest.mark.parametrize("name", list(LITERALS))
def test_literal_by_name_pickles(name):
    data = LITERALS[name]
    assert pickle.loads(data) is dcp_metadata._MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST
    assert safe_loads(data) is dcp_metadata._MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST


def _getattr_call(target: bytes, *args: bytes, getattr_global=b"cbuiltins\ngetattr\n") -> bytes:
    """Protocol-0 bytes calling getattr(target, *args) (each a protocol-0 fragment)."""
    return getattr_global + b"(" + target + b"".join(args) + b"tR."


ENUM = b"c" + META.encode() + b"\n_MEM_FORMAT_ENCODING\n"
REFUSED_CALLS = {
    # an attribute of an allowed enum that is not a member
    "enum.__class__": _getattr_call(ENUM, b"V__class__\n"),
    "enum._member_map_": _getattr_call(ENUM, b"V_member_map_\n"),
    "enum.__reduce_ex__": _getattr_call(ENUM, b"V__reduce_ex__\n"),
    "enum.missing": _getattr_call(ENUM, b"VTORCH_NOT_A_FORMAT\n"),
    # a member name with getattr's default argument, or not a str
    "enum.member+default": _getattr_call(ENUM, b"VTORCH_CHANNELS_LAST\n", b"I0\n"),
    "enum.int": _getattr_call(ENUM, b"I1\n"),
    # allowed classes that are not enums, and not classes at all
    "torch.Size.__new__": _getattr_call(b"ctorch\nSize\n", b"V__new__\n"),
    "Metadata.__init__": _getattr_call(b"c" + META.encode() + b"\nMetadata\n", b"V__init__\n"),
    "str": _getattr_call(b"Vos\n", b"Vsystem\n"),
    # the stand-in itself, to reach the unpickler through the bound method
    "getattr.__self__": _getattr_call(b"cbuiltins\ngetattr\n", b"V__self__\n"),
    "py2-name": _getattr_call(ENUM, b"V__class__\n", getattr_global=b"c__builtin__\ngetattr\n"),
    "inst": b"(" + ENUM + b"V__class__\ni__builtin__\ngetattr\n.",
}


@pytest.mark.parametrize("name", list(REFUSED_CALLS))
def test_getattr_outside_the_enum_shape_is_refused(name, tmp_path):
    data = REFUSED_CALLS[name]
    if name not in ("getattr.__self__", "enum.missing", "enum.int", "str"):
        pickle.loads(data)  # negative control: plain pickle performs the call
    with pytest.raises(UnsafeCheckpointError, match=r"test/\.metadata: refused to load: it calls "
                                                    r"builtins\.getattr\("):
        safe_loads(data)
    path = tmp_path / ".metadata"
    path.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load: it calls builtins\.getattr"):
        read_metadata_file(path)


@pytest.mark.parametrize("target", [b"cos\npath\n", b"cposix\nsystem\n", b"cbuiltins\neval\n",
                                    b"c" + dcp_planner.__name__.encode() + b"\nWriteItemType\n"])
def test_getattr_on_a_global_outside_the_allow_list_is_refused(target):
    """getattr(os.path, "system") and getattr on DCP's planner enums (never in .metadata):
    refused when the global is resolved, before getattr is called."""
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load: it references "):
        safe_loads(_getattr_call(target, b"Vsystem\n"))


# StorageMeta.checkpoint_id is the Path FileSystemWriter made; Python 3.13 pickles it under
# pathlib._local (3.10 - 3.12: pathlib). Bytes as 3.13.0 writes them (protocol 4, no frame).
PATH_313 = (b"\x80\x04\x8c\x0epathlib._local\x8c\tPosixPath\x93\x8c\x04/a/b\x85R.")


def test_python_313_paths_load_on_every_python(tmp_path):
    assert safe_loads(PATH_313) == pathlib.PurePosixPath("/a/b")
    assert type(safe_loads(PATH_313)) is pathlib.PosixPath
    original = metadata_with_every_member()
    original.storage_meta = dcp_metadata.StorageMeta(checkpoint_id=pathlib.PosixPath("/a/b"))
    data = pickle.dumps(original, 4)
    at = data.index(b"\x8c\x07pathlib\x94") if b"\x8c\x07pathlib\x94" in data else -1
    if at >= 0:  # this Python writes "pathlib": rewrite it as 3.13 does
        data = data.replace(b"\x8c\x07pathlib\x94", b"\x8c\x0epathlib._local\x94", 1)
    data = data[:2] + data[11:] if data[2:3] == b"\x95" else data  # drop the FRAME (its length)
    assert b"pathlib._local" in data
    (tmp_path / ".metadata").write_bytes(data)
    assert read_metadata_file(tmp_path / ".metadata") == original


def test_other_pathlib_local_names_are_refused():
    with pytest.raises(UnsafeCheckpointError, match=r"references pathlib\._local\.Path\b"):
        safe_loads(b"\x80\x04\x8c\x0epathlib._local\x8c\x04Path\x93\x8c\x01x\x85R.")
