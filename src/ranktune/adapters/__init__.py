"""LoRA adapters: `lora` builds them on a base model, `loading` loads saved ones, `layout` reads a folder's files.

Import the submodules directly; this package imports nothing heavy, so reading a folder stays cheap.
"""
