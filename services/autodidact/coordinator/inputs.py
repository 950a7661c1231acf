"""A job's inputs: where a caller's input reference points, and the snapshot
the job reads instead.

An input field of a recipe (seed_tasks_path, prompts_path, ...) holds a
reference, one of:

    dataset:<dataset_id>        a dataset the caller uploaded (datasets.py)
    inline:<name>               JobSpec.inline_inputs[name], sent with the spec
    s3://bucket/key (gs://, az://)
                                an object, read through fsspec with the
                                coordinator's cloud credentials (its pod's
                                workload identity), only under an input root
                                the operator allows for the tenant
    /path, file:///path         a file of the coordinator's, only under an
                                input root the operator allows (none by default)

At submit the coordinator copies each input, as a stream and off the event
loop, into the job's own folder (`snapshot`), hashing it on the way; the
job's identity covers those hashes, and the job reads only its snapshots on
every (re)start, so a source edited mid-job cannot reach its dataset.

Refusals name the field and the caller's own reference, never anything about
the server's files: a path outside the roots, a missing file and a
directory all get the same answer.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from autodidact.coordinator.tenants import Quotas
from autodidact.errors import InvalidArgument
from autodidact.validation import quoted

CHUNK_BYTES = 1 << 20
OBJECT_SCHEMES = ("s3://", "gs://", "az://")
DATASET_PREFIX = "dataset:"
INLINE_PREFIX = "inline:"
INLINE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
MAX_INLINE_BYTES = 4 * 2**20
# Characters an object key may not hold here: ".." segments and empty ones would
# let a reference climb out of its root's prefix; ? and # are not part of a key.
_BAD_OBJECT_KEY = re.compile(r"(^|/)\.\.?(/|$)|//|[?#\\\x00-\x1f]")


@dataclass(frozen=True)
class InputSource:
    """Where one input's bytes come from: exactly one of the fields is set."""

    path: Path | None = None  # a local file: an uploaded dataset, or an allowed server file
    data: bytes | None = None  # an inline input
    uri: str = ""  # an object-store URI under an allowed root
    # For a server file: the (resolved) root it is under and the folders never read, checked
    # again on the opened file (a folder on the way swapped for a link after the check).
    root: str = ""
    private: tuple[str, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """An input as copied into the job's folder."""

    field: str
    reference: str
    size_bytes: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        return {"field": self.field, "reference": self.reference, "size_bytes": self.size_bytes, "sha256": self.sha256}


def check_inline_inputs(inline: dict[str, str]) -> None:
    total = 0
    for name, text in inline.items():
        if not INLINE_NAME.match(name):
            raise InvalidArgument(f"spec.inline_inputs[{quoted(name)}]", "names are 1 to 64 characters of A-Z a-z 0-9 _ . -")
        total += len(text.encode())
    if total > MAX_INLINE_BYTES:
        raise InvalidArgument(
            "spec.inline_inputs", f"hold {total:,} bytes; at most {MAX_INLINE_BYTES:,}: upload larger inputs (UploadDataset)"
        )


def _no_server_paths(field: str, reference: str) -> InvalidArgument:
    return InvalidArgument(
        field,
        f"{quoted(reference)} is not an input this coordinator reads: send the data with UploadDataset and name it "
        '"dataset:<dataset_id>", or inline ("inline:<name>" with spec.inline_inputs)',
    )


def _outside_roots(field: str, reference: str) -> InvalidArgument:
    # One answer for outside the roots, missing, a directory, a device: which one it is would tell a caller about the server's files.
    return InvalidArgument(field, f"{quoted(reference)} is not a readable file under an input root this tenant may use")


def locate(
    field: str,
    reference: str,
    inline: dict[str, str],
    roots: tuple[str, ...],
    dataset_path: Callable[[str, str], Path],
    private: tuple[Path, ...] = (),
) -> InputSource:
    """The source an input reference names, checked against the tenant's roots.
    `dataset_path(field, dataset_id)` is the dataset store's data file of an
    uploaded dataset; `private` are folders never read whatever the roots (the
    coordinator's own data: every tenant's uploads and snapshots). Raises InvalidArgument naming `field`; NotFound for an
    unknown dataset."""
    if reference.startswith(DATASET_PREFIX):
        return InputSource(path=dataset_path(field, reference.removeprefix(DATASET_PREFIX)))
    if reference.startswith(INLINE_PREFIX):
        name = reference.removeprefix(INLINE_PREFIX)
        if name not in inline:
            raise InvalidArgument(field, f"names inline input {quoted(name)}, which spec.inline_inputs does not hold")
        return InputSource(data=inline[name].encode())
    if reference.startswith(OBJECT_SCHEMES):
        return InputSource(uri=_object_under_roots(field, reference, roots))
    if reference.startswith("file://"):
        reference = reference.removeprefix("file://")
    return _file_under_roots(field, reference, roots, tuple(os.path.realpath(folder) for folder in private))


def _object_under_roots(field: str, uri: str, roots: tuple[str, ...]) -> str:
    prefixes = [root if root.endswith("/") else root + "/" for root in roots if root.startswith(OBJECT_SCHEMES)]
    if not prefixes:
        raise _no_server_paths(field, uri)
    rest = uri.partition("://")[2]
    if _BAD_OBJECT_KEY.search(rest) or not any(uri.startswith(prefix) for prefix in prefixes):
        raise _outside_roots(field, uri)
    return uri


def _under(path: str, folder: str) -> bool:
    return os.path.commonpath([folder, path]) == folder


def _file_under_roots(field: str, reference: str, roots: tuple[str, ...], private: tuple[str, ...]) -> InputSource:
    folders = [root for root in roots if not root.startswith(OBJECT_SCHEMES)]
    if not folders:
        raise _no_server_paths(field, reference)
    if not reference or "\0" in reference or not os.path.isabs(reference):
        raise _outside_roots(field, reference)
    try:
        # Symlinks resolved before the check: a link inside a root pointing outside it is outside.
        real = os.path.realpath(reference, strict=True)
    except (OSError, ValueError):
        raise _outside_roots(field, reference) from None
    if any(_under(real, folder) for folder in private):
        raise _outside_roots(field, reference)
    for folder in folders:
        root = os.path.realpath(folder)
        if _under(real, root):
            return InputSource(path=Path(real), root=root, private=private)
    raise _outside_roots(field, reference)


def _opened_where_checked(descriptor: int, source: InputSource) -> bool:
    """The file actually opened is under the source's root and outside the private folders:
    a folder on the way swapped for a link between the check and the open is caught here."""
    if not source.root:
        return True  # an uploaded dataset: the coordinator's own file
    try:
        opened = os.readlink(f"/proc/self/fd/{descriptor}")
    except OSError:  # no /proc (not Linux): the check before the open stands alone
        return True
    return _under(opened, source.root) and not any(_under(opened, folder) for folder in source.private)


def _chunks(field: str, reference: str, source: InputSource) -> Iterator[bytes]:
    if source.data is not None:
        for start in range(0, len(source.data), CHUNK_BYTES):
            yield source.data[start : start + CHUNK_BYTES]
        return
    if source.uri:
        import fsspec  # the objectstore extra: only a coordinator configured with object-store roots needs it

        try:
            # A fresh filesystem object: a cached one would also cache listings, and an object
            # replaced since would be read with its old size.
            fs, path = fsspec.core.url_to_fs(source.uri, skip_instance_cache=True)
            with fs.open(path, "rb") as stream:
                while chunk := stream.read(CHUNK_BYTES):
                    yield chunk
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise _outside_roots(field, reference) from None
        return
    assert source.path is not None
    try:
        stream = open_regular(source.path)
    except OSError:
        raise _outside_roots(field, reference) from None
    with stream:
        if not _opened_where_checked(stream.fileno(), source):
            raise _outside_roots(field, reference)
        while chunk := stream.read(CHUNK_BYTES):
            yield chunk


def open_regular(path: Path) -> BinaryIO:
    """Opens a regular file for reading, never through a link: O_NOFOLLOW (the path was
    resolved or is the coordinator's own; a link swapped in since is refused, not followed)
    and O_NONBLOCK (a FIFO must not wait for a writer). A folder, a FIFO, a device: OSError."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise IsADirectoryError(errno.EISDIR, "not a regular file", str(path))
    return os.fdopen(descriptor, "rb")


def file_sha256(path: Path) -> tuple[int, str]:
    """A file's size and sha256 (hex), read in chunks."""
    with path.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256")
        return stream.tell(), digest.hexdigest()


def snapshot(
    field: str, reference: str, source: InputSource, destination: Path, quotas: Quotas, tenant: str, room: int | None = None
) -> Snapshot:
    """Copies the source into `destination` (atomically: a temporary file
    renamed), a chunk at a time, with its size and sha256. Blocking: run it
    in a thread. An input over the tenant's upload_bytes, or over `room` (what
    its stored_bytes quota has left), is refused as soon as the copy passes it."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.partial")
    try:
        if source.path is not None and reference.startswith(DATASET_PREFIX):
            # An uploaded dataset is ours and immutable: a hard link is its snapshot (deleting
            # the dataset then leaves the job's copy), and its hash is taken as it is read.
            os.link(source.path, partial)
            size, sha256 = file_sha256(partial)
        else:
            digest = hashlib.sha256()
            size = 0
            with partial.open("wb") as sink:
                for chunk in _chunks(field, reference, source):
                    size += len(chunk)
                    if size > quotas.upload_bytes:
                        raise quotas.exceeded(tenant, "upload_bytes", f"{field} names a larger input")
                    if room is not None and size > room:
                        raise quotas.exceeded(tenant, "stored_bytes", f"{field} names an input larger than the {room:,} bytes left")
                    digest.update(chunk)
                    sink.write(chunk)
                sink.flush()
                os.fsync(sink.fileno())
            sha256 = digest.hexdigest()
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)
    return Snapshot(field, reference, size, sha256)
