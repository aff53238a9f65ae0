#!/usr/bin/env python3
"""Kubernetes API server emulator for Tandem's end-to-end tests.

A thin harness around ``kmock.KubernetesEmulator`` (kmock 0.8, pinned):
kmock serves API discovery, parses Kubernetes URLs, stores objects with their
history and runs create/patch/delete (incl. finalizers).  This file adds what
list/watch clients (kubectl, kube-rs ``kube_runtime::watcher``) rely on and
kmock 0.8 lacks; every addition is listed in README.md ("What was added around kmock 0.8").

Usage::

    emulator.py [--port N] [--kubeconfig PATH] [--rv-start N|time] ...

Prints exactly one line on stdout when ready::

    {"listening":{"api":"127.0.0.1:PORT"}}

then serves until SIGTERM/SIGINT and exits 0.  Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import copy
import datetime
import json
import logging
import os
import random
import re
import signal
import socket
import string
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import parsing as _kmock_parsing  # private: see _parse_path()

log = logging.getLogger('k8s-emulator')

JSON = dict[str, Any]
ObjKey = tuple[kmock.resource, str | None, str]

# ----------------------------------------------------------------------------
# Fix 1: kmock 0.8 mis-parses the core "namespaces" resource.
# ``/api/v1/namespaces`` crashes its parser and ``/api/v1/namespaces/NAME`` is
# read as "namespace NAME, no resource".  Namespaces are the one resource whose
# plural doubles as the URL's namespace prefix, so patch it before kmock sees it.
# ----------------------------------------------------------------------------
_NS_PATH = re.compile(r'^/api/v1/namespaces(?:/([^/]+)(?:/(status|finalize))?)?/?$')
_original_parse_path = _kmock_parsing.parse_path


def _parse_path(path: str) -> Any:
    m = _NS_PATH.match(path)
    if m:
        return _kmock_parsing.ParsedPath(
            group='', version='v1', plural='namespaces', namespace=None,
            name=m.group(1), subresource=m.group(2))
    return _original_parse_path(path)


_kmock_parsing.parse_path = _parse_path


# ----------------------------------------------------------------------------
# Small helpers: errors, time, patches, selectors.
# ----------------------------------------------------------------------------
def k8s_error(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=code, reason=reason, message=message,
                                 details={k: v for k, v in details.items() if v is not None} or None)


def status_object(code: int, reason: str, message: str, details: Any = None) -> JSON:
    obj: JSON = {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
                 'message': message, 'reason': reason, 'code': code}
    if details:
        obj['details'] = details
    return obj


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def drop_nulls(value: Any) -> Any:
    """The apiserver decodes into typed structs, so explicit nulls never get stored."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 (kmock's own merge refuses dict<->scalar replacements)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


# Strategic-merge-patch list semantics for built-in kinds (patchMergeKey /
# patchStrategy from k8s.io/api).  Keyed by the path with list indexes as '*'.
# Lists not listed here are atomic (replaced), unless the patch itself carries a
# ``$setElementOrder/<field>`` directive, which kubectl emits only for merging
# lists: then the merge key is read from that directive.
_PRIMITIVE = object()
_SMP_KEYS: dict[tuple[str, ...], Any] = {}
for _pod in [('spec',), ('spec', 'template', 'spec'), ('spec', 'jobTemplate', 'spec', 'template', 'spec')]:
    for _c in ('containers', 'initContainers', 'ephemeralContainers'):
        _SMP_KEYS[_pod + (_c,)] = 'name'
        _SMP_KEYS[_pod + (_c, '*', 'ports')] = 'containerPort'
        _SMP_KEYS[_pod + (_c, '*', 'env')] = 'name'
        _SMP_KEYS[_pod + (_c, '*', 'volumeMounts')] = 'mountPath'
        _SMP_KEYS[_pod + (_c, '*', 'volumeDevices')] = 'devicePath'
    _SMP_KEYS[_pod + ('volumes',)] = 'name'
    _SMP_KEYS[_pod + ('imagePullSecrets',)] = 'name'
    _SMP_KEYS[_pod + ('hostAliases',)] = 'ip'
    _SMP_KEYS[_pod + ('resourceClaims',)] = 'name'
_SMP_KEYS[('metadata', 'ownerReferences')] = 'uid'
_SMP_KEYS[('metadata', 'finalizers')] = _PRIMITIVE
_SMP_KEYS[('status', 'conditions')] = 'type'
_SMP_KEYS[('status', 'podIPs')] = 'ip'
_SMP_KEYS[('status', 'hostIPs')] = 'ip'
_SMP_KEYS_BY_KIND: dict[str, dict[tuple[str, ...], Any]] = {
    'Service': {('spec', 'ports'): 'port'},
    'Node': {('status', 'addresses'): 'type', ('spec', 'podCIDRs'): _PRIMITIVE},
}
_DELETE = object()


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items()
                if not k.startswith('$') and v is not None}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value
                if not (isinstance(v, dict) and v.get('$patch') == 'delete')]
    return value


