"""bench_team.py's load: Load (client threads hammering the API: chat through the openai
client, or database-bound requests) and the `load` section with its stream probe, as
LoadSection, a mixin of bench_team.Bench (it uses the Bench's state: self.main, self.args,
self.work)."""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time

from _team_deploy import (DATA, Deployment, check_events, error_message, job_spec, log, pct,
                          rss_mb)


# --- load generators ---------------------------------------------------------------------------

class Load:
    """Client threads hammering the API until stopped. kind 'chat': the openai client's chat
    completions (some streaming, some on a fine-tuned model when `models` names one); kind
    'db': requests answered from the database (file and job lists, a job)."""

    def __init__(self, dep: Deployment, clients: int, kind: str = "chat", max_tokens: int = 16,
                 models: dict | None = None, stream_every: int = 10, ft_every: int = 10):
        self.dep, self.clients, self.kind, self.max_tokens = dep, clients, kind, max_tokens
        self.models = models if models is not None else {}
        self.ft_every = ft_every
        self.streaming = {i for i in range(clients)
                          if stream_every and i % stream_every == stream_every // 2}
        self.stop_event = threading.Event()
        self.records: list[tuple] = []  # (start, end, client kind, outcome, tokens)
        self.samples: dict[str, str] = {}
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self) -> "Load":
        self.started = time.monotonic()
        for i in range(self.clients):
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def stop(self, timeout: float = 120) -> None:
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self.stopped = time.monotonic()
        self.hung = sum(t.is_alive() for t in self.threads)

    def _note(self, start: float, kind: str, outcome, tokens: int = 0, text: str = "") -> None:
        with self.lock:
            self.records.append((start, time.monotonic(), kind, outcome, tokens))
            if outcome != "ok" and str(outcome) not in self.samples:
                self.samples[str(outcome)] = text[:300]

    def _run(self, i: int) -> None:
        import openai

        project = "team-a" if i % 2 == 0 else "team-b"
        api = self.dep.key(project)
        client = api.sdk(timeout=60)
        rng = random.Random(i)
        n = 0
        while not self.stop_event.is_set():
            n += 1
            start = time.monotonic()
            if self.kind == "db":
                path = rng.choice(["/files", "/fine_tuning/jobs?limit=5", "/models"])
                status, body = api.get(path, timeout=60)
                outcome = "ok" if status == 200 else ("connection" if status is None else status)
                self._note(start, "db", outcome, 0, str(error_message(body) or body))
                if status is None:
                    time.sleep(0.05)
                continue
            streaming = i in self.streaming
            model = "tiny"
            kind = "stream" if streaming else "base"
            if self.ft_every and i % self.ft_every == 0 and self.models.get(project):
                model, kind = self.models[project], "fine-tuned"
            messages = [{"role": "user", "content": f"Ticket {i}-{n}: my deploy fails with "
                         f"error {rng.randint(100, 999)}, what should I do?"}]
            try:
                if streaming:
                    tokens = 0
                    stream = client.chat.completions.create(
                        model=model, messages=messages, max_tokens=self.max_tokens, stream=True,
                        stream_options={"include_usage": True})
                    for chunk in stream:
                        if chunk.usage is not None:
                            tokens = chunk.usage.completion_tokens
                    self._note(start, kind, "ok", tokens)
                else:
                    answer = client.chat.completions.create(model=model, messages=messages,
                                                            max_tokens=self.max_tokens)
                    self._note(start, kind, "ok", answer.usage.completion_tokens)
            except openai.APIStatusError as exc:
                self._note(start, kind, exc.status_code, 0, str(exc))
            except openai.APITimeoutError as exc:
                self._note(start, kind, "timeout", 0, str(exc))
            except openai.APIConnectionError as exc:
                cause = exc.__cause__ or exc.__context__
                self._note(start, kind, "connection", 0, f"{exc} ({cause!r})")
                time.sleep(0.05)  # the server is away: do not spin
            except Exception as exc:  # an SSE error event, a broken stream...
                self._note(start, kind, exc.__class__.__name__, 0, str(exc))

    def summary(self, since: float | None = None, until: float | None = None,
                where=None) -> dict:
        """Requests started in [since, until), or those `where(start, end)` keeps."""
        with self.lock:
            if where is not None:
                records = [r for r in self.records if where(r[0], r[1])]
            else:
                records = [r for r in self.records if (since is None or r[0] >= since)
                           and (until is None or r[0] < until)]
        if where is not None and records:
            since, until = min(r[0] for r in records), max(r[1] for r in records)
        duration = (until or getattr(self, "stopped", time.monotonic())) - \
            (since or self.started)
        ok = [r for r in records if r[3] == "ok"]
        errors = collections.Counter(str(r[3]) for r in records if r[3] != "ok")
        by_kind = {}
        for kind in sorted({r[2] for r in records}):
            mine = [r for r in records if r[2] == kind]
            good = [r[1] - r[0] for r in mine if r[3] == "ok"]
            by_kind[kind] = {"requests": len(mine), "served": len(good),
                             "p50_s": pct(good, 0.5), "p99_s": pct(good, 0.99)}
        latencies = [r[1] - r[0] for r in ok]
        tokens = sum(r[4] for r in ok)
        return {"requests": len(records), "served": len(ok), "errors_by_status": dict(errors),
                "errors_5xx": sum(n for k, n in errors.items() if k.isdigit() and k >= "500"),
                "p50_s": pct(latencies, 0.5), "p99_s": pct(latencies, 0.99),
                "max_s": round(max(latencies), 3) if latencies else None,
                "seconds": round(duration, 1),
                "requests_per_s": round(len(ok) / duration, 2) if duration > 0 else None,
                "completion_tokens": tokens,
                "tokens_per_s": round(tokens / duration, 1) if duration > 0 else None,
                "by_kind": by_kind, "error_samples": dict(self.samples),
                "clients_still_running_at_stop": getattr(self, "hung", None)}


