"""One series' head outputs written into its group of the result store: the declaration and value
of each output (:class:`OutputArray`), and the nodes and chunks they become. Masks go through
zarr's sharding codec, one shard per mask; everything else is encoded directly
(:mod:`.zarr_nodes`). The store (:meth:`engine.store.ResultStore.write_series`) decides when."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .faults import killpoint
from .zarr_nodes import SMALL_BYTES, WRITE_ALL, array_documents, group_document, mask_chunks, store_codecs
from .zarr_text import TEXT_ATTR, encode_text


@dataclass
class OutputArray:
    """One head output ready to write: its declaration and its numpy value(s)."""

    head: str
    head_version: str
    decl: dict[str, Any]
    value: Any  # np.ndarray, or dict of arrays/lists for boxes
    distribution: dict[str, Any] | None = None  # the series' distribution record, when scored


def write_outputs(
    group: zarr.Group, outputs: list[OutputArray], shape: tuple[int, ...], geometry: dict[str, Any]
) -> None:
    """Write every output of one series in two concurrent passes: all nodes' metadata, then all
    chunks. Small outputs are encoded directly (:mod:`.zarr_nodes`); masks go through zarr's
    sharding codec. Node by node, an all-heads series cost ~90 blocking round trips to zarr's
    event loop and ~3 ms of set-up per array; now one pass each, overlapped by the store."""
    if not outputs:
        return
    meta_docs: dict[str, bytes] = {}  # key under the series group -> bytes
    chunk_docs: dict[str, bytes] = {}
    masks: list[tuple[str, np.ndarray, dict[str, Any]]] = []  # (path in group, value, create kwargs)

    def small(path: str, value: np.ndarray, attributes: dict[str, Any] | None) -> None:
        compress = value.dtype.kind in "UOT" or value.nbytes >= SMALL_BYTES
        for key, raw in array_documents(path, value, store_codecs(compress), attributes).items():
            (meta_docs if key.endswith("zarr.json") else chunk_docs)[key] = raw

    for out in outputs:
        if f"{out.head}/zarr.json" not in meta_docs:
            meta_docs[f"{out.head}/zarr.json"] = group_document({})
        decl, name = out.decl, out.decl["name"]
        meta = {
            k: decl[k] for k in ("kind", "labels", "colors", "units", "range", "normalized", "description") if k in decl
        }
        meta.update({"head": out.head, "head_version": out.head_version})
        if out.distribution is not None:
            meta["out_of_distribution"] = out.distribution.get("out_of_distribution")
        path = f"{out.head}/{name}"
        if decl["kind"] == "boxes":
            v = out.value
            n = len(v["scores"])
            meta_docs[f"{path}/zarr.json"] = group_document(
                {
                    **meta,
                    "world_units": "mm (RAS+): x0, y0, z0, x1, y1, z1",
                    "voxel_units": "native voxel indices: i0, j0, k0, i1, j1, k1",
                }
            )
            small(f"{path}/world", np.asarray(v["world"], dtype=np.float64).reshape(n, 6), None)
            small(f"{path}/voxel", np.asarray(v["voxel"], dtype=np.float64).reshape(n, 6), None)
            small(f"{path}/scores", np.asarray(v["scores"], dtype=np.float32).reshape(n), None)
            for extra in ("labels", "queries"):
                if extra in v:
                    # text as a core data type (engine.zarr_text): every Zarr v3 reader decodes it
                    small(f"{path}/{extra}", encode_text(np.asarray(v[extra], dtype=str).reshape(n)), dict(TEXT_ATTR))
        elif decl["kind"] == "mask":
            arr = np.asarray(out.value)
            meta.update({"affine": geometry.get("affine"), "dtype": str(arr.dtype)})
            chunks = mask_chunks(arr.shape, arr.dtype.itemsize)
            # one shard per mask: its 64^3 chunks stay separately readable through the shard index,
            # but the mask costs one file (an object) instead of one per chunk
            shards = tuple(c * math.ceil(s / c) for s, c in zip(arr.shape, chunks))
            masks.append(
                (
                    path,
                    arr,
                    {
                        "shape": arr.shape,
                        "dtype": arr.dtype,
                        "chunks": chunks,
                        "shards": shards if shards != chunks else None,
                        "compressors": store_codecs(),
                        "fill_value": 0,
                        "config": WRITE_ALL,
                        "attributes": meta,
                    },
                )
            )
        else:
            small(path, np.asarray(out.value).astype(decl["dtype"]), meta)

    zstore, prefix = group.store, group.path
    proto = default_buffer_prototype()
    local = zstore.root / prefix if isinstance(zstore, LocalStore) else None

    async def put(docs: dict[str, bytes]) -> None:
        if local is not None:  # plain file writes beat a thread hand-off per small file
            for key, raw in docs.items():
                (local / key).parent.mkdir(parents=True, exist_ok=True)
                (local / key).write_bytes(raw)
        else:  # an object store overlaps the requests
            await asyncio.gather(
                *(zstore.set(f"{prefix}/{key}", proto.buffer.from_bytes(raw)) for key, raw in docs.items())
            )

    async def write() -> None:
        await put(meta_docs)  # head and box groups exist before the masks under them
        created = await asyncio.gather(
            *(
                zarr.api.asynchronous.create_array(zstore, name=f"{prefix}/{p}", zarr_format=3, **kw)
                for p, _, kw in masks
            )
        )
        killpoint("mid-series-write")  # nodes exist, chunks do not: a half-written group
        await asyncio.gather(put(chunk_docs), *(a.setitem(Ellipsis, value) for a, (_, value, _) in zip(created, masks)))

    sync(write())
