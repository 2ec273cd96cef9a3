"""DIMSE: ``dimse://CALLED_AE@HOST:PORT``. C-FIND (Study Root: studies, then each study's series)
lists series; C-GET fetches one series over its own association, or with ``--move`` C-MOVE sends
it to mrfm's own storage SCP (the PACS must know the calling AE title at that port). C-STORE sends
results back. pynetdicom speaks the protocol; every failure becomes one line naming the peer."""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from typing import Any, Callable, Iterator

from pydicom.dataset import Dataset

import engine

TIMEOUT_S = float(os.environ.get("MRFM_PACS_TIMEOUT", "60"))
# matching keys that live on the series level of the Study Root model; the rest match studies
SERIES_KEYS = {
    "Modality",
    "SeriesInstanceUID",
    "SeriesDescription",
    "SeriesNumber",
    "BodyPartExamined",
    "ProtocolName",
    "SeriesDate",
    "SeriesTime",
}

# what a PACS may hold MR images in; pydicom + pylibjpeg decode each
FETCH_SYNTAXES = [
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",  # LE, implicit, deflate, BE
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",  # JPEG
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",  # JPEG-LS, J2K
    "1.2.840.10008.1.2.5",  # RLE
]


def peer(url: str) -> tuple[str, str, int]:
    """``dimse://AE@host:port`` -> (called AE, host, port); a malformed URL is a usage error."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "dimse" or not parts.username or not parts.hostname or not parts.port:
        raise engine.UsageError(f"{engine.public_url(url)}: expected dimse://CALLED_AE@HOST:PORT")
    return urllib.parse.unquote(parts.username), parts.hostname, parts.port


def storage_classes() -> list[str]:
    """The storage SOP classes mrfm fetches (MR) and sends (SEG, SR)."""
    from pynetdicom import sop_class as sc

    names = [
        "MRImageStorage",
        "EnhancedMRImageStorage",
        "EnhancedMRColorImageStorage",
        "LegacyConvertedEnhancedMRImageStorage",
        "SegmentationStorage",
        "ComprehensiveSRStorage",
        "EnhancedSRStorage",
        "BasicTextSRStorage",
        "Comprehensive3DSRStorage",
        "SecondaryCaptureImageStorage",
    ]
    return [getattr(sc, n) for n in names if hasattr(sc, n)]


def _ae(calling: str) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    ae.connection_timeout = min(TIMEOUT_S, 15)
    return ae


def associate(
    url: str,
    calling: str,
    contexts: list[tuple[str, list[str] | None]],
    *,
    roles: list | None = None,
    handlers: list | None = None,
) -> Any:
    """An established association with the peer of ``url``; SourceError says why there is none."""
    from pynetdicom import DEFAULT_TRANSFER_SYNTAXES

    called, host, port = peer(url)
    ae = _ae(calling)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes or DEFAULT_TRANSFER_SYNTAXES)
    assoc = ae.associate(host, port, ae_title=called, ext_neg=roles or None, evt_handlers=handlers or None)
    if assoc.is_established:
        return assoc
    where = engine.public_url(url)
    if assoc.is_rejected:
        raise engine.SourceError(
            f"{where}: the association was rejected (is {calling} known to {called}, and is {called} its AE title?)"
        )
    try:  # pynetdicom reports a refused TCP connection as an abort: tell the two apart
        socket.create_connection((host, port), timeout=min(TIMEOUT_S, 15)).close()
    except OSError as exc:
        raise engine.SourceError(f"{where}: cannot connect ({exc.strerror or type(exc).__name__})") from None
    raise engine.SourceError(f"{where}: the peer aborted the association request")


def _status_ok(status: Any) -> bool:
    return status is not None and getattr(status, "Status", None) == 0x0000


def _pending(status: Any) -> bool:
    return status is not None and getattr(status, "Status", None) in (0xFF00, 0xFF01)


def c_find(assoc: Any, url: str, level: str, keys: dict[str, str], returned: list[str]) -> Iterator[Dataset]:
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    query = Dataset()
    query.QueryRetrieveLevel = level
    for kw in returned:
        setattr(query, kw, None)  # an empty return key of any VR (a number's VR refuses "")
    for kw, value in keys.items():
        setattr(query, kw, value)
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if _pending(status):
            if identifier is not None:
                yield identifier
        elif _status_ok(status):
            return
        else:
            code = (
                f"0x{status.Status:04X}"
                if status is not None and "Status" in status
                else "no response (timeout or abort)"
            )
            raise engine.SourceError(f"{engine.public_url(url)}: C-FIND at {level} level failed ({code})")


def find_contexts() -> list[tuple[str, list[str] | None]]:
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    return [(StudyRootQueryRetrieveInformationModelFind, None)]


class DimseSource:
    name = "dimse"

    def claims(self, archive: str) -> bool:
        return archive.startswith("dimse://")

    def find(self, archive: str, options: engine.SourceOptions) -> Any:
        peer(archive)
        where = dict(options.where)
        study_keys = {k: v for k, v in where.items() if k not in SERIES_KEYS}
        series_keys = {k: v for k, v in where.items() if k in SERIES_KEYS}
        assoc = associate(archive, options.ae_title, find_contexts())
        try:  # the study level now: a peer that refuses the query fails the run before it begins
            studies = [
                str(s.StudyInstanceUID) for s in c_find(assoc, archive, "STUDY", study_keys, ["StudyInstanceUID"])
            ]
        except BaseException:
            assoc.release()
            raise

        def produce(put: Callable[[Any], None]) -> None:
            """Each series as its C-FIND response arrives, study after study, on one association."""
            try:
                for study in studies:
                    for s in c_find(
                        assoc,
                        archive,
                        "SERIES",
                        {**series_keys, "StudyInstanceUID": study},
                        ["SeriesInstanceUID", "Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances"],
                    ):
                        uid = str(s.get("SeriesInstanceUID", ""))
                        put(
                            engine.RemoteRef(
                                key=engine.sanitise_key(uid),
                                reader=engine.PACS_READER,
                                study_uid=study,
                                series_uid=uid,
                                modality=str(s.get("Modality", "")),
                                description=str(s.get("SeriesDescription", "")),
                                sources=[],
                                dims=(),
                                n_slices=0,
                                orientation="",
                                url=archive,
                                source=self.name,
                                options=options,
                                n_instances=int(s.get("NumberOfSeriesRelatedInstances") or 0),
                            )
                        )
            finally:
                assoc.release()

        return engine.ScanResult(engine.SeriesStream(engine.background_pages(produce, "mrfm-c-find")), [])

    def instance_uids(self, ref: engine.RemoteRef) -> list[str]:
        assoc = associate(ref.url, ref.options.ae_title, find_contexts())
        try:
            keys = {"StudyInstanceUID": ref.study_uid, "SeriesInstanceUID": ref.series_uid}
            return [str(i.SOPInstanceUID) for i in c_find(assoc, ref.url, "IMAGE", keys, ["SOPInstanceUID"])]
        finally:
            assoc.release()

    def image_attributes(self, ref: engine.RemoteRef) -> list[dict[str, Any]]:
        """Each instance's size attributes (C-FIND at image level), for the budget check."""
        fields = ["Rows", "Columns", "NumberOfFrames", "BitsAllocated"]
        assoc = associate(ref.url, ref.options.ae_title, find_contexts())
        try:
            keys = {"StudyInstanceUID": ref.study_uid, "SeriesInstanceUID": ref.series_uid}
            return [
                {k: i.get(k) for k in fields}
                for i in c_find(assoc, ref.url, "IMAGE", keys, ["SOPInstanceUID", *fields])
            ]
        finally:
            assoc.release()

    def send(self, url: str, paths: list[Any], ae_title: str = "MRFM") -> None:
        send(url, paths, ae_title)

    def fetch(self, ref: engine.RemoteRef, spool: Any) -> None:
        if ref.options.move:
            return _move(ref, spool)
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

        errors: list[str] = []
        classes = storage_classes()[:4]  # the MR image classes
        # one context per transfer syntax: the PACS then sends each file as stored, never
        # transcoding (it may not decode JPEG 2000, say) into the one syntax it would pick
        contexts = [(StudyRootQueryRetrieveInformationModelGet, None)] + [
            (c, [ts]) for c in classes for ts in FETCH_SYNTAXES
        ]
        roles = [build_role(c, scp_role=True) for c in classes]
        assoc = associate(
            ref.url,
            ref.options.ae_title,
            contexts,
            roles=roles,
            handlers=[(evt.EVT_C_STORE, _store_into(spool, errors))],
        )
        try:
            final = None
            for status, _ in assoc.send_c_get(_series_query(ref), StudyRootQueryRetrieveInformationModelGet):
                final = status
        finally:
            assoc.release()
        _check_retrieve(ref, "C-GET", final, errors)


