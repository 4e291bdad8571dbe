"""`afinar serve`: OpenAI's files, fine-tuning jobs, chat completions and models APIs over local
training, so code written for the hosted service runs against afinar with another base_url."""
