"""HF transformers checkpoint interop for gpt-oss."""
