"""Many chat clients at once on the transformers engine, one of them streaming: the stream holds
the model while it answers and each of its chunks needs a worker thread, so requests waiting for
their batch must not hold those threads (they did: 49 waiting clients starved the stream and the
whole API stopped answering, found by bench/bench_team.py)."""

from __future__ import annotations

import threading
import time

from serving import make_server, raw


def test_a_stream_among_many_waiting_requests_does_not_stall_the_api(tmp_path, tiny_model_dir):
    srv = make_server(tmp_path / "many", tiny_model_dir, engine="transformers").start()
    try:
        client = srv.client(timeout=120)
        results: list[str] = []
        stop = time.monotonic() + 15

        def ask(streaming: bool) -> None:
            while time.monotonic() < stop:
                try:
                    messages = [{"role": "user", "content": "hola"}]
                    if streaming:
                        for _ in client.chat.completions.create(
                                model="tiny", messages=messages, max_tokens=24, stream=True):
                            pass
                    else:
                        client.chat.completions.create(model="tiny", messages=messages,
                                                       max_tokens=8)
                    results.append("ok-stream" if streaming else "ok")
                except Exception as exc:  # noqa: BLE001 - counted, the test asserts none
                    results.append(f"{exc.__class__.__name__}: {exc}")

        threads = [threading.Thread(target=ask, args=(i == 0,)) for i in range(50)]
        for thread in threads:
            thread.start()
        time.sleep(8)
        status, _ = raw("GET", srv.url + "/models", timeout=20)  # during the load
        for thread in threads:
            thread.join(150)
        assert status == 200
        assert [r for r in results if not r.startswith("ok")] == []
        assert "ok-stream" in results and results.count("ok") > 50
    finally:
        srv.stop()
