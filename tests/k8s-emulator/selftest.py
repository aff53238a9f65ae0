#!/usr/bin/env python3
"""Protocol self-test of emulator.py, as kube-rs' watcher and kubectl use the API.

Starts emulator.py itself (twice, for the restart case), talks raw HTTP with aiohttp,
and prints one line per check, then "N passed, N failed".  Exit status 0 only if all
passed.  Every wait has a deadline; every process it starts it stops by PID.

    .venv/bin/python tests/k8s-emulator/selftest.py
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

import aiohttp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import emulator as emu  # noqa: E402  (for the pure-function checks)

SLICES = '/apis/discovery.k8s.io/v1/namespaces/default/endpointslices'
WEB = 'labelSelector=kubernetes.io/service-name%3Dweb'
RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: Any = '') -> bool:
    RESULTS.append((name, bool(ok), str(detail)))
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else f' -- {detail}'}", flush=True)
    return bool(ok)


def slice_obj(name: str, service: str, ip: str) -> dict[str, Any]:
    return {
        'apiVersion': 'discovery.k8s.io/v1', 'kind': 'EndpointSlice',
        'metadata': {'name': name, 'labels': {'kubernetes.io/service-name': service,
                                              'endpointslice.kubernetes.io/managed-by': 'endpointslice-controller.k8s.io'}},
        'addressType': 'IPv4',
        'ports': [{'name': 'http', 'port': 8080, 'protocol': 'TCP'}],
        'endpoints': [{'addresses': [ip], 'conditions': {'ready': True, 'serving': True, 'terminating': False},
                       'nodeName': 'node-a', 'zone': 'eu-west-1a'}],
    }


class Emulator:
    """emulator.py as a subprocess: started, awaited ready, stopped by PID."""

    def __init__(self, *args: str) -> None:
        self.args = list(args)
        self._log = open(os.path.join(HERE, '.tmp', 'selftest-emulator.log'), 'ab')
        self.proc: asyncio.subprocess.Process | None = None
        self.api = ''

    async def start(self, deadline: float = 20.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, os.path.join(HERE, 'emulator.py'), *self.args,
            stdout=asyncio.subprocess.PIPE, stderr=self._log)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), deadline)
        self.api = json.loads(line)['listening']['api']

    @property
    def url(self) -> str:
        return f'http://{self.api}'

    async def stop(self, deadline: float = 10.0) -> int:
        assert self.proc is not None
        self._log.close()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), deadline)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
                return -9
        return self.proc.returncode


class Watch:
    """Collects the events of one watch request in the background."""

    def __init__(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.status = 0
        self.ended = asyncio.Event()
        self.started = asyncio.Event()
        self.task = asyncio.create_task(self._run(session, url, headers or {}))

    async def _run(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        try:
            async with session.get(url, headers=headers) as resp:
                self.status = resp.status
                self.started.set()
                async for line in resp.content:
                    if line.strip():
                        self.events.append(json.loads(line))
        except (aiohttp.ClientError, asyncio.CancelledError):
            pass
        finally:
            self.started.set()
            self.ended.set()

    async def wait_for(self, pred: Any, timeout: float = 5.0) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < end:
            for ev in self.events[seen:]:
                if pred(ev):
                    return ev
            seen = len(self.events)
            if self.ended.is_set():
                return None
            await asyncio.sleep(0.02)  # polling a local list under a deadline
        return None

    async def close(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


def pure_checks() -> None:
    # Strategic merge patch, as kubectl emits it for a Service's ports.
    svc = {'spec': {'ports': [{'name': 'http', 'port': 80, 'targetPort': 8080}]}}
    patched = emu.strategic_merge_patch(svc, {'spec': {
        '$setElementOrder/ports': [{'port': 80}, {'port': 9000}],
        'ports': [{'name': 'grpc', 'port': 9000, 'targetPort': 9000}]}}, 'Service')
    check('smp: adds a list element by merge key', [p['port'] for p in patched['spec']['ports']] == [80, 9000], patched)
    patched = emu.strategic_merge_patch(patched, {'spec': {
        '$setElementOrder/ports': [{'port': 9000}], 'ports': [{'$patch': 'delete', 'port': 80}]}}, 'Service')
    check('smp: $patch: delete removes the element', [p['port'] for p in patched['spec']['ports']] == [9000], patched)
    eps = {'endpoints': [{'addresses': ['10.0.0.1']}, {'addresses': ['10.0.0.2']}]}
    patched = emu.strategic_merge_patch(eps, {'endpoints': [{'addresses': ['10.0.0.2']}]}, 'EndpointSlice')
    check('smp: atomic lists (EndpointSlice.endpoints) are replaced', patched == {'endpoints': [{'addresses': ['10.0.0.2']}]}, patched)
    patched = emu.strategic_merge_patch({'metadata': {'labels': {'a': '1', 'b': '2'}, 'finalizers': ['x']}},
                                        {'metadata': {'labels': {'a': None}, 'finalizers': ['y']}}, 'Pod')
    check('smp: null deletes keys; finalizers merge', patched == {'metadata': {'labels': {'b': '2'}, 'finalizers': ['x', 'y']}}, patched)
    patched = emu.strategic_merge_patch({'metadata': {'finalizers': ['x', 'y']}},
                                        {'metadata': {'$deleteFromPrimitiveList/finalizers': ['x']}}, 'Pod')
    check('smp: $deleteFromPrimitiveList', patched == {'metadata': {'finalizers': ['y']}}, patched)
    pod = {'spec': {'containers': [{'name': 'a', 'image': 'a:1', 'env': [{'name': 'X', 'value': '1'}]}]}}
    patched = emu.strategic_merge_patch(pod, {'spec': {'containers': [{'name': 'a', 'env': [{'name': 'Y', 'value': '2'}]}]}}, 'Pod')
    check('smp: nested merge keys (containers[].env)',
          patched['spec']['containers'][0] == {'name': 'a', 'image': 'a:1', 'env': [{'name': 'X', 'value': '1'}, {'name': 'Y', 'value': '2'}]}, patched)
    check('merge patch: dict replaced by scalar', emu.json_merge_patch({'a': {'b': 1}}, {'a': 2, 'c': None}) == {'a': 2})
    m = emu.parse_label_selector('kubernetes.io/service-name=web,tier in (a, b),!canary,env!=prod,zone')
    good = {'metadata': {'labels': {'kubernetes.io/service-name': 'web', 'tier': 'a', 'zone': 'z'}}}
    bad = {'metadata': {'labels': {'kubernetes.io/service-name': 'web', 'tier': 'a', 'zone': 'z', 'canary': '1'}}}
    check('label selector: set- and equality-based', m(good) and not m(bad))
    check('field selector: metadata.name', emu.parse_field_selector('metadata.name=x')({'metadata': {'name': 'x'}}))


async def http_checks(session: aiohttp.ClientSession, base: str) -> int:
    """Returns the last resourceVersion seen (for the restart check)."""
    async def req(method: str, path: str, body: Any = None, ctype: str = 'application/json',
                  headers: dict[str, str] | None = None) -> tuple[int, Any]:
        h = {'Content-Type': ctype, **(headers or {})}
        data = None if body is None else json.dumps(body)
        async with session.request(method, base + path, data=data, headers=h) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text.startswith('{') else text)

    # Objects: two slices of "web", one of "other".
    for name, svc, ip in [('web-1', 'web', '10.244.0.5'), ('web-2', 'web', '10.244.1.7'), ('other-1', 'other', '10.244.2.9')]:
        status, body = await req('POST', SLICES, slice_obj(name, svc, ip))
        check(f'create {name} -> 201 with resourceVersion', status == 201 and body['metadata'].get('resourceVersion'), (status, body))
    status, body = await req('POST', SLICES, slice_obj('web-1', 'web', '10.0.0.1'))
    check('create duplicate -> 409 AlreadyExists', status == 409 and body.get('reason') == 'AlreadyExists', (status, body))
    status, body = await req('GET', SLICES + '/nope')
    check('get missing -> 404 NotFound', status == 404 and body.get('reason') == 'NotFound', (status, body))

    # kube-runtime's initial list: ?labelSelector=...&limit=N, paginated with continue.
    status, page1 = await req('GET', f'{SLICES}?{WEB}&limit=1')
    status2, page2 = await req('GET', f"{SLICES}?{WEB}&limit=1&continue={page1['metadata'].get('continue', '')}")
    names = [i['metadata']['name'] for i in page1.get('items', []) + page2.get('items', [])]
    check('list: label selector + limit/continue pagination', names == ['web-1', 'web-2'] and 'continue' not in page2['metadata'], (page1['metadata'], page2['metadata'], names))
    list_rv = int(page1['metadata']['resourceVersion'])
    check('list: kind/apiVersion/metadata.resourceVersion', page1.get('kind') == 'EndpointSliceList'
          and page1.get('apiVersion') == 'discovery.k8s.io/v1' and list_rv >= 3, page1.get('metadata'))

    # kube-runtime's watch: watch=true&timeoutSeconds=N&labelSelector=...&allowWatchBookmarks=true&resourceVersion=X
    w = Watch(session, f'{base}{SLICES}?watch=true&timeoutSeconds=4&{WEB}&allowWatchBookmarks=true&resourceVersion={list_rv}')
    await asyncio.wait_for(w.started.wait(), 5)
    check('watch: 200 and streaming', w.status == 200, w.status)
    status, body = await req('PATCH', SLICES + '/web-1', {'endpoints': [{'addresses': ['10.244.0.6'], 'conditions': {'ready': True}}]},
                             'application/merge-patch+json')
    ev = await w.wait_for(lambda e: e['type'] == 'MODIFIED' and e['object']['metadata']['name'] == 'web-1')
    check('watch: MODIFIED after a merge patch', ev is not None and ev['object']['endpoints'][0]['addresses'] == ['10.244.0.6'], w.events)
    status, got = await req('GET', SLICES + '/web-1')
    check('watch: event resourceVersion == GET resourceVersion == PATCH response',
          ev is not None and ev['object']['metadata']['resourceVersion'] == got['metadata']['resourceVersion'] == body['metadata']['resourceVersion'],
          (ev and ev['object']['metadata'], got['metadata'], body['metadata']))
    check('watch: generation bumped on a spec change', got['metadata'].get('generation') == 2, got['metadata'])
    # Label transitions: other-1 starts matching (ADDED), web-2 stops matching (DELETED).
    await req('PATCH', SLICES + '/other-1', {'metadata': {'labels': {'kubernetes.io/service-name': 'web'}}}, 'application/merge-patch+json')
    ev = await w.wait_for(lambda e: e['object'].get('metadata', {}).get('name') == 'other-1')
    check('watch: label change into the selector -> ADDED', ev is not None and ev['type'] == 'ADDED', w.events)
    await req('PATCH', SLICES + '/web-2', [{'op': 'replace', 'path': '/metadata/labels/kubernetes.io~1service-name', 'value': 'gone'}],
              'application/json-patch+json')
    ev = await w.wait_for(lambda e: e['object'].get('metadata', {}).get('name') == 'web-2')
    check('watch: label change out of the selector -> DELETED (json patch)', ev is not None and ev['type'] == 'DELETED', w.events)
    status, body = await req('DELETE', SLICES + '/web-1')
    ev = await w.wait_for(lambda e: e['type'] == 'DELETED' and e['object']['metadata']['name'] == 'web-1')
    check('watch: DELETED carries a new resourceVersion', ev is not None and int(ev['object']['metadata']['resourceVersion']) > list_rv, ev)
    bm = await w.wait_for(lambda e: e['type'] == 'BOOKMARK', timeout=3)
    check('watch: BOOKMARK with kind/apiVersion/resourceVersion', bm is not None and bm['object']['kind'] == 'EndpointSlice'
          and bm['object']['apiVersion'] == 'discovery.k8s.io/v1' and bm['object']['metadata']['resourceVersion'], w.events[-1:])
    t0 = time.monotonic()
    await asyncio.wait_for(w.ended.wait(), 8)
    check('watch: timeoutSeconds ends the stream', w.ended.is_set() and time.monotonic() - t0 < 6, time.monotonic() - t0)
    rvs = [int(e['object']['metadata']['resourceVersion']) for e in w.events if e['type'] != 'BOOKMARK']
    check('watch: resourceVersions strictly increase', rvs == sorted(rvs) and len(set(rvs)) == len(rvs) and rvs, rvs)
    last_rv = int(w.events[-1]['object']['metadata']['resourceVersion'])
    await w.close()

    # Resume from the last bookmark: nothing is replayed twice, new changes arrive.
    w = Watch(session, f'{base}{SLICES}?watch=true&timeoutSeconds=3&{WEB}&allowWatchBookmarks=true&resourceVersion={last_rv}')
    await asyncio.wait_for(w.started.wait(), 5)
    status, body = await req('POST', SLICES, slice_obj('web-3', 'web', '10.244.0.7'))
    ev = await w.wait_for(lambda e: e['type'] != 'BOOKMARK')
    check('watch resume: first event is the new one (no replay)', ev is not None and ev['type'] == 'ADDED'
          and ev['object']['metadata']['name'] == 'web-3', w.events)
    # A no-op patch: no new resourceVersion, no event (as the apiserver).
    rv_before = body['metadata']['resourceVersion']
    status, body = await req('PATCH', SLICES + '/web-3', {'addressType': 'IPv4'}, 'application/merge-patch+json')
    check('no-op patch keeps the resourceVersion', status == 200 and body['metadata']['resourceVersion'] == rv_before, body.get('metadata'))
    # Optimistic concurrency on PUT.
    stale = dict(body, metadata=dict(body['metadata'], resourceVersion=str(int(rv_before) - 1)))
    status, err = await req('PUT', SLICES + '/web-3', stale)
    check('PUT with a stale resourceVersion -> 409 Conflict', status == 409 and err.get('reason') == 'Conflict', (status, err))
    fresh = dict(body, metadata=dict(body['metadata'], labels=dict(body['metadata']['labels'], extra='1')))
    status, put = await req('PUT', SLICES + '/web-3', fresh)
    check('PUT with the current resourceVersion -> 200, new resourceVersion', status == 200 and int(put['metadata']['resourceVersion']) > int(rv_before), (status, put))
    await w.close()

    # Initial events as a stream (kube-runtime's streaming_lists()), metadata only.
    meta_hdr = {'Accept': 'application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1'}
    w = Watch(session, f'{base}{SLICES}?watch=true&timeoutSeconds=2&allowWatchBookmarks=true&sendInitialEvents=true'
                       f'&resourceVersionMatch=NotOlderThan&resourceVersion=0&{WEB}', meta_hdr)
    end = await w.wait_for(lambda e: e['type'] == 'BOOKMARK')
    added = [e['object']['metadata']['name'] for e in w.events if e['type'] == 'ADDED']
    check('sendInitialEvents: ADDED for each object, then the initial-events-end BOOKMARK',
          end is not None and end['object']['metadata'].get('annotations', {}).get('k8s.io/initial-events-end') == 'true'
          and sorted(added) == ['other-1', 'web-3'], w.events)
    check('metadata-only watch: PartialObjectMetadata objects', all(e['object']['kind'] == 'PartialObjectMetadata'
          and 'endpoints' not in e['object'] for e in w.events), w.events[:1])
    await w.close()
    status, body = await req('GET', f'{SLICES}?{WEB}', headers={'Accept': 'application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1'})
    check('metadata-only list: PartialObjectMetadataList', body.get('kind') == 'PartialObjectMetadataList' and body['metadata'].get('resourceVersion')
          and all(i['kind'] == 'PartialObjectMetadata' for i in body['items']), body)

    # A single object's watch (fieldSelector=metadata.name=..., as kubectl and kube-rs await_condition do).
    w = Watch(session, f'{base}{SLICES}?watch=true&timeoutSeconds=2&fieldSelector=metadata.name%3Dweb-3')
    first = await w.wait_for(lambda e: True)
    await req('DELETE', SLICES + '/other-1')
    await asyncio.wait_for(w.ended.wait(), 5)
    check('fieldSelector watch: only the named object', first is not None and all(e['object']['metadata']['name'] == 'web-3' for e in w.events), w.events)
    await w.close()

    # Finalizers: DELETE marks (MODIFIED with deletionTimestamp), removing the last one deletes.
    fin = slice_obj('fin-1', 'fin', '10.244.0.9')
    fin['metadata']['finalizers'] = ['example.com/hold']
    await req('POST', SLICES, fin)
    w = Watch(session, f'{base}{SLICES}?watch=true&timeoutSeconds=3&labelSelector=kubernetes.io/service-name%3Dfin')
    await w.wait_for(lambda e: e['type'] == 'ADDED')
    status, body = await req('DELETE', SLICES + '/fin-1')
    ev = await w.wait_for(lambda e: e['type'] == 'MODIFIED')
    check('finalizers: DELETE sets deletionTimestamp (MODIFIED), object stays',
          status == 200 and ev is not None and ev['object']['metadata'].get('deletionTimestamp')
          and (await req('GET', SLICES + '/fin-1'))[0] == 200, (status, w.events))
    await req('PATCH', SLICES + '/fin-1', {'metadata': {'finalizers': None}}, 'application/merge-patch+json')
    ev = await w.wait_for(lambda e: e['type'] == 'DELETED')
    check('finalizers: removing the last one deletes (DELETED, then 404)',
          ev is not None and (await req('GET', SLICES + '/fin-1'))[0] == 404, w.events)
    await w.close()

    # 410 Gone: from a compacted history, and from a version this process never issued.
    status, state = await req('GET', '/_emulator/state')
    current = int(state['resourceVersion'])
    for label, rv in [('newer than the server', current + 1000)]:
        w = Watch(session, f'{base}{SLICES}?watch=true&resourceVersion={rv}&allowWatchBookmarks=true')
        await asyncio.wait_for(w.ended.wait(), 5)
        check(f'watch from a version {label} -> 200 + ERROR 410 Expired', w.status == 200 and len(w.events) == 1
              and w.events[0]['type'] == 'ERROR' and w.events[0]['object']['code'] == 410 and w.events[0]['object']['reason'] == 'Expired', w.events)
    await req('POST', '/_emulator/compact')
    w = Watch(session, f'{base}{SLICES}?watch=true&resourceVersion={list_rv}')
    await asyncio.wait_for(w.ended.wait(), 5)
    check('watch from a compacted version -> ERROR 410', w.events and w.events[0]['type'] == 'ERROR' and w.events[0]['object']['code'] == 410, w.events)
    # Admin: close every open watch (simulates the apiserver dropping connections).
    w = Watch(session, f'{base}{SLICES}?watch=true&resourceVersion={current}')
    await asyncio.wait_for(w.started.wait(), 5)
    end = time.monotonic() + 5
    while time.monotonic() < end and (await req('GET', '/_emulator/state'))[1].get('watches', 0) < 1:
        await asyncio.sleep(0.02)  # poll, under a deadline, until the server has registered the stream
    await req('POST', '/_emulator/close-watches')
    await asyncio.wait_for(w.ended.wait(), 5)
    check('POST /_emulator/close-watches ends open watches', w.ended.is_set())
    return current


async def main() -> int:
    os.makedirs(os.path.join(HERE, '.tmp'), exist_ok=True)
    open(os.path.join(HERE, '.tmp', 'selftest-emulator.log'), 'w').close()  # the emulators' stderr, this run
    pure_checks()
    timeout = aiohttp.ClientTimeout(total=30)
    first = Emulator('--bookmark-interval', '1')
    await first.start()
    port = first.api.rsplit(':', 1)[1]
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            last_rv = await http_checks(session, first.url)
            # Restart on the same port with an open watch: it must end, the process must exit 0.
            w = Watch(session, f'{first.url}{SLICES}?watch=true&resourceVersion={last_rv}')
            await asyncio.wait_for(w.started.wait(), 5)
            t0 = time.monotonic()
            rc = await first.stop()
            check('SIGTERM with an open watch: exit 0 within 3 s', rc == 0 and time.monotonic() - t0 < 3, (rc, time.monotonic() - t0))
            await asyncio.wait_for(w.ended.wait(), 5)
            await w.close()
            second = Emulator('--port', port)
            await second.start()
            try:
                check('restart: same port reused at once', second.api == first.api, (first.api, second.api))
                async with session.get(second.url + SLICES) as resp:
                    body = await resp.json()
                check('restart: empty state', resp.status == 200 and body['items'] == [], body)
                async with session.post(second.url + SLICES, json=slice_obj('web-1', 'web', '10.244.0.5')) as resp:
                    created = await resp.json()
                new_rv = int(created['metadata']['resourceVersion'])
                check(f'restart: resourceVersions start again from 1 (first create: {new_rv}, before restart: {last_rv})',
                      new_rv == 1, new_rv)
                w = Watch(session, f'{second.url}{SLICES}?watch=true&resourceVersion={last_rv}')
                await asyncio.wait_for(w.ended.wait(), 5)
                check('restart: a watch from the old process\'s version gets ERROR 410 (relist)',
                      w.events and w.events[0]['type'] == 'ERROR' and w.events[0]['object']['code'] == 410, w.events)
            finally:
                check('second emulator stops with exit 0', await second.stop() == 0)
            third = Emulator('--rv-start', 'time')
            await third.start()
            try:
                async with session.post(third.url + SLICES, json=slice_obj('web-1', 'web', '10.244.0.5')) as resp:
                    created = await resp.json()
                rv = int(created['metadata']['resourceVersion'])
                check(f'--rv-start time: versions above any earlier process ({rv})', rv > last_rv and rv > 10**15, rv)
            finally:
                await third.stop()
    finally:
        await first.stop()
    passed = sum(1 for _, ok, _ in RESULTS if ok)
    failed = len(RESULTS) - passed
    print(f'{passed} passed, {failed} failed', flush=True)
    return 0 if failed == 0 else 1


if __name__ == '__main__':
    try:
        sys.exit(asyncio.run(asyncio.wait_for(main(), 120)))
    except asyncio.TimeoutError:
        print('selftest: overall deadline (120 s) exceeded', file=sys.stderr)
        print(f'{sum(1 for _, ok, _ in RESULTS if ok)} passed, 1 failed')
        sys.exit(1)
