"""bench_team.py's `security` section: SecuritySection, a mixin of bench_team.Bench (team-b's
key against team-a's objects, path-like upload names, oversized and malformed uploads, quotas,
wrong keys, admin keys and the OpenAI-Project header), and its raw-HTTP helpers chunked_post and
wrong_keys."""

from __future__ import annotations

import collections
import http.client
import os
import time
import uuid

from _team_deploy import (ADMIN, DATA, FINAL, KEYS, Api, _parse, error_code, error_message,
                          job_spec, multipart, pct)


class SecuritySection:
    """Bench's `security` section (section_security); uses the Bench's state (self.main,
    self.args, self.work) and its settle() and _version_of()."""

    # --- section: security ----------------------------------------------------------------------
    def section_security(self) -> dict:
        dep = self.main
        a, b, c = dep.key("team-a"), dep.key("team-b"), dep.key("team-c")
        rows: list[dict] = []

        def row(attempt, expected, status, body, ok, note=""):
            got = f"{status} {error_code(body) or ''}".strip()
            if status is None and isinstance(body, str):  # no HTTP answer: say what happened
                note = (note + "; " if note else "") + body[:200]
            rows.append({"attempt": attempt, "expected": expected, "got": got,
                         "ok": bool(ok), **({"note": note} if note else {})})

        def expect(attempt, expected_codes, status, body, also=True, note=""):
            row(attempt, "/".join(map(str, expected_codes)), status, body,
                status in expected_codes and also, note)

        # team-a's objects: a file, a finished job (model, checkpoints, version), a rating,
        # a tag, an export, and a long job to cancel and pause.
        small = self.work / "sec-data.jsonl"
        small.write_text("".join(DATA.read_text().splitlines(keepends=True)[:24]))
        a_file = dep.upload("team-a", small, "a-private.jsonl")
        a_job = dep.submit("team-a", a_file, job_spec(4, 2, epochs=1))
        a_done = dep.wait_job(a_job, 300)
        a_model = a_done.get("fine_tuned_model")
        status, ck = a.get(f"/fine_tuning/jobs/{a_job}/checkpoints")
        a_ckpt = ck["data"][0]["fine_tuned_model_checkpoint"] if status == 200 and ck["data"] \
            else None
        version = self._version_of(dep, a, a_job)
        if version:
            a.call("POST", f"/registry/versions/{version}/tags", {"tag": "a-prod"})
        export = a.call("POST", f"/registry/versions/{version}/exports",
                        {"format": "merged"})[1] if version else None
        export_id = export.get("id") if isinstance(export, dict) else None
        rating = a.call("POST", "/ratings", {
            "messages": [{"role": "user", "content": "hola"}], "model_a": "tiny",
            "model_b": a_model or "tiny", "answer_a": "x", "answer_b": "y", "left": "a",
            "verdict": "a"})
        long_job = dep.submit("team-a", a_file, job_spec(100000, 1000, epochs=50))
        dep.wait_job(long_job, 120, statuses=("running",) + FINAL)
        b_file = dep.upload("team-b", small, "b-own.jsonl")

        client = b.sdk()
        import openai

        def sdk_try(attempt, expected, fn):
            try:
                fn()
                row(attempt, "/".join(map(str, expected)), 200, {}, False, "it worked")
            except openai.APIStatusError as exc:
                expect(attempt, expected, exc.status_code, exc.body if isinstance(exc.body, dict)
                       and "error" in exc.body else {"error": exc.body})
            except Exception as exc:
                row(attempt, "/".join(map(str, expected)), None, {}, False, repr(exc)[:200])

        # lists
        status, body = b.get("/files")
        ids = {f["id"] for f in body["data"]} if status == 200 else set()
        expect("team-b lists files", [200], status, body, a_file not in ids and b_file in ids,
               "team-a's file not in the list")
        status, body = b.get("/fine_tuning/jobs?limit=100")
        ids = {j["id"] for j in body["data"]} if status == 200 else set()
        expect("team-b lists jobs", [200], status, body, a_job not in ids and long_job not in ids)
        status, body = b.get("/models")
        ids = {m["id"] for m in body["data"]} if status == 200 else set()
        expect("team-b lists models", [200], status, body, a_model not in ids)
        status, body = b.get("/ratings")
        ids = {r["id"] for r in body.get("data", [])} if status == 200 else set()
        rating_id = rating[1].get("id") if isinstance(rating[1], dict) else None
        expect("team-b lists ratings", [200], status, body, rating_id not in ids,
               f"team-a's rating {'created' if rating_id else 'NOT created: ' + str(rating)}")
        status, body = b.get("/registry/versions")
        ids = {v["id"] for v in body.get("data", [])} if status == 200 else set()
        expect("team-b lists registry versions", [200], status, body, version not in ids)

        # team-a's objects by id
        for attempt, method, path, payload in [
            ("retrieve team-a's file", "GET", f"/files/{a_file}", None),
            ("download team-a's file", "GET", f"/files/{a_file}/content", None),
            ("validate team-a's file", "GET", f"/files/{a_file}/validation", None),
            ("retrieve team-a's job", "GET", f"/fine_tuning/jobs/{a_job}", None),
            ("list team-a's job events", "GET", f"/fine_tuning/jobs/{a_job}/events", None),
            ("stream team-a's job events", "GET", f"/fine_tuning/jobs/{a_job}/events/stream",
             None),
            ("list team-a's job checkpoints", "GET", f"/fine_tuning/jobs/{a_job}/checkpoints",
             None),
            ("read team-a's job config", "GET", f"/fine_tuning/jobs/{a_job}/config", None),
            ("cancel team-a's running job", "POST", f"/fine_tuning/jobs/{long_job}/cancel", None),
            ("pause team-a's running job", "POST", f"/fine_tuning/jobs/{long_job}/pause", None),
            ("resume team-a's job", "POST", f"/fine_tuning/jobs/{long_job}/resume", None),
            ("retrieve team-a's model", "GET", f"/models/{a_model}", None),
            ("retrieve team-a's checkpoint model", "GET", f"/models/{a_ckpt}", None),
            ("held-out prompts of team-a's job", "GET", f"/ratings/prompts?job={a_job}", None),
            ("retrieve team-a's registry version", "GET", f"/registry/versions/{version}", None),
            ("team-a's version's report", "GET", f"/registry/versions/{version}/report", None),
            ("export team-a's version", "POST", f"/registry/versions/{version}/exports",
             {"format": "merged"}),
            ("read team-a's export", "GET", f"/registry/exports/{export_id}", None),
            ("tag team-a's version", "POST", f"/registry/versions/{version}/tags",
             {"tag": "b-steals"}),
            ("remove team-a's tag", "DELETE", "/registry/tags/a-prod", None),
            ("compare with team-a's version", "GET",
             f"/registry/compare?versions={version},a-prod", None),
            ("delete team-a's file", "DELETE", f"/files/{a_file}", None),
            ("delete team-a's model", "DELETE", f"/models/{a_model}", None),
        ]:
            status, body = b.call(method, path, payload, timeout=30)
            expect(attempt, [404], status, body)

        # jobs and chat that would use team-a's objects
        sdk_try("create a job on team-a's training file", [400, 404], lambda:
                client.fine_tuning.jobs.create(model="tiny", training_file=a_file))
        sdk_try("create a job with team-a's validation file", [400, 404], lambda:
                client.fine_tuning.jobs.create(model="tiny", training_file=b_file,
                                               validation_file=a_file))
        sdk_try("fine-tune from team-a's fine-tuned model", [404], lambda:
                client.fine_tuning.jobs.create(model=a_model, training_file=b_file))
        sdk_try("fine-tune from team-a's checkpoint", [404], lambda:
                client.fine_tuning.jobs.create(model=a_ckpt, training_file=b_file))
        sdk_try("chat with team-a's fine-tuned model", [404], lambda:
                client.chat.completions.create(model=a_model, max_tokens=4,
                                               messages=[{"role": "user", "content": "hi"}]))
        sdk_try("chat (stream) with team-a's fine-tuned model", [404], lambda: list(
                client.chat.completions.create(model=a_model, max_tokens=4, stream=True,
                                               messages=[{"role": "user", "content": "hi"}])))
        sdk_try("chat with team-a's checkpoint", [404], lambda:
                client.chat.completions.create(model=a_ckpt, max_tokens=4,
                                               messages=[{"role": "user", "content": "hi"}]))

        # nothing of team-a's changed
        still = a.get(f"/files/{a_file}")[0] == 200 and a.get(f"/models/{a_model}")[0] == 200
        long_status = (dep.job(long_job) or {}).get("status")
        tags = a.get(f"/registry/versions/{version}")[1] if version else {}
        row("team-a's file, model, running job and tag after all that", "all intact",
            200 if still else "changed", {}, still and long_status == "running"
            and "a-prod" in (tags.get("tags") or []) and "b-steals" not in (tags.get("tags") or []),
            f"job {long_status}, tags {tags.get('tags') if isinstance(tags, dict) else tags}")
        chat_a = a.call("POST", "/chat/completions", {"model": a_model, "max_tokens": 4,
                                                      "messages": [{"role": "user",
                                                                    "content": "hi"}]})
        expect("team-a chats with its own model", [200], chat_a[0], chat_a[1])
        a.call("POST", f"/fine_tuning/jobs/{long_job}/cancel")

        # a 404 for another project's object reads like one for no object at all
        st1, body1 = b.get(f"/files/{a_file}")
        fake = "file-" + "x" * 24
        st2, body2 = b.get(f"/files/{fake}")
        same = st1 == st2 and error_message(body1).replace(a_file, "ID") == \
            error_message(body2).replace(fake, "ID")
        row("404 for team-a's file vs for a file that never existed", "identical", st1, body1,
            same)

        # path-like upload names
        names = [b"../../etc/passwd", b"a/b/c.jsonl", b"..\\\\x.jsonl", b"..\\x.jsonl",
                 b"bad\x00name.jsonl", b"new\nline.jsonl", b"/abs/path.jsonl", b"",
                 "ñandú 🚀.jsonl".encode()]
        passwd = os.stat("/etc/passwd")
        before = set(p for p in dep.state.rglob("*"))
        uploads = []
        for name in names:
            body, ctype = multipart({"purpose": "fine-tune"}, "file", name, small.read_bytes())
            status, answer = b.call("POST", "/files", body, {"Content-Type": ctype})
            stored = answer.get("filename") if isinstance(answer, dict) and status == 200 \
                else None
            file_id = answer.get("id") if isinstance(answer, dict) and status == 200 else None
            where = dep.state / "files" / file_id if file_id else None
            lands = bool(where and where.is_file() and where.read_bytes() == small.read_bytes())
            uploads.append({"name": repr(name), "status": status, "stored_name": stored,
                            "lands_at_files_id": lands, "error": error_message(answer)
                            if status != 200 else None})
            safe = status != 200 or (lands and "/" not in stored and "\\" not in stored
                                     and "\0" not in stored and "\n" not in stored)
            row(f"upload named {name!r}", "200 stored as a plain name at STATE/files/<id> "
                "(or a 4xx)", status, answer, safe and (status is not None and status < 500),
                f"stored as {stored!r}")
        created = sorted(str(p.relative_to(dep.state)) for p in set(dep.state.rglob("*")) - before
                         if not str(p.relative_to(dep.state)).startswith(("files/file-", "runs/",
                                                                          "exports/")))
        after = os.stat("/etc/passwd")
        row("nothing written outside STATE/files/<id> by those uploads", "nothing",
            "nothing" if not created and passwd.st_mtime == after.st_mtime else "written", {},
            not created and passwd.st_mtime == after.st_mtime, ", ".join(created)[:200])

        # an upload over max_upload_mb (1 MB here), with and without Content-Length
        big = b'{"messages": []}\n' * (1_300_000 // 17)
        sdk_try("upload of 1.3 MB over max_upload_mb 1 (openai client)", [413], lambda:
                client.files.create(file=("big.jsonl", big), purpose="fine-tune"))
        body, ctype = multipart({"purpose": "fine-tune"}, "file", b"big.jsonl", big * 6)
        status, answer = b.call("POST", "/files", body, {"Content-Type": ctype})
        expect("upload of 7.8 MB with Python's urllib (sends the whole body, then reads)",
               [413], status, answer)
        body, ctype = multipart({"purpose": "fine-tune"}, "file", b"big.jsonl", big)
        status, answer = chunked_post(dep.base + "/files", body, ctype, KEYS["team-b"])
        expect("the same upload chunked (no Content-Length)", [413], status, answer)
        leftovers = [p.name for p in (dep.state / "files").iterdir()
                     if p.name.startswith(".upload-")]
        row("no temp files left by refused uploads", "none", "none" if not leftovers
            else "left", {}, not leftovers, ", ".join(leftovers))

        # malformed multipart bodies
        good, ctype = multipart({"purpose": "fine-tune"}, "file", b"x.jsonl", small.read_bytes())
        for attempt, payload, content_type in [
            ("multipart body of garbage", os.urandom(2000), ctype),
            ("multipart without a boundary", good, "multipart/form-data"),
            ("multipart cut off mid-part", good[: len(good) // 2], ctype),
            ("multipart without the file part",
             multipart({"purpose": "fine-tune"}, "other", b"x", b"y")[0], ctype),
            ("multipart with a wrong boundary", good.replace(b"benchboundary", b"otherboundar"),
             ctype),
            ("JSON instead of multipart", b'{"purpose": "fine-tune"}', "application/json"),
        ]:
            status, answer = b.call("POST", "/files", payload, {"Content-Type": content_type})
            expect(attempt, [400, 413, 415, 422], status, answer)

        # project quotas: team-c holds at most 3 files and 0.5 MB
        c_ids, statuses = [], []
        for i in range(4):
            body, ctype = multipart({"purpose": "fine-tune"}, "file", f"c{i}.jsonl".encode(),
                                    small.read_bytes())
            status, answer = c.call("POST", "/files", body, {"Content-Type": ctype})
            statuses.append(status)
            if status == 200:
                c_ids.append(answer["id"])
        expect("team-c's 4th file (max_files 3)", [429, 403, 413], statuses[-1], answer,
               statuses[:3] == [200, 200, 200], f"first three: {statuses[:3]}")
        for file_id in c_ids:
            c.call("DELETE", f"/files/{file_id}")
        body, ctype = multipart({"purpose": "fine-tune"}, "file", b"c-big.jsonl",
                                b"x" * 600_000)
        status, answer = c.call("POST", "/files", body, {"Content-Type": ctype})
        expect("team-c's 0.6 MB file (max_storage_mb 0.5)", [413], status, answer)

        # wrong keys
        wrong = wrong_keys(dep.port, self.args.wrong_keys)
        right = wrong_keys(dep.port, 100, key=KEYS["team-b"])
        row(f"{self.args.wrong_keys} requests with wrong keys", "all 401 invalid_api_key",
            ",".join(f"{k}x{v}" for k, v in wrong["statuses"].items()), {},
            wrong["statuses"] == {"401 invalid_api_key": self.args.wrong_keys},
            f"p50 {wrong['p50_ms']} ms, p99 {wrong['p99_ms']} ms per request "
            f"(a right key: p50 {right['p50_ms']} ms)")
        for attempt, header in [("no Authorization header", None), ("Basic auth", "Basic eDp5"),
                                ("Bearer with an empty key", "Bearer "),
                                ("team-a's key with a suffix", f"Bearer {KEYS['team-a']}x"),
                                ("team-a's key, a prefix of it", f"Bearer {KEYS['team-a'][:-1]}")]:
            status, answer = Api(dep.base, None).get(
                "/files", headers={"Authorization": header} if header else None)
            expect(attempt, [401], status, answer)

        # admin keys and the OpenAI-Project header
        status, body = dep.admin.get("/files")
        ids = {f["id"] for f in body["data"]} if status == 200 else set()
        expect("admin lists files", [200], status, body, a_file in ids and b_file in ids,
               "sees team-a's and team-b's")
        status, body = dep.admin.get("/fine_tuning/jobs?limit=100")
        ids = {j["id"] for j in body["data"]} if status == 200 else set()
        expect("admin lists jobs", [200], status, body, a_job in ids)
        status, body = dep.admin.get("/models")
        ids = {m["id"] for m in body["data"]} if status == 200 else set()
        expect("admin lists models", [200], status, body, a_model in ids)
        admin_b = Api(dep.base, ADMIN, project="team-b")
        status, body = admin_b.get("/files")
        ids = {f["id"] for f in body["data"]} if status == 200 else set()
        expect("admin with OpenAI-Project: team-b lists files", [200], status, body,
               a_file not in ids and b_file in ids, "only team-b's")
        status, body = admin_b.get(f"/files/{a_file}")
        expect("admin with OpenAI-Project: team-b reads team-a's file", [404], status, body)
        status, body = Api(dep.base, KEYS["team-b"], project="team-a").get("/files")
        expect("team-b's key with OpenAI-Project: team-a", [401, 403], status, body)
        status, body = Api(dep.base, KEYS["team-b"], project="team-b").get("/files")
        expect("team-b's key with OpenAI-Project: team-b", [200], status, body)
        status, body = Api(dep.base, KEYS["team-b"], project="nonexistent").get("/files")
        expect("team-b's key with OpenAI-Project: nonexistent", [401, 403], status, body)
        try:
            from openai import OpenAI
            sdk = OpenAI(base_url=dep.base, api_key=KEYS["team-b"], project="team-a",
                         max_retries=0)
            sdk.files.list()
            row("openai client with project='team-a' and team-b's key", "401", 200, {}, False)
        except openai.APIStatusError as exc:
            expect("openai client with project='team-a' and team-b's key", [401, 403],
                   exc.status_code, exc.body if isinstance(exc.body, dict) and "error" in exc.body
                   else {"error": exc.body})
        self.settle(dep, 120)
        passed = sum(r["ok"] for r in rows)
        return {"benchmark": "team-security", "rows": rows, "passed": passed,
                "failed": len(rows) - passed, "uploads": uploads, "wrong_keys": wrong,
                "right_key": right}


def chunked_post(url: str, body: bytes, ctype: str, key: str) -> tuple:
    """A POST with Transfer-Encoding: chunked (no Content-Length)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.putrequest("POST", parts.path)
        conn.putheader("Authorization", f"Bearer {key}")
        conn.putheader("Content-Type", ctype)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for i in range(0, len(body), 65536):
            piece = body[i:i + 65536]
            conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        return response.status, _parse(response.read())
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{exc.__class__.__name__}: {exc}"
    finally:
        conn.close()


def wrong_keys(port: int, n: int, key: str | None = None) -> dict:
    """n GET /v1/models on one kept-alive connection, each with another wrong key (or `key`)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    statuses, times = collections.Counter(), []
    for i in range(n):
        start = time.perf_counter()
        try:
            conn.request("GET", "/v1/models", headers={
                "Authorization": f"Bearer {key or 'sk-wrong-' + uuid.uuid4().hex}"})
            response = conn.getresponse()
            body = _parse(response.read())
            statuses[f"{response.status} {error_code(body) or ''}".strip()] += 1
        except (OSError, http.client.HTTPException) as exc:
            statuses[exc.__class__.__name__] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        times.append((time.perf_counter() - start) * 1000)
    conn.close()
    return {"requests": n, "statuses": dict(statuses), "p50_ms": pct(times, 0.5),
            "p99_ms": pct(times, 0.99), "mean_ms": round(sum(times) / len(times), 2)}
