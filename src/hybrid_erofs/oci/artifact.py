"""OCI artifacts attached to an image manifest (`subject`): push, find and fetch the index files.

Push order is blobs, then the manifest by digest, then (without the Referrers API) the
`sha256-<hex>` referrers tag (distribution-spec 1.1 "Pushing Manifests with Subject").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..errors import InvalidInput, OutputError, RegistryError
from ..indexing.imageindex import ARTIFACT_TYPE, file_digest
from ..outfile import write_atomic_chunks
from .client import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    RegistryClient,
    parse_descriptor,
)
from .reference import validate_digest
from .transit import inflate_to

TITLE = "org.opencontainers.image.title"
# image-spec manifest.md "Guidance for an Empty Descriptor": the config of an artifact.
EMPTY_CONFIG = Descriptor(
    "application/vnd.oci.empty.v1+json",
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", 2)
EMPTY_DATA = b"{}"
_NOT_TAG_CHARS = re.compile(r"[^a-zA-Z0-9_.-]")


@dataclass(frozen=True, slots=True)
class ArtifactFile:
    """One blob of an artifact: `name` (a plain file name) becomes its title annotation."""

    name: str
    media_type: str
    path: Path


@dataclass(frozen=True, slots=True)
class Referrer:
    """A manifest that refers to a subject, as listed by the Referrers API or the tag index."""

    media_type: str
    digest: str
    size: int
    artifact_type: str
    annotations: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size)


@dataclass(frozen=True, slots=True)
class PushReport:
    """What push_artifact did. `referrers` is "api" (the registry indexes subjects itself) or
    "tag" (the client keeps the `sha256-<hex>` index); `tag_updated` says that tag was written."""

    manifest_digest: str
    blobs_uploaded: int
    blobs_present: int
    manifest_pushed: bool
    referrers: str
    tag_updated: bool


def referrers_tag(digest: str) -> str:
    """The fallback tag of a subject (DS:787-801): `<alg>-<hex>`, algorithm cut to 32 and
    encoded part to 64 characters, characters not allowed in tags replaced by "-"."""
    algorithm, _, encoded = digest.partition(":")
    return _NOT_TAG_CHARS.sub("-", f"{algorithm[:32]}-{encoded[:64]}")


def build_artifact_manifest(
    subject: Descriptor, files: Sequence[ArtifactFile], *, artifact_type: str = ARTIFACT_TYPE,
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """The artifact's OCI image manifest (image-spec manifest.md "Guidelines for Artifact
    Usage"): empty config, one layer per file in order, `subject`. Deterministic bytes (sorted
    keys, compact, no time), so pushing the same files again gives the same digest."""
    return _manifest_body(subject, _describe(files), artifact_type, annotations)


def push_artifact(
    client: RegistryClient, subject: Descriptor, files: Sequence[ArtifactFile], *,
    artifact_type: str = ARTIFACT_TYPE, annotations: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> PushReport:
    """Push `files` as an artifact whose subject is the (platform) manifest `subject`.

    Blobs the registry has (HEAD) are skipped, and so is an existing manifest; the referrers
    tag is only rewritten when it lacks the manifest, so a repeated push writes nothing. The
    tag update is read-modify-write without locking (as ggcr): concurrent pushes for one
    subject may lose an entry.
    """
    say = progress or (lambda message: None)
    layers = _describe(files)
    body = _manifest_body(subject, layers, artifact_type, annotations)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    uploaded = present = 0
    sources: dict[str, tuple[Descriptor, bytes | Path, str]] = {
        EMPTY_CONFIG.digest: (EMPTY_CONFIG, EMPTY_DATA, "config")}
    for file, layer in layers:
        sources.setdefault(layer.digest, (layer, file.path, file.name))
    for blob, data, name in sources.values():
        if client.head_blob(blob.digest):
            present += 1
            say(f"{name}: {blob.digest} already in the registry")
            continue
        client.upload_blob(blob, data)
        uploaded += 1
        say(f"{name}: uploaded {blob.size} bytes as {blob.digest}")
    pushed = not client.head_manifest(digest)
    if pushed:
        headers = client.put_manifest(digest, body, media_type=OCI_MANIFEST)
        uses_api = "oci-subject" in headers
        say(f"manifest {digest}: pushed")
    else:
        uses_api = client.get_referrers(subject.digest, artifact_type=artifact_type) is not None
        say(f"manifest {digest}: already in the registry")
    tag_updated = False
    if not uses_api:
        entry: dict[str, object] = {"mediaType": OCI_MANIFEST, "digest": digest,
                                    "size": len(body), "artifactType": artifact_type}
        if annotations:
            entry["annotations"] = dict(annotations)
        tag_updated = _add_to_referrers_tag(client, subject.digest, entry)
        say(f"referrers tag {referrers_tag(subject.digest)}: "
            + ("updated" if tag_updated else "already lists the artifact"))
    return PushReport(digest, uploaded, present, pushed, "api" if uses_api else "tag",
                      tag_updated)


def find_artifacts(
    client: RegistryClient, subject_digest: str, *, artifact_type: str | None = ARTIFACT_TYPE,
) -> list[Referrer]:
    """The artifacts attached to `subject_digest` (all types when `artifact_type` is None), in
    the registry's order: from the Referrers API, else from the referrers tag; [] when neither
    exists. Filtered here too, as OCI-Filters-Applied may be absent (DS:677)."""
    validate_digest(subject_digest, subject=str(client.reference))
    index = client.get_referrers(subject_digest, artifact_type=artifact_type)
    if index is None:
        index = client.get_manifest_if_present(referrers_tag(subject_digest))
        if index is None:
            return []
    where = f"referrers of {subject_digest}"
    found = []
    for raw in _entries(index, where):
        referrer = _parse_referrer(raw, where)
        if artifact_type is None or referrer.artifact_type == artifact_type:
            found.append(referrer)
    return found


def artifact_layers(
    client: RegistryClient, artifact: Descriptor | Referrer, *,
    artifact_type: str = ARTIFACT_TYPE, max_blob_size: int = 4 << 30,
) -> dict[str, Descriptor]:
    """An artifact's files as its manifest lists them: title -> blob, in manifest order.

    The manifest is digest-checked and must be an OCI manifest of `artifact_type` whose layer
    titles are unique plain names, each blob at most `max_blob_size` bytes."""
    manifest = client.get_manifest(artifact.digest, expected_digest=artifact.digest)
    where = artifact.digest
    if manifest.media_type != OCI_MANIFEST or len(manifest.body) != artifact.size:
        raise RegistryError(f"{where}: expected an OCI manifest of {artifact.size} bytes, got "
                            f"{manifest.media_type} of {len(manifest.body)} bytes")
    found_type = manifest.data.get("artifactType")
    if found_type != artifact_type:
        raise RegistryError(f"{where}: artifactType is {found_type!r}, not {artifact_type!r}")
    raw_layers = manifest.data.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise RegistryError(f"{where}: artifact manifest has no layers")
    wanted: dict[str, Descriptor] = {}
    for position, raw in enumerate(raw_layers):
        layer = parse_descriptor(raw, where)
        assert isinstance(raw, dict)  # parse_descriptor refuses anything else
        layer_annotations = raw.get("annotations")
        title = layer_annotations.get(TITLE) if isinstance(layer_annotations, dict) else None
        if not isinstance(title, str) or not _plain_name(title) or title in wanted:
            raise RegistryError(f"{where}: layer {position} title {str(title)[:100]!r} is not "
                                "a unique plain file name")
        if layer.size > max_blob_size:
            raise RegistryError(f"{where}: layer {position} ({title}) has {layer.size} bytes, "
                                f"more than the limit of {max_blob_size}")
        wanted[title] = layer
    return wanted


def fetch_artifact(
    client: RegistryClient, artifact: Descriptor | Referrer, dest_dir: Path, *,
    artifact_type: str = ARTIFACT_TYPE, max_blob_size: int = 4 << 30,
) -> dict[str, Path]:
    """Download an artifact's files (artifact_layers) into `dest_dir` (created if needed):
    title -> path. Each blob is streamed to a temporary file, its size and digest checked,
    then renamed into place; a file already there with the right digest is kept."""
    wanted = artifact_layers(client, artifact, artifact_type=artifact_type,
                             max_blob_size=max_blob_size)
    make_directory(dest_dir)
    paths: dict[str, Path] = {}
    for title, layer in wanted.items():
        paths[title] = fetch_blob_file(client, layer, dest_dir / title, max_size=max_blob_size)
    return paths


def make_directory(path: Path) -> None:
    """mkdir -p, OutputError naming `path` on failure."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create: {exc.strerror}") from exc


