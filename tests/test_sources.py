"""Sources without a server: a third-party source plugin, PHI-free URLs, --where parsing and
credentials from the environment or a netrc file (never the command line)."""

from __future__ import annotations

import pytest

import engine
from engine import plugins
from engine.sources import find, http_session, parse_where, public_url


def test_a_source_plugin_claims_its_scheme_and_feeds_the_scan(tmp_path):
    from pydicom.data import get_testdata_file
    import shutil

    folder = tmp_path / "mirror"
    folder.mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), folder / "a.dcm")

    class Mirror:
        """A toy source: mirror://NAME reads a local folder."""

        @engine.hookimpl
        def register_sources(self, register):
            register(self)

        name = "mirror"

        def claims(self, archive):
            return archive.startswith("mirror://")

        def find(self, archive, options):
            return engine.scan([folder])

    plugin = Mirror()
    plugins.pm.register(plugin, name="mirror-test")
    try:
        found = find(["mirror://x"])
        assert [r.modality for r in found.series] == ["MR"]
        with pytest.raises(engine.UsageError, match="no installed source reads nope://"):
            find(["nope://host/x"])
    finally:
        plugins.pm.unregister(plugin)


def test_public_url_drops_credentials_and_query_values():
    assert (
        public_url("dicomweb+https://user:secret@pacs.example:443/dicom-web/?PatientName=DOE")
        == "dicomweb+https://pacs.example:443/dicom-web"
    )
    assert public_url("dimse://ORTHANC@10.0.0.5:4242") == "dimse://ORTHANC@10.0.0.5:4242"


def test_credentials_on_the_command_line_are_refused():
    with pytest.raises(engine.UsageError, match="credentials never go on the command line"):
        find(["dicomweb+http://user:pw@127.0.0.1:1/dicom-web"])


def test_where_takes_dicom_keywords_only():
    assert parse_where(["Modality=MR", "StudyDate=20240101-20241231"]) == (
        ("Modality", "MR"),
        ("StudyDate", "20240101-20241231"),
    )
    for bad in ("Modality", "NotAKeyword=1", "=MR"):
        with pytest.raises(engine.UsageError):
            parse_where([bad])


def test_credentials_come_from_the_environment_or_netrc(tmp_path, monkeypatch):
    for var in ("MRFM_DICOMWEB_TOKEN", "MRFM_DICOMWEB_USER", "MRFM_DICOMWEB_PASSWORD", "MRFM_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine pacs.example login alice password s3cret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("MRFM_NETRC", str(netrc))
    session = http_session("dicomweb+https://pacs.example/dicom-web")
    assert session.auth == ("alice", "s3cret") and session.verify is True
    monkeypatch.setenv("MRFM_DICOMWEB_TOKEN", "tok")
    session = http_session("dicomweb+https://pacs.example/dicom-web")
    assert session.headers["Authorization"] == "Bearer tok" and session.auth is None
