"""Hostile requests over HTTP against a live server (uvicorn on a port): each is refused, and nothing is created or
stored for it (issue 12, "High" and "Medium")."""

from __future__ import annotations

import io
import struct
import time
import zlib

import httpx
import pytest
from PIL import Image

from api_support import LiveServer, auth, make_app

pytestmark = pytest.mark.timeout(120)

ALICE, BOB, CAROL, DAVE = "sec-key-alice", "sec-key-bob", "sec-key-carol", "sec-key-dave"


def _png(size=(16, 16), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _scope(key: str) -> str:
    from mgmflow.orchestrator.api.settings import ApiSettings

    return ApiSettings(api_keys=[key]).scope_of(key)


def _artifacts_of(store, key: str) -> list[dict]:
    return [record for record in store.backend.metas() if record["scope"] == _scope(key)]


@pytest.fixture(scope="module")
def keyed(api_env):
    """A live server with keys of this module only: counts of their scopes start at zero."""
    with LiveServer(make_app(api_keys=[ALICE, BOB, CAROL, DAVE])) as server:
        server.store = server.server.config.app.state.context.store
        server.runs = server.server.config.app.state.context.runs
        yield server


def _client(server, key: str | None = None, **headers) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={**(auth(key) if key else {}), **headers}, timeout=30)


# 1. Run inputs never name a server file ---------------------------------------------------------------------------


def test_run_inputs_cannot_read_server_files(keyed, tmp_path):
    alice, bob = _client(keyed, ALICE), _client(keyed, BOB)
    uploaded = alice.post("/artifacts", files={"file": ("a.png", _png(), "image/png")}).json()
    blob = keyed.store.backend._blob_path(uploaded["sha256"])
    readable = tmp_path / "readable.png"
    readable.write_bytes(_png())
    refusals = []
    for reference in (str(blob), str(readable), "/etc/passwd", "/no/such/file.png", "~/.ssh/id_rsa",
                      uploaded["id"]):  # Alice's id is not Bob's
        for workflow, extra in (("visual_reasoning", {"question": "what?"}), ("chat", {"message": "hi"})):
            response = bob.post("/runs", json={"assistant_id": workflow, "input": {**extra, "images": [reference]}})
            assert response.status_code in (400, 422), response.text
            refusals.append(response.json()["detail"].replace(reference, "REF"))
        batch = bob.post("/batches", json={"assistant_id": "visual_reasoning",
                                           "items": [{"question": "what?", "images": [reference]}]})
        assert batch.status_code == 400, batch.text
        refusals.append(batch.json()["detail"].replace(reference, "REF"))
    # The error does not tell an existing file from a missing one: the same text for every path.
    paths = refusals[:-3]
    assert len(set(paths)) == 3, paths
    assert bob.get("/runs").json() == []  # nothing was created
    assert not _artifacts_of(keyed.store, BOB)
    # Her own id is what Alice uses; it is admitted.
    own = alice.post("/runs", json={"assistant_id": "chat", "input": {"message": "hi", "images": [uploaded["id"]]}})
    assert own.status_code == 200, own.text
    alice.post("/runs/cancel", json={"run_ids": [own.json()["run_id"]]})


# 2. Decompression bombs: limits before decoding, nothing stored for a refused request ----------------------------