def fetch_blob_file(client: RegistryClient, descriptor: Descriptor, target: Path, *,
                    max_size: int = 4 << 30) -> Path:
    """Blob `descriptor` as the file `target`: kept when it is there with the right size and
    digest, else streamed to a temporary file, checked, and renamed into place."""
    if not has_content(target, descriptor):
        _download(client, descriptor, target, max_size)
    return target


def fetch_gzip_blob_file(client: RegistryClient, compressed: Descriptor, plain: Descriptor,
                         target: Path, *, max_size: int = 4 << 30) -> Path:
    """The file `plain` (digest and size) from blob `compressed`, its gzip (oci/transit.py):
    kept when `target` already holds it; else the blob is streamed to an unnamed temporary
    file and its digest checked, and only then inflated into `target`, at most plain.size
    bytes, which must hash to plain.digest (IndexFormatError otherwise, no file left)."""
    if has_content(target, plain):
        return target
    if plain.size > max_size:
        raise RegistryError(f"{compressed.digest}: inflates to {plain.size} bytes, more than "
                            f"the limit of {max_size}")
    with _spooled(client, compressed, target.parent, max_size) as spool:
        inflate_to(spool, target, digest=plain.digest, size=plain.size,
                   subject=f"blob {compressed.digest} ({target.name})")
    return target