def _series_query(ref: engine.RemoteRef) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = ref.study_uid
    query.SeriesInstanceUID = ref.series_uid
    return query


def _store_into(spool: Any, errors: list[str]) -> Callable[[Any], int]:
    def handle(event: Any) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            spool.add(ds)
        except Exception as exc:  # refused here; the retrieve's failed count says so to the PACS
            errors.append(str(exc))
            return 0xA700
        return 0x0000

    return handle


def _check_retrieve(ref: engine.RemoteRef, op: str, final: Any, errors: list[str]) -> None:
    where = engine.public_url(ref.url)
    if errors:
        raise engine.SourceError(errors[0])
    if final is None or "Status" not in final:
        raise engine.SourceError(f"{where}: {op} got no final response (timeout or abort)")
    failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
    if final.Status not in (0x0000,) or failed:
        raise engine.SourceError(
            f"{where}: {op} ended with status 0x{final.Status:04X} ({failed} sub-operation(s) failed)"
        )


# ---- C-MOVE: our own storage SCP -------------------------------------------------------------
class _MoveTarget:
    """One storage SCP per process and port; received instances are routed to the spool of the
    series being moved (by SeriesInstanceUID)."""

    _lock = threading.Lock()
    _servers: dict[tuple[str, int], "_MoveTarget"] = {}

    def __init__(self, ae_title: str, port: int) -> None:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, evt

        self.spools: dict[str, tuple[Any, list[str]]] = {}
        ae = _ae(ae_title)
        for c in storage_classes():
            ae.add_supported_context(c, ALL_TRANSFER_SYNTAXES)
        try:
            self.server = ae.start_server(("", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._handle)])
        except OSError as exc:
            raise engine.SourceError(
                f"--move: cannot listen on port {port} for C-MOVE ({exc.strerror or exc})"
            ) from exc

    @classmethod
    def get(cls, ae_title: str, port: int) -> "_MoveTarget":
        with cls._lock:
            key = (ae_title, port)
            if key not in cls._servers:
                cls._servers[key] = _MoveTarget(ae_title, port)
            return cls._servers[key]

    def _handle(self, event: Any) -> int:
        ds = event.dataset
        target = self.spools.get(str(ds.get("SeriesInstanceUID", "")))
        if target is None:
            return 0xA801  # not a series being moved to us
        return _store_into(*target)(event)


