"""Serving forms of a finished adapter: what inference engines read, written from any PEFT LoRA adapter folder.

`factors` reads an adapter into per-module factors with PEFT's own scale folded in; `truncate` caps ranks by a
truncated SVD; `forms` writes the canonical PEFT form and the uniform form (every module padded to one rank);
`gguf_form` writes a llama.cpp LoRA adapter; `engines` knows what each engine refuses and the rank it serves at;
`export` puts them together for `ranktune export` and Python.
"""