def strategic_merge_patch(original: Any, patch: Any, kind: str, path: tuple[str, ...] = ()) -> Any:
    """A practical subset of Kubernetes' strategic merge patch (what kubectl emits)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get('$patch')
    if directive == 'replace':
        return _strip_directives({k: v for k, v in patch.items() if k != '$patch'})
    if directive == 'delete':
        return _DELETE
    result = copy.deepcopy(original) if isinstance(original, dict) else {}
    for key, value in patch.items():
        if key.startswith('$'):
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = strategic_merge_patch(result.get(key), value, kind, path + (key,))
            if merged is _DELETE:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            order = patch.get(f'$setElementOrder/{key}')
            result[key] = _smp_list(result.get(key), value, order, kind, path + (key,))
        else:
            result[key] = value
    for key, value in patch.items():
        if key.startswith('$deleteFromPrimitiveList/') and isinstance(value, list):
            field = key.split('/', 1)[1]
            if isinstance(result.get(field), list):
                result[field] = [x for x in result[field] if x not in value]
        if key.startswith('$setElementOrder/') and key.split('/', 1)[1] not in patch:
            field = key.split('/', 1)[1]  # reorder-only patch
            if isinstance(result.get(field), list) and isinstance(value, list):
                result[field] = _smp_list(result[field], [], value, kind, path + (field,))
    retain = patch.get('$retainKeys')
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _smp_merge_key(original: Any, patch: list[Any], order: Any, kind: str, path: tuple[str, ...]) -> Any:
    norm = tuple('*' if p.isdigit() else p for p in path)
    for table in (_SMP_KEYS_BY_KIND.get(kind, {}), _SMP_KEYS):
        if norm in table:
            return table[norm]
    if isinstance(order, list) and order:
        if all(isinstance(x, dict) and len(x) == 1 for x in order):
            keys = {next(iter(x)) for x in order}
            if len(keys) == 1:
                return keys.pop()
        if all(not isinstance(x, (dict, list)) for x in order):
            return _PRIMITIVE
    return None  # atomic list


def _smp_list(original: Any, patch: list[Any], order: Any, kind: str, path: tuple[str, ...]) -> list[Any]:
    merge_key = _smp_merge_key(original, patch, order, kind, path)
    if any(isinstance(x, dict) and x.get('$patch') == 'replace' for x in patch):
        return _strip_directives([x for x in patch if not (isinstance(x, dict) and x.get('$patch') == 'replace')])
    current = copy.deepcopy(original) if isinstance(original, list) else []
    if merge_key is None:
        return _strip_directives(patch)
    if merge_key is _PRIMITIVE:
        result = current + [x for x in patch if x not in current]
    else:
        result = current
        for item in patch:
            if not isinstance(item, dict):
                continue
            ident = item.get(merge_key)
            idx = next((i for i, x in enumerate(result) if isinstance(x, dict) and x.get(merge_key) == ident), None)
            if item.get('$patch') == 'delete':
                result = [x for x in result if not (isinstance(x, dict) and x.get(merge_key) == ident)]
            elif idx is None:
                result.append(_strip_directives(item))
            else:
                result[idx] = strategic_merge_patch(result[idx], item, kind, path + (str(idx),))
    if isinstance(order, list) and order:
        def ident_of(x: Any) -> Any:
            return x if merge_key is _PRIMITIVE else (x.get(merge_key) if isinstance(x, dict) else None)
        wanted = [x if merge_key is _PRIMITIVE else (x.get(merge_key) if isinstance(x, dict) else None) for x in order]
        ranked = [x for w in wanted for x in result if ident_of(x) == w]
        result = ranked + [x for x in result if ident_of(x) not in wanted]
    return result


_LABEL_TOKEN = r'[A-Za-z0-9][-A-Za-z0-9_./]*'
_LS_SET = re.compile(rf'^({_LABEL_TOKEN})\s+(in|notin)\s+\((.*)\)$')
_LS_CMP = re.compile(rf'^({_LABEL_TOKEN})\s*(==|=|!=)\s*([-A-Za-z0-9_.]*)$')
_LS_NUM = re.compile(rf'^({_LABEL_TOKEN})\s*(<|>)\s*(-?\d+)$')
_LS_EXISTS = re.compile(rf'^(!?)\s*({_LABEL_TOKEN})$')


def _split_top_level(expr: str) -> list[str]:
    parts, depth, cur = [], 0, ''
    for ch in expr:
        if ch == '(':
            depth += 1
        elif ch == ')':
            depth -= 1
        if ch == ',' and depth == 0:
            parts.append(cur)
            cur = ''
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(expr: str | None) -> Callable[[JSON], bool]:
    """Equality- and set-based label selectors, as in k8s.io/apimachinery/pkg/labels."""
    reqs: list[Callable[[dict[str, str]], bool]] = []
    for part in _split_top_level(expr or ''):
        if m := _LS_SET.match(part):
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(',') if v.strip()}
            if op == 'in':
                reqs.append(lambda ls, k=key, vs=vals: k in ls and ls[k] in vs)
            else:
                reqs.append(lambda ls, k=key, vs=vals: k not in ls or ls[k] not in vs)
        elif m := _LS_CMP.match(part):
            key, op, val = m.groups()
            if op == '!=':
                reqs.append(lambda ls, k=key, v=val: ls.get(k) != v)
            else:
                reqs.append(lambda ls, k=key, v=val: k in ls and ls[k] == v)
        elif m := _LS_NUM.match(part):
            key, op, num = m.group(1), m.group(2), int(m.group(3))

            def cmp(ls: dict[str, str], k: str = key, o: str = op, n: int = num) -> bool:
                try:
                    v = int(ls[k])
                except (KeyError, ValueError):
                    return False
                return v > n if o == '>' else v < n
            reqs.append(cmp)
        elif m := _LS_EXISTS.match(part):
            neg, key = m.groups()
            reqs.append((lambda ls, k=key: k not in ls) if neg else (lambda ls, k=key: k in ls))
        else:
            raise k8s_error(400, 'BadRequest', f'unable to parse requirement: {part!r} in labelSelector {expr!r}')

    def match(obj: JSON) -> bool:
        labels = (obj.get('metadata') or {}).get('labels') or {}
        return all(req(labels) for req in reqs)
    return match


def _field_value(obj: JSON, path: str) -> str:
    cur: Any = obj
    for part in path.split('.'):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if cur is None:
        return ''
    if isinstance(cur, bool):
        return 'true' if cur else 'false'
    return str(cur)


def parse_field_selector(expr: str | None) -> Callable[[JSON], bool]:
    """Field selectors ``path=value``, ``path==value``, ``path!=value`` on any dotted path."""
    reqs: list[Callable[[JSON], bool]] = []
    for part in [p.strip() for p in (expr or '').split(',') if p.strip()]:
        m = re.match(r'^([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)$', part)
        if not m:
            raise k8s_error(400, 'BadRequest', f'invalid field selector: {part!r}')
        path, op, val = m.groups()
        if op == '!=':
            reqs.append(lambda o, p=path, v=val: _field_value(o, p) != v)
        else:
            reqs.append(lambda o, p=path, v=val: _field_value(o, p) == v)
    return lambda obj: all(req(obj) for req in reqs)


def parse_accept(headers: dict[str, str]) -> str:
    """Return 'table', 'meta', 'metalist' or 'json' for the client's first acceptable type."""
    accept = next((v for k, v in headers.items() if k.lower() == 'accept'), '') or ''
    for clause in accept.split(','):
        bits = [b.strip() for b in clause.split(';')]
        params = dict(b.split('=', 1) for b in bits[1:] if '=' in b)
        mime = bits[0].lower()
        if mime not in ('application/json', '*/*', 'application/*'):
            continue
        as_ = params.get('as')
        if as_ is None:
            return 'json'
        if as_ == 'Table' and params.get('g') == 'meta.k8s.io':
            return 'table'
        if as_ == 'PartialObjectMetadata' and params.get('g') == 'meta.k8s.io':
            return 'meta'
        if as_ == 'PartialObjectMetadataList' and params.get('g') == 'meta.k8s.io':
            return 'metalist'
    return 'json'


