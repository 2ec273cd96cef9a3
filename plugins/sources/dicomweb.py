"""DICOMweb: ``dicomweb+http(s)://HOST:PORT/ROOT``. QIDO-RS lists series page by page (``limit``
and ``offset``: a server that caps its answers still yields every series), WADO-RS fetches one
series at a time, instance by instance into the spool (original transfer syntax). dicomweb-client
speaks the protocol; credentials and TLS come from ``engine.http_session``."""

from __future__ import annotations

import itertools
import os
from typing import Any, Iterator

import pydicom

import engine

PAGE_SIZE = int(os.environ.get("MRFM_QIDO_PAGE_SIZE", "100"))
TIMEOUT_S = float(os.environ.get("MRFM_PACS_TIMEOUT", "60"))
SERIES_FIELDS = [
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
]

SIZE_FIELDS = ["Rows", "Columns", "NumberOfFrames", "BitsAllocated"]


def http_url(url: str) -> str:
    """``dicomweb+https://h:p/root`` -> ``https://h:p/root``."""
    return url.removeprefix("dicomweb+").rstrip("/")


def client(url: str) -> Any:
    from dicomweb_client.api import DICOMwebClient

    session = engine.http_session(url)
    _default_timeout(session)
    return DICOMwebClient(http_url(url), session=session)


def _default_timeout(session: Any) -> None:
    """requests waits for ever by default; a PACS that stops answering must fail the series."""
    request = session.request

    def with_timeout(method: str, url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", TIMEOUT_S)
        return request(method, url, **kwargs)

    session.request = with_timeout


def explain(url: str, exc: BaseException) -> str:
    """One line for what went wrong talking to ``url``, without credentials or query values."""
    import requests

    where = engine.public_url(url)
    if isinstance(exc, requests.exceptions.SSLError):
        return f"{where}: TLS verification failed (set MRFM_CA_BUNDLE to the server's CA file)"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return f"{where}: cannot reach the server (connection refused or host unknown)"
    if isinstance(exc, requests.exceptions.Timeout):
        return f"{where}: no answer within {TIMEOUT_S:.0f} s (MRFM_PACS_TIMEOUT)"
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        hint = " (credentials: MRFM_DICOMWEB_TOKEN, MRFM_DICOMWEB_USER/PASSWORD or netrc)" if code in (401, 403) else ""
        return f"{where}: the server answered HTTP {code} {exc.response.reason or ''}".rstrip() + hint
    return f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _value(item: dict[str, Any], keyword: str, default: Any = "") -> Any:
    tag = f"{pydicom.datadict.tag_for_keyword(keyword):08X}"
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else default


class DicomwebSource:
    name = "dicomweb"

    def claims(self, archive: str) -> bool:
        return archive.startswith(("dicomweb+http://", "dicomweb+https://"))

    def find(self, archive: str, options: engine.SourceOptions) -> Any:
        """The first QIDO-RS page now (an unreachable server fails the run before it begins), the
        rest as the run asks for them."""
        pages = self.pages(archive, dict(options.where))
        first = next(pages)
        refs = ([self._ref(archive, item, options) for item in page] for page in itertools.chain([first], pages))
        return engine.ScanResult(engine.SeriesStream(refs), [])

    def series(self, archive: str, where: dict[str, str]) -> Iterator[dict[str, Any]]:
        """Every series matching ``where``."""
        for page in self.pages(archive, where):
            yield from page

    def pages(self, archive: str, where: dict[str, str]) -> Iterator[list[dict[str, Any]]]:
        """The series matching ``where``, one QIDO-RS page at a time."""
        web = client(archive)
        offset = 0
        while True:
            try:
                page = web.search_for_series(
                    search_filters=dict(where) or None, fields=SERIES_FIELDS, limit=PAGE_SIZE, offset=offset
                )
            except Exception as exc:
                raise engine.SourceError(f"QIDO-RS series query failed: {explain(archive, exc)}") from exc
            yield page
            if len(page) < PAGE_SIZE or not page:
                return
            offset += len(page)

    def _ref(self, archive: str, item: dict[str, Any], options: engine.SourceOptions) -> engine.RemoteRef:
        series_uid = str(_value(item, "SeriesInstanceUID"))
        return engine.RemoteRef(
            key=engine.sanitise_key(series_uid),
            reader=engine.PACS_READER,
            study_uid=str(_value(item, "StudyInstanceUID")),
            series_uid=series_uid,
            modality=str(_value(item, "Modality")),
            description=str(_value(item, "SeriesDescription")),
            sources=[],
            dims=(),
            n_slices=0,
            orientation="",
            url=archive,
            source=self.name,
            options=options,
            n_instances=int(_value(item, "NumberOfSeriesRelatedInstances", 0) or 0),
        )

    def instance_uids(self, ref: engine.RemoteRef) -> list[str]:
        web = client(ref.url)
        uids: list[str] = []
        while True:
            page = web.search_for_instances(
                ref.study_uid, ref.series_uid, fields=["SOPInstanceUID"], limit=PAGE_SIZE, offset=len(uids)
            )
            uids += [str(_value(i, "SOPInstanceUID")) for i in page]
            if len(page) < PAGE_SIZE or not page:
                return uids

    def image_attributes(self, ref: engine.RemoteRef) -> list[dict[str, Any]]:
        """Each instance's size attributes, for the budget check before the fetch."""
        web = client(ref.url)
        out: list[dict[str, Any]] = []
        while True:
            page = web.search_for_instances(
                ref.study_uid, ref.series_uid, fields=SIZE_FIELDS, limit=PAGE_SIZE, offset=len(out)
            )
            out += [{k: _value(i, k, None) for k in SIZE_FIELDS} for i in page]
            if len(page) < PAGE_SIZE or not page:
                return out

    def fetch(self, ref: engine.RemoteRef, spool: Any) -> None:
        web = client(ref.url)
        try:
            for ds in web.iter_series(ref.study_uid, ref.series_uid, media_types=(("application/dicom", "*"),)):
                spool.add(ds)
        except engine.SourceError:
            raise
        except Exception as exc:
            raise engine.SourceError(
                f"WADO-RS: {explain(ref.url, exc)} after {len(spool.sop_uids)} instance(s)"
            ) from exc

    def send(self, url: str, paths: list[Any], ae_title: str = "MRFM") -> None:
        """STOW-RS the files; a refusal (HTTP error or a FailedSOPSequence) raises SourceError."""
        datasets = [pydicom.dcmread(p) for p in paths]
        try:
            answer = client(url).store_instances(datasets=datasets)
        except Exception as exc:
            raise engine.SourceError(f"STOW-RS: {explain(url, exc)}") from exc
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "?")
            raise engine.SourceError(
                f"{engine.public_url(url)}: STOW-RS refused {len(failed)} instance(s) (FailureReason {reason})"
            )