# -- helpers ----------------------------------------------------------------------------------

def _plain_name(name: str) -> bool:
    """A file name that stays in its directory: no separators, NUL or leading dot."""
    return bool(name) and len(name) <= 255 and not name.startswith(".") and not any(
        c in name for c in "/\\\0")


def _describe(files: Sequence[ArtifactFile]) -> list[tuple[ArtifactFile, Descriptor]]:
    """Check the names and hash each file by streaming it."""
    if not files:
        raise InvalidInput("an artifact needs at least one file")
    seen: set[str] = set()
    described = []
    for file in files:
        if not _plain_name(file.name) or file.name in seen:
            raise InvalidInput(f"{file.path}: artifact file name {file.name!r} is not a unique "
                               "plain file name")
        if not file.media_type:
            raise InvalidInput(f"{file.path}: artifact file {file.name!r} has no media type")
        seen.add(file.name)
        try:
            digest, size = file_digest(file.path)
        except OSError as exc:
            raise InvalidInput(f"{file.path}: cannot read: {exc.strerror}") from exc
        described.append((file, Descriptor(file.media_type, digest, size)))
    return described


def _manifest_body(subject: Descriptor, layers: Sequence[tuple[ArtifactFile, Descriptor]],
                   artifact_type: str, annotations: Mapping[str, str] | None) -> bytes:
    """The deterministic JSON of the artifact manifest."""
    if subject.media_type not in MANIFEST_TYPES | INDEX_TYPES:
        raise InvalidInput(f"{subject.digest}: subject media type {subject.media_type!r} is not "
                           "a manifest type")
    validate_digest(subject.digest, subject="artifact subject")
    document: dict[str, object] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": _descriptor_json(EMPTY_CONFIG),
        "layers": [_descriptor_json(layer, {TITLE: file.name}) for file, layer in layers],
        "subject": _descriptor_json(subject),
    }
    if annotations:
        document["annotations"] = dict(annotations)
    return _canonical(document)