def partial_metadata(obj: JSON) -> JSON:
    return {'kind': 'PartialObjectMetadata', 'apiVersion': 'meta.k8s.io/v1',
            'metadata': copy.deepcopy(obj.get('metadata') or {})}


# ----------------------------------------------------------------------------
# Event log: global resourceVersion counter, per-resource history for watches.
# ----------------------------------------------------------------------------
@attrs.define
class Entry:
    rv: int
    type: str
    obj: JSON          # deep copy of the object as of this event
    prev: JSON | None  # the object before a MODIFIED event (for selector transitions)


@attrs.define
class EventLog:
    floor: int                                     # watches from rv < floor get 410 Gone
    entries: list[Entry] = attrs.field(factory=list)
    rvs: list[int] = attrs.field(factory=list)     # parallel to entries, for bisect
    dropped: int = 0                               # entries compacted away (absolute offsets)
    watchers: set[asyncio.Event] = attrs.field(factory=set)

    def wake(self) -> None:
        for ev in self.watchers:
            ev.set()


class _EventSink:
    """Stands in for kmock's per-resource buses: every event kmock emits gets the
    next global resourceVersion, stamped onto the stored object, and is logged."""

    def __init__(self, emulator: 'Emulator') -> None:
        self._emulator = emulator

    def __getitem__(self, resource: kmock.resource) -> '_ResourceSink':
        return _ResourceSink(self._emulator, resource)


class _ResourceSink:
    def __init__(self, emulator: 'Emulator', resource: kmock.resource) -> None:
        self._emulator, self._resource = emulator, resource

    async def put(self, *events: JSON) -> None:
        for event in events:
            self._emulator._record(self._resource, event)

    def __aiter__(self) -> AsyncIterator[JSON]:  # kmock's own watch is replaced; never used
        raise RuntimeError('kmock buses are replaced by the harness event log')


