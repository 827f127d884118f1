from model import export_hf_gpt2, load_hf_gpt2  # noqa: F401  TEMPORARY
