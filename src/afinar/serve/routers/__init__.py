"""One router per OpenAI resource: files, fine-tuning jobs, chat completions, models."""