# ----------------------------------------------------------------------------
# The emulator: kmock.KubernetesEmulator plus the additions.
# ----------------------------------------------------------------------------
@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    rv_start: int = 0
    max_events: int = 100_000            # per resource, before compaction
    bookmark_interval: float = 10.0
    default_watch_timeout: float = 1800.0

    _rv: int = attrs.field(init=False, default=0)
    _logs: dict[kmock.resource, EventLog] = attrs.field(init=False, factory=dict)
    _last_seen: dict[ObjKey, JSON] = attrs.field(init=False, factory=dict)
    _mutation_lock: asyncio.Lock = attrs.field(init=False, factory=asyncio.Lock)
    _closing: bool = attrs.field(init=False, default=False)   # shutting down: end every watch
    _close_gen: int = attrs.field(init=False, default=0)      # bumped by /_emulator/close-watches
    _request_count: int = attrs.field(init=False, default=0)
    _substitutes: dict[int, kmock.Request] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._buses = _EventSink(self)  # type: ignore[assignment]
        self._rv = self.rv_start
        # Admin endpoints for tests (not Kubernetes API).
        self['post /_emulator/compact'] << self._admin_compact
        self['post /_emulator/close-watches'] << self._admin_close_watches
        self['get /_emulator/state'] << self._admin_state
        # Just enough OpenAPI v3 for kubectl: it refuses to apply without an OpenAPI document
        # (client-side validation), unless the document says the server validates fields.
        self['get', re.compile(r'/openapi/v3(/.*)?')] << self._serve_openapi_v3
        self['get /version'] << {
            'major': '1', 'minor': '32', 'gitVersion': 'v1.32.0-kmock.0.8', 'gitCommit': '', 'gitTreeState': 'clean',
            'buildDate': '2025-01-01T00:00:00Z', 'goVersion': 'n/a', 'compiler': 'n/a', 'platform': 'linux/amd64'}
        self['get /healthz'] << b'ok'
        self['get /readyz'] << b'ok'
        self['get /livez'] << b'ok'

    # ---- resource metadata (from kmock's bundled discovery data) ----
    def _known(self, res: kmock.resource) -> bool:
        return res in self.resources

    def _kind(self, res: kmock.resource) -> str:
        info = self.resources[res] if res in self.resources else None
        return (info.kind if info and info.kind else (res.plural or '').capitalize())

    def _namespaced(self, res: kmock.resource) -> bool:
        info = self.resources[res] if res in self.resources else None
        return bool(info.namespaced) if info and info.namespaced is not None else True

    @staticmethod
    def _api_version(res: kmock.resource) -> str:
        return res.version if not res.group else f'{res.group}/{res.version}'

    def _log(self, res: kmock.resource) -> EventLog:
        if res not in self._logs:
            self._logs[res] = EventLog(floor=self.rv_start)
        return self._logs[res]

    # ---- event recording: called synchronously inside kmock's lock ----
    def _record(self, res: kmock.resource, event: JSON) -> None:
        self._rv += 1
        rv = self._rv
        obj = event['object']
        obj.setdefault('metadata', {})['resourceVersion'] = str(rv)  # shared with the stored version
        meta = obj['metadata']
        key: ObjKey = (res, meta.get('namespace') if self._namespaced(res) else None, meta.get('name', ''))
        snapshot = copy.deepcopy(obj)
        prev = self._last_seen.get(key)
        if event['type'] == 'DELETED':
            self._last_seen.pop(key, None)
        else:
            self._last_seen[key] = snapshot
        elog = self._log(res)
        elog.entries.append(Entry(rv=rv, type=event['type'], obj=snapshot, prev=prev))
        elog.rvs.append(rv)
        if len(elog.entries) > self.max_events:
            self._compact(elog, len(elog.entries) // 2)
        log.debug('event %s %s %s/%s rv=%d', event['type'], res.plural, key[1], key[2], rv)
        elog.wake()

    @staticmethod
    def _compact(elog: EventLog, count: int) -> None:
        count = min(count, len(elog.entries))
        if count <= 0:
            return
        elog.floor = max(elog.floor, elog.rvs[count - 1])
        del elog.entries[:count]
        del elog.rvs[:count]
        elog.dropped += count

    # ---- request dispatch ----
    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        try:
            return await self._dispatch(request)
        finally:
            self._forget(request)

    async def _dispatch(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is None or res.plural is None:
            return await super()._handle(request)  # discovery, /version, admin endpoints
        if not self._known(res):
            raise k8s_error(404, 'NotFound', 'the server could not find the requested resource')
        if request.subresource not in (None, 'status'):
            raise k8s_error(404, 'NotFound', f'the server could not find the requested resource '
                                             f'({request.subresource} subresource is not emulated)')
        if request.method == 'PUT' and request.name is not None:
            request = self._substitute(request, action=kmock.action.UPDATE)
        if request.action in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
            if request.subresource == 'status' and request.action != kmock.action.UPDATE:
                raise k8s_error(405, 'MethodNotAllowed', 'the status subresource supports get/patch/put only')
            async with self._mutation_lock:
                prepared = self._prepare_mutation(request)
                if isinstance(prepared, kmock.Request):
                    return await super()._handle(prepared)
                return aiohttp.web.json_response(prepared)  # a no-op update: unchanged object
        if request.action is None and request.method not in ('GET', 'HEAD'):
            if request.name is None and request.method == 'DELETE':
                raise k8s_error(405, 'MethodNotAllowed', 'deletecollection is not emulated')
            raise k8s_error(405, 'MethodNotAllowed', f'{request.method} is not supported on this URL')
        return await super()._handle(request)

    def _substitute(self, request: kmock.Request, **changes: Any) -> kmock.Request:
        """Replace a request with a rewritten copy.  kmock matches reactions against the
        requests it has recorded, by identity, so the copy takes the original's place."""
        new = attrs.evolve(request, **changes)
        for i, seen in enumerate(self._requests):
            if seen is request:
                self._requests[i] = new
                break
        else:
            self._requests.append(new)
        self._substitutes[id(new)] = self._substitutes.get(id(request), request)  # the original
        return new

    def _forget(self, request: kmock.Request) -> None:
        # kmock keeps every request for test assertions (and scans that list on every
        # request); a long-running server must not, so drop each one once it is served.
        done = {id(request)} | {i for i, orig in self._substitutes.items() if orig is request}
        for i in done:
            self._substitutes.pop(i, None)
        self._requests[:] = [r for r in self._requests if id(r) not in done]
        self._request_count += 1
        if self._request_count % 200 == 0:
            for payload in self._payloads:
                payload._requests.clear()
            if self._errors:
                self._errors[-1].clear()

    def _object_key(self, request: kmock.Request, name: str | None = None) -> ObjKey:
        res = request.resource
        assert res is not None
        ns = request.namespace if self._namespaced(res) else None
        return (res, ns, name if name is not None else request.name or '')

    def _current(self, key: ObjKey) -> JSON | None:
        if key not in self._objects:
            return None
        obj = self._objects[key]
        return None if obj.deleted else obj.raw

    def _not_found(self, key: ObjKey) -> kmock.KubernetesError:
        res = key[0]
        group = f'.{res.group}' if res.group else ''
        return k8s_error(404, 'NotFound', f'{res.plural}{group} "{key[2]}" not found',
                         name=key[2], group=res.group or None, kind=res.plural)

    # ---- mutations: normalise the body, then hand the full object to kmock ----
    def _prepare_mutation(self, request: kmock.Request) -> kmock.Request | JSON:
        res = request.resource
        assert res is not None
        if self._namespaced(res) and request.namespace is None and request.action != kmock.action.CREATE:
            raise k8s_error(404, 'NotFound', 'namespaced resources need a namespace in the URL')
        if not self._namespaced(res) and request.namespace is not None:
            raise k8s_error(404, 'NotFound', f'{res.plural} are cluster-scoped')
        if request.action == kmock.action.CREATE:
            return self._prepare_create(request, request.data)
        if request.action == kmock.action.DELETE:
            key = self._object_key(request)
            current = self._current(key)
            if current is None:
                raise self._not_found(key)
            pre = (request.data or {}).get('preconditions') if isinstance(request.data, dict) else None
            if pre:
                meta = current.get('metadata', {})
                if pre.get('uid') and pre['uid'] != meta.get('uid'):
                    raise k8s_error(409, 'Conflict', 'Precondition failed: UID in precondition does not match')
                if pre.get('resourceVersion') and pre['resourceVersion'] != meta.get('resourceVersion'):
                    raise k8s_error(409, 'Conflict', 'Precondition failed: ResourceVersion in precondition does not match')
            return request
        # UPDATE: PATCH (any patch type) or PUT
        key = self._object_key(request)
        current = self._current(key)
        ctype = next((v for k, v in request.headers.items() if k.lower() == 'content-type'), '')
        ctype = ctype.split(';')[0].strip().lower()
        body = request.data
        if current is None:
            if ctype == 'application/apply-patch+yaml' and isinstance(body, dict) and request.subresource is None:
                body = dict(body)
                body.setdefault('metadata', {})
                body['metadata'] = dict(body['metadata'], name=request.name)
                return self._prepare_create(self._substitute(request, action=kmock.action.CREATE, name=None), body)
            raise self._not_found(key)
        kind = self._kind(res)
        log.debug('%s %s %s/%s (%s): %s', request.method.value, res.plural, key[1], key[2], ctype or '-',
                  json.dumps(body)[:2000])
        try:
            if request.method == 'PUT':
                if not isinstance(body, dict):
                    raise k8s_error(400, 'BadRequest', 'the body of a PUT must be a JSON object')
                new = copy.deepcopy(body)
            elif ctype == 'application/merge-patch+json':
                new = json_merge_patch(current, body)
            elif ctype == 'application/json-patch+json':
                new = jsonpatch.apply_patch(current, body, in_place=False)
            elif ctype in ('application/strategic-merge-patch+json', 'application/apply-patch+yaml'):
                if not isinstance(body, dict):
                    raise k8s_error(400, 'BadRequest', 'the patch must be a JSON object '
                                                       '(YAML bodies are not emulated, send JSON)')
                new = strategic_merge_patch(current, body, kind)
            else:
                raise k8s_error(415, 'UnsupportedMediaType', f'the patch content type {ctype!r} is not supported')
        except jsonpatch.JsonPatchException as e:
            raise k8s_error(422, 'Invalid', f'the JSON patch could not be applied: {e}')
        if not isinstance(new, dict):
            raise k8s_error(422, 'Invalid', 'the patched object is not a JSON object')
        new = drop_nulls(new)
        cur_meta = current.get('metadata') or {}
        new_meta = new.get('metadata') if isinstance(new.get('metadata'), dict) else {}
        sent_rv = new_meta.get('resourceVersion')
        if sent_rv not in (None, '') and sent_rv != cur_meta.get('resourceVersion'):
            raise k8s_error(409, 'Conflict',
                            f'Operation cannot be fulfilled on {res.plural} "{key[2]}": the object has been '
                            'modified; please apply your changes to the latest version and try again',
                            name=key[2], kind=res.plural)
        if new_meta.get('name') not in (None, key[2]):
            raise k8s_error(400, 'BadRequest', 'the name of the object does not match the name in the URL')
        if request.subresource == 'status':
            status = new.get('status')
            new = copy.deepcopy(current)
            if status is None:
                new.pop('status', None)
            else:
                new['status'] = status
            new_meta = new['metadata']
        new_meta = dict(new_meta)
        for field in ('uid', 'creationTimestamp', 'deletionTimestamp', 'deletionGracePeriodSeconds',
                      'generation', 'namespace', 'name'):
            if field in cur_meta:
                new_meta[field] = cur_meta[field]
            else:
                new_meta.pop(field, None)
        new_meta['resourceVersion'] = cur_meta.get('resourceVersion')
        new['metadata'] = new_meta
        new['apiVersion'] = self._api_version(res)
        new['kind'] = kind
        if new == current:
            return copy.deepcopy(current)  # no-op: no new resourceVersion, no watch event (as the apiserver)
        spec_like = {k: v for k, v in new.items() if k not in ('metadata', 'status')}
        cur_spec_like = {k: v for k, v in current.items() if k not in ('metadata', 'status')}
        if spec_like != cur_spec_like:
            new_meta['generation'] = int(cur_meta.get('generation') or 1) + 1
        new_meta.pop('resourceVersion', None)  # stamped when kmock emits the event
        log.info('update %s %s/%s', res.plural, key[1], key[2])
        return self._substitute(request, data=[{'op': 'replace', 'path': '', 'value': new}])

    def _prepare_create(self, request: kmock.Request, body: Any) -> kmock.Request:
        res = request.resource
        assert res is not None
        if not isinstance(body, dict):
            raise k8s_error(400, 'BadRequest', 'the body of a create must be a JSON object')
        obj = drop_nulls(body)
        meta = obj.get('metadata') if isinstance(obj.get('metadata'), dict) else {}
        obj['metadata'] = meta
        namespaced = self._namespaced(res)
        if namespaced:
            ns = request.namespace or meta.get('namespace')
            if not ns:
                raise k8s_error(400, 'BadRequest', 'a namespace must be given for a namespaced resource')
            if meta.get('namespace') not in (None, '', ns):
                raise k8s_error(400, 'BadRequest', 'the namespace of the provided object does not match '
                                                   'the namespace sent on the request')
            meta['namespace'] = ns
        else:
            ns = None
            meta.pop('namespace', None)
        if not meta.get('name') and meta.get('generateName'):
            alphabet = string.ascii_lowercase + string.digits
            meta['name'] = meta['generateName'] + ''.join(random.choice(alphabet) for _ in range(5))
        if not meta.get('name'):
            raise k8s_error(422, 'Invalid', f'{self._kind(res)} "" is invalid: metadata.name: Required value',
                            kind=self._kind(res))
        key: ObjKey = (res, ns, meta['name'])
        if self._current(key) is not None:
            group = f'.{res.group}' if res.group else ''
            raise k8s_error(409, 'AlreadyExists', f'{res.plural}{group} "{meta["name"]}" already exists',
                            name=meta['name'], group=res.group or None, kind=res.plural)
        for field in ('resourceVersion', 'deletionTimestamp', 'deletionGracePeriodSeconds', 'managedFields'):
            meta.pop(field, None)
        meta['uid'] = str(uuid.uuid4())
        meta['creationTimestamp'] = now_rfc3339()
        meta['generation'] = 1
        obj['apiVersion'] = self._api_version(res)
        obj['kind'] = self._kind(res)
        log.info('create %s %s/%s', res.plural, ns, meta['name'])
        return self._substitute(request, action=kmock.action.CREATE, data=obj, namespace=ns)

    # ---- reads ----
    def _matcher(self, request: kmock.Request) -> Callable[[JSON], bool]:
        labels = parse_label_selector(request.params.get('labelSelector'))
        fields = parse_field_selector(request.params.get('fieldSelector'))
        res = request.resource
        assert res is not None
        ns = request.namespace if self._namespaced(res) else None
        name = request.name

        def match(obj: JSON) -> bool:
            meta = obj.get('metadata') or {}
            if ns is not None and meta.get('namespace') != ns:
                return False
            if name is not None and meta.get('name') != name:
                return False
            return labels(obj) and fields(obj)
        return match

    def _live_objects(self, res: kmock.resource) -> list[JSON]:
        objs = [obj.raw for (r, _, _), obj in self._objects.items() if r == res and not obj.deleted]
        objs.sort(key=lambda o: ((o['metadata'].get('namespace') or ''), o['metadata'].get('name') or ''))
        return objs

    def _render_item(self, res: kmock.resource, obj: JSON, mode: str, request: kmock.Request) -> JSON:
        if mode in ('meta', 'metalist'):
            return partial_metadata(obj)
        if mode == 'table':  # kubectl get -w: one-row tables
            return self._table(res, [obj], obj['metadata'].get('resourceVersion'),
                               request.params.get('includeObject', 'Metadata'))
        return obj

    def _table(self, res: kmock.resource, objs: list[JSON], rv: str | None, include: str) -> JSON:
        now = datetime.datetime.now(tz=datetime.timezone.utc)

        def age(obj: JSON) -> str:
            ts = (obj.get('metadata') or {}).get('creationTimestamp')
            try:
                created = datetime.datetime.strptime(ts, '%Y-%m-%dT%H:%M:%SZ').replace(tzinfo=datetime.timezone.utc)
            except (TypeError, ValueError):
                return '<unknown>'
            secs = max(0, int((now - created).total_seconds()))
            return f'{secs}s' if secs < 120 else f'{secs // 60}m' if secs < 7200 else f'{secs // 3600}h'

        rows = []
        for obj in objs:
            row: JSON = {'cells': [obj['metadata'].get('name'), age(obj)]}
            if include == 'Object':
                row['object'] = obj
            elif include != 'None':
                row['object'] = partial_metadata(obj)
            rows.append(row)
        return {
            'kind': 'Table', 'apiVersion': 'meta.k8s.io/v1', 'metadata': {'resourceVersion': rv} if rv else {},
            'columnDefinitions': [
                {'name': 'Name', 'type': 'string', 'format': 'name', 'description': 'Name', 'priority': 0},
                {'name': 'Age', 'type': 'string', 'format': '', 'description': 'Age', 'priority': 0},
            ],
            'rows': rows,
        }

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        res = request.resource
        assert res is not None
        key = self._object_key(request)
        obj = self._current(key)
        if obj is None:
            raise self._not_found(key)
        mode = parse_accept(request.headers)
        if mode == 'table':
            return self._table(res, [obj], None, request.params.get('includeObject', 'Metadata'))
        return self._render_item(res, obj, mode, request)

    async def _serve_list(self, request: kmock.Request) -> Any:
        res = request.resource
        assert res is not None
        match = self._matcher(request)
        objs = [o for o in self._live_objects(res) if match(o)]
        list_rv = self._rv
        start: list[str] | None = None
        if token := request.params.get('continue'):
            try:
                state = json.loads(base64.urlsafe_b64decode(token.encode()))
                list_rv, start = int(state['rv']), list(state['start'])
            except (ValueError, KeyError, TypeError):
                raise k8s_error(400, 'BadRequest', 'invalid continue token')
            if list_rv < self._log(res).floor:
                raise k8s_error(410, 'Expired', 'The provided continue parameter is too old to display a '
                                                'consistent list result. You can start a new list without '
                                                'the continue parameter.')
            objs = [o for o in objs if [o['metadata'].get('namespace') or '', o['metadata']['name']] > start]
        meta: JSON = {'resourceVersion': str(list_rv)}
        limit = request.params.get('limit')
        if limit and limit.isdigit() and int(limit) > 0 and len(objs) > int(limit):
            page, rest = objs[:int(limit)], objs[int(limit):]
            last = page[-1]['metadata']
            token_state = {'rv': list_rv, 'start': [last.get('namespace') or '', last['name']]}
            meta['continue'] = base64.urlsafe_b64encode(json.dumps(token_state).encode()).decode()
            meta['remainingItemCount'] = len(rest)
            objs = page
        mode = parse_accept(request.headers)
        if mode == 'table':
            table = self._table(res, objs, str(list_rv), request.params.get('includeObject', 'Metadata'))
            table['metadata'].update({k: v for k, v in meta.items() if k == 'continue'})
            return table
        if mode in ('meta', 'metalist'):
            return {'kind': 'PartialObjectMetadataList', 'apiVersion': 'meta.k8s.io/v1', 'metadata': meta,
                    'items': [partial_metadata(o) for o in objs]}
        return {'kind': f'{self._kind(res)}List', 'apiVersion': self._api_version(res), 'metadata': meta,
                'items': objs}

    async def _serve_create(self, request: kmock.Request) -> Any:
        obj = await super()._serve_create(request)
        return kmock.Response(status=201, payload=obj)

    # ---- watch ----
    async def _serve_watch(self, request: kmock.Request) -> Any:  # type: ignore[override]
        res = request.resource
        assert res is not None
        match = self._matcher(request)  # validates selectors before the stream starts
        rv_param = request.params.get('resourceVersion') or ''
        if rv_param not in ('', '0') and not rv_param.isdigit():
            raise k8s_error(400, 'BadRequest', f'invalid resourceVersion {rv_param!r}')
        timeout = self.default_watch_timeout
        if (t := request.params.get('timeoutSeconds')) and t.isdigit() and int(t) > 0:
            timeout = float(t)
        return kmock.Response(headers={'Content-Type': 'application/json'},
                              payload=self._watch_stream(request, match, rv_param, timeout))

    async def _watch_stream(self, request: kmock.Request, match: Callable[[JSON], bool],
                            rv_param: str, timeout: float) -> AsyncIterator[Any]:
        res = request.resource
        assert res is not None
        mode = parse_accept(request.headers)
        meta_only = mode in ('meta', 'metalist')
        bookmarks = request.params.get('allowWatchBookmarks') == 'true'
        initial_events = request.params.get('sendInitialEvents') == 'true'
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_bookmark = loop.time() + self.bookmark_interval
        elog = self._log(res)
        wakeup = asyncio.Event()
        close_gen = self._close_gen
        yield b''  # send the headers now, as the apiserver does

        def bookmark(annotations: dict[str, str] | None = None) -> JSON:
            obj: JSON = {'kind': 'PartialObjectMetadata' if meta_only else self._kind(res),
                         'apiVersion': 'meta.k8s.io/v1' if meta_only else self._api_version(res),
                         'metadata': {'resourceVersion': str(self._rv)}}
            if annotations:
                obj['metadata']['annotations'] = annotations
            return {'type': 'BOOKMARK', 'object': obj}

        def gone(rv: int) -> JSON:
            return {'type': 'ERROR', 'object': status_object(
                410, 'Expired', f'too old resource version: {rv} ({elog.floor})')}

        initial: list[JSON] = []
        if rv_param in ('', '0') or initial_events:
            # "Get state and start at most recent": synthetic ADDED for what exists now.
            pos = elog.dropped + len(elog.entries)
            initial = [{'type': 'ADDED', 'object': self._render_item(res, copy.deepcopy(o), mode, request)}
                       for o in self._live_objects(res) if match(o)]
        else:
            since = int(rv_param)
            if since < elog.floor or since > self._rv:
                # Too old (compacted) or newer than this server has ever issued (e.g. an RV from a
                # previous emulator process): the apiserver's 200 + ERROR 410 makes clients relist.
                log.info('watch %s from rv=%d: 410 Gone (floor=%d, current=%d)', res.plural, since, elog.floor, self._rv)
                if since > self._rv:
                    yield {'type': 'ERROR', 'object': status_object(
                        410, 'Expired', f'too old resource version: {since} (this emulator process is at '
                                        f'{self._rv}; the version is from an earlier process)')}
                else:
                    yield gone(since)
                return
            pos = elog.dropped + bisect.bisect_right(elog.rvs, since)
        elog.watchers.add(wakeup)
        log.info('watch %s ns=%s rv=%s start (timeout %.0fs)', res.plural, request.namespace, rv_param or '-', timeout)
        try:
            for event in initial:
                yield event
            if initial_events and bookmarks:
                yield bookmark({'k8s.io/initial-events-end': 'true'})
            while True:
                wakeup.clear()
                if pos < elog.dropped:
                    yield gone(elog.floor)  # compacted while this watch lagged behind
                    return
                while pos < elog.dropped + len(elog.entries):
                    entry = elog.entries[pos - elog.dropped]
                    pos += 1
                    out = self._translate(entry, match)
                    if out is not None:
                        yield {'type': out[0], 'object': self._render_item(res, out[1], mode, request)}
                if self._closing or self._close_gen != close_gen:
                    return
                now = loop.time()
                if now >= deadline:
                    if bookmarks:
                        yield bookmark()
                    return
                if bookmarks and now >= next_bookmark:
                    yield bookmark()
                    next_bookmark = now + self.bookmark_interval
                wait_until = min(deadline, next_bookmark) if bookmarks else deadline
                try:
                    await asyncio.wait_for(wakeup.wait(), timeout=max(0.0, wait_until - loop.time()))
                except asyncio.TimeoutError:
                    pass
        finally:
            elog.watchers.discard(wakeup)
            log.info('watch %s ns=%s end', res.plural, request.namespace)

    @staticmethod
    def _translate(entry: Entry, match: Callable[[JSON], bool]) -> tuple[str, JSON] | None:
        if entry.type == 'MODIFIED':
            now_in = match(entry.obj)
            was_in = entry.prev is not None and match(entry.prev)
            if now_in and was_in:
                return 'MODIFIED', entry.obj
            if now_in:
                return 'ADDED', entry.obj
            if was_in:
                return 'DELETED', entry.obj
            return None
        return (entry.type, entry.obj) if match(entry.obj) else None

    def close_watches(self) -> None:
        self._closing = True
        for elog in self._logs.values():
            elog.wake()

    async def _serve_version(self, request: kmock.Request) -> Any:
        doc = await super()._serve_version(request)
        if isinstance(doc, dict) and str(doc.get('groupVersion', '')).startswith('/'):
            doc['groupVersion'] = doc['groupVersion'][1:]  # kmock 0.8 says "/v1" for the core group
        for entry in doc.get('resources', []) if isinstance(doc, dict) else []:
            if '/' in entry.get('name', ''):  # subresources have no short names or categories
                entry['shortNames'], entry['categories'] = [], []
        return doc

    # ---- OpenAPI v3 stub ----
    def _group_versions(self) -> dict[str, list[kmock.resource]]:
        gvs: dict[str, list[kmock.resource]] = {}
        for res in self.resources:
            if res.plural and res.version is not None and res.group is not None:
                prefix = 'api/v1' if not res.group else f'apis/{res.group}/{res.version}'
                gvs.setdefault(prefix, []).append(res)
        return gvs

    async def _serve_openapi_v3(self, request: kmock.Request) -> JSON:
        gvs = self._group_versions()
        sub = request.url.path[len('/openapi/v3'):].strip('/')
        if not sub:
            return {'paths': {gv: {'serverRelativeURL': f'/openapi/v3/{gv}'} for gv in sorted(gvs)}}
        if sub not in gvs:
            raise k8s_error(404, 'NotFound', f'no OpenAPI document for {sub}')
        paths: JSON = {}
        for res in gvs[sub]:
            info = self.resources[res]
            if 'patch' not in info.verbs:
                continue
            scope = '/namespaces/{namespace}' if self._namespaced(res) else ''
            gvk = {'group': res.group, 'version': res.version, 'kind': self._kind(res)}
            paths[f'/{sub}{scope}/{res.plural}/{{name}}'] = {'patch': {
                'operationId': f'patch{self._kind(res)}',
                'x-kubernetes-group-version-kind': gvk,
                'x-kubernetes-action': 'patch',
                'parameters': [{'name': 'fieldValidation', 'in': 'query', 'schema': {'type': 'string'},
                                'description': 'accepted and ignored by the emulator'}],
                'responses': {'200': {'description': 'OK'}},
            }}
        return {'openapi': '3.0.0', 'info': {'title': 'Kubernetes (kmock emulator)', 'version': 'v1'},
                'paths': paths, 'components': {}}

    # ---- admin endpoints ----
    async def _admin_compact(self, request: kmock.Request) -> JSON:
        for elog in self._logs.values():
            self._compact(elog, len(elog.entries))
            elog.floor = max(elog.floor, self._rv)
            elog.wake()
        for res in self.resources:
            if res not in self._logs:
                self._log(res).floor = self._rv
        log.info('compacted event history at rv=%d', self._rv)
        return {'compactedAt': str(self._rv)}

    async def _admin_close_watches(self, request: kmock.Request) -> JSON:
        count = sum(len(elog.watchers) for elog in self._logs.values())
        self._close_gen += 1  # open streams end on their next wake-up; new watches are unaffected
        for elog in self._logs.values():
            elog.wake()
        return {'closed': count}

    async def _admin_state(self, request: kmock.Request) -> JSON:
        return {'resourceVersion': str(self._rv),
                'objects': sum(1 for o in self._objects.values() if not o.deleted),
                'watches': sum(len(elog.watchers) for elog in self._logs.values())}

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        # kmock's errors carry non-standard reasons and a traceback; map them to apiserver Status.
        if isinstance(exc, kmock.KubernetesObjectNotFoundError | kmock.KubernetesResourceNotFoundError |
                      kmock.KubernetesEndpointNotFoundError):
            return aiohttp.web.json_response(status_object(404, 'NotFound', exc.message or 'not found'), status=404)
        if isinstance(exc, kmock.KubernetesError):
            details = exc.details if isinstance(exc.details, dict) else None
            reason = exc.reason or ''
            if not reason.isalpha():  # one of kmock's own, e.g. 'Object Already Exists'
                reason = {409: 'AlreadyExists', 404: 'NotFound'}.get(exc.status, 'BadRequest')
            return aiohttp.web.json_response(status_object(exc.status, reason, exc.message or '', details),
                                             status=exc.status)
        log.exception('internal error while serving a request', exc_info=exc)
        return aiohttp.web.json_response(status_object(500, 'InternalError', repr(exc)), status=500)


# ----------------------------------------------------------------------------
# Process wiring: socket, kubeconfig, readiness line, signals.
# ----------------------------------------------------------------------------
def write_kubeconfig(path: str, port: int) -> None:
    server = f'http://127.0.0.1:{port}'
    text = (
        'apiVersion: v1\n'
        'kind: Config\n'
        'clusters:\n'
        '- name: emulator\n'
        '  cluster:\n'
        f'    server: {server}\n'
        'users:\n'
        '- name: emulator\n'
        '  user: {}\n'
        'contexts:\n'
        '- name: emulator\n'
        '  context:\n'
        '    cluster: emulator\n'
        '    user: emulator\n'
        '    namespace: default\n'
        'current-context: emulator\n'
        'preferences: {}\n'
    )
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)


def parse_rv_start(value: str) -> int:
    if value == 'time':
        return time.time_ns() // 1000  # microseconds: later processes always start higher
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError("expected a non-negative integer or 'time'")


# Collection paths for --preload, by kind.
_PRELOAD_PATHS = {
    'Namespace': '/api/v1/namespaces',
    'Node': '/api/v1/nodes',
    'Service': '/api/v1/namespaces/{ns}/services',
    'Pod': '/api/v1/namespaces/{ns}/pods',
    'ConfigMap': '/api/v1/namespaces/{ns}/configmaps',
    'EndpointSlice': '/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices',
}


def _preload_objects(paths: list[str]) -> list[JSON]:
    """Objects from JSON files: one object, a JSON array, or a kind: List."""
    objects: list[JSON] = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        items = data if isinstance(data, list) else data.get('items', [data]) if data.get('kind') == 'List' else [data]
        objects.extend(items)
    return objects


async def preload(emulator: 'Emulator', objects: list[JSON]) -> None:
    """Creates `objects` through the emulator's own API before the real port opens.

    A restarted emulator must not be seen empty: a watcher that relists against it
    would withdraw every endpoint before the test could re-apply them.
    """
    server = aiohttp.web.Server(emulator, handler_cancellation=True)
    runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0, handle_signals=False)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, '127.0.0.1', 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session:
            for obj in objects:
                kind = obj.get('kind')
                if kind not in _PRELOAD_PATHS:
                    raise SystemExit(f'--preload: unsupported kind {kind!r}')
                ns = obj.get('metadata', {}).get('namespace', 'default')
                url = f'http://127.0.0.1:{port}' + _PRELOAD_PATHS[kind].format(ns=ns)
                async with session.post(url, json=obj) as response:
                    if response.status not in (200, 201):
                        raise SystemExit(f'--preload: creating {kind} failed: {response.status} {await response.text()}')
    finally:
        await runner.cleanup()
    log.info('preloaded %d objects', len(objects))