def _move(ref: engine.RemoteRef, spool: Any) -> None:
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    target = _MoveTarget.get(ref.options.ae_title, ref.options.move_port)
    errors: list[str] = []
    target.spools[ref.series_uid] = (spool, errors)
    try:
        assoc = associate(ref.url, ref.options.ae_title, [(StudyRootQueryRetrieveInformationModelMove, None)])
        try:
            final = None
            for status, _ in assoc.send_c_move(
                _series_query(ref), ref.options.ae_title, StudyRootQueryRetrieveInformationModelMove
            ):
                final = status
        finally:
            assoc.release()
    finally:
        target.spools.pop(ref.series_uid, None)
    _check_retrieve(ref, "C-MOVE", final, errors)


def send(url: str, paths: list[Any], ae_title: str = "MRFM") -> None:
    """C-STORE the files over one association; any status but success raises SourceError."""
    import pydicom

    datasets = [pydicom.dcmread(p) for p in paths]
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    assoc = associate(url, ae_title, [(c, [t]) for c, t in contexts])
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if not _status_ok(status):
                code = f"0x{status.Status:04X}" if status is not None and "Status" in status else "no response"
                raise engine.SourceError(f"{engine.public_url(url)}: C-STORE of {ds.SOPInstanceUID} refused ({code})")
    finally:
        assoc.release()
