"""State records of `hybrid-erofs mount` and `mount-image` (no secrets, atomic, readable back),
the daemons' command lines, an image's layer plan and overlayfs options, and the kernel-NBD
netlink messages checked byte by byte (no nbd module here)."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from hybrid_erofs.device import RegistryOptions
from hybrid_erofs.errors import InvalidInput, MountError
from hybrid_erofs.export.nbd import NbdServer
from hybrid_erofs.indexing.imageindex import ImageEntry
from hybrid_erofs.mounting.image import (
    ImageLayer,
    image_daemon_argv,
    load_plan,
    select_image,
    write_plan,
)
from hybrid_erofs.mounting.kernel import (
    MOUNT_DATA_MAX,
    OVERLAY_OPTIONS,
    overlay_data,
    process_alive,
    process_start_time,
)
from hybrid_erofs.mounting.layer import daemon_argv
from hybrid_erofs.mounting.lifecycle import initial_record
from hybrid_erofs.mounting.nbdlink import (
    NBD_CMD_CONNECT,
    client_handshake,
    connect_attributes,
    genl_message,
    nbd_devices,
)
from hybrid_erofs.mounting.state import (
    IMAGE,
    RUNTIME_ENV,
    LayerState,
    MountRecord,
    StatePaths,
    list_records,
    mount_id,
    runtime_dir,
)
from hybrid_erofs.mounting.stats import collect_image_stats
from hybrid_erofs.source import MemorySource
from hybrid_erofs.sources.metered import MeteredSource

SECRET = "pa55-S3CRET-word"


def _record(tmp_path: Path, mountpoint: str = "/mnt/app") -> tuple[StatePaths, MountRecord]:
    paths = StatePaths.for_mountpoint(mountpoint, root=tmp_path)
    registry = RegistryOptions(platform="linux/amd64", layer=-1, username="ci", password=SECRET,
                               cache_dir=Path("/var/cache/x"))
    record = initial_record("registry.example/app:1", Path(mountpoint), meta=Path("/m.erofs"),
                            zinfo=Path("/l.zinfo"), registry=registry, via="auto", paths=paths)
    return paths, record


def test_record_has_no_secret_and_round_trips(tmp_path: Path) -> None:
    paths, record = _record(tmp_path)
    paths.save(record.with_changes(transport="fuse", fuse_dir=str(paths.fuse_dir)))
    data = paths.record.read_bytes()
    assert SECRET.encode() not in data
    loaded = paths.load()
    assert loaded is not None and loaded.transport == "fuse"
    assert loaded.registry.password_from == "stdin" and loaded.registry.username == "ci"
    assert loaded.registry.layer == -1 and loaded.daemon_pid == os.getpid()
    assert loaded.daemon_start_time == process_start_time(os.getpid())
    # No secret in it: readable by every user, so that `status` works without root.
    assert stat.S_IMODE(paths.record.stat().st_mode) == 0o644
    assert stat.S_IMODE(paths.record.parent.stat().st_mode) == 0o755
    assert [p.name for p in paths.record.parent.iterdir()] == [paths.record.name]  # atomic


def test_daemon_argv_carries_no_password() -> None:
    registry = RegistryOptions(username="ci", password=SECRET, insecure=True, layer=0)
    argv = daemon_argv("reg/app:1", Path("/mnt"), meta=Path("/m"), zinfo=Path("/z"),
                       registry=registry, via="fuse", ready_fd=7)
    assert SECRET not in " ".join(argv)
    assert "--password-stdin" in argv and "--insecure" in argv
    assert argv[-3:] == ["--", "reg/app:1", "/mnt"]
    assert argv[argv.index("--_daemon-ready-fd") + 1] == "7"


def test_daemon_argv_carries_the_read_options_through_the_cli() -> None:
    import click
    from click.testing import CliRunner

    from hybrid_erofs.cli.options import registry_options

    registry = RegistryOptions(cache_dir=Path("/c"), cache_max_bytes=1 << 30, retries=2,
                               retry_delay_s=0.05, failure_ttl_s=1.5, platform="linux/arm64")
    argv = daemon_argv("reg/app:1", Path("/mnt"), meta=Path("/m"), zinfo=None,
                       registry=registry, via="fuse", ready_fd=7)
    got: list[RegistryOptions] = []

    @click.command()
    @click.argument("rest", nargs=-1)
    @registry_options
    def probe(rest: tuple[str, ...], registry: RegistryOptions) -> None:
        got.append(registry)

    flags = argv[argv.index("--zinfo") if "--zinfo" in argv else argv.index("--via") + 2:]
    result = CliRunner().invoke(probe, flags)
    assert result.exit_code == 0, result.output
    assert got == [registry]


def test_unknown_fields_are_ignored_and_garbage_is_an_error(tmp_path: Path) -> None:
    paths, record = _record(tmp_path)
    raw = json.loads(record.to_json())
    raw["future_field"] = 1
    again = MountRecord.from_json(json.dumps(raw).encode(), name="x")
    assert again == record
    with pytest.raises(MountError, match="x: unreadable state record"):
        MountRecord.from_json(b"{not json", name="x")


LATER = {"profile_zinfo": "/c/prefetch-zinfo-sha256-c.zinfo",
         "blob": ["application/vnd.hybrid-erofs.zinfo.v2+gzip", "sha256:" + "a" * 64, 12],
         "plain": ["application/vnd.hybrid-erofs.zinfo.v2", "sha256:" + "b" * 64, 34],
         "profile_digest": "sha256:" + "c" * 64}


def test_a_layer_record_keeps_its_profile_and_its_zinfo_to_come(tmp_path: Path) -> None:
    paths, record = _record(tmp_path)
    paths.save(record.with_changes(prefetch="/c/p.json", later=LATER))
    loaded = paths.load()
    assert loaded is not None and loaded.prefetch == "/c/p.json" and loaded.later == LATER
    raw = json.loads(record.to_json())
    for key in ("prefetch", "later"):  # a record of an earlier release
        del raw[key]
    older = MountRecord.from_json(json.dumps(raw).encode(), name="x")
    assert older.prefetch is None and older.later is None
    with pytest.raises(MountError, match="x: unreadable state record: 'later' must be"):
        MountRecord.from_json(json.dumps({**raw, "later": ["x"]}).encode(), name="x")


@pytest.mark.parametrize("kind", ["layer", "image"])
def test_a_reattach_mounts_again_from_all_the_record_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """The profile and the zinfo to come (a layer started on its profile zinfo) go to the
    new daemon; a follow flag an earlier release recorded does not (the warm-up is gone)."""
    from hybrid_erofs.fetching.background import FetchPolicy
    from hybrid_erofs.mounting import reattach as module
    from hybrid_erofs.trust.bound import ZinfoLater

    paths, record = _record(tmp_path)
    followed = FetchPolicy(delay_s=600.0, follow_s=5.0)
    record = record.with_changes(registry=replace(record.registry, password_from=None),
                                 fetch=tuple(FetchPolicy.argv(followed)))
    if kind == "layer":
        record = record.with_changes(prefetch="/c/p.json", later=LATER)
    else:
        record = record.with_changes(kind=IMAGE, meta=None, zinfo=None, layers=(
            LayerState("reg/app:1", "/m0", "/z0", blob="sha256:" + "d" * 64,
                       prefetch="/c/p0.json"),))
    got: dict[str, object] = {}

    def mounted(*args: object, **kwargs: object) -> MountRecord:
        got.update(kwargs, args=args)
        return record

    monkeypatch.setattr(module, "require_root", lambda _what: None)
    monkeypatch.setattr(module, "find_mount", lambda _mnt: (Path(record.mountpoint), paths,
                                                            record))
    monkeypatch.setattr(module, "daemon_alive", lambda _record: False)
    monkeypatch.setattr(module, "cleanup_mount", lambda _paths, _record: None)
    monkeypatch.setattr(module, "mount_layer", mounted)
    monkeypatch.setattr(module, "mount_image", mounted)
    module.reattach(record.mountpoint)
    assert got["fetch"] == FetchPolicy(delay_s=600.0)
    if kind == "layer":
        assert got["prefetch"] == Path("/c/p.json")
        assert got["later"] == ZinfoLater.from_json(LATER)
    else:
        [layer] = got["args"][2]  # type: ignore[index]
        assert layer.prefetch == Path("/c/p0.json")


def test_list_and_remove(tmp_path: Path) -> None:
    for mountpoint in ("/mnt/b", "/mnt/a"):
        paths, record = _record(tmp_path, mountpoint)
        paths.save(record)
        paths.save_stats({"reads": 3})
        paths.log.write_text("log\n")
        paths.fuse_dir.mkdir(parents=True)
    (tmp_path / "mounts" / "junk.json").write_text("{")
    listed = list_records(tmp_path)
    assert [r.mountpoint for _, r in listed] == ["/mnt/a", "/mnt/b"]
    assert listed[0][0].load_stats() == {"reads": 3}
    for paths, _ in listed:
        paths.remove()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["fuse", "junk.json", "mounts"]


def test_image_record_round_trips_and_remove_spares_mounted_dirs(tmp_path: Path) -> None:
    paths, record = _record(tmp_path, "/mnt/img")
    layers = tuple(LayerState(source="reg/app:1", meta=f"/idx/{n}.meta.erofs",
                              zinfo=f"/idx/{n}.zinfo", blob=f"sha256:{n:064x}",
                              erofs_dir=str(paths.layer_dir(n)), transport="fuse",
                              disk_path=str(paths.layer_fuse_dir(n) / "disk.img"))
                   for n in range(3))
    image = record.with_changes(kind=IMAGE, meta=None, zinfo=None,
                                image_dir=str(paths.image_dir), layers=layers)
    paths.save(image)
    loaded = paths.load()
    assert loaded == image and loaded.is_image and loaded.fstype == "overlay"
    assert not record.is_image and record.fstype == "erofs"
    assert SECRET.encode() not in paths.record.read_bytes()
    # What a stopped image daemon leaves: empty layer dirs, the plan. A non-empty directory
    # (as a mount still on it would look) is never removed.
    for n in range(3):
        paths.layer_dir(n).mkdir(parents=True)
        paths.layer_fuse_dir(n).mkdir(parents=True)
    paths.empty_dir.mkdir()
    write_plan(paths.plan, [])
    (paths.layer_dir(1) / "still-mounted").write_text("x")
    paths.remove()
    assert [str(p.relative_to(paths.image_dir)) for p in paths.image_dir.rglob("*")] == [
        "l", "l/1", "l/1/still-mounted"]
    (paths.layer_dir(1) / "still-mounted").unlink()
    paths.remove()
    assert not paths.image_dir.exists()


def test_layer_plan_round_trips_and_garbage_is_an_error(tmp_path: Path) -> None:
    layers = [ImageLayer("/l0.tar.gz", Path("/m0"), Path("/z0")),
              ImageLayer("reg/app:1", Path("/m1"), None, blob="sha256:" + "a" * 64)]
    write_plan(tmp_path / "plan.json", layers)
    assert stat.S_IMODE((tmp_path / "plan.json").stat().st_mode) == 0o600
    assert load_plan(tmp_path / "plan.json") == layers
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(MountError, match="bad.json: unreadable layer plan"):
        load_plan(tmp_path / "bad.json")
    with pytest.raises(MountError, match="cannot read the layer plan"):
        load_plan(tmp_path / "missing.json")


def test_image_daemon_argv_carries_no_password_and_no_layers() -> None:
    registry = RegistryOptions(username="ci", password=SECRET, platform="linux/arm64")
    argv = image_daemon_argv("reg/app:1", Path("/mnt"), plan=Path("/run/p.json"),
                             registry=registry, via="auto", ready_fd=9)
    assert SECRET not in " ".join(argv)
    assert argv[argv.index("mount-image") + 1] == "--foreground"
    assert argv[argv.index("--_plan") + 1] == "/run/p.json"
    assert argv[argv.index("--platform") + 1] == "linux/arm64"
    assert "--password-stdin" in argv and argv[-3:] == ["--", "reg/app:1", "/mnt"]


def test_overlay_options() -> None:
    data = overlay_data(["l/2", "l/1", "l/0"])
    assert data == "ro,lowerdir=l/2:l/1:l/0," + ",".join(OVERLAY_OPTIONS)
    assert "redirect_dir=nofollow" in data and "metacopy=off" in data
    assert overlay_data(["/a:b", "/c,d\\e"]).startswith(r"ro,lowerdir=/a\:b:/c\,d\\e,")
    with pytest.raises(ValueError, match="at least 2"):
        overlay_data(["l/0"])
    with pytest.raises(MountError, match="at most 500"):
        overlay_data([f"l/{n}" for n in range(501)])
    assert len(overlay_data([f"l/{n}" for n in reversed(range(500))])) <= MOUNT_DATA_MAX
    with pytest.raises(MountError, match="more than mount"):
        overlay_data(["/" + "x" * 100] * 50)


def _image(platform: str) -> ImageEntry:
    return ImageEntry("sha256:" + "0" * 64, "application/vnd.oci.image.manifest.v1+json", 1,
                      platform, "sha256:" + "1" * 64, ())


def test_select_image_by_platform() -> None:
    one, two = _image("linux/amd64"), _image("linux/arm64")
    assert select_image([one], None, where="i.json") is one
    assert select_image([one, two], "linux/arm64", where="i.json") is two
    with pytest.raises(InvalidInput, match=r"i.json: 2 platforms \(linux/amd64, linux/arm64\)"):
        select_image([one, two], None, where="i.json")
    with pytest.raises(InvalidInput, match="no image for platform linux/s390x"):
        select_image([one, two], "linux/s390x", where="i.json")


def test_image_stats_add_up_the_layers() -> None:
    layers = [MeteredSource(MemorySource(bytes(100))) for _ in range(3)]
    layers[0].pread(10, 0)
    layers[2].pread(20, 50)
    stats = collect_image_stats(layers)
    assert stats["reads"] == 2 and stats["bytes_served"] == 30 and stats["errors"] == 0
    assert [layer["reads"] for layer in stats["layers"]] == [1, 0, 1]
    assert stats["hit_rate"] is None  # no chunk cache below a memory source


def test_mount_ids_are_unique_and_readable() -> None:
    assert mount_id("/mnt/a b") != mount_id("/mnt/a-b")
    assert mount_id("/mnt/app").startswith("mnt-app-")
    assert "/" not in mount_id("/" + "x/" * 100)
    assert not mount_id("/" + "x/" * 100).startswith("-")


def test_runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(RUNTIME_ENV, str(tmp_path))
    assert runtime_dir() == tmp_path
    monkeypatch.delenv(RUNTIME_ENV)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    expected = Path("/run/hybrid-erofs") if os.geteuid() == 0 else tmp_path / "hybrid-erofs"
    assert runtime_dir() == expected


def test_process_identity() -> None:
    me = os.getpid()
    assert process_alive(me, process_start_time(me))
    assert not process_alive(me, (process_start_time(me) or 0) + 1)  # a reused pid
    assert not process_alive(2**22 + 1, None)


# -- kernel NBD netlink, up to the kernel boundary ---------------------------------------------

def test_connect_message_bytes() -> None:
    attributes = connect_attributes(size=1 << 20, sock_fd=5, timeout_s=30,
                                    dead_conn_timeout_s=0, backend="/run/x.json")
    message = genl_message(0x1A, NBD_CMD_CONNECT, attributes, seq=7)
    # nlmsghdr: length, family id as the type, REQUEST|ACK, seq, pid 0
    assert struct.unpack_from("=IHHII", message) == (len(message), 0x1A, 0x5, 7, 0)
    assert message[16:20] == bytes([1, 1, 0, 0])  # genlmsghdr: CONNECT, version 1
    u64 = [(2, 1 << 20), (3, 512), (4, 30), (5, 0b11), (6, 2), (8, 0)]
    expected = b"".join(struct.pack("=HHQ", 12, kind, value) for kind, value in u64)
    # SOCKETS (7|NESTED) > SOCK_ITEM (1|NESTED) > SOCK_FD (1) u32
    expected += struct.pack("=HH", 16, 0x8007) + struct.pack("=HH", 12, 0x8001)
    expected += struct.pack("=HHI", 8, 1, 5)
    expected += struct.pack("=HH", 4 + 12, 10) + b"/run/x.json\0"  # BACKEND_IDENTIFIER
    assert message[20:] == expected
    assert len(message) % 4 == 0


def test_client_handshake_then_kernel_style_reads(tmp_path: Path) -> None:
    """What the kernel gets: a socket past the handshake, then simple-reply READs."""
    data = bytes(range(256)) * 16
    server = NbdServer(MemorySource(data), socket_path=tmp_path / "s.sock", export_name="disk")
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(tmp_path / "s.sock"))
            assert client_handshake(sock, "disk") == len(data)
            # proto.md request: magic, flags, type READ (0), cookie, offset, length
            sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 42, 512, 100))
            reply = b""
            while len(reply) < 16 + 100:
                reply += sock.recv(4096)
            assert struct.unpack(">IIQ", reply[:16]) == (0x67446698, 0, 42)
            assert reply[16:] == data[512:612]
    finally:
        server.shutdown()
        thread.join()


def test_via_nbd_without_module_is_a_clear_error() -> None:
    if nbd_devices():
        pytest.skip("this host has /dev/nbd*")
    from hybrid_erofs.mounting.nbdlink import NbdNetlink
    with pytest.raises(MountError, match=r"no /dev/nbd\* \(modprobe nbd\)"):
        NbdNetlink()
