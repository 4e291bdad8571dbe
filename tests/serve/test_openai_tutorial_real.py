"""The OpenAI fine-tuning guide's code, word for word but for base_url, api_key and the model
name, against `afinar serve` on the embedded SmolLM2-135M-Instruct (several minutes on CPU)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from serving import make_server

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
DATA = Path(__file__).resolve().parents[2] / "examples" / "soporte-triaje" / "data.jsonl"
SYSTEM = "Eres el asistente de soporte de Ferrolux, una tienda online de electrodomésticos."
TICKETS = ["Pagué el pedido 4471 dos veces y quiero que me devuelvan uno de los cargos.",
           "La lavadora que me llegó ayer no enciende, ¿qué hago?",
           "No puedo entrar en mi cuenta, dice que la contraseña es incorrecta.",
           "Mi pedido 5520 lleva diez días en tránsito y no llega.",
           "Quiero devolver la cafetera que compré la semana pasada, no me gusta.",
           "La factura del pedido 3390 tiene mal mi dirección fiscal."]
FORMAT = re.compile(r"Categoría: \S+\nPrioridad: \S+\nRespuesta: .+", re.S)


def test_openai_tutorial_code_against_afinar(tmp_path, tiny_model_dir):
    srv = make_server(tmp_path / "tutorial", tiny_model_dir).start()
    try:
        from openai import OpenAI

        client = OpenAI(base_url=srv.url, api_key="sk-local")

        # --- the guide's code -------------------------------------------------------------
        file = client.files.create(
            file=open(DATA, "rb"),
            purpose="fine-tune"
        )
        job = client.fine_tuning.jobs.create(
            training_file=file.id,
            model="smollm2-135m-instruct",
            hyperparameters={
                "n_epochs": 2,
                "batch_size": 4,
                "learning_rate_multiplier": 1,
            }
        )
        while job.status not in ("succeeded", "failed", "cancelled"):
            time.sleep(5)
            job = client.fine_tuning.jobs.retrieve(job.id)
            print(job.status, job.estimated_finish)
        answers = []
        for ticket in TICKETS:
            completion = client.chat.completions.create(
                model=job.fine_tuned_model,
                messages=[
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": ticket}
                ]
            )
            print(completion.choices[0].message)
            answers.append(completion.choices[0].message.content)
        # -----------------------------------------------------------------------------------

        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model.startswith("ft:smollm2-135m-instruct:afinar::")
        # The guide's call samples at OpenAI's default temperature 1; a 135M model then keeps
        # the taught format in some answers, not all (measured: 1 of 3 exactly, 2 of 3 with its
        # labels; six tickets make "none at all" unlikely). Greedy, it answers in the format
        # (the demo: 18 of 19 held-out tickets).
        assert any("Categoría:" in a for a in answers), answers
        greedy = [client.chat.completions.create(
            model=job.fine_tuned_model, temperature=0, max_tokens=120,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}]
        ).choices[0].message.content for t in TICKETS]
        assert sum(bool(FORMAT.fullmatch(a.strip())) for a in greedy) >= 4, greedy
        base = client.chat.completions.create(
            model="smollm2-135m-instruct", temperature=0, max_tokens=60,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user",
                                                              "content": TICKETS[0]}])
        assert not FORMAT.fullmatch(base.choices[0].message.content.strip())
        run = srv.folder / "state" / "runs" / job.id
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
    finally:
        srv.stop()