def _sixteen_bit_bomb(side: int = 6324) -> bytes:
    """A ~80 KB greyscale 16-bit PNG of ``side``² zero pixels (under the 40-megapixel limit at 6324)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row, body = zlib.compressobj(9), bytes(1 + 2 * side), []
    for _ in range(side):
        body.append(compressor.compress(row))
    body.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b"")


def _data_url(data: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(data).decode()


def _chat(server, key: str, images_per_message: list[list[bytes]]) -> httpx.Response:
    model = server.server.config.app.state.context.settings.vlm_model
    messages = [{"role": ("user", "assistant")[index % 2], "content": [{"type": "text", "text": "what?"}] +
                 [{"type": "image_url", "image_url": {"url": _data_url(data)}} for data in images]}
                for index, images in enumerate(images_per_message)]
    return _client(server, key).post("/v1/chat/completions", json={"model": model, "messages": messages})


def test_image_limits_apply_before_decoding_and_nothing_is_stored(keyed, monkeypatch):
    from mgmflow.orchestrator.api import images

    small, bomb = _png((8, 8)), _sixteen_bit_bomb()
    assert len(bomb) < 200_000

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    with monkeypatch.context() as patch:  # the server runs in this process: a decode would answer 500
        patch.setattr(images, "load_image", no_decoding)
        # 17 images over several messages: refused by count, none decoded or stored.
        response = _chat(keyed, CAROL, [[small] * 9, [], [small] * 8])
        assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_images", response.text
        # Four 16-bit 40-megapixel bombs: refused from their headers (about a gigabyte to decode).
        response = _chat(keyed, CAROL, [[bomb, bomb], [], [bomb, bomb]])
        assert response.status_code == 413 and response.json()["error"]["code"] == "images_too_large", response.text
    # A good image, then a corrupt one: refused, and the good one is not stored either.
    response = _chat(keyed, CAROL, [[small], [], [small[:40]]])
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image", response.text
    assert not _artifacts_of(keyed.store, CAROL)


# 3. Open mode: loopback Host only, no state change from a foreign Origin; no open server on a public address ------


@pytest.fixture(scope="module")
def open_server(api_env):
    with LiveServer(make_app(allowed_hosts=[])) as server:
        server.runs = server.server.config.app.state.context.runs
        yield server


def test_open_mode_answers_only_loopback_hosts_and_same_origin_changes(open_server):
    run = {"assistant_id": "echo", "input": {"text": "rebound"}}
    before = len(open_server.runs.list_runs(scope="default", limit=10_000))
    with _client(open_server) as client:
        # DNS rebinding: the attacker's name resolves to 127.0.0.1, the browser sends its Host.
        for host in ("attacker.example", "attacker.example:8000", "192.168.1.20", "localhost.attacker.example"):
            for method, path, body in (("GET", "/runs", None), ("POST", "/runs", run), ("GET", "/metrics", None)):
                response = client.request(method, path, json=body, headers={"Host": host})
                assert response.status_code == 421 and response.json()["code"] == "host_not_allowed", (host, path)
        # A cross-origin form post from a page (no preflight), and its upload twin.
        for origin in ("https://attacker.example", "null", "http://127.0.0.1.attacker.example"):
            assert client.post("/runs", json=run, headers={"Origin": origin}).status_code == 403
            refused = client.post("/artifacts", headers={"Origin": origin}, files={"file": ("a.png", _png(), "image/png")})
            assert refused.status_code == 403 and refused.json()["code"] == "cross_origin"
        assert client.post("/runs", json=run, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert len(open_server.runs.list_runs(scope="default", limit=10_000)) == before  # nothing was created
        # The user's own tools and the playground (same origin) still work.
        assert client.get("/runs", headers={"Host": f"localhost:{open_server.port}"}).status_code == 200
        assert client.get("/healthz", headers={"Origin": "https://attacker.example"}).status_code == 200
        same = client.post("/runs", json=run, headers={"Origin": open_server.url, "Sec-Fetch-Site": "same-origin"})
        assert same.status_code == 200, same.text


def test_serve_refuses_an_open_server_on_a_public_address(monkeypatch):
    from click.testing import CliRunner

    from mgmflow.orchestrator.cli import main
    from testkit import free_port

    monkeypatch.delenv("MGMFLOW_API_KEYS", raising=False)
    monkeypatch.delenv("MGMFLOW_BROKER_URL", raising=False)
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--port", str(free_port())])
    assert result.exit_code == 2 and "--insecure-open-access" in result.output, result.output


def test_docker_compose_does_not_start_an_open_server():
    from pathlib import Path

    import yaml

    compose = yaml.safe_load((Path(__file__).parents[2] / "docker-compose.yml").read_text())
    command = compose["services"]["api"]["command"]
    assert "--insecure-open-access" not in command and "0.0.0.0" in command  # so serve refuses to start key-less


# 5. Bounded metadata, checked before anything is created; run and thread deletion --------------------------------


def _nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth):
        value = {"n": value}
    return value


def test_oversized_or_deep_metadata_creates_nothing(keyed):
    dave = _client(keyed, DAVE)
    run = {"assistant_id": "echo", "input": {"text": "x"}}
    for metadata in ({"blob": "x" * 3_000_000}, _nested(300), {"blob": "x" * 20_000}):
        for path, body in (("/runs", {**run, "metadata": metadata}),
                           ("/threads/meta-thread/runs", {**run, "metadata": metadata, "if_not_exists": "create"}),
                           ("/threads", {"thread_id": "meta-thread", "metadata": metadata}),
                           ("/batches", {"assistant_id": "echo", "items": [{"text": "x"}], "metadata": metadata})):
            response = dave.post(path, json=body)
            assert response.status_code in (413, 422), (path, response.status_code, response.text[:200])
    deep_input = dave.post("/runs", json={"assistant_id": "echo", "input": {"text": "x", "extra": _nested(300)}})
    assert deep_input.status_code == 422, deep_input.text[:300]
    assert dave.get("/runs").json() == [] and dave.get("/threads/meta-thread").status_code == 404
    assert keyed.runs.list_runs(scope=_scope(DAVE)) == []


def test_deleting_runs_and_threads_removes_records_checkpoints_and_artifacts(keyed):
    from testkit import wait_for

    alice, bob = _client(keyed, ALICE), _client(keyed, BOB)
    thread = alice.post("/threads", json={}).json()["thread_id"]
    runs = [alice.post(f"/threads/{thread}/runs/wait", json={"assistant_id": "echo", "input": {"text": f"t{i}"}})
            for i in range(2)]
    run_ids = [run.headers["Content-Location"].rsplit("/", 1)[-1] for run in runs]
    # An artifact the first run made (as a worker step's output would be recorded).
    made = keyed.store.put(b"made", scope=_scope(ALICE), media_type="text/plain", metadata={"run_id": run_ids[0]})
    kept = alice.post("/artifacts", files={"file": ("a.png", _png(), "image/png")}).json()["id"]  # an upload
    active = alice.post(f"/threads/{thread}/runs", json={"assistant_id": "echo", "input": {"text": "slow", "delay": 2}})
    # Another key cannot delete, nor learn that the thread exists; an active run is not deleted.
    assert bob.delete(f"/threads/{thread}").status_code == 404
    assert bob.delete(f"/threads/{thread}/runs/{run_ids[0]}").status_code == 404
    assert alice.delete(f"/threads/{thread}/runs/{active.json()['run_id']}").status_code == 409
    assert alice.delete(f"/threads/{thread}").status_code == 409
    wait_for(lambda: alice.get(f"/runs/{active.json()['run_id']}").json()["status"] == "success", 30)

    assert alice.delete(f"/threads/{thread}/runs/{run_ids[0]}").status_code == 204
    assert alice.get(f"/threads/{thread}/runs/{run_ids[0]}").status_code == 404
    assert alice.get(f"/artifacts/{made.id}").status_code == 404
    assert alice.get(f"/threads/{thread}/state").json()["values"]  # the thread keeps its state

    assert alice.delete(f"/threads/{thread}").status_code == 204
    assert alice.get(f"/threads/{thread}").status_code == 404
    assert alice.get(f"/threads/{thread}/runs").status_code == 404
    saver = keyed.runs.orchestrator.database.saver
    assert list(saver.list({"configurable": {"thread_id": thread}})) == []  # no checkpoint left
    assert not any(run.thread_id == thread for run in keyed.runs.list_runs(scope=_scope(ALICE), limit=1000))
    assert alice.get(f"/artifacts/{kept}").status_code == 200  # the user's own upload stays


# 6. Quotas that limit work: unfinished runs, batches and chat completions; priority per key; compute per run -----


EVE, FRANK, GRACE = "sec-key-eve", "sec-key-frank", "sec-key-grace"


@pytest.fixture(scope="module")
def policed(api_env):
    policies = {_scope(EVE): {"max_active_runs": 2}, _scope(FRANK): {"top_priority": 0, "max_run_compute": 10**7}}
    with LiveServer(make_app(api_keys=[EVE, FRANK], key_policies=policies)) as server:
        server.runs = server.server.config.app.state.context.runs
        yield server


def test_quota_counts_every_unfinished_run_batch_and_chat(policed):
    from testkit import wait_for

    eve = _client(policed, EVE)
    slow = {"assistant_id": "echo", "input": {"text": "slow", "steps": 20, "delay": 0.2}}
    thread = eve.post("/threads", json={}).json()["thread_id"]
    first = eve.post(f"/threads/{thread}/runs", json=slow).json()
    wait_for(lambda: eve.get(f"/runs/{first['run_id']}").json()["status"] == "running")
    second = eve.post(f"/threads/{thread}/runs", json=slow)
    assert second.status_code == 200, second.text  # waits behind the first: 2 unfinished, the quota
    refused = [eve.post("/runs", json=slow),
               eve.post("/batches", json={"assistant_id": "echo", "items": [{"text": "a"}], "concurrency": 1}),
               _chat(policed, EVE, [[]])]
    for response in refused:
        assert response.status_code == 429, response.text
    assert len(policed.runs.list_runs(scope=_scope(EVE))) == 2  # nothing more was created
    for run in (second.json(), first):
        eve.post(f"/threads/{thread}/runs/{run['run_id']}/cancel")
    # A batch takes a slot for itself and one per child it may run at once.
    wait_for(lambda: not policed.runs.active_at_least(_scope(EVE), 1))
    batch = eve.post("/batches", json={"assistant_id": "echo", "items": [{"text": "a"}] * 3, "concurrency": 2})
    assert batch.status_code == 429, batch.text
    assert eve.post("/batches", json={"assistant_id": "echo", "items": [{"text": "a"}] * 3,
                                      "concurrency": 1}).status_code == 200


def test_priority_is_capped_per_key_and_compute_per_run(policed, keyed):
    bob, frank = _client(keyed, BOB), _client(policed, FRANK)
    before = len(keyed.runs.list_runs(scope=_scope(BOB), limit=10_000))
    urgent = {"assistant_id": "echo", "input": {"text": "me first"}, "priority": 0}
    assert bob.post("/runs", json=urgent).status_code == 403
    assert bob.post("/batches", json={"assistant_id": "echo", "items": [{"text": "x"}], "priority": 1}).status_code == 403
    huge = {"assistant_id": "story", "input": {"premise": "a fox", "pages": 64, "rounds": 8, "drafts": 8,
                                                "width": 2048, "height": 2048, "steps": 150}}
    response = bob.post("/runs", json=huge)
    assert response.status_code == 413 and response.json()["code"] == "compute_exceeded", response.text
    many = bob.post("/batches", json={"assistant_id": "story", "items": [{"premise": "a fox", "pages": 64}] * 20})
    assert many.status_code == 413, many.text  # a batch's compute is the sum of its items'
    assert len(keyed.runs.list_runs(scope=_scope(BOB), limit=10_000)) == before
    # What the operator allows a key, it may use.
    allowed = frank.post("/runs", json=urgent)
    assert allowed.status_code == 200, allowed.text


# 4. /metrics costs what changed since the last scrape, may ask for a key; failed keys are rate-limited ------------


def test_metrics_scrape_reads_only_runs_ended_since_the_last_and_may_need_a_key(api_env, monkeypatch):
    from mgmflow.orchestrator.records import RunStore

    scraper = "sec-metrics-key"
    app = make_app(api_keys=[GRACE], metrics_key=scraper, unauthenticated_per_second=0.01, unauthenticated_burst=4)
    with LiveServer(app) as server, _client(server, GRACE) as grace:
        metrics = _client(server, scraper)
        assert metrics.get("/metrics").status_code == 200
        for text in ("a", "b", "c"):
            grace.post("/runs/wait", json={"assistant_id": "echo", "input": {"text": text}})

        def no_full_rows(*args, **kwargs):
            raise AssertionError("a scrape read run records")

        monkeypatch.setattr(RunStore, "list", no_full_rows)  # a scrape reads no run body, whatever is stored
        text = metrics.get("/metrics").text
        counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("mgmflow_run_seconds_count{") and 'workflow="echo"' in line)
        assert counted >= 3
        again = metrics.get("/metrics").text  # nothing ended since: nothing more counted
        assert [line for line in again.splitlines() if line.startswith("mgmflow_run_seconds_count")] == \
            [line for line in text.splitlines() if line.startswith("mgmflow_run_seconds_count")]
        monkeypatch.undo()
        # Without the scraper's key: 401, counted against the address like any failed key; past its burst, 429.
        statuses = [_client(server, key).get(path).status_code
                    for key, path in ((None, "/metrics"), (GRACE, "/metrics"), ("guess-1", "/runs"), (None, "/runs"),
                                      ("guess-2", "/runs"), (None, "/metrics"))]
        assert statuses[:4] == [401] * 4 and statuses[4:] == [429, 429], statuses
        assert grace.get("/runs").status_code == 200  # a valid key is not held back by its address's failures


# 8. Retention: deleted and expired artifacts leave the store, shared blobs once nothing references them ----------


@pytest.fixture(params=["file", "s3"])
def store_url(request, tmp_path, monkeypatch):
    if request.param == "file":
        yield (tmp_path / "store").as_uri()
        return
    from moto import mock_aws

    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    with mock_aws():
        import boto3

        boto3.client("s3").create_bucket(Bucket="sec-artifacts")
        yield "s3://sec-artifacts/store"


def _blobs(store) -> set[str]:
    return {sha256 for sha256, _ in store.backend.blobs()}


def test_the_sweeper_removes_deleted_and_expired_artifacts_and_unreferenced_blobs(api_env, store_url):
    from testkit import wait_for

    app = make_app(api_keys=[ALICE, BOB], store_url=store_url, gc_interval_s=0.2, gc_grace_s=0)
    with LiveServer(app) as server, _client(server, ALICE) as alice, _client(server, BOB) as bob:
        store = app.state.context.store
        image = _png((12, 12))
        mine = alice.post("/artifacts", files={"file": ("a.png", image, "image/png")}).json()
        theirs = bob.post("/artifacts", files={"file": ("b.png", image, "image/png")}).json()
        assert mine["sha256"] == theirs["sha256"] and _blobs(store) == {mine["sha256"]}  # one blob, two keys
        assert alice.delete(f"/artifacts/{mine['id']}").status_code == 204
        time.sleep(0.6)  # a few sweeps: Bob's artifact still references the blob
        assert bob.get(f"/artifacts/{theirs['id']}/content").content == store.get(theirs["id"], scope=_scope(BOB))
        assert bob.delete(f"/artifacts/{theirs['id']}").status_code == 204
        wait_for(lambda: not _blobs(store), 10, "the sweeper to remove the unreferenced blob")
        assert not list(store.backend.metas())

    # Expired artifacts go too (not only hidden), blobs with them.
    app = make_app(api_keys=[ALICE], store_url=store_url, gc_interval_s=0.2, gc_grace_s=0, artifact_retention_s=1)
    with LiveServer(app) as server, _client(server, ALICE) as alice:
        store = app.state.context.store
        alice.post("/artifacts", files={"file": ("c.png", _png((9, 9)), "image/png")})
        assert len(_blobs(store)) == 1
        wait_for(lambda: not _blobs(store) and not list(store.backend.metas()), 10, "expired artifacts removed")


def test_mgmflow_gc_removes_what_nothing_references(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mgmflow.orchestrator.cli import main
    from mgmflow.workers.artifacts import open_store
    from mgmflow.workers.settings import Settings

    monkeypatch.setenv("MGMFLOW_STORE_URL", (tmp_path / "store").as_uri())
    store = open_store(Settings())
    kept = store.put(b"shared", scope="a", media_type="text/plain")
    gone = store.put(b"shared", scope="b", media_type="text/plain")
    lonely = store.put(b"lonely", scope="b", media_type="text/plain")
    store.delete(gone.id, scope="b")
    store.delete(lonely.id, scope="b")
    result = CliRunner().invoke(main, ["gc", "--grace-s", "0"])
    assert result.exit_code == 0 and "0 threads, 0 expired artifacts and 1 unreferenced blobs" in result.output, result.output
    assert store.get(kept.id, scope="a") == b"shared" and _blobs(store) == {kept.sha256}


# 7. Thread ids are per key: no existence oracle, no squatting ---------------------------------------------------------


def test_thread_ids_are_per_key(keyed):
    alice, bob = _client(keyed, ALICE), _client(keyed, BOB)
    created = alice.post("/threads", json={"thread_id": "project-x", "metadata": {"owner": "alice"}})
    assert created.status_code == 200 and created.json()["thread_id"] == "project-x", created.text
    # Bob cannot tell that Alice has "project-x": his own "project-x" is created, not a 409...
    mine = bob.post("/threads", json={"thread_id": "project-x"})
    assert mine.status_code == 200 and mine.json()["metadata"] == {}, mine.text
    # ...and an id Bob chose first does not keep Alice from choosing it.
    bob.post("/threads/later-id/runs/wait", json={"assistant_id": "echo", "input": {"text": "b"}, "if_not_exists": "create"})
    run = alice.post("/threads/later-id/runs/wait", json={"assistant_id": "echo", "input": {"text": "mine"},
                                                          "if_not_exists": "create"})
    assert run.status_code == 200 and run.json()["answer"] == "MINE", run.text
    assert alice.get("/threads/project-x").json()["metadata"] == {"owner": "alice"}
    listed = alice.get("/threads/later-id/runs").json()
    assert [r["thread_id"] for r in listed] == ["later-id"]  # the id as its key knows it
    state = alice.get("/threads/later-id/state").json()
    assert state["values"]["answer"] == "MINE" and state["checkpoint"]["thread_id"] == "later-id"
    assert alice.post("/threads", json={"thread_id": "project-x"}).status_code == 409  # her own: a 409
    assert bob.get("/threads/later-id/state").json()["values"]["answer"] == "B"


def test_chat_completions_in_flight_are_counted_across_api_processes(tmp_path):
    """Distributed: every API process sees the chat completions another one is answering (the count is in Redis)."""
    import asyncio

    from mgmflow.orchestrator.api.quotas import ChatsInFlight
    from worker_support import RedisServer

    redis = RedisServer(tmp_path)
    try:
        first, second = ChatsInFlight(redis.url), ChatsInFlight(redis.url)  # as in two API processes

        async def scenario() -> list[int]:
            seen = []
            async with first.holding("key-a"):
                async with second.holding("key-a"):
                    seen += [await first.count("key-a"), await second.count("key-b")]
                seen.append(await second.count("key-a"))
            return [*seen, await first.count("key-a")]

        assert asyncio.run(scenario()) == [2, 0, 1, 0]
    finally:
        redis.stop()


def test_the_sweeper_deletes_threads_past_the_run_retention(api_env, tmp_path):
    from testkit import wait_for

    # A home (database, store) of its own: the retention applies to every thread of the database.
    app = make_app(api_keys=[GRACE], gc_interval_s=0.2, run_retention_s=1, home=tmp_path)
    with LiveServer(app) as server, _client(server, GRACE) as grace:
        old = grace.post("/threads", json={"thread_id": "old"}).json()["thread_id"]
        assert grace.post(f"/threads/{old}/runs/wait", json={"assistant_id": "echo", "input": {"text": "x"}}).status_code == 200
        run_id = grace.get(f"/threads/{old}/runs").json()[0]["run_id"]
        made = app.state.context.store.put(b"made", scope=_scope(GRACE), media_type="text/plain",
                                           metadata={"run_id": run_id})
        wait_for(lambda: grace.get(f"/threads/{old}").status_code == 404, 15, "the old thread deleted")
        assert grace.get(f"/runs/{run_id}").status_code == 404
        assert grace.get(f"/artifacts/{made.id}").status_code == 404
        saver = app.state.context.runs.orchestrator.database.saver
        assert list(saver.list({"configurable": {"thread_id": f"{_scope(GRACE)}/old"}})) == []
