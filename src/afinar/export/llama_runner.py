"""Runs a GGUF file with real llama.cpp (through llama-cpp-python) for verification and tests.

    with LlamaCpp("model-f16.gguf") as llm:
        llm.tokenize(text)            # ids exactly as llama.cpp (and so Ollama) makes them
        llm.chat_prompt_ids(messages) # the prompt from the file's own chat template
        llm.greedy(prompt_ids, 64)    # greedy new ids, ending with an end-of-generation token

llama-cpp-python is optional: it compiles llama.cpp at install time (minutes), so afinar only
asks for it when a GGUF export is verified. afinar itself runs llama.cpp only in a child process
(`afinar.export.llama_child`), so a native crash cannot take the caller down with it.

Repacked weights: llama.cpp copies quantised weights into "extra" CPU buffers laid out for its
fastest kernels (AMX tiles on Intel Xeons with AMX, interleaved blocks for AVX2/NEON). On AMX CPUs
that path segfaults at the first evaluation of any quantised file (ggml's
`ggml_backend_amx_mul_mat`, ggml-org/llama.cpp#20824); f16/bf16 are not affected. afinar therefore
loads GGUF files without the extra buffers on CPUs with AMX, and with them elsewhere, where they
are safe and faster. `AFINAR_LLAMA_REPACK=on|off` overrides that choice (llama.cpp's own
command-line tools call it `--no-repack`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from afinar.errors import AfinarError

INSTALL_HINT = ('CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install "llama-cpp-python==0.3.36" (it compiles '
                'llama.cpp: about 4 minutes); to skip only the check, pass --no-verify')


def require_llama_cpp(purpose: str = "checking a GGUF export"):
    try:
        import llama_cpp
    except ImportError:
        raise AfinarError(f"{purpose} needs llama-cpp-python", INSTALL_HINT) from None
    return llama_cpp


REPACK_ENV = "AFINAR_LLAMA_REPACK"
_AMX_FLAGS = {"amx_tile", "amx_int8", "amx_bf16"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def use_repacked_weights(flags: set[str] | None = None) -> bool:
    """Whether llama.cpp may use its extra (repacked) weight buffers here: not on AMX CPUs,
    where they crash; `AFINAR_LLAMA_REPACK=on|off` decides instead when set."""
    wanted = os.environ.get(REPACK_ENV, "auto").strip().lower()
    if wanted in ("on", "1", "true", "yes"):
        return True
    if wanted in ("off", "0", "false", "no"):
        return False
    if wanted not in ("auto", ""):
        raise AfinarError(f"{REPACK_ENV}={wanted!r} is not a setting", "use auto, on or off")
    return not (_AMX_FLAGS & (cpu_flags() if flags is None else flags))


@contextlib.contextmanager
def _model_params(llama_cpp, **fields):
    """llama-cpp-python's `Llama` builds llama.cpp's model parameters from
    `llama_model_default_params()` and has no argument for some of them (use_extra_bufts among
    them): this sets those fields on the defaults while one model is being constructed."""
    binding = llama_cpp.llama.llama_cpp  # the low-level module `Llama` reads its defaults from
    original = binding.llama_model_default_params

    def defaults():
        params = original()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    binding.llama_model_default_params = defaults
    try:
        yield
    finally:
        binding.llama_model_default_params = original


class LlamaCpp:
    def __init__(self, path: Path | str, lora: Path | str | None = None, n_ctx: int = 2048,
                 logits_all: bool = False, repack: bool | None = None):
        llama_cpp = require_llama_cpp()
        self._lib = llama_cpp
        self.repack = use_repacked_weights() if repack is None else repack
        with _model_params(llama_cpp, use_extra_bufts=self.repack):
            self.llm = llama_cpp.Llama(
                model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx,
                n_threads=os.cpu_count() or 1, logits_all=logits_all, verbose=False, seed=0)
        if bool(self.llm.model_params.use_extra_bufts) != self.repack:  # a binding that changed
            self.llm.close()
            raise AfinarError("could not set llama.cpp's use_extra_bufts through this "
                              "llama-cpp-python", INSTALL_HINT)

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.llm.close()

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Special-token text (e.g. <|im_start|>) is parsed as the special token, as in chat."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt ids llama-cpp-python's chat API makes from this file alone (a
        `create_chat_completion` without a chat_format): the GGUF's `tokenizer.chat_template`
        rendered with the file's own BOS/EOS text and a generation prompt, tokenised without an
        added BOS and with special tokens parsed, as its chat handler does."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise AfinarError("the GGUF carries no chat template (tokenizer.chat_template)")
        model = self.llm._model

        def text(token: int) -> str:
            return model.token_get_text(token) if token != -1 else ""

        formatter = Jinja2ChatFormatter(template=template, eos_token=text(self.llm.token_eos()),
                                        bos_token=text(self.llm.token_bos()),
                                        add_generation_prompt=True)
        result = formatter(messages=messages)
        return self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special,
                                 special=True)

    def is_end(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.llm._model.vocab, token))

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """New token ids, greedy; the end-of-generation token (if reached) is the last one."""
        self.llm.reset()
        out: list[int] = []
        for token in self.llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                       repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if self.is_end(token) or len(out) >= max_new_tokens:
                break
        return out

    def forced_predictions(self, prompt_ids: list[int], answer: list[int]) -> list[int]:
        """Teacher forcing: llama.cpp's greedy choice for each token of `answer`, given the
        prompt and the answer's own preceding tokens (needs logits_all=True)."""
        if not answer:
            return []
        ids = prompt_ids + answer[:-1]
        logits = self.logits(ids)
        return [int(i) for i in logits[len(prompt_ids) - 1:].argmax(axis=-1)]

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits at every position (needs logits_all=True)."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def chat(self, messages: list[dict], max_tokens: int = 256) -> tuple[str, str]:
        """What a user of llama.cpp's chat API gets, with the GGUF's own template and stop
        tokens: (answer, finish_reason)."""
        result = self.llm.create_chat_completion(messages=messages, temperature=0.0,
                                                 max_tokens=max_tokens, repeat_penalty=1.0)
        choice = result["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]


# afinar name -> llama.cpp file type constant name
LLAMA_CPP_TYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


def quantize_in_process(source: Path, target: Path, kind: str, threads: int = 0) -> None:
    """llama.cpp's quantiser in this process (llama_child.py's `quantize` task)."""
    llama_cpp = require_llama_cpp(f"the {kind} type (llama.cpp's quantiser)")
    ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[kind.lower()], None)
    if ftype is None:
        raise AfinarError(f"this llama-cpp-python has no {kind} quantisation")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if code != 0 or not target.is_file():
        raise AfinarError(f"llama.cpp's quantiser failed ({code}) making {kind} from {source}")
