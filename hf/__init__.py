"""The Hugging Face formats: our option sets as transformers architectures, tokenizers as tokenizer.json, both ways."""
