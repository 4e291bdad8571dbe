"""`afinar data synth` end to end against a real `afinar serve` on 127.0.0.1: the tiny model is
first fine-tuned to answer synth's requests in the JSON synth asks for, then synth writes only
valid, deduplicated examples, resumes a partial file, retries through 503s with back-off and
fails clearly on a 404. The plumbing is what is tested, not the quality."""

from __future__ import annotations

import http.server
import json
import random
import threading
import urllib.request

import pytest

from afinar.data.example import Example, Message
from afinar.data.synth import SynthSettings, parse_reply, synthesize
from afinar.data.validate import load_examples
from afinar.errors import AfinarError
from conftest import write_jsonl
from serving import make_server

PAIRS = [("¿Cuánto tarda el envío?", "De 2 a 4 días."), ("¿Qué pagos aceptáis?", "Tarjeta y Bizum."),
         ("¿Puedo devolver una planta?", "Sí, en 14 días."), ("¿Tenéis tienda física?", "En Valencia."),
         ("¿Hacéis factura?", "Sí, al pagar."), ("¿Vendéis macetas?", "Sí, de barro."),
         ("¿Enviáis a Portugal?", "Sí."), ("¿Hay tarjetas regalo?", "De 20, 50 y 100 €."),
         ("¿Cómo riego un cactus?", "Poco, cada mes."), ("¿Abrís el domingo?", "No."),
         ("¿Dónde está mi pedido?", "Mira el correo."), ("¿Cuánto cuesta el envío?", "4,90 €.")]
SEED = Example((Message("user", PAIRS[0][0]), Message("assistant", PAIRS[0][1], True)))


@pytest.fixture(scope="module")
def json_writer(tmp_path_factory, tiny_model_dir):
    """(server, model name): the tiny model fully fine-tuned (20 s) on synth's own requests
    answered in its JSON, served as a base model by a real `afinar serve`."""
    from afinar.config import TrainConfig
    from afinar.data.synth import INSTRUCTIONS, _prompts
    from afinar.train.recipe import train

    folder = tmp_path_factory.mktemp("synth")
    requests = _prompts(SynthSettings(base_url="-", model="-", topics=["envíos"], seeds=[SEED],
                                      per_request=1), random.Random(0))
    records = [{"messages": [
        {"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": next(requests)},
        {"role": "assistant", "content": json.dumps(
            {"examples": [{"question": q, "answer": a}]}, ensure_ascii=False)}]}
        for q, a in PAIRS * 4]
    run = train(TrainConfig(data=str(write_jsonl(folder / "json.jsonl", records)),
                            model=str(tiny_model_dir), output=str(folder / "run"), method="full",
                            learning_rate=3e-3, epochs=30, batch_size=4, held_out_fraction=0,
                            precision="fp32", evaluate=False, max_seq_length=512)).run_dir
    srv = make_server(folder, tiny_model_dir, models={"json-writer": str(run)}).start()
    yield srv, "json-writer"
    srv.stop()


def _settings(srv, model, **values) -> SynthSettings:
    return SynthSettings(**{"base_url": srv.url, "model": model, "count": 4,
                            "topics": ["envíos"], "seeds": [SEED], "per_request": 1,
                            "temperature": 0.7, "max_tokens": 96, "max_requests": 200,
                            "system": "Eres el asistente de la tienda.", **values})


def test_synth_writes_only_valid_unique_examples(json_writer, tmp_path):
    srv, model = json_writer
    out = tmp_path / "synth.jsonl"
    result = synthesize(_settings(srv, model), out)
    assert result.complete and out.is_file() and not (tmp_path / "synth.jsonl.partial").exists()
    report = load_examples(out, check_size=False)
    assert report.ok and len(report.examples) == 4 == result.written
    questions = [ex.messages[1].content for ex in report.examples]
    assert len(set(questions)) == 4 and PAIRS[0][0] not in questions  # the seed is not repeated
    assert all(ex.messages[0].content == "Eres el asistente de la tienda."
               for ex in report.examples)
    assert result.requests >= 4 and result.generated >= result.written + result.duplicates
    print(f"synth: {result.requests} requests, {result.generated} pairs, {result.invalid} "
          f"invalid, {result.duplicates} duplicates, {result.seconds:.1f} s")


def test_synth_resumes_a_partial_file(json_writer, tmp_path):
    srv, model = json_writer
    out = tmp_path / "synth.jsonl"
    first = synthesize(_settings(srv, model, count=2), tmp_path / "first.jsonl")
    assert first.complete
    kept = (tmp_path / "first.jsonl").read_text(encoding="utf-8")
    (tmp_path / "synth.jsonl.partial").write_text(kept + '{"messages": [', encoding="utf-8")
    result = synthesize(_settings(srv, model, count=4), out)  # the cut last line is ignored
    assert result.complete
    lines = out.read_text(encoding="utf-8").splitlines()
    assert "\n".join(lines[:2]) + "\n" == kept and len(lines) >= 4
    with pytest.raises(AfinarError, match="already exists"):
        synthesize(_settings(srv, model), out)


class _Flaky(http.server.BaseHTTPRequestHandler):
    """A fault-injecting proxy in front of the real server: the first requests get 503, the
    rest are forwarded unchanged. (The one stand-in here: no real server fails on demand.)"""

    failures = 2
    target = ""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).failures > 0:
            type(self).failures -= 1
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "overloaded"}}')
            return
        request = urllib.request.Request(self.target + self.path.removeprefix("/v1"), data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_synth_retries_with_back_off_and_fails_clearly(json_writer, tmp_path):
    srv, model = json_writer
    _Flaky.target = srv.url
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    waits = []
    try:
        url = f"http://127.0.0.1:{proxy.server_address[1]}/v1"
        result = synthesize(_settings(srv, model, base_url=url, count=1), tmp_path / "a.jsonl",
                            sleep=waits.append)
    finally:
        proxy.shutdown()
    assert result.complete and result.retried == 2
    assert len(waits) == 2 and 0.5 <= waits[0] <= 1.5 and 1 <= waits[1] <= 3  # doubling
    with pytest.raises(AfinarError, match="HTTP 404") as caught:
        synthesize(_settings(srv, "no-such-model"), tmp_path / "b.jsonl")
    assert "check --model" in caught.value.hint


def test_replies_are_parsed_from_json_in_prose_or_fences():
    pair = {"question": "q", "answer": "a"}
    assert parse_reply('Aquí tienes:\n```json\n{"examples": [%s]}\n```' % json.dumps(pair)) == [
        pair]
    assert parse_reply(json.dumps([pair])) == [pair]
    assert parse_reply("no JSON {here") is None
