"""Argilla search engine for osmem (in-memory OpenSearch-compatible server).

Runs inside .venv-argilla (imported by services/argilla/server.py before the app).

Hand-written because argilla_server has no engine for osmem: osmem answers the
OpenSearch API that argilla_server's ``OpenSearchEngine`` uses, except Painless
scripts (HTTP 500). Three engine methods update a record's document with a
script; this subclass does them as read-modify-write of the whole document
instead (GET the source, change it in Python, index it back with refresh).

It also indexes responses that have no values (discarded ones), which
argilla_server 2.8 itself fails on (see `_map_record_response_to_es`).

Writes to one document are serialised by an asyncio lock per document: the
server runs a single process, so this keeps two responses submitted at once to
the same record from overwriting each other.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Callable, Dict

from argilla_server.models import Response, Suggestion
from argilla_server.search_engine.base import SearchEngine
from argilla_server.search_engine.commons import es_index_name_for_dataset
from argilla_server.search_engine.opensearch import OpenSearchEngine

ENGINE_NAME = "osmem"

_locks: Dict[str, asyncio.Lock] = {}


def _lock_for(index_name: str, doc_id: str) -> asyncio.Lock:
    key = f"{index_name}/{doc_id}"
    lock = _locks.get(key)
    if lock is None:
        lock = _locks[key] = asyncio.Lock()
    return lock


@SearchEngine.register(engine_name=ENGINE_NAME)
@dataclasses.dataclass
class OsmemSearchEngine(OpenSearchEngine):
    """OpenSearchEngine without Painless scripts (read-modify-write instead)."""

    @staticmethod
    def _map_record_response_to_es(response: Response) -> Dict[str, Any]:
        # Upstream bug worked around here: argilla_server 2.8 maps `response.values.items()`
        # and so fails (HTTP 500, index not updated) on a response without values, which
        # the API accepts for `discarded` responses. Such a response has no answers to index.
        if response.values is None:
            return {"id": response.id, "status": response.status, "user_id": response.user_id}
        return OpenSearchEngine._map_record_response_to_es(response)

    async def _modify_document(self, index_name: str, doc_id: str, change: Callable[[dict], None]) -> None:
        async with _lock_for(index_name, doc_id):
            found = await self.client.get(index=index_name, id=doc_id)
            source: dict[str, Any] = found["_source"]
            change(source)
            await self.client.index(index=index_name, id=doc_id, body=source, refresh=True)

    async def update_record_response(self, response: Response) -> None:
        record = response.record
        es_response = self._map_record_response_to_es(response)
        # The document holds ids as they were serialised (strings).
        response_id = str(response.id)

        def change(source: dict) -> None:
            kept = [r for r in (source.get("responses") or []) if str(r.get("id")) != response_id]
            kept.append(_jsonable(es_response))
            source["responses"] = kept

        await self._modify_document(es_index_name_for_dataset(record.dataset), str(record.id), change)

    async def delete_record_response(self, response: Response) -> None:
        record = response.record
        response_id = str(response.id)

        def change(source: dict) -> None:
            if source.get("responses") is not None:
                source["responses"] = [r for r in source["responses"] if str(r.get("id")) != response_id]

        await self._modify_document(es_index_name_for_dataset(record.dataset), str(record.id), change)

    async def delete_record_suggestion(self, suggestion: Suggestion) -> None:
        name = suggestion.question.name

        def change(source: dict) -> None:
            if source.get("suggestions"):
                source["suggestions"].pop(name, None)

        await self._modify_document(
            es_index_name_for_dataset(suggestion.record.dataset), str(suggestion.record_id), change
        )


def _jsonable(value: Any) -> Any:
    """UUIDs and enums as the JSON serializer of opensearch-py would write them."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):  # enums
        return value.value
    if value is not None and not isinstance(value, (str, int, float, bool)):
        return str(value)
    return value