async def serve(args: argparse.Namespace) -> int:
    emulator = Emulator(rv_start=args.rv_start, max_events=args.max_events,
                        bookmark_interval=args.bookmark_interval,
                        default_watch_timeout=args.default_watch_timeout)
    emulator.resources.load_bundled()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart on the same port at once
    try:
        sock.bind(('127.0.0.1', args.port))
    except OSError as e:
        log.error('cannot bind 127.0.0.1:%d: %s', args.port, e)
        sock.close()
        return 1
    port = sock.getsockname()[1]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async with emulator:
        if args.preload:
            await preload(emulator, _preload_objects(args.preload))
        server = aiohttp.web.Server(emulator, handler_cancellation=True,
                                    access_log=logging.getLogger('k8s-emulator.access'))
        runner = aiohttp.web.ServerRunner(server, shutdown_timeout=2.0, handle_signals=False)
        await runner.setup()
        site = aiohttp.web.SockSite(runner, sock)
        await site.start()
        if args.kubeconfig:
            write_kubeconfig(args.kubeconfig, port)
        sys.stdout.write(json.dumps({'listening': {'api': f'127.0.0.1:{port}'}}, separators=(',', ':')) + '\n')
        sys.stdout.flush()
        log.info('serving the Kubernetes API emulator on http://127.0.0.1:%d (rv starts after %d)', port, args.rv_start)
        await stop.wait()
        log.info('stopping')
        emulator.close_watches()
        await runner.cleanup()
    log.info('stopped')
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--port', type=int, default=0, help='TCP port on 127.0.0.1 (default 0: the OS picks)')
    p.add_argument('--preload', action='append', default=[], metavar='FILE.json',
                   help='create these objects (a JSON object, array or List) before the port opens; repeatable')
    p.add_argument('--kubeconfig', help='write a kubeconfig (context "emulator", namespace "default") here')
    p.add_argument('--rv-start', type=parse_rv_start, default=0,
                   help="resourceVersions start after this number; 'time' = the wall clock in microseconds, "
                        'so that a restarted emulator never reissues an old resourceVersion (default 0)')
    p.add_argument('--bookmark-interval', type=float, default=10.0,
                   help='seconds between BOOKMARK events on watches with allowWatchBookmarks=true (default 10)')
    p.add_argument('--default-watch-timeout', type=float, default=1800.0,
                   help='seconds a watch without timeoutSeconds stays open (default 1800)')
    p.add_argument('--max-events', type=int, default=100_000,
                   help='watch history kept per resource before the oldest half is compacted (default 100000)')
    p.add_argument('--log-level', default=os.environ.get('EMULATOR_LOG_LEVEL', 'INFO'),
                   help='DEBUG, INFO, WARNING (default INFO, or $EMULATOR_LOG_LEVEL)')
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error('--port must be within 0..65535')
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    return asyncio.run(serve(args))


if __name__ == '__main__':
    sys.exit(main())
