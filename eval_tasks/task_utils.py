"""Functions the local task YAMLs name with `!function task_utils.X` (lm-eval loads this file from beside the
YAML). They are lm-eval's own, imported, so the local tasks process documents exactly as the official ones."""

from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as wikitext_process_results
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

__all__ = ["hellaswag_process_docs", "wikitext_detokenizer", "wikitext_process_results"]
