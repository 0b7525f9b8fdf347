"""Leaving the tool: a run's checkpoint as a Hugging Face folder (hf_folder.py, make export), through hf/'s mapping."""
