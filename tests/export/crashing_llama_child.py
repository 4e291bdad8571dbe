"""Stands in for `python -m afinar.export.llama_child` in test_llama_crash.py: loads the real
llama.cpp library like the real child, then dies of a real segmentation fault (a NULL read), as
llama.cpp's AMX kernels do on Intel Xeons with AMX. That CPU cannot be had on every test
machine, so the crash is produced here; everything around it is the real code."""

import ctypes
import sys

import llama_cpp  # noqa: F401  (the library is loaded, as in the real child)

print("ggml: pretending to be an AMX kernel", file=sys.stderr, flush=True)
ctypes.string_at(0)  # SIGSEGV