class LoadSection:
    """Bench's `load` section (section_load) and its stream probe."""

    # --- section: load --------------------------------------------------------------------------
    def section_load(self) -> dict:
        args, dep = self.args, self.main
        duration = args.minutes * 60
        small = self.work / "load-data.jsonl"
        small.write_text("".join(DATA.read_text().splitlines(keepends=True)[:24]))
        files = {p: dep.upload(p, small, f"load-{p}.jsonl") for p in ("team-a", "team-b")}
        spec = job_spec(max_steps=4, save_steps=2, epochs=1)
        models: dict[str, str] = {}
        load = Load(dep, args.clients, "chat", args.max_tokens, models, stream_every=0).start()
        rss_start = rss_mb(dep.api_proc.pid)
        submitted: list[tuple[str, str, float]] = []
        submit_errors: list[str] = []
        stop = threading.Event()
        rng = random.Random(5)

        def submitter():
            n = 0
            while not stop.is_set():
                project = ("team-a", "team-b")[n % 2]
                try:
                    submitted.append((dep.submit(project, files[project], spec), project,
                                      time.monotonic()))
                except Exception as exc:
                    submit_errors.append(f"{exc.__class__.__name__}: {exc}"[:300])
                n += 1
                stop.wait(rng.uniform(20, 30))

        def monitor():  # the newest fine-tuned model of each project, for the chat clients
            while not stop.wait(2):
                for job_id, project, _ in list(submitted):
                    job = dep.job(job_id)
                    if job and job["status"] == "succeeded":
                        models[project] = job["fine_tuned_model"]

        threads = [threading.Thread(target=submitter, daemon=True),
                   threading.Thread(target=monitor, daemon=True)]
        for thread in threads:
            thread.start()
        log(f"load: {args.clients} chat clients for {duration:.0f} s, a job every 20-30 s")
        end = time.monotonic() + duration
        while time.monotonic() < end:
            time.sleep(min(30, max(0.1, end - time.monotonic())))
            s = load.summary()
            log(f"  {s['served']} served, errors {s['errors_by_status']}, p50 {s['p50_s']} s, "
                f"{len(submitted)} jobs submitted")
        stop.set()
        load.stop()
        rss_end = rss_mb(dep.api_proc.pid)
        chat = load.summary()
        for thread in threads:
            thread.join(timeout=30)
        log("load: waiting for the submitted jobs to finish")
        per_job = []
        deadline = time.monotonic() + 120 + 60 * len(submitted)
        for job_id, project, at in submitted:
            job = dep.wait_job(job_id, max(5, deadline - time.monotonic()))
            events = dep.events(job_id)
            checked = check_events(events)
            per_job.append({"job": job_id, "project": project, "status": job.get("status"),
                            "error": job.get("error"),
                            "seconds_from_submit_to_final": round(
                                (job.get("finished_at") or 0) - (job.get("created_at") or 0), 1)
                            if job.get("finished_at") else None, **checked})
        statuses = collections.Counter(j["status"] for j in per_job)
        exactly_once = bool(per_job) and all(j["status"] == "succeeded"
                                             and j["models_created"] == 1 for j in per_job)
        in_order = all(j["created_at_ordered"] and j["steps_ordered_within_attempt"]
                       and j["attempts"] == [1] for j in per_job)
        seconds = [j["seconds_from_submit_to_final"] for j in per_job
                   if j["seconds_from_submit_to_final"] is not None]
        probe = self.stream_probe() if args.stream_probe else None
        return {"benchmark": "team-load", "minutes": args.minutes, "clients": args.clients,
                "max_tokens": args.max_tokens, "chat": chat, "stream_probe": probe,
                "jobs": {"submitted": len(submitted), "succeeded": statuses.get("succeeded", 0),
                         "failed": statuses.get("failed", 0),
                         "other": {k: v for k, v in statuses.items()
                                   if k not in ("succeeded", "failed")},
                         "submit_errors": submit_errors,
                         "every_job_succeeded_exactly_once": exactly_once,
                         "events_in_order": in_order,
                         "submit_to_final_s": {"p50": pct(seconds, 0.5),
                                               "max": max(seconds) if seconds else None},
                         "per_job": per_job},
                "api_rss_mb": {"start": rss_start, "end": rss_end},
                "loadavg_end": [round(x, 2) for x in os.getloadavg()]}

    def stream_probe(self) -> dict:
        """`--clients` - 1 non-streaming chat clients and one streaming one for
        --stream-probe seconds: does the API still answer (GET /v1/models) during and after?
        A hung API is killed and started again, so that the run goes on."""
        dep, seconds = self.main, self.args.stream_probe
        clients = self.args.clients
        log(f"stream probe: {clients - 1} chat clients + 1 streaming for {seconds:.0f} s")
        load = Load(dep, clients, "chat", self.args.max_tokens, {}, stream_every=0, ft_every=0)
        load.streaming = {0}
        load.start()
        time.sleep(seconds)
        during = dep.admin.get("/models", timeout=10)[0]
        load.stop(timeout=120)
        result = load.summary()
        after = dep.admin.get("/models", timeout=10)[0]
        hung = after != 200
        restart = None
        if hung:
            log("stream probe: the API does not answer; killing and starting it again")
            dep.kill_api(signal.SIGKILL)
            restart = dep.start_api()
        return {"clients": clients - 1, "streaming_clients": 1, "seconds": seconds,
                "chat": result, "models_status_during": during,
                "models_status_after_clients_stopped": after, "api_hung": hung,
                "api_restarted_in_s": restart}