def _descriptor_json(descriptor: Descriptor,
                     annotations: dict[str, str] | None = None) -> dict[str, object]:
    document: dict[str, object] = {"mediaType": descriptor.media_type,
                                   "digest": descriptor.digest, "size": descriptor.size}
    if annotations:
        document["annotations"] = annotations
    return document


def _canonical(document: Mapping[str, object]) -> bytes:
    """Sorted keys, no spaces, UTF-8: the same document always has the same digest."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def _entries(index: Manifest, where: str) -> list[object]:
    if not index.is_index or not isinstance(index.data.get("manifests", []), list):
        raise RegistryError(f"{where}: expected an OCI index, got {index.media_type}")
    entries = index.data.get("manifests", [])
    assert isinstance(entries, list)
    return entries


def _parse_referrer(raw: object, where: str) -> Referrer:
    descriptor = parse_descriptor(raw, where)
    assert isinstance(raw, dict)  # parse_descriptor refuses anything else
    artifact_type = raw.get("artifactType")
    annotations = raw.get("annotations")
    return Referrer(
        descriptor.media_type, descriptor.digest, descriptor.size,
        artifact_type if isinstance(artifact_type, str) else "",
        {k: v for k, v in annotations.items() if isinstance(k, str) and isinstance(v, str)}
        if isinstance(annotations, dict) else {})


def _add_to_referrers_tag(client: RegistryClient, subject_digest: str,
                          entry: dict[str, object]) -> bool:
    """Append `entry` to the subject's referrers tag index unless its digest is listed
    (DS:542-557: a missing tag means an empty index). True when the tag was written."""
    tag = referrers_tag(subject_digest)
    current = client.get_manifest_if_present(tag)
    document: dict[str, object] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if current is not None:
        where = f"{client.reference.registry}/{client.reference.repository}:{tag}"
        entries = _entries(current, where)
        if any(isinstance(e, dict) and e.get("digest") == entry["digest"] for e in entries):
            return False
        document = dict(current.data)
    listed = document["manifests"]
    assert isinstance(listed, list)
    document["manifests"] = [*listed, entry]
    client.put_manifest(tag, _canonical(document), media_type=OCI_INDEX)
    return True


def has_content(path: Path, descriptor: Descriptor) -> bool:
    """True when `path` is a regular file (not a link) with the descriptor's size and digest."""
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size != descriptor.size:
            return False
        return file_digest(path) == (descriptor.digest, descriptor.size)
    except OSError:
        return False


@contextlib.contextmanager
def _spooled(client: RegistryClient, blob: Descriptor, directory: Path,
             max_size: int) -> Iterator[IO[bytes]]:
    """Blob `blob` in an unnamed temporary file in `directory`, its size and digest checked,
    positioned at its start."""
    try:
        with tempfile.TemporaryFile(dir=directory) as spool:
            with contextlib.closing(client.stream_blob(blob, max_size=max_size)) as chunks:
                for chunk in chunks:  # raises on a size or digest mismatch, before it ends
                    spool.write(chunk)
            spool.seek(0)
            yield spool
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"{directory}: cannot write: {exc.strerror}") from exc


def _download(client: RegistryClient, layer: Descriptor, target: Path, max_size: int) -> None:
    """Stream a blob into `target` atomically (outfile.write_atomic_chunks): nothing is left
    behind when the download, the size or the digest check fails."""
    with contextlib.closing(client.stream_blob(layer, max_size=max_size)) as chunks:
        write_atomic_chunks(target, chunks)
