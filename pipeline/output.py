"""Runs whose output is all or nothing: written aside, then committed with a marker written last.

Layout of an output directory OUT (local, gs://, s3://; everything through Beam's FileSystems):

  OUT/_RUNNING.<run id>.json   a run's claim on OUT: run id, command, host, pid, start and heartbeat
  OUT/_temporary/<run id>/     the files of a run in progress (Beam's own temporary files included)
  OUT/...                      the committed files, moved into place at the end of a run
  OUT/_MANIFEST.json           what the last committed run wrote: run id, command, files and sizes
  OUT/_SUCCESS                 written last: OUT holds the complete output of one run

Readers (`instruct`, `train`, `report`) take OUT only when OUT/_SUCCESS exists (`require_committed`).
A run refuses an OUT that another live run claims; a claim whose run was killed (same host: its
process is gone; elsewhere: no heartbeat for STALE_AFTER_S) is removed with its temporary files.
Writing into a committed OUT needs --overwrite. Two runs that claim OUT at the same moment both see
both claims; the older claim wins and the other run backs off.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.util import find_spec

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

LOG = logging.getLogger("magiclens.output")

SUCCESS = "_SUCCESS"
MANIFEST = "_MANIFEST.json"
TEMPORARY = "_temporary"
CLAIM_PREFIX = "_RUNNING."
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0  # a claim from another host with no heartbeat for this long is a killed run's
PROBE_TIMEOUT_S = 20.0  # a remote store that does not answer a small write in this long is unreachable


class OutputError(SystemExit):
    """An output that cannot be used as asked; the message says what to do."""


def local_path(path: str) -> str:
    """`file:///x` -> `/x` (Beam's FileSystems knows local paths, not file:// URLs); others unchanged."""
    return path[len("file://"):] if path.startswith("file://") else path


def is_remote(path: str) -> bool:
    return FileSystems.get_scheme(path) not in (None, "file")


def check_filesystem_available(path: str, flag: str) -> None:
    """A clear error when `path`'s scheme needs a package that is not installed."""
    if path.startswith("s3://") and find_spec("boto3") is None:
        raise OutputError(f"{flag} {path}: s3:// needs boto3; install it with: pip install 'magiclens[s3]'")
    if path.startswith("gs://") and find_spec("google.cloud.storage") is None:
        raise OutputError(f"{flag} {path}: gs:// needs google-cloud-storage; install it with: pip install 'magiclens[gcp]'")


def _check_local(path: str, flag: str) -> None:
    """Local paths: `..` through a missing folder, a file in the way, or a name over the limit."""
    parts = path.split(os.sep)
    for index, part in enumerate(parts):
        through = os.sep.join(parts[:index]) or (os.sep if path.startswith(os.sep) else os.curdir)
        if part == ".." and not os.path.isdir(through):
            raise OutputError(f"{flag} {path}: {through} is not a folder, so '..' cannot go through it; "
                              "give a path without '..', or create the folder first")
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        if len(os.path.basename(probe).encode()) > 255:
            raise OutputError(f"{flag} {path}: the name {os.path.basename(probe)[:40]}... is longer than "
                              "255 bytes; give a shorter name")
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise OutputError(f"{flag} {path}: {probe} is a file, not a folder; remove it or give another {flag}")


def check_writable(output: str, flag: str = "--output", timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail before any processing when `output` cannot be written: a probe file is written and removed
    (remote stores with a time limit, so a store without network fails in seconds, not minutes)."""
    check_filesystem_available(output, flag)
    if not is_remote(output):
        _check_local(output, flag)
    probe = FileSystems.join(output, TEMPORARY, f"_probe.{uuid.uuid4().hex}")
    failure: list[BaseException] = []

    def write_probe() -> None:
        try:
            with FileSystems.create(probe) as handle:
                handle.write(b"probe\n")
            FileSystems.delete([probe])
        except BaseException as error:  # handed to the caller's thread
            failure.append(error)

    if not is_remote(output):
        write_probe()
    else:
        thread = threading.Thread(target=write_probe, name="magiclens-output-probe", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            raise OutputError(f"{flag} {output}: no answer from the store in {timeout_s:g} s to a small test write; "
                              "check the network and the credentials (e.g. gcloud auth application-default login)")
    if failure:
        raise OutputError(f"{flag} {output} cannot be written: {_explain(failure[0])}")


def _explain(error: BaseException) -> str:
    """The first OSError in a (Beam-wrapped) exception, in words."""
    seen = error
    for _ in range(5):
        nested = getattr(seen, "exception_details", None)
        if isinstance(seen, OSError) and seen.errno is not None:
            break
        if nested:
            seen = next(iter(nested.values()))
        elif seen.__cause__ is not None or seen.__context__ is not None:
            seen = seen.__cause__ or seen.__context__
        elif isinstance(seen, OSError) and seen.args and isinstance(seen.args[0], BaseException):
            seen = seen.args[0]
        else:
            break
    reasons = {
        errno.EACCES: "permission denied (a read-only folder?)",
        errno.EPERM: "operation not permitted (a read-only or immutable folder?)",
        errno.EROFS: "the file system is read-only",
        errno.ENAMETOOLONG: "a name in the path is too long",
        errno.ENOTDIR: "a file is in the way of a folder of the path",
        errno.EEXIST: "a file is in the way of a folder of the path",
        errno.ENOSPC: "no space left on the device",
    }
    reason = reasons.get(getattr(seen, "errno", None))
    return f"{reason} ({seen})" if reason else f"{type(seen).__name__}: {seen}"


def list_files(folder: str) -> list[str]:
    """Every file under `folder`, recursively, sorted ([] when there is none)."""
    pattern = FileSystems.join(folder, "**")
    try:
        return sorted(meta.path for meta in FileSystems.match([pattern])[0].metadata_list)
    except Exception:  # a prefix with no files answers with an error on some stores
        return []


def delete_tree(folder: str) -> None:
    files = list_files(folder)
    if files:
        FileSystems.delete(files)
    if not is_remote(folder) and os.path.isdir(folder):
        FileSystems.delete([folder])


def is_committed(output: str) -> bool:
    return FileSystems.exists(FileSystems.join(local_path(output), SUCCESS))


def require_committed(output: str, flag: str, what: str) -> None:
    """A clear error unless `output` holds a committed run (its _SUCCESS marker is there)."""
    marker = FileSystems.join(local_path(output), SUCCESS)
    if not FileSystems.exists(marker):
        raise OutputError(
            f"{flag} {output}: {marker} is missing, so this is not the complete output of a finished run "
            f"(it is still running, was killed, or failed); rerun {what} into it, or give a finished output"
        )


def written_by_a_run(folder: str) -> bool:
    """Whether `folder` is (or was being made) the output of a magiclens run: it has a marker, a
    manifest, a claim or a temporary folder of one."""
    if any(FileSystems.exists(FileSystems.join(folder, name)) for name in (SUCCESS, MANIFEST)):
        return True
    if list_files_at(folder, CLAIM_PREFIX):
        return True
    return not is_remote(folder) and os.path.isdir(os.path.join(folder, TEMPORARY))


def require_committed_dataset(folder: str, flag: str, what: str) -> None:
    """For a dataset folder (e.g. OUT/pairs) or a run output: when it belongs to a magiclens run, that
    run must be committed. Folders no run wrote (any Parquet dataset) are taken as they are."""
    folder = local_path(folder).rstrip("/")
    for candidate in (folder, FileSystems.split(folder)[0]):
        if candidate and written_by_a_run(candidate):
            require_committed(candidate, flag, what)
            return


def _write_json(path: str, data: object) -> None:
    with FileSystems.create(path, mime_type="application/json") as handle:
        handle.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _read_claim(path: str) -> dict | None:
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return json.loads(handle.read().decode())
    except Exception:  # removed meanwhile, or half written: not a claim to respect
        return None


def claim_is_stale(claim: dict, now: float, host: str = socket.gethostname()) -> bool:
    """A killed run's claim: on this host its process is gone; elsewhere its heartbeat is too old."""
    if claim.get("host") == host:
        try:
            os.kill(int(claim.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            pass
    return now - float(claim.get("heartbeat", 0)) > STALE_AFTER_S


@dataclass
class OutputRun:
    """One run's claim on an output directory and its private temporary folder."""

    output: str
    command: str
    run_id: str
    started: float
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def temp(self) -> str:
        return FileSystems.join(self.output, TEMPORARY, self.run_id)

    @property
    def claim_path(self) -> str:
        return FileSystems.join(self.output, f"{CLAIM_PREFIX}{self.run_id}.json")

    def claim(self) -> dict:
        return {"run_id": self.run_id, "command": self.command, "host": socket.gethostname(), "pid": os.getpid(),
                "started": self.started, "heartbeat": time.time()}

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                _write_json(self.claim_path, self.claim())
            except Exception as error:  # a missed beat only makes the claim look older
                LOG.warning("could not renew the claim %s: %s", self.claim_path, error)

    def abandon(self) -> None:
        """Remove this run's temporary files and its claim (the committed output is left as it was)."""
        self._stop.set()
        delete_tree(self.temp)
        if FileSystems.exists(self.claim_path):
            FileSystems.delete([self.claim_path])

    def commit(self) -> dict:
        """Move every file of the temporary folder into place, replacing what the last run committed
        there (folders whole), then write the manifest and, last, _SUCCESS. Returns the manifest."""
        files = [path for path in list_files(self.temp) if "beam-temp" not in path]
        relative = [path[len(self.temp):].lstrip("/") for path in files]
        success = FileSystems.join(self.output, SUCCESS)
        if FileSystems.exists(success):
            FileSystems.delete([success])
        for top in sorted({name.split("/")[0] for name in relative}):
            target = FileSystems.join(self.output, top)
            if FileSystems.exists(target) or list_files(target):
                delete_tree(target)
        destinations = [FileSystems.join(self.output, name) for name in relative]
        if not is_remote(self.output):
            for folder in sorted({os.path.dirname(path) for path in destinations}):
                os.makedirs(folder, exist_ok=True)
        if files:
            FileSystems.rename(files, destinations)
        sizes = {meta.path: meta.size_in_bytes for result in (FileSystems.match(destinations) if destinations else [])
                 for meta in result.metadata_list}
        manifest = {
            "run_id": self.run_id,
            "command": self.command,
            "started": self.started,
            "committed": time.time(),
            "files": [{"path": name, "bytes": sizes.get(path)} for name, path in zip(relative, destinations)],
        }
        _write_json(FileSystems.join(self.output, MANIFEST), manifest)
        with FileSystems.create(success) as handle:
            handle.write(f"{self.run_id}\n".encode())
        self.abandon()
        return manifest


def _other_claims(output: str, run_id: str) -> Iterable[tuple[str, dict | None]]:
    for path in list_files_at(output, CLAIM_PREFIX):
        if not path.endswith(f"{CLAIM_PREFIX}{run_id}.json"):
            yield path, _read_claim(path)


def list_files_at(output: str, prefix: str) -> list[str]:
    """Files directly in `output` whose names start with `prefix`."""
    try:
        found = FileSystems.match([FileSystems.join(output, prefix + "*")])[0].metadata_list
    except Exception:
        return []
    return sorted(meta.path for meta in found)


def clean_stale(output: str, run_id: str) -> None:
    """Remove the claims and temporary folders of killed runs, and temporary folders of no claim."""
    now = time.time()
    live = {run_id}
    for path, claim in _other_claims(output, run_id):
        if claim is not None and not claim_is_stale(claim, now):
            live.add(claim["run_id"])
            continue
        LOG.warning("removing the claim of a run that is gone: %s (%s)", path, claim)
        FileSystems.delete([path])
    temporary = FileSystems.join(output, TEMPORARY)
    names = {path[len(temporary):].lstrip("/").split("/")[0] for path in list_files(temporary)}
    if not is_remote(temporary) and os.path.isdir(temporary):  # local folders may hold only empty folders
        names.update(os.listdir(temporary))
    for name in sorted(names - live):
        if not name.startswith("_probe."):
            delete_tree(FileSystems.join(temporary, name))


def begin_run(output: str, command: str, overwrite: bool, flag: str = "--output") -> OutputRun:
    """Check that `output` can be written, claim it for this run, and return the run.

    Refuses (OutputError) when another live run holds `output`, or when `output` holds a committed run
    and `overwrite` is False. Stale claims and temporary files of killed runs are removed."""
    output = local_path(output)
    check_writable(output, flag)
    started = time.time()
    run = OutputRun(output, command, f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(started))}-{uuid.uuid4().hex[:8]}",
                    started)
    _write_json(run.claim_path, run.claim())
    try:
        clean_stale(output, run.run_id)
        for path, claim in _other_claims(output, run.run_id):
            if claim is None:
                continue
            if (claim["started"], claim["run_id"]) < (run.started, run.run_id):
                raise OutputError(
                    f"{flag} {output} is being written by another run: {claim.get('command', '')} run {claim['run_id']} "
                    f"on {claim.get('host')} (pid {claim.get('pid')}), started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(claim['started']))}. Wait for it, or give "
                    f"another {flag}; if that run is dead, its claim {path} is removed automatically after "
                    f"{STALE_AFTER_S / 60:g} minutes without a heartbeat")
        if not overwrite and is_committed(output):
            raise OutputError(f"{flag} {output} already holds the committed output of a finished run; "
                              "pass --overwrite to replace it, or give another " + flag)
    except BaseException:
        run.abandon()
        raise
    threading.Thread(target=run._beat, name="magiclens-output-heartbeat", daemon=True).start()
    return run
