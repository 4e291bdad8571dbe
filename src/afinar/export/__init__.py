"""Export a trained run: merged Hugging Face weights, GGUF (model or LoRA adapter), Ollama.

    from afinar.export import export
    result = export("runs/soporte", to="ollama", quant="q8_0")   # verified against the run

See exporter.py for the flow and verify.py for what "verified" means.
"""

from afinar.export.exporter import FORMATS, ExportResult, export

__all__ = ["FORMATS", "ExportResult", "export"]
