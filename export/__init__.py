"""Leaving the tool: runs as Hugging Face folders (hf_folder.py, make export) and back (hf_import.py)."""
