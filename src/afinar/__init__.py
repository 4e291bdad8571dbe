"""afinar: fine-tune open LLMs from a JSONL file of examples.

    import afinar
    report = afinar.validate("data.jsonl")
    result = afinar.train(afinar.TrainConfig(data="data.jsonl"))
    model = afinar.load(result.run_dir)
    model.generate([[{"role": "user", "content": "Hola"}]])
    report = afinar.evaluate(result.run_dir)          # base vs tuned; report.json/.html
    afinar.export(result.run_dir, to="gguf", quant="q8_0")   # verified against the run
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["TrainConfig", "train", "load", "validate", "evaluate", "export", "GenerationSettings",
           "AfinarError"]


def __getattr__(name: str):
    # Lazy: `import afinar` stays fast (torch and transformers load only when used).
    if name == "TrainConfig":
        from afinar.config import TrainConfig
        return TrainConfig
    if name == "train":
        from afinar.train.loop import train
        # Importing afinar.train.loop binds the subpackage afinar.train here, which would shadow
        # this function for `from afinar import train`: bind the function instead.
        globals()["train"] = train
        return train
    if name == "load":
        from afinar.infer.generate import load
        return load
    if name == "GenerationSettings":
        from afinar.infer.generate import GenerationSettings
        return GenerationSettings
    if name == "validate":
        from afinar.data.validate import load_examples
        return load_examples
    if name == "evaluate":
        from afinar.evaluation.evaluator import evaluate
        return evaluate
    if name == "export":
        from afinar.export.exporter import export
        return export
    if name == "AfinarError":
        from afinar.errors import AfinarError
        return AfinarError
    raise AttributeError(name)
